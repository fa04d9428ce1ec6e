"""models/flow.py against diffusers' FlowMatchEulerDiscreteScheduler (the test oracle): SD3's static shift
(sigma_min shifted twice), Flux's dynamic shift (mu from the image's token count, the pipeline's sigmas), the
Euler step, the inverse step, and the golden cases' schedules."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file

from models.flow import FlowConfig, FlowMatchEuler, calculate_shift

FIXTURES = Path(__file__).parent / "fixtures" / "mmdit"
SD3 = FlowConfig(shift=3.0)
FLUX = FlowConfig(shift=3.0, use_dynamic_shifting=True)


def oracle(cfg: FlowConfig, n: int, seq_len: int | None = None, flux: bool = False):
    """diffusers' scheduler set as StableDiffusion3Pipeline / FluxPipeline set it (flux: a static shift on the
    pipeline's sigmas, FLUX.1-schnell's)."""
    s = FlowMatchEulerDiscreteScheduler(shift=cfg.shift, use_dynamic_shifting=cfg.use_dynamic_shifting)
    if flux and not cfg.use_dynamic_shifting:
        s.set_timesteps(n, sigmas=np.linspace(1.0, 1 / n, n))
    elif cfg.use_dynamic_shifting:
        mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
        s.set_timesteps(n, sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    else:
        s.set_timesteps(n)
    return s


@pytest.mark.parametrize("n", [1, 2, 10, 28, 50])
@pytest.mark.parametrize("cfg,seq_len", [(SD3, None), (FlowConfig(shift=1.0), None), (FLUX, 48), (FLUX, 4096),
                                         (FLUX, 1024)])
def test_schedule_equals_diffusers(cfg, seq_len, n):
    ours, theirs = FlowMatchEuler.create(n, cfg, seq_len), oracle(cfg, n, seq_len)
    assert torch.equal(ours.sigmas, theirs.sigmas)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.num_steps == n and [c.row for c in ours.calls] == list(range(n))


@pytest.mark.parametrize("n", [1, 4, 10])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flux_static_schedule_shifts_the_pipelines_sigmas(shift, n):
    """FluxPipeline passes linspace(1, 1/N, N) whatever the shift: FLUX.1-schnell (static shift 1) samples
    those sigmas, not SD3's spacing of the 1000-step table."""
    cfg = FlowConfig(shift=shift)
    ours, theirs = FlowMatchEuler.create(n, cfg, 48, pipeline_sigmas=True), oracle(cfg, n, flux=True)
    assert torch.equal(ours.sigmas, theirs.sigmas) and torch.equal(ours.timesteps, theirs.timesteps)
    assert not torch.equal(ours.sigmas, FlowMatchEuler.create(n, cfg).sigmas) or n == 1


def test_step_equals_diffusers():
    ours, theirs = FlowMatchEuler.create(10, SD3), oracle(SD3, 10)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 16, 4, 6, generator=g)
    for i, t in enumerate(theirs.timesteps):
        want = theirs.step(v, t, x).prev_sample
        assert torch.equal(ours.step(v, i, x), want)
        x = want


def test_inverse_step_retraces_the_step():
    s = FlowMatchEuler.create(10, FLUX, 48)
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    for i in range(s.num_steps):  # with the same velocity, inverting a step comes back to where it started
        torch.testing.assert_close(s.inverse_step(v, i, s.step(v, i, x)), x, rtol=0, atol=1e-6)
    assert not torch.equal(s.inverse_step(v, 3, x), x)


@pytest.mark.parametrize("case,cfg,seq_len", [("sd3_plain", SD3, None), ("flux_plain", FLUX, 48)])
def test_golden_schedules(case, cfg, seq_len):
    t = load_file(FIXTURES / f"{case}.safetensors")
    ours = FlowMatchEuler.create(10, cfg, seq_len)
    assert torch.equal(ours.sigmas, t["sigmas"]) and torch.equal(ours.timesteps, t["timesteps"])


def test_sd3_sigma_min_is_shifted_twice():
    """The last sigma is shift(shift(1/1000)), not shift(1/1000): diffusers' quirk, which moves SD3's z0."""
    once = 3 * 0.001 / (1 + 2 * 0.001)
    assert FlowMatchEuler.create(10, SD3).sigmas[-2].item() == pytest.approx(3 * once / (1 + 2 * once), rel=1e-6)


def test_config_from_folder_and_refusals():
    c = json.loads((FIXTURES / "tiny-flux" / "scheduler" / "scheduler_config.json").read_text())
    assert FlowConfig.from_scheduler_config(c) == FLUX
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowConfig.from_scheduler_config(c | {"use_karras_sigmas": True})
    with pytest.raises(ValueError, match="image_seq_len"):
        FlowMatchEuler.create(4, FLUX)
