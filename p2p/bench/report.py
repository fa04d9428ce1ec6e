"""`p2p bench report OUT`: the paper's table from the per-picture metric files of every row in OUT.

For each row (a folder OUT/ROW with metrics/), each edit type and all pictures together: the mean of each metric
over the pictures measured, in the paper's units (structure distance x10^3, LPIPS x10^3, MSE x10^4, SSIM x10^2;
PSNR in dB and CLIP similarity as 100 x cos, unscaled), which the printed table's first line states.
A metric undefined for a picture (NaN, stored as null: the official evaluation's "nan") is left out of its mean,
and the JSON gives how many pictures each mean is over. A metric file whose picture was edited again since is
left out. Writes OUT/pie_bench.csv (the printed numbers) and OUT/pie_bench.json (the raw means, how many pictures each is
over, `table_scale`: the factor from a raw mean to the printed number, and `conventions`: each row's).

Each metric record keeps the conventions it was measured under (p2p.bench.conventions). A row's numbers are
means over pictures measured under one set: a row measured under the official conventions keeps its name; one
measured under others is named `ROW [switch=value, ...]` by the switches that differ; a row whose pictures were
measured under several sets (a measuring run stopped midway after a change) becomes one row per set, with a
warning to measure them again under one.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from models.textfile import read_json
from weights_tools.files import json_bytes, write_files_atomic

from .conventions import differences
from .pie import EDIT_TYPES
from .run import read_done
from .score import from_json

# (metric, column, scale): the paper's main table, then the source picture's CLIP similarity
COLUMNS = (("structure_distance", "Structure x1e3", 1e3), ("psnr_unedit_part", "PSNR", 1.0),
           ("lpips_unedit_part", "LPIPS x1e3", 1e3), ("mse_unedit_part", "MSE x1e4", 1e4),
           ("ssim_unedit_part", "SSIM x1e2", 1e2), ("clip_similarity_target_image", "CLIP whole", 1.0),
           ("clip_similarity_target_image_edit_part", "CLIP edited", 1.0),
           ("clip_similarity_source_image", "CLIP source", 1.0))
ALL = "all"
UNITS = ("units, as in the paper's Table 1: structure distance x10^3, PSNR in dB, LPIPS x10^3, MSE x10^4, "
         "SSIM x10^2, CLIP similarity 100 x cos; pie_bench.json holds the raw means")


def row_records(row_dir: Path) -> list[dict]:
    """The metric records of one row whose picture is still the one they measured."""
    out = []
    for path in sorted((row_dir / "metrics").glob("*.json")):
        try:
            rec = read_json(path, "metric record")
        except (OSError, ValueError):
            continue
        pic = read_done(row_dir.parent, row_dir.name, path.stem)
        if isinstance(rec, dict) and pic is not None and rec.get("picture_key") == pic.get("key"):
            out.append(rec)
    return out


def summarise(records: list[dict]) -> dict:
    """{group: {"pictures": n, metric: {"mean": m or None, "n": count}}}, groups: each edit type, then "all"."""
    groups = {t: [r for r in records if r.get("edit_type") == t] for t in EDIT_TYPES}
    groups = {t: rs for t, rs in groups.items() if rs} | {ALL: records}
    out = {}
    for group, rs in groups.items():
        out[group] = {"pictures": len(rs)}
        for metric, _, _ in COLUMNS:
            values = [from_json(r["metrics"][metric]) for r in rs if metric in r.get("metrics", {})]
            kept = [v for v in values if not math.isnan(v)]
            if values:
                out[group][metric] = {"mean": sum(kept) / len(kept) if kept else None, "n": len(kept)}
    return out


def by_conventions(row: str, records: list[dict], log=print) -> dict:
    """{label: (conventions, records)}: the row's records split by the conventions they were measured under, each
    set's label the row's name, followed by the switches that differ from the official ones ([...])."""
    sets: dict[str, tuple] = {}
    for rec in records:
        kept = rec.get("conventions")
        differ = differences(kept)
        sets.setdefault(f"{row} [{differ}]" if differ else row, (kept, []))[1].append(rec)
    if len(sets) > 1:
        log(f"warning: {row}'s pictures were measured under {len(sets)} sets of conventions, tabulated apart as "
            f"{', '.join(sets)}; run `p2p bench eval` again to measure them all under one")
    return sets


def collect(out_dir, log=print) -> tuple[dict, dict]:
    """({row: summary}, {row: conventions}) of every row folder in OUT that has metric records, a row split by
    the conventions its pictures were measured under (`by_conventions`)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir} does not exist: give the -o folder of `p2p bench pie`")
    rows = {d.name: row_records(d) for d in sorted(out_dir.iterdir()) if (d / "metrics").is_dir()}
    sets = {label: kept for name, rs in rows.items() if rs for label, kept in by_conventions(name, rs, log).items()}
    if not sets:
        raise ValueError(f"{out_dir} holds no measured pictures (ROW/metrics/*.json): run `p2p bench pie` (or "
                         f"`p2p bench eval`) first")
    return {label: summarise(rs) for label, (_, rs) in sets.items()}, {label: c for label, (c, _) in sets.items()}


def conventions_line(conventions: dict) -> str:
    """The printed line saying which conventions the numbers used."""
    other = [label for label, c in conventions.items() if differences(c)]
    return ("conventions: the official evaluation's" + (f", except in {', '.join(other)}" if other else "") +
            " (docs/pie-bench-metrics.md; pie_bench.json gives each row's)")


def cell(entry: dict | None, scale: float) -> str:
    return "-" if entry is None or entry["mean"] is None else f"{entry['mean'] * scale:.2f}"


def table_rows(summary: dict) -> list[list[str]]:
    """[row, edit type, pictures, metric columns...] per row and group, in the paper's units."""
    lines = []
    for row, groups in summary.items():
        for group, s in groups.items():
            name = f"{group} {EDIT_TYPES[group]}" if group in EDIT_TYPES else "mean"
            lines.append([row, name, str(s["pictures"]), *(cell(s.get(m), k) for m, _, k in COLUMNS)])
    return lines


def text_table(lines: list[list[str]]) -> str:
    head = ["row", "edit type", "n", *(c for _, c, _ in COLUMNS)]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda r: "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def report(out_dir, log=print) -> dict:
    """Print the table and write OUT/pie_bench.csv and OUT/pie_bench.json; the summary."""
    summary, conventions = collect(out_dir, log)
    lines = table_rows(summary)
    buf = io.StringIO()
    csv.writer(buf).writerows([["row", "edit_type", "pictures", *(c for _, c, _ in COLUMNS)], *lines])
    out = Path(out_dir)
    scale = {m: k for m, _, k in COLUMNS}
    table = {"units": UNITS, "table_scale": scale, "conventions": conventions, "rows": summary}
    write_files_atomic({out / "pie_bench.csv": buf.getvalue().encode(), out / "pie_bench.json": json_bytes(table)})
    log(UNITS)
    log(conventions_line(conventions))
    log(text_table(lines))
    log(f"wrote {out / 'pie_bench.csv'} and {out / 'pie_bench.json'}")
    return summary
