"""Loading memory of the MM-DiT single files: full-size SD3.5-medium and FLUX.1-dev-shaped files, loaded by
`load_checkpoint` (weights_tools.mmdit_files), against their weights.

A fresh process writes the files in the released layouts (constant values, bf16 by default), tensor by tensor
straight to disk (no copy of the model is ever held while writing); another fresh process loads them and
reports `ru_maxrss` before, after, and after every weight has been read once. The claim under test: each part is
built on the meta device and each tensor assigned as it is read (fused q/k/v split from the file's tensor), so
the process holds about one copy of the weights.

    python benchmarks/load_memory_mmdit.py                         # sd3.5-medium, flux-dev-half
    python benchmarks/load_memory_mmdit.py --models sd3.5-medium --dtype float16

- sd3.5-medium: `sd3.5_medium.safetensors` as released (the MM-DiT and the VAE; no text encoders), text=False.
- flux-dev-half: FLUX.1-dev's layout at full width (3072, 24 heads of 128) with 10 of its 19 double blocks and
  19 of its 38 single blocks (6.1B of 11.9B parameters: the whole 23.8 GB bf16 model cannot be held by a 24 GiB
  machine beside anything else), with a full-size ae.safetensors (given as `vae=`); text=False.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from models.config import VAEConfig  # noqa: E402
from models.mmdit import SD3Config  # noqa: E402
from models.vae import AutoencoderKL  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
GIB = 2 ** 30
SD35_MEDIUM = dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                   qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
VAE16 = VAEConfig(z_channels=16, embed_dim=16, use_quant_conv=False, use_post_quant_conv=False)


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def write_safetensors(path: Path, shapes: dict[str, tuple], dtype: torch.dtype) -> int:
    """A safetensors file of constant tensors (0.01), written one tensor at a time; returns its parameters."""
    header, at = {}, 0
    for key, shape in shapes.items():
        n = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for shape in shapes.values():
            f.write(torch.full(shape, 0.01, dtype=dtype).reshape(-1).view(torch.uint8).numpy().tobytes())
    return sum(math.prod(s) for s in shapes.values())


def shapes_of(module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def vae_shapes(prefix: str = "") -> dict[str, tuple]:
    with torch.device("meta"):
        return {prefix + k: s for k, s in shapes_of(AutoencoderKL(VAE16)).items()}


def write_child(model: str, dtype: str, folder: str) -> None:
    """The model's files in `folder`: transformer file first, then its part files."""
    from test_flux_keys import bfl_shapes
    from test_mmdit_full_size import single_file_layout

    d, dt = Path(folder), DTYPES[dtype]
    if model == "sd3.5-medium":
        files = {"sd3.5_medium.safetensors": single_file_layout(SD3Config(**SD35_MEDIUM)) | vae_shapes("first_stage_model.")}
    else:
        files = {"flux1-dev.safetensors": bfl_shapes(double=10, single=19), "ae.safetensors": vae_shapes()}
    params = sum(write_safetensors(d / name, shapes, dt) for name, shapes in files.items())
    print(json.dumps({"params": params, "bytes": sum(os.path.getsize(d / n) for n in files), "files": list(files)}))


def load_child(model: str, dtype: str, folder: str) -> None:
    from weights_tools.mmdit_files import load_mmdit_file

    d = Path(folder)
    before = maxrss()
    t = time.perf_counter()
    if model == "sd3.5-medium":
        m = load_mmdit_file(d / "sd3.5_medium.safetensors", dtype=DTYPES[dtype], text=False)
    else:
        m = load_mmdit_file(d / "flux1-dev.safetensors", dtype=DTYPES[dtype], vae=d / "ae.safetensors", text=False)
    seconds = time.perf_counter() - t
    weights = sum(p.numel() * p.element_size() for p in [*m.parameters(), *m.buffers()])
    after = maxrss()
    with torch.no_grad():
        for p in m.parameters():
            p.sum()
    print(json.dumps({"before": before, "after": after, "touched": maxrss(), "weights": weights, "seconds": seconds,
                      "family": m.family}))


def child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["sd3.5-medium", "flux-dev-half"],
                    choices=["sd3.5-medium", "flux-dev-half"])
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--dir", default=None, help="where the temporary files go (default: the system's)")
    ap.add_argument("--_write", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--_load", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._write:
        return write_child(*args._write)
    if args._load:
        return load_child(*args._load)
    print(f"Command: `python {' '.join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])}`  ")
    print(f"Machine: {platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__}\n")
    print("| files | parameters | files GiB | weights GiB | RSS before load GiB | peak after load GiB "
          "| peak after reading every weight GiB | added (x weights) | load s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            w = child("--_write", name, args.dtype, d)
            m = child("--_load", name, args.dtype, d)
        added = m["touched"] - m["before"]
        print(f"| {name}: {', '.join(w['files'])} | {w['params'] / 1e9:.3f}B | {w['bytes'] / GIB:.2f} | "
              f"{m['weights'] / GIB:.2f} | {m['before'] / GIB:.2f} | {m['after'] / GIB:.2f} | {m['touched'] / GIB:.2f} "
              f"| {added / GIB:.2f} ({added / m['weights']:.2f}) | {m['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
