"""Prompt-to-Prompt's claims, measured from the pixels on the shipped miniature Stable Diffusion.

The same measurements as `python -m p2p.miniature.evaluate` (whose 100-seed table is in docs/miniature.md),
on seeds 0-11. Each bound holds for more than 99.9% of the 12-seed subsets of the 100-seed
evaluation (`python -m p2p.miniature.evaluate --bounds-from` its `--json` file prints them), so a
pass is not luck and a failure means the checkpoint or the method broke. Not asserted, because 12
seeds do not support it at that margin: that LocalBlend's background beats the edit's without it
(1.6 dB over the 100 seeds)."""
import numpy as np
import pytest

from p2p.miniature import CHECKPOINT
from p2p.miniature.evaluate import mean, run

SEEDS = list(range(12))


@pytest.fixture(scope="module")
def mini(one_thread):
    from weights_tools import load_checkpoint

    sd = load_checkpoint(CHECKPOINT)
    sd.requires_grad_(False)
    return sd.eval()


@pytest.fixture(scope="module")
def measured(mini):
    return run(mini, SEEDS, parts=("replace", "blend"), progress=False)


def test_shipped_checkpoint_is_an_sd_v1_file():
    from weights_tools import inspect_checkpoint

    assert CHECKPOINT.stat().st_size <= 20 * 2**20
    report = inspect_checkpoint(CHECKPOINT)
    assert report["variant"].startswith("SD v1") and report["loadable"]


def test_the_model_follows_its_captions(measured):
    """100 seeds: object found 1.00, colour 1.00, shape 0.58."""
    assert mean(measured["found"]) == 1.0
    assert mean(measured["colour_ok"]) >= 0.9
    assert mean(measured["shape_ok"]) >= 2 / 12


def test_the_object_words_attend_to_the_object(measured):
    """What Prompt-to-Prompt injects and LocalBlend thresholds: the source's colour and shape words'
    16x16 cross-attention falls on the object (100 seeds: 0.97 of it, on 0.25 of the picture),
    not spread over the picture (where an even map would score the object's share)."""
    inside, area = np.array(measured["maps_inside"]), np.array(measured["maps_area"])
    assert len(inside) == len(SEEDS)
    assert inside.mean() >= 0.85 and (inside - area).mean() >= 0.6


def test_replace_keeps_the_layout_better_than_the_fixed_seed_baseline(measured):
    """The paper's claim (its Fig. 4): with the source's attention injected, the edited object stays
    where the source's was, at its size; regenerating the edited prompt from the same seed moves and
    resizes it. 100 seeds: centre shift 1.6 px vs 7.0 px, |log area ratio| 0.24 vs 0.67."""
    shift_p2p, shift_base = np.mean(measured["rep_shift_p2p"]), np.mean(measured["rep_shift_base"])
    assert shift_p2p < 4.0 and shift_base - shift_p2p > 1.2
    assert np.mean(measured["rep_scale_base"]) - np.mean(measured["rep_scale_p2p"]) > 0.15


def test_local_blend_swaps_the_colour_and_keeps_the_background(measured):
    """Replace of the colour word with LocalBlend (16x16 maps): the object takes the new colour
    (100 seeds: 0.97) and the background stays close to the source's (100 seeds: 27.7 dB, 26.1
    without LocalBlend)."""
    assert len(measured["blend_colour_ok"]) == len(SEEDS) and mean(measured["blend_colour_ok"]) >= 0.66
    assert np.mean(measured["psnr_blend"]) >= 23.5


def test_the_demo_writes_its_grid(tmp_path, mini, monkeypatch):
    """The README's demo command, with fewer steps."""
    import p2p.cli

    monkeypatch.setattr(p2p.cli, "load_model", lambda ckpt, dtype="float32", **options: mini)
    assert p2p.cli.main(["demo", "-o", str(tmp_path), "--steps", "4"]) == 0
    for name in ("edits.png", "replace.png", "replace.png.json", "replace_attention_1.png"):
        assert (tmp_path / name).stat().st_size > 0, name
