"""Per-edit metrics for ablations: how much of the source survives, how much changed, where attention went.

* background preservation: PSNR and SSIM of the edit against the source, outside the LocalBlend
  mask (the whole image without one). SSIM is Wang et al. 2004 with a gaussian window (11, sigma
  1.5), computed per channel on [0, 1] images with reflect padding, its map averaged over the
  chosen pixels.
* change inside the mask: mean |edit - source| (0..1) over the mask's pixels.
* latent distance: ||z0_src - z0_edit||_2.
* attention IoU (`iou`): the edited word's and the replaced word's cross-attention maps (deepest down/up
  level, 16x16 for SD v1 at 512 px), each divided by its max and thresholded, as sets of pixels;
  nan when both sets are empty (no IoU exists then), as every metric here over an empty region.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .align import word_token_indices


def _img(x) -> torch.Tensor:
    """uint8 (H, W, 3) -> float64 (1, 3, H, W) in [0, 1]."""
    return torch.as_tensor(np.asarray(x)).permute(2, 0, 1)[None].double() / 255


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_map(a, b, size: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> torch.Tensor:
    """SSIM at each pixel, (H, W), averaged over channels. a, b: uint8 (H, W, 3) images."""
    x, y = _img(a), _img(b)
    C = x.shape[1]
    w = gaussian_window(size, sigma).to(x)[None, None].expand(C, 1, size, size)
    pad = size // 2

    def blur(t):
        return F.conv2d(F.pad(t, (pad,) * 4, mode="reflect"), w, groups=C)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s[0].mean(0)


def ssim(a, b, where=None) -> float:
    """Mean SSIM over the pixels where `where` (bool (H, W)) is True, or over all of them."""
    m = ssim_map(a, b)
    if where is not None:
        where = torch.as_tensor(where, dtype=torch.bool)
        return float(m[where].mean()) if where.any() else float("nan")
    return float(m.mean())


def _diff(a, b, where) -> np.ndarray | None:
    """a - b (float64, uint8 units) at the pixels where `where` (bool (H, W)) is True, or everywhere;
    None for an empty region (the metrics over it are nan: undefined, not perfect)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if where is None:
        return d
    where = np.asarray(where, bool)
    return d[where] if where.any() else None


def psnr(a, b, where=None) -> float:
    """10 log10(255^2 / MSE) over the pixels where `where` is True (all channels); inf if equal."""
    d = _diff(a, b, where)
    if d is None:
        return float("nan")
    mse = (d ** 2).mean()
    return float("inf") if mse == 0 else float(10 * math.log10(255 ** 2 / mse))


def mean_abs_change(a, b, where=None) -> float:
    """Mean |a - b| on 0..1 over the pixels where `where` is True (all channels)."""
    d = _diff(a, b, where)
    return float("nan") if d is None else float((np.abs(d) / 255).mean())


def latent_l2(z_src: torch.Tensor, z_edit: torch.Tensor) -> float:
    return float((z_src.double() - z_edit.double()).norm())


def iou(a, b, empty: float = float("nan")) -> float:
    """|a & b| / |a | b| of two bool masks (torch or numpy, same shape): the project's one IoU.

    Two empty masks have no IoU: the result is `empty`, nan by default, so that a mean over cases
    (np.nanmean) leaves such a case out instead of counting it as a perfect or a failed match, and a
    plain mean shows it. Pass empty=0.0 (or 1.0) where a number is needed and its meaning is clear."""
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else float(empty)


def word_map(store, tokenizer, prompt: str, select: int, words, level: int | None = None) -> torch.Tensor:
    """The step-averaged cross-attention of `words` (a word, position, or tuple: columns summed) in prompt
    `select` at `level` (`store.read_level`'s rule: the deepest when None), (h, w), divided by its max."""
    m = store.level_maps(level, select)[..., word_token_indices(tokenizer, prompt, words)].sum(-1)
    peak = m.max()
    return m / peak if peak > 0 else m


def attention_iou(store, tokenizer, prompts, select: int, src_words, edit_words, threshold: float = 0.3,
                  level: int | None = None) -> float:
    """IoU of {map > threshold} for src_words in prompts[0] and edit_words in prompts[select]."""
    a = word_map(store, tokenizer, prompts[0], 0, src_words, level) > threshold
    b = word_map(store, tokenizer, prompts[select], select, edit_words, level) > threshold
    return iou(a, b)


def changed_words(source: str, edited: str):
    """The word positions where an edited prompt with the same word count differs (a word swap)."""
    a, b = source.split(" "), edited.split(" ")
    if len(a) != len(b):
        return None
    pos = tuple(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return pos or None


def blend_mask(local_blend, store, tokenizer, prompts, num_steps: int, sites, latent_size) -> torch.Tensor:
    """The LocalBlend mask of the last step, bool (B, h, w) at the latent's size (row 0: the source's)."""
    return local_blend.build(tokenizer, prompts, num_steps, sites).mask_for(store, latent_size)[:, 0]


def upsample_mask(mask: torch.Tensor, size) -> np.ndarray:
    """bool (h, w) -> bool (H, W), nearest."""
    m = F.interpolate(mask[None, None].float(), size=tuple(size), mode="nearest")[0, 0]
    return m.bool().cpu().numpy()
