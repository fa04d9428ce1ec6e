"""What a model predicts, and the conversions between the kinds: the one place eps, v, x0 and a
flow-matching velocity meet.

A noisy latent is x_t = alpha x0 + sigma eps (alpha, sigma: the signal and noise coefficients at t;
for an alpha_cumprod schedule, `vp(a)` = (sqrt(a), sqrt(1 - a))). A model predicts one of:

    epsilon  eps
    v        v = alpha eps - sigma x0 (Salimans & Ho 2022), for alpha^2 + sigma^2 = 1 (SD 2.x 768-v)
    sample   x0
    flow     u = eps - x0, the rectified-flow velocity (alpha = 1 - sigma)

Each kind is one row of PREDICTIONS: how it becomes eps, how eps becomes it, and how it gives x0, at
one x_t. A sampler reads x0 and eps from the prediction itself (`x0_and_eps`): at zero signal (alpha 0,
the first timestep of zero-terminal-SNR betas with trailing spacing) v still gives x0 = -v, while eps
(= x_t there) carries nothing of x0. The functions compute in the dtype they are given; `as_eps` and
`x0_and_eps` (what sd.eps and the samplers use) compute in fp32 and return the input's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Prediction:
    to_eps: Callable    # (prediction, x_t, alpha, sigma) -> eps
    from_eps: Callable  # (eps, x_t, alpha, sigma) -> prediction
    to_x0: Callable     # (prediction, x_t, alpha, sigma) -> x0


PREDICTIONS = {
    "epsilon": Prediction(lambda p, x, al, s: p, lambda e, x, al, s: e, lambda p, x, al, s: (x - s * p) / al),
    "v": Prediction(lambda p, x, al, s: al * p + s * x, lambda e, x, al, s: (e - s * x) / al,
                    lambda p, x, al, s: al * x - s * p),
    "sample": Prediction(lambda p, x, al, s: (x - al * p) / s, lambda e, x, al, s: (x - s * e) / al,
                         lambda p, x, al, s: p),
    "flow": Prediction(lambda p, x, al, s: (x + al * p) / (al + s), lambda e, x, al, s: e - (x - s * e) / al,
                       lambda p, x, al, s: (x - s * p) / (al + s)),
}


def prediction(kind: str) -> Prediction:
    try:
        return PREDICTIONS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown prediction type {kind!r}; known: {', '.join(PREDICTIONS)}") from None


def vp(a):
    """(alpha, sigma) of a variance-preserving schedule at alpha_cumprod a: (sqrt(a), sqrt(1 - a))."""
    return a ** 0.5, (1 - a) ** 0.5


def noised(x0, eps, alpha, sigma):
    """x_t = alpha x0 + sigma eps."""
    return alpha * x0 + sigma * eps


def to_eps(kind: str, pred, x, alpha, sigma):
    """eps from a prediction of `kind` at x_t."""
    return prediction(kind).to_eps(pred, x, alpha, sigma)


def from_eps(kind: str, eps, x, alpha, sigma):
    """The prediction of `kind` that eps at x_t amounts to (kind "sample": the x0 estimate)."""
    return prediction(kind).from_eps(eps, x, alpha, sigma)


def as_eps(kind: str, out: torch.Tensor, x: torch.Tensor, a) -> torch.Tensor:
    """A model's output (a prediction of `kind` at x_t, alpha_cumprod a) as eps, in fp32, returned in
    out's dtype; an epsilon model's output as it is."""
    if kind == "epsilon":
        return out
    return to_eps(kind, out.float(), x.float(), *vp(a)).to(out.dtype)


def x0_and_eps(kind: str, out: torch.Tensor, x: torch.Tensor, a) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) that a model's output (a prediction of `kind` at x_t, alpha_cumprod a) amounts to, each read
    from the prediction itself, as diffusers' DDIMScheduler.step reads them (v: x0 = sqrt(a) x - sqrt(1 - a) v,
    eps = sqrt(a) v + sqrt(1 - a) x, defined at a = 0 too). An epsilon model's in its own dtype
    (x0 = (x - sqrt(1 - a) eps) / sqrt(a), eps as it is); other kinds in fp32, returned in out's dtype."""
    p = prediction(kind)
    if kind == "epsilon":
        return p.to_x0(out, x, *vp(a)), out
    out32, x32, (alpha, sigma) = out.float(), x.float(), vp(a)
    return (p.to_x0(out32, x32, alpha, sigma).to(out.dtype), p.to_eps(out32, x32, alpha, sigma).to(out.dtype))
