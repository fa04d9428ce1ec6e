"""Parity of our UNet in its SD 2.x and SDXL shapes with diffusers `UNet2DConditionModel`, tiny sizes,
same random weights, fp32, TF32 off.

SD 2-style: linear proj_in / proj_out and heads of a fixed width, so the head count differs per level.
SDXL-style: no attention at the first level, a transformer depth per level (the middle block takes the
last level's), and the vector conditioning y = [pooled text | six size ids embedded at 256 channels]
through `label_emb` (diffusers: `add_embedding` with addition_embed_type "text_time").
The diffusers model's config comes from our `UNetConfig.to_ldm()` through diffusers' own single-file
config builder, and its weights from our state dict through diffusers' own single-file converter.
Run with `pytest -s` to see the max |diff| of every comparison.
"""
import functools

import pytest
import torch

import oracles as O
from models.config import UNetConfig
from models.sdxl import size_ids, vector_conditioning
from models.unet import UNetModel

sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

TOL = 1e-5  # relative to max(1, std(reference))
PREFIX = "model.diffusion_model."

# heads of 16 channels: 2 / 4 heads at 32 / 64 channels (SD 2.x: 64-channel heads, 5 / 10 / 20)
SD2_TINY = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_heads=-1,
                      num_head_channels=16, context_dim=48, use_linear_in_transformer=True)
# attention at levels 1 and 2 only, 2 and 3 transformer blocks there (SDXL: 2 and 10), heads 4 / 8;
# diffusers' config builder picks "text_time" conditioning only for a context of 1280 or 2048 channels
SDXL_TINY = UNetConfig(model_channels=32, channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_heads=-1,
                       num_head_channels=16, transformer_depth=(1, 2, 3), context_dim=1280,
                       use_linear_in_transformer=True, adm_in_channels=32 + 6 * 256)
CONFIGS = {"sd2": (SD2_TINY, "unet_config"), "sdxl": (SDXL_TINY, "network_config")}


def check(name, ours, ref, tol=TOL):
    diff, scale = O.compare(ours, ref)
    msg = f"{name}: max|diff| = {diff:.3e}, ref scale = {scale:.3f}, tol = {tol * scale:.1e}"
    print("\n  " + msg, end="")
    assert diff <= tol * scale, msg


@functools.lru_cache(maxsize=None)
def pair(family: str):
    """(our UNet with seeded weights, diffusers' UNet converted from our single-file state dict)."""
    from diffusers import UNet2DConditionModel

    cfg, section = CONFIGS[family]
    ours = UNetModel(cfg)
    O.seeded_init_(ours, torch.Generator().manual_seed(O.SEED), qk_gain=1.5)
    ours = ours.float().eval().requires_grad_(False)
    ckpt = {PREFIX + k: v.clone() for k, v in ours.state_dict().items()}
    ldm = {"model": {"params": {section: {"params": cfg.to_ldm(image_size=16)},
                                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    dcfg = sfu.create_unet_diffusers_config_from_ldm(ldm, ckpt)
    ref = UNet2DConditionModel(**dcfg)
    ref.load_state_dict(sfu.convert_ldm_unet_checkpoint(ckpt, dcfg), strict=True)
    return ours, ref.float().eval().requires_grad_(False), dcfg


def inputs(cfg, seed=10):
    # batch 2, non-square latent (h != w), distinct contexts per sample
    return O.randn(2, 4, 16, 12, seed=seed), O.randn(2, 7, cfg.context_dim, seed=seed + 1)


def test_sd2_diffusers_config_has_per_level_heads_and_linear_projections():
    _, ref, dcfg = pair("sd2")
    assert dcfg["use_linear_projection"] and list(dcfg["attention_head_dim"]) == [2, 4]
    heads = [a.transformer_blocks[0].attn1.heads for b in ref.down_blocks for a in b.attentions]
    assert heads == [2, 2, 4, 4]
    assert isinstance(ref.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)


@pytest.mark.parametrize("t", [1, 500, 981])
def test_sd2_unet_matches_diffusers(t):
    ours, ref, _ = pair("sd2")
    x, ctx = inputs(SD2_TINY)
    check(f"SD 2-style UNet eps, t={t}", ours(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample)


def test_sd2_unet_per_sample_timesteps():
    ours, ref, _ = pair("sd2")
    x, ctx = inputs(SD2_TINY)
    t = torch.tensor([981, 1])
    check("SD 2-style UNet eps, t=[981, 1]", ours(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample)


def test_sdxl_diffusers_config_is_sdxl_shaped():
    _, ref, dcfg = pair("sdxl")
    assert dcfg["addition_embed_type"] == "text_time" and dcfg["addition_time_embed_dim"] == 256
    assert dcfg["down_block_types"][0] == "DownBlock2D" and list(dcfg["transformer_layers_per_block"]) == [1, 2, 3]
    assert len(ref.mid_block.attentions[0].transformer_blocks) == 3


def sdxl_call_inputs(height=128, width=96, **sizes):
    """x, ctx, pooled text, and the diffusers pipeline's time ids for a picture of height x width."""
    x, ctx = inputs(SDXL_TINY, seed=30)
    pooled = O.randn(2, 32, seed=32)
    return x, ctx, pooled, torch.tensor([size_ids(height, width, **sizes)] * 2, dtype=torch.float32)


@pytest.mark.parametrize("sizes", [{}, dict(original_size=(1024, 768), crop_top_left=(64, 32),
                                            target_size=(896, 640))], ids=["defaults", "given"])
@pytest.mark.parametrize("t", [1, 981])
def test_sdxl_unet_matches_diffusers(t, sizes):
    ours, ref, _ = pair("sdxl")
    x, ctx, pooled, time_ids = sdxl_call_inputs(**sizes)
    y = vector_conditioning(pooled, 128, 96, **sizes)
    got = ours(x, t, ctx, y=y)
    want = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    check(f"SDXL-style UNet eps, t={t}, sizes {sizes or 'default'}", got, want.sample)


def test_sdxl_pipeline_default_time_ids():
    # diffusers' SDXL pipeline: original_size = target_size = (height, width), crop (0, 0)
    assert size_ids(1024, 768) == [1024, 768, 0, 0, 1024, 768]
    assert size_ids(64, 48, original_size=(80, 60)) == [80, 60, 0, 0, 64, 48]


def test_sdxl_conditioning_matters():
    # a y that cancelled out would pass parity and be useless: pooled text and sizes both change eps
    ours, _, _ = pair("sdxl")
    x, ctx, pooled, _ = sdxl_call_inputs()
    base = ours(x, 500, ctx, y=vector_conditioning(pooled, 128, 96))
    other_sizes = ours(x, 500, ctx, y=vector_conditioning(pooled, 128, 96, crop_top_left=(64, 0)))
    other_text = ours(x, 500, ctx, y=vector_conditioning(pooled.flip(0), 128, 96))
    assert (base - other_sizes).abs().max() > 1e-3 and (base - other_text).abs().max() > 1e-3


def test_sdxl_unet_needs_y_and_sd2_refuses_it():
    sdxl, _, _ = pair("sdxl")
    sd2, _, _ = pair("sd2")
    x, ctx, pooled, _ = sdxl_call_inputs()
    with pytest.raises(ValueError, match=r"needs y of shape \(2, 1568\).*got none"):
        sdxl(x, 1, ctx)
    with pytest.raises(ValueError, match=r"needs y of shape \(2, 1568\).*got \(2, 32\)"):
        sdxl(x, 1, ctx, y=pooled)
    with pytest.raises(ValueError, match="no vector conditioning"):
        sd2(x, 1, inputs(SD2_TINY)[1], y=vector_conditioning(pooled, 128, 96))
    with pytest.raises(ValueError, match="must be pairs"):
        vector_conditioning(pooled, 128, 96, crop_top_left=(0,))
