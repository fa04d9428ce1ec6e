"""Experiment configs: the YAML schema of an edit (configs/edits/) and of an ablation (configs/ablations/).

An edit config names every knob of one Prompt-to-Prompt run (prompts, edit type and parameters,
LocalBlend, seed, steps, guidance, size, checkpoint). An ablation config is an edit config plus a
`grid` of knobs to sweep. Both are checked here before any computation: unknown keys, wrong types
and words that are not in their prompt fail with the file, the key and the fix in the message
(words are checked with the tokenizer alone: no model is loaded).
"""
from __future__ import annotations

import difflib
from pathlib import Path

from weights_tools.registry import CHECKPOINTS

EDIT_KEYS = {  # the keys of an edit config file (configs/edits/*.yaml), with their types
    "ckpt": str, "prompt": str, "edits": list, "mode": str, "cross_steps": (float, int, list, dict),
    "self_steps": (float, int, list), "self_max_res": int, "blend": list, "blend_threshold": (float, int),
    "weight": dict, "seed": int, "steps": int, "guidance": (float, int), "height": int, "width": int,
    "steps_offset": int, "show_attention": bool, "description": str,
    # the remaining knobs of the specs (config files only): Replace(reference_tail), LocalBlend(start_blend,
    # substruct_words, th) as in the null-text notebook
    "reference_tail": bool, "blend_start": (float, int), "blend_substruct": list, "blend_th": list,
    "blend_level": int,
}
DEFAULTS = dict(mode="replace", cross_steps=0.8, self_steps=0.4, self_max_res=16, blend=None, blend_threshold=0.3,
                blend_level=None,
                weight=None, seed=8888, steps=50, guidance=7.5, height=None, width=None, steps_offset=1,
                show_attention=False)

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
SOURCE_KNOBS = ("ckpt", "prompt", "seed", "steps", "guidance", "height", "width", "steps_offset")


def _type_name(t) -> str:
    return " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))


def _is(value, types) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        return False                               # YAML `true` is not a number
    return isinstance(value, types)


def _unknown(where, key, known) -> ValueError:
    near = difflib.get_close_matches(str(key), sorted(known), n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return ValueError(f"{where}: unknown key {key!r}; {hint}the keys are {sorted(known)}")


def check_types(data: dict, schema: dict, where) -> None:
    for key, value in data.items():
        if key not in schema:
            raise _unknown(where, key, schema)
        if value is not None and not _is(value, schema[key]):
            raise ValueError(f"{where}: {key!r} has the wrong type ({type(value).__name__}: {value!r}); "
                             f"it takes {_type_name(schema[key])}")


def read_yaml(path) -> dict:
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config is a mapping of settings, got {type(data).__name__}")
    return data


def load_edit_config(path) -> dict:
    """Settings from configs/edits/NAME.yaml; unknown keys and wrong types fail before any computation."""
    data = read_yaml(path)
    check_types(data, EDIT_KEYS, path)
    return data


# ------------------------------------------------------------------------------- settings -> spec
def parse_cross_steps(values):
    """["0.8"] -> 0.8; ["0.2", "0.8"] -> (0.2, 0.8); ["1.0", "lion=0.4"] -> {"default_": 1.0, "lion": 0.4}."""
    if values is None or isinstance(values, (int, float, dict)):
        return values
    plain = [v for v in values if "=" not in str(v)]
    words = {v.split("=")[0]: float(v.split("=")[1]) for v in values if "=" in str(v)}
    base = float(plain[0]) if len(plain) == 1 else tuple(map(float, plain)) if plain else (0.0, 1.0)
    return {"default_": base, **words} if words else base


def parse_weights(items) -> dict | None:
    if not items or isinstance(items, dict):
        return items or None
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--weight takes WORD=C (e.g. car=2), got {item!r}")
        word, c = item.split("=", 1)
        out[word] = [float(x) for x in c.split(",")] if "," in c else float(c)
    return out


def blend_words(blend) -> tuple:
    """["squirrel", "lion"] or ["a,b", "c"] (CLI) or [[a, b], c] (YAML) -> LocalBlend words."""
    return tuple(tuple(w) if isinstance(w, (list, tuple)) else tuple(w.split(",")) if isinstance(w, str) and "," in w
                 else w for w in blend)


def build_spec(s: dict):
    """An edit spec and a LocalBlend from resolved settings (CLI flags or a config file)."""
    from p2p import LocalBlend, Refine, Replace, Reweight

    cross = parse_cross_steps(s["cross_steps"])
    if isinstance(cross, dict):
        cross = {k: tuple(v) if isinstance(v, list) else v for k, v in cross.items()}
    elif isinstance(cross, list):
        cross = tuple(cross)
    self_steps = tuple(s["self_steps"]) if isinstance(s["self_steps"], (list, tuple)) else s["self_steps"]
    if isinstance(self_steps, tuple) and len(self_steps) == 1:
        self_steps = self_steps[0]
    common = dict(cross_replace_steps=cross, self_replace_steps=self_steps, self_replace_max_res=s["self_max_res"])
    modes = {"replace": Replace, "refine": Refine}
    weights = parse_weights(s["weight"])
    if s.get("reference_tail") and s["mode"] != "replace":
        raise ValueError("reference_tail applies to mode: replace only")
    if s["mode"] == "reweight":
        if not weights:
            raise ValueError("--mode reweight needs --weight WORD=C")
        spec = Reweight(equalizer=weights, **common)
    elif s["mode"] in modes:
        spec = modes[s["mode"]](**common, **({"reference_tail": True} if s.get("reference_tail") else {}))
        if weights:
            spec = Reweight(equalizer=weights, base=spec, **common)
    else:
        raise ValueError(f"--mode must be replace, refine or reweight, got {s['mode']!r}")
    blend = None
    if s["blend"]:
        th = s.get("blend_th")
        if th is not None and len(th) != 2:
            raise ValueError(f"blend_th is a pair (mask threshold, substruct threshold), got {th!r}")
        blend = LocalBlend(blend_words(s["blend"]), threshold=s["blend_threshold"], start_blend=s.get("blend_start") or 0.0,
                           substruct_words=blend_words(s["blend_substruct"]) if s.get("blend_substruct") else None,
                           th=tuple(th) if th is not None else None, level=s.get("blend_level"))
    elif any(s.get(k) is not None for k in ("blend_start", "blend_substruct", "blend_th", "blend_level")):
        raise ValueError("blend_start / blend_substruct / blend_th / blend_level need blend: "
                         "[source word, edited word, ...]")
    return spec, blend


def check_settings(s: dict, where="settings", tokenizer=None) -> tuple:
    """Resolve settings into (spec, local_blend) and check every word against the tokenizer, without a
    model. Errors name `where` (the file), the key, and what to change."""
    from models.clip import default_tokenizer

    from .blend import word_alpha
    from .control import self_window, time_word_alpha

    for key in ("prompt", "edits"):
        if not s.get(key):
            raise ValueError(f"{where}: missing {key!r}: set it (prompt: the source prompt; edits: a list of "
                             f"edited prompts)")
    if not all(isinstance(e, str) for e in s["edits"]):
        raise ValueError(f"{where}: 'edits' must be a list of prompts (strings), got {s['edits']!r}")
    for key in ("steps", "height", "width"):
        if s.get(key) is not None and s[key] <= 0:
            raise ValueError(f"{where}: {key!r} must be positive, got {s[key]!r}")
    prompts = [s["prompt"], *s["edits"]]
    tok = tokenizer or default_tokenizer()

    def attempt(key, fn, fix=""):
        try:
            return fn()
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{where}: {key!r}: {err}{fix}") from None

    spec, blend = attempt("mode" if not s.get("weight") else "weight", lambda: build_spec(s))
    key = "weight" if s.get("weight") else "edits"
    attempt(key, lambda: spec.cross_edit(tok, prompts),
            " (fix: a word-swap edit keeps the word count; a reweighted word must be in the edited prompt)")
    attempt("cross_steps", lambda: time_word_alpha(tok, prompts, s["steps"], spec.cross_replace_steps))
    attempt("self_steps", lambda: self_window(s["steps"], spec.self_replace_steps))
    if blend is not None:
        attempt("blend", lambda: word_alpha(tok, prompts, blend.words, "LocalBlend words"),
                " (fix: blend takes one word of each prompt, source first)")
        if blend.substruct_words is not None:
            attempt("blend_substruct", lambda: word_alpha(tok, prompts, blend.substruct_words, "LocalBlend substruct_words"),
                    " (fix: one word of each prompt, source first)")
    return spec, blend


# ------------------------------------------------------------------------------- ablations
def _resolve_path(p, near: Path) -> Path:
    p = Path(p)
    for cand in (p, near / p):
        if cand.exists():
            return cand
    return p


def knob_type(knob: str, where):
    """The type a grid knob's values must have: an edit key, `edit` (one edited prompt), or
    `weight.WORD` / `cross_steps.WORD` (one entry of a mapping)."""
    if knob in EDIT_KEYS and knob not in ("description", "show_attention"):
        return EDIT_KEYS[knob]
    if knob == "edit":
        return str
    head, _, word = knob.partition(".")
    if word and head == "weight":
        return (float, int, list)
    if word and head == "cross_steps":
        return (float, int, list)
    known = [k for k in EDIT_KEYS if k not in ("description", "show_attention")] + ["edit", "weight.WORD",
                                                                                    "cross_steps.WORD"]
    near = difflib.get_close_matches(knob, known, n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise ValueError(f"{where}: grid: unknown knob {knob!r}; {hint}the knobs are {known}")


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


def load_ablation(path, overrides: dict | None = None) -> dict:
    """An ablation config, checked: {"path", "name", "base" (settings), "grid", "rows", "cols", "metrics",
    "batch_size"}. `overrides` (CLI flags: ckpt, steps, ...) replace the base's values."""
    path = Path(path)
    data = read_yaml(path)
    check_types(data, ABLATION_KEYS | EDIT_KEYS, path)
    base = dict(DEFAULTS)
    if data.get("base") is not None:
        b = data["base"]
        if isinstance(b, str):
            bpath = _resolve_path(b, path.parent)
            if not bpath.exists():
                raise ValueError(f"{path}: 'base': no edit config {b!r} (looked in the working directory and "
                                 f"{path.parent}); give a path to a configs/edits/*.yaml or a mapping of edit keys")
            b = load_edit_config(bpath)
        else:
            check_types(b, EDIT_KEYS, f"{path}: base")
        base.update(b)
    base.update({k: v for k, v in data.items() if k in EDIT_KEYS})
    base.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if base.get("ckpt") and base["ckpt"] not in CHECKPOINTS:  # a named checkpoint, resolved when loaded
        base["ckpt"] = str(_resolve_path(base["ckpt"], path.parent).resolve())  # cells rerun from anywhere
    grid = data.get("grid") or {}
    if not grid:
        raise ValueError(f"{path}: 'grid' is missing or empty: give knob: [values, ...], e.g. "
                         f"grid: {{cross_steps: [0.2, 0.5, 0.8]}}")
    for knob, values in grid.items():
        t = knob_type(knob, path)
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: grid: {knob!r} must be a non-empty list of values, got {values!r}")
        for v in values:
            if not _is(v, t):
                raise ValueError(f"{path}: grid: {knob!r} value {v!r} has the wrong type "
                                 f"({type(v).__name__}); it takes {_type_name(t)}")
    metrics = dict(data.get("metrics") or {})
    check_types(metrics, METRIC_KEYS, f"{path}: metrics")
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
    batch_size = data.get("batch_size") or 8
    if batch_size < 1:
        raise ValueError(f"{path}: 'batch_size' must be >= 1, got {batch_size}")
    return {"path": path, "name": data.get("name") or path.stem, "base": base, "grid": grid, "rows": rows,
            "cols": cols, "metrics": {"iou_threshold": 0.3, **metrics}, "batch_size": batch_size,
            "description": data.get("description", "")}
