"""Our DDIM against diffusers' `DDIMScheduler` configured as SD v1 uses it (scaled_linear betas,
steps_offset=1, set_alpha_to_one=False, no clipping, eta 0)."""
import pytest
import torch

from models import DDIM
import oracles as O


@pytest.mark.parametrize("num_steps", [50, 10, 2])
def test_timesteps_match_diffusers(num_steps):
    ours = DDIM.create(num_steps, steps_offset=1).timesteps
    ref = O.ref_scheduler(num_steps).timesteps
    print(f"\n  DDIM timesteps ({num_steps} steps): {ours.tolist()[:4]} ... {ours.tolist()[-2:]}", end="")
    assert ours.tolist() == ref.tolist(), (ours.tolist(), ref.tolist())


def test_known_timesteps():
    assert DDIM.create(50).timesteps.tolist() == list(range(981, 0, -20))
    assert DDIM.create(2).timesteps.tolist() == [501, 1]


def test_alphas_match_diffusers():
    ours, ref = DDIM.create(50), O.ref_scheduler(50)
    diff = (ours.alphas_cumprod - ref.alphas_cumprod).abs().max().item()
    print(f"\n  DDIM alphas_cumprod: max|diff| = {diff:.3e}", end="")
    assert diff <= 1e-7, diff
    assert float(ours.alpha(-19)) == float(ref.final_alpha_cumprod) == float(ref.alphas_cumprod[0])
    assert abs(float(ours.alphas_cumprod[0]) - 0.99915) < 1e-6


@pytest.mark.parametrize("num_steps", [50, 10, 2])
def test_every_step_matches_diffusers(num_steps):
    ours, ref = DDIM.create(num_steps), O.ref_scheduler(num_steps)
    worst = 0.0
    for i, t in enumerate(ours.timesteps.tolist()):
        x, eps = O.randn(2, 4, 8, 6, seed=100 + i), O.randn(2, 4, 8, 6, seed=200 + i)
        r = ref.step(eps, t, x, eta=0.0).prev_sample
        diff, scale = O.compare(ours.step(eps, t, x), r)
        worst = max(worst, diff / scale)
        assert diff <= 1e-5 * scale, f"step t={t}: max|diff| = {diff:.3e} (scale {scale:.2f})"
    print(f"\n  DDIM step ({num_steps} steps, every t): worst max|diff|/scale = {worst:.3e}", end="")


def test_inverse_step_inverts_step():
    s = DDIM.create(10)
    for t in s.timesteps.tolist():
        x, eps = O.randn(1, 4, 8, 8, seed=t), O.randn(1, 4, 8, 8, seed=t + 1)
        torch.testing.assert_close(s.step(eps, t, s.inverse_step(eps, t, x)), x, rtol=0, atol=1e-5)
