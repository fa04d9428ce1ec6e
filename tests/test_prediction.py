"""epsilon and v prediction meet in one place, models/prediction.py: a v model's output (`StableDiffusion.predict`)
stepped by our DDIM must equal diffusers' `DDIMScheduler(prediction_type="v_prediction")` stepping it;
`StableDiffusion.eps` turns it into eps; an epsilon model's output passes through unchanged."""
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
            mine = ours.step(sd.predict(x, t, ctx), t, x)
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


def as_v(sd):
    """The same weights read as a v-prediction model (its outputs then mean v, not eps)."""
    v = StableDiffusion(dataclasses.replace(sd.cfg, prediction_type="v"))
    v.load_state_dict(sd.state_dict())
    return v.eval().requires_grad_(False)


def test_v_model_inversions(tiny_sd, one_thread):
    """Every inversion reads the model's prediction for what it is (DDIM's inverse step takes it as eps at its
    call), so a v model inverts as an epsilon one does: null-text reconstructs closer than DDIM inversion under
    guidance, Direct Inversion exactly (the reference's failure on SD 2.x, its issue #75, was feeding v where
    eps was meant)."""
    from p2p import invert
    from p2p.inversion import reconstruct

    sd = as_v(tiny_sd)
    y, x = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    img = torch.stack([x * 0.8, y * 0.8, ((x - 0.2) ** 2 + y ** 2 < 0.3).float() * 1.2 - 0.6])[None].clamp(-1, 1)
    inv = {m: invert(sd, img, "a red circle", method=m, num_steps=5, num_inner_steps=5, progress=False)
           for m in ("ddim", "null-text", "direct")}
    err = {m: torch.mean((reconstruct(sd, i, progress=False) - i.image_latents) ** 2).item() for m, i in inv.items()}
    print(f"\n  v model, reconstruction MSE: {err}", end="")
    assert err["null-text"] < err["ddim"]
    assert err["direct"] <= 1e-8 + 1e-6 * err["ddim"]
    assert not torch.equal(inv["ddim"].x_T, invert(tiny_sd, img, "a red circle", method="ddim", num_steps=5,
                                                   progress=False).x_T)  # v really is read differently
