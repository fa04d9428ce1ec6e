"""The whole loop: our 10-step `p2p.generate` against diffusers' `StableDiffusionPipeline` assembled
offline from the same weights (HF CLIPTokenizer from open_clip's BPE file, DDIMScheduler as SD v1),
same x_T, guidance 7.5, non-square 32x48 px."""
import numpy as np
import pytest
import torch

import oracles as O
from p2p import generate

STEPS, GUIDANCE, H, W = 10, 7.5, 32, 48


@pytest.fixture(scope="module")
def runs():
    sd, pipe = O.ours(), O.ref_pipeline()
    prompts, x_T = O.tiny_generate_inputs(H, W)
    ours = generate(sd, prompts, latents=x_T, num_steps=STEPS, guidance_scale=GUIDANCE, height=H, width=W,
                    progress=False)
    ref_z0 = pipe(prompts, height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0,
                  latents=x_T.expand(len(prompts), -1, -1, -1).clone(), output_type="latent").images
    with torch.no_grad():
        ref_img = pipe.vae.decode(ref_z0 / pipe.vae.config.scaling_factor).sample
    return sd, ours, ref_z0, ref_img


def test_generate_latents_match_pipeline(runs):
    sd, ours, ref_z0, _ = runs
    diff, scale = O.compare(ours.latents, ref_z0)
    msg = f"generate z0 vs StableDiffusionPipeline ({STEPS} steps, cfg {GUIDANCE}): max|diff| = {diff:.3e}, " \
          f"ref scale = {scale:.3f}, tol = {1e-4 * scale:.1e}"
    print("\n  " + msg, end="")
    assert diff <= 1e-4 * scale, msg
    assert (ours.latents[0] - ours.latents[1]).abs().max() > 1e-2, "the two prompts gave the same latents"


def test_generate_images_match_pipeline(runs):
    sd, ours, ref_z0, ref_img = runs
    with torch.no_grad():
        dec = sd.decode(ours.latents)
    diff, scale = O.compare(dec, ref_img)
    msg = f"decoded images ([-1, 1]): max|diff| = {diff:.3e}, ref scale = {scale:.3f}"
    print("\n  " + msg, end="")
    assert diff <= 1e-4 * scale, msg
    # uint8 by truncation (the reference's latent2image); allow 1 LSB where a value sits on an integer edge
    ref_u8 = ((ref_img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    d8 = np.abs(ours.images.astype(int) - ref_u8.astype(int))
    print(f"\n  uint8 images: max|diff| = {d8.max()} LSB, {int((d8 > 0).sum())} of {d8.size} values differ", end="")
    assert ours.images.shape == (2, H, W, 3) and ours.images.dtype == np.uint8
    assert d8.max() <= 1
