"""PLMS: the PNDM sampler in its pseudo linear multistep mode, as the reference's stable notebook ran
SD v1.4 (diffusers' PNDMScheduler with skip_prk_steps, SD v1.4's scheduler config).

Schedule, timesteps and update are DDIM's (models/ddim.py): each step is the eta-0 DDIM move, which is
PNDM's transfer formula, with eps replaced by a linear multistep (Adams-Bashforth) extrapolation of
the UNet's past outputs. To start the history, the first step is taken twice: N steps are N + 1 UNet
calls (981, 961, 961, 941, ..., 1 for 50). Call by call, e_k being the UNet output of call k:

    call 0 at t_0: e_0, and x_{t_0} is kept                  t_0 -> t_1
    call 1 at t_1: (e_1 + e_0) / 2, from the kept x_{t_0}     t_0 -> t_1 again (e_1 is not kept)
    call 2 at t_1: (3 e_2 - e_0) / 2                          t_1 -> t_2
    call 3:        (23 e_3 - 16 e_2 + 5 e_0) / 12, then (55, -59, 37, -9) / 24 on the last four.

The kept outputs are the state of one run: a sampler serves one run (sd.scheduler makes a fresh one).
Its name is "plms" or "pndm" (SAMPLERS). Call j reads row j of the edit schedules (models/sampler.py).
What is extrapolated is what the model predicts, as in diffusers' PNDMScheduler: each call is given
the model's own output (eps for an epsilon model, v for a v model, SD 2.x 768-v), and DDIM's step reads
the extrapolated prediction at the update's x and t. (eps at different x and t, extrapolated, would be
a different sampler.) Both are held to diffusers in tests/test_parity_pndm.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import PREDICTION_TYPES, NoiseSchedule
from .ddim import DDIM
from .sampler import Call, one_call_per_row

# Adams-Bashforth weights on the last 1..4 kept outputs (newest first), and their common divisor
ADAMS_BASHFORTH = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


@dataclass
class PLMSHistory:
    """What a PLMS run carries from one UNet call to the next."""
    calls: int = 0
    outputs: list = field(default_factory=list)   # the last (at most 4) kept UNet outputs, oldest first
    x_first: torch.Tensor | None = None           # x at the first timestep, which call 1 starts from again


@dataclass(frozen=True)
class PNDM:
    ddim: DDIM  # the noise schedule, the N step timesteps, what the model predicts, and the update each call takes
    history: PLMSHistory = field(default_factory=PLMSHistory, repr=False, compare=False)

    @classmethod
    def create(cls, num_steps: int = 50, steps_offset: int = 1, beta_start: float = 0.00085,
               beta_end: float = 0.012, num_train_timesteps: int = 1000,
               prediction_type: str = "epsilon", schedule: NoiseSchedule = NoiseSchedule()) -> "PNDM":
        if prediction_type not in PREDICTION_TYPES:  # diffusers' PNDMScheduler's two
            raise ValueError(f"prediction_type must be 'epsilon' or 'v', got {prediction_type!r}")
        return cls(DDIM.create(num_steps, steps_offset, beta_start, beta_end, num_train_timesteps, prediction_type,
                               schedule))

    @property
    def prediction_type(self) -> str:
        """What is extrapolated: the model's prediction, "epsilon" or "v"."""
        return self.ddim.prediction_type

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.ddim.alphas_cumprod

    @property
    def num_steps(self) -> int:
        return self.ddim.num_steps

    @property
    def calls(self) -> tuple[Call, ...]:
        """N + 1 calls, call j reading row j of the (N + 1)-row edit schedules, as the reference's
        counter, which advanced once per UNet call."""
        return one_call_per_row(self.timesteps)

    @property
    def timesteps(self) -> torch.Tensor:
        """The UNet calls' timesteps, descending: t_0, t_1, t_1, t_2, ..., (N + 1,) for N > 1 steps."""
        t = self.ddim.timesteps
        return torch.cat([t[:2], t[1:]]) if len(t) > 1 else t

    def step(self, out: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """The latents after this UNet call (its output `out`, the model's prediction at timestep t on latents x)."""
        h, t = self.history, int(t)
        expected = self.timesteps.tolist()
        if h.calls >= len(expected) or t != expected[h.calls]:
            raise ValueError(f"PLMS call {h.calls} at timestep {t}, but this sampler's calls are at {expected} "
                             f"and {h.calls} were made: a PLMS sampler keeps the history of one run; take a fresh "
                             f"one (sd.scheduler(..., sampler='plms')) for each run and call it at its timesteps")
        call, h.calls = h.calls, h.calls + 1
        if call == 1:  # the first step again, from the kept x, with the mean of both outputs
            x, h.x_first = h.x_first, None
            return self.ddim.step((out + h.outputs[-1]) / 2, expected[0], x)
        if call == 0:
            h.x_first = x
        h.outputs = h.outputs[-3:] + [out]
        weights, divisor = ADAMS_BASHFORTH[len(h.outputs)]
        e = sum(w * e_k for w, e_k in zip(weights, reversed(h.outputs))) / divisor
        return self.ddim.step(e, t, x)
