"""The official SD3 / SD3.5 single-file transformer layout (`sd3_medium*.safetensors`, `sd3.5_medium.safetensors`,
`sd3.5_large.safetensors`: `model.diffusion_model.joint_blocks.N.x_block.attn.qkv`, ...) -> the diffusers names
models/mmdit.py uses, and its SD3Config read from the shapes.

The official MM-DiT fuses what diffusers keeps apart, so a few tensors split or reorder by rows:
- an attention's `qkv` holds q, k, v in thirds (`x_block.attn`, `context_block.attn`, SD3.5's `x_block.attn2`);
- `final_layer.adaLN_modulation.1` and the last block's `context_block.adaLN_modulation.1` hold (shift, scale);
  diffusers' AdaLayerNormContinuous reads (scale, shift), so their two halves swap.
diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` is the reference the tests hold this map to.
"""
from __future__ import annotations

import json
import math
import re
from typing import NamedTuple

from models.mmdit import SD3Config

from .layout import CheckpointError

PREFIX = "model.diffusion_model."
TOP = {"x_embedder.proj": ("pos_embed.proj",), "context_embedder": ("context_embedder",),
       "t_embedder.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
       "t_embedder.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
       "y_embedder.mlp.0": ("time_text_embed.text_embedder.linear_1",),
       "y_embedder.mlp.2": ("time_text_embed.text_embedder.linear_2",),
       "final_layer.linear": ("proj_out",), "final_layer.adaLN_modulation.1": ("norm_out.linear",)}
BLOCK = {"x_block.adaLN_modulation.1": ("norm1.linear",),
         "context_block.adaLN_modulation.1": ("norm1_context.linear",),
         "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
         "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
         "x_block.attn.proj": ("attn.to_out.0",), "context_block.attn.proj": ("attn.to_add_out",),
         "x_block.attn.ln_q": ("attn.norm_q",), "x_block.attn.ln_k": ("attn.norm_k",),
         "context_block.attn.ln_q": ("attn.norm_added_q",), "context_block.attn.ln_k": ("attn.norm_added_k",),
         "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block.attn2.proj": ("attn2.to_out.0",),
         "x_block.attn2.ln_q": ("attn2.norm_q",), "x_block.attn2.ln_k": ("attn2.norm_k",),
         "x_block.mlp.fc1": ("ff.net.0.proj",), "x_block.mlp.fc2": ("ff.net.2",),
         "context_block.mlp.fc1": ("ff_context.net.0.proj",), "context_block.mlp.fc2": ("ff_context.net.2",)}
JOINT = re.compile(r"joint_blocks\.(\d+)\.(.+)")
# every released SD3 / SD3.5 has 64-wide heads; only SD3.5's qk-norm scales store the width
HEAD_DIM = 64
# a tiny or converted file may say its transformer config in its metadata (diffusers' transformer/config.json keys)
CONFIG_METADATA = "mmdit_config"


class Piece(NamedTuple):
    """Where one of our tensors is in a file: the file's key, its rows [start, stop) (None: all of it), and
    whether its two halves swap (shift, scale -> scale, shift)."""
    key: str
    start: int | None = None
    stop: int | None = None
    swap: bool = False


def is_sd3_file(keys) -> bool:
    """Whether a file holds the official MM-DiT of SD3 / SD3.5 (diffusers' detection key)."""
    return any(k.startswith(PREFIX + "joint_blocks.") for k in keys)


def num_blocks(shapes) -> int:
    return 1 + max(int(m[1]) for k in shapes if (m := JOINT.match(k.removeprefix(PREFIX))))


def pieces(key: str, shape: tuple, last: int) -> dict[str, Piece]:
    """A file key (prefix removed) -> our keys and where each lies in it; unknown keys refused by name."""
    if key == "pos_embed":
        return {"pos_embed.pos_embed": Piece(PREFIX + key)}
    module, _, param = key.rpartition(".")
    m = JOINT.fullmatch(module)
    table, prefix, name = (TOP, "", module) if m is None else (BLOCK, f"transformer_blocks.{m[1]}.", m[2])
    if name not in table or param not in ("weight", "bias"):
        raise CheckpointError(f"SD3 single file: key {PREFIX + key!r} is not part of the SD3 / SD3.5 MM-DiT this "
                              "package runs (a LoRA, ControlNet or another model's key?); remove it")
    names = table[name]
    swap = module == "final_layer.adaLN_modulation.1" or (m is not None and int(m[1]) == last
                                                          and name == "context_block.adaLN_modulation.1")
    rows = shape[0] // len(names)
    return {f"{prefix}{t}.{param}": Piece(PREFIX + key, *((i * rows, (i + 1) * rows) if len(names) > 1 else (None, None)),
                                          swap) for i, t in enumerate(names)}


def sd3_plan(shapes: dict[str, tuple]) -> dict[str, Piece]:
    """Our transformer's keys -> where each is in the file, for a file's transformer keys (under PREFIX)."""
    own = {k.removeprefix(PREFIX): tuple(s) for k, s in shapes.items() if k.startswith(PREFIX)}
    last = num_blocks(shapes) - 1
    return {ours: p for key, shape in own.items() for ours, p in pieces(key, shape, last).items()}


def sd3_file_config(shapes: dict[str, tuple], metadata: dict | None = None, where: str = "SD3 file") -> SD3Config:
    """The SD3Config of a single file from its shapes (or its `mmdit_config` metadata where it has one):
    depth from `joint_blocks.N`, width from `context_embedder`, qk RMS-norm from `ln_q` keys (whose length is
    the head width; 64 otherwise, as every released SD3), dual attention from `x_block.attn2` keys,
    pos_embed_max_size from `pos_embed`'s length."""
    if metadata and CONFIG_METADATA in metadata:
        try:
            return SD3Config.from_diffusers(json.loads(metadata[CONFIG_METADATA]))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{where}: its {CONFIG_METADATA} metadata cannot describe the model ({e})") from e
    s = {k.removeprefix(PREFIX): tuple(v) for k, v in shapes.items() if k.startswith(PREFIX)}
    try:
        return shapes_config(s)
    except KeyError as e:
        raise CheckpointError(f"{where}: this is an SD3 / SD3.5 checkpoint (its {PREFIX}joint_blocks keys) without "
                              f"{PREFIX}{e.args[0]}: the file is truncated or mixes another model's keys; use the file "
                              f"as released, or its diffusers folder") from e
    except (ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{where}: the MM-DiT's shapes do not describe an SD3 / SD3.5 transformer "
                              f"({e}); the file is incomplete or of another model") from e


def shapes_config(s: dict[str, tuple]) -> SD3Config:
    width, joint = s["context_embedder.weight"]
    patch = s["x_embedder.proj.weight"][-1]
    ln_q = s.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head = ln_q[0] if ln_q else HEAD_DIM
    if width % head:
        raise ValueError(f"width {width} is not a whole number of {head}-wide heads")
    size = math.isqrt(s["pos_embed"][1])
    if size * size != s["pos_embed"][1]:
        raise ValueError(f"pos_embed's {s['pos_embed'][1]} positions are not a square table")
    dual = sorted({int(m[1]) for k in s if (m := JOINT.match(k)) and m[2].startswith("x_block.attn2.")})
    return SD3Config(patch_size=patch, in_channels=s["x_embedder.proj.weight"][1], num_layers=num_blocks(s),
                     attention_head_dim=head, num_attention_heads=width // head, joint_attention_dim=joint,
                     caption_projection_dim=width, pooled_projection_dim=s["y_embedder.mlp.0.weight"][1],
                     out_channels=s["final_layer.linear.weight"][0] // (patch * patch), pos_embed_max_size=size,
                     dual_attention_layers=tuple(dual), qk_norm="rms_norm" if ln_q else None)


def sd3_model_name(cfg: SD3Config) -> tuple[str, str]:
    """(which released model the shapes say, the evidence), as diffusers' infer_diffusers_model_type tells them;
    SD3.5-large and SD3.5-large-turbo have the same weights' shapes, and so do fine-tunes of each."""
    evidence = (f"{cfg.num_layers} joint blocks of width {cfg.width}, pos_embed {cfg.pos_embed_max_size}^2"
                + (", qk RMS-norm (`ln_q`)" if cfg.qk_norm else "")
                + (f", dual attention (`x_block.attn2`) in blocks {cfg.dual_attention_layers[0]}-"
                   f"{cfg.dual_attention_layers[-1]}" if cfg.dual_attention_layers else ""))
    if cfg.num_layers == 24 and cfg.dual_attention_layers:
        return "SD3.5-medium", evidence
    if cfg.num_layers == 24:
        return "SD3-medium", evidence
    if cfg.num_layers == 38:
        return "SD3.5-large or SD3.5-large-turbo (the weights cannot tell them apart)", evidence
    return ("SD3.5-like" if cfg.qk_norm or cfg.dual_attention_layers else "SD3-like"), evidence
