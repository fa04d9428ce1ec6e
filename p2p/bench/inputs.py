"""What the metric networks read: pictures (uint8 (H, W, 3) arrays, checked) and weight files, read through
weights_tools' readers (safetensors or a torch zip file, recognised by their bytes; a truncated or foreign file
is refused with what was found) and checked against the keys the network needs before anything is loaded."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from weights_tools.layout import CheckpointError
from weights_tools.sources import Source, open_file, open_weights, sniff


def open_weights_file(path, what: str) -> Source:
    """One weights file, or a folder's (`model.safetensors`, `pytorch_model.bin`, their shards); `what` names
    the expected file in every message."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder; expected {what}")
    try:
        return open_weights(path) if path.is_dir() else open_file(path, path.stat().st_size, sniff(path))
    except CheckpointError as e:
        raise CheckpointError(f"{e} (expected {what})") from None


def load_weights(module: nn.Module, src: Source, keys: dict[str, str], what: str, device) -> nn.Module:
    """module's parameters (built on the meta device: no random init, one copy of the weights) from src: `keys`
    maps each of the module's names to the file's; every one must be there with the module's shape. The file's
    other keys are not read. Returns the module in fp32, in eval mode."""
    want = module.state_dict()
    missing = [keys[k] for k in want if keys[k] not in src.entries]
    if missing:
        raise CheckpointError(f"{src.where}: lacks {len(missing)} of the {len(want)} tensors of {what} "
                              f"(first: {missing[:3]}); it holds {list(src.entries)[:4]}...: not {what}")
    wrong = [f"{keys[k]} {tuple(src.entries[keys[k]][0])} (want {tuple(t.shape)})"
             for k, t in want.items() if tuple(src.entries[keys[k]][0]) != tuple(t.shape)]
    if wrong:
        raise CheckpointError(f"{src.where}: shapes differ from {what}: {'; '.join(wrong[:3])}")
    try:
        state = {k: src.fetch(keys[k]).to(torch.float32) for k in want}
    except (CheckpointError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{src.where}: a tensor of {what} cannot be read ({e}): truncated or corrupt; "
                              "download the file again") from None
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(device).eval()


def rgb_picture(image, name: str) -> np.ndarray:
    """image as a uint8 (H, W, 3) array, or a ValueError naming what it is instead."""
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{name}: a uint8 (H, W, 3) RGB picture is expected, got {array.dtype} {array.shape} "
                         "(np.asarray(Image.open(path).convert('RGB')) gives one)")
    return array
