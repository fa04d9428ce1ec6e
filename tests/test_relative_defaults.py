"""Defaults relative to the model: the self-attention layers an edit injects, the cross-attention maps a
store keeps and the low-memory VAE tile are the reference's for SD v1 (16, 32, 64 latents a side, at every
picture size: the golden cases) and scale with the model's default latent side where it is larger (SDXL at
1024 px: 32, 64, 128), so that a default Replace on SDXL injects self-attention as on SD v1 at 512."""
import copy
import dataclasses

import pytest
import torch

import models.sd
import sdxl_oracles as X
from models import UNetConfig, UNetModel, load_config
from models.clip import default_tokenizer
from p2p import AttentionStore, Replace, edit
from p2p.control import Controller

SRC = "a painting of a squirrel eating a burger"
LION = "a painting of a lion eating a burger"


def meta_sites(unet_cfg):
    with torch.device("meta"):
        return UNetModel(unet_cfg).sites


def chosen(sites, latent, default_side):
    """{(level, side) of the self-attention layers a default Replace injects at step 0 of a latent of side
    `latent`}, and those of the cross-attention maps a default store keeps."""
    ctl = Controller(default_tokenizer(), [SRC, LION], Replace(), 50, sites, default_side=default_side)
    at = [s.at(latent >> s.level, latent >> s.level) for s in sites]
    injected = {(s.level, s.h) for s in at if not s.is_cross and ctl.self_active(0, s)}
    stored = {(s.level, s.h) for s in at if s.is_cross and ctl.store.wants(s)}
    return injected, stored


@pytest.mark.parametrize("latent", [32, 64, 96, 128])
def test_sd_v1_chooses_the_reference_layers_at_every_size(latent):
    """The reference: self-attention injected at sides <= 16, maps stored at sides <= 32, whatever the size."""
    sites = meta_sites(UNetConfig())
    injected, stored = chosen(sites, latent, default_side=64)
    sides = {(s.level, latent >> s.level) for s in sites}
    assert injected == {(lv, side) for lv, side in sides if side <= 16}
    assert stored == {(lv, side) for lv, side in sides if side <= 32}


def test_sdxl_at_1024_injects_its_deepest_level():
    cfg = load_config("sdxl-base")
    assert cfg.default_height == 1024 and cfg.image_size == 128
    injected, stored = chosen(meta_sites(cfg.unet), 128, default_side=cfg.image_size)
    assert injected == {(2, 32)}                 # as SD v1 at 512 injects its 16x16 (and 8x8) layers
    assert stored == {(1, 64), (2, 32)}
    assert chosen(meta_sites(cfg.unet), 128, default_side=None)[0] == set()   # SD v1's numbers: none at all


def test_an_explicit_limit_keeps_its_meaning():
    sites = meta_sites(load_config("sdxl-base").unet)
    ctl = Controller(default_tokenizer(), [SRC, LION], Replace(self_replace_max_res=64), 50, sites,
                     store=AttentionStore(max_res=32), default_side=128)
    at = [s.at(128 >> s.level, 128 >> s.level) for s in sites]
    assert {s.level for s in at if not s.is_cross and ctl.self_active(0, s)} == {1, 2}
    assert {s.level for s in at if s.is_cross and ctl.store.wants(s)} == {2}


def injected_sites(sd, spec, **kw):
    """The self-attention sites an edit injected at (site, step), counted in the run."""
    hits, real = [], Controller.self_active

    def spy(self, i, site):
        active = real(self, i, site)
        if active:
            hits.append((site.level, site.h, i))
        return active

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Controller, "self_active", spy)
        out = edit(sd, [SRC, LION], spec, progress=False, **kw)
    return set(hits), out


def test_default_replace_on_a_tiny_sdxl_at_sdxl_proportions_injects_self_attention(one_thread):
    """The tiny SDXL with SDXL's default latent side (128; attention at 64x64 and 32x32 as SDXL at 1024 px),
    at its default size: a default Replace injects self-attention at the 32x32 layers (none before)."""
    tiny = X.ours()
    sdxl_sized = copy.copy(tiny)
    sdxl_sized.cfg = dataclasses.replace(tiny.cfg, image_size=128)
    hits, _ = injected_sites(sdxl_sized, Replace(), seed=3, num_steps=3)
    assert hits == {(2, 32, 0)}                  # self window [0, int(3 * 0.4)) = step 0


def test_default_replace_on_tiny_sdxl_at_its_default_size_injects_self_attention(one_thread):
    tiny = X.ours()
    hits, out = injected_sites(tiny, Replace(), seed=3, num_steps=3)
    assert hits and {lv for lv, _, _ in hits} == {1, 2}      # 16 latents: SD v1's own 16 and below
    none, _ = injected_sites(tiny, Replace(self_replace_steps=0.0), seed=3, num_steps=3)
    assert not none


def test_the_low_memory_tile_follows_the_default_latent_side(tiny_sd, monkeypatch):
    tiles = []
    monkeypatch.setattr(models.sd, "decode_tiled", lambda decode, z, tile, overlap, f: tiles.append(tile) or decode(z))
    z = torch.zeros(1, 4, 8, 8)
    tiny_sd.decode(z, low_memory=True)
    sdxl_sized = copy.copy(tiny_sd)
    sdxl_sized.cfg = dataclasses.replace(tiny_sd.cfg, image_size=128)
    sdxl_sized.decode(z, low_memory=True)
    tiny_sd.decode(z, low_memory=True, tile=16)
    assert tiles == [64, 128, 16]                # the reference's 64 (tiny default 32 < SD v1's 64), SDXL's 128
