"""Every setting of a run, declared once.

A `Setting` is one knob: its name (the config field and YAML key), default, the types a file may
give, the numbers it may hold, its help, its command-line flag, and its former names. Everything
else follows from the table `SETTINGS`:

- the configs `GenerateConfig`, `EditConfig`, `InvertConfig` (p2p.config): their fields and defaults
  are the settings of their groups (`GROUPS`);
- the YAML schema of an edit file and the names a renamed key is refused with (p2p.config);
- the range and choice checks, `check_values`, run before any model is loaded;
- the command line's flags (`add_flags`) and how a flag's words become the config's value (`parse`);
- the sweep's knobs (p2p.config.knob_type, p2p.sweep): every setting of an edit with `sweep`, the
  entries of a mapping (`equalizer.WORD`, `spec_args.FIELD`) and LocalBlend's fields;
- the API's keyword arguments: generate(), edit() and invert() keep explicit signatures whose
  defaults are the configs' (tests/test_settings.py holds them to the table both ways).

The defaults of the edit spec's knobs and of LocalBlend's fields are those of the classes
themselves (`Replace()`, `LocalBlend(words)`), read here, so that the API's objects and the files
cannot disagree. docs/settings.md's table is `markdown_table()` (`p2p settings`).
"""
from __future__ import annotations

import argparse
import functools
import inspect
import math
import os
import reprlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import yaml

from models.sd import SAMPLERS
from weights_tools.registry import DEFAULT as DEFAULT_CKPT

from .blend import LocalBlend
from .control import Edit, Replace
from .joint_control import METHODS as PROJECTIONS, JointReplace
from .pnp import SOURCE_TEXTS, PlugAndPlay

# group -> the configs whose fields its settings are. "local_blend": the fields of EditConfig.local_blend;
# "spec": the edit spec's knobs (fields of p2p.Edit and the built-in specs); "run": how a command runs on this
# machine (every command's flag, in no config: the same settings give the same pictures whatever they are)
GROUPS = {"sampling": ("GenerateConfig", "EditConfig", "InvertConfig"), "model": ("GenerateConfig", "EditConfig"),
          "seed": ("GenerateConfig", "EditConfig"), "generate": ("GenerateConfig",), "edit": ("EditConfig",),
          "spec": ("EditConfig",), "local_blend": (), "invert": ("InvertConfig",), "photo": ("EditConfig",),
          "mutual": ("EditConfig",), "run": (), "guidance": ("EditConfig",),
          "pnp": ("EditConfig",),  # "pnp": Plug-and-Play's knobs (p2p.pnp.PlugAndPlay, mode: pnp)
          "joint": ("EditConfig",)}  # "joint": JointReplace's knobs (SD3 / Flux, mode: joint-replace)
KEYWORD_GROUPS = ("sampling", "seed", "invert", "photo", "guidance")  # the API functions take these as keyword arguments
# inversion methods (see p2p.inversion); "flow": an MM-DiT model's reverse Euler ODE (p2p.joint_inversion)
METHODS = ("null-text", "ddim", "negative-prompt", "direct", "flow")
SOURCE_ROWS = ("trajectory", "inputs", "residual", "free")  # an edit's source row from an inversion (see there)
WEIGHT_RANGE = (-10000, 10000)  # a reweighting c; the reference's examples use -5 to 10
CKPT_HELP = ("an SD / SDXL / LDM .safetensors, .ckpt or diffusers folder, or a name of weights_tools.registry "
             "('miniature': the miniature SD that ships with the project)")


@dataclass(frozen=True)
class Setting:
    """One knob. `name` is the config field and the YAML key ("local_blend.X": field X of the
    local_blend mapping). A file may give None for any setting: its default."""
    name: str
    default: object
    types: tuple                   # what a YAML value may be; the first of int / float / str types the flag
    help: str
    flag: str | None = None        # the command line's flag (None: a mapping whose fields have flags)
    group: str = "edit"            # see GROUPS
    range: tuple | None = None     # (lo, hi) of every number it holds (hi may be math.inf)
    choices: tuple | Callable | None = None  # the values it takes, or a function giving them when checked
    old: tuple = ()                # former names: a file or a keyword using one gets an error naming this one
    source: bool = False           # changes the source image (a sweep puts such knobs on the figure's rows)
    sweep: bool = True             # a sweep may vary it
    entries: tuple | None = None   # a mapping whose entries are sweep knobs too (NAME.KEY), of these types
    noun: str = "value"            # what one entry of a ranged mapping is called in an error
    cli: dict = field(default_factory=dict)  # argparse keywords beyond the type (nargs, action, metavar)
    parse: Callable | None = None  # the flag's parsed value -> the config's value

    @property
    def key(self) -> str:
        """The field within its mapping ("threshold" of "local_blend.threshold"), else the name."""
        return self.name.rpartition(".")[2]

    def allowed(self) -> tuple | None:
        return self.choices() if callable(self.choices) else self.choices


# ------------------------------------------------------------------------------- flags -> values
def number(text: str, flag: str, form: str) -> float:
    """A flag's number, or an error naming the flag and the form it takes."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{flag} takes {form}; {text!r} is not a number") from None


def parse_cross_steps(values):
    """["0.8"] -> 0.8; ["0.2", "0.8"] -> (0.2, 0.8); ["1.0", "lion=0.4"] -> {"default_": 1.0, "lion": 0.4};
    ["lion=0.1,0.4"] -> {"lion": (0.1, 0.4)}: the forms a file's cross_replace_steps takes."""
    form = "F, START END, or F WORD=F ... (fractions of the steps, e.g. 0.8 lion=0.4; WORD=START,END a window)"
    plain = [number(v, "--cross-steps", form) for v in values if "=" not in v]
    words = {}
    for w, _, f in (v.partition("=") for v in values if "=" in v):
        bounds = tuple(number(x, "--cross-steps", form) for x in f.split(","))
        words[w] = bounds if len(bounds) > 1 else bounds[0]
    base = plain[0] if len(plain) == 1 else tuple(plain) if plain else None
    return ({"default_": base} if base is not None else {}) | words if words else base


def parse_weights(items) -> dict:
    """["car=2", "cat=1,3"] -> {"car": 2.0, "cat": [1.0, 3.0]} (one c per edited prompt)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--weight takes WORD=C (e.g. car=2), got {item!r}")
        word, c = item.split("=", 1)
        cs = [number(x, "--weight", "WORD=C or WORD=C1,C2 (one C per edited prompt)") for x in c.split(",")]
        out[word] = cs if "," in c else cs[0]
    return out


def parse_words(values) -> tuple:
    """LocalBlend words as a file gives them: "a,b" is a group of words of one prompt; a number is a
    word's position in its prompt (as `7` in a file)."""
    one = lambda w: int(w) if w.isdigit() else w  # noqa: E731
    return tuple(tuple(map(one, w.split(","))) if "," in w else one(w) for w in values)


def one_or_pair(values):
    """[0.4] -> 0.4; [0.1, 0.5] -> (0.1, 0.5)."""
    return values[0] if len(values) == 1 else tuple(values)


def parse_spec_args(items) -> dict:
    """["weight=0.5", "heads=[0, 1]"] -> {"weight": 0.5, "heads": (0, 1)}: each VALUE read as YAML reads it."""
    out = {}
    for item in items:
        name, eq, text = item.partition("=")
        if not eq or not name:
            raise ValueError(f"--spec-arg takes FIELD=VALUE (a field of your Edit subclass, e.g. weight=0.5), "
                             f"got {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ValueError(f"--spec-arg {name}: {text!r} is not a value a YAML file could hold") from None
        out[name] = tuples(value)
    return out


def tuples(x):
    """YAML lists -> tuples, recursively: the specs' (start, end) pairs and word groups."""
    if isinstance(x, (list, tuple)):
        return tuple(tuples(v) for v in x)
    return {k: tuples(v) for k, v in x.items()} if isinstance(x, dict) else x


def sampler_names() -> tuple:
    return tuple(SAMPLERS)


def parse_threads(value: str):
    """--threads N or auto -> N or "auto"."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--threads takes a number of threads (at least 1) or auto, got {value!r}") from None


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


TORCH_THREADS = torch.get_num_threads()  # torch's own count before any --threads: OMP_NUM_THREADS, else one per core


def auto_threads(share: int = 1) -> int:
    """The CPU threads a run uses by default: torch's own count (a thread per core) where the cores are
    idle, fewer where other processes keep them busy (the last minute's load average): a thread pool
    larger than the idle cores spins against the other processes, 25-40 times slower than one thread
    on a loaded 2-core machine (docs/benchmarks.md, benchmarks/threads.py). `share`: processes of one run
    on this machine (a sweep's ranks), which split the idle cores."""
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    idle = max(1, int(cpu_cores() - busy + 0.5))
    return max(1, min(TORCH_THREADS, idle // max(1, share)))


def use_threads(value, share: int = 1) -> int:
    """Set torch's intra-op CPU threads from a --threads value (None or "auto": `auto_threads(share)`); the count."""
    n = auto_threads(share) if value in (None, "auto") else value
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4096:
        raise ValueError(f"threads must be a whole number from 1 to 4096 or auto, got {short(value)}")
    torch.set_num_threads(n)
    return n


# ------------------------------------------------------------------------------- the table
SETTINGS = (
    # the sampler: generate(), edit() and invert()
    Setting("num_steps", 50, (int,), "sampling steps (PLMS: N + 1 UNet calls for N steps; SD3 / Flux: default the "
            "model's own, SD3 and FLUX.1-dev 28, schnell 4)", "--steps",
            "sampling", range=(1, 1000), old=("steps",), source=True),
    Setting("guidance_scale", 7.5, (float, int), "classifier-free guidance scale w (SD3 / Flux: default the model's "
            "own, SD3 7.0, FLUX.1-dev 3.5 (distilled), schnell 0.0; inverting SD3: 1.0)", "--guidance", "sampling",
            range=(-10000, 10000), old=("guidance",), source=True),
    Setting("steps_offset", 1, (int,), "1: timesteps 981..1 (SD's); 0: 980..0, as the null-text notebook",
            "--steps-offset", "sampling", range=(0, 999), source=True),
    Setting("height", None, (int,), "picture height in pixels (default: the model's)", "--height", "sampling",
            range=(8, 16384), source=True),
    Setting("width", None, (int,), "picture width in pixels (default: the model's)", "--width", "sampling",
            range=(8, 16384), source=True),
    Setting("sampler", "ddim", (str,), "ddim (eta 0), or plms (also pndm): PLMS as the reference's stable "
            "notebook, N + 1 UNet calls for N steps (an inversion needs a sampler with an inverse step: ddim)", "--sampler", "sampling", choices=sampler_names,
            source=True),
    # the run
    Setting("seed", 0, (int,), "x_T is torch.randn from manual_seed(seed) on the CPU", "--seed", "seed",
            range=(0, 2 ** 64 - 1), source=True),   # what torch.Generator.manual_seed takes
    Setting("ckpt", DEFAULT_CKPT, (str,), CKPT_HELP, "--ckpt", "model", source=True),
    Setting("prompts", (), (list,), "the prompts, one picture each", "--prompt", "generate",
            cli={"action": "append", "required": True}),
    # the edit
    Setting("prompt", "", (str,), "the source prompt P", "--prompt", source=True),
    Setting("edits", (), (list,), "the edited prompts P* (the flag once per prompt)", "--edit",
            cli={"action": "append"}),
    Setting("mode", "replace", (str,), "replace | refine | reweight (a Reweight on top of replace / refine when "
            "an equalizer is given), masactrl (MasaCtrl's mutual self-attention, docs/masactrl.md), pnp "
            "(Plug-and-Play, from a ddim inversion: docs/pnp.md), joint-replace (SD3 / Flux: projection replacement "
            "on joint attention, docs/mmdit-p2p.md; their default), or module:Class: your own p2p.Edit subclass",
            "--mode"),
    Setting("spec_args", None, (dict,), "mode module:Class: its own fields, {FIELD: VALUE}", "--spec-arg",
            entries=(object,), cli={"action": "append", "metavar": "FIELD=VALUE"}, parse=parse_spec_args),
    Setting("negative_prompt", "", (str,), "the prompt of the edited prompts' unconditional guidance row (\"\": the "
            "empty prompt, as Prompt-to-Prompt; Plug-and-Play's authors: \"ugly, blurry, black, low res, "
            "unrealistic\")", "--negative-prompt", "guidance"),
    # the edit spec's knobs
    Setting("cross_replace_steps", Edit.cross_replace_steps, (float, int, list, dict),
            "steps with the source's cross-attention injected: F (the first F of them), [START, END], or "
            "{default_: F, WORD: F} per word", "--cross-steps", "spec", old=("cross_steps",),
            entries=(float, int, list), cli={"nargs": "+", "metavar": "F"}, parse=parse_cross_steps),
    Setting("self_replace_steps", Edit.self_replace_steps, (float, int, list),
            "steps with the source's self-attention injected: F or [START, END]", "--self-steps", "spec",
            old=("self_steps",), cli={"nargs": "+", "type": float, "metavar": "F"}, parse=one_or_pair),
    Setting("self_replace_max_res", Edit.self_replace_max_res, (int,),
            "inject self-attention only in layers whose latent side is at most this (default: 16, "
            "scaled with the model's default latent side where it is larger than SD v1's: SDXL 32)", "--self-max-res",
            "spec",
            range=(1, math.inf), old=("self_max_res",)),
    Setting("equalizer", None, (dict,), "reweight: {WORD: C}, or {WORD: [C per edited prompt]}", "--weight",
            "spec", range=WEIGHT_RANGE, old=("weight",), entries=(float, int, list), noun="weight",
            cli={"action": "append", "metavar": "WORD=C"}, parse=parse_weights),
    Setting("reference_tail", Replace.reference_tail, (bool,), "replace: keep the reference's misaligned tail "
            "after a swapped word of another token count", "--reference-tail", "spec"),
    # MasaCtrl (mode: masactrl; None: MutualSelfAttention's defaults)
    Setting("start_step", None, (int,), "masactrl: the first UNet call (0-based) with mutual self-attention "
            "(default 4)", "--start-step", "mutual", range=(0, 1000)),
    Setting("start_layer", None, (int,), "masactrl: the first transformer block, in call order (SD v1: 0-5 down, "
            "6 mid, 7-15 up; default 10)", "--start-layer", "mutual", range=(0, 10000)),
    Setting("mask_words", None, (list,), "masactrl: (source word, target word): the mask-guided variant "
            "(MaskAuto), masks from their 16x16 cross-attention maps", "--mask-words", "mutual", sweep=False,
            cli={"nargs": 2, "metavar": ("SOURCE", "TARGET")}, parse=tuple),
    Setting("mask_threshold", None, (float, int), "masactrl: the mask threshold on the min-max normalised maps "
            "(default 0.1)", "--mask-threshold", "mutual", range=(0, 1)),
    Setting("feature_steps", PlugAndPlay.feature_steps, (float, int), "pnp: the first int(n F) steps take the "
            "source's decoder ResBlock features (the authors' pnp_f_t)", "--feature-steps", "pnp", range=(0, 1)),
    Setting("attention_steps", PlugAndPlay.attention_steps, (float, int), "pnp: the first int(n F) steps take the "
            "source's decoder self-attention q and k (the authors' pnp_attn_t)", "--attention-steps", "pnp",
            range=(0, 1)),
    Setting("source_text", PlugAndPlay.source_text, (str,), "pnp: the source row reads the empty prompt (\"empty\", "
            "the authors' code) or the inverted prompt (\"prompt\")", "--source-text", "pnp", choices=SOURCE_TEXTS),
    # JointReplace's knobs (mode: joint-replace, SD3 / Flux)
    Setting("replace_steps", JointReplace.replace_steps, (float, int, list), "joint-replace: the steps in which the "
            "edited rows take the source's projections: F (the first F of them) or [START, END]", "--replace-steps",
            "joint", range=(0, 1), cli={"nargs": "+", "type": float, "metavar": "F"}, parse=one_or_pair),
    Setting("projection", JointReplace.method, (str,), "joint-replace: the source's projections the edited rows "
            "take (qiki: the image tokens' q and k, the paper's; docs/mmdit-p2p.md)", "--projection", "joint",
            choices=tuple(PROJECTIONS)),
    Setting("replace_blocks", JointReplace.blocks, (list,), "joint-replace: the joint blocks replaced (official "
            "indices; default: all)", "--replace-blocks", "joint", range=(0, math.inf),
            cli={"nargs": "+", "type": int, "metavar": "BLOCK"}, parse=tuple),
    # LocalBlend
    Setting("local_blend", None, (dict,), "LocalBlend: outside the blend words' mask the edit keeps the source"),
    Setting("local_blend.words", None, (list,), "one word per prompt, source first ([a, b] or a,b: several "
            "words of one prompt; a number: a word's position)", "--blend", "local_blend", old=("blend",),
            cli={"nargs": "+", "metavar": "WORD"}, parse=parse_words),
    Setting("local_blend.threshold", LocalBlend.threshold, (float, int), "mask threshold on the max-normalised map",
            "--blend-threshold", "local_blend", range=(0, 1), old=("blend_threshold",)),
    Setting("local_blend.start_blend", LocalBlend.start_blend, (float, int), "fraction of the steps before "
            "blending starts (null-text notebook: 0.2)", "--blend-start", "local_blend", range=(0, 1),
            old=("blend_start",)),
    Setting("local_blend.substruct_words", LocalBlend.substruct_words, (list,), "words whose mask is removed from "
            "the blend mask, one per prompt", "--blend-substruct", "local_blend", old=("blend_substruct",),
            cli={"nargs": "+", "metavar": "WORD"}, parse=parse_words),
    Setting("local_blend.th", LocalBlend.th, (list,), "[mask threshold, substruct threshold] (overrides "
            "threshold)", "--blend-th", "local_blend", range=(0, 1), old=("blend_th",),
            cli={"nargs": 2, "type": float, "metavar": ("MASK", "SUBSTRUCT")}, parse=tuple),
    Setting("local_blend.level", LocalBlend.level, (int,), "resolution level of the maps the mask is made from "
            "(default: the named checkpoint's recommended level, the miniature's 0: its 16x16 maps; else the "
            "deepest)", "--blend-level", "local_blend",
            old=("blend_level",)),
    Setting("local_blend.pool", LocalBlend.pool, (bool,), "max-pool the map 3x3 before resizing it (false: the "
            "LDM notebook's unpooled map)", "--blend-pool", "local_blend"),
    Setting("local_blend.end_blend", LocalBlend.end_blend, (float, int), "fraction of the steps after which "
            "blending stops (default: the last step on a UNet; 0.5 on SD3 / Flux, the official MM-DiT default)",
            "--blend-end", "local_blend", range=(0, 1)),
    Setting("local_blend.blocks", LocalBlend.blocks, (list,), "SD3 / Flux only: the joint blocks whose maps make "
            "the mask (official block indices; default: all)", "--blend-blocks", "local_blend", range=(0, math.inf),
            cli={"nargs": "+", "type": int, "metavar": "BLOCK"}, parse=tuple),
    # editing a photo
    Setting("source_row", None, (str,), "editing from an inversion: trajectory (the source row is the inversion "
            "latent at every step and ends on the photo's), inputs (the inversion latent before every step, the "
            "last step's output kept: MasaCtrl's ref_intermediate_latents), residual (Direct Inversion's additive "
            "form, as PnPInversion), free (no correction); default: trajectory for direct, free otherwise",
            "--source-row", "photo", choices=SOURCE_ROWS, source=True, sweep=False),
    # what the run records
    # how a command runs on this machine
    Setting("threads", "auto", (int, str), "CPU threads torch uses: N, or auto (torch's count, one per core, "
            "less the cores other processes keep busy; see docs/benchmarks.md)", "--threads", "run",
            sweep=False, parse=parse_threads),
    Setting("show_attention", False, (bool,), "also write per-token attention pictures of every prompt",
            "--show-attention", sweep=False),
    Setting("description", "", (str,), "what the run is, kept in its sidecar", "--description", sweep=False),
    # the inversion of a photo
    Setting("method", "null-text", (str,), "how the photo is inverted (see docs: inversion; flow: SD3 / Flux's "
            "reverse Euler ODE, their default)", "--method",
            "invert", choices=METHODS),
    Setting("num_inner_steps", 10, (int,), "null-text: Adam iterations per step at most", "--inner-steps",
            "invert", range=(0, 1000)),
    Setting("early_stop_epsilon", 1e-5, (float, int), "null-text: stop a step's iterations when the loss < this "
            "+ 2e-5 i", "--early-stop", "invert"),
    Setting("offsets", (0, 0, 0, 0), (list,), "pixels cut from the left, right, top and bottom before the centre "
            "crop", "--offsets", "invert", cli={"nargs": 4, "type": int, "metavar": ("L", "R", "T", "B")},
            parse=tuple),
)


def setting(name: str) -> Setting:
    """The declaration of `name`."""
    for s in SETTINGS:
        if s.name == name:
            return s
    raise KeyError(f"no setting {name!r}; the settings are {[s.name for s in SETTINGS]}")


def settings_of(*groups: str) -> list:
    return [s for s in SETTINGS if s.group in groups]


def config_settings(config: str) -> list:
    """The settings that are fields of `config` ("EditConfig"), in the table's order."""
    return [s for s in SETTINGS if config in GROUPS[s.group]]


def keywords(config: str) -> list:
    """The settings of `config` that its API function (generate / edit / invert) takes as keywords."""
    return [s.name for s in config_settings(config) if s.group in KEYWORD_GROUPS]


def renamed() -> dict:
    """Former name -> the setting's name now."""
    return {old: s.name for s in SETTINGS for old in s.old}


def new_name(old: str) -> str | None:
    """The current name of a renamed key or grid knob (`weight.car` -> `equalizer.car`), else None."""
    head, dot, rest = str(old).partition(".")
    names = renamed()
    return names[head] + dot + rest if head in names else None


# ------------------------------------------------------------------------------- values
REPR = reprlib.Repr()
REPR.maxlevel, REPR.maxtuple, REPR.maxlist, REPR.maxdict, REPR.maxstring, REPR.maxother = 3, 6, 6, 6, 80, 80


def short(value, limit: int = 200) -> str:
    """repr() of a value from a file, bounded: a message never formats a value of unbounded size."""
    text = REPR.repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def in_range(value, lo, hi) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and lo <= value <= hi


def value_of(cfg, name: str):
    """cfg's value of a setting (a LocalBlend field through cfg.local_blend), None where it has none."""
    head, dot, key = name.partition(".")
    value = getattr(cfg, head, None)
    return getattr(value, key, None) if dot and value is not None else value


def _range_text(lo, hi) -> str:
    return f"at least {lo}" if hi == math.inf else f"from {lo} to {hi}"


def check_value(s: Setting, value, where) -> None:
    """One setting's value within its choices and range (a mapping's entries each: a list's items each)."""
    allowed = s.allowed()
    if allowed is not None and value not in allowed:
        raise ValueError(f"{where}: {s.name!r} must be one of {', '.join(allowed)}, got {short(value)}")
    if s.range is None:
        return
    if isinstance(value, dict):
        for key, v in value.items():
            if not all(in_range(x, *s.range) for x in (v if isinstance(v, (list, tuple)) else [v])):
                raise ValueError(f"{where}: {s.name!r} gives {short(key)} the {s.noun} {short(v)}; a {s.noun} is a "
                                 f"finite number {_range_text(*s.range)}")
    elif not all(in_range(x, *s.range) for x in (value if isinstance(value, (list, tuple)) else [value])):
        raise ValueError(f"{where}: {s.name!r} must be a finite number {_range_text(*s.range)}, got {short(value)}")


def check_values(cfg, where) -> None:
    """Every setting a GenerateConfig / EditConfig / InvertConfig holds within its choices and range
    (None: the default), before any model is loaded: far outside them a run only gives black pictures
    (nan, inf, 1e30) or allocates gigabytes (a 100000-px side)."""
    for s in SETTINGS:
        value = value_of(cfg, s.name)
        if value is not None:
            check_value(s, value, where)


# ------------------------------------------------------------------------------- the API's keywords
def refuse_old_names(fn, name: str | None = None):
    """`fn` (whose keyword arguments are settings) with a former name refused by a TypeError naming the
    name it has now, as a file's old key is."""
    name = name or fn.__qualname__
    params = inspect.signature(fn).parameters

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for key in kwargs:
            new = new_name(key) if key not in params else None
            if new is not None:
                fix = ("pass local_blend=LocalBlend(...) with it" if new.startswith("local_blend.") else
                       "give it to the edit spec (Replace / Refine / Reweight)" if "spec" in params
                       and setting(new).group == "spec" else f"rename it to {new!r}")
                raise TypeError(f"{name}(): keyword {key!r} is now called {new!r} (the library's name): {fix}")
        return fn(*args, **kwargs)
    return wrapper


# ------------------------------------------------------------------------------- the command line
def flag_options(s: Setting, defaults: bool = True) -> dict:
    """add_argument's keywords for a setting's flag; a flag left out is None (the file's or the default
    value). defaults: say the default in the help."""
    shown = defaults and s.default not in (None, (), "")
    kw = {"dest": s.name, "metavar": s.key.upper(), "help": s.help + (f" (default {s.default})" if shown else "")}
    if s.types == (bool,):
        return kw | {"action": argparse.BooleanOptionalAction, "default": None, "metavar": None}
    base = next((t for t in s.types if t in (int, float, str)), None)
    if base is not None and s.parse is None and "action" not in s.cli:   # a parse function reads the words
        kw["type"] = base
    allowed = s.allowed()
    if allowed is not None:
        kw["choices"], kw["metavar"] = list(allowed), None
    return kw | s.cli


def add_flags(parser, settings, defaults: bool = True) -> None:
    """The flags of these settings (those that have one)."""
    for s in settings:
        if s.flag is not None:
            parser.add_argument(s.flag, **flag_options(s, defaults))


def flag_values(args, names) -> dict:
    """The settings among `names` given as flags, as config values (a flag left out is not there)."""
    out = {}
    for name in names:
        v = getattr(args, name, None)
        if v is not None:
            s = setting(name)
            out[name] = s.parse(v) if s.parse is not None else tuple(v) if isinstance(v, list) else v
    return out


# ------------------------------------------------------------------------------- the documentation
TABLE_START = "<!-- settings table: p2p settings --write docs/settings.md -->\n"
TABLE_END = "<!-- end of the settings table -->"


def _yaml(value) -> str:
    """A value as a YAML file writes it."""
    plain = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(plain, default_flow_style=True).split("\n")[0]


def _takes(s: Setting) -> str:
    takes = " or ".join(t.__name__ for t in s.types)
    if s.allowed() is not None:
        takes += ": " + ", ".join(s.allowed())
    if s.range is not None:
        takes += f", {'each ' + s.noun + ' ' if s.entries else ''}{_range_text(*s.range)}"
    return takes


GROUPLESS = {"local_blend": "EditConfig.local_blend", "run": "every command (a flag, no YAML key)"}


def markdown_table() -> str:
    """docs/settings.md's table of every setting: the YAML key, the flag, the default, what it takes."""
    rows = ["| YAML key | flag | default | takes | in | former names | what it is |",
            "|---|---|---|---|---|---|---|"]
    for s in SETTINGS:
        cells = [f"`{s.name}`", f"`{s.flag}`" if s.flag else "", f"`{_yaml(s.default)}`", _takes(s),
                 ", ".join(GROUPS[s.group]) or GROUPLESS[s.group], ", ".join(f"`{o}`" for o in s.old), s.help]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def write_table(path) -> None:
    """Rewrite the table between the markers of `path` (docs/settings.md) from the declarations."""
    with open(path) as f:
        text = f.read()
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{path} has no settings table markers: {TABLE_START.strip()} ... {TABLE_END}")
    head, rest = text.split(TABLE_START, 1)
    with open(path, "w") as f:
        f.write(head + TABLE_START + markdown_table() + TABLE_END + rest.split(TABLE_END, 1)[1])
