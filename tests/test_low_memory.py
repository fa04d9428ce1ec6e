"""The low-memory mode (`low_memory=True`, `offload=True`) gives the default path's results.

Tolerance, and why not bit for bit: the low-memory loop runs the UNet on B rows twice instead of
2B rows once, and decodes one image at a time; the CPU's conv and matmul kernels block a batch of
B rows differently from one of 2B, so each call differs from the batched one by float rounding
(~1e-6 here). Over the steps the latents stay within 1e-4 of the default path's, and the uint8
pictures differ by at most one level (truncation flips) at a few pixels.

Tiled decoding (and encoding) is exact when the latent fits one tile; above, each tile's GroupNorm statistics and
mid-block attention see that tile only, so the picture is not the whole decode's. Its blending is
checked exactly on a decoder that is local (one output block per latent pixel), and the VAE's
tiled picture is held to a stated mean error.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.sd import decode_tiled, encode_tiled, tile_starts
from p2p import LocalBlend, Refine, Replace, Reweight, edit, generate, invert
from p2p.cli import main

STEPS = 2
KW = dict(num_steps=STEPS, progress=False)
PROMPTS = ["a cat riding a bicycle", "a cat riding a car"]

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_result(a, b):
    """The default path's Output a and the low-memory one's b: equal up to float rounding (module doc)."""
    assert (a.latents - b.latents).abs().max().item() < 1e-4
    diff = np.abs(a.images.astype(int) - b.images.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.05


def test_generate_low_memory_and_offload_equal_default(tiny_sd):
    a = generate(tiny_sd, ["a cat", "a dog on a bike"], **KW)
    b = generate(tiny_sd, ["a cat", "a dog on a bike"], low_memory=True, offload=True, **KW)
    assert_same_result(a, b)
    assert (a.x_T == b.x_T).all()


def test_low_memory_runs_the_unet_on_half_the_rows(tiny_sd):
    rows = []
    hook = tiny_sd.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        edit(tiny_sd, PROMPTS, Replace(), low_memory=True, **KW)
        edit(tiny_sd, PROMPTS, Replace(), **KW)
    finally:
        hook.remove()
    assert rows == [2] * (2 * STEPS) + [4] * STEPS


def test_offload_alone_changes_nothing(tiny_sd):
    """Offloading only moves the text encoder and VAE (to the UNet's device and back): the same arithmetic."""
    a = generate(tiny_sd, "a cat", **KW)
    b = generate(tiny_sd, "a cat", offload=True, **KW)
    assert (a.latents == b.latents).all() and (a.images == b.images).all()
    assert {p.device.type for p in [*tiny_sd.text_encoder.parameters(), *tiny_sd.vae.parameters()]} == {"cpu"}


@pytest.mark.parametrize("spec, blend", [
    (Replace(self_replace_steps=0.5), LocalBlend(("bicycle", "car"), level=0)),
    (Refine(), None),
    (Reweight(equalizer={"car": 3.0}), None),
], ids=["replace+blend", "refine", "reweight"])
def test_edit_low_memory_equals_default(tiny_sd, spec, blend):
    prompts = PROMPTS if not isinstance(spec, Refine) else ["a cat riding a bicycle", "a cat riding a red bicycle"]
    a = edit(tiny_sd, prompts, spec, local_blend=blend, **KW)
    b = edit(tiny_sd, prompts, spec, local_blend=blend, low_memory=True, **KW)
    assert_same_result(a, b)
    # the controller stored the same maps of the conditional rows from the conditional call alone
    assert a.attention.num_steps == b.attention.num_steps == STEPS
    assert a.attention.sums.keys() == b.attention.sums.keys()
    for site in a.attention.layers():
        assert torch.allclose(a.attention.average(site), b.attention.average(site), atol=1e-5)


IMAGE = torch.linspace(-1, 1, 64 * 64 * 3).reshape(1, 3, 64, 64)


@pytest.mark.parametrize("method", ["direct", "null-text"])
def test_inversion_and_its_edit_low_memory_equal_default(tiny_sd, method):
    kw = dict(method=method, num_steps=STEPS, num_inner_steps=2, progress=False)
    inv = invert(tiny_sd, IMAGE, PROMPTS[0], **kw)
    inv_low = invert(tiny_sd, IMAGE, PROMPTS[0], low_memory=True, **kw)
    assert torch.equal(inv.x_T, inv_low.x_T)               # DDIM inversion runs the conditional half alone
    for a, b in zip(inv.residuals or inv.uncond_embeddings, inv_low.residuals or inv_low.uncond_embeddings):
        assert (a - b).abs().max() < 1e-4
    a = edit(tiny_sd, PROMPTS, Replace(), inversion=inv, progress=False)
    b = edit(tiny_sd, PROMPTS, Replace(), inversion=inv, progress=False, low_memory=True, offload=True)
    assert_same_result(a, b)


def test_low_memory_controls_only_the_conditional_call(tiny_sd):
    """An edit in low-memory mode still edits (it is not plain generation), and the unconditional
    call gets no override: its rows would otherwise be counted in the store."""
    plain = generate(tiny_sd, PROMPTS, low_memory=True, **KW)
    edited = edit(tiny_sd, PROMPTS, Replace(cross_replace_steps=1.0, self_replace_steps=1.0), low_memory=True, **KW)
    assert (plain.latents[0] - edited.latents[0]).abs().max() < 1e-4   # the source row is the source
    assert (plain.latents[1] - edited.latents[1]).abs().max() > 1e-3   # the edited row is edited
    site = edited.attention.layers()[0]
    assert edited.attention.average(site).shape[0] == len(PROMPTS)


# ------------------------------------------------------------------------------- decoding
def test_decode_one_image_at_a_time_equals_batched(tiny_sd):
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (tiny_sd.decode(z) - tiny_sd.decode(z, low_memory=True)).abs().max() < 1e-5


def local_decode(z, f=2):
    """A decoder with no reach across latent pixels: 1x1 conv then nearest upsampling by f."""
    w = torch.arange(12.0).reshape(3, 4, 1, 1) / 10
    return F.interpolate(F.conv2d(z, w), scale_factor=f, mode="nearest")


@pytest.mark.parametrize("shape, tile", [((24, 40), 16), ((17, 9), 8), ((8, 8), 8), ((33, 70), 32)])
def test_tile_blending_is_exact_for_a_local_decoder(shape, tile):
    z = torch.randn(1, 4, *shape, generator=torch.Generator().manual_seed(1))
    out = decode_tiled(local_decode, z, tile, tile // 4, 2)
    assert out.shape == (1, 3, 2 * shape[0], 2 * shape[1])
    assert torch.allclose(out, local_decode(z), atol=1e-5)


def test_tile_starts_cover_with_overlap():
    for n, tile, overlap in [(40, 16, 4), (64, 64, 16), (65, 64, 16), (200, 64, 16)]:
        starts = tile_starts(n, tile, overlap)
        assert starts[0] == 0 and min(n, starts[-1] + tile) == n
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(40, 16, 16)


def test_tiled_vae_decode_within_tolerance(tiny_sd):
    """The VAE tiled vs whole: exact when the latent fits a tile; above, mean |diff| 0.0093 measured on
    the random tiny VAE for 24x40 latents in tiles of 32 (images in [-1, 1]); held to 0.02."""
    z = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = tiny_sd.decode(z)
        one_tile = tiny_sd.decode(z, low_memory=True, tile=40)
        assert torch.equal(one_tile, tiny_sd.vae.decode(z / tiny_sd.cfg.scale_factor))
        tiled = tiny_sd.decode(z, low_memory=True, tile=32)
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().mean() < 0.02


def local_encode(x, f=2):
    """An encoder with no reach across latent pixels: average-pool by f, then a 1x1 conv."""
    w = torch.arange(12.0).reshape(4, 3, 1, 1) / 10
    return F.conv2d(F.avg_pool2d(x, f), w)


@pytest.mark.parametrize("shape, tile", [((24, 40), 16), ((17, 9), 8), ((8, 8), 8), ((33, 70), 32)])
def test_tile_blending_is_exact_for_a_local_encoder(shape, tile):
    x = torch.randn(1, 3, 2 * shape[0], 2 * shape[1], generator=torch.Generator().manual_seed(1))
    out = encode_tiled(local_encode, x, tile, tile // 4, 2)
    assert out.shape == (1, 4, *shape)
    assert torch.allclose(out, local_encode(x), atol=1e-5)


def test_tiled_vae_encode_within_tolerance(tiny_sd):
    """The VAE's encoder tiled vs whole: exact when the picture fits a tile; above, mean |diff| 0.0033
    measured on the random tiny VAE for a 24x40-latent picture in tiles of 32 latents (latents of std
    0.12); held to 0.01."""
    f = tiny_sd.latent_downsample
    x = torch.rand(1, 3, 24 * f, 40 * f, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        whole = tiny_sd.encode(x)
        assert torch.equal(tiny_sd.encode(x, low_memory=True, tile=40), whole)
        tiled = tiny_sd.encode(x, low_memory=True, tile=32)
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().mean() < 0.01


def test_invert_low_memory_encodes_in_tiles(tiny_sd, monkeypatch):
    """p2p invert --low-memory runs the encoder on tiles, not on the whole picture."""
    sides = []
    hook = tiny_sd.vae.encoder.register_forward_pre_hook(lambda m, args: sides.append(tuple(args[0].shape[-2:])))
    monkeypatch.setattr("models.sd.TILE", 8)          # tiles of 8 latents: a 16x16-latent picture takes 9
    f = tiny_sd.latent_downsample
    try:
        invert(tiny_sd, torch.zeros(1, 3, 16 * f, 16 * f), "a cat", method="ddim", low_memory=True, **KW)
    finally:
        hook.remove()
    assert sides == [(8 * f, 8 * f)] * 9


# ------------------------------------------------------------------------------- the CLI
def test_cli_low_memory_flag(tmp_path, golden_dir):
    ckpt = str(golden_dir / "tiny-sd-a.safetensors")
    args = ["generate", "--ckpt", ckpt, "--prompt", "a cat", "--steps", str(STEPS)]
    assert main([*args, "-o", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--low-memory", "-o", str(tmp_path / "b.png")]) == 0
    record = json.loads((tmp_path / "b.png.json").read_text())
    assert record["low_memory"] is True and record["offload"] is True
    a, b = (np.asarray(Image.open(tmp_path / n), dtype=int) for n in ("a.png", "b.png"))
    assert np.abs(a - b).max() <= 1
