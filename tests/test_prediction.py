"""epsilon and v prediction meet in one place, `StableDiffusion.eps`: a v model's output turned into eps
there and stepped by our DDIM must equal diffusers' `DDIMScheduler(prediction_type="v_prediction")`
stepping the raw output; an epsilon model's output passes through unchanged."""
import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler

import oracles as O
from models import SDConfig, StableDiffusion


def v_model():
    sd = O.ours()
    v = StableDiffusion(dataclasses.replace(sd.cfg, prediction_type="v"))
    v.load_state_dict(sd.state_dict())
    return v.eval().requires_grad_(False)


def test_epsilon_model_output_is_eps():
    sd = O.ours()
    x, ctx = O.randn(1, 4, 8, 8, seed=1), sd.encode_text(["a cat"])
    assert torch.equal(sd.eps(x, 501, ctx), sd.unet(x, 501, ctx))


@pytest.mark.parametrize("num_steps", [10, 3])
def test_v_prediction_ddim_matches_diffusers(num_steps):
    sd = v_model()
    ours = sd.scheduler(num_steps)
    ref = DDIMScheduler(prediction_type="v_prediction", **O.DDIM_KW)
    ref.set_timesteps(num_steps)
    ctx = sd.encode_text(["a photo of a cat"])
    worst = 0.0
    for i, t in enumerate(ours.timesteps.tolist()):
        x = O.randn(1, 4, 8, 8, seed=300 + i)
        with torch.no_grad():
            mine = ours.step(sd.eps(x, t, ctx), t, x)
            theirs = ref.step(sd.unet(x, t, ctx), t, x, eta=0.0).prev_sample
        diff, scale = O.compare(mine, theirs)
        worst = max(worst, diff / scale)
    print(f"\n  v-prediction DDIM ({num_steps} steps): max rel |diff| = {worst:.2e}", end="")
    assert worst < 1e-5, worst


def test_v_batch_of_timesteps():
    """eps with one timestep per row (as inversion and batched callers pass) converts each row at its own t."""
    sd = v_model()
    x, ctx = O.randn(2, 4, 8, 8, seed=5), sd.encode_text(["a", "b"])
    with torch.no_grad():
        both = sd.eps(x, torch.tensor([901, 1]), ctx)
        rows = [sd.eps(x[i:i + 1], t, ctx[i:i + 1]) for i, t in enumerate([901, 1])]
    assert torch.allclose(both, torch.cat(rows), atol=1e-5)


def test_prediction_type_checked():
    with pytest.raises(ValueError, match="prediction_type must be one of epsilon, v"):
        SDConfig(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="family must be one of"):
        SDConfig(family="sd3")
    assert SDConfig.from_ldm({**SDConfig().to_ldm()}).prediction_type == "epsilon"
    v = dataclasses.replace(SDConfig(), prediction_type="v")
    assert SDConfig.from_ldm(v.to_ldm()).prediction_type == "v"
    bad = SDConfig().to_ldm()
    bad["model"]["params"]["parameterization"] = "x0"
    with pytest.raises(ValueError, match="parameterization 'x0' is not supported"):
        SDConfig.from_ldm(bad)
