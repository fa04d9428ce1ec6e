"""Pictures, masks and reference networks for the PIE-Bench metric tests.

* `picture_pair`: a photo-like source (smooth light, texture, objects, sensor noise) and an edit of it (a new
  object in the edited region, a slight change of tone and fresh noise everywhere else), uint8 (H, W, 3).
* `masks`: edited regions as the benchmark's masks are: a box, a blob, and each with the benchmark's mask
  decoder's frame of ones along the border (its `mask_decode` sets the outermost rows and columns to 1).
* `lpips_package`: the lpips package (0.1.4) as installed, running on torchvision's own SqueezeNet 1.1
  definition (tests/fixtures/torchvision_squeezenet/squeezenet.py, unchanged). Only torchvision's
  bookkeeping imports of that file (weights enums, API logging, ImageNet category names) are stubbed;
  its network code runs as torchvision ships it. Our SqueezeNet and LPIPS share no code with either.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch

TV_SQUEEZENET = Path(__file__).parent / "fixtures" / "torchvision_squeezenet" / "squeezenet.py"


def picture_pair(seed: int, size: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, edited, box mask): the edit repaints the box and slightly retones and renoises the rest."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    light = 0.3 + 0.5 * (0.6 * xx + 0.4 * yy)[..., None] * rng.uniform(0.5, 1.0, 3)
    texture = 0.08 * np.sin(2 * np.pi * (rng.uniform(3, 9) * xx + rng.uniform(2, 7) * yy))[..., None]
    src = light + texture
    for _ in range(4):                                       # a few objects with soft edges
        cy, cx, r = rng.uniform(0.15, 0.85, 2).tolist() + [rng.uniform(0.05, 0.2)]
        inside = 1 / (1 + np.exp(((yy - cy) ** 2 + (xx - cx) ** 2 - r * r) * 400))
        src = src * (1 - inside[..., None]) + inside[..., None] * rng.uniform(0, 1, 3)
    mask = np.zeros((size, size))
    y0, x0 = rng.integers(size // 8, size // 2, 2)
    mask[y0:y0 + size // 3, x0:x0 + size // 3] = 1
    edited = src * rng.uniform(0.97, 1.03, 3) + 0.01
    edited = edited * (1 - mask[..., None]) + mask[..., None] * (rng.uniform(0, 1, 3) + 0.1 * texture)
    noise = lambda: rng.normal(0, 0.015, src.shape)  # noqa: E731
    to8 = lambda a: (np.clip(a, 0, 1) * 255).round().astype(np.uint8)  # noqa: E731
    return to8(src + noise()), to8(edited + noise()), mask


def with_frame(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[0, :] = out[-1, :] = out[:, 0] = out[:, -1] = 1
    return out


def masks(size: int, box: np.ndarray) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size] / size
    blob = (((yy - 0.55) / 0.3) ** 2 + ((xx - 0.4) / 0.22) ** 2 + 0.3 * np.sin(9 * xx) < 1).astype(np.float64)
    return {"box": box, "box+frame": with_frame(box), "blob+frame": with_frame(blob),
            "frame only": with_frame(np.zeros((size, size)))}


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


def _torchvision_stubs() -> dict[str, types.ModuleType]:
    """What squeezenet.py imports from the rest of torchvision, as inert stand-ins."""
    def identity_decorator(*args, **kwargs):
        return lambda fn: fn

    class WeightsEnum:                  # only `verify(None)` is reached: no pretrained weights are asked for
        @classmethod
        def verify(cls, weights):
            assert weights is None
            return None

    models = _module("torchvision.models", __path__=[str(TV_SQUEEZENET.parent)])
    return {
        "torchvision": _module("torchvision", __path__=[], models=models),
        "torchvision.models": models,
        "torchvision.transforms": _module("torchvision.transforms", __path__=[]),
        "torchvision.transforms._presets": _module("torchvision.transforms._presets", ImageClassification=object),
        "torchvision.utils": _module("torchvision.utils", _log_api_usage_once=lambda obj: None),
        "torchvision.models._api": _module("torchvision.models._api", register_model=identity_decorator,
                                           Weights=lambda **kw: kw, WeightsEnum=WeightsEnum),
        "torchvision.models._meta": _module("torchvision.models._meta", _IMAGENET_CATEGORIES=[]),
        "torchvision.models._utils": _module("torchvision.models._utils", _ovewrite_named_param=None,
                                             handle_legacy_interface=identity_decorator),
    }


def lpips_package(monkeypatch):
    """(the lpips package, torchvision's squeezenet module): lpips imported on torchvision's SqueezeNet through
    stubs that `monkeypatch` removes again; the caller removes the lpips submodules the import added."""
    for name, mod in _torchvision_stubs().items():
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("torchvision.models.squeezenet", TV_SQUEEZENET)
    squeezenet = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "torchvision.models.squeezenet", squeezenet)
    spec.loader.exec_module(squeezenet)
    sys.modules["torchvision.models"].squeezenet1_1 = lambda pretrained=False: squeezenet.squeezenet1_1(weights=None)
    monkeypatch.setitem(sys.modules, "lpips.trainer", _module("lpips.trainer"))  # needs scipy; unused here
    found = importlib.util.find_spec("lpips")
    package = importlib.util.module_from_spec(found)
    monkeypatch.setitem(sys.modules, "lpips", package)
    found.loader.exec_module(package)
    return package, squeezenet


def random_squeezenet_state(squeezenet_module, seed: int, last_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """torchvision's SqueezeNet 1.1 with every weight and bias random (its own init leaves biases at 0), the last
    Fire block's expand layers multiplied by `last_scale` (small: its map, lpips' relu7, becomes small, where
    LPIPS' two normalisations part): the state dict as torchvision's squeezenet1_1-b8a52dc0.pth lays it out,
    `classifier.*` included."""
    torch.manual_seed(seed)
    state = squeezenet_module.squeezenet1_1(weights=None).state_dict()
    state = {k: (v + 0.05 * torch.randn_like(v)) if k.endswith("bias") else v for k, v in state.items()}
    return {k: v * last_scale if k.startswith("features.12.expand") else v for k, v in state.items()}


def random_linear_state(seed: int) -> dict[str, torch.Tensor]:
    """lpips v0.1 squeeze.pth's layout: lin0 .. lin6, (1, C, 1, 1), non-negative as the trained ones are."""
    g = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) * 0.2
            for k, c in enumerate((64, 128, 256, 384, 384, 512, 512))}
