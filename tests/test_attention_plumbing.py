"""`attn_override` plumbing: the explicit-map path equals the fused path, and every UNet call visits
the attention sites in the reference order (SD v1: 32 sites; tiny config: the golden 22)."""
import json
from pathlib import Path

import torch

import oracles as O
from models import Site, UNetConfig, UNetModel, attention_probs

GOLDEN_JSON = Path(__file__).parent / "fixtures" / "golden" / "tiny-sd-a.json"


class Recorder:
    """An override that records (site, q shape, k shape) and lets every layer run fused attention."""

    def __init__(self):
        self.calls = []

    def __call__(self, site, q, k, v):
        assert isinstance(site, Site)
        self.calls.append((site, tuple(q.shape), tuple(k.shape)))
        return None


def explicit(site, q, k, v):
    return attention_probs(q, k) @ v  # (B, heads, N, K) @ (B, heads, K, d)


def test_explicit_maps_equal_fused_attention():
    sd = O.ours()
    x, ctx = O.randn(2, 4, 16, 12, seed=30), O.randn(2, 77, 32, seed=31)
    fused = sd.unet(x, 500, ctx)
    rec = Recorder()
    assert torch.equal(sd.unet(x, 500, ctx, attn_override=rec), fused)  # returning None = fused path
    maps = sd.unet(x, 500, ctx, attn_override=explicit)
    diff, scale = O.compare(maps, fused)
    print(f"\n  UNet with explicit softmax maps vs fused SDPA: max|diff| = {diff:.3e}", end="")
    assert diff <= 1e-5 * scale
    # the real forward on a non-square latent sees the right sizes
    assert len(rec.calls) == 22
    for site, qs, ks in rec.calls:
        assert (site.h, site.w) == (16 >> site.level, 12 >> site.level)
        assert qs[2] == site.h * site.w and ks[2] == (77 if site.is_cross else qs[2])


def test_attention_probs_is_a_softmax():
    q, k = O.randn(2, 3, 5, 4, seed=1), O.randn(2, 3, 7, 4, seed=2)
    m = attention_probs(q, k)
    assert m.shape == (2, 3, 5, 7)
    torch.testing.assert_close(m.sum(-1), torch.ones(2, 3, 5))
    torch.testing.assert_close(m, torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1))


def expected_sd_v1_order():
    """(place, level, latent side, is_cross) for SD v1 at a 64x64 latent, as the reference visits them."""
    blocks = [("down", 0)] * 2 + [("down", 1)] * 2 + [("down", 2)] * 2 + [("mid", 3)] \
        + [("up", 2)] * 3 + [("up", 1)] * 3 + [("up", 0)] * 3
    return [(place, lvl, 64 >> lvl, cross) for place, lvl in blocks for cross in (False, True)]


def test_sd_v1_layout_has_32_sites_in_reference_order():
    # The full 860M-parameter UNet on the meta device: shapes flow, no memory is allocated.
    with torch.device("meta"):
        unet = UNetModel(UNetConfig())
        x, ctx = torch.empty(2, 4, 64, 64), torch.empty(2, 77, 768)
    rec = Recorder()
    out = unet(x, torch.tensor([981, 981], device="meta"), ctx, attn_override=rec)
    assert out.shape == (2, 4, 64, 64) and out.is_meta
    got = [(s.place, s.level, s.h, s.is_cross) for s, _, _ in rec.calls]
    assert got == expected_sd_v1_order()
    assert [s.index for s, _, _ in rec.calls] == list(range(32))
    assert all(s.w == s.h for s, _, _ in rec.calls)
    for site, qs, ks in rec.calls:
        ch = 320 * (1, 2, 4, 4)[site.level]
        assert qs == (2, 8, site.h * site.w, ch // 8)  # 8 heads of 40 / 80 / 160
        assert ks[2] == (77 if site.is_cross else site.h * site.w)
    # the sites the UNet announces are the ones it calls, in order
    assert [(s.place, s.level, s.index, s.is_cross) for s in unet.sites] == \
        [(s.place, s.level, s.index, s.is_cross) for s, _, _ in rec.calls]
    assert sum(s.is_cross for s in unet.sites) == 16


def test_tiny_layout_matches_golden_call_order():
    golden = json.loads(GOLDEN_JSON.read_text())["attention_call_order"]
    sd = O.ours()
    with torch.device("meta"):
        unet = UNetModel(sd.cfg.unet)
        x, ctx = torch.empty(1, 4, 32, 32), torch.empty(1, 77, sd.cfg.unet.context_dim)
    rec = Recorder()
    unet(x, 501, ctx, attn_override=rec)
    got = [dict(K=ks[2], N=qs[2], heads=qs[1], is_cross=s.is_cross, place=s.place) for s, qs, ks in rec.calls]
    assert len(got) == 22
    assert got == golden
