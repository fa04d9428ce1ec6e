"""`p2p sweep configs/ablations/NAME.yaml -o runs/NAME`: an ablation grid, resumable, sharded over ranks.

The cells are the product of the config's `grid`. Each cell is one source prompt and one edited
prompt with all its knobs resolved; its settings are written to cells/CELL.yaml (a plain edit
config: `p2p edit --config runs/NAME/cells/CELL.yaml -o x.png` reruns it alone).

Shared computation. Every edited row of a Prompt-to-Prompt batch depends only on the source row
and itself (the edit, alpha, equalizer and LocalBlend mask are per edited prompt; the source row
is never edited), so cells that differ only in the edited prompt, the reweight c (a per-prompt
equalizer list) or the edited prompt's LocalBlend word run as one batch
[source, edit_1, edit_2, ...] and the source is computed once. Cells that differ in tau, the
self-attention window or the blend threshold need their own batch: the controller has one
schedule per batch (that could be extended per edited prompt; it is not done here).

Resuming. Each cell's images and metrics are written atomically once its batch finishes
(cells/CELL.json last, holding a hash of the cell's settings): a rerun skips cells whose JSON
matches, so an interrupted run loses at most the batch in flight (`batch_size: 1` makes that one
cell). metrics.csv, metrics.json and figure.png are rebuilt from the per-cell files every time.

Scaling out: `torchrun --nproc_per_node=N -m p2p.sweep CONFIG -o OUT` shards the batches over the
ranks with torch.distributed (nccl on GPUs, gloo on CPUs, one GPU per rank); rank 0 merges.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import EDIT_KEYS, check_settings, load_ablation, set_knob
from weights_tools.files import atomic_path

TIMING_KEYS = ("seconds", "batch_seconds", "batch_cells", "maxrss_mib", "cuda_max_mib", "device")


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


# ------------------------------------------------------------------------------- files
def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


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
    _atomic_write(path, json.dumps(_clean(obj), indent=1, sort_keys=True, default=str).encode())


def _png_bytes(img) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------- the grid
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


def _label(knob, v, base=None) -> str:
    v = _short(knob, v, base or {})
    return f"{knob}={v if not isinstance(v, str) else repr(v) if len(v) < 28 else repr(v[:25] + '...')}"


def expand(ab: dict, tokenizer=None) -> list[Cell]:
    """The cells of an ablation, every one checked (words with the tokenizer) before anything runs."""
    grid, rows, cols = ab["grid"], ab["rows"], ab["cols"]
    row_vals = list(itertools.product(*(grid[k] for k in rows)))
    col_vals = list(itertools.product(*(grid[k] for k in cols)))
    cells = []
    for r, rv in enumerate(row_vals):
        for c, cv in enumerate(col_vals):
            knobs = dict(zip(rows, rv)) | dict(zip(cols, cv))
            s = json.loads(json.dumps(ab["base"]))                  # a deep copy
            for k in grid:                                          # grid order: later knobs win
                set_knob(s, k, knobs[k])
            idx = len(cells)
            name = f"{idx:03d}_" + "_".join(f"{k.split('.')[-1]}-{_slug(_short(k, knobs[k], ab['base']))}"
                                            for k in grid)
            where = f"{ab['path']} (cell {name}: {', '.join(_label(k, knobs[k]) for k in grid)})"
            if len(s.get("edits") or []) != 1:
                raise ValueError(f"{where}: a cell takes exactly one edited prompt, got edits={s.get('edits')!r}; "
                                 f"sweep several with the knob `edit: [prompt, prompt, ...]`")
            for k, v in (s.get("local_blend") or {}).items():
                if k in ("words", "substruct_words") and v and len(v) != 2:
                    raise ValueError(f"{where}: 'local_blend.{k}' needs two words (source, edited), got {v!r}")
            check_settings(s, where, tokenizer)
            if not s.get("ckpt"):
                raise ValueError(f"{ab['path']}: missing 'ckpt': name the checkpoint in the config (ckpt: PATH, "
                                 f"or ckpt: miniature for the shipped one) or pass --ckpt")
            s["description"] = f"{ab['name']} cell {name}: " + ", ".join(_label(k, knobs[k]) for k in grid)
            s = {k: v for k, v in s.items() if k in EDIT_KEYS}
            cells.append(Cell(idx, name, knobs, s, r, c))
    return cells


def batch_key(s: dict) -> str:
    """Cells with equal keys can share one batch: everything but the edited prompt, the reweight c
    values and the edited prompt's blend word must agree."""
    shared = {k: v for k, v in s.items() if k not in ("edits", "equalizer", "local_blend", "description")}
    shared["equalizer_words"] = sorted(s["equalizer"]) if s.get("equalizer") else None
    shared["local_blend"] = {k: v[0] if k in ("words", "substruct_words") and v else v
                             for k, v in (s.get("local_blend") or {}).items()}
    return json.dumps(shared, sort_keys=True, default=str)


def plan_batches(cells: list[Cell], batch_size: int) -> list[list[Cell]]:
    groups: dict[str, list[Cell]] = {}
    for c in cells:
        groups.setdefault(batch_key(c.settings), []).append(c)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def batch_settings(cells: list[Cell]) -> dict:
    """One edit's settings for [source, edit of cell 1, edit of cell 2, ...]."""
    s = dict(cells[0].settings)
    s["edits"] = [c.settings["edits"][0] for c in cells]
    if s.get("equalizer"):
        one = lambda v: v[0] if isinstance(v, list) else v  # noqa: E731
        s["equalizer"] = {w: [one(c.settings["equalizer"][w]) for c in cells] for w in s["equalizer"]}
    if s.get("local_blend"):                        # one word per prompt, source first
        s["local_blend"] = {k: [v[0], *(c.settings["local_blend"][k][1] for c in cells)]
                            if k in ("words", "substruct_words") and v else v for k, v in s["local_blend"].items()}
    return s


# ------------------------------------------------------------------------------- one batch
def iou_words(s: dict, metrics_cfg: dict):
    """(source words, edited words) whose attention IoU is reported, or None."""
    from .config import blend_words
    from .metrics import changed_words

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


def run_batch(sd, cells: list[Cell], metrics_cfg: dict, tokenizer) -> tuple[list[dict], object]:
    import torch

    from . import edit
    from . import metrics as M

    s = batch_settings(cells)
    spec, blend = check_settings(s, "batch", tokenizer)
    prompts = [s["prompt"], *s["edits"]]
    cuda = sd.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(sd.device)
    t0 = time.perf_counter()
    out = edit(sd, prompts, spec, local_blend=blend, seed=s["seed"], num_steps=s["num_steps"],
               guidance_scale=s["guidance_scale"], height=s["height"], width=s["width"], steps_offset=s["steps_offset"],
               progress=False)
    if cuda:
        torch.cuda.synchronize(sd.device)
    seconds = time.perf_counter() - t0
    mask = None
    if blend is not None:
        mask = M.blend_mask(blend, out.attention, tokenizer, prompts, s["num_steps"], sd.unet.sites,
                            out.latents.shape[2:])
    src = out.images[0]
    th = float(metrics_cfg.get("iou_threshold", 0.3))
    results = []
    for b, cell in enumerate(cells, start=1):
        img = out.images[b]
        inside = M.upsample_mask(mask[b], src.shape[:2]) if mask is not None else None
        outside = ~inside if inside is not None else None
        words = iou_words(cell.settings, metrics_cfg)
        att_iou = (M.attention_iou(out.attention, tokenizer, prompts, b, words[0], words[1], th)
                   if words is not None else float("nan"))
        results.append({
            "psnr_bg": M.psnr(src, img, outside),
            "ssim_bg": M.ssim(src, img, outside),
            "change_in_mask": M.mean_abs_change(src, img, inside) if inside is not None else float("nan"),
            "mask_fraction": float(inside.mean()) if inside is not None else float("nan"),
            "latent_l2": M.latent_l2(out.latents[0], out.latents[b]),
            "attention_iou": att_iou,
            "iou_words": [list(w) if isinstance(w, tuple) else w for w in words] if words else None,
            "seconds": seconds / len(cells), "batch_seconds": seconds, "batch_cells": len(cells),
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cuda_max_mib": torch.cuda.max_memory_allocated(sd.device) / 2 ** 20 if cuda else None,
            "device": str(sd.device),
        })
    return results, out.images


def save_cell(out_dir: Path, cell: Cell, metrics: dict, source, image) -> None:
    cells = out_dir / "cells"
    _atomic_write(cells / f"{cell.name}.source.png", _png_bytes(source))
    _atomic_write(cells / f"{cell.name}.png", _png_bytes(image))
    write_json(cells / f"{cell.name}.json", {"cell": cell.name, "index": cell.index, "knobs": cell.knobs,
                                              "row": cell.row, "col": cell.col, "config_hash": cell.hash,
                                              "metrics": metrics})


def is_done(out_dir: Path, cell: Cell) -> bool:
    p = out_dir / "cells" / f"{cell.name}.json"
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return rec.get("config_hash") == cell.hash and (out_dir / "cells" / f"{cell.name}.png").exists()


def write_cell_configs(out_dir: Path, cells: list[Cell]) -> None:
    import yaml

    for c in cells:
        p = out_dir / "cells" / f"{c.name}.yaml"
        text = yaml.safe_dump(c.settings, sort_keys=False, allow_unicode=True).encode()
        if not p.exists() or p.read_bytes() != text:
            _atomic_write(p, text)


# ------------------------------------------------------------------------------- merge
METRIC_COLUMNS = ("psnr_bg", "ssim_bg", "change_in_mask", "mask_fraction", "latent_l2", "attention_iou",
                  "seconds", "batch_seconds", "batch_cells", "maxrss_mib", "cuda_max_mib", "device")


def merge(out_dir: Path, ab: dict, cells: list[Cell]) -> list[dict]:
    """metrics.csv, metrics.json and figure.png from the per-cell files (cells not done are left out)."""
    records = []
    for c in cells:
        p = out_dir / "cells" / f"{c.name}.json"
        if is_done(out_dir, c):
            records.append(json.loads(p.read_text()))
    knobs = list(ab["grid"])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["cell", *knobs, *METRIC_COLUMNS])
    for r in records:
        row = [r["cell"], *(json.dumps(r["knobs"][k]) if not isinstance(r["knobs"][k], (int, float, str))
                            else r["knobs"][k] for k in knobs)]
        w.writerow(row + ["" if r["metrics"].get(m) is None else r["metrics"][m] for m in METRIC_COLUMNS])
    _atomic_write(out_dir / "metrics.csv", buf.getvalue().encode())
    write_json(out_dir / "metrics.json", {"name": ab["name"], "config": str(ab["path"]), "base": ab["base"],
                                          "grid": ab["grid"], "rows": ab["rows"], "cols": ab["cols"],
                                          "metrics_config": ab["metrics"], "cells_total": len(cells),
                                          "cells": records})
    from .viz import save_image

    save_image(figure(out_dir, ab, cells, {r["cell"]: r for r in records}), out_dir / "figure.png")
    return records


def figure(out_dir: Path, ab: dict, cells: list[Cell], records: dict):
    """Rows and columns are the swept values (labelled); the source of each row on the left; each
    edit captioned with its background PSNR / SSIM and attention IoU."""
    from PIL import Image, ImageDraw

    from .viz import _font, _wrap

    n_rows, n_cols = max(c.row for c in cells) + 1, max(c.col for c in cells) + 1
    tiles = {}
    for c in cells:
        if c.name in records:
            tiles[c.name] = Image.open(out_dir / "cells" / f"{c.name}.png").convert("RGB")
    size = max(128, max((t.size[0] for t in tiles.values()), default=128))
    font, small = _font(13), _font(11)
    pad, cap_h = 6, 30 + 13 * any(r["metrics"].get("mask_fraction") is not None for r in records.values())
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    n_head = max([len([ln for k in ab["cols"] for ln in _wrap(probe, _label(k, c.knobs[k], ab["base"]), font, size)])
                  for c in cells] + [1])
    head_h = 18 * n_head + 6
    row_texts = []
    for r in range(n_rows):
        c0 = next(c for c in cells if c.row == r)
        row_texts.append([_label(k, c0.knobs[k], ab["base"]) for k in ab["rows"]])
    label_w = max([int(probe.textlength(t, font=font)) for ts in row_texts for t in ts] + [60]) + 2 * pad
    title = f"{ab['name']}: {ab['base']['prompt']!r}"
    title_h = 24
    W = label_w + (n_cols + 1) * (size + pad) + pad
    H = title_h + head_h + n_rows * (size + cap_h + pad) + pad
    fig = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(fig)
    d.text((pad, 4), title, fill="black", font=font)
    x_src = label_w
    d.text((x_src + 2, title_h + head_h - 18), "source", fill="black", font=font)
    for c in cells:
        if c.row != 0:
            continue
        x = label_w + (c.col + 1) * (size + pad)
        lines = [line for k in ab["cols"] for line in _wrap(probe, _label(k, c.knobs[k], ab["base"]), font, size)]
        for n, line in enumerate(lines):
            d.text((x + 2, title_h + n * 18), line, fill="black", font=font)
    for r in range(n_rows):
        y = title_h + head_h + r * (size + cap_h + pad)
        for n, t in enumerate(row_texts[r]):
            d.text((pad, y + size // 2 - 9 * len(row_texts[r]) + 18 * n), t, fill="black", font=font)
        row_cells = [c for c in cells if c.row == r and c.name in records]
        if row_cells:
            src = Image.open(out_dir / "cells" / f"{row_cells[0].name}.source.png").convert("RGB")
            fig.paste(src.resize((size, size), Image.NEAREST), (x_src, y))
        for c in (c for c in cells if c.row == r):
            x = label_w + (c.col + 1) * (size + pad)
            if c.name not in tiles:
                d.rectangle([x, y, x + size - 1, y + size - 1], outline=(200, 200, 200))
                d.text((x + 8, y + size // 2 - 7), "not run", fill=(150, 150, 150), font=font)
                continue
            fig.paste(tiles[c.name].resize((size, size), Image.NEAREST), (x, y))
            m = records[c.name]["metrics"]
            fmt = lambda v, p: "-" if v is None else v if isinstance(v, str) else f"{v:.{p}f}"  # noqa: E731
            d.text((x, y + size + 2), f"PSNR {fmt(m.get('psnr_bg'), 1)}  SSIM {fmt(m.get('ssim_bg'), 2)}",
                   fill="black", font=small)
            d.text((x, y + size + 15), f"IoU {fmt(m.get('attention_iou'), 2)}  dz {fmt(m.get('latent_l2'), 1)}",
                   fill="black", font=small)
            if m.get("mask_fraction") is not None:
                d.text((x, y + size + 28), f"mask {100 * m['mask_fraction']:.0f}%  in {fmt(m.get('change_in_mask'), 3)}",
                       fill="black", font=small)
    return fig


# ------------------------------------------------------------------------------- driver
def prepare(config, overrides=None):
    """Load and check the ablation and every cell (no model is loaded)."""
    from models.clip import default_tokenizer

    ab = load_ablation(config, overrides)
    tok = default_tokenizer()
    return ab, expand(ab, tok), tok


def load_model(ckpt, device):
    import torch

    from weights_tools import load_checkpoint

    sd = load_checkpoint(ckpt, device=device, dtype=torch.float32)
    sd.requires_grad_(False)
    return sd.eval()


def run_sweep(config, out_dir, overrides=None, *, sd=None, progress=True, rank=0, world=1, barrier=None,
              device=None, log=print) -> list[dict] | None:
    """Run the cells of this rank that are not done, then (rank 0) merge. `sd`: a model already loaded
    (its checkpoint must be the cells' one). Returns the merged records on rank 0."""
    import torch
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    ab, cells, tok = prepare(config, overrides)
    if overrides and overrides.get("batch_size"):
        ab["batch_size"] = overrides["batch_size"]
    pending = [c for c in cells if not is_done(out_dir, c)]
    if rank == 0:
        write_cell_configs(out_dir, cells)
        log(f"{ab['name']}: {len(cells)} cells, {len(cells) - len(pending)} done, {len(pending)} to run"
            + (f" on {world} ranks" if world > 1 else ""))
    if barrier:
        barrier()
    batches = plan_batches(pending, ab["batch_size"])[rank::world]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = {}
    bar = tqdm(total=sum(map(len, batches)), desc=f"cells (rank {rank})" if world > 1 else "cells",
               disable=not progress, position=rank, unit="cell")
    for batch in batches:
        ckpt = batch[0].settings["ckpt"]
        if sd is not None:
            model = sd
        else:
            if ckpt not in models:
                models.clear()
                models[ckpt] = load_model(ckpt, device)
            model = models[ckpt]
        results, images = run_batch(model, batch, ab["metrics"], tok)
        for b, (cell, m) in enumerate(zip(batch, results), start=1):
            save_cell(out_dir, cell, m, images[0], images[b])
        bar.update(len(batch))
    bar.close()
    if barrier:
        barrier()
    if rank == 0:
        records = merge(out_dir, ab, cells)
        log(f"wrote {out_dir / 'figure.png'}, {out_dir / 'metrics.csv'}, {out_dir / 'metrics.json'} "
            f"and {len(cells)} cell configs in {out_dir / 'cells'}")
        return records
    return None


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", help="configs/ablations/NAME.yaml")
    p.add_argument("-o", "--output", required=True, help="run folder, e.g. runs/NAME (reused: finished cells are skipped)")
    p.add_argument("--ckpt", help="checkpoint (overrides the config's ckpt)")
    p.add_argument("--steps", type=int, help="DDIM steps (overrides the config)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int, help="most cells in one batch (default 8)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def run_from_args(args) -> int:
    import torch

    overrides = {k: getattr(args, k) for k in ("ckpt", "height", "width", "batch_size")} | {"num_steps": args.steps}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        run_sweep(args.config, args.output, overrides, progress=args.progress)
        return 0
    import datetime

    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=12))
    try:
        barrier = (lambda: dist.barrier(device_ids=[local])) if cuda else dist.barrier
        run_sweep(args.config, args.output, overrides, progress=args.progress, rank=dist.get_rank(),
                  world=dist.get_world_size(), barrier=barrier, device=f"cuda:{local}" if cuda else "cpu",
                  log=print if dist.get_rank() == 0 else (lambda *a: None))
    finally:
        dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="p2p sweep", description=__doc__.splitlines()[0]))
    args = p.parse_args(argv)
    try:
        return run_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"p2p sweep: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
