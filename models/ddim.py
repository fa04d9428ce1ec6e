"""DDIM (eta = 0) as Stable Diffusion v1 uses it, and as diffusers' DDIMScheduler does for the
schedules other models name (models.config.NoiseSchedule).

SD's: scaled-linear betas from 0.00085 to 0.012 over 1000 steps; "leading" timesteps with an offset
(steps_offset=1 gives 981, 961, ..., 1 for 50 steps, as CompVis and diffusers' DDIMScheduler with
steps_offset=1); the last step lands on alpha_cumprod[0], not on 1 (set_alpha_to_one=False).
Others: "linear" or "squaredcos_cap_v2" betas, or given ones; the betas rescaled to zero terminal SNR;
"trailing" (999, 979, ... for 50 steps) or "linspace" timesteps, where the offset is not used. Every
step moves from t to t - 1000 // N, as diffusers' DDIMScheduler, whatever the spacing.
One UNet call per step, call i reading row i of the edit schedules (models/sampler.py). Its step is
given the model's own prediction (eps, or v for a v model) and reads x0 and eps from it as diffusers'
DDIMScheduler.step does (models/prediction.py), so a zero-terminal-SNR schedule's first timestep, where
alpha_cumprod is 0, is sampled as diffusers samples it: x0 = -v there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import NoiseSchedule
from .prediction import as_eps, from_eps, noised, prediction, vp, x0_and_eps
from .sampler import Call, one_call_per_row


@dataclass(frozen=True)
class DDIM:
    alphas_cumprod: torch.Tensor  # (1000,) fp32, on the CPU
    timesteps: torch.Tensor       # (S,) int64, descending
    step_size: int                # 1000 // S: the gap between consecutive timesteps
    prediction_type: str = "epsilon"  # what the model predicts: what `step` is given (models/prediction.py)

    @classmethod
    def create(cls, num_steps: int = 50, steps_offset: int = 1, beta_start: float = 0.00085,
               beta_end: float = 0.012, num_train_timesteps: int = 1000,
               prediction_type: str = "epsilon", schedule: NoiseSchedule = NoiseSchedule()) -> "DDIM":
        """prediction_type: what the model predicts, the kind of output `step` is given. schedule: the
        betas' shape and the timesteps' spacing (SD's by default); steps_offset applies to "leading" spacing alone."""
        prediction(prediction_type)
        if not 1 <= num_steps <= num_train_timesteps:
            raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
        timesteps = spaced_timesteps(schedule.spacing, num_steps, num_train_timesteps, steps_offset)
        acp = alphas_cumprod(beta_start, beta_end, num_train_timesteps, schedule)
        check_signal(acp, timesteps, prediction_type, schedule)
        return cls(acp, timesteps, num_train_timesteps // num_steps, prediction_type)

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

    def step(self, out: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """x_t -> x_{t-step}, given the model's output at (x_t, t), a prediction of `prediction_type` (guided):
        x0 and eps read from it (epsilon: x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t); v: x0 = sqrt(a_t) x - sqrt(1-a_t) v,
        eps = sqrt(a_t) v + sqrt(1-a_t) x), then x_prev = sqrt(a_prev) x0 + sqrt(1-a_prev) eps."""
        t = int(t)
        x0, eps = x0_and_eps(self.prediction_type, out, x, self.alpha(t))
        return noised(x0, eps, *vp(self.alpha(self.prev_timestep(t))))

    def inverse_step(self, out: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """x_{t-step} -> x_t, the step DDIM inversion takes: the same update with the roles swapped, given the
        model's output at (x_{t-step}, t) as eps there.

        The reference evaluates eps at the destination timestep t (not at t - step)."""
        t = int(t)
        eps = as_eps(self.prediction_type, out, x, self.alpha(t))
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


def check_signal(acp: torch.Tensor, timesteps: torch.Tensor, prediction_type: str, schedule: NoiseSchedule) -> None:
    """Refuse to sample an epsilon model from a timestep without signal (alpha_cumprod 0: zero-terminal-SNR
    betas at t = T - 1), where its x0 = (x - sqrt(1 - a) eps) / sqrt(a) is 0 / 0 (diffusers' DDIM gives nan)."""
    t = int(timesteps.max())
    if prediction_type == "epsilon" and float(acp[t]) == 0:
        raise ValueError(f"timestep {t} ({schedule.spacing} spacing) has alpha_cumprod 0 on zero-terminal-SNR betas, "
                         f"where an epsilon prediction cannot give x0; zero-SNR betas are for v-prediction models: "
                         f"load the model as one (prediction_type='v') if it is, or use 'leading' spacing, or "
                         f"betas without rescale_betas_zero_snr")


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
    """(T,) fp32 cumulative products of 1 - beta (see `betas`); a zero-terminal-SNR schedule's last is 0."""
    return torch.cumprod(1.0 - betas(beta_start, beta_end, num_train_timesteps, schedule), dim=0)


def ddim_update(x: torch.Tensor, eps: torch.Tensor, a_from, a_to) -> torch.Tensor:
    """The deterministic (eta 0) DDIM move of x from alpha_cumprod a_from to a_to, with noise eps."""
    return noised(from_eps("sample", eps, x, *vp(a_from)), eps, *vp(a_to))
