"""What a diffusers folder holds, before any key is mapped: its family or kind, read from
model_index.json's pipeline class, the component folders, and unet/config.json.

Single files are told apart by their keys and shapes (`layout.detect_variant`); a folder says more
about itself than its keys do, and its keys follow a layout that differs per family.
"""
from __future__ import annotations

from pathlib import Path

from .layout import CHANNEL_KINDS

# model_index.json `_class_name` prefix -> variant, first match wins (longer names first); a plain
# StableDiffusion*Pipeline is decided by the UNet's config
PIPELINES = (("StableDiffusionXLInpaint", "inpainting"), ("StableDiffusionXLInstructPix2Pix", "pix2pix"),
             ("StableDiffusionXL", "SDXL"), ("StableDiffusion3", "SD3"), ("StableDiffusionInpaint", "inpainting"),
             ("StableDiffusionInstructPix2Pix", "pix2pix"), ("StableDiffusionDepth2Img", "depth"),
             ("StableDiffusionUpscale", "upscaler"), ("StableDiffusionLatentUpscale", "upscaler"),
             ("StableUnCLIP", "unCLIP"), ("Flux", "Flux"), ("Kandinsky", "Kandinsky"), ("IFPipeline", "DeepFloyd IF"),
             ("IFImg2Img", "DeepFloyd IF"), ("PixArt", "PixArt"), ("StableCascade", "Stable Cascade"),
             ("LDMTextToImage", "LDM"))


def folder_family(folder: Path, index: dict, unet: dict) -> tuple[str, str]:
    """(variant, evidence) of a diffusers folder: a key of layout.FAMILIES or layout.UNSUPPORTED."""
    name = index.get("_class_name")
    if isinstance(name, str):
        variant = next((v for prefix, v in PIPELINES if name.startswith(prefix)), None)
        if variant == "SDXL" and not (folder / "text_encoder").is_dir() and (folder / "text_encoder_2").is_dir():
            return "SDXL refiner", f"model_index.json names {name}, with text_encoder_2/ alone"
        if variant is not None:
            return variant, f"model_index.json names {name}"
    return _by_components(folder) or _by_unet(unet) or (
        "SD v1", "a UNet with 4 input channels and 768-wide cross-attention, CLIP text encoder")


def _by_components(folder: Path) -> tuple[str, str] | None:
    if (folder / "transformer").is_dir() and not (folder / "unet").is_dir():
        return "DiT", "a transformer/ folder and no unet/ (a diffusion transformer such as SD3, Flux or PixArt)"
    if (folder / "text_encoder_2").is_dir():
        return "SDXL", "a text_encoder_2/ folder (SDXL's second text encoder)"
    if (folder / "bert").is_dir():
        return "LDM", "a bert/ folder (LDMBert text encoder)"
    return None


def _by_unet(unet: dict) -> tuple[str, str] | None:
    """From unet/config.json; a malformed value is left for the config reader to name."""
    if unet.get("addition_embed_type") == "text_time":
        return "SDXL", "unet/config.json has addition_embed_type 'text_time' (SDXL's size conditioning)"
    channels = unet.get("in_channels")
    if channels in CHANNEL_KINDS:
        return CHANNEL_KINDS[channels], f"unet/config.json has in_channels {channels} (text-to-image: 4)"
    width = unet.get("cross_attention_dim")
    if width == 1024:
        return "SD 2.x", "unet/config.json has cross_attention_dim 1024 (OpenCLIP ViT-H)"
    if width == 2048:
        return "SDXL", "unet/config.json has cross_attention_dim 2048 (CLIP-L and OpenCLIP bigG)"
    return None
