"""PIE-Bench's pixel metrics of the unedited region: MSE, PSNR and SSIM, as its evaluate.py computes them.

The official masking: both pictures are scaled to [0, 1] and multiplied by `1 - mask` (mask 1 = the edited
region), so the edited region becomes black in both; the two whole frames then go to torchmetrics
(`MeanSquaredError`, `PeakSignalNoiseRatio(data_range=1.0)`, `StructuralSimilarityIndexMeasure(data_range=1.0)`).
The edited region therefore still counts, as pixels that agree exactly: every mean below is over the whole
frame unless `average="region"` asks for the unedited pixels alone (not the benchmark's numbers).

SSIM is torchmetrics' default: a gaussian window of 11 taps, sigma 1.5, k1 = 0.01, k2 = 0.03, per channel,
the map averaged over channels and positions. Which positions depends on the torchmetrics version: up to
1.4.1 it padded by reflection and then cut the padded border off again (so only windows that lie inside the
picture count: `border="valid"`, what the benchmark's 2023 numbers used); from 1.4.2 on it keeps every pixel,
windows reaching into the reflected border (`border="reflect"`). (From 1.3 on it also clamps the variances at
0, which changes only rounding, and is not done here.)
Arithmetic is float64. The benchmark's float32 call differs from it by float32's rounding: under 3e-7 relative
for MSE and PSNR, up to about 2e-5 for SSIM, whose variances are differences of nearly equal numbers.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import gaussian_window
from .inputs import rgb_picture

AVERAGES = ("frame", "region")
SSIM_BORDERS = ("valid", "reflect")
SSIM_SIZE, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def edit_mask(mask, shape: tuple) -> np.ndarray:
    """mask as a float64 (H, W) array of 0 and 1 (1 = the edited region) of the pictures' size, or a ValueError."""
    array = np.asarray(mask)
    if array.shape != tuple(shape[:2]):
        raise ValueError(f"mask: shape {array.shape}, but the pictures are {tuple(shape[:2])}; "
                         "give the (H, W) mask of the edited region at the pictures' size")
    array = array.astype(np.float64)
    if not np.isin(array, (0.0, 1.0)).all():
        raise ValueError(f"mask: values must be 0 or 1 (1 = edited), found {np.unique(array)[:6]}...; "
                         "a 0/255 mask divided by 255 gives one")
    return array


def unit(picture: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float64 (1, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(picture)).permute(2, 0, 1)[None].double() / 255


def checked(source, edited, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two pictures in [0, 1], (1, 3, H, W) float64, and the unedited region `keep` = 1 - mask, (1, 1, H, W)."""
    source, edited = rgb_picture(source, "source"), rgb_picture(edited, "edited")
    if source.shape != edited.shape:
        raise ValueError(f"source {source.shape} and edited {edited.shape} differ in size; the benchmark compares "
                         "pictures of one size (it crops an edited picture that is not square to its last 512x512)")
    keep = 1 - torch.from_numpy(edit_mask(mask, source.shape))[None, None]
    return unit(source), unit(edited), keep


def mean_squared_error(source, edited, mask, average: str = "frame") -> float:
    """mse_unedit_part: the mean of (x - y)^2 over the blacked-out frames' every value (`frame`, official) or
    over the unedited pixels' values (`region`); nan when nothing is unedited, as the benchmark."""
    if average not in AVERAGES:
        raise ValueError(f"average={average!r}: choose one of {AVERAGES}")
    x, y, keep = checked(source, edited, mask)
    if keep.sum() == 0:
        return math.nan
    squared = ((x - y) * keep) ** 2          # (x * keep - y * keep)^2: the blacked-out pictures' difference
    if average == "frame":
        return float(squared.mean())
    return float(squared.sum() / (keep.sum() * x.shape[1]))


def peak_signal_noise_ratio(source, edited, mask, average: str = "frame") -> float:
    """psnr_unedit_part: 10 log10(1 / MSE) with the data range 1 (inf where the unedited parts agree exactly)."""
    mse = mean_squared_error(source, edited, mask, average)
    if math.isnan(mse):
        return math.nan
    return math.inf if mse == 0 else -10 * math.log10(mse)


def band(size_in: int, border: str, dtype) -> torch.Tensor:
    """The gaussian window along one side as a matrix: (positions kept, pixels in), each row the 1-D window at its
    place; `valid` keeps the size_in - 10 positions whose window lies inside the picture, `reflect` all size_in
    positions of the picture padded by reflection (so the matrix reads size_in + 10 pixels)."""
    g = gaussian_window(SSIM_SIZE, SSIM_SIGMA).to(dtype).sum(1)        # the 1-D gaussian: the window is separable
    cols = size_in + (SSIM_SIZE - 1 if border == "reflect" else 0)
    rows = cols - SSIM_SIZE + 1
    m = torch.zeros(rows, cols, dtype=dtype)
    for i in range(rows):
        m[i, i:i + SSIM_SIZE] = g
    return m


def blur(t: torch.Tensor, border: str) -> torch.Tensor:
    """The gaussian window's weighted mean around each position, per channel: (..., H, W) -> (..., H', W')
    ((H - 10, W - 10) for `valid`, (H, W) for `reflect`)."""
    height, width = t.shape[-2:]
    if border == "reflect":
        pad = SSIM_SIZE // 2
        t = F.pad(t.reshape(-1, *t.shape[-3:]), (pad,) * 4, mode="reflect").reshape(*t.shape[:-2], height + 2 * pad,
                                                                                    width + 2 * pad)
    return band(height, border, t.dtype) @ t @ band(width, border, t.dtype).T


def ssim_map(x: torch.Tensor, y: torch.Tensor, border: str = "valid") -> torch.Tensor:
    """SSIM (Wang et al. 2004) at each position and channel, (1, 3, H', W'), for [0, 1] pictures."""
    mx, my, xx, yy, xy = blur(torch.stack([x, y, x * x, y * y, x * y]), border)    # five local means at once
    sxx, syy, sxy = xx - mx ** 2, yy - my ** 2, xy - mx * my
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2                               # (k * data_range)^2, data_range = 1
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))


def structural_similarity(source, edited, mask, border: str = "valid", average: str = "frame") -> float:
    """ssim_unedit_part: SSIM of the blacked-out frames averaged over every position (`frame`, official), or SSIM
    of the untouched pictures averaged over the positions of unedited pixels (`region`); nan when none is."""
    if border not in SSIM_BORDERS or average not in AVERAGES:
        raise ValueError(f"border={border!r}, average={average!r}: choose border from {SSIM_BORDERS} and "
                         f"average from {AVERAGES}")
    x, y, keep = checked(source, edited, mask)
    if keep.sum() == 0:
        return math.nan
    if average == "frame":
        return float(ssim_map(x * keep, y * keep, border).mean())
    pad = SSIM_SIZE // 2
    where = keep[..., pad:-pad, pad:-pad] if border == "valid" else keep
    if where.sum() == 0:
        return math.nan
    return float((ssim_map(x, y, border) * where).sum() / (where.sum() * x.shape[1]))
