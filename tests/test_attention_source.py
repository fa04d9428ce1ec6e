"""One source for the attention math: `models.attention.attention_probs` is the definition on every path.

A temperature written into attention_probs (softmax(q k^T / (sqrt(d) T))) must reach the pictures of
`generate`, of both edit paths (value side and maps), of the low-memory halves and of an inversion,
exactly as the unchanged code on a model whose to_q weights are scaled by 1/T does; with the stock
definition the fused kernel runs (counted)."""
import copy
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from models import attention
from models.attention import CrossAttention
from p2p import AttentionStore, LocalBlend, Replace, edit, generate, invert

T = 1.7
KW = dict(seed=3, num_steps=4, height=32, width=32, progress=False)
SRC = "a painting of a squirrel eating a burger"
LION = "a painting of a lion eating a burger"
MISMATCH = "no longer matches the fused kernel"

pytestmark = pytest.mark.usefixtures("one_thread")


def tempered_probs(q, k):
    """attention_probs with a temperature T: softmax(q k^T / (sqrt(d) T)), softmax in fp32 as the stock one."""
    sim = torch.einsum("bhnd,bhkd->bhnk", q.float(), k.float()) * q.shape[-1] ** -0.5 / 1.7
    return sim.softmax(dim=-1).to(q.dtype)


def runs(sd):
    """Every path of the library that runs the UNet: its latents."""
    blend = LocalBlend(("squirrel", "lion"), threshold=0.5)
    spec = Replace({"default_": 1.0, "lion": 0.5}, 0.5)
    y, x = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    image = torch.stack([x * 0.8, y * 0.8, (x ** 2 + y ** 2 < 0.4).float() - 0.5])[None]
    inv = invert(sd, image, SRC, method="ddim", num_steps=3, progress=False)
    return {
        "generate": generate(sd, [SRC, LION], **KW).latents,
        "generate low memory": generate(sd, [SRC, LION], low_memory=True, **KW).latents,
        # no stored cross maps but LocalBlend's: the other cross layers run on the value side, self-attention fast
        "edit fast": edit(sd, [SRC, LION], spec, local_blend=blend, store=AttentionStore(cross=False), **KW).latents,
        "edit maps": edit(sd, [SRC, LION], spec, local_blend=blend, fast=False, **KW).latents,
        "edit low memory": edit(sd, [SRC, LION], spec, local_blend=blend, low_memory=True, **KW).latents,
        "inversion": inv.x_T,
        "edit of the inversion": edit(sd, [SRC, LION], spec, inversion=inv, progress=False).latents,
    }


def with_scaled_queries(sd, factor: float):
    """A copy of sd whose every UNet attention to_q weight is multiplied by factor."""
    scaled = copy.deepcopy(sd)
    with torch.no_grad():
        for m in scaled.unet.modules():
            if isinstance(m, CrossAttention):
                m.to_q.weight.mul_(factor)
    return scaled


@contextmanager
def fused_calls_in(unet):
    """Counts F.scaled_dot_product_attention calls made inside unet's forward (the text towers and the
    VAE keep their own fused attention, which is not counted)."""
    count, inside, real, forward = [0], [False], F.scaled_dot_product_attention, unet.forward

    def counted(*a, **kw):
        count[0] += inside[0]
        return real(*a, **kw)

    def counting_forward(*a, **kw):
        inside[0] = True
        try:
            return forward(*a, **kw)
        finally:
            inside[0] = False

    with pytest.MonkeyPatch.context() as m:
        m.setattr(F, "scaled_dot_product_attention", counted)
        m.setattr(unet, "forward", counting_forward)
        yield count


def test_a_temperature_in_attention_probs_reaches_every_path(tiny_sd, monkeypatch):
    stock = runs(tiny_sd)
    want = runs(with_scaled_queries(tiny_sd, 1 / T))
    monkeypatch.setattr(attention, "attention_probs", tempered_probs)
    with pytest.warns(UserWarning, match=MISMATCH):
        assert not attention.fused_matches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fused_calls_in(tiny_sd.unet) as fused:
            got = runs(tiny_sd)
    assert not [w for w in caught if MISMATCH in str(w.message)]   # one warning only: the verdict is kept
    assert fused[0] == 0                     # the explicit form ran everywhere
    for path, z in got.items():
        scale = want[path].abs().max().item()
        torch.testing.assert_close(z, want[path], rtol=0, atol=1e-5 * scale, msg=path)
        assert (z - stock[path]).abs().max() > 1e-3 * scale, path   # the temperature does change it


def test_the_stock_definition_runs_the_fused_kernel(tiny_sd):
    assert attention.fused_matches()
    with fused_calls_in(tiny_sd.unet) as fused:
        generate(tiny_sd, [SRC], **KW)
    sites = len(tiny_sd.unet.sites)
    assert fused[0] == sites * KW["num_steps"]     # every attention layer of every UNet call
    with fused_calls_in(tiny_sd.unet) as fused:
        edit(tiny_sd, [SRC, LION], Replace(0.8, 0.4), store=AttentionStore(cross=False), **KW)
    assert fused[0] >= sites * KW["num_steps"]     # the value-side paths run the fused kernel too


def test_the_verdict_follows_the_function_and_its_code(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "_check_fused", lambda fn: calls.append(fn) or attention._FUSED.setdefault(
        (fn, fn.__code__), True))
    monkeypatch.setattr(attention, "_FUSED", {})
    for _ in range(3):
        attention.fused_matches()
    assert len(calls) == 1                          # checked once, then a dict lookup

    def body_edited(q, k):                          # the body changed in place, as an edit of the file does
        sim = torch.einsum("bhnd,bhkd->bhnk", q.float(), k.float()) * q.shape[-1] ** -0.5 / 1.7
        return sim.softmax(dim=-1).to(q.dtype)

    monkeypatch.undo()
    probs = attention.attention_probs
    monkeypatch.setattr(probs, "__code__", body_edited.__code__)
    with pytest.warns(UserWarning, match=MISMATCH):
        assert not attention.fused_matches()
    monkeypatch.undo()
    assert attention.fused_matches()
