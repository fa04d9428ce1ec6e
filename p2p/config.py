"""Run settings: typed configs for generate(), edit() and invert(), and their YAML files.

`GenerateConfig`, `EditConfig` and `InvertConfig` are frozen dataclasses whose field names and
defaults are the library's own: the functions take their defaults from them, a YAML file's keys
are their fields (configs/edits/), and the command line fills them from its flags. An ablation
(configs/ablations/) is an edit config plus a `grid` of knobs to sweep. Files are checked before
any computation: unknown or renamed keys, wrong types and words that are not in their prompt fail
with the file, the key and the fix in the message (words are checked with the tokenizer alone).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import yaml

from models.sd import SAMPLERS
from weights_tools import tokenizer_for
from weights_tools.registry import CHECKPOINTS, DEFAULT as DEFAULT_CKPT

from .blend import LocalBlend, word_alpha
from .control import Refine, Replace, Reweight, self_window, time_word_alpha


# ------------------------------------------------------------------------------- the configs
@dataclass(frozen=True)
class Sampling:
    """The sampler's settings, shared by generate(), edit() and invert(). height / width None: the
    model's default size."""
    num_steps: int = 50
    guidance_scale: float = 7.5
    steps_offset: int = 1          # 1: timesteps 981..1 (SD's); 0: 980..0 (the null-text notebook)
    height: int | None = None
    width: int | None = None
    sampler: str = "ddim"          # a name of models.sd.SAMPLERS: ddim, or plms (also pndm): PLMS as the stable notebook


@dataclass(frozen=True)
class GenerateConfig(Sampling):
    prompts: tuple = ()
    seed: int = 0                  # x_T is torch.randn from manual_seed(seed) on the CPU
    ckpt: str = DEFAULT_CKPT       # a path, or a name in weights_tools.registry.CHECKPOINTS


@dataclass(frozen=True)
class EditConfig(Sampling):
    """One Prompt-to-Prompt run: prompt is the source P, edits the edited prompts P*; the spec's knobs
    (mode, cross/self replace steps, equalizer, reference_tail) and LocalBlend, with their defaults."""
    prompt: str = ""
    edits: tuple = ()
    mode: str = "replace"          # replace | refine | reweight (a Reweight on top of replace/refine
    #                                when an equalizer is given with those)
    cross_replace_steps: Union[float, tuple, dict] = Replace.cross_replace_steps
    self_replace_steps: Union[float, tuple] = Replace.self_replace_steps
    self_replace_max_res: int = Replace.self_replace_max_res
    equalizer: dict | None = None
    local_blend: LocalBlend | None = None
    reference_tail: bool = Replace.reference_tail
    seed: int = GenerateConfig.seed
    ckpt: str = DEFAULT_CKPT
    show_attention: bool = False
    description: str = ""

    @property
    def prompts(self) -> list:
        return [self.prompt, *self.edits]

    def build(self) -> tuple:
        """(spec, local_blend): the edit spec these settings describe."""
        common = dict(cross_replace_steps=self.cross_replace_steps, self_replace_steps=self.self_replace_steps,
                      self_replace_max_res=self.self_replace_max_res)
        if self.reference_tail and self.mode != "replace":
            raise ValueError("reference_tail applies to mode: replace only")
        if self.mode == "reweight":
            if not self.equalizer:
                raise ValueError("mode 'reweight' needs an equalizer: {WORD: C} (--weight WORD=C)")
            return Reweight(equalizer=self.equalizer, **common), self.local_blend
        if self.mode not in ("replace", "refine"):
            raise ValueError(f"mode must be replace, refine or reweight, got {self.mode!r}")
        spec = Replace(**common, reference_tail=self.reference_tail) if self.mode == "replace" else Refine(**common)
        if self.equalizer:
            spec = Reweight(equalizer=self.equalizer, base=spec, **common)
        return spec, self.local_blend

    def check(self, where="settings", tokenizer=None) -> tuple:
        """(spec, local_blend), every word checked against the tokenizer without a model. Errors name
        `where` (the file), the key, and what to change."""
        check_prompts(self, where)
        tok = tokenizer or tokenizer_for(self.ckpt)  # the checkpoint's own, from its config (no weights read)

        def attempt(key, fn, fix=""):
            try:
                return fn()
            except (ValueError, TypeError, KeyError) as err:
                raise ValueError(f"{where}: {key!r}: {err}{fix}") from None

        spec, blend = attempt("equalizer" if self.equalizer else "mode", self.build)
        attempt("equalizer" if self.equalizer else "edits", lambda: spec.cross_edit(tok, self.prompts),
                " (fix: a word-swap edit keeps the word count; a reweighted word must be in the edited prompt)")
        attempt("cross_replace_steps", lambda: time_word_alpha(tok, self.prompts, self.num_steps,
                                                               spec.cross_replace_steps))
        attempt("self_replace_steps", lambda: self_window(self.num_steps, spec.self_replace_steps))
        if blend is not None:
            attempt("local_blend.words", lambda: word_alpha(tok, self.prompts, blend.words, "LocalBlend words"),
                    " (fix: local_blend.words takes one word of each prompt, source first)")
            if blend.substruct_words is not None:
                attempt("local_blend.substruct_words",
                        lambda: word_alpha(tok, self.prompts, blend.substruct_words, "LocalBlend substruct_words"),
                        " (fix: one word of each prompt, source first)")
        return spec, blend


@dataclass(frozen=True)
class InvertConfig(Sampling):
    method: str = "null-text"      # null-text | ddim | negative-prompt | direct (see p2p.inversion)
    num_inner_steps: int = 10      # null-text: Adam iterations per step at most
    early_stop_epsilon: float = 1e-5
    offsets: tuple = (0, 0, 0, 0)  # pixels cut from the left, right, top and bottom before the centre crop


def check_prompts(cfg: EditConfig, where) -> None:
    for key in ("prompt", "edits"):
        if not getattr(cfg, key):
            raise ValueError(f"{where}: missing {key!r}: set it (prompt: the source prompt; edits: a list of "
                             f"edited prompts)")
    if not all(isinstance(e, str) for e in cfg.edits):
        raise ValueError(f"{where}: 'edits' must be a list of prompts (strings), got {short(list(cfg.edits))}")
    check_values(cfg, where)


# Ranges of the numbers a run takes, checked before a model is loaded or anything allocated: far outside
# them a run only gives black pictures (nan, inf, 1e30) or allocates gigabytes (a 100000-px side).
RANGES = {"num_steps": (1, 1000), "height": (8, 16384), "width": (8, 16384), "guidance_scale": (-10000, 10000),
          "seed": (0, 2 ** 64 - 1), "steps_offset": (0, 999)}  # seed: what torch.Generator.manual_seed takes
WEIGHT_RANGE = (-10000, 10000)  # a reweighting c; the reference's examples use -5 to 10


def in_range(value, lo, hi) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and lo <= value <= hi


def check_values(cfg, where) -> None:
    """Every number of a GenerateConfig / EditConfig / InvertConfig within RANGES (None: the default), and
    its sampler a known one."""
    sampler = getattr(cfg, "sampler", None)
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"{where}: 'sampler' must be one of {', '.join(SAMPLERS)}, got {short(sampler)}")
    for key, (lo, hi) in RANGES.items():
        value = getattr(cfg, key, None)
        if value is not None and not in_range(value, lo, hi):
            raise ValueError(f"{where}: {key!r} must be a finite number from {lo} to {hi}, got {short(value)}")
    for word, c in (getattr(cfg, "equalizer", None) or {}).items():
        if not all(in_range(v, *WEIGHT_RANGE) for v in (c if isinstance(c, (list, tuple)) else [c])):
            raise ValueError(f"{where}: 'equalizer' gives {short(word)} the weight {short(c)}; a weight is a finite "
                             f"number from {WEIGHT_RANGE[0]} to {WEIGHT_RANGE[1]}")


# ------------------------------------------------------------------------------- the YAML schema
EDIT_KEYS = {  # the keys of an edit config file (configs/edits/*.yaml): EditConfig's fields, with their types
    "ckpt": str, "prompt": str, "edits": list, "mode": str, "cross_replace_steps": (float, int, list, dict),
    "self_replace_steps": (float, int, list), "self_replace_max_res": int, "equalizer": dict,
    "local_blend": dict, "reference_tail": bool, "seed": int, "num_steps": int, "guidance_scale": (float, int),
    "height": int, "width": int, "steps_offset": int, "sampler": str, "show_attention": bool, "description": str,
}
BLEND_KEYS = {  # local_blend: {...}: LocalBlend's fields
    "words": list, "threshold": (float, int), "start_blend": (float, int), "substruct_words": list, "th": list,
    "level": int, "pool": bool,
}
RENAMED = {  # old key -> the library's name, which the files use now
    "steps": "num_steps", "guidance": "guidance_scale", "cross_steps": "cross_replace_steps",
    "self_steps": "self_replace_steps", "self_max_res": "self_replace_max_res", "weight": "equalizer",
    "blend": "local_blend.words", "blend_threshold": "local_blend.threshold", "blend_start": "local_blend.start_blend",
    "blend_substruct": "local_blend.substruct_words", "blend_th": "local_blend.th", "blend_level": "local_blend.level",
}


def _type_name(t) -> str:
    return " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))


def _is(value, types) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        return False                               # YAML `true` is not a number
    return isinstance(value, types)


def new_name(old: str) -> str | None:
    """The current name of a renamed key or grid knob (`weight.car` -> `equalizer.car`), else None."""
    head, dot, rest = str(old).partition(".")
    return RENAMED[head] + dot + rest if head in RENAMED else None


REPR = reprlib.Repr()
REPR.maxlevel, REPR.maxtuple, REPR.maxlist, REPR.maxdict, REPR.maxstring, REPR.maxother = 3, 6, 6, 6, 80, 80


def short(value, limit: int = 200) -> str:
    """repr() of a value from a file, bounded: a message never formats a value of unbounded size."""
    text = REPR.repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _unknown(where, key, known, what="key") -> ValueError:
    new = new_name(key)
    if new is not None:
        nested = new.startswith("local_blend.") and what == "key"
        fix = f"write local_blend: {{{new.split('.')[1]}: ...}}" if nested else f"rename it to {new!r}"
        return ValueError(f"{where}: {what} {short(key)} is now called {new!r} (the library's name): {fix}")
    near = difflib.get_close_matches(str(key)[:200], sorted(known), n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return ValueError(f"{where}: unknown {what} {short(key)}; {hint}the {what}s are {sorted(known)}")


def check_types(data: dict, schema: dict, where) -> None:
    for key, value in data.items():
        if key not in schema:
            raise _unknown(where, key, schema)
        if value is not None and not _is(value, schema[key]):
            raise ValueError(f"{where}: {short(key)} has the wrong type ({type(value).__name__}: {short(value)}); "
                             f"it takes {_type_name(schema[key])}")


MAX_YAML_VALUES = 10_000  # values a config may hold with every alias copied out (a real one has < 100)


def expanded_size(node, memo: dict) -> int:
    """How many values a YAML node stands for once its aliases are copied out (each shared node is
    counted as often as it is used; a recursive alias counts once)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1
    kids = node.value if isinstance(node, yaml.SequenceNode) else \
        [n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode) else []
    memo[id(node)] = 1 + sum(expanded_size(k, memo) for k in kids)
    return memo[id(node)]


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and expanded_size(node, {}) > MAX_YAML_VALUES:
            raise ValueError(f"{path}: its aliases (*name) expand to more than {MAX_YAML_VALUES} values; a config "
                             "holds a few dozen: write the values out, or use fewer nested aliases")
        data = yaml.safe_load(text) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not valid YAML: {short(err, 400)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config is a mapping of settings, got {type(data).__name__}")
    return data


def _tuples(x):
    """YAML lists -> tuples, recursively: the specs' (start, end) pairs and word groups."""
    if isinstance(x, (list, tuple)):
        return tuple(_tuples(v) for v in x)
    return {k: _tuples(v) for k, v in x.items()} if isinstance(x, dict) else x


def blend_words(words) -> tuple:
    """[squirrel, lion] or [[a, b], c] (a group of words for one prompt) -> LocalBlend words."""
    return _tuples(words)


def _local_blend(data: dict | None, where) -> LocalBlend | None:
    if data is None:
        return None
    check_types(data, BLEND_KEYS, f"{where}: local_blend")
    if not data.get("words"):
        raise ValueError(f"{where}: 'local_blend' needs words: [source word, edited word, ...] (one per prompt)")
    th = data.get("th")
    if th is not None and len(th) != 2:
        raise ValueError(f"{where}: 'local_blend.th' is a pair (mask threshold, substruct threshold), got {short(th)}")
    return LocalBlend(**{k: _tuples(v) for k, v in data.items() if v is not None})


def edit_config(data: dict, where="settings") -> EditConfig:
    """An EditConfig from a mapping of YAML keys (a file's, or a sweep cell's); unset keys take the defaults."""
    check_types(data, EDIT_KEYS, where)
    s = {k: v for k, v in data.items() if v is not None}
    for key in ("edits", "cross_replace_steps", "self_replace_steps", "equalizer"):
        if key in s:
            s[key] = _tuples(s[key])
    if isinstance(s.get("self_replace_steps"), tuple) and len(s["self_replace_steps"]) == 1:
        s["self_replace_steps"] = s["self_replace_steps"][0]
    s["local_blend"] = _local_blend(data.get("local_blend"), where)
    return EditConfig(**s)


def _plain(x):
    """Tuples -> lists, recursively: the YAML / JSON form."""
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return {k: _plain(v) for k, v in x.items()} if isinstance(x, dict) else x


def to_dict(cfg) -> dict:
    """A config's fields as plain YAML / JSON values (LocalBlend as a mapping): edit_config's inverse."""
    return _plain(dataclasses.asdict(cfg))


def load_edit_config(path) -> EditConfig:
    """configs/edits/NAME.yaml as an EditConfig; unknown keys and wrong types fail before any computation."""
    return edit_config(read_yaml(path), path)


def check_settings(s, where="settings", tokenizer=None) -> tuple:
    """(spec, local_blend) from an EditConfig or a mapping of its YAML keys, every word checked."""
    cfg = s if isinstance(s, EditConfig) else edit_config(s, where)
    return cfg.check(where, tokenizer)


DEFAULTS = to_dict(EditConfig())  # an edit config's keys with their default values


# ------------------------------------------------------------------------------- ablations
ABLATION_KEYS = {  # an ablation config: any edit key (the base settings) plus these
    "base": (str, dict),       # an edit config file (relative to this file, or the working directory) or a mapping
    "grid": dict,              # knob -> list of values; the cells are the product
    "rows": list,              # knobs on the figure's rows (default: the knobs that change the source, else the first)
    "cols": list,              # knobs on the figure's columns (default: the others)
    "metrics": dict,           # {iou_threshold: 0.3, iou_words: [source word, edited word]}
    "batch_size": int,         # most edited prompts run in one batch (cells sharing a source)
    "name": str,
}
METRIC_KEYS = {"iou_threshold": (float, int), "iou_words": list}
# knobs that change the source image (every other knob only changes the edited prompts)
SOURCE_KNOBS = ("ckpt", "prompt", "seed", "num_steps", "guidance_scale", "height", "width", "steps_offset", "sampler")
MAPPING_KNOBS = {"equalizer": (float, int, list), "cross_replace_steps": (float, int, list)}  # KNOB.WORD


def _resolve_path(p, near: Path) -> Path:
    p = Path(p)
    for cand in (p, near / p):
        if cand.exists():
            return cand
    return p


def knob_type(knob: str, where):
    """The type a grid knob's values must have: an edit key, `edit` (one edited prompt),
    `equalizer.WORD` / `cross_replace_steps.WORD` (one entry of a mapping), or `local_blend.FIELD`."""
    if knob in EDIT_KEYS and knob not in ("description", "show_attention"):
        return EDIT_KEYS[knob]
    if knob == "edit":
        return str
    head, _, word = knob.partition(".")
    if word and head in MAPPING_KNOBS:
        return MAPPING_KNOBS[head]
    if head == "local_blend" and word in BLEND_KEYS:
        return BLEND_KEYS[word]
    known = [k for k in EDIT_KEYS if k not in ("description", "show_attention")] + [
        "edit", "equalizer.WORD", "cross_replace_steps.WORD"] + [f"local_blend.{k}" for k in BLEND_KEYS]
    raise _unknown(f"{where}: grid", knob, known, "knob")


def set_knob(s: dict, knob: str, value) -> None:
    if knob == "edit":
        s["edits"] = [value]
        return
    head, _, word = knob.partition(".")
    if word:
        cur = s.get(head)
        cur = dict(cur) if isinstance(cur, dict) else ({} if cur is None else {"default_": cur})
        cur[word] = value
        s[head] = cur
    else:
        s[knob] = value


def _ablation_base(data: dict, path: Path, overrides: dict | None) -> dict:
    """The base settings of an ablation: the defaults, its base file or mapping, its own edit keys, then
    `overrides` (CLI flags: ckpt, num_steps, ...). An ablation names its checkpoint: no default one."""
    base = {k: v for k, v in DEFAULTS.items() if k != "ckpt"}
    if data.get("base") is not None:
        b = data["base"]
        if isinstance(b, str):
            bpath = _resolve_path(b, path.parent)
            if not bpath.exists():
                raise ValueError(f"{path}: 'base': no edit config {short(b)} (looked in the working directory and "
                                 f"{path.parent}); give a path to a configs/edits/*.yaml or a mapping of edit keys")
            b, where = read_yaml(bpath), bpath
        else:
            where = f"{path}: base"
        edit_config(b, where)  # its keys and types checked, naming its file
        base.update(b)
    base.update({k: v for k, v in data.items() if k in EDIT_KEYS})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None and k != "batch_size"}
    check_types(overrides, EDIT_KEYS, f"{path}: overrides")
    base.update(overrides)
    if base.get("ckpt") and base["ckpt"] not in CHECKPOINTS:  # a named checkpoint, resolved when loaded
        base["ckpt"] = str(_resolve_path(base["ckpt"], path.parent).resolve())  # cells rerun from anywhere
    return base


def _check_grid(grid: dict, path: Path) -> None:
    if not grid:
        raise ValueError(f"{path}: 'grid' is missing or empty: give knob: [values, ...], e.g. "
                         f"grid: {{cross_replace_steps: [0.2, 0.5, 0.8]}}")
    for knob, values in grid.items():
        t = knob_type(knob, path)
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: grid: {knob!r} must be a non-empty list of values, got {short(values)}")
        for v in values:
            if not _is(v, t):
                raise ValueError(f"{path}: grid: {knob!r} value {short(v)} has the wrong type "
                                 f"({type(v).__name__}); it takes {_type_name(t)}")


def _axes(data: dict, grid: dict, path: Path) -> tuple:
    knobs = list(grid)
    rows, cols = data.get("rows"), data.get("cols")
    for name, axis in (("rows", rows), ("cols", cols)):
        for k in axis or []:
            if k not in grid:
                raise ValueError(f"{path}: {name!r} names {k!r}, which is not a grid knob; the knobs are {knobs}")
    if rows is None:
        rows = [k for k in knobs if k in SOURCE_KNOBS and k not in (cols or [])] or \
               ([k for k in knobs if k not in (cols or [])][:1] if len(knobs) > 1 or cols is None else [])
    if cols is None:
        cols = [k for k in knobs if k not in rows]
    missing = [k for k in knobs if k not in rows and k not in cols]
    if missing:
        raise ValueError(f"{path}: grid knobs {missing} are on neither 'rows' nor 'cols'; put each knob on one axis")
    return rows, cols


def load_ablation(path, overrides: dict | None = None) -> dict:
    """An ablation config, checked: {"path", "name", "base" (settings: EditConfig's YAML keys), "grid",
    "rows", "cols", "metrics", "batch_size"}. `overrides` (CLI flags: ckpt, num_steps, ...) replace the
    base's values."""
    path = Path(path)
    data = read_yaml(path)
    check_types(data, ABLATION_KEYS | EDIT_KEYS, path)
    base = _ablation_base(data, path, overrides)
    grid = data.get("grid") or {}
    _check_grid(grid, path)
    metrics = dict(data.get("metrics") or {})
    check_types(metrics, METRIC_KEYS, f"{path}: metrics")
    rows, cols = _axes(data, grid, path)
    batch_size = data.get("batch_size") or 8
    if batch_size < 1:
        raise ValueError(f"{path}: 'batch_size' must be >= 1, got {batch_size}")
    return {"path": path, "name": data.get("name") or path.stem, "base": base, "grid": grid, "rows": rows,
            "cols": cols, "metrics": {"iou_threshold": 0.3, **metrics}, "batch_size": batch_size,
            "description": data.get("description", "")}
