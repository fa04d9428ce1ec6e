"""SDXL's added conditioning: the vector `y` its UNet adds to the timestep embedding.

y = [pooled text | original size | crop top-left | target size], each of the six size numbers
(height before width, in pixels) embedded sinusoidally at `size_embed_dim` channels, as SGM's
`ConcatTimestepEmbedderND` does (its `outdim`; diffusers' `addition_time_embed_dim`): SDXL base's
1280 + 6 * 256 = 2816 = `adm_in_channels`. The width is the model's config (SDXLTextConfig.size_embed_dim),
never a constant here. The defaults are those of diffusers' SDXL pipeline: both sizes are the picture's,
the crop is (0, 0).
"""
from __future__ import annotations

import torch

from .unet import timestep_embedding

BASE_SIZE_EMBED_DIM = 256  # SDXL base's width of each size number's embedding: a default, the config says
N_SIZE_IDS = 6        # original (h, w), crop (top, left), target (h, w)


def size_ids(height: int, width: int, original_size=None, crop_top_left=(0, 0), target_size=None) -> list[int]:
    """The six size numbers: original_size and target_size default to (height, width), the picture's size."""
    original_size = (height, width) if original_size is None else tuple(original_size)
    target_size = (height, width) if target_size is None else tuple(target_size)
    ids = [*original_size, *tuple(crop_top_left), *target_size]
    if len(ids) != N_SIZE_IDS:
        raise ValueError(f"original_size, crop_top_left and target_size must be pairs (height, width) / "
                         f"(top, left), got {original_size}, {tuple(crop_top_left)}, {target_size}")
    return ids


def vector_conditioning(pooled: torch.Tensor, height: int, width: int, original_size=None, crop_top_left=(0, 0),
                        target_size=None, size_embed_dim: int = BASE_SIZE_EMBED_DIM) -> torch.Tensor:
    """y (B, pooled_dim + 6 * size_embed_dim) for `unet(x, t, context, y=y)`, from the pooled text
    embeddings (B, pooled_dim) and the size conditioning shared by the batch (see `size_ids`), each
    number embedded at `size_embed_dim` channels."""
    if pooled.dim() != 2:
        raise ValueError(f"pooled text embeddings must be (batch, channels), got shape {tuple(pooled.shape)}")
    ids = torch.tensor(size_ids(height, width, original_size, crop_top_left, target_size), device=pooled.device)
    sizes = timestep_embedding(ids, size_embed_dim).reshape(1, N_SIZE_IDS * size_embed_dim)  # (1, 6 x width)
    return torch.cat([pooled, sizes.to(pooled.dtype).expand(pooled.shape[0], -1)], dim=1)
