"""The families' checkpoint files, one row each (layout.Layout): how a single file of the family is
recognised from its keys and shapes, the config of a file that names none, the buffers its files carry
and the keys they hold unread, its diffusers folder (parts, key map, config reader), and its prediction
rule. models.FAMILIES holds the model side under the same codes; docs/ARCHITECTURE.md shows how a family
is added. Rows are in recognition order: the first whose `recognise` answers names a single file.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from models import FAMILIES, PREFIXES, SDConfig, load_config

from . import diffusers_keys as dk
from .layout import LAYOUTS, FolderLayout, Layout, depths_in_file, position_ids

UNET = PREFIXES["unet"]
POSITION_IDS = FAMILIES["sd1"].text_prefix + "embeddings.position_ids"
SD2_TEXT = FAMILIES["sd2"].text_prefix   # OpenCLIP ViT-H: cond_stage_model.model.
LDM_TEXT = FAMILIES["ldm"].text_prefix   # LDMBert: cond_stage_model.transformer.
SDXL_POSITION_IDS = dk.SDXL_CLIP_PREFIX + "embeddings.position_ids"
SDXL_LOGIT_SCALE = dk.SDXL_OPENCLIP_PREFIX + "logit_scale"
SD2_BASE_STEP = "875000"  # global_step of the SD 2.x 512-px base files: epsilon (diffusers' rule)

SD_V1_SOURCE = "SD v1's own config (no config given, none in the file; every key and shape checked)"
SD2_SOURCE = ("SD 2.x's own config, configs/sd-v2-base.yaml or sd-v2-v.yaml by the prediction type (no config "
              "given, none in the file; every key and shape checked)")
SDXL_SOURCE = ("SDXL base's config, configs/sdxl-base.yaml, its transformer depths as the file's keys say (an SDXL "
               "checkpoint by its keys; no config given, none in the file; every key and shape checked)")
LDM_SOURCE = "LDM-400M's config, configs/ldm-400m.yaml (no config given, none in the file; every key and shape checked)"


# ---- recognising a single file (canonical {key: shape}) -> evidence, or None
def sdxl_keys(shapes: dict) -> str | None:
    if any(k.startswith("conditioner.embedders") for k in shapes) or UNET + "label_emb.0.0.weight" in shapes:
        return "found `conditioner.embedders.*` / `label_emb` keys"
    return None


def sd2_keys(shapes: dict) -> str | None:
    """OpenCLIP keys, or else a UNet whose cross-attention reads a 1024-wide context (OpenCLIP ViT-H)."""
    if any(k.startswith(SD2_TEXT) for k in shapes):
        return f"found OpenCLIP text-encoder keys `{SD2_TEXT}*`"
    for k, s in shapes.items():
        if k.startswith(UNET) and k.endswith("attn2.to_k.weight") and len(s) == 2 and s[1] == 1024:
            return f"`{k}` is {list(s)}: 1024-wide cross-attention context (OpenCLIP ViT-H)"
    return None


def ldm_keys(shapes: dict) -> str | None:
    if any(k.startswith(LDM_TEXT) and (".token_emb." in k or ".attn_layers." in k) for k in shapes):
        return f"found LDMBert text-encoder keys `{LDM_TEXT}token_emb` / `attn_layers`"
    return None


def sd1_keys(shapes: dict) -> str | None:
    if any(k.startswith(UNET) for k in shapes):
        return "CompVis UNet with 4 input channels, CLIP text encoder, no SD 2.x / SDXL keys"
    return None


# ---- defaults and rules
def sd2_default(prediction: str | None) -> SDConfig:
    """SD 2.x's own config for a file that names none: configs/sd-v2-base.yaml (512 px, epsilon) or, for a
    v model, sd-v2-v.yaml (768 px). Before the prediction type is known (None) it is the base architecture
    at 768 px and epsilon, so that it states nothing and the family's prediction rule applies."""
    if prediction == "epsilon":
        return load_config("sd-v2-base")
    return load_config("sd-v2-v") if prediction == "v" else load_config("sd-v2-base").replace(image_size=96)


def sd2_predicts(src, cfg: SDConfig) -> tuple[str, str]:
    """SD 2.x's rule when nothing says: v, except the 512-px base (image_size 64 or global_step 875000)."""
    if cfg.image_size == 64 or src.metadata.get("global_step") == SD2_BASE_STEP:
        return "epsilon", ("SD 2.x's rule: the 512-px base predicts epsilon; for a v model pass --prediction-type v or "
                           "--model-config configs/sd-v2-v.yaml (prediction_type= / config= in the API)")
    return "v", ("SD 2.x's rule: v unless the 512-px base; for the base pass --prediction-type epsilon or "
                 "--model-config configs/sd-v2-base.yaml (prediction_type= / config= in the API)")


def clip_position_ids(cfg: SDConfig) -> dict:
    return {POSITION_IDS: position_ids(cfg.text.max_position_embeddings)}


def sdxl_carried(cfg: SDConfig) -> dict:
    """CLIP-L's `position_ids` and bigG's `logit_scale` (CLIP's image-text temperature, unused here)."""
    return {SDXL_POSITION_IDS: position_ids(cfg.text.clip.max_position_embeddings),
            SDXL_LOGIT_SCALE: torch.tensor(math.log(1 / 0.07))}


def sdxl_fitted(shapes: dict, cfg: SDConfig) -> SDConfig:
    """SDXL base's config with the transformer depths the file's keys say: a distilled SDXL (SSD-1B,
    Segmind-Vega), shipped as a single file that names no config, has fewer blocks per level, a depth per
    output block and a middle block of one resnet; SDXL base's own keys give SDXL base's config back."""
    return cfg.replace(unet=dataclasses.replace(cfg.unet, **depths_in_file(shapes, cfg.unet)))


def nothing(cfg: SDConfig) -> dict:
    return {}


SD_PARTS = {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder"}

ROWS = (
    Layout(family="sdxl", recognise=sdxl_keys, default_config=lambda prediction: load_config("sdxl-base"),
           default_source=SDXL_SOURCE, carried=sdxl_carried,
           folder=FolderLayout(parts=SD_PARTS | {"text_encoder_2": "text_encoder_2"}, config=dk.sdxl_folder_config,
                               key=dk.sdxl_key, openclip_towers={"text_encoder_2": dk.SDXL_OPENCLIP_PREFIX},
                               openclip_readout=("penultimate", False)),
           unused=(SDXL_LOGIT_SCALE,), position_ids=(SDXL_POSITION_IDS,), config_hint=" (configs/sdxl-base.yaml)",
           fitted=sdxl_fitted),
    Layout(family="sd2", recognise=sd2_keys, default_config=sd2_default, default_source=SD2_SOURCE, carried=nothing,
           folder=FolderLayout(parts=SD_PARTS, config=dk.sd2_folder_config, key=dk.to_ldm_key,
                               openclip_towers={"text_encoder": SD2_TEXT}, openclip_readout=("last", True)),
           # CLIP's contrastive temperature and the pooled projection: SD 2.x reads a hidden state, not the pool
           unused=(SD2_TEXT + "logit_scale", SD2_TEXT + "text_projection"), predicts=sd2_predicts,
           models={"epsilon": "SD 2.x base (512-px epsilon-prediction model)",
                   "v": "SD 2.x v (768-px v-prediction model)"},
           config_hint=" (configs/sd-v2-base.yaml or sd-v2-v.yaml)"),
    Layout(family="ldm", recognise=ldm_keys, default_config=lambda prediction: load_config("ldm-400m"),
           default_source=LDM_SOURCE, carried=nothing,
           folder=FolderLayout(parts={"unet": "unet", "vae": "vqvae", "text_encoder": "bert"},
                               config=dk.ldm_folder_config, key=dk.ldm_key),
           unused=(LDM_TEXT + "to_logits.",), config_hint=" (configs/ldm-400m.yaml)"),  # the language-model head
    Layout(family="sd1", recognise=sd1_keys, default_config=lambda prediction: SDConfig(), default_source=SD_V1_SOURCE,
           carried=clip_position_ids, folder=FolderLayout(parts=SD_PARTS, config=dk.sd1_folder_config, key=dk.to_ldm_key),
           position_ids=(POSITION_IDS,)),
)
LAYOUTS.update({row.family: row for row in ROWS})
