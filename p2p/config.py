"""Run settings: typed configs for generate(), edit() and invert(), and their YAML files.

`GenerateConfig`, `EditConfig` and `InvertConfig` are frozen dataclasses made from the declarations
of p2p.settings: their fields and defaults are the settings of their groups, a YAML file's keys
are their fields (configs/edits/), and the command line fills them from its flags. An ablation
(configs/ablations/) is an edit config plus a `grid` of knobs to sweep. Files are checked before
any computation: unknown or renamed keys, wrong types and words that are not in their prompt fail
with the file, the key and the fix in the message (words are checked with the tokenizer alone).

`mode` names the edit spec: replace, refine, reweight, or `package.module:Class`, a researcher's own
p2p.Edit subclass, whose own fields are given in `spec_args` (docs/settings.md).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
from pathlib import Path
from typing import Optional, Union

import yaml

from models.textfile import read_text
from weights_tools import tokenizer_for
from weights_tools.registry import CHECKPOINTS

from .blend import LocalBlend, word_alpha
from .control import Edit, Refine, Replace, Reweight, Spec, self_window, time_word_alpha
from .joint_control import JointReplace
from .mutual import MutualSelfAttention
from .pnp import PlugAndPlay
from .settings import (SETTINGS, check_values, config_settings, new_name, refuse_old_names, renamed, setting,
                       settings_of, short, tuples)

BUILT_IN = {"replace": Replace, "refine": Refine, "reweight": Reweight, "masactrl": MutualSelfAttention,
            "pnp": PlugAndPlay}
MUTUAL = ("start_step", "start_layer", "mask_words", "mask_threshold")  # MasaCtrl's knobs (mode: masactrl)
JOINT = ("replace_steps", "projection", "replace_blocks")  # JointReplace's knobs (mode: joint-replace, SD3 / Flux)
JOINT_MODE = "joint-replace"


# ------------------------------------------------------------------------------- custom edit specs
def _edit_classes(module) -> list:
    return sorted(k for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, Edit) and v is not Edit)


def spec_class(path: str) -> type:
    """The p2p.Edit subclass a mode names: replace / refine / reweight / pnp, or `package.module:Class`."""
    if path in BUILT_IN:
        return BUILT_IN[path]
    module_name, colon, name = str(path).partition(":")
    if not (colon and module_name and name):
        raise ValueError(f"mode must be replace, refine or reweight, or your own edit spec as module:Class "
                         f"(e.g. mypackage.edits:WeightedMix), or pnp (Plug-and-Play), got {short(path)}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"mode {path!r}: cannot import {module_name!r} ({err}); install the package that holds it, "
                         f"or put the folder that holds {module_name.split('.')[0]!r} on PYTHONPATH") from None
    cls = getattr(module, name, None)
    if cls is None:
        raise ValueError(f"mode {path!r}: module {module_name!r} has no {name!r}; the p2p.Edit subclasses it "
                         f"defines are {_edit_classes(module)}: name one of them after the colon")
    if not (isinstance(cls, type) and issubclass(cls, Spec)):
        what = "a class" if isinstance(cls, type) else f"a {type(cls).__name__}"
        raise ValueError(f"mode {path!r}: {name!r} is {what} that does not subclass p2p.Edit; an edit spec is a "
                         f"frozen dataclass subclassing p2p.Edit (see docs/settings.md)")
    return cls


def custom_spec(path: str, common: dict, args: dict):
    """Your own spec, `path`'s class, with the shared knobs `common` and its own fields `args` (spec_args)."""
    cls = spec_class(path)
    own = sorted(f.name for f in dataclasses.fields(cls) if f.init and f.name not in common)
    for key in args:
        if key not in own:
            near = difflib.get_close_matches(str(key), own, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(f"spec_args: {cls.__name__} ({path}) has no field {short(key)}; {hint}its own fields "
                             f"are {own} (the shared knobs {sorted(common)} are keys of their own)")
    try:
        return cls(**common, **args)
    except TypeError as err:
        raise ValueError(f"spec_args: {path}: {err}; give every field without a default in spec_args") from None


# ------------------------------------------------------------------------------- the configs
class EditMethods:
    """What an EditConfig does with its settings: the spec they describe, and its check."""

    @property
    def prompts(self) -> list:
        return [self.prompt, *self.edits]

    def build(self) -> tuple:
        """(spec, local_blend): the edit spec these settings describe."""
        common = {f.name: getattr(self, f.name) for f in dataclasses.fields(Edit)}
        if self.reference_tail and self.mode != "replace":
            raise ValueError("reference_tail applies to mode: replace only")
        mutual = {k: getattr(self, k) for k in MUTUAL if getattr(self, k) is not None}
        joint = [k for k in JOINT if getattr(self, k) != setting(k).default]
        if self.mode == JOINT_MODE:
            return self.joint_spec(), self.local_blend
        if joint:
            raise ValueError(f"{', '.join(joint)}: JointReplace's knobs apply to mode: {JOINT_MODE} (SD3 / Flux) only")
        if self.mode == "masactrl":
            if self.equalizer or self.spec_args:
                raise ValueError("mode 'masactrl' takes start_step, start_layer, mask_words and mask_threshold; "
                                 "equalizer and spec_args belong to other modes")
            return MutualSelfAttention(**{k: tuple(v) if k == "mask_words" else v for k, v in mutual.items()}), \
                self.local_blend
        if mutual:
            raise ValueError(f"{', '.join(mutual)} are MasaCtrl's knobs: they apply to mode: masactrl only")
        if self.spec_args and self.mode in BUILT_IN:
            raise ValueError(f"spec_args are the fields of your own Edit subclass (mode: module:Class); mode "
                             f"{self.mode!r} takes its knobs as keys of their own")
        if self.mode == "pnp":  # Plug-and-Play: its own knobs; Prompt-to-Prompt's do not apply
            if self.equalizer or self.local_blend is not None:
                raise ValueError("mode 'pnp' (Plug-and-Play) takes no equalizer or local_blend")
            return PlugAndPlay(feature_steps=self.feature_steps, attention_steps=self.attention_steps,
                               source_text=self.source_text), None
        if self.mode == "reweight":
            if not self.equalizer:
                raise ValueError("mode 'reweight' needs an equalizer: {WORD: C} (--weight WORD=C)")
            return Reweight(equalizer=self.equalizer, **common), self.local_blend
        if self.mode == "replace":
            spec = Replace(**common, reference_tail=self.reference_tail)
        else:
            spec = Refine(**common) if self.mode == "refine" else custom_spec(self.mode, common, self.spec_args or {})
        if self.equalizer:
            spec = Reweight(equalizer=self.equalizer, base=spec, **common)
        return spec, self.local_blend

    def joint_spec(self) -> JointReplace:
        """mode joint-replace's spec: JointReplace from its knobs (JOINT)."""
        if self.equalizer or self.spec_args or self.reference_tail:
            raise ValueError(f"mode {JOINT_MODE!r} takes {', '.join(JOINT)}; equalizer, spec_args and reference_tail "
                             "belong to the UNet modes")
        return JointReplace(replace_steps=self.replace_steps, method=self.projection, blocks=self.replace_blocks)

    def check_joint(self, where="settings") -> tuple:
        """(spec, local_blend) of an edit of an SD3 / Flux model (mode joint-replace), its values checked; its
        blend words are checked against the model's tokenizers when the edit starts."""
        check_prompts(self, where)
        if self.mode != JOINT_MODE:
            raise ValueError(f"{where}: 'mode': an SD3 / Flux model is edited with mode {JOINT_MODE} (its default), "
                             f"not {short(self.mode)}: its joint attention has no cross-attention maps to replace")
        try:
            return self.build()
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: 'mode': {err}") from None

    def check(self, where="settings", tokenizer=None) -> tuple:
        """(spec, local_blend), every word checked against the tokenizer without a model. Errors name
        `where` (the file), the key, and what to change."""
        check_prompts(self, where)
        if self.mode == JOINT_MODE:
            raise ValueError(f"{where}: 'mode': {JOINT_MODE} edits an SD3 / Flux model's joint attention; this "
                             "checkpoint is a UNet model's: use replace, refine or reweight")
        tok = tokenizer or tokenizer_for(self.ckpt)  # the checkpoint's own, from its config (no weights read)

        def attempt(key, fn, fix=""):
            try:
                return fn()
            except (ValueError, TypeError, KeyError) as err:
                raise ValueError(f"{where}: {key!r}: {err}{fix}") from None

        spec_key = "equalizer" if self.equalizer else "spec_args" if self.spec_args else "mode"
        spec, blend = attempt(spec_key, self.build)
        attempt("mask_words" if self.mask_words else "mode", lambda: spec.attention(tok, self.prompts))
        edit = spec.map_edit()
        if edit is not None:
            attempt("equalizer" if self.equalizer else "edits", lambda: edit.cross_edit(tok, self.prompts),
                    " (fix: a word-swap edit keeps the word count; a reweighted word must be in the edited prompt)")
            attempt("cross_replace_steps", lambda: time_word_alpha(tok, self.prompts, self.num_steps,
                                                                   edit.cross_replace_steps))
            attempt("self_replace_steps", lambda: self_window(self.num_steps, edit.self_replace_steps))
        if blend is not None:
            attempt("local_blend.words", lambda: word_alpha(tok, self.prompts, blend.words, "LocalBlend words"),
                    " (fix: local_blend.words takes one word of each prompt, source first)")
            if blend.substruct_words is not None:
                attempt("local_blend.substruct_words",
                        lambda: word_alpha(tok, self.prompts, blend.substruct_words, "LocalBlend substruct_words"),
                        " (fix: one word of each prompt, source first)")
        return spec, blend


def _annotation(s):
    kinds = tuple(tuple if t is list else t for t in s.types)
    kind = LocalBlend if s.name == "local_blend" else Union[kinds] if len(kinds) > 1 else kinds[0]
    return Optional[kind] if s.default is None else kind


def config_class(name: str, doc: str, bases: tuple = ()) -> type:
    """The frozen dataclass `name` whose fields are the settings of its groups (p2p.settings.GROUPS), with
    their declared defaults; a former name as a keyword is refused naming the new one."""
    fields = [(s.name, _annotation(s), dataclasses.field(default=s.default)) for s in config_settings(name)]
    cls = dataclasses.make_dataclass(name, fields, bases=bases, frozen=True,
                                     namespace={"__doc__": doc, "__module__": __name__})
    cls.__init__ = refuse_old_names(cls.__init__, name)
    return cls


GenerateConfig = config_class("GenerateConfig", "generate()'s settings (p2p.settings: the sampling ones, seed, "
                              "ckpt and prompts).")
EditConfig = config_class("EditConfig", "One Prompt-to-Prompt run: prompt is the source P, edits the edited prompts "
                          "P*; the spec's knobs (mode, cross / self replace steps, equalizer, reference_tail, your own "
                          "spec's spec_args) and LocalBlend, with their defaults (p2p.settings).", (EditMethods,))
InvertConfig = config_class("InvertConfig", "invert()'s settings (p2p.settings: the sampling ones and the method's).")


def check_prompts(cfg: EditConfig, where) -> None:
    for key in ("prompt", "edits"):
        if not getattr(cfg, key):
            raise ValueError(f"{where}: missing {key!r}: set it (prompt: the source prompt; edits: a list of "
                             f"edited prompts)")
    if not all(isinstance(e, str) for e in cfg.edits):
        raise ValueError(f"{where}: 'edits' must be a list of prompts (strings), got {short(list(cfg.edits))}")
    check_values(cfg, where)


# Ranges of the numbers a run takes (p2p.settings declares them), checked before a model is loaded
RANGES = {s.name: s.range for s in SETTINGS if s.range is not None and s.entries is None}


# ------------------------------------------------------------------------------- the YAML schema
EDIT_KEYS = {s.name: s.types for s in config_settings("EditConfig")}  # an edit file's keys and their types
BLEND_KEYS = {s.key: s.types for s in settings_of("local_blend")}      # local_blend: {...}: LocalBlend's fields
RENAMED = renamed()  # old key -> the library's name, which the files use now


def _type_name(t) -> str:
    return " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))


def _is(value, types) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if object in types:
        return True
    if isinstance(value, bool) and bool not in types:
        return False                               # YAML `true` is not a number
    return isinstance(value, types)


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
        text = read_text(path, "config")
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


def blend_words(words) -> tuple:
    """[squirrel, lion] or [[a, b], c] (a group of words for one prompt) -> LocalBlend words."""
    return tuples(words)


def _local_blend(data: dict | None, where) -> LocalBlend | None:
    if data is None:
        return None
    check_types(data, BLEND_KEYS, f"{where}: local_blend")
    if not data.get("words"):
        raise ValueError(f"{where}: 'local_blend' needs words: [source word, edited word, ...] (one per prompt)")
    th = data.get("th")
    if th is not None and len(th) != 2:
        raise ValueError(f"{where}: 'local_blend.th' is a pair (mask threshold, substruct threshold), got {short(th)}")
    try:
        return LocalBlend(**{k: tuples(v) for k, v in data.items() if v is not None})
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def edit_config(data: dict, where="settings") -> EditConfig:
    """An EditConfig from a mapping of YAML keys (a file's, or a sweep cell's); unset keys take the defaults."""
    check_types(data, EDIT_KEYS, where)
    s = {k: v for k, v in data.items() if v is not None}
    for key in ("edits", "cross_replace_steps", "self_replace_steps", "spec_args"):
        if key in s:
            s[key] = tuples(s[key])
    if "equalizer" in s:       # {word: c or [c per edited prompt]}, as the command line's --weight gives it
        s["equalizer"] = {w: list(c) if isinstance(c, (list, tuple)) else c for w, c in s["equalizer"].items()}
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
    """configs/edits/NAME.yaml as an EditConfig; unknown keys and wrong types fail before any computation.
    A relative `ckpt:` is relative to the file's folder (see `config_ckpt`)."""
    return edit_config(config_ckpt(read_yaml(path), path), path)


def config_ckpt(data: dict, path) -> dict:
    """A config file's mapping with its relative `ckpt:` made relative to the file's folder, so that the
    file means one checkpoint from any working directory (a name of weights_tools.registry stays)."""
    ckpt = data.get("ckpt") if isinstance(data, dict) else None
    if not isinstance(ckpt, str) or not ckpt or ckpt in CHECKPOINTS or Path(ckpt).is_absolute():
        return data
    return data | {"ckpt": absolute(Path(path).parent / ckpt)}


def absolute(path) -> str:
    """An absolute path, `..` removed, links kept (the path the user named, from any working directory)."""
    return os.path.normpath(Path(path).absolute())


def check_config_ckpt(ckpt, path) -> None:
    """The checkpoint a config file names exists (a name, or a path relative to the file's folder); else an
    error saying the path came from the file."""
    if ckpt in CHECKPOINTS or not ckpt or Path(ckpt).exists():
        return
    raise FileNotFoundError(f"{path}: ckpt: no checkpoint at {ckpt} (a relative path in a config file is "
                            f"relative to the file's folder, {Path(path).parent.resolve()}); fix the path in the "
                            f"file, or pass --ckpt (relative to the working directory)")


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
SOURCE_KNOBS = tuple(s.name for s in SETTINGS if s.source and s.name in EDIT_KEYS)  # change the source image
MAPPING_KNOBS = {s.name: s.entries for s in SETTINGS if s.entries is not None}   # KNOB.KEY: one entry of a mapping
SWEPT = {k: t for k, t in EDIT_KEYS.items() if setting(k).sweep}                  # the knobs a grid may vary


def _resolve_path(p, near: Path) -> Path:
    p = Path(p)
    for cand in (p, near / p):
        if cand.exists():
            return cand
    return p


def knob_type(knob: str, where):
    """The type a grid knob's values must have: an edit key, `edit` (one edited prompt), one entry of a
    mapping (`equalizer.WORD`, `cross_replace_steps.WORD`, `spec_args.FIELD`), or `local_blend.FIELD`."""
    if knob in SWEPT:
        return SWEPT[knob]
    if knob == "edit":
        return str
    head, _, word = knob.partition(".")
    if word and head in MAPPING_KNOBS:
        return MAPPING_KNOBS[head]
    if head == "local_blend" and word in BLEND_KEYS:
        return BLEND_KEYS[word]
    known = [*SWEPT, "edit", *(f"{k}.{'FIELD' if k == 'spec_args' else 'WORD'}" for k in MAPPING_KNOBS),
             *(f"local_blend.{k}" for k in BLEND_KEYS)]
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
    origin = path
    if data.get("base") is not None:
        b = data["base"]
        if isinstance(b, str):
            bpath = _resolve_path(b, path.parent)
            if not bpath.exists():
                raise ValueError(f"{path}: 'base': no edit config {short(b)} (looked in the working directory and "
                                 f"{path.parent}); give a path to a configs/edits/*.yaml or a mapping of edit keys")
            b, where = config_ckpt(read_yaml(bpath), bpath), bpath
            origin = path if data.get("ckpt") else bpath  # the file the checkpoint's path comes from
        else:
            where = f"{path}: base"
        edit_config(b, where)  # its keys and types checked, naming its file
        base.update(b)
    base.update(config_ckpt({k: v for k, v in data.items() if k in EDIT_KEYS}, path))
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None and k != "batch_size"}
    check_types(overrides, EDIT_KEYS, f"{path}: overrides")
    if overrides.get("ckpt") and overrides["ckpt"] not in CHECKPOINTS:  # --ckpt: the working directory's
        overrides["ckpt"] = absolute(overrides["ckpt"])  # cells rerun from anywhere
    elif base.get("ckpt"):
        check_config_ckpt(base["ckpt"], origin)
    base.update(overrides)
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
