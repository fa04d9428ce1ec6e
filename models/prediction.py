"""What a model predicts, and the conversions between the kinds: the one place eps, v, x0 and a
flow-matching velocity meet.

A noisy latent is x_t = alpha x0 + sigma eps (alpha, sigma: the signal and noise coefficients at t;
for an alpha_cumprod schedule, `vp(a)` = (sqrt(a), sqrt(1 - a))). A model predicts one of:

    epsilon  eps
    v        v = alpha eps - sigma x0 (Salimans & Ho 2022), for alpha^2 + sigma^2 = 1 (SD 2.x 768-v)
    sample   x0
    flow     u = eps - x0, the rectified-flow velocity (alpha = 1 - sigma)

Each kind is one row of PREDICTIONS: how it becomes eps and how eps becomes it, at one x_t. The
functions compute in the dtype they are given; `as_eps` / `as_prediction` (what sd.eps and PLMS
use) compute in fp32 and return the input's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Prediction:
    to_eps: Callable    # (prediction, x_t, alpha, sigma) -> eps
    from_eps: Callable  # (eps, x_t, alpha, sigma) -> prediction


PREDICTIONS = {
    "epsilon": Prediction(lambda p, x, al, s: p, lambda e, x, al, s: e),
    "v": Prediction(lambda p, x, al, s: al * p + s * x, lambda e, x, al, s: (e - s * x) / al),
    "sample": Prediction(lambda p, x, al, s: (x - al * p) / s, lambda e, x, al, s: (x - s * e) / al),
    "flow": Prediction(lambda p, x, al, s: (x + al * p) / (al + s), lambda e, x, al, s: e - (x - s * e) / al),
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


def as_prediction(kind: str, eps: torch.Tensor, x: torch.Tensor, a) -> torch.Tensor:
    """eps at x_t (alpha_cumprod a) as a prediction of `kind`, in fp32, returned in eps's dtype."""
    if kind == "epsilon":
        return eps
    return from_eps(kind, eps.float(), x.float(), *vp(a)).to(eps.dtype)
