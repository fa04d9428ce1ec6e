"""Black Forest Labs' single-file Flux layout (`flux1-dev.safetensors`, `flux1-schnell.safetensors`, and the same
keys under `model.diffusion_model.` as ComfyUI saves them) -> the diffusers names models/flux.py uses.

BFL fuses what diffusers keeps apart, so some tensors split by rows:
- a double block's `img_attn.qkv` / `txt_attn.qkv`: q, k, v in thirds;
- a single block's `linear1`: q, k, v (width rows each), then the MLP's input projection (the rest);
- `final_layer.adaLN_modulation.1` holds (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift),
  so its two halves swap.
The qk-norm weights are called `scale` there, `weight` here. diffusers' own converter
(`convert_flux_transformer_checkpoint_to_diffusers`) is the reference the tests hold this map to.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from models.flux import FluxConfig, FluxTransformer

from .layout import CheckpointError
from .mmdit import load_part
from .mmdit_parts import mapped
from .sd3_keys import Piece
from .sources import Source, open_file, sniff

COMFY_PREFIX = "model.diffusion_model."
# BFL module -> ours, one target per row block of a fused tensor
TOP = {"img_in": ("x_embedder",), "txt_in": ("context_embedder",),
       "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
       "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
       "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
       "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
       "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
       "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
       "final_layer.linear": ("proj_out",), "final_layer.adaLN_modulation.1": ("norm_out.linear",)}
DOUBLE = {"img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",),
          "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "img_attn.norm.query_norm": ("attn.norm_q",), "img_attn.norm.key_norm": ("attn.norm_k",),
          "txt_attn.norm.query_norm": ("attn.norm_added_q",), "txt_attn.norm.key_norm": ("attn.norm_added_k",),
          "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
          "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
          "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",)}
SINGLE = {"modulation.lin": ("norm.linear",), "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
          "norm.query_norm": ("attn.norm_q",), "norm.key_norm": ("attn.norm_k",), "linear2": ("proj_out",)}
PARAMS = {"weight": "weight", "bias": "bias", "scale": "weight"}
SWAPPED = "final_layer.adaLN_modulation.1"  # (shift, scale) in BFL's file, (scale, shift) in diffusers'
BLOCK = re.compile(r"(double_blocks|single_blocks)\.(\d+)\.(.+)")


def is_bfl_flux(keys) -> bool:
    """Whether a file's keys are BFL's Flux transformer layout (with or without ComfyUI's prefix)."""
    keys = {k.removeprefix(COMFY_PREFIX) for k in keys}
    return "img_in.weight" in keys and any(k.startswith("double_blocks.") for k in keys)


def targets(key: str) -> tuple[tuple[str, ...], str]:
    """A BFL key (prefix removed) -> (our keys, one per row block, in row order; the BFL module name)."""
    module, _, param = key.rpartition(".")
    m = BLOCK.fullmatch(module)
    table, prefix, name = (TOP, "", module) if m is None else (
        (DOUBLE, f"transformer_blocks.{m[2]}.", m[3]) if m[1] == "double_blocks" else
        (SINGLE, f"single_transformer_blocks.{m[2]}.", m[3]))
    if name not in table or param not in PARAMS:
        raise CheckpointError(f"BFL Flux file: key {key!r} is not part of the Flux transformer this package runs "
                              "(a LoRA, ControlNet or another model's key?); remove it or pass the base model file")
    return tuple(f"{prefix}{t}.{PARAMS[param]}" for t in table[name]), module


def bfl_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL Flux transformer state dict -> diffusers' FluxTransformer2DModel names (the names of
    models.flux.FluxTransformer), through `bfl_plan`, the map loading reads a file with. Unknown keys are refused
    by name."""
    sd = {k.removeprefix(COMFY_PREFIX): v for k, v in state_dict.items()}
    if "img_in.weight" not in sd:
        raise CheckpointError("BFL Flux file without `img_in.weight`: not a Flux transformer file")
    src = Source("BFL Flux state dict", "dict", {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}, sd.__getitem__)
    out = mapped(src, bfl_plan(src.shapes), src.where)
    return {k: out.fetch(k) for k in out.entries}


def bfl_plan(shapes: dict[str, tuple]) -> dict[str, Piece]:
    """Our Flux transformer's keys -> where each is in a BFL file ({key: shape}): a fused tensor split by rows
    (q, k, v of `width` rows each, a single block's MLP the rest), the final AdaLN's halves swapped."""
    width = shapes.get("img_in.weight", shapes.get(COMFY_PREFIX + "img_in.weight"))[0]
    plan = {}
    for key, shape in shapes.items():
        names, module = targets(key.removeprefix(COMFY_PREFIX))
        sizes = [width] * 3 + [shape[0] - 3 * width] * (len(names) == 4) if len(names) > 1 else [None]
        start = 0
        for name, size in zip(names, sizes):
            plan[name] = Piece(key, start if size else None, start + size if size else None, module == SWAPPED)
            start += size or 0
    return plan


def blocks(shapes, kind: str) -> int:
    return len({int(m[2]) for k in shapes if (m := BLOCK.fullmatch(k.rpartition(".")[0])) and m[1] == kind})


def bfl_config(shapes: dict[str, tuple], axes_dims_rope: tuple | None = None) -> FluxConfig:
    """The FluxConfig of a BFL file, read from its shapes ({key: shape}). The rotary axes are not in the file:
    BFL's FLUX.1 uses (16, 56, 56) for its 128-wide heads, the only head width read here unless
    `axes_dims_rope` is given (a diffusers folder's transformer/config.json says them)."""
    s = {k.removeprefix(COMFY_PREFIX): tuple(v) for k, v in shapes.items()}
    head_dim = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if head_dim != 128 and axes_dims_rope is None:
        raise CheckpointError(f"BFL Flux file with {head_dim}-wide heads: its rotary axes are not stored in the "
                              "file and are known only for FLUX.1's 128 (16, 56, 56); give --base a diffusers Flux "
                              "folder whose transformer/config.json gives axes_dims_rope, or convert it to one")
    width, in_channels = s["img_in.weight"]
    return FluxConfig(in_channels=in_channels, out_channels=s["final_layer.linear.weight"][0],
                      num_layers=blocks(s, "double_blocks"), num_single_layers=blocks(s, "single_blocks"),
                      attention_head_dim=head_dim, num_attention_heads=width // head_dim,
                      joint_attention_dim=s["txt_in.weight"][1], pooled_projection_dim=s["vector_in.in_layer.weight"][1],
                      guidance_embeds="guidance_in.in_layer.weight" in s,
                      axes_dims_rope=tuple(axes_dims_rope) if axes_dims_rope is not None else (16, 56, 56))


def load_bfl_transformer(path, device="cpu", dtype=torch.float32) -> FluxTransformer:
    """A BFL single file (`flux1-dev.safetensors`, `flux1-schnell.safetensors`) as a FluxTransformer: its config
    read from its shapes, every key of the model filled (strict), each tensor read, split and renamed only when
    it is assigned (one copy of the weights)."""
    path = Path(path)
    src = open_file(path, path.stat().st_size, sniff(path))
    if not is_bfl_flux(src.shapes):
        raise CheckpointError(f"{path}: not a BFL Flux transformer file (no `img_in.weight` / `double_blocks.*`); "
                              "a diffusers Flux folder loads as a folder")
    with torch.device("meta"):
        model = FluxTransformer(bfl_config(src.shapes))
    load_part(model, mapped(src, bfl_plan(src.shapes), str(path)), device, dtype, str(path))
    return model.requires_grad_(False).eval()
