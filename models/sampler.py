"""What the sampling loop, the controller and the inversions ask of a sampler.

A sampler serves one run (`StableDiffusion.scheduler` makes a fresh one from SAMPLERS) and provides:

    create(num_steps, steps_offset, beta_start, beta_end, num_train_timesteps, prediction_type, schedule)
                    classmethod; prediction_type is the model's (models/prediction.py): what it
                    predicts, the kind of output `step` is given; schedule its models.config.NoiseSchedule
                    (betas' shape, zero SNR, spacing)
    num_steps       N, the steps of its schedule: the reference's T, whose edit schedules have T + 1 rows
    calls           the UNet calls it will make, in order: Call(timestep, row), row being the row of
                    the (N + 1)-row schedule the controller reads at that call
    step(out, t, x) the latents after the call at timestep t, given the model's output there: its own
                    prediction (sd.predict's output, guided; eps for an epsilon model, v for a v model),
                    which the sampler reads as it needs (DDIM: x0 and eps, `prediction.x0_and_eps`; PLMS
                    extrapolates it). Guidance is affine, and so is every kind's map to eps at one x_t,
                    so guiding the predictions is guiding their eps.

and, where it has one, `inverse_step(out, t, x)`: x at the timestep after t -> x at t, given the model's
output at x and t, which DDIM inversion takes over the calls in reverse (one call per step). The loop
makes one UNet call per entry of `calls`; the controller maps each call to its row.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Call:
    timestep: int  # the UNet's timestep at this call
    row: int       # the row of the reference's (num_steps + 1)-row schedule this call reads


def one_call_per_row(timesteps) -> tuple[Call, ...]:
    """Call i at timesteps[i] reads row i: the reference's counter, which advances once per UNet call."""
    return tuple(Call(int(t), i) for i, t in enumerate(timesteps.tolist()))


def has_inverse_step(sampler) -> bool:
    """Whether a sampler (or its class) has the inverse step that DDIM inversion takes."""
    return callable(getattr(sampler, "inverse_step", None))
