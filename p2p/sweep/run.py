"""One batch run and measured, and the per-cell files a rerun resumes from.

Each cell's images and metrics are written atomically once its batch finishes, cells/CELL.json
last (it holds a hash of the cell's settings): a cell is done when its JSON matches its settings
and its image is there.
"""
from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import torch
import yaml

from models.textfile import read_json
from weights_tools.files import write_bytes_atomic, write_json_atomic

from .. import metrics as M
from ..blend import for_model, model_level
from ..pipeline import edit
from ..viz import save_image
from .plan import Cell, batch_edit, iou_words

TIMING_KEYS = ("seconds", "batch_seconds", "batch_cells", "maxrss_mib", "cuda_max_mib", "device")


# ------------------------------------------------------------------------------- files
def _clean(x):
    """JSON without NaN/Infinity: nan -> null, inf -> "inf"."""
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: Path, obj) -> None:
    write_json_atomic(_clean(obj), path)


def cell_file(out_dir: Path, cell: Cell, suffix: str) -> Path:
    """cells/CELL.yaml (its settings), CELL.png (the edit), CELL.source.png, CELL.json (the metrics)."""
    return Path(out_dir) / "cells" / f"{cell.name}{suffix}"


def save_cell(out_dir: Path, cell: Cell, metrics: dict, source, image, identity: dict | None) -> None:
    """The cell's pictures and JSON; `identity` ({"checkpoint_sha256", "reading"}): the weights it ran on."""
    save_image(source, cell_file(out_dir, cell, ".source.png"))
    save_image(image, cell_file(out_dir, cell, ".png"))
    write_json(cell_file(out_dir, cell, ".json"), {"cell": cell.name, "index": cell.index, "knobs": cell.knobs,
                                                   "row": cell.row, "col": cell.col, "config_hash": cell.hash,
                                                   **(identity or {}), "metrics": metrics})


def read_record(out_dir: Path, cell: Cell, identity: dict | None = None) -> dict | None:
    """The cell's JSON if the cell is done with its current settings (and, when given, on the weights
    `identity` names: the checkpoint whose bytes hash to its checkpoint_sha256, read as its `reading`
    says: dtype, prediction type, VAE, tokenizer, strictness), else None."""
    try:
        rec = read_json(cell_file(out_dir, cell, ".json"))
    except (OSError, ValueError):
        return None
    done = rec.get("config_hash") == cell.hash and cell_file(out_dir, cell, ".png").exists()
    same_weights = identity is None or all(rec.get(k) == v for k, v in identity.items())
    return rec if done and same_weights else None


def is_done(out_dir: Path, cell: Cell, identity: dict | None = None) -> bool:
    return read_record(out_dir, cell, identity) is not None


def write_cell_configs(out_dir: Path, cells: list[Cell]) -> None:
    """Each cell's settings as a plain edit config (rewritten only when it changed)."""
    for c in cells:
        p = cell_file(out_dir, c, ".yaml")
        text = yaml.safe_dump(c.settings, sort_keys=False, allow_unicode=True).encode()
        if not p.exists() or p.read_bytes() != text:
            write_bytes_atomic(p, text)


# ------------------------------------------------------------------------------- one batch
def _peak_cuda_mib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def _timed_edit(sd, job):
    """`edit` of one batch and its seconds (CUDA synchronised; the peak memory counter reset first)."""
    cuda = sd.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(sd.device)
    t0 = time.perf_counter()
    out = edit(sd, job.prompts, job.spec, local_blend=job.blend, progress=False, **job.kwargs)
    if cuda:
        torch.cuda.synchronize(sd.device)
    seconds = time.perf_counter() - t0
    return out, seconds


def _image_metrics(src, img, inside) -> dict:
    """The edit against the source: outside the LocalBlend mask (everywhere without one), and inside it."""
    outside = ~inside if inside is not None else None
    return {"psnr_bg": M.psnr(src, img, outside), "ssim_bg": M.ssim(src, img, outside),
            "change_in_mask": M.mean_abs_change(src, img, inside) if inside is not None else float("nan"),
            "mask_fraction": float(inside.mean()) if inside is not None else float("nan")}


def run_batch(sd, cells: list[Cell], metrics_cfg: dict, tokenizer) -> tuple[list[dict], object]:
    """Edit [source, cell 1, cell 2, ...] in one call; each cell's metrics, and the batch's images."""
    job = batch_edit(cells, tokenizer)
    out, seconds = _timed_edit(sd, job)
    mask, blend = None, for_model(job.blend, sd)  # the level edit() made its mask at
    if blend is not None:
        mask = M.blend_mask(blend, out.attention, tokenizer, job.prompts, job.kwargs["num_steps"],
                            sd.unet.sites, out.latents.shape[2:])
    level = blend.level if blend is not None else model_level(sd)  # the IoU reads the maps the mask does
    src = out.images[0]
    th = float(metrics_cfg.get("iou_threshold", 0.3))
    results = []
    for b, cell in enumerate(cells, start=1):
        inside = M.upsample_mask(mask[b], src.shape[:2]) if mask is not None else None
        words = iou_words(cell.settings, metrics_cfg)
        att_iou = (M.attention_iou(out.attention, tokenizer, job.prompts, b, words[0], words[1], th, level)
                   if words is not None else float("nan"))
        results.append(_image_metrics(src, out.images[b], inside) | {
            "latent_l2": M.latent_l2(out.latents[0], out.latents[b]),
            "attention_iou": att_iou,
            "iou_words": [list(w) if isinstance(w, tuple) else w for w in words] if words else None,
            "seconds": seconds / len(cells), "batch_seconds": seconds, "batch_cells": len(cells),
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cuda_max_mib": _peak_cuda_mib(sd.device), "device": str(sd.device),
        })
    return results, out.images
