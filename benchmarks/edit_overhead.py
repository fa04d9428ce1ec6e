"""Edit overhead: a Prompt-to-Prompt edit with LocalBlend vs a plain generation of the same prompts.

SD v1.5-size model (~1.07B parameters, fp32) with seeded random weights, CPU, two prompts with
classifier-free guidance (a UNet batch of 4). Four variants, run side by side in one process,
interleaved (a, b, c, d, a, b, ...), medians over the repeats:

  (a) generate   p2p.generate: plain fused attention everywhere (the baseline)
  (b) edit fast  p2p.edit(Replace, LocalBlend), fast=True, default AttentionStore
  (c) edit maps  the same with fast=False: every map an edit touches is formed
  (d) reference  every attention layer forms the explicit softmax map for every row of the batch
                 and returns M @ v (what the reference's hook does), no edit and no store: a
                 lower bound on the reference's cost (its controller adds a few percent on top)

"loop" times the denoising loop only (`p2p.pipeline.denoise`, text encoded once beforehand, the
controller built inside the timed region as `edit` does); "end to end" times the whole call
(text encoding, loop, VAE decode, uint8). Peak memory: each variant's loop runs once more in a
fresh subprocess, which reads `resource.getrusage(RUSAGE_SELF).ru_maxrss` after building the model
and encoding the prompts, and again after the loop; the table gives the difference (what the loop
adds over the weights) and the process peak.

    python benchmarks/edit_overhead.py                    # 256x256, 2 steps, 2 repeats: ~10 min on 2 idle cores
    python benchmarks/edit_overhead.py --size 512         # the design's setting: slow on CPU (~4x per step)
    python benchmarks/edit_overhead.py --profile          # also: torch.profiler of one loop of (a) and (b)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from models import SDConfig, StableDiffusion, attention_probs, default_tokenizer  # noqa: E402
from p2p import LocalBlend, Replace, edit, generate  # noqa: E402
from p2p.control import Controller  # noqa: E402
from p2p.pipeline import denoise, initial_latent, to_uint8  # noqa: E402

PROMPTS = ["a painting of a squirrel eating a burger", "a painting of a lion eating a burger"]
SPEC = Replace(cross_replace_steps={"default_": 1.0, "lion": 0.4}, self_replace_steps=0.4)
BLEND = LocalBlend(("squirrel", "lion"))
GUIDANCE = 7.5
SEED = 0
VARIANTS = {
    "a": "generate (fused attention)",
    "b": "edit + LocalBlend, fast=True",
    "c": "edit + LocalBlend, fast=False",
    "d": "reference-style: explicit maps everywhere",
}


# ------------------------------------------------------------------------------------- the model
def build_model(seed: int = 0, constant: bool = False) -> StableDiffusion:
    """Full-size SD v1.5 with cheap deterministic random weights: built on the meta device (no
    default init), materialised empty, then norm layers get weight 1 / bias 0 and every other
    tensor N(0, 0.02) from one seeded generator. The pictures are noise; the arithmetic is real.
    constant=True fills 0.02 instead (faster; for the memory runs, whose shapes and hence
    allocations do not depend on the values; every page is still written, so RSS counts it)."""
    with torch.device("meta"):
        sd = StableDiffusion(SDConfig())
    sd.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    norms = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)
    with torch.no_grad():
        for m in sd.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, norms):
                    p.fill_(1.0 if name == "weight" else 0.0)
                else:
                    p.fill_(0.02) if constant else p.normal_(0.0, 0.02, generator=g)
        for b in sd.buffers():   # none in SD v1 today; keep any future buffer defined
            b.zero_()
    return sd.eval()


class ReferenceStyle:
    """The reference's hook, reduced to its cost: every layer, every row forms M = softmax(q k^T / sqrt(d))
    and returns M @ v. No edit, no store (those add ~2.5% in the reference, DESIGN.md)."""

    def override(self, i):
        return lambda site, q, k, v: attention_probs(q, k) @ v

    def step_callback(self, i, x):
        return x


# ------------------------------------------------------------------------------------- one run
class Setup:
    def __init__(self, sd, size: int, steps: int):
        self.sd, self.size, self.steps = sd, size, steps
        with torch.no_grad():
            self.cond = sd.encode_text(PROMPTS)
            self.uncond = sd.encode_text([""])
        self.x_T = initial_latent(sd, SEED, size, size, None, len(PROMPTS))

    def controller(self, v: str):
        if v == "a":
            return None
        if v == "d":
            return ReferenceStyle()
        return Controller(default_tokenizer(), PROMPTS, SPEC, self.steps, self.sd.unet.sites, BLEND, None,
                          fast=(v == "b"))

    @torch.no_grad()
    def loop(self, v: str) -> torch.Tensor:
        """The denoising loop of variant v (controller built inside, as `edit` does)."""
        return denoise(self.sd, self.cond, self.uncond, self.x_T, self.sd.scheduler(self.steps), GUIDANCE,
                       self.controller(v), progress=False)

    @torch.no_grad()
    def end_to_end(self, v: str):
        kw = dict(seed=SEED, num_steps=self.steps, guidance_scale=GUIDANCE, height=self.size, width=self.size,
                  progress=False)
        if v == "a":
            return generate(self.sd, PROMPTS, **kw).images
        if v in "bc":
            return edit(self.sd, PROMPTS, SPEC, local_blend=BLEND, fast=(v == "b"), **kw).images
        # (d): edit()'s body with the reference-style controller (edit() builds its own Controller)
        sd = self.sd
        cond, uncond = sd.encode_text(PROMPTS), sd.encode_text([""])
        z0 = denoise(sd, cond, uncond, self.x_T, sd.scheduler(self.steps), GUIDANCE, ReferenceStyle(), progress=False)
        return to_uint8(sd.decode(z0))


def timed(fn, *a):
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t


def maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024   # Linux reports KiB


def memory_child(v: str, size: int, steps: int) -> None:
    """Runs in a fresh process: peak RSS before and after one loop of variant v, as JSON on stdout."""
    setup = Setup(build_model(constant=True), size, steps)
    before = maxrss_bytes()
    setup.loop(v)
    print(json.dumps({"before": before, "after": maxrss_bytes()}))


def memory(v: str, size: int, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--_memory-child", v, "--size", str(size), "--steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = json.loads(out.strip().splitlines()[-1])
    print(f"memory ({v}): ru_maxrss {m['before'] / 2**30:.2f} GiB after build, {m['after'] / 2**30:.2f} GiB after "
          f"the loop", file=sys.stderr)
    return m


def profile(setup: Setup, variants, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile as prof
    for v in variants:
        with prof(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            setup.loop(v)
        print(f"\n### torch.profiler, one loop of ({v}) {VARIANTS[v]}\n")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
        print(p.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows))


# ------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (512: the design's setting, slow on CPU)")
    ap.add_argument("--steps", type=int, default=2, help="DDIM steps")
    ap.add_argument("--repeats", type=int, default=2, help="timed loop repeats per variant (interleaved)")
    ap.add_argument("--e2e-repeats", type=int, default=1, help="timed end-to-end repeats per variant (interleaved)")
    ap.add_argument("--variants", default="abcd", help="subset of a, b, c, d (a is required)")
    ap.add_argument("--e2e-variants", default="ab", help="variants also timed end to end (a is required)")
    ap.add_argument("--check", action="store_true", help="warm up with a full loop of every variant and "
                    "check fast=True against fast=False (slower start)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--no-memory", action="store_true", help="skip the fresh-subprocess peak-memory runs")
    ap.add_argument("--profile", action="store_true", help="also profile one loop of (a) and (b)")
    ap.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.size, args.steps)
        return
    variants = [v for v in "abcd" if v in args.variants]
    e2e_variants = [v for v in variants if v in args.e2e_variants] if args.e2e_repeats else []
    assert variants[:1] == ["a"] and e2e_variants[:1] in (["a"], []), "the baseline (a) must be among the variants"
    # the memory runs first, each in a fresh process, before this one holds its own 4.3 GB of weights
    mem = {} if args.no_memory else {v: memory(v, args.size, args.steps) for v in variants}

    t0 = time.perf_counter()
    sd = build_model()
    n_params = sum(p.numel() for p in sd.parameters())
    print(f"built SD v1.5-size model ({n_params / 1e9:.3f}B params, fp32) in {time.perf_counter() - t0:.0f}s",
          file=sys.stderr)
    setup = Setup(sd, args.size, args.steps)

    # warm-up (untimed): by default one UNet call through the fast edit override (touches both the
    # fused and the explicit-map kernels); --check runs a full loop of every variant instead
    if args.check:
        outs = {v: setup.loop(v) for v in variants}
        for v, x in outs.items():
            assert torch.isfinite(x).all(), f"variant {v} produced non-finite latents"
        if "b" in outs and "c" in outs:
            print(f"max |fast - plain-map| on z0: {(outs['b'] - outs['c']).abs().max().item():.2e}", file=sys.stderr)
    else:
        with torch.no_grad():
            x = setup.x_T.expand(4, -1, -1, -1)
            ctx = torch.cat([setup.uncond.expand(2, -1, -1), setup.cond])
            out = sd.unet(x, 981, ctx, attn_override=setup.controller("b").override(0))
        assert torch.isfinite(out).all(), "non-finite UNet output: the random init is broken"

    loop = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in variants:
            loop[v].append(timed(setup.loop, v))
        print(f"loop repeat {r + 1}/{args.repeats}: " + ", ".join(f"{v} {loop[v][-1]:.2f}s" for v in variants),
              file=sys.stderr)
    e2e = {v: [] for v in e2e_variants}
    for r in range(args.e2e_repeats if e2e_variants else 0):
        for v in e2e_variants:
            e2e[v].append(timed(setup.end_to_end, v))
        print(f"end-to-end repeat {r + 1}/{args.e2e_repeats}: "
              + ", ".join(f"{v} {e2e[v][-1]:.2f}s" for v in e2e_variants), file=sys.stderr)

    if args.profile:
        profile(setup, [v for v in "ab" if v in variants])

    # ---- report
    med = {v: statistics.median(loop[v]) for v in variants}
    med_e = {v: statistics.median(e2e[v]) for v in e2e_variants}
    gib = 2 ** 30
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    print(f"\n## Edit overhead: SD v1.5-size UNet, random weights, CPU, {args.size}x{args.size}, "
          f"{args.steps} DDIM steps, 2 prompts + guidance (UNet batch 4)\n")
    print(f"Command: `{cmd}`  ")
    print(f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"Python {platform.python_version()}  ")
    print(f"Loop: median of {args.repeats} interleaved repeats; end to end (text encoding + loop + VAE decode): "
          f"median of {args.e2e_repeats}, variants {''.join(e2e_variants) or 'none'}. "
          f"Peak memory: fresh subprocess per variant, ru_maxrss after the loop minus after build + text "
          f"encoding (loop only, no VAE decode).\n")
    hdr = "| variant | s / step (loop) | x (a) | end to end s | x (a) |"
    sep = "|---|---:|---:|---:|---:|"
    if mem:
        hdr += " loop peak extra GiB | process peak GiB |"
        sep += "---:|---:|"
    print(hdr)
    print(sep)
    for v in variants:
        row = f"| ({v}) {VARIANTS[v]} | {med[v] / args.steps:.2f} | {med[v] / med['a']:.3f} |"
        row += (f" {med_e[v]:.2f} | {med_e[v] / med_e['a']:.3f} |" if v in med_e else " - | - |")
        if mem:
            m = mem[v]
            row += f" {(m['after'] - m['before']) / gib:.2f} | {m['after'] / gib:.2f} |"
        print(row)
    print(f"\nAll loop times (s): " + "; ".join(f"{v}: " + ", ".join(f"{t:.2f}" for t in loop[v]) for v in variants))
    print(f"Total benchmark time: {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
