"""Tokenizers read from a transformers `tokenizer.json` (the `tokenizers` library's file), without that library.

SD3 / SD3.5 / Flux folders carry their tokenizers as `tokenizer*/tokenizer.json`:
- model "BPE" with the `</w>` end-of-word suffix: CLIP's byte-level BPE. It is this library's CLIP tokenizer
  (models/clip.py, `Tokenizer.from_folder`) with the folder's vocabulary, merges and padding
  (tokenizer_config.json's `pad_token`: `<|endoftext|>` for CLIP-L, `!` for SD3's CLIP-G; a pad token other
  than end-of-text is also split out of the prompt's text, as transformers does: `PadSplitTokenizer`).
- model "Unigram": T5's SentencePiece vocabulary (`UnigramTokenizer` below): the text is split on the added
  special tokens, normalised, split into words (WhitespaceSplit, then Metaspace: "▁" before each word), and
  each word segmented by Viterbi over the pieces' log-probabilities, exactly as the `tokenizers` library's
  Unigram model does (ties keep the earlier start, characters no piece covers become `<unk>`, a run of them
  one `<unk>`). No BOS; `</s>` ends the prompt; `<pad>` fills the rest.

A folder with only SentencePiece's `spiece.model` is refused with the conversion that writes tokenizer.json.
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import regex
import torch

from .clip import Tokenizer
from .textfile import read_json
from .tokens import token_rows

UNK_PENALTY = 10.0   # tokenizers' K_UNK_PENALTY: an unknown character scores the lowest piece's score minus this
# Rust's char::is_whitespace (tokenizers' WhitespaceSplit), which Python's str.split() does not quite match
WHITESPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
SPIECE_FIX = ("convert it once with transformers: T5TokenizerFast.from_pretrained(folder).save_pretrained(folder) "
              "writes tokenizer.json beside it")


def read_tokenizer(folder) -> Tokenizer | UnigramTokenizer:
    """The tokenizer of a transformers tokenizer folder holding `tokenizer.json`: CLIP's BPE (models.clip.Tokenizer)
    or T5's Unigram (UnigramTokenizer), chosen by the file's `model.type`."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.exists():
        if (folder / "spiece.model").exists():
            raise ValueError(f"{folder}: holds SentencePiece's spiece.model but no tokenizer.json; this library reads "
                             f"T5's vocabulary from tokenizer.json only (no sentencepiece): {SPIECE_FIX}")
        raise FileNotFoundError(f"{folder}: no tokenizer.json (a diffusers folder's tokenizer*/ holds one)")
    data = read_json(path, "tokenizer.json")
    model = data.get("model") if isinstance(data, dict) else None
    kind = model.get("type") if isinstance(model, dict) else None
    if kind == "BPE" and model.get("end_of_word_suffix") == "</w>":
        tok = Tokenizer.from_folder(folder)
        return tok if tok.pad == tok.eos else PadSplitTokenizer.from_folder(folder)
    if kind == "Unigram":
        return UnigramTokenizer.from_json(data, path)
    raise ValueError(f"{path}: a {kind!r} tokenizer model; supported: CLIP's BPE (with the '</w>' end-of-word "
                     "suffix) and T5's Unigram")


class PadSplitTokenizer(Tokenizer):
    """CLIP's BPE padding with a token other than end-of-text (SD3's CLIP-G: "!" = 0). transformers registers
    the folder's pad token as a special token, so where a prompt writes it, it is cut out of the text and is
    the pad id: "wow!!" is wow</w>, 0, 0 (not wow</w>, !!</w>), as the diffusers pipelines tokenize it."""

    def encode(self, text: str) -> list[int]:
        ids = []
        for i, part in enumerate(text.split(self.decoder[self.pad])):
            ids += ([self.pad] if i else []) + super().encode(part)
        return ids


class UnigramTokenizer:
    """T5's tokenizer from tokenizer.json. The protocol of the library's tokenizers: `encode(text)` content ids,
    `decode(ids)`, `__call__(prompts, length)` -> (N, length) int64 (content, `</s>`, `<pad>`...), and the ids
    `bos` (None: T5 has none), `eos`, `pad`, `length` (SD3 reads 256 positions, Flux 512)."""

    bos, length = None, 256

    def __init__(self, pieces: list[tuple[str, float]], unk_id: int, specials: list[str],
                 normalizer: list[dict], metaspace: dict, where: str):
        self.pieces = [p for p, _ in pieces]
        self.scores = [float(s) for _, s in pieces]
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.unk, self.unk_score = unk_id, min(self.scores) - UNK_PENALTY
        self.longest = max(map(len, self.pieces))
        missing = [t for t in ("</s>", "<pad>") if t not in self.ids]
        if missing:
            raise ValueError(f"{where}: the Unigram vocabulary lacks {missing}: not T5's tokenizer")
        self.eos, self.pad = self.ids["</s>"], self.ids["<pad>"]
        # longest first, so one special token written inside another's text is not split off
        alternatives = "|".join(map(re.escape, sorted(specials, key=len, reverse=True)))
        self.specials = re.compile(f"({alternatives})") if specials else None
        self.normalizer, self.where = normalizer, where
        self.mark, self.prepend, self.whitespace_split = metaspace["replacement"], metaspace["prepend"], metaspace["whitespace_split"]

    @classmethod
    def from_json(cls, data: dict, where) -> "UnigramTokenizer":
        model = data["model"]
        try:
            pieces = [(str(p), float(s)) for p, s in model["vocab"]]
            unk_id = int(model["unk_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: not a Unigram model (a vocab of [piece, score] and unk_id): {e!r}") from None
        if model.get("byte_fallback"):
            raise ValueError(f"{where}: a Unigram model with byte_fallback (T5's has none) is not supported")
        specials = [t["content"] for t in data.get("added_tokens") or [] if t.get("special")]
        return cls(pieces, unk_id, specials, normalizer_steps(data.get("normalizer"), where),
                   metaspace_of(data.get("pre_tokenizer"), where), str(where))

    # ---- text -> ids ----
    def encode(self, text: str) -> list[int]:
        """Content ids, without `</s>`: special tokens written in the text are their ids, the rest is
        normalised, split into "▁"-words and segmented."""
        ids = []
        for i, part in enumerate(self.specials.split(text) if self.specials else [text]):
            if i % 2:
                ids.append(self.ids[part])
            elif part:
                ids += [t for word in self.words(self.normalize(part), at_start=i == 0) for t in self.segment(word)]
        return ids

    def normalize(self, text: str) -> str:
        for step in self.normalizer:
            text = step(text)
        return text

    def words(self, text: str, at_start: bool) -> list[str]:
        """WhitespaceSplit (where the file has it), then Metaspace: spaces become "▁", "▁" is prepended to each
        chunk that lacks it ("always"; "first": the text's first chunk only), and a chunk splits before each
        inner "▁"."""
        out = []
        chunks = [w for w in WHITESPACE.split(text) if w] if self.whitespace_split else [text]
        for j, word in enumerate(chunks):
            word = word.replace(" ", self.mark)
            if not word.startswith(self.mark) and (self.prepend == "always" or (
                    self.prepend == "first" and at_start and j == 0 and not WHITESPACE.match(text))):
                word = self.mark + word
            out += [w for w in re.split(f"(?={re.escape(self.mark)})", word) if w]
        return out

    def segment(self, word: str) -> list[int]:
        """The pieces of highest summed score covering `word` (Viterbi, as tokenizers' Unigram.encode_optimized):
        best[e] = max over pieces word[s:e] of best[s] + score, the first best kept on ties; a character that
        no one-character piece covers may also be `<unk>` at the lowest score minus 10."""
        best = [(0.0, -1, -1)] + [None] * len(word)  # per end position: (score, start, id)
        for start in range(len(word)):
            if best[start] is None:
                continue
            here, single = best[start][0], False
            for end in range(start + 1, min(len(word), start + self.longest) + 1):
                i = self.ids.get(word[start:end])
                if i is not None:
                    single |= end == start + 1
                    self.offer(best, end, here + self.scores[i], start, i)
            if not single:
                self.offer(best, start + 1, here + self.unk_score, start, self.unk)
        return self.backtrack(best, word)

    @staticmethod
    def offer(best: list, end: int, score: float, start: int, i: int) -> None:
        if best[end] is None or score > best[end][0]:
            best[end] = (score, start, i)

    def backtrack(self, best: list, word: str) -> list[int]:
        """The best path's ids, consecutive `<unk>` characters fused into one `<unk>` (tokenizers' fuse_unk)."""
        ids, end = [], len(word)
        while end > 0:
            _, start, i = best[end]
            if not (i == self.unk and ids and ids[-1] == self.unk):
                ids.append(i)
            end = start
        return ids[::-1]

    # ---- ids -> text, rows ----
    def decode(self, ids) -> str:
        """The pieces joined, "▁" as spaces, the first leading space dropped (tokenizers' Metaspace decoder)."""
        text = "".join(self.pieces[int(i)] for i in ids).replace(self.mark, " ")
        return text[1:] if text.startswith(" ") and self.prepend != "never" else text

    def __call__(self, prompts: list[str] | str, length: int | None = None) -> torch.Tensor:
        """(N, length) int64: content truncated to length - 1 tokens (with a warning), `</s>`, then `<pad>`."""
        return token_rows(self, prompts, length or self.length, "T5")


def metaspace_of(spec, where) -> dict:
    """The Metaspace settings of tokenizer.json's pre_tokenizer: WhitespaceSplit + Metaspace (T5's), or
    Metaspace alone (spaces are then the split points, as WhitespaceSplit makes them)."""
    steps = spec.get("pretokenizers", []) if isinstance(spec, dict) and spec.get("type") == "Sequence" else [spec]
    kinds = [s.get("type") if isinstance(s, dict) else s for s in steps]
    if kinds not in (["WhitespaceSplit", "Metaspace"], ["Metaspace"]):
        raise ValueError(f"{where}: pre_tokenizer {kinds}; a Unigram tokenizer here is read with T5's "
                         "WhitespaceSplit + Metaspace (or Metaspace alone)")
    meta = steps[-1]
    prepend = meta.get("prepend_scheme") or ("always" if meta.get("add_prefix_space", True) else "never")
    if prepend not in ("always", "first", "never") or meta.get("split", True) is not True:
        raise ValueError(f"{where}: Metaspace with prepend_scheme {prepend!r}, split {meta.get('split')!r}: "
                         "T5's is 'always', split true")
    return {"replacement": meta.get("replacement", "\u2581"), "prepend": prepend, "whitespace_split": len(kinds) == 2}


def normalizer_steps(spec, where) -> list:
    """tokenizer.json's normalizer as a list of str -> str functions (none: the golden tiny T5 has none).
    T5's real `Precompiled` charsmap is SentencePiece's nmt_nfkc: NFKC plus a few control and space rules;
    it is applied here to printable ASCII only (which nmt_nfkc leaves unchanged) and any other character is
    refused by name, rather than normalised by a guess."""
    if spec is None:
        return []
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "Sequence":
        return [f for s in spec.get("normalizers", []) for f in normalizer_steps(s, where)]
    if kind == "Precompiled":
        return [lambda t: ascii_only(t, where)]
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return [lambda t: unicodedata.normalize(kind, t)]
    if kind == "Lowercase":
        return [str.lower]
    if kind == "Strip":
        return [lambda t: strip(t, spec.get("strip_left", True), spec.get("strip_right", True))]
    if kind == "Replace":
        pattern, content = spec.get("pattern") or {}, spec.get("content", "")
        found = regex.compile(pattern["Regex"]) if "Regex" in pattern else regex.compile(regex.escape(pattern["String"]))
        return [lambda t: found.sub(lambda _: content, t)]
    raise ValueError(f"{where}: normalizer {kind!r} is not one this reader implements "
                     "(Sequence, Precompiled on ASCII, NFC/NFD/NFKC/NFKD, Lowercase, Strip, Replace)")


def strip(text: str, left: bool, right: bool) -> str:
    text = text.lstrip() if left else text
    return text.rstrip() if right else text


def ascii_only(text: str, where) -> str:
    """The text itself when it is printable ASCII and spaces; T5's precompiled NFKC map is not reimplemented."""
    bad = sorted({c for c in text if not (" " <= c <= "~")})
    if bad:
        raise ValueError(f"{where}: T5's precompiled (SentencePiece nmt_nfkc) normaliser is implemented for printable "
                         f"ASCII only; the prompt holds {''.join(bad)[:20]!r} ({', '.join(f'U+{ord(c):04X}' for c in bad[:5])}): "
                         "write it in ASCII (straight quotes, no accents, spaces for tabs and newlines)")
    return text
