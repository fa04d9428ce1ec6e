"""Checkpoints in and out: read .safetensors / .ckpt / diffusers folders into `models.StableDiffusion`,
inspect them from their headers, convert them to the original single-file layout, and make tiny
random ones for tests."""
from .conversion import convert_checkpoint
from .inspection import format_inspection, inspect_checkpoint
from .layout import BadConfig, CheckpointError, detect_variant, model_shapes, validate_shapes
from .load import load_checkpoint, read_state_dict, resolve_config, tokenizer_for
from .tiny import make_tiny
from .sources import CheckpointNotFound, open_source

__all__ = ["BadConfig", "CheckpointError", "CheckpointNotFound", "convert_checkpoint", "detect_variant", "format_inspection",
           "inspect_checkpoint", "load_checkpoint", "make_tiny", "model_shapes", "open_source", "read_state_dict",
           "resolve_config", "tokenizer_for", "validate_shapes"]
