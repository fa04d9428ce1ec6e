"""Conversion to a single-file `.safetensors` in the original layout, with `ldm_config` metadata
(command line: `python -m weights_tools.convert`).

SRC is a diffusers folder, a `.ckpt` or a `.safetensors`. Only the model's tensors are written
(EMA, schedule buffers, optimizer state and Lightning metadata are dropped), plus a fresh int64
`position_ids` as real files carry. `--fp16` casts floating tensors to float16. The output is
written to a temporary file and renamed, so a failure leaves no partial file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .layout import POSITION_IDS, CheckpointError
from .load import read_state_dict


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], out, metadata: dict[str, str]) -> Path:
    """`safetensors.torch.save_file` into a temp file beside `out`, then an atomic rename."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def position_ids(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64)[None]


def convert_checkpoint(src, out, fp16: bool = False, config=None, strict: bool = True) -> Path:
    """Write `src` (any supported checkpoint) as an original-layout `.safetensors` at `out`."""
    if Path(out).resolve() == Path(src).resolve():
        raise CheckpointError(f"{out}: the output would overwrite the source")
    state, cfg, _ = read_state_dict(src, config, strict)
    if fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    state[POSITION_IDS] = position_ids(cfg.text.max_position_embeddings)
    return save_safetensors_atomic(state, out, {"ldm_config": cfg.to_json()})
