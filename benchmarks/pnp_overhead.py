"""Plug-and-Play overhead: a PnP edit's denoising loop vs the plain generation loop of the same batch.

SD v1.5-size model (~1.07B parameters, fp32) with seeded random weights (edit_overhead.build_model), two
prompts with classifier-free guidance (a UNet batch of 4), run side by side in one process, interleaved
(a, p, a, p, ...), medians over the repeats:

  (a) generate   p2p.pipeline.denoise with no controller: fused attention everywhere (the baseline), the
                 unconditional rows "" and the negative prompt, as the PnP run's
  (p) pnp        the same loop with PlugAndPlay(feature_steps=1.0, attention_steps=1.0) (every step injects:
                 the worst case) and the per-step source-row correction an inversion's path makes

Memory: each variant's loop runs once more in a fresh subprocess reading ru_maxrss before and after it
(what the loop adds over the weights).

    python benchmarks/pnp_overhead.py                     # 256x256, 2 steps, 2 repeats
    python benchmarks/pnp_overhead.py --size 512          # the design's setting (slow on a CPU)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from edit_overhead import build_model, maxrss_bytes, timed  # noqa: E402
from p2p import PlugAndPlay  # noqa: E402
from p2p.control import Controller  # noqa: E402
from p2p.pipeline import denoise, initial_latent  # noqa: E402

PROMPTS = ["a photo of a red house", "a photo of a stone castle"]
NEGATIVE = "ugly, blurry, black, low res, unrealistic"
SPEC = PlugAndPlay(feature_steps=1.0, attention_steps=1.0)
GUIDANCE, SEED = 7.5, 0


class Setup:
    def __init__(self, sd, size: int, steps: int):
        self.sd, self.steps = sd, steps
        with torch.no_grad():
            self.cond = sd.encode_text(PROMPTS)
            self.uncond = sd.encode_text(["", NEGATIVE])
        self.x_T = initial_latent(sd, SEED, size, size, None, len(PROMPTS))
        g = torch.Generator().manual_seed(1)  # stands in for an inversion's stored latents
        self.path = [torch.randn(self.x_T.shape, generator=g) for _ in range(steps)]

    @torch.no_grad()
    def loop(self, v: str) -> torch.Tensor:
        sd, scheduler = self.sd, self.sd.scheduler(self.steps)
        controller = correction = None
        if v == "p":
            controller = Controller(sd.tokenizer, PROMPTS, SPEC, self.steps, sd.unet.sites, calls=scheduler.calls,
                                    default_side=sd.cfg.image_size)
            correction = lambda i, x: torch.cat([self.path[i], x[1:]])  # noqa: E731
        return denoise(sd, self.cond, self.uncond, self.x_T, scheduler, GUIDANCE, controller, progress=False,
                       correction=correction)


def memory_child(v: str, size: int, steps: int) -> None:
    setup = Setup(build_model(), size, steps)
    before = maxrss_bytes()
    setup.loop(v)
    print(json.dumps({"before": before, "after": maxrss_bytes()}))


def memory(v: str, size: int, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--_memory-child", v, "--size", str(size), "--steps", str(steps)]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="picture side in pixels")
    p.add_argument("--steps", type=int, default=2, help="DDIM steps per loop")
    p.add_argument("--repeats", type=int, default=2, help="timed loops per variant, interleaved")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args.memory_child, args.size, args.steps)
    t0 = time.time()
    setup = Setup(build_model(), args.size, args.steps)
    for v in "ap":
        setup.loop(v)   # warm up
    times = {v: [] for v in "ap"}
    for _ in range(args.repeats):
        for v in "ap":
            times[v].append(timed(setup.loop, v) / args.steps)
    med = {v: statistics.median(t) for v, t in times.items()}
    mem = {} if args.no_memory else {v: memory(v, args.size, args.steps) for v in "ap"}
    print(f"Machine: {platform.platform()}, {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.size}x{args.size}, {args.steps} steps, {args.repeats} repeats, "
          f"{time.time() - t0:.0f} s in all\n")
    print("| variant | s / step (loop) | x (a) | loop peak extra (GiB) |\n|---|---:|---:|---:|")
    for v, name in (("a", "(a) plain generation of the batch"), ("p", "(p) Plug-and-Play, every step injecting")):
        extra = (f"{(mem[v]['after'] - mem[v]['before']) / 2**30:.2f}" if mem else "-")
        print(f"| {name} | {med[v]:.2f} | {med[v] / med['a']:.3f} | {extra} |")


if __name__ == "__main__":
    main()
