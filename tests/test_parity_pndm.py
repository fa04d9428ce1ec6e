"""Our PLMS sampler (models.pndm.PNDM) against diffusers' `PNDMScheduler` with SD v1.4's scheduler config
(scaled_linear betas 0.00085 to 0.012, 1000 steps, skip_prk_steps, steps_offset 1, set_alpha_to_one False):
the UNet-call timesteps, the latents after every call for the same UNet outputs, and a whole 10-step
`generate(sampler="pndm")` against `StableDiffusionPipeline` with that scheduler (tests/oracles.py's
pipeline, its scheduler swapped), same x_T, guidance 7.5, non-square 32x48 px."""
import numpy as np
import pytest
import torch

from models import PNDM
from p2p import generate
import oracles as O

STEPS, GUIDANCE, H, W = 10, 7.5, 32, 48


def ref_pndm(num_steps: int, prediction_type: str = "epsilon"):
    from diffusers import PNDMScheduler

    s = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    s.set_timesteps(num_steps)
    return s


@pytest.mark.parametrize("num_steps", [50, 10, 3, 2, 1])
def test_call_timesteps_match_diffusers(num_steps):
    ours, ref = PNDM.create(num_steps).timesteps, ref_pndm(num_steps).timesteps
    print(f"\n  PLMS timesteps ({num_steps} steps, {len(ours)} UNet calls): {ours.tolist()[:4]} ...", end="")
    assert ours.tolist() == ref.tolist(), (ours.tolist(), ref.tolist())


def test_known_call_timesteps():
    """N steps are N + 1 UNet calls: the first step's end timestep is evaluated twice (the reference's 51 calls)."""
    assert PNDM.create(50).timesteps.tolist() == [981, 961] + list(range(961, 0, -20))
    assert len(PNDM.create(50).timesteps) == 51
    assert PNDM.create(2).timesteps.tolist() == [501, 1, 1]


@pytest.mark.parametrize("num_steps", [50, 10, 2, 1])
def test_every_call_matches_diffusers(num_steps):
    """The same UNet outputs and latents into both, call after call (each call's x a fresh draw, so that a
    sampler reading the wrong latents, e.g. call 1 not restarting from the kept x_{t_0}, is caught)."""
    ours, ref = PNDM.create(num_steps), ref_pndm(num_steps)
    worst = 0.0
    for i, t in enumerate(ours.timesteps.tolist()):
        x, eps = O.randn(2, 4, 8, 6, seed=100 + i), O.randn(2, 4, 8, 6, seed=300 + i)
        r = ref.step(eps, t, x).prev_sample
        diff, scale = O.compare(ours.step(eps, t, x), r)
        worst = max(worst, diff / scale)
        assert diff <= 1e-5 * scale, f"call {i} (t={t}): max|diff| = {diff:.3e} (scale {scale:.2f})"
    print(f"\n  PLMS step ({num_steps} steps, every call): worst max|diff|/scale = {worst:.3e}", end="")


def test_chained_run_matches_diffusers():
    """A whole 10-step run with eps a function of the latents, each sampler fed its own output."""
    ours, ref = PNDM.create(10), ref_pndm(10)
    x_ours = x_ref = O.randn(1, 4, 8, 8, seed=5)
    w = O.randn(4, 4, seed=6) / 2
    for t in ours.timesteps.tolist():
        def unet(x):
            return torch.tanh(torch.einsum("dc,bchw->bdhw", w, x)) + 0.01 * t ** 0.5
        x_ours = ours.step(unet(x_ours), t, x_ours)
        x_ref = ref.step(unet(x_ref), t, x_ref).prev_sample
    diff, scale = O.compare(x_ours, x_ref)
    print(f"\n  PLMS 10-step chain: max|diff| = {diff:.3e}, ref scale {scale:.2f}", end="")
    assert diff <= 1e-5 * scale, diff


@pytest.mark.parametrize("num_steps", [50, 10, 2, 1])
def test_every_call_matches_diffusers_for_v_models(num_steps):
    """A v model: diffusers extrapolates the raw v and turns the result into eps at the update's x and t.
    Ours is given the same v (sd.predict's output) and must move the latents as diffusers does; extrapolating
    the eps each v amounts to at its own call's x and t instead would not (checked below)."""
    ours, ref = PNDM.create(num_steps, prediction_type="v"), ref_pndm(num_steps, "v_prediction")
    as_eps = PNDM.create(num_steps)  # the other sampler: eps extrapolated
    worst, gap = 0.0, 0.0
    for i, t in enumerate(ours.timesteps.tolist()):
        x, v = O.randn(2, 4, 8, 6, seed=100 + i), O.randn(2, 4, 8, 6, seed=300 + i)
        a = ours.ddim.alpha(t)
        eps = a ** 0.5 * v + (1 - a) ** 0.5 * x  # sd.eps of a v model
        r = ref.step(v, t, x).prev_sample
        diff, scale = O.compare(ours.step(v, t, x), r)
        worst = max(worst, diff / scale)
        assert diff <= 1e-5 * scale, f"call {i} (t={t}): max|diff| = {diff:.3e} (scale {scale:.2f})"
        gap = max(gap, O.compare(as_eps.step(eps, t, x), r)[0] / scale)
    print(f"\n  PLMS step, v model ({num_steps} steps, every call): worst max|diff|/scale = {worst:.3e}; "
          f"eps extrapolated instead: {gap:.3e}", end="")
    if num_steps > 1:  # one step is one DDIM move, where the two agree
        assert gap > 1e-3, gap


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="'epsilon' or 'v'"):
        PNDM.create(10, prediction_type="v_prediction")


def test_first_step_is_taken_twice():
    """Call 1 starts again from the kept x_{t_0} with the mean of both outputs, and ignores the x it is given."""
    s = PNDM.create(10)
    t0, t1 = s.timesteps.tolist()[:2]
    x, e0, e1 = O.randn(1, 4, 4, 4, seed=1), O.randn(1, 4, 4, 4, seed=2), O.randn(1, 4, 4, 4, seed=3)
    s.step(e0, t0, x)
    again = s.step(e1, t1, torch.full_like(x, 1e3))
    torch.testing.assert_close(again, s.ddim.step((e0 + e1) / 2, t0, x), rtol=0, atol=0)


def test_a_sampler_serves_one_run():
    s = PNDM.create(2)
    x = O.randn(1, 4, 4, 4)
    for t in s.timesteps.tolist():
        x = s.step(x, t, x)
    with pytest.raises(ValueError, match="fresh one"):
        s.step(x, 501, x)
    with pytest.raises(ValueError, match="timestep 981"):
        PNDM.create(2).step(x, 981, x)


@pytest.fixture(scope="module")
def runs():
    from diffusers import StableDiffusionPipeline

    sd, base = O.ours(), O.ref_pipeline()
    pipe = StableDiffusionPipeline(**{**base.components, "scheduler": ref_pndm(STEPS)})  # the cached one is untouched
    pipe.set_progress_bar_config(disable=True)
    prompts, x_T = O.tiny_generate_inputs(H, W)
    ours = generate(sd, prompts, latents=x_T, num_steps=STEPS, guidance_scale=GUIDANCE, height=H, width=W,
                    sampler="pndm", progress=False)
    ddim = generate(sd, prompts, latents=x_T, num_steps=STEPS, guidance_scale=GUIDANCE, height=H, width=W,
                    progress=False)
    ref_z0 = pipe(prompts, height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  latents=x_T.expand(len(prompts), -1, -1, -1).clone(), output_type="latent").images
    with torch.no_grad():
        ref_img = pipe.vae.decode(ref_z0 / pipe.vae.config.scaling_factor).sample
    return sd, ours, ddim, ref_z0, ref_img


def test_generate_pndm_latents_match_pipeline(runs):
    sd, ours, ddim, ref_z0, _ = runs
    diff, scale = O.compare(ours.latents, ref_z0)
    msg = f"generate(sampler='pndm') z0 vs StableDiffusionPipeline + PNDMScheduler ({STEPS} steps, cfg {GUIDANCE}): " \
          f"max|diff| = {diff:.3e}, ref scale = {scale:.3f}, tol = {1e-4 * scale:.1e}"
    print("\n  " + msg, end="")
    assert diff <= 1e-4 * scale, msg
    gap, _ = O.compare(ddim.latents, ref_z0)  # the comparison can tell the samplers apart
    assert gap > 100 * max(diff, 1e-6), f"DDIM's z0 is as close to the PLMS pipeline's ({gap:.3e} vs {diff:.3e})"


def test_generate_pndm_images_match_pipeline(runs):
    sd, ours, _, _, ref_img = runs
    with torch.no_grad():
        dec = sd.decode(ours.latents)
    diff, scale = O.compare(dec, ref_img)
    print(f"\n  decoded images ([-1, 1]): max|diff| = {diff:.3e}, ref scale = {scale:.3f}", end="")
    assert diff <= 1e-4 * scale, diff
    ref_u8 = ((ref_img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    d8 = np.abs(ours.images.astype(int) - ref_u8.astype(int))
    print(f"\n  uint8 images: max|diff| = {d8.max()} LSB", end="")
    assert d8.max() <= 1  # truncation: a value on an integer edge may fall either side


def test_generate_pndm_makes_n_plus_one_unet_calls(monkeypatch):
    sd = O.ours()
    calls = []
    unet = sd.unet.forward
    monkeypatch.setattr(sd.unet, "forward", lambda x, t, *a, **k: calls.append(int(t)) or unet(x, t, *a, **k))
    generate(sd, "a cat", num_steps=4, height=32, width=32, sampler="pndm", progress=False)
    assert calls == [751, 501, 501, 251, 1], calls
