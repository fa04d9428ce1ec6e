"""LPIPS (SqueezeNet 1.1, v0.1) against the lpips package, the network PIE-Bench's torchmetrics call wraps.

What is independent: the reference is the lpips package's own LPIPS class (its ScalingLayer, slicing,
normalize_tensor, linear layers, spatial average) running on torchvision's own SqueezeNet 1.1 source
(tests/pie_oracles.py says how it is loaded without torchvision). Both networks get the same random
backbone and linear weights, written in the real files' layouts and read back by our loader.
"""
import math
import sys

import numpy as np
import pytest
import torch
from torchmetrics.functional.image.lpips import _normalize_tensor  # imported before torchvision is stubbed

from p2p.bench.lpips import load_lpips, lpips_unedited
from pie_oracles import (lpips_package, masks, picture_pair, random_linear_state,
                               random_squeezenet_state)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference():
    """(lpips package, torchvision's squeezenet module), sys.modules left as it was afterwards."""
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as mp:
        yield lpips_package(mp)
    for name in set(sys.modules) - before:
        del sys.modules[name]


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    """A random backbone as torchvision's squeezenet1_1 .pth and random heads as lpips' v0.1 squeeze.pth."""
    _, squeezenet = reference
    folder = tmp_path_factory.mktemp("lpips")
    torch.save(random_squeezenet_state(squeezenet, seed=0), folder / "squeezenet1_1.pth")
    torch.save(random_linear_state(seed=1), folder / "squeeze.pth")
    return folder / "squeezenet1_1.pth", folder / "squeeze.pth"


def package_lpips(lpips, backbone, linear):
    """lpips.LPIPS(net='squeeze', version='0.1') with the files' weights: its linear layers from `linear` as its
    own loader reads them, its slices' modules (torchvision's features, kept under their indices) from `backbone`."""
    model = lpips.LPIPS(pretrained=True, net="squeeze", version="0.1", pnet_rand=True, model_path=str(linear),
                        verbose=False)
    trunk = torch.load(backbone, weights_only=True)
    own = {name: f"features.{name.split('.', 1)[1]}" for name in model.net.state_dict()}
    model.net.load_state_dict({name: trunk[key] for name, key in own.items()})
    return model.eval()


def official_input(picture, mask):
    """evaluate.py's LPIPS input: float32 picture / 255 times 1 - mask, then * 2 - 1, (1, 3, H, W)."""
    x = picture.astype(np.float32) / 255 * (1 - mask)[..., None].astype(np.float32)
    return torch.tensor(x).permute(2, 0, 1)[None] * 2 - 1


@pytest.mark.parametrize("seed", [0, 1])
def test_lpips_unedit_part_matches_the_lpips_package(reference, files, seed):
    lpips, _ = reference
    ref = package_lpips(lpips, *files)
    ours = load_lpips(*files)
    source, edited, box = picture_pair(seed, size=96)
    for name, mask in masks(96, box).items():
        with torch.no_grad():
            want = float(ref(official_input(source, mask), official_input(edited, mask)))
        got = lpips_unedited(ours, source, edited, mask)
        assert want > 1e-3, name                     # a real difference, not two blank pictures
        assert got == pytest.approx(want, rel=1e-5), name


def test_torchmetrics_later_normalisation_matches_its_formula(reference, tmp_path, monkeypatch):
    """norm="torchmetrics": the lpips package with torchmetrics >= 1.2.1's `_normalize_tensor` in place of its own,
    on a backbone whose last map is small, where the two normalisations differ."""
    lpips, squeezenet = reference
    torch.save(random_squeezenet_state(squeezenet, seed=4, last_scale=1e-5), tmp_path / "small.pth")
    torch.save(random_linear_state(seed=5), tmp_path / "squeeze.pth")
    files = tmp_path / "small.pth", tmp_path / "squeeze.pth"
    ours = load_lpips(*files)
    source, edited, box = picture_pair(2, size=96)
    x, y = official_input(source, box), official_input(edited, box)
    with torch.no_grad():
        want_lpips = float(package_lpips(lpips, *files)(x, y))
        monkeypatch.setattr(lpips, "normalize_tensor", _normalize_tensor)
        want_torchmetrics = float(package_lpips(lpips, *files)(x, y))
    assert abs(want_torchmetrics - want_lpips) > 1e-3 * want_lpips       # the switch matters here
    assert lpips_unedited(ours, source, edited, box) == pytest.approx(want_lpips, rel=1e-5)
    assert lpips_unedited(ours, source, edited, box, norm="torchmetrics") == pytest.approx(want_torchmetrics, rel=1e-5)


def test_every_feature_map_matches_torchvision_squeezenet(reference, files):
    """The seven maps lpips reads, ours against lpips' slices of torchvision's SqueezeNet 1.1."""
    lpips, _ = reference
    ref, ours = package_lpips(lpips, *files), load_lpips(*files)
    x = torch.rand(2, 3, 77, 64) * 2 - 1                     # odd sizes: the pools' ceil_mode matters
    with torch.no_grad():
        want = ref.net(ref.scaling_layer(x))
        got = ours.maps(x)
    assert len(got) == len(want) == 7
    for w, g in zip(want, got):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_the_lpips_package_own_squeeze_file_loads_as_its_linear_layers(reference, files):
    """lpips' shipped weights/v0.1/squeeze.pth (torch's legacy format) read by our loader."""
    lpips, _ = reference
    shipped = lpips.__path__[0] + "/weights/v0.1/squeeze.pth"
    ours = load_lpips(files[0], shipped)
    ref = package_lpips(lpips, files[0], shipped)
    for k in range(7):
        torch.testing.assert_close(getattr(ours, f"lin{k}").model[1].weight, getattr(ref, f"lin{k}").model[1].weight,
                                   rtol=0, atol=0)
    source, edited, box = picture_pair(3, size=64)
    with torch.no_grad():
        want = float(ref(official_input(source, box), official_input(edited, box)))
    assert lpips_unedited(ours, source, edited, box) == pytest.approx(want, rel=1e-5)
    assert math.isnan(lpips_unedited(ours, source, edited, np.ones((64, 64))))
