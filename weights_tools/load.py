"""`load_checkpoint`: any supported checkpoint -> `models.StableDiffusion`, one copy of the weights.

The model is built on the meta device (no memory), every tensor is read, reshaped if it is one of
the documented shims, cast to the requested dtype/device, and assigned in place of the meta
parameter (`load_state_dict(assign=True)`), one part at a time.
"""
from __future__ import annotations

import torch

from models import SDConfig, StableDiffusion, load_config, prefixes

from .layout import CheckpointError, model_keys, model_shapes, validate_shapes
from .registry import resolve_checkpoint
from .sources import Source, open_source

SD_V1_SOURCE = "SD v1's own config (no config given, none in the file; every key and shape checked)"


def resolve_config(src: Source, config=None) -> tuple[SDConfig, str]:
    """The architecture: `config=` (SDConfig, path or name in configs/), else the file's own
    (ldm_config metadata / diffusers config.json), else SD v1 - which `validate_shapes` then checks
    key by key, since shapes alone cannot tell e.g. the number of heads."""
    if isinstance(config, SDConfig):
        return config, "the given SDConfig"
    if isinstance(config, dict):
        return SDConfig.from_ldm(config), "the given config dict"
    if config is not None:
        try:
            return load_config(config), f"config {config}"
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise CheckpointError(f"config {config!r} is not a usable CompVis v1-inference.yaml: {e}") from e
    if src.config is not None:
        return src.config, src.config_source
    return SDConfig(), SD_V1_SOURCE


def open_checked(path, config=None, strict: bool = True) -> tuple[Source, SDConfig, str]:
    """Open, resolve the config and validate every key and shape, all before reading a tensor."""
    src = open_source(resolve_checkpoint(path))
    cfg, cfg_source = resolve_config(src, config)
    validate_shapes(src.shapes, cfg, src.where, strict, cfg_source)
    return src, cfg, cfg_source


def read_tensor(src: Source, key: str, want: tuple, device, dtype) -> torch.Tensor:
    """One tensor, shim-reshaped to the model's shape, floats cast to `dtype`."""
    t = src.fetch(key)
    if tuple(t.shape) != tuple(want):
        t = t.reshape(want)  # validated: only the documented [C,C] <-> [C,C,1,1] shims get here
    return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)


def load_checkpoint(path, device="cpu", dtype=torch.float32, config=None, strict: bool = True) -> StableDiffusion:
    """Load a Stable Diffusion v1.x checkpoint (.safetensors, .ckpt, diffusers folder) in eval mode.

    `path` may also be a name in `weights_tools.registry.CHECKPOINTS` ("miniature": the shipped one).
    `config`: an SDConfig, a CompVis v1-inference.yaml path, or a configs/ name; by default the
    file's own (ldm_config metadata, diffusers config.json) or SD v1's after a full shape check.
    `strict=False` ignores unknown extra keys (missing or misshapen ones are always errors).
    EMA weights, DDPM schedule buffers and `position_ids` are never read.
    """
    src, cfg, _ = open_checked(path, config, strict)
    with torch.device("meta"):
        model = StableDiffusion(cfg)
    for part, prefix in prefixes(cfg).items():
        module = getattr(model, part)
        wanted = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        state = {k: read_tensor(src, prefix + k, shape, device, dtype) for k, shape in wanted.items()}
        module.load_state_dict(state, strict=True, assign=True)
        del state
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:  # a buffer the checkpoint does not hold would stay unmaterialised
        raise CheckpointError(f"{src.where}: internal error, still on the meta device after loading: {on_meta[:5]}")
    return model.eval()


def read_state_dict(path, config=None, strict: bool = True) -> tuple[dict[str, torch.Tensor], SDConfig, Source]:
    """The model's tensors under their single-file names (canonical, shims reshaped), no model built.

    Used by conversion; tensors keep their stored dtype.
    """
    src, cfg, _ = open_checked(path, config, strict)
    expected = model_shapes(cfg)
    keys = sorted(k for k in model_keys(src.shapes) if k in expected)
    return {k: read_tensor(src, k, expected[k], "cpu", None) for k in keys}, cfg, src
