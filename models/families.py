"""The model families, one row each: what shared code looks up instead of asking which family it has.

A row (models.config.Family) names the family's text conditioning (config class, module, tokenizer,
key prefix, its towers), how the text reaches the denoiser (`conditioning`), how the family's
CompVis / SGM config is recognised, read and written, and its defaults. The file side (key layouts,
folder parts, how a checkpoint is recognised) is weights_tools/layouts.py, keyed by the same code.
Adding a family: a row here, a row there, a configs/ file, and a text-tower module only if the tower is new
(docs/ARCHITECTURE.md, "Adding a model family").
"""
from __future__ import annotations

from .clip import CLIPTextModel, default_tokenizer, folder_tokenizer
from .config import FAMILIES, CLIPTextConfig, Family, OpenCLIPTextConfig, SDConfig
from .ldmbert import LDMBertConfig, LDMBertModel
from .openclip import OpenCLIPTextModel, openclip_tokenizer
from .sdxl import N_SIZE_IDS, vector_conditioning
from .sdxl_text import SDXLTextConfig, SDXLTextModel, split_pooled


# ---- conditioning: (config, context from the text encoder, picture height, width) -> (context, y)
def cross_attention_only(cfg: SDConfig, context, height: int, width: int):
    """The text context goes to cross-attention as it is; the denoiser has no vector conditioning."""
    return context, None


def pooled_and_sizes(cfg: SDConfig, context, height: int, width: int):
    """SDXL: the context's last row is the pooled vector (models/sdxl_text.py); y is it and the picture's
    size ids, with diffusers' pipeline defaults (original and target size = the picture's, crop (0, 0))."""
    context, pooled = split_pooled(context, cfg.text.pooled_dim)
    return context, vector_conditioning(pooled, height, width, size_embed_dim=cfg.text.size_embed_dim)


# ---- checks across the parts of one config
def no_vector(cfg: SDConfig) -> None:
    if cfg.unet.adm_in_channels:
        raise ValueError(f"the UNet has a vector conditioning (adm_in_channels={cfg.unet.adm_in_channels}) but "
                         f"the {family_name(cfg)} family gives none: set adm_in_channels to 0 or use a family that has one")


def vector_fits_towers(cfg: SDConfig) -> None:
    """SDXL: the UNet's `adm_in_channels` is the pooled vector plus six size ids of `size_embed_dim` each."""
    t = cfg.text
    want = t.pooled_dim + N_SIZE_IDS * t.size_embed_dim
    if cfg.unet.adm_in_channels != want:
        raise ValueError(
            f"the UNet's vector conditioning takes {cfg.unet.adm_in_channels} channels (adm_in_channels; diffusers: "
            f"projection_class_embeddings_input_dim) but the text towers give pooled {t.pooled_dim} + "
            f"{N_SIZE_IDS} size ids x {t.size_embed_dim} (addition_time_embed_dim) = {want}: the config's parts "
            "disagree; fix whichever of the three numbers is wrong")


def family_name(cfg: SDConfig) -> str:
    return FAMILIES[cfg.family].name


# ---- reading and writing the text part of CompVis / SGM configs
def cond_params(p: dict) -> dict:
    return (p.get("cond_stage_config") or {}).get("params") or {}


def cond_target(suffix: str):
    """Does a `model.params` dict's cond_stage_config name a target ending in `suffix`."""
    return lambda p: str((p.get("cond_stage_config") or {}).get("target", "")).endswith(suffix)


def as_cond_stage(text) -> dict:
    return {"cond_stage_config": text.to_ldm()}


def trained_at(default: int, v: int | None = None):
    """image_size(config's, prediction): the config's side, else `default`; a v model whose config says
    the generic 64 was trained at `v` (SD 2.x's v2-inference-v.yaml says 64 for its 768-px models)."""
    def image_size(size: int | None, prediction: str) -> int:
        size = default if size is None else size
        return v if v is not None and prediction == "v" and size == 64 else size
    return image_size


def one_tower(text) -> tuple:
    return (text,)


SD_SCALE = SDConfig.scale_factor  # SD 1.x / 2.x / LDM's VAE scale, SDConfig's default

ROWS = (
    Family(code="sd1", name="SD v1", text_config=CLIPTextConfig, text_encoder=CLIPTextModel,
           tokenizer=lambda text: folder_tokenizer(text.tokenizer) if text.tokenizer else default_tokenizer(),
           text_prefix="cond_stage_model.transformer.text_model.",
           towers=one_tower, conditioning=cross_attention_only,
           read_text=lambda p: CLIPTextConfig.from_ldm(cond_params(p)), write_text=as_cond_stage,
           default_config="sd-v1", image_size=trained_at(64), scale_factor=SD_SCALE, check=no_vector, reads=None),
    Family(code="sd2", name="SD 2.x", text_config=OpenCLIPTextConfig, text_encoder=OpenCLIPTextModel,
           tokenizer=lambda text: folder_tokenizer(text.tokenizer) if text.tokenizer else openclip_tokenizer(),
           text_prefix="cond_stage_model.model.",
           towers=one_tower, conditioning=cross_attention_only,
           read_text=lambda p: OpenCLIPTextConfig.from_ldm(cond_params(p)), write_text=as_cond_stage,
           default_config="sd-v2-base", image_size=trained_at(64, v=96), scale_factor=SD_SCALE, check=no_vector,
           reads=cond_target("FrozenOpenCLIPEmbedder")),
    Family(code="sdxl", name="SDXL", text_config=SDXLTextConfig, text_encoder=SDXLTextModel,
           tokenizer=SDXLTextConfig.tokenizer, text_prefix="conditioner.",
           towers=lambda text: (text.clip, text.openclip), conditioning=pooled_and_sizes,
           read_text=lambda p: SDXLTextConfig.from_sgm(p["conditioner_config"]),
           write_text=lambda text: {"conditioner_config": text.to_sgm()},
           default_config="sdxl-base", image_size=trained_at(128), scale_factor=0.13025, check=vector_fits_towers,
           reads=lambda p: "conditioner_config" in p, unet_key="network_config"),
    Family(code="ldm", name="LDM-400M", text_config=LDMBertConfig, text_encoder=LDMBertModel,
           tokenizer=LDMBertConfig.tokenizer, text_prefix="cond_stage_model.transformer.",
           towers=one_tower, conditioning=cross_attention_only,
           read_text=lambda p: LDMBertConfig.from_ldm(cond_params(p)), write_text=as_cond_stage,
           default_config="ldm-400m", image_size=trained_at(64), scale_factor=SD_SCALE, check=no_vector,
           reads=cond_target("BERTEmbedder")),
)
FAMILIES.update({row.code: row for row in ROWS})
