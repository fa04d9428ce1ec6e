"""Joint edit overhead: Prompt-to-Prompt on an MM-DiT's joint attention vs a plain generation of the same batch.

An SD3.5-medium-shaped transformer (diffusers' stabilityai/stable-diffusion-3.5-medium transformer config:
24 layers, 1536 wide, 24 heads of 64, qk RMS-norm, dual attention layers 0..12, pos_embed_max_size 384,
joint_attention_dim 4096, pooled 2048, caption projection 1536: 2.24B parameters) built on the meta device,
then given seeded random weights (RMS-norm weights 1, the sin-cos position table as the model makes it,
every other tensor N(0, 0.02)); bf16 by default (fp32 with --dtype). The text conditioning is given
directly as random TextCond tensors of SD3's layout (77 CLIP + 256 T5 positions, width 4096; pooled 2048):
the text towers are not what is timed, nor the VAE (a small random one stands in; nothing is decoded).
LocalBlend finds its words with the tokenizers of the tiny SD3 test folder (tests/fixtures/mmdit/tiny-sd3).

Two prompts with classifier-free guidance (a transformer batch of 4), the sampling loop of
p2p.joint_pipeline.joint_denoise on SD3.5's flow schedule (shift 3), its controller built as
p2p.joint_control.joint_edit builds it. Variants, run side by side in one process, interleaved
(a, b, c, a, b, c, ...), each step timed on its own (from the step's override to the end of its LocalBlend):

  (a) generate   the plain loop (the fused attention, models.attention.attend, in every block)
  (b) replace    JointReplace(0.2) ("qiki"), no store (joint_edit's default)
  (c) blend      JointReplace(0.2) + LocalBlend(("cat", "dog")): every joint block's maps in its steps
  (d) store      JointReplace(0.2) + JointAttentionStore(): every block's maps at every step (what
                 joint_edit kept by default before; the attention pictures' cost)
  (e) blend 5    (c) with LocalBlend(blocks=(16, 18, 20, 22, 24)): five blocks' maps in its steps

The schedule has --num-steps steps (5: JointReplace(0.2) replaces step 0; LocalBlend reads and blends in
steps 0 and 1, int(5 * 0.5) = 2); only the first --steps of them run (one transformer call of this size on a
CPU takes about a minute at 512 px), which covers a replaced step, a blend-only step and, from step 2 on,
steps where the controller returns no override, i.e. the plain model's call (asserted below).

    python benchmarks/joint_edit_overhead.py --threads 2                          # 512 px, 2 steps, 2 repeats
    python benchmarks/joint_edit_overhead.py --size 256 --steps 3 --variants abcd
    python benchmarks/joint_edit_overhead.py --size 64 --layers 2 --repeats 1     # a quick smoke run
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from models.config import VAEConfig  # noqa: E402
from models.flow import FlowConfig  # noqa: E402
from models.mmdit import RMSNorm, SD3Config, SD3Transformer, sincos_2d  # noqa: E402
from models.mmdit_model import SD3  # noqa: E402
from models.attention import attend  # noqa: E402
from models.mmdit_text import TextCond  # noqa: E402
from models.tokenizer_json import read_tokenizer  # noqa: E402
from models.vae import AutoencoderKL  # noqa: E402
from p2p import JointAttentionStore, JointReplace, LocalBlend  # noqa: E402
from p2p.joint_control import JointController, image_text_probs, replace_projections, word_maps  # noqa: E402
from p2p.joint_pipeline import initial_joint_latent, joint_denoise  # noqa: E402

PROMPTS = ["a photo of a cat sitting on a red car", "a photo of a dog sitting on a red car"]
SPEC = JointReplace(0.2)
BLEND = LocalBlend(("cat", "dog"))     # blocks None: every joint block; end_blend None: 0.5 of the steps
# five joint blocks (layers 8-12; a dual layer's attn2 takes an index too): LocalBlend reading only these
FEW_BLOCKS = LocalBlend(("cat", "dog"), blocks=(16, 18, 20, 22, 24))
GUIDANCE = 7.0
SEED = 0
TOKENIZERS = ROOT / "tests" / "fixtures" / "mmdit" / "tiny-sd3"
VARIANTS = {
    "a": "generate (fused attention)",
    "b": "edit: JointReplace(0.2)",
    "c": "edit: JointReplace(0.2) + LocalBlend (every block)",
    "d": "edit: JointReplace(0.2) + JointAttentionStore() (every block, every step)",
    "e": "edit: JointReplace(0.2) + LocalBlend (5 blocks)",
}
BLENDS = {"c": BLEND, "e": FEW_BLOCKS}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------- the model
def sd35_medium(layers: int = 24) -> SD3Config:
    """stabilityai/stable-diffusion-3.5-medium's transformer/config.json (layers: fewer for a smoke run)."""
    return SD3Config(sample_size=128, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64,
                     num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                     pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                     dual_attention_layers=tuple(range(min(13, layers))), qk_norm="rms_norm")


def random_transformer(cfg: SD3Config, seed: int, dtype: torch.dtype) -> SD3Transformer:
    """Built on the meta device (no default init), materialised empty in `dtype` (one copy of the weights),
    then: RMS-norm weights 1, the position table the model's own, every other tensor N(0, 0.02) from one
    seeded generator."""
    with torch.device("meta"):
        tr = SD3Transformer(cfg).to(dtype)
    tr.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in tr.modules():
            for p in m.parameters(recurse=False):
                if isinstance(m, RMSNorm):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)
        table = sincos_2d(cfg.width, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size)
        tr.pos_embed.pos_embed.copy_(table.unsqueeze(0))
    return tr.eval()


def build_model(layers: int, dtype: torch.dtype) -> SD3:
    """The SD3 wrapper around the random transformer; its VAE is a small random stand-in (the loop reads only
    its dtype and device). SD3.5's scheduler: static shift 3."""
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16, embed_dim=16,
                                  use_quant_conv=False, use_post_quant_conv=False))
    return SD3(random_transformer(sd35_medium(layers), SEED, dtype), vae.to(dtype), FlowConfig(shift=3.0),
               1.5305, 0.0609).eval()


def random_cond(rows: int, dtype: torch.dtype, seed: int) -> TextCond:
    """A TextCond of SD3's shape: context (rows, 77 + 256, 4096), pooled (rows, 2048)."""
    g = torch.Generator().manual_seed(seed)
    return TextCond(torch.randn(rows, 333, 4096, generator=g).to(dtype), torch.randn(rows, 2048, generator=g).to(dtype))


def layout():
    """SD3's text layout: CLIP-L's 77 positions, then T5's 256 (the tiny folder's tokenizers)."""
    return [(read_tokenizer(TOKENIZERS / "tokenizer"), slice(0, 77)),
            (read_tokenizer(TOKENIZERS / "tokenizer_3"), slice(77, 333))]


# ------------------------------------------------------------------------------------- one run
class Timed:
    """A controller (None: the plain loop) that records each step's seconds, from its override (the step's
    start) to the end of its after_step (velocity, sampler step, LocalBlend), and whether it had an override."""

    def __init__(self, inner):
        self.inner, self.start, self.times, self.overridden = inner, 0.0, {}, {}

    def override(self, i: int):
        self.start = time.perf_counter()
        o = self.inner.override(i) if self.inner is not None else None
        self.overridden[i] = o is not None
        return o

    def after_step(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = self.inner.after_step(i, x) if self.inner is not None else x
        self.times[i] = time.perf_counter() - self.start
        return x


class FirstSteps:
    """The first n steps of a sampler's schedule (the loop runs len(timesteps) steps)."""

    def __init__(self, sampler, n: int):
        self.sampler, self.timesteps = sampler, sampler.timesteps[:n]

    def step(self, v, i, x):
        return self.sampler.step(v, i, x)


class Setup:
    def __init__(self, m: SD3, size: int, num_steps: int, steps: int):
        self.m, self.size, self.num_steps, self.steps = m, size, num_steps, steps
        self.cond, self.uncond = random_cond(2, m.dtype, 1), random_cond(1, m.dtype, 2)
        self.x_T = initial_joint_latent(m, SEED, size, size, None, 2)
        self.layout = layout()

    def controller(self, v: str):
        """The variant's controller, built as joint_edit builds it."""
        if v == "a":
            return None
        store = JointAttentionStore() if v == "d" else None
        ctrl = JointController(PROMPTS, SPEC, self.num_steps, self.layout, BLENDS.get(v), store)
        ctrl.check_blocks(self.m.joint_sites(self.size, self.size))
        return ctrl

    def kinds(self, v: str) -> list[str]:
        """What each timed step of variant v does."""
        ctrl = self.controller(v)
        if ctrl is None:
            return ["plain"] * self.steps
        out = []
        for i in range(self.steps):
            parts = (["replace"] * (i in ctrl.replace_steps) + ["blend maps"] * bool(ctrl.blend and i in ctrl.blend.steps)
                     + ["store maps"] * (ctrl.store is not None))
            out.append(" + ".join(parts) or "plain (no override)")
        return out

    @torch.no_grad()
    def loop(self, v: str) -> dict:
        """{step: seconds} of variant v's loop; a step without an override must be the plain call."""
        timed = Timed(self.controller(v))
        sampler = FirstSteps(self.m.sampler(self.num_steps, self.size, self.size), self.steps)
        x = joint_denoise(self.m, self.cond, self.x_T, sampler, GUIDANCE, self.uncond, timed, progress=False)
        assert torch.isfinite(x).all(), f"variant {v}: non-finite latents"
        kinds = self.kinds(v)
        assert all(timed.overridden[i] == (not k.startswith("plain")) for i, k in enumerate(kinds)), (v, kinds)
        return timed.times


# ------------------------------------------------------------------------------------- one block's parts
def block_parts(m: SD3, size: int, repeats: int) -> dict:
    """{part: median seconds} of one joint block's attention work at this size on random q, k, v of the
    model's shape and dtype (4 rows: [uncond src, uncond tgt, cond src, cond tgt]): the fused attention, the
    conditional rows' image-to-text maps (what a store forms per block), their word maps (what LocalBlend
    forms per block, by the fused kernel) and qiki's copies."""
    site = m.joint_sites(size, size)[0]
    heads, d = m.transformer.cfg.num_attention_heads, m.transformer.cfg.attention_head_dim
    g = torch.Generator().manual_seed(SEED)
    q, k, v = (torch.randn(4, heads, site.text.stop, d, generator=g).to(m.dtype) for _ in range(3))
    alpha = torch.zeros(2, site.text.stop - site.text.start)
    alpha[:, [6, 7, 8, 82, 83, 84]] = 1
    parts = {"fused attention (models.attention.attend)": lambda: attend(q, k, v),
             "image-to-text maps, 2 conditional rows": lambda: image_text_probs(q[2:], k[2:], site),
             "word maps (LocalBlend), 2 conditional rows": lambda: word_maps(q[2:], k[2:], site, alpha),
             "qiki replacement (q, k copies)": lambda: replace_projections("qiki", site, q, k, v, 2, range(3, 4))}
    times = {name: [] for name in parts}
    for _ in range(repeats):
        for name, fn in parts.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(t) for name, t in times.items()}


# ------------------------------------------------------------------------------------- main
def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--num-steps", type=int, default=5, help="steps of the schedule the edit is set for")
    ap.add_argument("--steps", type=int, default=2, help="how many of its first steps run and are timed")
    ap.add_argument("--repeats", type=int, default=2, help="timed loops per variant (interleaved)")
    ap.add_argument("--variants", default="abc", help=f"subset of {''.join(VARIANTS)} (a is required)")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="the transformer's dtype")
    ap.add_argument("--layers", type=int, default=24, help="transformer layers (24: SD3.5-medium; fewer: smoke run)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed first step of (c)")
    ap.add_argument("--parts", type=int, default=5, help="repeats of the per-block parts' timing (0: skip)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return ap.parse_args()


def interleaved(setup: Setup, variants, repeats: int) -> dict:
    """{variant: {step: [seconds, ...]}}: each variant's loop, repeats times, interleaved."""
    times = {v: {i: [] for i in range(setup.steps)} for v in variants}
    for r in range(repeats):
        for v in variants:
            for i, s in setup.loop(v).items():
                times[v][i].append(s)
            print(f"repeat {r + 1}/{repeats} ({v}): " + ", ".join(f"{times[v][i][-1]:.2f}s" for i in times[v]),
                  file=sys.stderr, flush=True)
    return times


def load() -> str:
    return "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def report_parts(parts: dict, blocks: int) -> None:
    if not parts:
        return
    print(f"\nOne joint block's parts (median of the repeats; the model has {blocks} joint blocks):\n")
    print("| part | s per block | s per step, every block |")
    print("|---|---:|---:|")
    for name, s in parts.items():
        print(f"| {name} | {s:.3f} | {s * blocks:.2f} |")


def report(args, setup: Setup, variants, times, loads, t0) -> None:
    med = {v: {i: statistics.median(t) for i, t in times[v].items()} for v in variants}
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    print(f"\n## Joint edit overhead: SD3.5-medium-shaped MM-DiT ({args.layers} layers), random weights, CPU "
          f"{args.dtype}, {args.size}x{args.size}, steps 0..{args.steps - 1} of a {args.num_steps}-step schedule, "
          f"2 prompts + guidance (transformer batch 4)\n")
    print(f"Command: `{cmd}`  ")
    print(f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}  ")
    print(f"Load: {loads[0]} before, {loads[1]} after. Per step: median of {args.repeats} interleaved repeats.\n")
    print("| step | variant | what the step does | s | x (a) |")
    print("|---:|---|---|---:|---:|")
    for i in range(setup.steps):
        for v in variants:
            print(f"| {i} | ({v}) {VARIANTS[v]} | {setup.kinds(v)[i]} | {med[v][i]:.2f} | {med[v][i] / med['a'][i]:.3f} |")
    print("\nAll step times (s): " + "; ".join(
        f"{v}: " + " | ".join(", ".join(f"{t:.2f}" for t in times[v][i]) for i in range(setup.steps)) for v in variants))
    print(f"Total benchmark time: {time.perf_counter() - t0:.0f}s")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in VARIANTS if v in args.variants]
    assert variants[:1] == ["a"], "the baseline (a) must be among the variants"
    loads, t0 = [load()], time.perf_counter()
    m = build_model(args.layers, DTYPES[args.dtype])
    print(f"built the transformer ({sum(p.numel() for p in m.transformer.parameters()) / 1e9:.3f}B params, "
          f"{args.dtype}) in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    setup = Setup(m, args.size, args.num_steps, args.steps)
    if not args.no_warmup:   # untimed: one step through the fused and the explicit-map kernels
        Setup(m, args.size, args.num_steps, 1).loop("c" if "c" in variants else variants[-1])
    times = interleaved(setup, variants, args.repeats)
    parts = block_parts(m, args.size, args.parts) if args.parts else {}
    loads.append(load())
    report(args, setup, variants, times, loads, t0)
    report_parts(parts, len(m.joint_sites(args.size, args.size)))


if __name__ == "__main__":
    main()
