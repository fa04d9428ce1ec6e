"""LPIPS v0.1 on SqueezeNet 1.1 (Zhang et al. 2018): the network behind PIE-Bench's lpips_unedit_part.

The benchmark calls torchmetrics' `LearnedPerceptualImagePatchSimilarity(net_type='squeeze')`, the lpips
package's network: pictures in [-1, 1] pass lpips' ScalingLayer ((x - shift) / scale), then the 13
`features` of torchvision's SqueezeNet 1.1, read at seven places (after the first ReLU, the last Fire block
of the next two stages and each Fire block of the last: features 1, 4, 7, 9, 10, 11, 12, with 64, 128, 256,
384, 384, 512, 512 channels). Each map is unit-normalised across its
channels, the two pictures' maps are subtracted and squared, weighted per channel by a 1x1 linear layer
(lpips' `lin0` .. `lin6`), averaged over its positions, and the seven numbers are summed.

Module names are the files' names: `features.N.*` as torchvision's `squeezenet1_1-b8a52dc0.pth` holds
them (its `classifier.*` is not read), `linN.model.1.weight` as lpips' `weights/v0.1/squeeze.pth` does
(its `model.0` is a dropout, the identity at evaluation).

The normalisation is lpips' `x / (|x| + 1e-10)`, which torchmetrics used until 1.2.0 and which the
benchmark's 2023 numbers used (`norm="lpips"`); torchmetrics 1.2.1 and later divide by `sqrt(|x|^2 + 1e-8)`
(`norm="torchmetrics"`), which differs where a map's channels are all near zero.
"""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from weights_tools.layout import CheckpointError

from .pixels import checked

CHANNELS = (64, 128, 256, 384, 384, 512, 512)
TAPS = (1, 4, 7, 9, 10, 11, 12)                 # the features index after which each of the seven maps is read
SHIFT = (-0.030, -0.088, -0.188)                 # lpips' ScalingLayer
SCALE = (0.458, 0.448, 0.450)
NORMS = ("lpips", "torchmetrics")
BACKBONE_FILE = ("torchvision's ImageNet SqueezeNet 1.1, squeezenet1_1-b8a52dc0.pth "
                 "(https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth)")
LINEAR_FILE = ("LPIPS v0.1's SqueezeNet linear layers, squeeze.pth (the lpips package's lpips/weights/v0.1/squeeze.pth, "
               "also shipped as torchmetrics' functional/image/lpips_models/squeeze.pth)")


class Fire(nn.Module):
    """SqueezeNet's Fire block: a 1x1 squeeze, then 1x1 and 3x3 expands side by side, each with a ReLU."""

    def __init__(self, channels: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Conv2d(channels, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(s)), F.relu(self.expand3x3(s))], 1)


def squeezenet1_1_features() -> nn.Sequential:
    """SqueezeNet 1.1's `features` (Iandola et al. 2016, v1.1 of its repository): 13 modules, torchvision's order."""
    def pool():
        return nn.MaxPool2d(3, stride=2, ceil_mode=True)

    return nn.Sequential(nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), pool(),
                         Fire(64, 16, 64), Fire(128, 16, 64), pool(),
                         Fire(128, 32, 128), Fire(256, 32, 128), pool(),
                         Fire(256, 48, 192), Fire(384, 48, 192), Fire(384, 64, 256), Fire(512, 64, 256))


class LinearHead(nn.Module):
    """lpips' NetLinLayer at evaluation: per-channel weights of a squared feature difference, summed (a 1x1 conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))  # [0] is lpips' dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def unit_normalise(f: torch.Tensor, norm: str) -> torch.Tensor:
    """Each position's feature vector divided by its length (the two conventions of the module docstring)."""
    squares = (f ** 2).sum(1, keepdim=True)
    return f / (squares.sqrt() + 1e-10) if norm == "lpips" else f / (squares + 1e-8).sqrt()


class SqueezeLPIPS(nn.Module):
    """LPIPS(a, b) for pictures in [-1, 1], (B, 3, H, W) -> (B,)."""

    def __init__(self):
        super().__init__()
        self.features = squeezenet1_1_features()
        for k, c in enumerate(CHANNELS):
            self.add_module(f"lin{k}", LinearHead(c))
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None], persistent=False)

    def maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The seven feature maps lpips compares, of the scaled picture."""
        x, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor, norm: str = "lpips") -> torch.Tensor:
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r}: choose one of {NORMS}")
        total = 0
        for k, (fa, fb) in enumerate(zip(self.maps(a), self.maps(b))):
            diff = (unit_normalise(fa, norm) - unit_normalise(fb, norm)) ** 2
            total = total + getattr(self, f"lin{k}")(diff).mean((2, 3))   # (B, 1): the spatial average
        return total[:, 0]


def read_pth(path, what: str) -> dict[str, torch.Tensor]:
    """A torch file's flat dict of tensors (torch.save's zip or its legacy format, read with weights_only), or an
    error naming the file and what to get."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected {what}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        said = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: cannot be read as a torch weights file ({type(e).__name__}: "
                              f"{said}): truncated or another kind of file; get {what}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a flat dict of tensors; get {what}")
    return state


def part(want: dict[str, torch.Tensor], state: dict, path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of `state` named in `want`, each of its shape, as float32; or an error that says what the
    file lacks or holds instead. The file's other tensors are not read."""
    missing = [k for k in want if k not in state]
    if missing:
        raise CheckpointError(f"{path}: lacks {len(missing)} of the {len(want)} tensors needed (first: "
                              f"{missing[:3]}); it holds {list(state)[:4]}...: get {what}")
    wrong = [f"{k} {tuple(state[k].shape)} (want {tuple(t.shape)})" for k, t in want.items()
             if state[k].shape != t.shape]
    if wrong:
        raise CheckpointError(f"{path}: shapes differ from the ones needed: {'; '.join(wrong[:3])}: get {what}")
    return {k: state[k].to(torch.float32) for k in want}


def load_lpips(backbone, linear, device="cpu") -> SqueezeLPIPS:
    """LPIPS from torchvision's SqueezeNet 1.1 file and lpips' v0.1 squeeze linear file, in eval mode on device."""
    net = SqueezeLPIPS()
    own = net.state_dict()
    trunk = {k: v for k, v in own.items() if k.startswith("features.")}
    heads = {k: v for k, v in own.items() if not k.startswith("features.")}
    state = {**part(trunk, read_pth(backbone, BACKBONE_FILE), backbone, BACKBONE_FILE),
             **part(heads, read_pth(linear, LINEAR_FILE), linear, LINEAR_FILE)}
    net.load_state_dict(state, strict=True)
    return net.requires_grad_(False).to(device).eval()


def lpips_unedited(net: SqueezeLPIPS, source, edited, mask, norm: str = "lpips") -> float:
    """lpips_unedit_part: both pictures blacked out in the edited region ([0, 1] times 1 - mask), mapped to
    [-1, 1] and compared whole, in float32 as the benchmark does; nan when no pixel is unedited."""
    x, y, keep = checked(source, edited, mask)
    if keep.sum() == 0:
        return math.nan
    device = net.shift.device
    a, b = [((t * keep).float() * 2 - 1).to(device) for t in (x, y)]
    with torch.no_grad():
        return float(net(a, b, norm)[0])
