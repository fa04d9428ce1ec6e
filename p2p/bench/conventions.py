"""The official evaluation's quirks as switches, each declared once in `SWITCHES`.

A switch is a `p2p.settings.Setting`: its name is the `Conventions` field and the `--metrics-config` YAML key,
its flag is `p2p bench pie` / `eval`'s, its default the official choice. From the table follow the
`Conventions` dataclass (`p2p.bench.metrics.Evaluator` measures under one), the flags (`add_switch_flags`), a
config file's and a flag's values checked before any network loads (`conventions_of`), what a metric record keeps
(`record`, compared on resumption) and the switch table of docs/pie-bench-metrics.md (`markdown_table`).
"""
from __future__ import annotations

import dataclasses
import math

from ..settings import Setting, flag_options, short
from .clipscore import EMPTY_MASKS
from .lpips import NORMS
from .pixels import AVERAGES, SSIM_BORDERS

GROUP = "pie_metrics"
SWITCHES = (
    Setting("average", "frame", (str,), "PSNR / MSE / SSIM over the whole frame with the edited region blacked out "
            "(official), or region: over the unedited pixels only", "--average", GROUP, choices=AVERAGES),
    Setting("ssim_border", "valid", (str,), "SSIM's windows inside the picture only (torchmetrics <= 1.4.1, "
            "official), or reflect: every pixel, windows reaching into the reflection (>= 1.4.2)", "--ssim-border",
            GROUP, choices=SSIM_BORDERS),
    Setting("lpips_norm", "lpips", (str,), "LPIPS' feature normalisation x / (norm(x) + 1e-10) (lpips, "
            "torchmetrics < 1.2.1, official), or torchmetrics: x / sqrt(norm(x)^2 + 1e-8) (>= 1.2.1)", "--lpips-norm",
            GROUP, choices=NORMS),
    Setting("dino_pixel_range", 255.0, (float, int), "the structure distance's DINO input range: 255 (official, "
            "pictures in 0..255 before ImageNet's normalisation), 1 (0..1, as DINO was trained)",
            "--dino-pixel-range", GROUP, range=(1.0, 255.0), cli={"metavar": "RANGE"}),
    Setting("dino_antialias", False, (bool,), "resize the picture for DINO with antialiasing (torchvision >= 0.17); "
            "off: torchvision 0.13's resize (official)", "--dino-antialias", GROUP),
    Setting("clip_keep_eos", False, (bool,), "a prompt over 77 CLIP ids keeps BOS, its first 75 tokens and EOS; off: "
            "cut to its first 77 ids, EOS and all (torchmetrics, official)", "--clip-keep-eos", GROUP),
    Setting("clip_empty_mask", "nan", (str,), "the edit-part CLIP score of a mask without a pixel: nan (official), "
            "or score: the score of the all-black picture", "--clip-empty-mask", GROUP, choices=EMPTY_MASKS),
)
NAMES = tuple(s.name for s in SWITCHES)


def takes(s: Setting) -> str:
    """What a switch takes, in words."""
    if s.types == (bool,):
        return "true or false"
    if s.range is not None:
        return f"a number from {s.range[0]:g} to {s.range[1]:g}"
    return "one of " + ", ".join(s.choices)


def valid(s: Setting, value) -> bool:
    if s.types == (bool,):
        return isinstance(value, bool)
    if s.range is not None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and math.isfinite(value) and s.range[0] <= value <= s.range[1]
    return isinstance(value, str) and value in s.choices


def check(name: str, value, where: str) -> None:
    """A ValueError naming where the value came from, the switch, what it takes and the value, unless it is valid."""
    s = next(s for s in SWITCHES if s.name == name)
    if not valid(s, value):
        raise ValueError(f"{where}: {name}={short(value)} is not allowed; {name} takes {takes(s)} (see "
                         f"docs/pie-bench-metrics.md)")


def _post_init(self) -> None:
    for name in NAMES:
        check(name, getattr(self, name), "Conventions")
    object.__setattr__(self, "dino_pixel_range", float(self.dino_pixel_range))


Conventions = dataclasses.make_dataclass(
    "Conventions", [(s.name, s.types[0], dataclasses.field(default=s.default)) for s in SWITCHES], frozen=True,
    namespace={"__post_init__": _post_init, "__module__": __name__, "__doc__": (
        "Where the benchmark's code has a quirk or depends on a library's version: the official choice (each "
        "field's default) or its alternative; the fields are `SWITCHES`' (docs/pie-bench-metrics.md).")})


def record(conventions) -> dict:
    """What a metric record keeps of the conventions: every switch's value (a record under others is measured again)."""
    return dataclasses.asdict(conventions)


OFFICIAL = record(Conventions())


def differences(recorded) -> str:
    """The switches of a record's conventions that are not the official ones, as `name=value, ...` ("" if none)."""
    if not isinstance(recorded, dict):
        return "conventions not recorded"
    return ", ".join(f"{k}={v}" for k, v in recorded.items() if OFFICIAL.get(k, object()) != v)


# ------------------------------------------------------------------------------- flags and files
def add_switch_flags(parser) -> None:
    """The switches' flags (a bool one as --X / --no-X), left None when not given."""
    g = parser.add_argument_group("metric conventions (default: the official evaluation's; docs/pie-bench-metrics.md)")
    for s in SWITCHES:
        g.add_argument(s.flag, **flag_options(s))


def conventions_of(args, config: dict, path) -> Conventions:
    """The conventions of --metrics-config's keys (`config`, read from `path`) under the flags given; each value
    checked where it was given."""
    values = {}
    for s in SWITCHES:
        if config.get(s.name) is not None:
            check(s.name, config[s.name], str(path))
            values[s.name] = config[s.name]
        if getattr(args, s.name, None) is not None:
            check(s.name, getattr(args, s.name), s.flag)
            values[s.name] = getattr(args, s.name)
    return Conventions(**values)


# ------------------------------------------------------------------------------- the documentation
TABLE_START = "<!-- switch table: p2p.bench.conventions.markdown_table() -->\n"
TABLE_END = "<!-- end of the switch table -->"


def markdown_table() -> str:
    """docs/pie-bench-metrics.md's table of the switches: YAML key, flag, official default, what it takes."""
    rows = ["| YAML key (`Conventions` field) | flag | official (default) | takes | what it is |",
            "|---|---|---|---|---|"]
    for s in SWITCHES:
        flag = f"`{s.flag}` / `--no-{s.flag[2:]}`" if s.types == (bool,) else f"`{s.flag}`"
        default = str(s.default).lower() if s.types == (bool,) else f"{s.default:g}" if s.range else s.default
        rows.append(f"| `{s.name}` | {flag} | `{default}` | {takes(s)} | {s.help} |")
    return "\n".join(rows) + "\n"
