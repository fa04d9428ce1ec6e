"""`p2p sweep` / `python -m p2p.sweep`: plan the cells, run this rank's pending batches, merge on rank 0."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from weights_tools import load_checkpoint
from weights_tools.files import file_sha256
from weights_tools.registry import resolve_checkpoint

from ..settings import add_flags, flag_values, settings_of, use_threads
from . import run
from .plan import checkpoint, plan_batches, prepare, shard
from .report import merge

OVERRIDES = settings_of("model", "seed", "sampling")  # settings a sweep's flags override (--ckpt, --steps, ...)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_option(p: argparse.ArgumentParser) -> None:
    """--dtype: the precision the model is loaded in (the sweep's and every `p2p` command's)."""
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="load the model in this precision (default float32); float16 decodes with an fp32 VAE")


def model_option_flags(q) -> None:
    """How a checkpoint is read (`load_checkpoint`'s config, strict, vae, prediction_type, tokenizer): every command
    that loads one."""
    q.add_argument("--model-config", dest="model_config", metavar="YAML",
                   help="the model's architecture when the file carries none: a CompVis / SGM YAML (v2-inference-v.yaml, "
                        "sd_xl_base.yaml) or a configs/ name (sd-v2-v, sd-v2-base); default: the file's own config, "
                        "else its family's (configs/sd-v2-v.yaml or sd-v2-base.yaml by SD 2.x's prediction rule)")
    q.add_argument("--base", help="--ckpt is a UNet alone (SDXL-Lightning, Hyper-SD *_unet.safetensors): the model "
                                  "it runs in (a single file or diffusers folder), whose VAE and text encoders are used")
    q.add_argument("--non-strict", dest="non_strict", action="store_true",
                   help="ignore (and list) checkpoint keys the model does not have: embedding_manager.*, "
                        "first_stage_model.loss.*, lora_* ...")
    q.add_argument("--vae", help="a standalone VAE (.safetensors / .ckpt, e.g. vae-ft-mse-840000-ema-pruned, or a "
                   "diffusers vae/ folder) in place of the checkpoint's own")
    q.add_argument("--prediction-type", dest="prediction_type", choices=["epsilon", "v"],
                   help="what the UNet predicts, when the file does not say it (default: what the file says, "
                        "else epsilon)")
    q.add_argument("--tokenizer", help="LDM-400M: BERT's vocab.txt, which its single file lacks (a diffusers "
                                       "folder's tokenizer/ is found without it)")
    for flag, what in (("--clip-l", "clip_l.safetensors"), ("--clip-g", "clip_g.safetensors"),
                       ("--t5", "t5xxl_fp16.safetensors")):
        q.add_argument(flag, dest=flag[2:].replace("-", "_"), metavar="FILE",
                       help=f"SD3 / Flux single files: the text encoder's own file ({what}) where the model file lacks "
                            "it (a diffusers folder given as --base also gives it, and the tokenizers)")


def load_options(args) -> dict:
    """load_checkpoint's keywords from model_option_flags' flags."""
    return {"config": args.model_config, "base": args.base, "strict": not args.non_strict, "vae": args.vae,
            "prediction_type": args.prediction_type, "tokenizer": args.tokenizer, "clip_l": args.clip_l,
            "clip_g": args.clip_g, "t5": args.t5}


def _run_batches(out_dir: Path, batches, ab: dict, sd, device, dtype, bar, identity: dict, load: dict) -> None:
    """Each batch on its checkpoint (`sd` when given; else loaded in `dtype` with `load`'s options, one
    kept at a time), its cells saved with the SHA-256 of that checkpoint's bytes (`identity`). Words
    become token positions with the model's own tokenizer."""
    models = {}
    for batch in batches:
        model = sd
        if model is None:
            if checkpoint(batch) not in models:
                models.clear()
                models[checkpoint(batch)] = load_checkpoint(checkpoint(batch), device=device, dtype=dtype, **load)
            model = models[checkpoint(batch)]
        results, images = run.run_batch(model, batch, ab["metrics"], model.tokenizer)
        for b, (cell, m) in enumerate(zip(batch, results), start=1):
            run.save_cell(out_dir, cell, m, images[0], images[b], identity[checkpoint(batch)] | model_identity(model))
        bar.update(len(batch))


def run_sweep(config, out_dir, overrides=None, *, sd=None, progress=True, rank=0, world=1, barrier=None,
              device=None, dtype=torch.float32, log=print, load: dict | None = None) -> list[dict] | None:
    """Run the cells of this rank that are not done, then (rank 0) merge. `sd`: a model already loaded
    (its checkpoint must be the cells' one); else each checkpoint is loaded in `dtype`, with `load`'s
    load_checkpoint options (strict, vae, prediction_type, tokenizer). Returns the merged records on rank 0."""
    out_dir = Path(out_dir)
    ab, cells, _ = prepare(config, overrides, (load or {}).get("tokenizer"))  # every cell checked before the folder is touched
    with (run_folder_lock(out_dir) if rank == 0 else contextlib.nullcontext()):
        return _run_cells(ab, cells, out_dir, sd, progress, rank, world, barrier, device, dtype, log, load or {})


@contextlib.contextmanager
def run_folder_lock(out_dir: Path):
    """One sweep at a time in a run folder (two would compute every cell twice): an exclusive lock on
    OUT/.lock for the whole run, released when it ends or its process dies."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another sweep is writing {out_dir} (it holds {out_dir / '.lock'}); wait for it to "
                             "finish, or give another -o") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def reading(dtype, load: dict) -> dict:
    """How a checkpoint is loaded, beside its bytes (the files the options name hashed): a cell made
    another way is not done."""
    files = {k: load.get(k) and str(load[k]) for k in ("vae", "tokenizer")}
    return {"dtype": str(dtype).removeprefix("torch."), "strict": load.get("strict", True),
            "prediction_type": load.get("prediction_type"), **files,
            **{f"{k}_sha256": v and file_sha256(v) for k, v in files.items()}}


def model_identity(sd) -> dict:
    """What a loaded model says of how it was read: its dtype and a digest of its resolved config
    (prediction type, VAE scale, towers...). A cell's record holds it; a sweep given a model matches on it."""
    return {"dtype": str(sd.dtype).removeprefix("torch."),
            "model_config": hashlib.sha256(repr(sd.cfg).encode()).hexdigest()[:16]}


def _run_cells(ab, cells, out_dir: Path, sd, progress, rank, world, barrier, device, dtype, log, load: dict):
    how = {"reading": reading(dtype, load)} if sd is None else model_identity(sd)
    identity = {c.settings["ckpt"]: {"checkpoint_sha256": file_sha256(resolve_checkpoint(c.settings["ckpt"])), **how}
                for c in cells}
    pending = [c for c in cells if not run.is_done(out_dir, c, identity[c.settings["ckpt"]])]
    if rank == 0:
        run.write_cell_configs(out_dir, cells)
        stale = sum(run.is_done(out_dir, c) for c in pending)  # done, but on other weights or read otherwise
        log(f"{ab['name']}: {len(cells)} cells, {len(cells) - len(pending)} done, {len(pending)} to run"
            + (f" ({stale} of them again: their checkpoint file changed since they ran, or how it is read)"
               if stale else "")
            + (f" on {world} ranks" if world > 1 else ""))
    if barrier:
        barrier()
    batches = shard(plan_batches(pending, ab["batch_size"]), rank, world)
    bar = tqdm(total=sum(map(len, batches)), desc=f"cells (rank {rank})" if world > 1 else "cells",
               disable=not progress, position=rank, unit="cell")
    _run_batches(out_dir, batches, ab, sd, device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype,
                 bar, identity, load)
    bar.close()
    if barrier:
        barrier()
    if rank != 0:
        return None
    records = merge(out_dir, ab, cells)
    log(f"wrote {out_dir / 'figure.png'}, {out_dir / 'metrics.csv'}, {out_dir / 'metrics.json'} "
        f"and {len(cells)} cell configs in {out_dir / 'cells'}")
    return records


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", help="configs/ablations/NAME.yaml")
    p.add_argument("-o", "--output", required=True,
                   help="run folder, e.g. runs/NAME (reused: finished cells are skipped)")
    add_flags(p.add_argument_group("settings that override the config's"), OVERRIDES, defaults=False)
    p.add_argument("--batch-size", dest="batch_size", type=int, help="most cells in one batch (default 8)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    dtype_option(p)
    model_option_flags(p)
    add_flags(p, settings_of("run"))
    return p


def _run_distributed(args, overrides: dict) -> None:
    """One rank of `torchrun`: nccl with one GPU per rank where there are GPUs, else gloo on the CPU."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=12))
    try:
        barrier = (lambda: dist.barrier(device_ids=[local])) if cuda else dist.barrier
        run_sweep(args.config, args.output, overrides, progress=args.progress, rank=dist.get_rank(),
                  world=dist.get_world_size(), barrier=barrier, device=f"cuda:{local}" if cuda else "cpu",
                  dtype=DTYPES[args.dtype], load=load_options(args),
                  log=print if dist.get_rank() == 0 else (lambda *a: None))
    finally:
        dist.destroy_process_group()


def run_from_args(args) -> int:
    # --threads; auto splits the idle cores between this machine's ranks
    use_threads(flag_values(args, ["threads"]).get("threads"), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    overrides = flag_values(args, [s.name for s in OVERRIDES]) | {"batch_size": args.batch_size}
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        run_sweep(args.config, args.output, overrides, progress=args.progress, dtype=DTYPES[args.dtype],
                  load=load_options(args))
    else:
        _run_distributed(args, overrides)
    return 0


def main(argv=None) -> int:
    description = sys.modules[__package__].__doc__.splitlines()[0]
    args = add_arguments(argparse.ArgumentParser(prog="p2p sweep", description=description)).parse_args(argv)
    try:
        return run_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"p2p sweep: error: {err}", file=sys.stderr)
        return 2
