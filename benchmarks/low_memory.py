"""Peak memory of the low-memory mode against the default path: `p2p.generate` and `p2p.edit`
(Replace + LocalBlend) with `low_memory=True, offload=True` and without.

SD v1.5-size model (~1.07B parameters, fp32) with seeded random weights (benchmarks/edit_overhead.py's
`build_model()`), CPU, two prompts with classifier-free guidance: the default path runs the UNet on a
batch of 4, the low-memory one on 2 rows twice, and decodes one image at a time. Each variant runs
once in a fresh subprocess, which reads `resource.getrusage(RUSAGE_SELF).ru_maxrss` after building
the model and again after the whole call (text encoding, loop, VAE decode); the table gives the
difference (what the call adds over the weights) and the process peak. The pictures are noise; the
allocations, which depend on shapes alone, are the real ones. On a CPU
the offload moves nothing (every part is already on the CPU); on a GPU it keeps the text encoder
and VAE off it while the UNet runs.

    python benchmarks/low_memory.py                 # 256x256, 2 steps: a few minutes on 2 idle cores
    python benchmarks/low_memory.py --size 512      # SD's size: slow on CPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from edit_overhead import BLEND, GUIDANCE, PROMPTS, SEED, SPEC, build_model, maxrss_bytes  # noqa: E402
from p2p import edit, generate  # noqa: E402

VARIANTS = {
    "generate": "generate, default",
    "generate-low": "generate, low_memory + offload",
    "edit": "edit + LocalBlend, default",
    "edit-low": "edit + LocalBlend, low_memory + offload",
}


@torch.no_grad()
def run(sd, variant: str, size: int, steps: int):
    low = variant.endswith("-low")
    kw = dict(seed=SEED, num_steps=steps, guidance_scale=GUIDANCE, height=size, width=size, progress=False,
              low_memory=low, offload=low)
    if variant.startswith("generate"):
        return generate(sd, PROMPTS, **kw)
    return edit(sd, PROMPTS, SPEC, local_blend=BLEND, **kw)


def memory_child(variant: str, size: int, steps: int) -> None:
    """Runs in a fresh process: peak RSS after building the model and after one call, and its time, as JSON."""
    sd = build_model()
    before = maxrss_bytes()
    t = time.perf_counter()
    run(sd, variant, size, steps)
    seconds = time.perf_counter() - t
    print(json.dumps({"before": before, "after": maxrss_bytes(), "seconds": seconds}))


def measure(variant: str, size: int, steps: int) -> dict:
    """One variant in a fresh subprocess (see memory_child); progress on stderr."""
    cmd = [sys.executable, __file__, "--_child", variant, "--size", str(size), "--steps", str(steps)]
    result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    print(f"{variant}: {result}", file=sys.stderr)
    return result


def report(mem: dict, args) -> None:
    gib = 2 ** 30
    machine = [platform.platform(), platform.machine(), f"{os.cpu_count()} cores", f"torch {torch.__version__}",
               f"Python {platform.python_version()}"]
    print(f"\n## Low-memory mode: SD v1.5-size model, random weights, CPU fp32, {args.size}x{args.size}, "
          f"{args.steps} DDIM steps, 2 prompts + guidance\n")
    print(f"Command: `python {shlex.join(['benchmarks/low_memory.py', *sys.argv[1:]])}`  ")
    print(f"Machine: {', '.join(machine)}  ")
    print("Peak memory: one fresh subprocess per variant, ru_maxrss after the call (text encoding, loop, VAE "
          "decode) minus after building the model. Time: that one call, not a benchmark of speed.\n")
    print("| variant | call peak extra GiB | x default | process peak GiB | s (one run) |")
    print("|---|---:|---:|---:|---:|")
    for v, m in mem.items():
        extra = (m["after"] - m["before"]) / gib
        base = mem[v.removesuffix("-low")]
        ratio = extra / ((base["after"] - base["before"]) / gib)
        print(f"| {VARIANTS[v]} | {extra:.2f} | {ratio:.2f} | {m['after'] / gib:.2f} | {m['seconds']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=2, help="DDIM steps")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="each -low variant needs its default one")
    ap.add_argument("--_child", dest="child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        memory_child(args.child, args.size, args.steps)
        return
    missing = [v for v in args.variants if v.removesuffix("-low") not in args.variants]
    if missing:
        ap.error(f"{', '.join(missing)} need their default variant ({', '.join(v[:-4] for v in missing)}) too")
    report({v: measure(v, args.size, args.steps) for v in args.variants}, args)


if __name__ == "__main__":
    main()
