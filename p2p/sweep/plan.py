"""The grid: cells from an ablation config, the batches they share, and what each batch runs.

This is the sweep's one reader of p2p.config (load_ablation, set_knob, check_settings, blend_words,
EDIT_KEYS), of p2p.settings and of the settings dicts' keys; run.py and report.py take what it returns.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass

from weights_tools import tokenizer_for

from ..config import EDIT_KEYS, blend_words, check_settings, load_ablation, set_knob
from ..metrics import changed_words
from ..settings import keywords

PER_PROMPT = ("edits", "equalizer", "local_blend")   # one value per edited prompt: a batch may differ
BLEND_WORDS = ("words", "substruct_words")   # LocalBlend fields with one word per prompt, source first


@dataclass
class Cell:
    index: int
    name: str
    knobs: dict          # knob -> value
    settings: dict       # resolved edit settings (one edited prompt)
    row: int
    col: int

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BatchEdit:
    """One `p2p.edit` call for [source, edit of cell 1, edit of cell 2, ...]."""
    prompts: list
    spec: object
    blend: object        # a LocalBlend or None
    kwargs: dict         # edit()'s keyword settings: seed, num_steps, guidance_scale, height, ... (p2p.settings)


# ------------------------------------------------------------------------------- names and labels
def _slug(v) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    s = re.sub(r"[^A-Za-z0-9.+-]+", "_", s).strip("_")
    return s[:32] or "x"


def _short(knob, v, base):
    """An edited prompt by the words it changes ("lion" for a squirrel -> lion swap)."""
    if knob == "edit" and isinstance(v, str) and base.get("prompt"):
        a, b = base["prompt"].split(" "), v.split(" ")
        if len(a) == len(b):
            return "+".join(y for x, y in zip(a, b) if x != y) or "same"
        return v[-32:]
    return v


def label(knob, v, base=None) -> str:
    """`knob=value` for file names' descriptions and the figure's axes (long prompts shortened)."""
    v = _short(knob, v, base or {})
    return f"{knob}={v if not isinstance(v, str) else repr(v) if len(v) < 28 else repr(v[:25] + '...')}"


# ------------------------------------------------------------------------------- cells
def prepare(config, overrides=None, tokenizer=None):
    """Load and check the ablation and every cell (no model is loaded). Words are checked with each cell's
    checkpoint's own tokenizer (weights_tools.tokenizer_for); `tokenizer`: the vocabulary file the base
    checkpoint needs (--tokenizer, LDM-400M's single file)."""
    ab = load_ablation(config, overrides)
    if overrides and overrides.get("batch_size"):
        ab["batch_size"] = overrides["batch_size"]
    tok = tokenizer_for(ab["base"]["ckpt"], tokenizer) if tokenizer is not None and ab["base"].get("ckpt") else None
    return ab, expand(ab, tok), tok


def _cell_settings(ab: dict, knobs: dict, name: str, tokenizer) -> dict:
    """The base settings with this cell's knobs set, checked; only edit-config keys are kept."""
    grid = ab["grid"]
    s = json.loads(json.dumps(ab["base"]))                  # a deep copy
    for k in grid:                                          # grid order: later knobs win
        set_knob(s, k, knobs[k])
    where = f"{ab['path']} (cell {name}: {', '.join(label(k, knobs[k]) for k in grid)})"
    if len(s.get("edits") or []) != 1:
        raise ValueError(f"{where}: a cell takes exactly one edited prompt, got edits={s.get('edits')!r}; "
                         f"sweep several with the knob `edit: [prompt, prompt, ...]`")
    for k, v in (s.get("local_blend") or {}).items():
        if k in BLEND_WORDS and v and len(v) != 2:
            raise ValueError(f"{where}: 'local_blend.{k}' needs two words (source, edited), got {v!r}")
    check_settings(s, where, tokenizer)
    if not s.get("ckpt"):
        raise ValueError(f"{ab['path']}: missing 'ckpt': name the checkpoint in the config (ckpt: PATH, "
                         f"or ckpt: miniature for the shipped one) or pass --ckpt")
    s["description"] = f"{ab['name']} cell {name}: " + ", ".join(label(k, knobs[k]) for k in grid)
    return {k: v for k, v in s.items() if k in EDIT_KEYS}


def expand(ab: dict, tokenizer=None) -> list[Cell]:
    """The cells of an ablation, every one checked (words with the tokenizer) before anything runs."""
    grid, rows, cols = ab["grid"], ab["rows"], ab["cols"]
    row_vals = list(itertools.product(*(grid[k] for k in rows)))
    col_vals = list(itertools.product(*(grid[k] for k in cols)))
    cells = []
    for r, rv in enumerate(row_vals):
        for c, cv in enumerate(col_vals):
            knobs = dict(zip(rows, rv)) | dict(zip(cols, cv))
            idx = len(cells)
            name = f"{idx:03d}_" + "_".join(f"{k.split('.')[-1]}-{_slug(_short(k, knobs[k], ab['base']))}"
                                            for k in grid)
            cells.append(Cell(idx, name, knobs, _cell_settings(ab, knobs, name, tokenizer), r, c))
    return cells


# ------------------------------------------------------------------------------- batches
def batch_key(s: dict) -> str:
    """Cells with equal keys can share one batch: everything but the edited prompt, the reweight c
    values and the edited prompt's blend word must agree."""
    shared = {k: v for k, v in s.items() if k not in (*PER_PROMPT, "description")}
    shared["equalizer_words"] = sorted(s["equalizer"]) if s.get("equalizer") else None
    shared["local_blend"] = {k: v[0] if k in BLEND_WORDS and v else v for k, v in (s.get("local_blend") or {}).items()}
    return json.dumps(shared, sort_keys=True, default=str)


def plan_batches(cells: list[Cell], batch_size: int) -> list[list[Cell]]:
    groups: dict[str, list[Cell]] = {}
    for c in cells:
        groups.setdefault(batch_key(c.settings), []).append(c)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def shard(batches: list, rank: int, world: int) -> list:
    """This rank's batches: every world-th one, from its rank on."""
    return batches[rank::world]


def batch_settings(cells: list[Cell]) -> dict:
    """One edit's settings for [source, edit of cell 1, edit of cell 2, ...]."""
    s = dict(cells[0].settings)
    s["edits"] = [c.settings["edits"][0] for c in cells]
    if s.get("equalizer"):
        one = lambda v: v[0] if isinstance(v, list) else v  # noqa: E731
        s["equalizer"] = {w: [one(c.settings["equalizer"][w]) for c in cells] for w in s["equalizer"]}
    if s.get("local_blend"):                        # one word per prompt, source first
        s["local_blend"] = {k: [v[0], *(c.settings["local_blend"][k][1] for c in cells)]
                            if k in BLEND_WORDS and v else v for k, v in s["local_blend"].items()}
    return s


def batch_edit(cells: list[Cell], tokenizer) -> BatchEdit:
    s = batch_settings(cells)
    spec, blend = check_settings(s, "batch", tokenizer)
    return BatchEdit([s["prompt"], *s["edits"]], spec, blend, {k: s[k] for k in keywords("EditConfig")})


def checkpoint(batch: list[Cell]):
    """The checkpoint a batch runs on (all its cells share it: it is part of the batch key)."""
    return batch[0].settings["ckpt"]


# ------------------------------------------------------------------------------- what is measured
def iou_words(s: dict, metrics_cfg: dict):
    """(source words, edited words) whose attention IoU is reported, or None."""
    if metrics_cfg.get("iou_words"):
        return tuple(metrics_cfg["iou_words"])
    if (s.get("local_blend") or {}).get("words"):
        w = blend_words(s["local_blend"]["words"])
        return w[0], w[1]
    pos = changed_words(s["prompt"], s["edits"][0])
    if pos:
        return pos, pos
    if s.get("equalizer"):
        words = tuple(w for w in s["equalizer"] if w in s["prompt"].split(" ") and w in s["edits"][0].split(" "))
        if words:
            return words, words
    return None
