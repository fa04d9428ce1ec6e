"""The sweep's metrics: SSIM (gaussian 11, sigma 1.5) against a direct per-pixel evaluation, PSNR, masks, IoU."""
import math

import numpy as np
import pytest
import torch

from p2p import metrics as M


def images(seed=0, n=24):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (n, n, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    return a, b


def direct_ssim(a, b, i, j, size=11, sigma=1.5):
    """SSIM at pixel (i, j) from its 11x11 gaussian-weighted window, per channel, averaged (no padding)."""
    g = np.exp(-(np.arange(size) - size // 2) ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    r = size // 2
    out = []
    for c in range(3):
        x = a[i - r:i + r + 1, j - r:j + r + 1, c] / 255.0
        y = b[i - r:i + r + 1, j - r:j + r + 1, c] / 255.0
        mx, my = (w * x).sum(), (w * y).sum()
        vx, vy, cxy = (w * x * x).sum() - mx ** 2, (w * y * y).sum() - my ** 2, (w * x * y).sum() - mx * my
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        out.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return np.mean(out)


def test_ssim_matches_the_definition_inside_the_image():
    a, b = images()
    m = M.ssim_map(a, b).numpy()
    for i, j in [(5, 5), (12, 7), (18, 18), (9, 15)]:     # windows fully inside: padding plays no part
        assert m[i, j] == pytest.approx(direct_ssim(a, b, i, j), abs=1e-10)


def test_ssim_and_psnr_properties():
    a, b = images()
    assert M.ssim(a, a) == pytest.approx(1.0) and M.psnr(a, a) == math.inf
    assert M.ssim(a, b) == pytest.approx(M.ssim(b, a)) and -1 <= M.ssim(a, b) < 1
    _, c = images(seed=1)
    assert M.psnr(a, b) > M.psnr(a, c)                       # more noise, lower PSNR
    mse = ((a.astype(float) - b) ** 2).mean()
    assert M.psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / mse))


def test_masked_metrics_use_only_the_chosen_pixels():
    a, _ = images()
    b = a.copy()
    b[:, 12:] = 255 - b[:, 12:]                              # change only the right half
    right = np.zeros(a.shape[:2], bool)
    right[:, 12:] = True
    assert M.psnr(a, b, ~right) == math.inf and M.mean_abs_change(a, b, ~right) == 0
    assert M.mean_abs_change(a, b, right) > 0.2
    assert M.ssim(a, b, ~right[:, :]) > M.ssim(a, b)
    assert math.isnan(M.psnr(a, b, np.zeros_like(right)))    # an empty region is undefined, not perfect


def test_iou_and_helpers():
    x = torch.zeros(4, 4, dtype=torch.bool)
    y = x.clone()
    x[:2], y[1:3] = True, True
    assert M.iou(x, y) == pytest.approx(4 / 12) and M.iou(x, x) == 1
    assert M.changed_words("a cat on a mat", "a dog on a rug") == (1, 4)
    assert M.changed_words("a cat", "a big cat") is None
    up = M.upsample_mask(torch.tensor([[True, False], [False, False]]), (4, 4))
    assert up.sum() == 4 and up[:2, :2].all()


def test_iou_of_numpy_masks_and_of_two_empty_masks():
    x, y = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    assert math.isnan(M.iou(x, y)) and M.iou(x, y, empty=0.0) == 0.0     # no IoU exists: nan unless told
    x[:2], y[1:3] = True, True
    assert M.iou(x, y) == 4 / 12 and M.iou(x, y, empty=0.0) == 4 / 12     # `empty` is only for that case
    assert M.iou(x, np.zeros_like(x)) == 0.0
