"""A tiny random checkpoint in the original single-file layout, for tests and the demo
(command line: `python -m weights_tools.make_tiny`).

All three prefixes, `position_ids` int64 (1, 77) as real files have, the config as JSON in the
metadata key `ldm_config`. Every weight is non-zero (so a key mix-up shows up in a parity test),
and the same seed gives a byte-identical file.
"""
from __future__ import annotations

import math

import torch

from models import PREFIXES, SDConfig, load_config

from .files import save_safetensors_atomic
from .layout import carried_buffers, model_shapes


def init_tensor(key: str, z: torch.Tensor) -> torch.Tensor:
    """Scale a standard-normal draw `z` like a trained model's weight, so activations neither
    vanish nor explode.

    Linear/conv N(0, 1/fan_in); UNet attention q/k 1.5/sqrt(fan_in) so attention maps are peaked
    (an edit that moves a map then changes the output); embeddings N(0, 1); norm weights
    1 + 0.1 N (kept positive); biases 0.1 N.
    """
    if key.endswith(".bias"):
        return 0.1 * z
    if "embedding" in key:
        return z.clone()
    if z.ndim == 1:  # GroupNorm / LayerNorm weight
        return 1 + 0.1 * z.clamp(-5, 5)
    scale = 1 / math.sqrt(math.prod(z.shape[1:]))
    if key.startswith(PREFIXES["unet"]) and key.endswith((".to_q.weight", ".to_k.weight")):
        scale *= 1.5
    return scale * z


def tiny_state_dict(cfg: SDConfig, seed: int) -> dict[str, torch.Tensor]:
    """One seeded draw for all weights (in sorted key order), split and scaled per tensor."""
    shapes = sorted(model_shapes(cfg).items())
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(sum(math.prod(s) for _, s in shapes), generator=g)
    z[z == 0] = 1.0  # "every weight non-zero", even for an exact zero draw
    state, i = {}, 0
    for key, shape in shapes:
        n = math.prod(shape)
        state[key] = init_tensor(key, z[i:i + n].view(shape))
        i += n
    state |= carried_buffers(cfg)
    return state


TINY_LIMIT = 100_000_000  # parameters; the tiny configs hold a few million, full-size models 0.9 to 3.5 billion


def check_tiny(cfg: SDConfig, where, full_size: bool = False) -> int:
    """The parameter count of `cfg`, counted from its shapes before anything is allocated; a full-size
    model (over TINY_LIMIT) is refused unless `full_size`: drawing it takes twice its fp32 weights."""
    n = sum(math.prod(s) for s in model_shapes(cfg).values())
    if n > TINY_LIMIT and not full_size:
        raise ValueError(f"{where} is a full-size model: {n / 1e9:.2f} billion parameters, about "
                         f"{8 * n / 2**30:.0f} GiB of memory to draw and a {4 * n / 2**30:.1f} GiB file; make_tiny "
                         f"writes tiny models (configs/tiny.yaml, tiny-ldm.yaml, tiny-sd2.yaml, tiny-sdxl.yaml): "
                         f"give one of those, or pass full_size=True (--full-size) to write it anyway")
    return n


def make_tiny(out_path, seed: int = 0, config=None, full_size: bool = False):
    """Write a tiny random checkpoint; `config` is an SDConfig, a YAML path or a configs/ name. A config of
    more than TINY_LIMIT parameters (a full-size one) is refused unless `full_size` (see `check_tiny`).

    The metadata holds one key: safetensors writes metadata in hash order, so a second key would
    make the bytes differ between runs.
    """
    cfg = config if isinstance(config, SDConfig) else load_config(config or "tiny")
    check_tiny(cfg, "the config" if isinstance(config, SDConfig) else f"config {str(config or 'tiny')!r}", full_size)
    return save_safetensors_atomic(tiny_state_dict(cfg, seed), out_path, {"ldm_config": cfg.to_json()})
