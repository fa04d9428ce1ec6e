"""Oracles for the OpenCLIP text towers, built offline from our own seeded weights.

- open_clip's own `CLIP` model (its text half has the same key names as the SD 2.x / SDXL single
  files), imported without torchvision: open_clip's package imports torchvision's transforms and
  ops at import time for its image side only, so inert stand-ins sit in `sys.modules` for the
  duration of that import and are removed after it (transformers is imported first: it probes for
  torchvision itself).
- transformers' CLIPTextModel / CLIPTextModelWithProjection (what diffusers folders hold), with the
  weights converted by diffusers' own `convert_open_clip_checkpoint`, never by our key map.
- transformers' CLIPTokenizer padding with "!" (SD 2.x's `tokenizer/`, SDXL's `tokenizer_2/`).
"""
from __future__ import annotations

import copy
import functools
import json
import sys
import types
from pathlib import Path
from unittest import mock

import torch

import oracles as O

TORCHVISION_MODULES = ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
                       "torchvision.transforms.functional")


@functools.lru_cache(maxsize=None)
def open_clip_model_module():
    """`open_clip.model`, imported with torchvision stand-ins that are gone again afterwards."""
    import transformers.utils.import_utils as hf_imports

    hf_imports.is_torchvision_available()  # transformers settles its own probe before the stand-ins exist
    saved = {name: sys.modules.get(name) for name in TORCHVISION_MODULES}
    for name in TORCHVISION_MODULES:
        stub = types.ModuleType(name)
        stub.__path__ = []
        stub.__getattr__ = lambda attr, name=name: mock.MagicMock(name=f"{name}.{attr}")
        sys.modules[name] = stub
    try:
        import open_clip.model
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return open_clip.model


def seeded_tower(cfg, seed: int = O.SEED):
    """Our OpenCLIPTextModel with oracles.seeded_init_'s non-trivial weights (fused biases 0.1 N too)."""
    from models.openclip import OpenCLIPTextModel

    model = OpenCLIPTextModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    O.seeded_init_(model, gen)
    with torch.no_grad():
        for block in model.transformer.resblocks:
            block.attn.in_proj_bias.copy_(0.1 * torch.randn(block.attn.in_proj_bias.shape, generator=gen))
    return model.float().eval().requires_grad_(False)


def ref_open_clip(state: dict[str, torch.Tensor], cfg):
    """open_clip's CLIP with the text half of `cfg` (a tiny image half), loaded with `state` (OpenCLIP
    keys, no prefix). Exact GELU: open_clip's default, as ViT-H/bigG use."""
    model = open_clip_model_module().CLIP(
        embed_dim=cfg.projection_dim or cfg.width,
        vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
        text_cfg=dict(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.width,
                      heads=cfg.heads, layers=cfg.layers, mlp_ratio=cfg.mlp_ratio))
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"logit_scale", "text_projection"}
    assert not unexpected and all(k.startswith("visual.") or k in allowed for k in missing), (missing, unexpected)
    return model.float().eval().requires_grad_(False)


def open_clip_named_text_state(name: str) -> dict[str, torch.Tensor]:
    """The text half of open_clip's own architecture `name` (its model_configs/<name>.json: "ViT-H-14",
    "ViT-bigG-14"), full size on the meta device: what a single file's tower holds, keys without prefix."""
    model_module = open_clip_model_module()
    path = Path(model_module.__file__).parent / "model_configs" / f"{name}.json"
    with torch.device("meta"):
        model = model_module.CLIP(**json.loads(path.read_text()))
    return {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}


def hf_config(cfg, layers: int | None = None, eos_token_id: int = 49407):
    """transformers' CLIPTextConfig of the same tower (exact gelu), `layers` blocks. eos_token_id 2 (what
    the released SD 2.x / SDXL folders' config.json say) makes transformers pool at the largest id."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
        num_hidden_layers=layers or cfg.layers, num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.context_length, hidden_act="gelu", layer_norm_eps=1e-5,
        projection_dim=cfg.projection_dim or 512, bos_token_id=49406, eos_token_id=eos_token_id, pad_token_id=0)


def diffusers_converted(state: dict[str, torch.Tensor], prefix: str, text_model) -> dict[str, torch.Tensor]:
    """diffusers' own OpenCLIP -> HF conversion of a single file's tower (keys under `prefix`)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    return convert_open_clip_checkpoint(text_model, {prefix + k: v for k, v in state.items()}, prefix=prefix)


def ref_hf(state: dict[str, torch.Tensor], cfg, prefix: str, layers: int | None = None, eos_token_id: int = 49407):
    """transformers' CLIPTextModel (no projection) or CLIPTextModelWithProjection, `layers` blocks, loaded
    from `state` (OpenCLIP keys) through diffusers' converter with the single file's `prefix`."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with_projection = cfg.projection_dim is not None
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(hf_config(cfg, layers, eos_token_id))
    converted = diffusers_converted(state, prefix, model)
    if not with_projection:  # transformers >= 5.6: CLIPTextModel's keys have no `text_model.` level
        converted = {k.removeprefix("text_model."): v for k, v in converted.items() if k != "text_projection.weight"}
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return model.float().eval().requires_grad_(False)


@functools.lru_cache(maxsize=None)
def hf_tokenizer_bang():
    """transformers' CLIPTokenizer padding with "!" (id 0), as SD 2.x's and SDXL's second tokenizer."""
    tok = copy.deepcopy(O.hf_tokenizer())
    tok.pad_token = "!"
    assert tok.pad_token_id == 0, tok.pad_token_id
    return tok


def hf_ids_bang(prompts) -> torch.Tensor:
    return hf_tokenizer_bang()(list(prompts), padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
