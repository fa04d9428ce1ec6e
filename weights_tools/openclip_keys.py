"""OpenCLIP text towers: the HF CLIP layout of diffusers folders <-> OpenCLIP's own layout, and their configs.

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

from .layout import CheckpointError

# whole-tower keys: HF CLIP (without `text_model.`) -> OpenCLIP
HF_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
          "embeddings.position_embedding.weight": "positional_embedding",
          "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
# per-layer names: HF `encoder.layers.N.<name>` -> OpenCLIP `transformer.resblocks.N.<name>`
HF_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
            "self_attn.out_proj": "attn.out_proj"}
QKV = ("q_proj", "k_proj", "v_proj")
# in a single file beside the text tower, never used by it (CLIP's contrastive temperature)
SINGLE_FILE_UNUSED = ("logit_scale", "attn_mask")
# how each family reads the tower: context layer, ln_final on it (see models/openclip.py)
FAMILY_OUTPUT = {"sd2": ("penultimate", True), "sdxl": ("penultimate", False)}


def hf_to_openclip(state: dict[str, torch.Tensor], where: str = "text_encoder") -> dict[str, torch.Tensor]:
    """A diffusers folder's text tower (HF CLIP keys, with or without `text_model.`) in OpenCLIP's keys."""
    return {key: combine(key, [state[k] for k in sources]) for key, sources in hf_plan(state, where).items()}


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


def openclip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text keys (no prefix) -> the keys of a diffusers folder's CLIPTextModel(WithProjection)."""
    top = {v: k for k, v in HF_TOP.items()}
    layer_names = {v: k for k, v in HF_LAYER.items()}
    out = {}
    for key, value in state.items():
        if key in top:
            out["text_model." + top[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.T.contiguous()
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key):
            for name, part in zip(QKV, value.chunk(3)):
                out[f"text_model.encoder.layers.{m[1]}.self_attn.{name}.{m[2]}"] = part.clone()
        elif (m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.([\w.]+)\.(weight|bias)", key)) and m[2] in layer_names:
            out[f"text_model.encoder.layers.{m[1]}.{layer_names[m[2]]}.{m[3]}"] = value
        elif key not in SINGLE_FILE_UNUSED:
            raise CheckpointError(f"unknown OpenCLIP text key `{key}`")
    return out


def single_file_text_state(ckpt: dict[str, torch.Tensor], prefix: str, cfg: OpenCLIPTextConfig) -> dict:
    """The tower's own state dict from a single file: keys under `prefix`, without what it never uses
    (logit_scale; text_projection when the config pools nothing, as SD 2.x)."""
    state = {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}
    unused = SINGLE_FILE_UNUSED + (("text_projection",) if cfg.projection_dim is None else ())
    return {k: v for k, v in state.items() if k not in unused}


def _family_output(family: str) -> tuple[str, bool]:
    if family not in FAMILY_OUTPUT:
        raise ValueError(f"OpenCLIP text towers belong to the families {sorted(FAMILY_OUTPUT)}, got {family!r}")
    return FAMILY_OUTPUT[family]


def openclip_config_from_keys(state: dict[str, torch.Tensor], family: str, heads: int | None = None,
                              where: str = "checkpoint") -> OpenCLIPTextConfig:
    """OpenCLIPTextConfig from a single file's tower (OpenCLIP keys, prefix removed): sizes from the
    shapes; heads, which shapes cannot tell, given or else OpenCLIP's 64 channels per head (ViT-H/14:
    16, bigG/14: 20); the context as the family reads it."""
    output_layer, final_ln = _family_output(family)
    try:
        vocab, width = state["token_embedding.weight"].shape
        layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks."))
        mlp = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        context = state["positional_embedding"].shape[0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: not an OpenCLIP text tower (lacks {e})") from e
    proj = state.get("text_projection")
    if family == "sdxl" and proj is None:
        raise CheckpointError(f"{where}: SDXL's OpenCLIP tower lacks text_projection, which its pooled output needs")
    return OpenCLIPTextConfig(
        vocab_size=vocab, context_length=context, width=width, layers=layers, heads=heads or width // 64,
        mlp_ratio=mlp / width, output_layer=output_layer, final_ln=final_ln,
        projection_dim=int(proj.shape[1]) if family == "sdxl" and proj is not None else None)


def openclip_config_from_hf(c: dict, family: str, where: str = "text_encoder") -> OpenCLIPTextConfig:
    """OpenCLIPTextConfig from a diffusers folder's text tower config.json. SD 2.x folders hold the
    tower cut to 23 layers, so their context is the LAST layer's output through the final norm."""
    output_layer, final_ln = ("last", True) if family == "sd2" else _family_output(family)
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
