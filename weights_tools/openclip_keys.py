"""OpenCLIP text towers: the HF CLIP layout of diffusers folders -> OpenCLIP's own layout, and their configs.

Single files keep OpenCLIP's names (`cond_stage_model.model.*` for SD 2.x,
`conditioner.embedders.1.model.*` for SDXL): those are our module names, so only the prefix goes.
diffusers folders (`text_encoder/` of SD 2.x, `text_encoder_2/` of SDXL) hold transformers'
CLIPTextModel(WithProjection): separate q/k/v projections where OpenCLIP fuses them into
`in_proj_weight` (rows q, k, v), `text_projection.weight` (dim, width) where OpenCLIP keeps the
matrix (width, dim), and an SD 2.x tower already cut to 23 layers.
"""
from __future__ import annotations

import re

import torch

from models.openclip import OpenCLIPTextConfig

from .layout import LAYOUTS, CheckpointError

# whole-tower keys: HF CLIP (without `text_model.`) -> OpenCLIP
HF_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
          "embeddings.position_embedding.weight": "positional_embedding",
          "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
# per-layer names: HF `encoder.layers.N.<name>` -> OpenCLIP `transformer.resblocks.N.<name>`
HF_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
            "self_attn.out_proj": "attn.out_proj"}
QKV = ("q_proj", "k_proj", "v_proj")


def hf_plan(keys, where: str = "text_encoder") -> dict[str, tuple[str, ...]]:
    """OpenCLIP key -> the HF CLIP keys it is made of (q, k, v for a fused `in_proj_*`, else one), so a
    loader can read each tensor when it needs it (`combine` makes it)."""
    out, qkv = {}, {}
    for original in keys:
        key = original.removeprefix("text_model.")
        if key in HF_TOP:
            out[HF_TOP[key]] = (original,)
        elif key == "text_projection.weight":
            out["text_projection"] = (original,)
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv]_proj)\.(weight|bias)", key):
            qkv[(int(m[1]), m[3], m[2])] = original
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.([\w.]+)\.(weight|bias)", key):
            if m[2] not in HF_LAYER:
                raise CheckpointError(f"{where}: unknown CLIP text key `{original}` (not part of an OpenCLIP text tower)")
            out[f"transformer.resblocks.{m[1]}.{HF_LAYER[m[2]]}.{m[3]}"] = (original,)
        elif not key.endswith("position_ids"):
            raise CheckpointError(f"{where}: unknown CLIP text key `{original}` (not part of an OpenCLIP text tower)")
    for layer, kind in sorted({(layer, kind) for layer, kind, _ in qkv}):
        parts = [qkv.get((layer, kind, name)) for name in QKV]
        if any(p is None for p in parts):
            raise CheckpointError(f"{where}: layer {layer} lacks one of q_proj/k_proj/v_proj.{kind}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = tuple(parts)
    return out


def combine(key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The OpenCLIP tensor `key` from its HF CLIP tensors (in `hf_plan`'s order): q, k, v stacked into
    `in_proj_*`, the projection transposed to (width, dim), anything else as it is."""
    if key.endswith((".in_proj_weight", ".in_proj_bias")):
        return torch.cat(tensors)
    if key == "text_projection":
        return tensors[0].T.contiguous()
    return tensors[0]


def openclip_config_from_hf(c: dict, family: str, where: str = "text_encoder") -> OpenCLIPTextConfig:
    """OpenCLIPTextConfig from a diffusers folder's text tower config.json, read as the family's folder
    layout says (its `openclip_readout`: SD 2.x folders hold the tower cut to 23 layers, so their context
    is the LAST layer's output through the final norm)."""
    readout = LAYOUTS[family].folder.openclip_readout if family in LAYOUTS and LAYOUTS[family].folder else None
    if readout is None:
        raise CheckpointError(f"{where}: the {family!r} family's folders hold no OpenCLIP text tower")
    output_layer, final_ln = readout
    if c.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{where}: hidden_act {c['hidden_act']!r}; OpenCLIP text towers use exact gelu")
    with_projection = "CLIPTextModelWithProjection" in (c.get("architectures") or [])
    try:
        return OpenCLIPTextConfig(
            vocab_size=c["vocab_size"], context_length=c["max_position_embeddings"], width=c["hidden_size"],
            layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
            mlp_ratio=c["intermediate_size"] / c["hidden_size"], output_layer=output_layer, final_ln=final_ln,
            projection_dim=c["projection_dim"] if with_projection else None)
    except KeyError as e:
        raise CheckpointError(f"{where}: config.json lacks {e}; cannot tell the text tower's architecture") from e
