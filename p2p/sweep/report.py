"""The merged results, rebuilt from the per-cell files on every run: metrics.csv, metrics.json and
figure.png (cells not done are left out of the tables and drawn as "not run")."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from PIL import Image

from weights_tools.files import write_bytes_atomic

from ..viz import save_image, sweep_figure
from .plan import Cell, label
from .run import TIMING_KEYS, cell_file, read_record, write_json

METRIC_COLUMNS = ("psnr_bg", "ssim_bg", "change_in_mask", "mask_fraction", "latent_l2", "attention_iou",
                  *TIMING_KEYS)


def merge(out_dir: Path, ab: dict, cells: list[Cell]) -> list[dict]:
    """metrics.csv, metrics.json and figure.png from the per-cell files (cells not done are left out)."""
    records = [r for r in (read_record(out_dir, c) for c in cells) if r is not None]
    write_bytes_atomic(out_dir / "metrics.csv", csv_bytes(list(ab["grid"]), records))
    write_json(out_dir / "metrics.json", {"name": ab["name"], "config": str(ab["path"]), "base": ab["base"],
                                          "grid": ab["grid"], "rows": ab["rows"], "cols": ab["cols"],
                                          "metrics_config": ab["metrics"], "cells_total": len(cells),
                                          "cells": records})
    save_image(figure(out_dir, ab, cells, {r["cell"]: r for r in records}), out_dir / "figure.png")
    return records


def csv_bytes(knobs: list, records: list[dict]) -> bytes:
    """One row per cell: its name, its knob values (JSON where not a plain number or string), its metrics."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["cell", *knobs, *METRIC_COLUMNS])
    for r in records:
        row = [r["cell"], *(json.dumps(r["knobs"][k]) if not isinstance(r["knobs"][k], (int, float, str))
                            else r["knobs"][k] for k in knobs)]
        w.writerow(row + ["" if r["metrics"].get(m) is None else r["metrics"][m] for m in METRIC_COLUMNS])
    return buf.getvalue().encode()


def _fmt(v, places: int) -> str:
    return "-" if v is None else v if isinstance(v, str) else f"{v:.{places}f}"


def caption(m: dict) -> list[str]:
    """A cell's caption lines: background PSNR / SSIM, attention IoU, latent distance, and the mask's."""
    lines = [f"PSNR {_fmt(m.get('psnr_bg'), 1)}  SSIM {_fmt(m.get('ssim_bg'), 2)}",
             f"IoU {_fmt(m.get('attention_iou'), 2)}  dz {_fmt(m.get('latent_l2'), 1)}"]
    if m.get("mask_fraction") is not None:
        lines.append(f"mask {100 * m['mask_fraction']:.0f}%  in {_fmt(m.get('change_in_mask'), 3)}")
    return lines


def legend(ab: dict) -> list[str]:
    """What the caption lines' numbers are, printed under the figure."""
    th = ab["metrics"]["iou_threshold"]
    return ["PSNR (dB) / SSIM: the edit against the source outside the LocalBlend mask (the whole picture without one)",
            f"IoU: overlap of the replaced word's and the new word's attention maps, each thresholded at {th} "
            "of its max",
            "dz: L2 distance between the edit's final latent and the source's",
            "mask: share of the picture inside the LocalBlend mask;  in: mean absolute change inside it (0-1 pixels)"]


def figure(out_dir: Path, ab: dict, cells: list[Cell], records: dict) -> Image.Image:
    """Rows and columns are the swept values (labelled); the source of each row on the left; each
    edit captioned with its background PSNR / SSIM and attention IoU."""
    n_rows, n_cols = max(c.row for c in cells) + 1, max(c.col for c in cells) + 1
    tiles = [[None] * n_cols for _ in range(n_rows)]
    captions = [[[] for _ in range(n_cols)] for _ in range(n_rows)]
    sources, row_labels, col_labels = [None] * n_rows, [None] * n_rows, [None] * n_cols
    for c in cells:
        row_labels[c.row] = row_labels[c.row] or [label(k, c.knobs[k], ab["base"]) for k in ab["rows"]]
        col_labels[c.col] = col_labels[c.col] or [label(k, c.knobs[k], ab["base"]) for k in ab["cols"]]
        if c.name not in records:
            continue
        tiles[c.row][c.col] = Image.open(cell_file(out_dir, c, ".png")).convert("RGB")
        captions[c.row][c.col] = caption(records[c.name]["metrics"])
        if sources[c.row] is None:          # drawn on the left: the source of the row's first finished cell
            sources[c.row] = Image.open(cell_file(out_dir, c, ".source.png")).convert("RGB")
    return sweep_figure(f"{ab['name']}: {ab['base']['prompt']!r}", tiles, captions, sources, row_labels, col_labels,
                        legend=legend(ab))
