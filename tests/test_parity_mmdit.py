"""models/mmdit.py against diffusers' SD3Transformer2DModel (the test oracle) on random weights: SD3's shape
(context_pre_only last block) and SD3.5-medium's (qk RMS-norm, dual-attention `attn2` blocks), loaded
strictly from diffusers' own state dict; an identity attn_override is bit-identical to none; the sites
count attn2 layers as the official MM-DiT Prompt-to-Prompt does."""
from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel

from models.mmdit import SD3Config, SD3Transformer

TINY = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=40, pooled_projection_dim=24, out_channels=16,
            pos_embed_max_size=16)
SD35 = TINY | dict(num_layers=4, qk_norm="rms_norm", dual_attention_layers=(0, 2))


def pair(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    theirs = SD3Transformer2DModel(**config).eval()
    with torch.no_grad():
        for p in theirs.parameters():  # random norms and gates too (diffusers zero-inits none of them; be sure)
            p.add_(0.1 * torch.randn_like(p))
    ours = SD3Transformer(SD3Config.from_diffusers(dict(theirs.config)))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval(), theirs


def inputs(batch=2, h=8, w=12, text=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, h, w, generator=g), torch.tensor([981.0, 17.5])[:batch],
            torch.randn(batch, text, 40, generator=g), torch.randn(batch, 24, generator=g))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("config", [TINY, SD35], ids=["sd3", "sd35"])
def test_equals_diffusers(config):
    ours, theirs = pair(config)
    x, t, ctx, pooled = inputs()
    with torch.no_grad():
        want = theirs(x, ctx, pooled, t).sample
        got = ours(x, t, ctx, pooled)
    assert got.shape == want.shape == x.shape
    assert rel(got, want) <= 1e-5  # measured: 0.0 (bit-identical) for both
    fresh = SD3Transformer(ours.cfg)  # the position table as built, before loading the file's copy
    assert torch.equal(fresh.pos_embed.pos_embed, theirs.pos_embed.pos_embed)


@pytest.mark.parametrize("config", [TINY, SD35], ids=["sd3", "sd35"])
def test_identity_override_is_bit_identical(config):
    ours, _ = pair(config)
    seen = []

    def identity(site, q, k, v):
        seen.append(site)
        return q, k, v

    x, t, ctx, pooled = inputs()
    with torch.no_grad():
        assert torch.equal(ours(x, t, ctx, pooled, attn_override=identity), ours(x, t, ctx, pooled))
    assert [s.name for s in seen] == [f"transformer_blocks.{i}" for i in range(config["num_layers"])]
    assert all(s.image == slice(0, 24) and s.text == slice(24, 31) and s.grid == (4, 6) for s in seen)


def test_site_indices_follow_diffusers_processors():
    """Quirk 1: a block's index is its position among transformer.attn_processors, attn2 entries included."""
    ours, theirs = pair(SD35)
    names = list(theirs.attn_processors)
    sites = ours.sites(4, 6, 7)
    assert [names[s.index] for s in sites] == [f"transformer_blocks.{i}.attn.processor" for i in range(4)]
    assert [s.index for s in sites] == [0, 2, 3, 5]


def test_override_reaches_every_block():
    ours, _ = pair(TINY)
    x, t, ctx, pooled = inputs()

    def swap_row_values(site, q, k, v):
        return q, k, v.flip(0)

    with torch.no_grad():
        assert not torch.equal(ours(x, t, ctx, pooled, attn_override=swap_row_values), ours(x, t, ctx, pooled))


def test_too_large_latent_is_refused():
    ours, _ = pair(TINY)
    x, t, ctx, pooled = inputs(h=34, w=8)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        ours(x, t, ctx, pooled)
