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
  (e) edit + show-attention  (b) with the store `p2p edit --show-attention` keeps (cross and
                 self-attention maps of the layers up to 32x32 latents)
  (l) edit, low memory  (b) in the low-memory mode (the guidance batch as two UNet calls)
  (m) MasaCtrl   p2p.edit(MutualSelfAttention(start_step=0, start_layer=10)): mutual self-attention in
                 blocks 10-15 at every step (their default start_step 4 of 50 steps is active in 92% of them)
  (k) MasaCtrl, mask-guided  (m) with mask_words=("squirrel", "lion") (MaskAuto's masks from the 16x16 maps)

"loop" times the denoising loop only (`p2p.pipeline.denoise`, text encoded once beforehand, the
controller built inside the timed region as `edit` does); "end to end" times the whole call
(text encoding, loop, VAE decode, uint8). Peak memory: each variant's loop runs once more in a
fresh subprocess, which reads `resource.getrusage(RUSAGE_SELF).ru_maxrss` after building the model
and encoding the prompts, and again after the loop; the table gives the difference (what the loop
adds over the weights) and the process peak. On a GPU (`--device cuda`) the peak is
`torch.cuda.max_memory_allocated` over each timed loop, in this process, minus what was allocated
before it.

    python benchmarks/edit_overhead.py                    # 256x256, 2 steps, 2 repeats: ~10 min on 2 idle cores
    python benchmarks/edit_overhead.py --size 512         # the design's setting: slow on CPU (~4x per step)
    python benchmarks/edit_overhead.py --profile          # also: torch.profiler of one loop of (a) and (b)
    python benchmarks/edit_overhead.py --size 512 --steps 5 --variants abe    # self-injection inside the loop
    python benchmarks/edit_overhead.py --device cuda --dtype float16 --size 512 --steps 50 --variants abcdel
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

from models import SDConfig, StableDiffusion, attention_probs  # noqa: E402
from p2p import AttentionStore, LocalBlend, MutualSelfAttention, Replace, edit, generate  # noqa: E402
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
    "e": "edit + LocalBlend + show-attention store",
    "l": "edit + LocalBlend, low-memory mode",
    "m": "MasaCtrl: MutualSelfAttention(0, 10)",
    "k": "MasaCtrl mask-guided (MaskAuto)",
}
MASACTRL = {"m": MutualSelfAttention(0, 10), "k": MutualSelfAttention(0, 10, mask_words=("squirrel", "lion"))}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------- the model
def build_model(seed: int = 0, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """Full-size SD v1.5 with cheap deterministic random weights: built on the meta device (no
    default init), materialised empty, then norm layers get weight 1 / bias 0 and every other
    tensor N(0, 0.02) from one seeded generator. The pictures are noise; the arithmetic is real.
    (Constant weights would be faster to make, but a deep net of them overflows, which the loop's
    finite check refuses; the memory runs use this init too.)"""
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
                    p.normal_(0.0, 0.02, generator=g)
        for b in sd.buffers():   # none in SD v1 today; keep any future buffer defined
            b.zero_()
    return sd.to(device, dtype).eval()


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
        if v in MASACTRL:
            return Controller(self.sd.tokenizer, PROMPTS, MASACTRL[v], self.steps, self.sd.unet.sites,
                              calls=self.sd.scheduler(self.steps).calls, default_side=self.sd.cfg.image_size)
        store = AttentionStore(self_attention=True) if v == "e" else None
        return Controller(self.sd.tokenizer, PROMPTS, SPEC, self.steps, self.sd.unet.sites, BLEND, store,
                          fast=(v != "c"), default_side=self.sd.cfg.image_size)

    @torch.no_grad()
    def loop(self, v: str) -> torch.Tensor:
        """The denoising loop of variant v (controller built inside, as `edit` does)."""
        x = denoise(self.sd, self.cond, self.uncond, self.x_T, self.sd.scheduler(self.steps), GUIDANCE,
                    self.controller(v), progress=False, low_memory=(v == "l"))
        sync(x.device)
        return x

    @torch.no_grad()
    def end_to_end(self, v: str):
        kw = dict(seed=SEED, num_steps=self.steps, guidance_scale=GUIDANCE, height=self.size, width=self.size,
                  progress=False)
        if v == "a":
            return generate(self.sd, PROMPTS, **kw).images
        if v in MASACTRL:
            return edit(self.sd, PROMPTS, MASACTRL[v], **kw).images
        if v in "bcel":
            store = AttentionStore(self_attention=True) if v == "e" else None
            return edit(self.sd, PROMPTS, SPEC, local_blend=BLEND, fast=(v != "c"), store=store,
                        low_memory=(v == "l"), **kw).images
        # (d): edit()'s body with the reference-style controller (edit() builds its own Controller)
        sd = self.sd
        cond, uncond = sd.encode_text(PROMPTS), sd.encode_text([""])
        z0 = denoise(sd, cond, uncond, self.x_T, sd.scheduler(self.steps), GUIDANCE, ReferenceStyle(), progress=False)
        return to_uint8(sd.decode(z0))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_peak(setup: "Setup", v: str) -> dict:
    """Peak CUDA memory of one loop of variant v beyond what was allocated before it (this process)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    setup.loop(v)
    return {"before": before, "after": torch.cuda.max_memory_allocated()}


def timed(fn, *a):
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t


def maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024   # Linux reports KiB


def memory_child(v: str, size: int, steps: int, dtype: str) -> None:
    """Runs in a fresh process: peak RSS before and after one loop of variant v, as JSON on stdout."""
    setup = Setup(build_model(dtype=DTYPES[dtype]), size, steps)
    before = maxrss_bytes()
    setup.loop(v)
    print(json.dumps({"before": before, "after": maxrss_bytes()}))


def memory(v: str, size: int, steps: int, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--_memory-child", v, "--size", str(size), "--steps", str(steps),
           "--dtype", dtype]
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
def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (512: the design's setting, slow on CPU)")
    ap.add_argument("--steps", type=int, default=2, help="DDIM steps")
    ap.add_argument("--repeats", type=int, default=2, help="timed loop repeats per variant (interleaved)")
    ap.add_argument("--e2e-repeats", type=int, default=1, help="timed end-to-end repeats per variant (interleaved)")
    ap.add_argument("--variants", default="abcd", help=f"subset of {''.join(VARIANTS)} (a is required)")
    ap.add_argument("--e2e-variants", default="ab", help="variants also timed end to end (a is required)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (x_T is still drawn on the CPU generator)")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the model's dtype")
    ap.add_argument("--check", action="store_true", help="warm up with a full loop of every variant and "
                    "check fast=True against fast=False (slower start)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--profile", action="store_true", help="also profile one loop of (a) and (b)")
    ap.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


def warm_up(setup: Setup, variants, check: bool) -> None:
    """Untimed: by default one UNet call through the fast edit override (touches both the fused and the
    explicit-map kernels); check: a full loop of every variant, and fast against plain maps."""
    if check:
        outs = {v: setup.loop(v) for v in variants}
        for v, x in outs.items():
            assert torch.isfinite(x).all(), f"variant {v} produced non-finite latents"
        if "b" in outs and "c" in outs:
            print(f"max |fast - plain-map| on z0: {(outs['b'] - outs['c']).abs().max().item():.2e}", file=sys.stderr)
        return
    sd = setup.sd
    with torch.no_grad():
        x = setup.x_T.to(sd.device, sd.dtype).expand(4, -1, -1, -1)
        ctx = torch.cat([setup.uncond.expand(2, -1, -1), setup.cond])
        out = sd.unet(x, 981, ctx, attn_override=setup.controller("b").override(0))
    assert torch.isfinite(out).all(), "non-finite UNet output: the random init is broken"


def interleaved(fn, variants, repeats: int, what: str) -> dict:
    """{variant: [seconds, ...]}: fn(v) timed for v in variants, repeats times, interleaved."""
    times = {v: [] for v in variants}
    for r in range(repeats if variants else 0):
        for v in variants:
            times[v].append(timed(fn, v))
        print(f"{what} repeat {r + 1}/{repeats}: " + ", ".join(f"{v} {times[v][-1]:.2f}s" for v in variants),
              file=sys.stderr)
    return times


def report(args, variants, loop, e2e, mem, t0) -> None:
    med = {v: statistics.median(loop[v]) for v in variants}
    med_e = {v: statistics.median(t) for v, t in e2e.items()}
    gib = 2 ** 30
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    print(f"\n## Edit overhead: SD v1.5-size UNet, random weights, {args.device} {args.dtype}, {args.size}x{args.size}, "
          f"{args.steps} DDIM steps, 2 prompts + guidance (UNet batch 4)\n")
    print(f"Command: `{cmd}`  ")
    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    print(f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"Python {platform.python_version()}  ")
    where = ("torch.cuda.max_memory_allocated over one loop minus allocated before it" if gpu else
             "fresh subprocess per variant, ru_maxrss after the loop minus after build + text encoding")
    print(f"Loop: median of {args.repeats} interleaved repeats; end to end (text encoding + loop + VAE decode): "
          f"median of {args.e2e_repeats}, variants {''.join(e2e) or 'none'}. Peak memory: {where} "
          f"(loop only, no VAE decode).\n")
    print("| variant | s / step (loop) | x (a) | end to end s | x (a) |" + (" loop peak extra GiB | peak GiB |" * bool(mem)))
    print("|---|---:|---:|---:|---:|" + ("---:|---:|" * bool(mem)))
    for v in variants:
        row = f"| ({v}) {VARIANTS[v]} | {med[v] / args.steps:.3f} | {med[v] / med['a']:.3f} |"
        row += (f" {med_e[v]:.2f} | {med_e[v] / med_e['a']:.3f} |" if v in med_e else " - | - |")
        if mem:
            row += f" {(mem[v]['after'] - mem[v]['before']) / gib:.2f} | {mem[v]['after'] / gib:.2f} |"
        print(row)
    print("\nAll loop times (s): " + "; ".join(f"{v}: " + ", ".join(f"{t:.2f}" for t in loop[v]) for v in variants))
    print(f"Total benchmark time: {time.perf_counter() - t0:.0f}s")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.size, args.steps, args.dtype)
        return
    variants = [v for v in VARIANTS if v in args.variants]
    e2e_variants = [v for v in variants if v in args.e2e_variants] if args.e2e_repeats else []
    assert variants[:1] == ["a"] and e2e_variants[:1] in (["a"], []), "the baseline (a) must be among the variants"
    on_gpu = args.device.startswith("cuda")
    # CPU: the memory runs first, each in a fresh process, before this one holds its own weights
    mem = {} if args.no_memory or on_gpu else {v: memory(v, args.size, args.steps, args.dtype) for v in variants}
    t0 = time.perf_counter()
    sd = build_model(device=args.device, dtype=DTYPES[args.dtype])
    print(f"built SD v1.5-size model ({sum(p.numel() for p in sd.parameters()) / 1e9:.3f}B params, {args.dtype}, "
          f"{args.device}) in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    setup = Setup(sd, args.size, args.steps)
    warm_up(setup, variants, args.check)
    loop = interleaved(setup.loop, variants, args.repeats, "loop")
    e2e = interleaved(setup.end_to_end, e2e_variants, args.e2e_repeats, "end-to-end")
    if on_gpu and not args.no_memory:
        mem = {v: gpu_peak(setup, v) for v in variants}
    if args.profile:
        profile(setup, [v for v in "ab" if v in variants])
    report(args, variants, loop, e2e, mem, t0)


if __name__ == "__main__":
    main()
