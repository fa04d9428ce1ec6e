"""CPU threads: how fast an edit runs with each intra-op thread count, side by side.

Each variant runs in a fresh process (`torch.set_num_threads` before anything else), one warm-up
edit, then timed edits; the variants take turns (1, 2, ..., default, auto, 1, 2, ...) so that a
change in the machine's load falls on all of them alike. The table gives the median seconds per
edit and the load average before and after: on a shared machine the result depends on what the
other processes do, so report it with the numbers.

    python benchmarks/threads.py                              # the miniature, 20 steps, 3 rounds
    python benchmarks/threads.py --ckpt tests/fixtures/golden/tiny-sd-a.safetensors --size 128 --steps 10
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from p2p.settings import auto_threads, cpu_cores  # noqa: E402


def child(a) -> None:
    """One variant: set the threads, load, warm up, time `a.repeats` edits; print JSON."""
    n = {"default": torch.get_num_threads(), "auto": auto_threads()}.get(a.child) or int(a.child)
    torch.set_num_threads(n)
    from p2p import LocalBlend, Replace, edit
    from weights_tools import load_checkpoint

    sd = load_checkpoint(a.ckpt)
    prompts = ["a big yellow triangle on a gray background", "a big white triangle on a gray background"]
    kw = dict(num_steps=a.steps, guidance_scale=5.0, height=a.size, width=a.size, progress=False, seed=3)
    blend = LocalBlend(("yellow", "white"))
    edit(sd, prompts, Replace(), local_blend=blend, **kw)
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        edit(sd, prompts, Replace(), local_blend=blend, **kw)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"variant": a.child, "threads": n, "seconds": times}))


def run_variant(a, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--ckpt", a.ckpt, "--steps", str(a.steps),
           "--repeats", str(a.repeats)] + (["--size", str(a.size)] if a.size else [])
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env | {"TQDM_DISABLE": "1"}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default="miniature")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=None, help="picture side (default: the model's)")
    ap.add_argument("--rounds", type=int, default=3, help="turns of every variant")
    ap.add_argument("--repeats", type=int, default=2, help="timed edits per process")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a)
        return 0
    variants = [str(n) for n in range(1, cpu_cores() + 1)] + ["default", "auto"]
    load0 = os.getloadavg()
    seconds, threads = {v: [] for v in variants}, {}
    for _ in range(a.rounds):
        for v in variants:
            r = run_variant(a, v)
            seconds[v] += r["seconds"]
            threads[v] = r["threads"]
            print(f"{v} ({r['threads']} threads): {', '.join(f'{t:.2f}' for t in r['seconds'])} s, load average "
                  f"{os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    print(f"{a.ckpt}, {a.steps} steps, size {a.size or 'default'}; {cpu_cores()} cores, torch's default "
          f"{torch.get_num_threads()} threads; load average (1, 5, 15 min) {load0[0]:.1f} {load0[1]:.1f} "
          f"{load0[2]:.1f} before, {load1[0]:.1f} {load1[1]:.1f} {load1[2]:.1f} after\n")
    print("| threads | median s / edit | min | max | runs |\n|---|---|---|---|---|")
    for v in variants:
        s = seconds[v]
        name = v if v.isdigit() else f"{v} ({threads[v]})"
        print(f"| {name} | {statistics.median(s):.2f} | {min(s):.2f} | {max(s):.2f} | {len(s)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
