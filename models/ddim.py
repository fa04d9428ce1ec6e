"""DDIM (eta = 0) as Stable Diffusion v1 uses it, and as diffusers' DDIMScheduler does for the
schedules other models name (models.config.NoiseSchedule).

SD's: scaled-linear betas from 0.00085 to 0.012 over 1000 steps; "leading" timesteps with an offset
(steps_offset=1 gives 981, 961, ..., 1 for 50 steps, as CompVis and diffusers' DDIMScheduler with
steps_offset=1); the last step lands on alpha_cumprod[0], not on 1 (set_alpha_to_one=False).
Others: "linear" or "squaredcos_cap_v2" betas, or given ones; the betas rescaled to zero terminal SNR;
"trailing" (999, 979, ... for 50 steps) or "linspace" timesteps, where the offset is not used. Every
step moves from t to t - 1000 // N, as diffusers' DDIMScheduler, whatever the spacing.
One UNet call per step, call i reading row i of the edit schedules (models/sampler.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import NoiseSchedule
from .prediction import from_eps, noised, prediction, vp
from .sampler import Call, one_call_per_row


@dataclass(frozen=True)
class DDIM:
    alphas_cumprod: torch.Tensor  # (1000,) fp32, on the CPU
    timesteps: torch.Tensor       # (S,) int64, descending
    step_size: int                # 1000 // S: the gap between consecutive timesteps

    @classmethod
    def create(cls, num_steps: int = 50, steps_offset: int = 1, beta_start: float = 0.00085,
               beta_end: float = 0.012, num_train_timesteps: int = 1000,
               prediction_type: str = "epsilon", schedule: NoiseSchedule = NoiseSchedule()) -> "DDIM":
        """prediction_type: checked only; DDIM's move is the same whatever the model predicts, since it
        is given eps at the call's own x and t (sd.eps converts). schedule: the betas' shape and the
        timesteps' spacing (SD's by default); steps_offset applies to "leading" spacing alone."""
        prediction(prediction_type)
        if not 1 <= num_steps <= num_train_timesteps:
            raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
        timesteps = spaced_timesteps(schedule.spacing, num_steps, num_train_timesteps, steps_offset)
        return cls(alphas_cumprod(beta_start, beta_end, num_train_timesteps, schedule), timesteps,
                   num_train_timesteps // num_steps)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def calls(self) -> tuple[Call, ...]:
        return one_call_per_row(self.timesteps)

    def alpha(self, t: int) -> torch.Tensor:
        """alpha_cumprod at a timestep; negative t (before the first) is alpha_cumprod[0]."""
        return self.alphas_cumprod[t] if t >= 0 else self.alphas_cumprod[0]

    def prev_timestep(self, t: int) -> int:
        return int(t) - self.step_size

    def step(self, eps: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """x_t -> x_{t-step}: x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t); x_prev = sqrt(a_prev) x0 + sqrt(1-a_prev) eps."""
        t = int(t)
        return ddim_update(x, eps, self.alpha(t), self.alpha(self.prev_timestep(t)))

    def inverse_step(self, eps: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """x_{t-step} -> x_t, the step DDIM inversion takes: the same update with the roles swapped.

        The reference evaluates eps at the destination timestep t (not at t - step)."""
        t = int(t)
        return ddim_update(x, eps, self.alpha(self.prev_timestep(t)), self.alpha(t))


def spaced_timesteps(spacing: str, num_steps: int, num_train_timesteps: int, steps_offset: int) -> torch.Tensor:
    """(S,) int64 descending timesteps, placed as diffusers' DDIMScheduler.set_timesteps does."""
    if spacing == "trailing":
        return torch.from_numpy(np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps))
                                .astype(np.int64) - 1)
    if spacing == "linspace":
        return torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64))
    step = num_train_timesteps // num_steps
    room = num_train_timesteps - (num_steps - 1) * step  # the first timestep is (S - 1) step + offset
    if not 0 <= steps_offset < room:
        raise ValueError(f"steps_offset must be in [0, {room - 1}] for "
                         f"{num_steps} steps (the first timestep, {(num_steps - 1) * step} + offset, must stay "
                         f"below {num_train_timesteps}), got {steps_offset}")
    return torch.arange(0, num_steps, dtype=torch.int64).flip(0) * step + steps_offset


# alpha_cumprod where a zero-terminal-SNR schedule reaches 0: the model's prediction cannot be carried as eps
# at zero signal (eps = x there), so that timestep is sampled at this tiny signal, as diffusers' Euler schedulers do
ZERO_SNR_FLOOR = 2.0 ** -24


def betas(beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
          schedule: NoiseSchedule = NoiseSchedule()) -> torch.Tensor:
    """(T,) fp32 betas as diffusers' DDIMScheduler makes them: given, "scaled_linear" (linear in
    sqrt(beta), SD's), "linear", or "squaredcos_cap_v2" (the cosine schedule, betas capped at 0.999);
    then rescaled to zero terminal SNR where the schedule says so."""
    if schedule.trained_betas is not None:
        out = torch.tensor(schedule.trained_betas, dtype=torch.float32)
    elif schedule.beta_schedule == "linear":
        out = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif schedule.beta_schedule == "squaredcos_cap_v2":
        bar = [math.cos((i / num_train_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
               for i in range(num_train_timesteps + 1)]
        out = torch.tensor([min(1 - bar[i + 1] / bar[i], 0.999) for i in range(num_train_timesteps)],
                           dtype=torch.float32)
    else:
        out = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return rescale_zero_snr(out) if schedule.zero_snr else out


def rescale_zero_snr(b: torch.Tensor) -> torch.Tensor:
    """Betas whose sqrt(alpha_cumprod) is shifted to 0 at the last timestep and scaled back to its value
    at the first (Lin et al. 2023, Algorithm 1; diffusers' rescale_zero_terminal_snr)."""
    root = torch.cumprod(1.0 - b, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    bar = root ** 2
    return 1 - torch.cat([bar[0:1], bar[1:] / bar[:-1]])


def alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
                   schedule: NoiseSchedule = NoiseSchedule()) -> torch.Tensor:
    """(T,) fp32 cumulative products of 1 - beta (see `betas`); a zero-terminal-SNR schedule's final 0
    is ZERO_SNR_FLOOR."""
    out = torch.cumprod(1.0 - betas(beta_start, beta_end, num_train_timesteps, schedule), dim=0)
    return out.clamp(min=ZERO_SNR_FLOOR) if schedule.zero_snr else out


def ddim_update(x: torch.Tensor, eps: torch.Tensor, a_from, a_to) -> torch.Tensor:
    """The deterministic (eta 0) DDIM move of x from alpha_cumprod a_from to a_to, with noise eps."""
    return noised(from_eps("sample", eps, x, *vp(a_from)), eps, *vp(a_to))
