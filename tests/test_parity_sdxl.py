"""SDXL end to end on a tiny model (configs/tiny-sdxl.yaml), fp32, against diffusers' own classes built offline
from the same weights (tests/sdxl_oracles.py): the two text towers and their pooled vector as
`StableDiffusionXLPipeline.encode_prompt` gives them, the empty prompt as zeros or as "" encoded, and a whole
10-step generation from the same x_T, latents and pictures."""
import numpy as np
import pytest
import torch

import oracles as O
import sdxl_oracles as X
from models import SDConfig, load_config
from models.sdxl_text import SDXLTextConfig, join_pooled, split_pooled
from p2p import generate

STEPS, GUIDANCE, H, W = 10, 5.0, 32, 48
PROMPTS = ["a photo of a cat riding a bicycle", "a lion eating a burger"]
TOL = 1e-5


def check(name, ours, ref, tol=TOL):
    diff, scale = O.compare(ours, ref)
    msg = f"{name}: max|diff| = {diff:.3e}, ref scale = {scale:.3f}, tol = {tol * scale:.1e}"
    print("\n  " + msg, end="")
    assert diff <= tol * scale, msg


def test_text_conditioning_matches_encode_prompt():
    """Both towers at their penultimate layer, concatenated, and bigG's pooled projection: what the
    pipeline's encode_prompt gives for the prompts, and zeros for its negative (force_zeros_for_empty_prompt)."""
    sd, pipe = X.ours(), X.ref_pipeline()
    context, pooled = split_pooled(sd.encode_text(PROMPTS + [""]), sd.cfg.text.pooled_dim)
    with torch.no_grad():
        ref, neg, ref_pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    assert context.shape == (3, 77, 80) and pooled.shape == (3, 40)
    check("SDXL context (CLIP-L hidden_states[-2] | bigG hidden_states[-2])", context[:2], ref)
    check("SDXL pooled (bigG text_embeds)", pooled[:2], ref_pooled)
    assert torch.equal(context[2], neg[0]) and torch.equal(pooled[2], neg_pooled[0]) and not context[2].any()


def test_empty_prompt_encoded_when_the_config_says_so():
    sd = X.ours()
    cfg = sd.cfg.replace(text=SDXLTextConfig(sd.cfg.text.clip, sd.cfg.text.openclip, zeros_for_empty=False))
    encoding = type(sd)(cfg).eval()
    encoding.load_state_dict(sd.state_dict())
    pipe = X.ref_pipeline(force_zeros=False)
    with torch.no_grad():
        context, pooled = split_pooled(encoding.encode_text([""]), cfg.text.pooled_dim)
        _, neg, _, neg_pooled = pipe.encode_prompt(PROMPTS[:1], device="cpu", do_classifier_free_guidance=True,
                                                   negative_prompt="")
    check('SDXL "" context', context, neg)
    check('SDXL "" pooled', pooled, neg_pooled)
    assert context.abs().max() > 0.1


@pytest.fixture(scope="module")
def runs():
    sd, pipe = X.ours(), X.ref_pipeline()
    f = sd.latent_downsample
    x_T = O.randn(1, 4, H // f, W // f, seed=7)
    ours = generate(sd, PROMPTS, latents=x_T, num_steps=STEPS, guidance_scale=GUIDANCE, height=H, width=W,
                    progress=False)
    with torch.no_grad():
        ref_z0 = pipe(PROMPTS, height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0,
                      latents=x_T.expand(2, -1, -1, -1).clone(), output_type="latent").images
        ref_img = pipe.vae.decode(ref_z0 / pipe.vae.config.scaling_factor).sample
    return sd, ours, ref_z0, ref_img


def test_generate_matches_sdxl_pipeline(runs):
    sd, ours, ref_z0, ref_img = runs
    check(f"SDXL generate z0 vs StableDiffusionXLPipeline ({STEPS} steps, cfg {GUIDANCE}, {H}x{W})",
          ours.latents, ref_z0, 1e-4)
    assert (ours.latents[0] - ours.latents[1]).abs().max() > 1e-2, "the two prompts gave the same latents"
    with torch.no_grad():
        check("SDXL decoded images ([-1, 1], scale factor 0.13025)", sd.decode(ours.latents), ref_img, 1e-4)
    ref_u8 = ((ref_img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    assert ours.images.shape == (2, H, W, 3)
    assert np.abs(ours.images.astype(int) - ref_u8.astype(int)).max() <= 1


def test_size_conditioning_follows_the_picture():
    """y carries the picture's size: the same latents read as another picture size predict differently."""
    sd = X.ours()
    x, context = O.randn(1, 4, 8, 8, seed=3), sd.encode_text(PROMPTS[:1])
    _, y = sd.conditioning(x, context)
    _, y_big = sd.conditioning(O.randn(1, 4, 16, 8, seed=3), context)
    assert y.shape == (1, 40 + 1536) and not torch.equal(y, y_big)
    assert torch.equal(y[:, :40], split_pooled(context, 40)[1])


def test_pooled_row_round_trip_and_tokenizer_paddings():
    context, pooled = O.randn(2, 77, 80), O.randn(2, 40, seed=1)
    joined = join_pooled(context, pooled)
    assert joined.shape == (2, 78, 80) and not joined[:, -1, 40:].any()
    back, p = split_pooled(joined, 40)
    assert torch.equal(back, context) and torch.equal(p, pooled)
    import openclip_oracles as OC
    ids = X.ours().tokenizer(PROMPTS + [""], 77)
    assert ids.shape == (3, 2, 77)
    assert torch.equal(ids[:, 0], O.hf_ids(PROMPTS + [""])) and torch.equal(ids[:, 1], OC.hf_ids_bang(PROMPTS + [""]))


def test_config_round_trip_and_sizes():
    for name in ("tiny-sdxl", "sdxl-base"):
        cfg = load_config(name)
        assert SDConfig.from_ldm(cfg.to_ldm()) == cfg and cfg.family == "sdxl" and cfg.scale_factor == 0.13025
    base = load_config("sdxl-base")
    assert (base.default_height, base.text.context_dim, base.text.pooled_dim) == (1024, 2048, 1280)
    assert base.unet.adm_in_channels == base.text.pooled_dim + 6 * 256


def test_text_config_errors():
    cfg = load_config("tiny-sdxl").text
    with pytest.raises(ValueError, match="text_projection"):
        SDXLTextConfig(cfg.clip, cfg.openclip.__class__(width=48, layers=3, heads=4))
    with pytest.raises(ValueError, match=r"ids \(N, 2, length\)"):
        X.ours().text_encoder(torch.zeros(1, 77, dtype=torch.long))
