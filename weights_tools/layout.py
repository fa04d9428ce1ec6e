"""The single-file (CompVis / LDM) key layout: which key belongs to which part, what a loader ignores,
which variant a file is, and whether its shapes fit a config.

Everything here works on a `{key: shape}` mapping, never on tensor data, so `inspect_checkpoint`
and `load_checkpoint` share it and a full-size file can be checked from its header alone.
"""
from __future__ import annotations

import functools
import math
import re

import torch

from models import PREFIXES, AutoencoderKL, CLIPTextConfig, SDConfig, UNetModel, prefixes
from models.sd import text_tower
from models.sdxl_text import SDXLTextConfig

POSITION_IDS = PREFIXES["text_encoder"] + "embeddings.position_ids"


def position_ids(n: int) -> torch.Tensor:
    """The int64 (1, n) `position_ids` buffer real files carry."""
    return torch.arange(n, dtype=torch.int64)[None]


def carried_buffers(cfg: SDConfig) -> dict[str, torch.Tensor]:
    """Buffers real files of this family carry beside the weights: CLIP's `position_ids` (LDMBert has none);
    SDXL's CLIP-L `position_ids` and bigG's `logit_scale` (CLIP's image-text temperature, unused here)."""
    if isinstance(cfg.text, SDXLTextConfig):
        return {SDXL_POSITION_IDS: position_ids(cfg.text.clip.max_position_embeddings),
                SDXL_LOGIT_SCALE: torch.tensor(math.log(1 / 0.07))}
    return {POSITION_IDS: position_ids(cfg.text.max_position_embeddings)} if isinstance(cfg.text, CLIPTextConfig) else {}


# SDXL single files: both text towers under `conditioner.` (models/sdxl_text.py), and two keys not read
SDXL_TEXT_PREFIX = "conditioner."
SDXL_POSITION_IDS = SDXL_TEXT_PREFIX + "embedders.0.transformer.text_model.embeddings.position_ids"
SDXL_LOGIT_SCALE = SDXL_TEXT_PREFIX + "embedders.1.model.logit_scale"


OLD_CLIP_PREFIX = "cond_stage_model.transformer."
CLIP_NAMES = ("embeddings.", "encoder.", "final_layer_norm.")  # CLIP's modules, the level old files omit
# LDM-400M's text tower (CompVis BERTEmbedder) sits directly under OLD_CLIP_PREFIX; its language-model
# head is not needed for embeddings and is never read.
LDM_TEXT_KEY = OLD_CLIP_PREFIX + "token_emb.weight"
# SD 2.x's OpenCLIP tower sits under its own prefix; its files also carry CLIP's contrastive temperature
# and the pooled projection, which SD 2.x never uses (its context is a hidden state, not the pooled vector)
SD2_TEXT_PREFIX = "cond_stage_model.model."
UNUSED_PREFIXES = (OLD_CLIP_PREFIX + "to_logits.", SD2_TEXT_PREFIX + "logit_scale", SD2_TEXT_PREFIX + "text_projection")

# DDPM schedule buffers Lightning saves beside the model; SD recomputes them from the config.
SCHEDULE_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights"})

# 1x1 conv <-> linear shims a loader accepts in either shape (spec §2): UNet proj_in/proj_out and
# the VAE attention q/k/v/proj_out weights ([C,C] in diffusers-converted files, [C,C,1,1] in CompVis).
SHIM_RE = re.compile(r"^(model\.diffusion_model\..*\.proj_(in|out)\.weight"
                     r"|first_stage_model\.(encoder|decoder)\..*attn.*\.(q|k|v|proj_out)\.weight)$")

# what a checkpoint can be: the families this package knows (variant name -> its `SDConfig.family` code),
# those of them it loads today, then the kinds it names but does not load
FAMILIES = {"SD v1": "sd1", "SD 2.x": "sd2", "SDXL": "sdxl", "LDM-400M": "ldm"}
LOADABLE = {"SD v1": "sd1", "SD 2.x": "sd2", "LDM-400M": "ldm", "SDXL": "sdxl"}
CONFIG_HINTS = {"LDM-400M": " (configs/ldm-400m.yaml)", "SD 2.x": " (configs/sd-v2-base.yaml or sd-v2-v.yaml)"}
UNSUPPORTED = ("inpainting", "pix2pix", "depth", "upscaler", "SDXL refiner", "unCLIP", "SD3", "Flux", "Kandinsky",
               "DeepFloyd IF", "PixArt", "Stable Cascade", "DiT", "unknown")
# what a refused kind is, where its name alone does not say why it cannot run here
KIND_NOTES = {"SDXL refiner": ": the refiner is an img2img model (it refines SDXL base's latents at low noise) "
                              "with one text tower (OpenCLIP bigG) and aesthetic-score conditioning"}
# UNet input channels of the image-conditioned kinds (text-to-image: 4)
CHANNEL_KINDS = {9: "inpainting", 8: "pix2pix", 5: "depth", 7: "upscaler"}
SUPPORTED_KINDS = ("Stable Diffusion v1.x and 2.x text-to-image checkpoints (v1-1 ... v1-5, 2.0 / 2.1 base and v, "
                   "and fine-tunes of them), SDXL base 1.0 and LDM-400M are supported")


class CheckpointError(ValueError):
    """A checkpoint this package cannot read or does not support. The message says what was found
    and what is supported, in one paragraph."""


def canonical_key(key: str) -> str:
    """The key in today's layout: old files write CLIP without the `text_model.` level."""
    if key.startswith(OLD_CLIP_PREFIX) and key[len(OLD_CLIP_PREFIX):].startswith(CLIP_NAMES):
        return PREFIXES["text_encoder"] + key[len(OLD_CLIP_PREFIX):]
    return key


def part_of(key: str) -> str:
    """unet / vae / text_encoder / ema / schedule / position_ids / unused / other, for a canonical key.
    Every text tower lives under `cond_stage_model.transformer.` (CLIP one level deeper), but SD 2.x's
    OpenCLIP under `cond_stage_model.model.` and SDXL's two under `conditioner.`."""
    if key in (POSITION_IDS, SDXL_POSITION_IDS):
        return "position_ids"
    if key.startswith(UNUSED_PREFIXES) or key == SDXL_LOGIT_SCALE:
        return "unused"
    for part, prefix in [*PREFIXES.items(), ("text_encoder", OLD_CLIP_PREFIX), ("text_encoder", SD2_TEXT_PREFIX),
                         ("text_encoder", SDXL_TEXT_PREFIX)]:
        if key.startswith(prefix):
            return part
    if key.startswith("model_ema."):
        return "ema"
    if key in SCHEDULE_KEYS:
        return "schedule"
    return "other"


def split_parts(shapes: dict) -> dict[str, dict]:
    """Group a canonical `{key: value}` mapping by `part_of`."""
    parts: dict[str, dict] = {p: {} for p in ("unet", "vae", "text_encoder", "ema", "schedule", "position_ids",
                                               "unused", "other")}
    for k, v in shapes.items():
        parts[part_of(k)][k] = v
    return parts


# ---------------------------------------------------------------------------------------------- variants
# (variant, evidence) when a key starting with the prefix is present, checked in this order: models
# that are not UNet text-to-image at all first
KEY_MARKS = (
    (("model.diffusion_model.joint_blocks.",), "SD3", "MMDiT keys `model.diffusion_model.joint_blocks.*`"),
    (("double_blocks.", "model.diffusion_model.double_blocks."), "Flux", "Flux keys `double_blocks.*`"),
    (("embedder.model.visual.", "noise_augmentor."), "unCLIP",
     "image-embedding keys `embedder.*` / `noise_augmentor.*`"),
    (("depth_model.",), "depth", "depth-estimator keys `depth_model.*`"),
    (("low_scale_model.",), "upscaler", "low-resolution noise schedule `low_scale_model.*`"),
)


def detect_variant(shapes: dict[str, tuple]) -> tuple[str, str]:
    """(variant, evidence) from canonical keys and shapes: a key of FAMILIES or of UNSUPPORTED."""
    for marks, variant, evidence in KEY_MARKS:
        if any(k.startswith(marks) for k in shapes):
            return variant, f"found {evidence}"
    unet = PREFIXES["unet"]
    if any(k.startswith("conditioner.embedders") for k in shapes) or unet + "label_emb.0.0.weight" in shapes:
        if not any(k.startswith("conditioner.embedders.1.") for k in shapes) and \
                any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
            return "SDXL refiner", "one OpenCLIP bigG embedder `conditioner.embedders.0.model.*`, no CLIP-L"
        return "SDXL", "found `conditioner.embedders.*` / `label_emb` keys"
    first = shapes.get(unet + "input_blocks.0.0.weight")
    if first is not None and len(first) == 4 and first[1] != 4:
        name = CHANNEL_KINDS.get(first[1], "unknown")
        return name, f"`{unet}input_blocks.0.0.weight` has {first[1]} input channels (text-to-image: 4)"
    return _text_family(shapes, unet)


def _text_family(shapes: dict[str, tuple], unet: str) -> tuple[str, str]:
    """SD v1, SD 2.x or LDM, told apart by the text encoder (CLIP-L, OpenCLIP-H, LDMBert) and the
    width of the cross-attention context."""
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "SD 2.x", "found OpenCLIP text-encoder keys `cond_stage_model.model.*`"
    te = "cond_stage_model.transformer."  # LDMBert's keys, canonical or not, sit under it
    if any(k.startswith(te) and (".token_emb." in k or ".attn_layers." in k) for k in shapes):
        return "LDM-400M", "found LDMBert text-encoder keys `cond_stage_model.transformer.token_emb` / `attn_layers`"
    for k, s in shapes.items():
        if k.startswith(unet) and k.endswith("attn2.to_k.weight") and len(s) == 2 and s[1] == 1024:
            return "SD 2.x", f"`{k}` is {list(s)}: 1024-wide cross-attention context (OpenCLIP ViT-H)"
    if not any(k.startswith(unet) for k in shapes):
        return "unknown", f"no UNet keys (`{unet}*`)"
    return "SD v1", "CompVis UNet with 4 input channels, CLIP text encoder, no SD 2.x / SDXL keys"


def refusal(variant: str, evidence: str, where: str, family: str | None = None) -> str | None:
    """The one place a family is accepted: None (it loads) for a LOADABLE variant whose config family
    matches (`family`: the config's, None for any), else why it does not; every other kind is named and
    refused. "unknown" passes: the missing component
    is reported by `check_components`, with a better message."""
    if variant == "unknown":
        return None
    if variant in LOADABLE:
        if family is None or LOADABLE[variant] == family:
            return None
        return (f"{where}: this is an {variant} checkpoint ({evidence}) but the config describes the {family!r} "
                f"family; pass a config of family {LOADABLE[variant]!r}"
                f"{CONFIG_HINTS.get(variant, '')} or none")
    known = (f"; {variant} is recognised, but loading it is not wired in yet" if variant in FAMILIES else
             f"; {variant} models are not supported{KIND_NOTES.get(variant, '')}")
    return f"{where}: this is a {variant} checkpoint ({evidence}); {SUPPORTED_KINDS}{known}"


def check_variant(shapes: dict[str, tuple], where: str, family: str | None = None) -> None:
    problem = refusal(*detect_variant(shapes), where, family)
    if problem:
        raise CheckpointError(problem)


def check_components(parts: dict[str, dict], where: str) -> None:
    found = [p for p in PREFIXES if parts[p]]
    missing = [p for p in PREFIXES if not parts[p]]
    if missing:
        names = ", ".join(f"{p} (`{PREFIXES[p]}*`)" for p in missing)
        raise CheckpointError(f"{where}: missing component(s) {names}; found {', '.join(found) or 'none'}. "
                              "A Stable Diffusion v1 checkpoint must hold the UNet, the VAE and the CLIP text "
                              "encoder (a single file with all three prefixes, or a diffusers folder with "
                              "unet/, vae/ and text_encoder/)")


# ---------------------------------------------------------------------------------------------- shapes
def model_shapes(cfg: SDConfig) -> dict[str, tuple]:
    """`{prefixed key: shape}` of the model a config builds, on the meta device (no memory)."""
    return dict(_model_shapes(cfg))


@functools.lru_cache(maxsize=8)
def _model_shapes(cfg: SDConfig) -> tuple:
    with torch.device("meta"):  # the parts alone: shapes need no tokenizer (LDM's reads a user's file)
        parts = {"unet": UNetModel(cfg.unet), "vae": AutoencoderKL(cfg.vae), "text_encoder": text_tower(cfg).module(cfg.text)}
    return tuple((prefix + k, tuple(v.shape))
                 for part, prefix in prefixes(cfg).items() for k, v in parts[part].state_dict().items())


def fits(key: str, have: tuple, want: tuple) -> bool:
    """Equal shapes, or one of the documented 1x1-conv/linear shims."""
    if tuple(have) == tuple(want):
        return True
    return bool(SHIM_RE.match(key)) and tuple(have)[:2] == tuple(want)[:2] \
        and all(d == 1 for d in tuple(have)[2:] + tuple(want)[2:])


def shape_problems(shapes: dict[str, tuple], expected: dict[str, tuple]) -> dict[str, list]:
    """Compare a file's model keys (canonical, ignorable keys removed) with the model's.

    Returns lists `missing` and `mismatched` of readable strings.
    """
    missing = sorted(k for k in expected if k not in shapes)
    mismatched = [f"{k}: file {list(shapes[k])}, model {list(expected[k])}"
                  for k in sorted(shapes) if k in expected and not fits(k, shapes[k], expected[k])]
    return {"missing": missing, "mismatched": mismatched}


def leftover_keys(shapes: dict[str, tuple], cfg: SDConfig) -> list[str]:
    """Keys the model does not have, beyond those always dropped (EMA, schedule buffers, position_ids):
    under a model prefix (`first_stage_model.loss.*`) or outside every known group (`embedding_manager.*`,
    `lora_*`). Strict loading refuses them; non-strict loading lists and ignores them."""
    expected = model_shapes(cfg)
    return sorted([k for k in model_keys(shapes) if k not in expected] +
                  [k for k in shapes if part_of(k) == "other"])


def describe_problems(problems: dict[str, list], n: int = 3) -> str:
    out = []
    for name, items in problems.items():
        if items:
            more = f" (and {len(items) - n} more)" if len(items) > n else ""
            out.append(f"{len(items)} {name}: " + "; ".join(items[:n]) + more)
    return " | ".join(out)


def model_keys(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """Keep only keys the model consumes or could consume: the three prefixes minus position_ids."""
    return {k: v for k, v in shapes.items() if part_of(k) in PREFIXES}


def validate_shapes(shapes: dict[str, tuple], cfg: SDConfig, where: str = "checkpoint",
                    strict: bool = True, config_source: str = "the given config") -> None:
    """Raise CheckpointError unless the canonical `{key: shape}` mapping loads into `StableDiffusion(cfg)`.

    `strict` also refuses keys under the model prefixes that the model does not have, and keys
    outside every known group (not EMA, not a schedule buffer).
    """
    parts = split_parts(shapes)
    check_variant(shapes, where, cfg.family)
    check_components(parts, where)
    problems = shape_problems(model_keys(shapes), model_shapes(cfg))
    problems["unexpected"] = leftover_keys(shapes, cfg) if strict else []
    if any(problems.values()):
        hint = ("pass config= (a CompVis v1-inference.yaml, or an SDConfig) describing this architecture"
                if config_source.startswith("SD v1") else f"check that {config_source} describes this file")
        extra = (" (or load with strict=False, `--non-strict` on the command line, to ignore and list the "
                 "keys the model does not have)") if problems["unexpected"] and not problems["missing"] \
            and not problems["mismatched"] else ""
        raise CheckpointError(f"{where}: tensors do not fit the model built from {config_source}; "
                              f"{hint}{extra}. Found {describe_problems(problems, n=3)}")


# ------------------------------------------------------------------------------------ plausible configs
# Bounds an architecture read from a file (ldm_config metadata, a diffusers config.json) must keep
# before anything is built from it: far above every real SD-family model, far below what would make
# building even the meta-device model take minutes or divide by zero.
BOUNDS = {"unet.model_channels": (1, 4096), "unet.num_res_blocks": (1, 16), "unet.num_heads": (1, 256),
          "unet.transformer_depth": (1, 64), "unet.context_dim": (1, 8192), "unet.in_channels": (1, 64),
          "unet.out_channels": (1, 64), "vae.ch": (1, 2048), "vae.num_res_blocks": (1, 16),
          "vae.z_channels": (1, 64), "vae.embed_dim": (1, 64), "vae.in_channels": (1, 16), "vae.out_ch": (1, 16),
          "text.vocab_size": (1, 1_000_000), "text.max_position_embeddings": (1, 4096), "text.width": (1, 8192),
          "text.layers": (1, 128), "text.heads": (1, 256), "text.intermediate_size": (1, 65536)}
MULT_BOUNDS = {"unet.channel_mult": (1, 16), "vae.ch_mult": (1, 16)}  # each entry; at most 8 levels


def check_plausible(cfg: SDConfig, where: str) -> None:
    """Refuse an architecture outside BOUNDS, or whose head count does not divide its widths."""
    def bad(name, value, why):
        return CheckpointError(f"{where}: its architecture has {name} = {str(value)[:80]}, {why}; the file's "
                               f"config is corrupt or not a Stable Diffusion model (pass config= to override it)")

    for name, (lo, hi) in BOUNDS.items():
        part, field = name.split(".")
        for label, value in part_numbers(cfg, part, field):
            if type(value) is not int or not lo <= value <= hi:
                raise bad(label, value, f"outside {lo}..{hi}")
    for name, (lo, hi) in MULT_BOUNDS.items():
        part, field = name.split(".")
        mults = getattr(getattr(cfg, part), field)
        if not 1 <= len(mults) <= 8 or not all(type(m) is int and lo <= m <= hi for m in mults):
            raise bad(name, mults, f"not 1 to 8 levels of {lo}..{hi}")
    u = cfg.unet
    divisor, name = (u.num_head_channels, "unet.num_head_channels") if u.num_head_channels > 0 else (u.num_heads, "unet.num_heads")
    for m in u.channel_mult:
        if (u.model_channels * m) % divisor:
            raise bad(name, divisor, f"which does not divide {u.model_channels * m}")
    for tower in text_configs(cfg):
        if tower.width % tower.heads:
            raise bad("text.heads", tower.heads, f"which does not divide the width {tower.width}")


# OpenCLIP's names for BOUNDS' text.* numbers (SDXL's second tower)
OPENCLIP_NUMBERS = {"max_position_embeddings": "context_length", "intermediate_size": "mlp_width"}


def text_configs(cfg: SDConfig) -> list:
    """The text tower configs a model has: SDXL's two, else its one."""
    return [cfg.text.clip, cfg.text.openclip] if isinstance(cfg.text, SDXLTextConfig) else [cfg.text]


def part_numbers(cfg: SDConfig, part: str, field: str) -> list[tuple[str, object]]:
    """(label, value) of `part.field` for the BOUNDS check: one per text tower for "text"."""
    if part == "unet" and field == "num_heads" and cfg.unet.num_head_channels > 0:  # SD 2 / SDXL: head width
        return [("unet.num_head_channels", cfg.unet.num_head_channels)]
    if part == "unet" and field == "transformer_depth" and isinstance(cfg.unet.transformer_depth, tuple):
        # one per level (SDXL: 0 at the first level, which has no attention): the deepest is bounded
        return [("unet.transformer_depth", max(cfg.unet.transformer_depth))]
    if part != "text":
        return [(f"{part}.{field}", getattr(getattr(cfg, part), field))]
    towers = text_configs(cfg)
    return [(f"text.{field}" if len(towers) == 1 else f"text.{i}.{field}",
             getattr(t, field) if hasattr(t, field) else getattr(t, OPENCLIP_NUMBERS[field])) for i, t in enumerate(towers)]
