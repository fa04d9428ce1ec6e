"""Peak memory of the VAE's mid-block attention (`models.vae.AttnBlock`, 512 channels, one head over
every latent pixel) with q, k, v passed to `F.scaled_dot_product_attention` as the strided views a
rearrange gives, and as contiguous tensors (what `AttnBlock` passes).

Each variant runs once in a fresh subprocess, which reads `ru_maxrss` after building its inputs and
again after the call; the table gives the difference. On the CPU the strided views make the fused kernel
fall back to forming the whole N x N matrix (N = side**2): 4 * N**2 bytes and more.

    python benchmarks/vae_attention_memory.py               # latent side 96 (768 px): seconds
    python benchmarks/vae_attention_memory.py --side 128
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from einops import rearrange  # noqa: E402

from edit_overhead import maxrss_bytes  # noqa: E402
from models.vae import AttnBlock  # noqa: E402

VARIANTS = {"views": "strided views (before)", "contiguous": "contiguous q, k, v",
            "block": "models.vae.AttnBlock (now)"}
CHANNELS = 512


@torch.no_grad()
def memory_child(variant: str, side: int) -> None:
    """Runs in a fresh process: peak RSS before and after one attention call, as JSON on stdout."""
    torch.manual_seed(0)
    block = AttnBlock(CHANNELS)
    x = torch.randn(1, CHANNELS, side, side)
    y = block.norm(x)
    q, k, v = (rearrange(f(y), "b c h w -> b 1 (h w) c") for f in (block.q, block.k, block.v))
    before = maxrss_bytes()
    if variant == "views":
        F.scaled_dot_product_attention(q, k, v)
    elif variant == "contiguous":
        F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
    else:
        block(x)
    print(json.dumps({"before": before, "after": maxrss_bytes()}))


def measure(variant: str, side: int) -> dict:
    cmd = [sys.executable, __file__, "--_child", variant, "--side", str(side)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", type=int, default=96, help="latent side (pixels / 8)")
    ap.add_argument("--_child", dest="child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        memory_child(args.child, args.side)
        return
    mib, n = 2 ** 20, args.side ** 2
    print(f"VAE mid-block attention, latent {args.side}x{args.side} (N = {n}, the N x N matrix: "
          f"{4 * n * n / mib:.0f} MiB fp32); {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}\n")
    print("| q, k, v | call peak extra MiB |\n|---|---:|")
    for v, label in VARIANTS.items():
        m = measure(v, args.side)
        print(f"| {label} | {(m['after'] - m['before']) / mib:.0f} |")


if __name__ == "__main__":
    main()
