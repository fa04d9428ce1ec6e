"""Flow matching with Euler steps, as diffusers' FlowMatchEulerDiscreteScheduler samples SD3, SD3.5 and Flux.

The latent moves on the straight line x_sigma = (1 - sigma) x_0 + sigma noise; the model predicts the
velocity v = noise - x_0, and one Euler step from sigma_i to sigma_{i+1} is x + (sigma_{i+1} - sigma_i) v.
The schedule is N sigmas from (about) 1 down, then 0, bent towards 1 by a shift:
- static (SD3 / SD3.5: `shift` 3.0): sigma' = s sigma / (1 + (s - 1) sigma). diffusers spaces the N
  timesteps linearly from sigma_max to sigma_min of its shifted 1000-step table, then shifts them again,
  so the last sigma is the table's smallest, shifted twice (a quirk kept: it moves SD3's z0);
  FluxPipeline passes sigmas linspace(1, 1/N, N) instead, and a static shift bends those (FLUX.1-schnell:
  shift 1, use_dynamic_shifting false, so they are its schedule as they are);
- dynamic (Flux: `use_dynamic_shifting`): the pipeline passes sigmas linspace(1, 1/N, N) and
  mu = the image sequence length on the line through (base_image_seq_len, base_shift) and
  (max_image_seq_len, max_shift); sigma' = e^mu / (e^mu + (1/sigma - 1)).
The model's timestep is sigma * 1000 (`timesteps`); the loop passes it to the model, which converts it
as its pipeline does. One model call per step, step i reading row i (models/sampler.py's counter).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .sampler import Call


@dataclass(frozen=True)
class FlowConfig:
    """A diffusers folder's scheduler/scheduler_config.json, the parts that decide the schedule."""
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    num_train_timesteps: int = 1000

    @classmethod
    def from_scheduler_config(cls, c: dict, where: str = "scheduler_config.json") -> "FlowConfig":
        """From the config's keys (diffusers' defaults for absent ones); options this sampler does not
        model (Karras / exponential / beta sigmas, a terminal stretch, inverted sigmas, linear time shift,
        stochastic sampling) are refused by name."""
        unsupported = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                   "shift_terminal", "invert_sigmas", "stochastic_sampling") if c.get(k)]
        if c.get("time_shift_type", "exponential") != "exponential":
            unsupported.append(f"time_shift_type {c['time_shift_type']!r}")
        if unsupported:
            raise ValueError(f"{where}: {', '.join(unsupported)} is not modelled by this flow-matching Euler "
                             "sampler (it follows FlowMatchEulerDiscreteScheduler's defaults); remove the setting")
        fields = {k: c[k] for k in cls.__dataclass_fields__ if c.get(k) is not None}
        return cls(**fields)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu of the dynamic shift: linear in the image's token count, as FluxPipeline's calculate_shift."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def static_sigmas(cfg: FlowConfig, num_steps: int, pipeline_sigmas: bool = False) -> np.ndarray:
    """(N,) sigmas of a static shift. As set_timesteps without given sigmas (StableDiffusion3Pipeline): spaced
    between the shifted table's ends (sigma_max = 1, sigma_min = shift(1/1000)), then shifted (again), float64.
    pipeline_sigmas: as FluxPipeline, which always passes linspace(1, 1/N, N) (FLUX.1-schnell's static
    schedule, shift 1: those sigmas as they are), float32."""
    if pipeline_sigmas:
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
        return cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
    n = cfg.num_train_timesteps
    table = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()) / n
    table = cfg.shift * table / (1 + (cfg.shift - 1) * table)
    sigma_max, sigma_min = table[0].item(), table[-1].item()
    sigmas = np.linspace(sigma_max * n, sigma_min * n, num_steps) / n
    return cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)


def dynamic_sigmas(cfg: FlowConfig, num_steps: int, image_seq_len: int) -> np.ndarray:
    """(N,) float32 sigmas of the dynamic shift: FluxPipeline's linspace(1, 1/N, N), exponentially shifted by mu."""
    mu = calculate_shift(image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                         cfg.max_shift)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


@dataclass(frozen=True)
class FlowMatchEuler:
    sigmas: torch.Tensor     # (N + 1,) fp32, descending, ending at 0
    timesteps: torch.Tensor  # (N,) fp32: sigma * num_train_timesteps, what the model is given

    @classmethod
    def create(cls, num_steps: int, flow: FlowConfig = FlowConfig(), image_seq_len: int | None = None,
               pipeline_sigmas: bool = False) -> "FlowMatchEuler":
        """The schedule of N steps. image_seq_len: the image's token count ((h/2)(w/2) latent patches),
        which the dynamic shift needs. pipeline_sigmas: the pipeline passes linspace(1, 1/N, N) as the
        sigmas to shift, as FluxPipeline does whether the shift is dynamic or static (the dynamic shift
        always starts from them)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        if flow.use_dynamic_shifting:
            if image_seq_len is None:
                raise ValueError("a dynamic shift (use_dynamic_shifting) needs image_seq_len, the image's token count")
            sigmas = dynamic_sigmas(flow, num_steps, image_seq_len)
        else:
            sigmas = static_sigmas(flow, num_steps, pipeline_sigmas)
        sigmas = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
        return cls(torch.cat([sigmas, torch.zeros(1)]), sigmas * flow.num_train_timesteps)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def calls(self) -> tuple[Call, ...]:
        """Call i at step i's timestep (rounded to an int for the record; the model gets `timesteps[i]`)."""
        return tuple(Call(round(float(t)), i) for i, t in enumerate(self.timesteps))

    def step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """x at sigma_i -> x at sigma_{i+1}: x + (sigma_{i+1} - sigma_i) v, in fp32, cast back to v's dtype
        (as the scheduler's step)."""
        return (x.float() + (self.sigmas[i + 1] - self.sigmas[i]) * v).to(v.dtype)

    def inverse_step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """x at sigma_{i+1} -> x at sigma_i (reverse-Euler inversion walks i = N-1 .. 0): the same line
        followed back, x + (sigma_i - sigma_{i+1}) v, with v evaluated at the starting point (sigma_{i+1},
        whose timestep is sigma_{i+1} * 1000; 0 at the clean image)."""
        return (x.float() + (self.sigmas[i] - self.sigmas[i + 1]) * v).to(v.dtype)
