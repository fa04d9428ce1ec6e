"""What a diffusers folder holds, before any key is mapped: its family or kind, read from
model_index.json's pipeline class, the component folders, and unet/config.json.

Single files are told apart by their keys and shapes (`layout.detect_variant`); a folder says more
about itself than its keys do, and its keys follow a layout that differs per family.
"""
from __future__ import annotations

from pathlib import Path

from models.textfile import read_json

from .layout import CHANNEL_KINDS, LAYOUTS, CheckpointError, family_code

# model_index.json `_class_name` prefix -> variant, first match wins (longer names first); a plain
# StableDiffusion*Pipeline is decided by the UNet's config
PIPELINES = (("StableDiffusionXLInpaint", "SDXL inpainting"), ("StableDiffusionXLInstructPix2Pix", "SDXL pix2pix"),
             ("StableDiffusionXL", "SDXL"), ("StableDiffusion3", "SD3"), ("StableDiffusionInpaint", "inpainting"),
             ("StableDiffusionInstructPix2Pix", "pix2pix"), ("StableDiffusionDepth2Img", "depth"),
             ("StableDiffusionUpscale", "upscaler"), ("StableDiffusionLatentUpscale", "upscaler"),
             ("StableUnCLIP", "unCLIP"), ("Flux", "Flux"), ("Kandinsky", "Kandinsky"), ("IFPipeline", "DeepFloyd IF"),
             ("IFImg2Img", "DeepFloyd IF"), ("PixArt", "PixArt"), ("StableCascade", "Stable Cascade"),
             ("LDMTextToImage", "LDM-400M"))


def folder_family(folder: Path, index: dict, unet: dict) -> tuple[str, str]:
    """(variant, evidence) of a diffusers folder: a family's name (models.FAMILIES) or a kind of layout.UNSUPPORTED."""
    edm = _by_edm(folder)
    if edm is not None:  # Playground v2.5 names StableDiffusionXLPipeline: its VAE and scheduler tell it apart
        return edm
    name = index.get("_class_name")
    if isinstance(name, str):
        variant = next((v for prefix, v in PIPELINES if name.startswith(prefix)), None)
        if variant == "SDXL" and not (folder / "text_encoder").is_dir() and (folder / "text_encoder_2").is_dir():
            return "SDXL refiner", f"model_index.json names {name}, with text_encoder_2/ alone"
        if variant is not None:
            return variant, f"model_index.json names {name}"
    return _by_channels(unet) or _by_components(folder, unet) or _by_unet(unet) or _by_text_encoder(folder) or (
        "SD v1", "unet/, vae/, text_encoder/; no other family's pipeline class, component or UNet setting")


def _json(path: Path) -> dict:
    """A config.json as a dict, or {} (an unreadable or malformed one is named by the config reader)."""
    try:
        data = read_json(path, "config")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _by_edm(folder: Path) -> tuple[str, str] | None:
    """Playground v2.5: an EDM scheduler or the VAE's per-channel latent statistics."""
    scheduler = _json(folder / "scheduler" / "scheduler_config.json").get("_class_name")
    if isinstance(scheduler, str) and scheduler.startswith("EDM"):
        return "Playground v2.5", f"scheduler_config.json names {scheduler} (an EDM noise schedule)"
    vae = _json(folder / "vae" / "config.json")
    if vae.get("latents_mean") is not None or vae.get("latents_std") is not None:
        return "Playground v2.5", "vae/config.json has latents_mean / latents_std (per-channel latent statistics)"
    return None


def _by_components(folder: Path, unet: dict) -> tuple[str, str] | None:
    """From the component folders: a second text encoder counts when it has a config.json and the UNet's
    config (when there is one) takes a vector conditioning, as SDXL's does (a stray empty text_encoder_2/
    beside an SD v1 UNet is not SDXL)."""
    if (folder / "transformer").is_dir() and not (folder / "unet").is_dir():
        return "DiT", "a transformer/ folder and no unet/ (a diffusion transformer such as SD3, Flux or PixArt)"
    if (folder / "text_encoder_2" / "config.json").is_file() and (not unet or "addition_embed_type" in unet):
        return "SDXL", "a text_encoder_2/ folder (SDXL's second text encoder)"
    if (folder / "bert").is_dir():
        return "LDM-400M", "a bert/ folder (LDMBert text encoder)"
    return None


def _by_channels(unet: dict) -> tuple[str, str] | None:
    """An image-conditioned UNet (its input channels; SDXL's by its size conditioning too) or Stable unCLIP's
    (an image embedding), whatever components the folder has."""
    if unet.get("class_embed_type") in ("projection", "simple_projection"):
        return "unCLIP", f"unet/config.json has class_embed_type {unet['class_embed_type']!r} (an image embedding)"
    channels = unet.get("in_channels")
    if channels in CHANNEL_KINDS:
        sdxl = unet.get("addition_embed_type") == "text_time" and channels in (8, 9)
        return (f"SDXL {CHANNEL_KINDS[channels]}" if sdxl else CHANNEL_KINDS[channels],
                f"unet/config.json has in_channels {channels} (text-to-image: 4)")
    return None


def _by_unet(unet: dict) -> tuple[str, str] | None:
    """From unet/config.json; a malformed value is left for the config reader to name."""
    if unet.get("addition_embed_type") == "text_time":
        return "SDXL", "unet/config.json has addition_embed_type 'text_time' (SDXL's size conditioning)"
    width = unet.get("cross_attention_dim")
    if width == 1024:
        return "SD 2.x", "unet/config.json has cross_attention_dim 1024 (OpenCLIP ViT-H)"
    if width == 2048:
        return "SDXL", "unet/config.json has cross_attention_dim 2048 (CLIP-L and OpenCLIP bigG)"
    return None


def _by_text_encoder(folder: Path) -> tuple[str, str] | None:
    """SD 2.x's OpenCLIP tower uses exact gelu where SD v1's CLIP-L uses quick_gelu: the sign of SD 2.x
    in a folder whose UNet is not full size (cross_attention_dim 1024 says it otherwise)."""
    if _json(folder / "text_encoder" / "config.json").get("hidden_act") == "gelu":
        return "SD 2.x", "text_encoder/config.json has hidden_act gelu (OpenCLIP ViT-H; SD v1's CLIP-L: quick_gelu)"
    return None


# ------------------------------------------------------------------------------- prediction type
# how files name what the UNet predicts -> SDConfig.prediction_type
PREDICTION_NAMES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v", "v_prediction": "v", "v-prediction": "v"}


def prediction_name(value, where: str) -> str:
    if value not in PREDICTION_NAMES:
        raise CheckpointError(f"{where}: prediction type {str(value)[:40]!r} is not supported: the sampler needs "
                              "epsilon (noise) or v prediction")
    return PREDICTION_NAMES[value]


def said_in_metadata(metadata: dict, where: str) -> tuple[str, str] | None:
    """(prediction type, where it was read) from a safetensors file's metadata, or None: ModelSpec's
    `modelspec.prediction_type`, ComfyUI's `modelspec.predict_key`, kohya's `ss_v_parameterization`."""
    for key in ("modelspec.prediction_type", "modelspec.predict_key"):
        if key in metadata:
            return prediction_name(metadata[key], where), f"the file's {key} metadata"
    if metadata.get("ss_v_parameterization") in ("True", "true"):
        return "v", "the file's ss_v_parameterization metadata"
    return None  # an `ldm_config` says it through the config it becomes (SDConfig.from_ldm)


def resolve_prediction(src, cfg, cfg_source: str, variant: str, given=None) -> tuple[str, str]:
    """(prediction type, where it came from): the `given` argument; else what the file says (its
    metadata, its scheduler_config.json, a config whose parameterization is "v"); else the family's rule
    (its Layout's `predicts`; SD 2.x: v, except the 512-px base); else epsilon."""
    if given is not None:
        return prediction_name(given, "prediction_type="), "the prediction_type argument"
    said = [s for s in (src.prediction, ("v", f"{cfg_source} (parameterization v)")
                        if cfg.prediction_type == "v" else None) if s is not None]
    if len({p for p, _ in said}) > 1:
        raise CheckpointError(f"{src.where}: {said[0][1]} says {said[0][0]} but {said[1][1]} says {said[1][0]}; "
                              "pass prediction_type= (--prediction-type) to say which")
    if said:
        return said[0]
    code = family_code(variant)
    if code is not None and LAYOUTS[code].predicts is not None:
        return LAYOUTS[code].predicts(src, cfg)
    return "epsilon", "the default: nothing in the file says v"


# ------------------------------------------------------------------------------- marker keys
# empty tensors ComfyUI saves beside an SDXL model's weights to say how it was trained (and reads back:
# comfy/supported_models.py): `v_pred`, a v-prediction model; `ztsnr`, trained on zero-terminal-SNR betas
V_PRED, ZTSNR = "v_pred", "ztsnr"


def read_markers(src) -> None:
    """Take a single file's marker keys out of its entries into what they say: `v_pred` -> the
    prediction type v (a metadata that says otherwise is a contradiction), `ztsnr` -> src.zero_snr."""
    if V_PRED in src.entries:
        said = ("v", f"the file's `{V_PRED}` marker key (v-prediction, as ComfyUI saves it)")
        if src.prediction is not None and src.prediction[0] != "v":
            raise CheckpointError(f"{src.where}: {said[1]} says v but {src.prediction[1]} says {src.prediction[0]}; "
                                  "pass prediction_type= (--prediction-type) to say which")
        src.prediction = src.prediction or said
        del src.entries[V_PRED]
    if ZTSNR in src.entries:
        src.zero_snr = f"the file's `{ZTSNR}` marker key (zero-terminal-SNR betas, as ComfyUI saves it)"
        del src.entries[ZTSNR]
