"""The Flux transformer against diffusers' FluxTransformer2DModel on the same random weights and inputs: the
golden tiny FLUX.1-dev-like config, diffusers' own tiny test config and a schnell-like one (no guidance
embedding); and the q, k every joint attention sees, against what diffusers' attention receives."""
import json
from pathlib import Path

import pytest
import torch

from models.flux import FluxConfig, FluxTransformer, position_ids

TINY_FLUX = Path(__file__).parent / "fixtures" / "mmdit" / "tiny-flux"
GOLDEN_CONFIG = {k: v for k, v in json.loads((TINY_FLUX / "transformer" / "config.json").read_text()).items()
                 if not k.startswith("_")}
# diffusers' tests/models/transformers/test_models_transformer_flux.py
DIFFUSERS_TEST_CONFIG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                             axes_dims_rope=[4, 4, 8])
SCHNELL_LIKE = dict(GOLDEN_CONFIG, guidance_embeds=False, num_layers=1, num_single_layers=3)
CONFIGS = {"golden": GOLDEN_CONFIG, "diffusers-test": DIFFUSERS_TEST_CONFIG, "schnell-like": SCHNELL_LIKE}


def pair(config: dict, seed: int = 0):
    """diffusers' transformer with random weights (norm weights near 1) and ours loaded from its state dict."""
    from diffusers import FluxTransformer2DModel

    g = torch.Generator().manual_seed(seed)
    ref = FluxTransformer2DModel(**config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1.0 if "norm" in name else 0.0))
    ours = FluxTransformer(FluxConfig.from_diffusers(config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(cfg: FluxConfig, grid=(3, 4), text_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, grid[0] * grid[1], cfg.in_channels, generator=g)
    context = torch.randn(2, text_len, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    t = torch.tensor([0.93, 0.41])
    guidance = torch.tensor([3.5, 3.5]) if cfg.guidance_embeds else None
    return x, t, context, pooled, grid, guidance


def reference(ref, x, t, context, pooled, grid, guidance):
    ids = position_ids(context.shape[1], grid)
    return ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
               img_ids=ids[context.shape[1]:], txt_ids=ids[:context.shape[1]], guidance=guidance).sample


def relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformer_matches_diffusers(name, one_thread):
    ref, ours = pair(CONFIGS[name])
    args = inputs(ours.cfg)
    with torch.no_grad():
        assert relative(ours(*args), reference(ref, *args)) <= 1e-5


def test_identity_override_is_bit_identical_and_visits_every_block_in_order(one_thread):
    _, ours = pair(GOLDEN_CONFIG)
    args = inputs(ours.cfg)
    seen = []

    def identity(site, q, k, v):
        seen.append(site)
        return q, k, v

    with torch.no_grad():
        assert torch.equal(ours(*args, attn_override=identity), ours(*args))
    assert [(s.index, s.name, s.kind) for s in seen] == [
        (0, "transformer_blocks.0", "double"), (1, "transformer_blocks.1", "double"),
        (2, "single_transformer_blocks.0", "single"), (3, "single_transformer_blocks.1", "single")]
    assert all(s.text == slice(0, 7) and s.image == slice(7, 19) and s.grid == (3, 4) and s.heads == 2 for s in seen)


def test_the_override_sees_diffusers_q_and_k_after_norm_and_rope(monkeypatch, one_thread):
    """What joint_attention's override receives is what diffusers' attention receives, [text | image]."""
    from diffusers.models.transformers import transformer_flux

    ref, ours = pair(GOLDEN_CONFIG)
    args = inputs(ours.cfg)
    theirs, mine = [], []
    dispatch = transformer_flux.dispatch_attention_fn

    def recording(query, key, value, **kw):  # diffusers' layout: (B, S, heads, d)
        theirs.append((query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)))
        return dispatch(query, key, value, **kw)

    monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", recording)
    with torch.no_grad():
        reference(ref, *args)
        ours(*args, attn_override=lambda site, q, k, v: mine.append((q, k, v)) or (q, k, v))
    assert len(mine) == len(theirs) == 4
    for a, b in zip(mine, theirs):
        for x, y in zip(a, b):
            assert relative(x, y) <= 1e-6


def test_an_edit_of_the_target_rows_image_queries_moves_only_the_target(one_thread):
    _, ours = pair(GOLDEN_CONFIG)
    args = inputs(ours.cfg)

    def image_qk_from_row_0(site, q, k, v):
        q, k = q.clone(), k.clone()
        q[1:, :, site.image], k[1:, :, site.image] = q[:1, :, site.image], k[:1, :, site.image]
        return q, k, v

    with torch.no_grad():
        plain, edited = ours(*args), ours(*args, attn_override=image_qk_from_row_0)
    assert torch.equal(edited[0], plain[0])
    assert relative(edited[1], plain[1]) > 1e-3
