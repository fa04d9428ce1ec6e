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
