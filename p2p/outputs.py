"""What a sampling run returns, and the check that stops a run where a number first goes nan or inf: shared by
the UNet loop (p2p/pipeline.py) and the MM-DiT loop (p2p/joint_pipeline.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Output:
    images: np.ndarray            # uint8 (N, H, W, 3)
    latents: torch.Tensor         # z_0 (N, C, h, w), before decoding
    x_T: torch.Tensor             # the initial latent (1 or N, C, h, w)
    attention: object = None      # stored attention maps (p2p.store.AttentionStore), when kept


class NonFiniteError(ValueError):
    """A run produced nan or inf: raised where it first appears, so that nothing is written from it."""


def check_finite(x: torch.Tensor, where: str) -> torch.Tensor:
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{where} holds nan or inf: the checkpoint's weights may hold nan/inf (check them with "
                             "`p2p inspect` and the file's source), or the numbers overflowed (in fp16, decode the "
                             "VAE in fp32; a huge guidance_scale); nothing was written")
    return x


def initial_noise(shape: tuple, seed: int, height: int, width: int, latents=None, batch: int = 1) -> torch.Tensor:
    """x_T of `shape` (C, h, w) for a height x width picture: `latents` if given (1 or `batch` rows, checked),
    else ONE CPU draw from manual_seed(seed), which the batch shares."""
    if latents is None:
        return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))
    latents = torch.as_tensor(latents)
    if latents.dim() != 4 or tuple(latents.shape[1:]) != tuple(shape) or latents.shape[0] not in (1, batch):
        raise ValueError(f"latents must have shape (1 or {batch}, {', '.join(map(str, shape))}) for a "
                         f"{height} x {width} picture, got {tuple(latents.shape)}")
    return latents
