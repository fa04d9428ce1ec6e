"""Test helpers for OpenCLIP text towers: our single-file layout -> the diffusers folder's (the inverse of
weights_tools.openclip_keys.hf_plan / combine, which the loader uses), the tower's state out of a single
file, and its config read back from the keys' shapes."""
from __future__ import annotations

import re

import torch

from models.openclip import OpenCLIPTextConfig
from weights_tools.layout import CheckpointError
from weights_tools.openclip_keys import HF_LAYER, HF_TOP, QKV, combine, hf_plan

# in a single file beside the text tower, never used by it (CLIP's contrastive temperature)
SINGLE_FILE_UNUSED = ("logit_scale", "attn_mask")
# how each family's single file reads the tower: context layer, ln_final on it (see models/openclip.py)
FAMILY_OUTPUT = {"sd2": ("penultimate", True), "sdxl": ("penultimate", False)}


def hf_to_openclip(state: dict[str, torch.Tensor], where: str = "text_encoder") -> dict[str, torch.Tensor]:
    """A diffusers folder's text tower (HF CLIP keys, with or without `text_model.`) in OpenCLIP's keys."""
    return {key: combine(key, [state[k] for k in sources]) for key, sources in hf_plan(state, where).items()}


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
