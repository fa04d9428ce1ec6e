"""PIE-Bench's PSNR, MSE and SSIM of the unedited region against torchmetrics, called as the benchmark's
evaluate.py calls it: float32 pictures / 255 multiplied by 1 - mask, PeakSignalNoiseRatio(data_range=1.0) and
StructuralSimilarityIndexMeasure(data_range=1.0) on (1, 3, H, W), MeanSquaredError on (3, H, W).

The torchmetrics installed (>= 1.4.2) keeps SSIM's reflected border; the benchmark's 2023 torchmetrics cut it off
(border="valid", our default), which is torchmetrics' own full SSIM map with the border cut off.

Ours computes in float64: against torchmetrics given the same pictures in float64 it agrees to rounding (1e-7:
the torchmetrics classes keep their sums in float32 state); against the benchmark's float32 call, SSIM differs
by float32's own rounding (up to about 2e-5 relative here: its variances are differences of nearly equal
numbers), PSNR and MSE by less than 1e-5.
"""
import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.image.ssim import structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.regression import MeanSquaredError

from p2p.bench.pixels import mean_squared_error, peak_signal_noise_ratio, structural_similarity
from pie_oracles import masks, picture_pair

SIZE = 160
CASES = [(seed, name) for seed in (0, 1, 2) for name in ("box", "box+frame", "blob+frame", "frame only")]


def case(seed, name):
    source, edited, box = picture_pair(seed, SIZE)
    return source, edited, masks(SIZE, box)[name]


def blacked_out(picture, mask, batch=True, dtype=np.float32):
    """evaluate.py's metric input: float32 picture / 255 times float32 (1 - mask), channels first."""
    x = torch.tensor(picture.astype(dtype) / 255 * (1 - mask)[..., None].astype(dtype)).permute(2, 0, 1)
    return x[None] if batch else x.contiguous()


# (dtype, PSNR and MSE tolerance, SSIM tolerance); in float64 the metric classes still keep their sums in float32
# state, hence 1e-7
PRECISIONS = [(np.float64, 1e-7, 1e-7), (np.float32, 1e-5, 5e-5)]


@pytest.mark.parametrize("seed,name", CASES)
@pytest.mark.parametrize("dtype,rel,_", PRECISIONS)
def test_psnr_and_mse_unedit_part_match_torchmetrics(seed, name, dtype, rel, _):
    source, edited, mask = case(seed, name)
    x, y = blacked_out(source, mask, dtype=dtype), blacked_out(edited, mask, dtype=dtype)
    psnr = float(PeakSignalNoiseRatio(data_range=1.0)(x, y))
    mse = float(MeanSquaredError()(x[0].contiguous(), y[0].contiguous()))
    assert 15 < psnr < 60 and mse > 1e-6                       # a real difference
    assert peak_signal_noise_ratio(source, edited, mask) == pytest.approx(psnr, rel=rel)
    assert mean_squared_error(source, edited, mask) == pytest.approx(mse, rel=rel)


@pytest.mark.parametrize("seed,name", CASES)
@pytest.mark.parametrize("dtype,_,rel", PRECISIONS)
def test_ssim_unedit_part_matches_torchmetrics_either_border(seed, name, dtype, _, rel):
    source, edited, mask = case(seed, name)
    x, y = blacked_out(source, mask, dtype=dtype), blacked_out(edited, mask, dtype=dtype)
    reflect = float(StructuralSimilarityIndexMeasure(data_range=1.0)(x, y))
    _, full = structural_similarity_index_measure(x, y, data_range=1.0, return_full_image=True)
    valid = float(full[..., 5:-5, 5:-5].mean())              # torchmetrics up to 1.4.1: the border cut off
    assert abs(valid - reflect) > 1e-4                         # the two conventions differ on these pictures
    assert structural_similarity(source, edited, mask) == pytest.approx(valid, rel=rel)
    assert structural_similarity(source, edited, mask, border="reflect") == pytest.approx(reflect, rel=rel)


def test_region_averages_count_only_unedited_pixels():
    """average="region" (not the benchmark's): the squared error and SSIM of the untouched pictures, averaged
    over the unedited pixels alone; a larger edited region no longer dilutes them."""
    source, edited, mask = case(0, "blob+frame")
    keep = (mask == 0)
    diff = (source.astype(np.float64) - edited.astype(np.float64)) / 255
    region = float((diff[keep] ** 2).mean())
    assert mean_squared_error(source, edited, mask, average="region") == pytest.approx(region, rel=1e-12)
    assert peak_signal_noise_ratio(source, edited, mask, average="region") == pytest.approx(-10 * math.log10(region))
    frame = mean_squared_error(source, edited, mask)
    assert frame == pytest.approx(region * keep.mean(), rel=1e-12)      # the benchmark's: diluted by the mask
    x, y = [torch.tensor(p.astype(np.float64) / 255).permute(2, 0, 1)[None] for p in (source, edited)]
    _, full = structural_similarity_index_measure(x, y, data_range=1.0, return_full_image=True)
    want = float((full[0] * torch.tensor(keep)).sum() / (3 * keep.sum()))
    got = structural_similarity(source, edited, mask, border="reflect", average="region")
    assert got == pytest.approx(want, rel=1e-12)


def test_nothing_unedited_is_nan_and_identical_background_is_infinite_psnr():
    source, edited, mask = case(1, "box")
    everything = np.ones_like(mask)
    for fn in (mean_squared_error, peak_signal_noise_ratio, structural_similarity):
        assert math.isnan(fn(source, edited, everything))
    same = np.where(mask[..., None] == 1, edited, source)     # the edit touched only its region
    assert peak_signal_noise_ratio(source, same, mask) == math.inf
    assert mean_squared_error(source, same, mask) == 0
    assert structural_similarity(source, same, mask) == pytest.approx(1.0, abs=1e-12)
