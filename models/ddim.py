"""DDIM (eta = 0) as Stable Diffusion v1 uses it.

Scaled-linear betas from 0.00085 to 0.012 over 1000 steps; "leading" timesteps with an offset
(steps_offset=1 gives 981, 961, ..., 1 for 50 steps, as CompVis and diffusers' DDIMScheduler with
steps_offset=1); the last step lands on alpha_cumprod[0], not on 1 (set_alpha_to_one=False).
One UNet call per step, call i reading row i of the edit schedules (models/sampler.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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
               prediction_type: str = "epsilon") -> "DDIM":
        """prediction_type: checked only; DDIM's move is the same whatever the model predicts, since it
        is given eps at the call's own x and t (sd.eps converts)."""
        prediction(prediction_type)
        if not 1 <= num_steps <= num_train_timesteps:
            raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
        step = num_train_timesteps // num_steps
        room = num_train_timesteps - (num_steps - 1) * step  # the first timestep is (S - 1) step + offset
        if not 0 <= steps_offset < room:
            raise ValueError(f"steps_offset must be in [0, {room - 1}] for "
                             f"{num_steps} steps (the first timestep, {(num_steps - 1) * step} + offset, must stay "
                             f"below {num_train_timesteps}), got {steps_offset}")
        timesteps = torch.arange(0, num_steps, dtype=torch.int64).flip(0) * step + steps_offset
        return cls(alphas_cumprod(beta_start, beta_end, num_train_timesteps), timesteps, step)

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


def alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                   num_train_timesteps: int = 1000) -> torch.Tensor:
    """(T,) fp32 cumulative products of 1 - beta, betas "scaled_linear": linear in sqrt(beta)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_update(x: torch.Tensor, eps: torch.Tensor, a_from, a_to) -> torch.Tensor:
    """The deterministic (eta 0) DDIM move of x from alpha_cumprod a_from to a_to, with noise eps."""
    return noised(from_eps("sample", eps, x, *vp(a_from)), eps, *vp(a_to))
