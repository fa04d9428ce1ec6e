"""Conversion to a single-file `.safetensors` in the original layout, with `ldm_config` metadata
(command line: `python -m weights_tools.convert`).

SRC is a diffusers folder, a `.ckpt` or a `.safetensors`. Only the model's tensors are written
(EMA, schedule buffers, optimizer state and Lightning metadata are dropped), plus a fresh int64
`position_ids` as real files carry. `--fp16` casts floating tensors to float16. The output is
written to a temporary file and renamed, so a failure leaves no partial file.
"""
from __future__ import annotations

from pathlib import Path

from .files import save_safetensors_atomic
from .layout import CheckpointError, carried_buffers
from .load import read_state_dict


def convert_checkpoint(src, out, fp16: bool = False, config=None, strict: bool = True, vae=None,
                       prediction_type=None) -> Path:
    """Write `src` (any supported checkpoint) as an original-layout `.safetensors` at `out`, with
    the VAE from `vae` (a standalone VAE file or folder) in place of its own if given; the prediction
    type (the file's, or `prediction_type`) travels in the written ldm_config."""
    if any(Path(out).resolve() == Path(p).resolve() for p in (src, vae) if p is not None):
        raise CheckpointError(f"{out}: the output would overwrite the source")
    state, cfg, _ = read_state_dict(src, config, strict, vae, prediction_type)
    if fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    state |= carried_buffers(cfg)
    return save_safetensors_atomic(state, out, {"ldm_config": cfg.to_json()})
