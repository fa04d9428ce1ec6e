"""The miniature Stable Diffusion: its data, its checkpoint, its training loop, and Prompt-to-Prompt's
claims measured on it from the pixels (a few seeds; `python -m p2p.miniature.evaluate` runs 100)."""
import numpy as np
import pytest
import torch

from p2p.miniature import CHECKPOINT
from p2p.miniature import measure as M
from p2p.miniature.data import SHAPES, make_sample

needs_ckpt = pytest.mark.skipif(not CHECKPOINT.exists(), reason="p2p/miniature/miniature.safetensors not built")


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
    assert shape_ok >= 0.95 * n  # small stars can rasterise close to a diamond


def test_training_smoke(tmp_path):
    """Two steps of each stage on a tiny batch; the result loads as a checkpoint."""
    from p2p.miniature.train import train
    from weights_tools import load_checkpoint

    out = train(tmp_path / "m.safetensors", n_data=8, vae_steps=2, vae_batch=2, unet_steps=2, batch=2,
                save_every=1, log_path=tmp_path / "log.jsonl", progress=False)
    sd = load_checkpoint(out)
    assert sd.cfg.unet.model_channels == 64 and sd.cfg.image_size == 16 and sd.latent_downsample == 4
    assert (tmp_path / "log.jsonl").read_text().count('"stage": "unet"') == 2


@needs_ckpt
def test_shipped_checkpoint_layout():
    from safetensors import safe_open

    from models import PREFIXES
    from weights_tools import load_checkpoint

    assert CHECKPOINT.stat().st_size <= 20 * 2**20
    with safe_open(str(CHECKPOINT), "pt") as f:
        keys = list(f.keys())
        assert "ldm_config" in f.metadata()
        assert f.get_tensor("cond_stage_model.transformer.text_model.embeddings.position_ids").dtype == torch.int64
        assert f.get_tensor(PREFIXES["unet"] + "out.2.weight").dtype == torch.float16
    assert all(any(k.startswith(p) for p in PREFIXES.values()) for k in keys)
    sd = load_checkpoint(CHECKPOINT)
    assert sd.dtype == torch.float32 and sd.cfg.default_height == 64


STEPS, SEEDS = 10, (0, 1, 2)  # the full evaluation runs 20 steps on 100 seeds


@pytest.fixture(scope="module")
def mini():
    from p2p.miniature.evaluate import load

    torch.manual_seed(0)
    return load(CHECKPOINT).requires_grad_(False)


@needs_ckpt
def test_p2p_replace_keeps_layout_better_than_fixed_seed(mini):
    """Replace "<shape>" -> "square": the object stays where the source's was (paper Fig. 4 claim)."""
    from p2p.miniature.evaluate import mean, run

    R = run(mini, list(SEEDS), STEPS, 5.0, parts=("replace",), progress=False)
    assert len(R["rep_shift_p2p"]) == len(SEEDS)
    assert mean(R["rep_shift_p2p"]) < REPLACE_SHIFT_MAX
    assert mean(R["rep_shift_p2p"]) + REPLACE_MARGIN < mean(R["rep_shift_base"])


@needs_ckpt
def test_local_blend_keeps_background(mini):
    """Colour swap with LocalBlend: the background outside the object is the source's."""
    from p2p.miniature.evaluate import mean, run

    R = run(mini, list(SEEDS), STEPS, 5.0, parts=("blend",), progress=False)
    assert mean(R["psnr_blend"]) > BLEND_PSNR_MIN
    assert mean(R["psnr_blend"]) > mean(R["psnr_base"]) + BLEND_MARGIN
