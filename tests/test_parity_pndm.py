"""Our PLMS sampler (models.pndm.PNDM) against diffusers' `PNDMScheduler` with SD v1.4's scheduler config
(scaled_linear betas 0.00085 to 0.012, 1000 steps, skip_prk_steps, steps_offset 1, set_alpha_to_one False):
the UNet-call timesteps, and the latents after every call for the same UNet outputs."""
import pytest
import torch

from models import PNDM
import oracles as O


def ref_pndm(num_steps: int):
    from diffusers import PNDMScheduler

    s = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
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
    print(f"\n  PLMS 10-step chain: max|diff| = {diff:.3e}", end="")
    assert diff <= 1e-5 * scale, diff


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
