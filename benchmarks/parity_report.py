"""Parity report: our SD v1 modules vs independent reference implementations, as a markdown table.

Same seeded random weights on both sides (tiny config; references built with diffusers'/transformers'
own CompVis-layout converters, see tests/oracles.py), fp32, TF32 off, CPU.

    python benchmarks/parity_report.py            # prints the table of docs/parity.md
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import warnings  # noqa: E402

import torch  # noqa: E402

import oracles as O  # noqa: E402
from models import DDIM, attention_probs  # noqa: E402
from p2p import generate  # noqa: E402


def main() -> None:
    t_start = time.time()
    torch.manual_seed(0)
    rows = []

    def add(component, reference, inputs, ours, ref):
        diff, scale = O.compare(ours, ref)
        rows.append((component, reference, inputs, diff, scale))

    sd = O.ours()
    with torch.no_grad():
        # text encoder
        prompts = ["a photo of a cat riding a bicycle", "", "A lion, eating a burger!", " ".join(["word"] * 100)]
        ids = O.hf_ids(prompts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            add("CLIP text encoder (last_hidden_state)", "transformers `CLIPTextModel`",
                "4 prompts (incl. empty, 100 words), our tokenizer", sd.encode_text(prompts),
                O.ref_text_encoder()(ids).last_hidden_state)
        # UNet
        x, ctx = O.randn(2, 4, 16, 12, seed=10), O.randn(2, 77, 32, seed=11)
        unet = O.ref_unet()
        for t in (1, 500, 981):
            add(f"UNet eps, t={t}", "diffusers `UNet2DConditionModel`", "B=2, latent 16x12",
                sd.unet(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample)
        tt = torch.tensor([981, 1])
        add("UNet eps, per-sample t", "diffusers `UNet2DConditionModel`", "B=2, t=[981, 1], latent 16x12",
            sd.unet(x, tt, ctx), unet(x, tt, encoder_hidden_states=ctx).sample)
        add("UNet, explicit softmax maps (attn_override)", "our fused SDPA path", "B=2, latent 16x12, t=500",
            sd.unet(x, 500, ctx, attn_override=lambda s, q, k, v: attention_probs(q, k) @ v), sd.unet(x, 500, ctx))
        # VAE
        vae = O.ref_vae()
        for hw in ((32, 32), (32, 48)):
            img = torch.tanh(O.randn(2, 3, *hw, seed=20))
            add("VAE encode (posterior mean)", "diffusers `AutoencoderKL`", f"B=2, image {hw[0]}x{hw[1]}",
                sd.vae.encode_moments(img)[0], vae.encode(img).latent_dist.mean)
        img = torch.tanh(O.randn(2, 3, 32, 48, seed=20)) * 0.01
        add("VAE encode (posterior mean), low amplitude", "diffusers `AutoencoderKL`",
            "B=2, image 32x48 in [-0.01, 0.01] (GroupNorm eps visible)",
            sd.vae.encode_moments(img)[0], vae.encode(img).latent_dist.mean)
        for hw in ((16, 16), (16, 24)):
            z = O.randn(2, 4, *hw, seed=21)
            add("VAE decode", "diffusers `AutoencoderKL`", f"B=2, latent {hw[0]}x{hw[1]}",
                sd.vae.decode(z), vae.decode(z).sample)
        # DDIM
        for n in (50, 10, 2):
            ours_s, ref_s = DDIM.create(n), O.ref_scheduler(n)
            assert ours_s.timesteps.tolist() == ref_s.timesteps.tolist(), n
            worst = (0.0, 1.0)
            for i, t in enumerate(ours_s.timesteps.tolist()):
                xx, eps = O.randn(2, 4, 8, 6, seed=100 + i), O.randn(2, 4, 8, 6, seed=200 + i)
                d = O.compare(ours_s.step(eps, t, xx), ref_s.step(eps, t, xx, eta=0.0).prev_sample)
                worst = max(worst, d)
            rows.append((f"DDIM step, {n} steps (timesteps identical)", "diffusers `DDIMScheduler`",
                         "every t, random x and eps", *worst))
        s50 = O.ref_scheduler(50)
        add("DDIM alphas_cumprod", "diffusers `DDIMScheduler`", "1000 values", DDIM.create(50).alphas_cumprod,
            s50.alphas_cumprod)
        # the whole loop
        prompts, x_T = O.tiny_generate_inputs(32, 48)
        out = generate(sd, prompts, latents=x_T, num_steps=10, guidance_scale=7.5, height=32, width=48,
                       progress=False)
        pipe = O.ref_pipeline()
        ref_z0 = pipe(prompts, height=32, width=48, num_inference_steps=10, guidance_scale=7.5, eta=0.0,
                      latents=x_T.expand(2, -1, -1, -1).clone(), output_type="latent").images
        add("`p2p.generate` z0 (10 DDIM steps, CFG 7.5)", "diffusers `StableDiffusionPipeline`",
            "2 prompts, same x_T, 32x48 px", out.latents, ref_z0)
        add("`p2p.generate` decoded image", "diffusers `StableDiffusionPipeline` + VAE", "2 prompts, 32x48 px",
            sd.decode(out.latents), pipe.vae.decode(ref_z0 / 0.18215).sample)

    tok_prompts = O.TOKENIZER_PROMPTS
    same = sum(a == b for a, b in zip(O.ours().tokenize(tok_prompts).tolist(), O.hf_ids(tok_prompts).tolist()))

    print("| component | reference implementation | inputs | max \\|diff\\| | reference scale |")
    print("|---|---|---|---|---|")
    for comp, ref, inputs, diff, scale in rows:
        print(f"| {comp} | {ref} | {inputs} | {diff:.2e} | {scale:.3g} |")
    print(f"| tokenizer ids | transformers `CLIPTokenizer` (open_clip BPE, max_length 77) | "
          f"{len(tok_prompts)} ASCII prompts | {same}/{len(tok_prompts)} identical | - |")
    print()
    print(f"Tiny config (configs/tiny.yaml), seeded random weights (tests/oracles.py, seed {O.SEED}), fp32, "
          f"TF32 off, torch {torch.__version__}, CPU. Reference scale = max(1, std(reference)); tolerance "
          f"1e-5 x scale per module, 1e-4 x scale for the whole loop. ({time.time() - t_start:.0f} s)")


def attention_probs(q, k):
    from models import attention_probs
    return attention_probs(q, k)


if __name__ == "__main__":
    main()
