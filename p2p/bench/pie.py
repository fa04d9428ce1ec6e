"""PIE-Bench's data as distributed (Ju et al., "PnP Inversion", ICLR 2024: the data/ folder of PnPInversion).

DATA_DIR/mapping_file.json maps each picture's id to its entry:

    image_path           the picture, relative to DATA_DIR/annotation_images/
    original_prompt      the source prompt; [brackets] mark the words the edit changes
    editing_prompt       the target prompt, marked the same way
    editing_instruction  the edit in words (not used by the prompt-based methods)
    editing_type_id      "0".."9" (EDIT_TYPES)
    blended_word         "SOURCE_WORD TARGET_WORD" (the edited object in each prompt), or ""
    mask                 the edited region, run-length coded: [start, length, start, length, ...] over the
                         picture's pixels in row-major order

Every entry is checked when the file is read, before any model loads: a malformed one is an error naming
the file, the id and the field; a picture missing from the folder too.

The edit as the official runner reads it: the brackets are removed from both prompts, and the blended words,
when given, become LocalBlend's words (the source word in the source prompt, the target word in the target
prompt) and a reweighting of the target word. Each blended word must be a word of its prompt (a space-separated
word equal to it): the official code silently finds no token for a word that is not (a punctuation mark glued
to it is enough), which empties that prompt's blend mask and drops the reweighting; here such an entry is an
error listing every id concerned, so that a run never measures a silently different edit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.textfile import read_json

MAPPING = "mapping_file.json"
PICTURES = "annotation_images"
EDIT_TYPES = {"0": "random", "1": "change object", "2": "add object", "3": "delete object",
              "4": "change content", "5": "change pose", "6": "change color", "7": "change material",
              "8": "change background", "9": "change style"}
TEXT_FIELDS = ("image_path", "original_prompt", "editing_prompt", "editing_instruction", "editing_type_id",
               "blended_word")
MAX_MAPPING = 512 * 2 ** 20   # the real file is a few MB; far above it, still a bound on what is read


@dataclass(frozen=True)
class Entry:
    """One PIE-Bench picture and its edit. image_path: as the mapping file gives it, image: that file; prompts
    are without brackets; blend_words is (source word, target word) or None; rle the mask's run-length code."""
    id: str
    image_path: str
    image: Path
    source_prompt: str
    target_prompt: str
    instruction: str
    edit_type: str
    blend_words: tuple | None
    rle: tuple

    def mask(self, height: int, width: int) -> np.ndarray:
        """The edited region at the picture's size, {0, 1} uint8 (decode_mask)."""
        return decode_mask(self.rle, height, width)


def strip_brackets(prompt: str) -> str:
    """The prompt as the model reads it: the [ ] marks removed, nothing else changed."""
    return prompt.replace("[", "").replace("]", "")


def decode_mask(rle, height: int, width: int) -> np.ndarray:
    """The run-length code as the official `mask_decode`: each (start, length) pair sets `length` pixels
    from `start` in row-major order, cut at the picture's end; then the picture's border (first and last
    row and column) is set to 1, which the official code does to forgive annotation errors at the edges.
    (H, W) uint8 in {0, 1}, 1 = the edited region."""
    n = height * width
    flat = np.zeros(n, dtype=np.uint8)
    for start, length in zip(rle[0::2], rle[1::2]):
        flat[start:start + max(0, min(length, n - start))] = 1
    mask = flat.reshape(height, width)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


# ------------------------------------------------------------------------------- reading
def read_mapping(data_dir, types=None) -> list[Entry]:
    """Every entry of DATA_DIR/mapping_file.json, in the file's order, checked; `types`: only these
    editing_type_id values ("0".."9"). A malformed entry or a missing picture is a ValueError /
    FileNotFoundError naming the file, the id and the field."""
    data_dir = Path(data_dir)
    path = data_dir / MAPPING
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: DATA_DIR must be PIE-Bench's data folder, holding "
                                f"{MAPPING} and {PICTURES}/ (see docs/pie-bench.md)")
    mapping = read_json(path, "PIE-Bench mapping file", MAX_MAPPING)
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{path}: must be a JSON object mapping each picture's id to its entry, got "
                         f"{type(mapping).__name__ if mapping else 'an empty one'}")
    for t in types or ():
        if t not in EDIT_TYPES:
            raise ValueError(f"edit type {t!r} is not one of PIE-Bench's: {', '.join(EDIT_TYPES)}")
    entries = [read_entry(path, key, item) for key, item in mapping.items()]
    entries = [e for e in entries if types is None or e.edit_type in types]
    check_blend_words(path, entries)
    return entries


def read_entry(path: Path, key: str, item) -> Entry:
    """One entry, every field checked (`path`: the mapping file, named in errors)."""
    def bad(field, why):
        return ValueError(f"{path}: entry {key!r}: {field} {why}; fix the entry or take a fresh copy of PIE-Bench")

    if not isinstance(item, dict):
        raise bad("the entry", f"must be an object with {', '.join(TEXT_FIELDS)} and mask, got "
                               f"{type(item).__name__}")
    for field in TEXT_FIELDS:
        if not isinstance(item.get(field), str):
            raise bad(repr(field), "is missing" if field not in item else f"must be a string, got {item[field]!r:.80}")
    if item["editing_type_id"] not in EDIT_TYPES:
        raise bad("'editing_type_id'", f"is {item['editing_type_id']!r:.40}, not one of {', '.join(EDIT_TYPES)}")
    words = item["blended_word"].split(" ") if item["blended_word"] != "" else []
    if words and (len(words) != 2 or not all(words)):
        raise bad("'blended_word'", f"is {item['blended_word']!r:.80}: it must be two words, the source prompt's "
                                    "then the target prompt's, separated by one space (or \"\" for none)")
    return Entry(str(key), item["image_path"], picture_path(path, key, item["image_path"]),
                 strip_brackets(item["original_prompt"]),
                 strip_brackets(item["editing_prompt"]), item["editing_instruction"], item["editing_type_id"],
                 tuple(words) or None, read_rle(item.get("mask"), bad))


def picture_path(path: Path, key: str, relative: str) -> Path:
    """DATA_DIR/annotation_images/image_path, which must exist and stay inside that folder."""
    root = path.parent / PICTURES
    image = root / relative
    if not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise ValueError(f"{path}: entry {key!r}: 'image_path' {relative!r} must be a path inside {root}")
    if not image.is_file():
        raise FileNotFoundError(f"{path}: entry {key!r}: the picture of 'image_path' ({image}) does not exist; "
                                f"is {root} complete?")
    return image


def read_rle(rle, bad) -> tuple:
    """The mask's run-length code: an even number of whole numbers >= 0."""
    if not isinstance(rle, list):
        raise bad("'mask'", "is missing" if rle is None else f"must be a list of numbers, got {type(rle).__name__}")
    if len(rle) % 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in rle):
        raise bad("'mask'", "must be a run-length code: pairs of whole numbers >= 0 (start, length)")
    return tuple(rle)


def check_blend_words(path: Path, entries: list[Entry]) -> None:
    """Every blended word a word of its prompt (see the module): one error listing the entries that are not."""
    missing = [f"{e.id} ({w!r} in {p!r})" for e in entries if e.blend_words
               for w, p in zip(e.blend_words, (e.source_prompt, e.target_prompt)) if w not in p.split(" ")]
    if missing:
        raise ValueError(f"{path}: 'blended_word' names a word its prompt does not have (the official runner "
                         f"would blend and reweight nothing for it) in {len(missing)} entries: "
                         f"{'; '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}; fix those entries, or "
                         f"leave their edit types out with --types")
