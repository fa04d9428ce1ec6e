"""`p2p bench pie | eval | report`: PIE-Bench in one command, resumable, sharded over ranks with torchrun.

    p2p bench pie DATA_DIR --method p2p --inversion direct -o results/ [--clip FILE --dino FILE ...]
    p2p bench eval results/ DATA_DIR [--method p2p --inversion direct] [--clip FILE ...]
    p2p bench report results/

`torchrun --nproc_per_node=N -m p2p bench pie ...` shards the pending pictures over the ranks as the sweep
shards its batches (nccl with one GPU per rank, gloo on CPUs), then the measurements likewise; rank 0 writes the
report once every rank is done.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from weights_tools import load_checkpoint
from weights_tools.files import file_sha256
from weights_tools.registry import resolve_checkpoint

from ..config import read_yaml
from ..settings import SOURCE_ROWS, add_flags, flag_values, settings_of, use_threads
from ..sweep.command import DTYPES, dtype_option, load_options, model_option_flags, reading
from .conventions import NAMES as SWITCH_NAMES, Conventions, add_switch_flags, conventions_of, differences, record
from .metrics import METRICS, Evaluator, MetricFiles
from .pie import EDIT_TYPES, read_mapping
from .protocol import EDIT_METHODS, INVERSIONS, Protocol
from .report import report
from .run import run_row
from .score import evaluate_row

FILE_FLAGS = {"dino": "--dino", "clip": "--clip", "lpips_backbone": "--lpips-backbone",
              "lpips_linear": "--lpips-linear"}
OVERRIDES = {"steps": "num_steps", "guidance": "guidance_scale", "num_inner_steps": "num_inner_steps",
             "source_row": "source_row"}


# ------------------------------------------------------------------------------- ranks
@contextlib.contextmanager
def ranks():
    """(rank, world, barrier, device) of this process: one process, or a rank of `torchrun` (a process group:
    nccl with one GPU per rank where there are GPUs, else gloo on the CPU), left when the block ends."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield 0, 1, (lambda: None), "cuda" if cuda else "cpu"
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=12))
    try:
        barrier = (lambda: dist.barrier(device_ids=[local])) if cuda else dist.barrier
        yield dist.get_rank(), dist.get_world_size(), barrier, f"cuda:{local}" if cuda else "cpu"
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------- metric files
def metrics_config(args) -> dict:
    """--metrics-config's keys, every one known: the metric files and the conventions' switches."""
    config = read_yaml(args.metrics_config) if args.metrics_config else {}
    unknown = sorted(set(config) - set(FILE_FLAGS) - set(SWITCH_NAMES))
    if unknown:
        raise ValueError(f"{args.metrics_config}: unknown keys {unknown}; a metrics config names the files "
                         f"{', '.join(FILE_FLAGS)} and the conventions {', '.join(SWITCH_NAMES)} "
                         "(docs/pie-bench-metrics.md)")
    return config


def metric_files(args, config: dict) -> MetricFiles:
    """--dino / --clip / --lpips-backbone / --lpips-linear over --metrics-config's keys of the same names."""
    paths = {k: getattr(args, k) or config.get(k) for k in FILE_FLAGS}
    return MetricFiles(**{k: str(v) if v is not None else None for k, v in paths.items()})


def measurement(args) -> tuple[MetricFiles, Conventions]:
    """The metric files and the conventions the flags and --metrics-config give, checked before anything runs."""
    config = metrics_config(args)
    return metric_files(args, config), conventions_of(args, config, args.metrics_config)


def files_identity(files: MetricFiles) -> dict:
    """What a metric record keeps of the files: each one's path and SHA-256 (changed files measure again)."""
    return {k: None if getattr(files, k) is None else {"path": getattr(files, k), "sha256": file_sha256(getattr(files, k))}
            for k in FILE_FLAGS}


def evaluator(measured: tuple[MetricFiles, Conventions], device: str, log) -> tuple:
    """(Evaluator, the metrics it computes, the files' identity, the conventions' record); each skipped metric's
    reason logged once, and the conventions where they are not the official ones."""
    files, conventions = measured
    ev = Evaluator(files, device=device, conventions=conventions)
    for metric, why in ev.skipped.items():
        log(f"skipping {metric}: {why}")
    if differences(record(conventions)):
        log(f"measuring under conventions other than the official ones: {differences(record(conventions))}")
    return ev, tuple(m for m in METRICS if m not in ev.skipped), files_identity(files), record(conventions)


# ------------------------------------------------------------------------------- commands
def protocol(args) -> Protocol:
    given = {field: getattr(args, flag) for flag, field in OVERRIDES.items() if getattr(args, flag) is not None}
    return Protocol(args.method, args.inversion, **given)


def edit_types(args):
    return None if args.types is None else [t.strip() for t in args.types.split(",") if t.strip()]


def cmd_pie(args) -> int:
    """Edit the pending pictures of one row, measure them, and (rank 0) write the report."""
    measured = measurement(args)  # the metrics config checked before anything runs
    p = protocol(args)
    entries = read_mapping(args.data_dir, edit_types(args))  # every entry checked before a model loads
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit takes a number of pictures >= 1, got {args.limit}")
    if not args.ckpt:
        raise ValueError("give --ckpt: the published rows ran SD v1.4 (P2P, MasaCtrl) and SD v1.5 (PnP) on PIE-Bench's "
                         "512x512 pictures")
    ckpt = args.ckpt
    weights = {"checkpoint": str(resolve_checkpoint(ckpt)), "checkpoint_sha256": file_sha256(resolve_checkpoint(ckpt)),
               "dtype": args.dtype, "reading": reading(DTYPES[args.dtype], load_options(args))}
    with ranks() as (rank, world, barrier, device):
        log = print if rank == 0 else (lambda *a: None)
        scoring = evaluator(measured, device, log) if args.evaluate else None
        sd = load_checkpoint(ckpt, device=device, dtype=DTYPES[args.dtype], **load_options(args))
        run_row(sd, p, entries, args.output, weights, limit=args.limit, rank=rank, world=world, barrier=barrier,
                progress=args.progress, log=log)
        barrier()
        if scoring is not None:
            evaluate_row(args.output, p.row, entries, *scoring, rank=rank, world=world, barrier=barrier,
                         progress=args.progress, log=log)
            barrier()
            if rank == 0:
                report(args.output)
    return 0


def cmd_eval(args) -> int:
    """Measure the edited pictures of one row (--method / --inversion) or of every row in OUT."""
    measured = measurement(args)
    entries = read_mapping(args.data_dir, edit_types(args))
    out = Path(args.output)
    rows = [Protocol(args.method, args.inversion).row] if args.method else edited_rows(out)
    with ranks() as (rank, world, barrier, device):
        log = print if rank == 0 else (lambda *a: None)
        scoring = evaluator(measured, device, log)
        for row in rows:
            evaluate_row(out, row, entries, *scoring, rank=rank, world=world, barrier=barrier, progress=args.progress,
                         log=log)
        barrier()
        if rank == 0:
            report(out)
    return 0


def edited_rows(out: Path) -> list[str]:
    """The rows of a results folder that have edited pictures (ROW/pictures/)."""
    rows = sorted(d.name for d in out.iterdir() if (d / "pictures").is_dir()) if out.is_dir() else []
    if not rows:
        raise ValueError(f"{out} holds no edited pictures (ROW/pictures/): run `p2p bench pie` first")
    return rows


def cmd_report(args) -> int:
    report(args.output)
    return 0


# ------------------------------------------------------------------------------- the parser
def metric_flags(q) -> None:
    g = q.add_argument_group("metric networks (a metric whose file is not given is skipped, saying which file)")
    g.add_argument("--dino", help="DINO's ViT-B/8 weights (dino_vitbase8_pretrain.pth): the structure distance")
    g.add_argument("--clip", help="CLIP ViT-L/14 as transformers saves it (the openai/clip-vit-large-patch14 folder): "
                                  "the three CLIP similarities")
    g.add_argument("--lpips-backbone", dest="lpips_backbone", help="torchvision's SqueezeNet 1.1 (squeezenet1_1-b8a52dc0.pth): LPIPS's backbone")
    g.add_argument("--lpips-linear", dest="lpips_linear", help="LPIPS v0.1's SqueezeNet linear layers (squeeze.pth)")
    g.add_argument("--metrics-config", dest="metrics_config", metavar="YAML",
                   help="a YAML file naming them: dino, clip, lpips_backbone, lpips_linear, and the conventions below "
                        "by their names (" + ", ".join(SWITCH_NAMES) + "); flags win")
    add_switch_flags(q)


def common_flags(q) -> None:
    q.add_argument("--types", help="only these edit types, e.g. 0,1,9 (PIE-Bench's editing_type_id: "
                                   + ", ".join(f"{k} {v}" for k, v in EDIT_TYPES.items()) + ")")
    q.add_argument("--no-progress", dest="progress", action="store_false")
    add_flags(q, settings_of("run"))


def row_flags(q, required: bool) -> None:
    q.add_argument("--method", choices=EDIT_METHODS, required=required, help="the editing method of the row")
    q.add_argument("--inversion", required=required, help="the inversion of the row: " + "; ".join(
        f"{m}: {', '.join(v)}" for m, v in INVERSIONS.items()))


def pie_parser(q) -> None:
    q.add_argument("data_dir", help="PIE-Bench's data folder: mapping_file.json and annotation_images/")
    row_flags(q, True)
    q.add_argument("-o", "--output", required=True, help="results folder (reused: finished pictures are skipped)")
    q.add_argument("--ckpt", help="the model (a .safetensors / .ckpt file or diffusers folder): SD v1.4 for the "
                                  "published P2P and MasaCtrl rows, SD v1.5 for PnP")
    model_option_flags(q)
    dtype_option(q)
    q.add_argument("--limit", type=int, help="edit at most N pending pictures in this run")
    q.add_argument("--steps", type=int, help="DDIM steps (the protocol's: 50)")
    q.add_argument("--guidance", type=float, help="guidance scale (the protocol's: 7.5)")
    q.add_argument("--num-inner-steps", dest="num_inner_steps", type=int,
                   help="null-text inversion's inner iterations (the protocol's: 10)")
    q.add_argument("--source-row", dest="source_row", choices=SOURCE_ROWS,
                   help="how the source row follows the inversion (default: the inversion's rule; direct: trajectory; "
                        "residual: Direct Inversion's code, adding the stored residuals)")
    q.add_argument("--no-eval", dest="evaluate", action="store_false", help="edit only; measure later with eval")
    common_flags(q)
    metric_flags(q)
    q.set_defaults(func=cmd_pie)


def add_arguments(b: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = b.add_subparsers(dest="bench_command", required=True)
    pie_parser(sub.add_parser("pie", help="invert, edit and measure PIE-Bench's pictures with one row's protocol"))
    e = sub.add_parser("eval", help="measure the edited pictures in a results folder")
    e.add_argument("output", help="the results folder of `p2p bench pie`")
    e.add_argument("data_dir", help="PIE-Bench's data folder")
    row_flags(e, False)
    common_flags(e)
    metric_flags(e)
    e.set_defaults(func=cmd_eval)
    r = sub.add_parser("report", help="the table of every measured row: printed, CSV and JSON")
    r.add_argument("output", help="the results folder")
    r.set_defaults(func=cmd_report)
    return b


def main(argv=None) -> int:
    """`python -m p2p.bench` (what torchrun runs): the same commands as `p2p bench`."""
    args = add_arguments(argparse.ArgumentParser(prog="p2p bench", description=__doc__.splitlines()[0])).parse_args(argv)
    try:
        # --threads; auto splits the idle cores between this machine's ranks
        use_threads(flag_values(args, ["threads"]).get("threads"), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"p2p bench: error: {err}", file=sys.stderr)
        return 2
