"""The miniature Stable Diffusion's data, its measurements from pixels, and its training loop.
Prompt-to-Prompt's claims on the shipped checkpoint are in tests/test_miniature_claims.py."""
import numpy as np

from p2p.miniature import measure as M
from p2p.miniature.data import make_sample

def test_samples_are_deterministic_and_captioned():
    a, cap_a, fa = make_sample(7)
    b, cap_b, fb = make_sample(7)
    assert np.array_equal(a, b) and cap_a == cap_b
    o = fa["objects"][0]
    assert o["shape"] in cap_a and o["colour"] in cap_a and f"on a {fa['background']} background" in cap_a
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and o["mask"].any()


def test_facts_are_recoverable_from_pixels():
    """colour and shape read back from the generator's own pictures (the measurement's ceiling)."""
    colour_ok = shape_ok = n = 0
    for seed in range(150):
        img, _, f = make_sample(seed)
        if len(f["objects"]) != 1:
            continue
        o, r = f["objects"][0], M.read_facts(img, f["background"])
        n += 1
        colour_ok += r["colour"] == o["colour"]
        shape_ok += r["shape"] == o["shape"]
        assert np.array_equal(r["mask"], o["mask"])
    assert colour_ok == n
    assert shape_ok >= 0.95 * n  # a few small stars and triangles rasterise ambiguously


def test_training_smoke(tmp_path):
    """Two steps of each stage on a tiny batch; the result loads as a checkpoint."""
    from p2p.miniature.train import train
    from weights_tools import load_checkpoint

    out = train(tmp_path / "m.safetensors", n_data=8, vae_steps=2, vae_batch=2, unet_steps=2, batch=2,
                save_every=1, log_path=tmp_path / "log.jsonl", progress=False)
    sd = load_checkpoint(out)
    assert sd.cfg.unet.model_channels == 64 and sd.cfg.image_size == 16 and sd.latent_downsample == 4
    assert (tmp_path / "log.jsonl").read_text().count('"stage": "unet"') == 2


def test_two_stage_training_keeps_the_vae(tmp_path):
    """The shipped checkpoint's recipe: `--unet-steps 0` (VAE stage), then `--init-from` (UNet and
    text encoder); the second stage keeps the first's VAE and scale_factor exactly."""
    from safetensors.torch import load_file

    from p2p.miniature.train import train
    from weights_tools import load_checkpoint

    kw = dict(n_data=8, vae_steps=2, vae_batch=2, batch=2, progress=False)
    stage1 = train(tmp_path / "s1.safetensors", unet_steps=0, **kw)
    final = train(tmp_path / "s2.safetensors", unet_steps=2, init_from=stage1, **kw)
    a, b = load_file(stage1), load_file(final)
    vae = [k for k in a if k.startswith("first_stage_model.")]
    unet = [k for k in a if k.startswith("model.diffusion_model.")]
    assert vae and all(a[k].equal(b[k]) for k in vae)
    assert not all(a[k].equal(b[k]) for k in unet)
    assert load_checkpoint(stage1).cfg.scale_factor == load_checkpoint(final).cfg.scale_factor


def test_striped_background_is_read_from_pixels():
    """The Refine measurement's reading of 'striped': right on every generated picture (a flat gray
    background must not pass: it sits between the two stripe greys)."""
    from p2p.miniature.evaluate import is_striped

    for seed in range(120):
        img, _, f = make_sample(seed)
        mask = np.zeros(img.shape[:2], bool)
        for o in f["objects"]:
            mask |= o["mask"]
        assert is_striped(img, mask) == (f["background"] == "striped"), (seed, f["background"])
