"""Which weights a model holds: the fingerprint a saved Inversion records, so that editing it with
another model (of the same shapes, where nothing else would notice) is refused.

It must name any model - a loaded file, the shipped miniature, one built in memory - so it is taken
from the weights, not from a file: every key and shape of `sd.state_dict()`, and SAMPLES values of
every tensor at evenly spaced positions (first and last included). Cost: one small gather per
tensor, never a pass over the weights (tests/test_fingerprint.py; docs/reliability.md has the full-size figure).

Why the sample cannot collide by accident: two different checkpoints of one architecture (another
training run, a fine-tune, a merged LoRA, another VAE) differ in practically every element of every
tensor training touched, so they differ in that tensor's samples too. Only a change confined to
elements between the samples goes unseen - a new textual-inversion token's embedding row, say, or
a hand-edited weight - which is not an accident and leaves the inversion valid elsewhere.

The same file loaded in fp32, fp16 or bf16 is the same model: samples are compared within the
rounding of the coarser precision (its eps relative, eps * smallest-normal absolute for
subnormals), never bit for bit. The digest that names a fingerprint hashes the layout and the
samples at fp16 precision, so fp32 and fp16 loads of one file share it (rounding to fp16 twice
changes nothing); a bf16 load has another digest but still matches.

Computed once per model and cached (keyed by the model; taken again when any tensor was replaced,
moved, cast or changed in place, which a tensor's storage pointer and version counter tell).
"""
from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass

import torch

SAMPLES = 16  # values per tensor
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (tensor states, Fingerprint)


@dataclass(frozen=True, eq=False)
class Fingerprint:
    layout: str            # SHA-256 of every key and shape, in state_dict order
    sample: torch.Tensor   # (N,) float32: SAMPLES values of every tensor
    dtype: str             # the model's dtype when it was taken: the rounding a comparison allows

    @property
    def digest(self) -> str:
        """16 hex digits naming these weights in messages and sidecars."""
        h = hashlib.sha256(self.layout.encode())
        h.update(self.sample.to(torch.float16).numpy().tobytes())
        return h.hexdigest()[:16]

    def matches(self, other: "Fingerprint") -> bool:
        """The same keys and shapes, and every sample equal up to the coarser precision's rounding."""
        if self.layout != other.layout or self.sample.shape != other.sample.shape:
            return False
        info = max((torch.finfo(DTYPES[d]) for d in (self.dtype, other.dtype)), key=lambda f: f.eps)
        return torch.allclose(self.sample, other.sample, rtol=info.eps, atol=info.eps * info.tiny)

    def __str__(self) -> str:
        return f"{self.digest} ({self.dtype})"


def sample_positions(n: int) -> torch.Tensor:
    """SAMPLES evenly spaced flat indices into n elements, the first and the last among them."""
    k = min(SAMPLES, n)
    return torch.arange(k) * (n - 1) // max(k - 1, 1)  # integers: a float linspace rounds past n - 1 for large n


def take(state: dict) -> Fingerprint:
    """The fingerprint of a state dict (name -> tensor)."""
    layout = hashlib.sha256("".join(f"{k}:{tuple(t.shape)}\n" for k, t in state.items()).encode()).hexdigest()
    parts = [t.detach().reshape(-1)[sample_positions(t.numel()).to(t.device)].float() for t in state.values()
             if t.numel()]
    sample = torch.cat(parts).cpu() if parts else torch.zeros(0)
    kinds = {str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()} or {"float32"}
    if kinds - DTYPES.keys():
        raise ValueError(f"a fingerprint covers {', '.join(DTYPES)} weights, not {sorted(kinds - DTYPES.keys())}")
    return Fingerprint(layout, sample, max(kinds, key=lambda d: torch.finfo(DTYPES[d]).eps))  # the coarsest


def fingerprint(model: torch.nn.Module) -> Fingerprint:
    """The model's fingerprint, taken once and cached while its tensors stay as they are."""
    state = model.state_dict()
    key = tuple((t.data_ptr(), t._version, t.device.type, t.dtype) for t in state.values())
    cached = _CACHE.get(model)
    if cached is None or cached[0] != key:
        cached = _CACHE[model] = (key, take(state))
    return cached[1]
