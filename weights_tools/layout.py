"""The single-file (CompVis / LDM) key layout: which key belongs to which part, what a loader ignores,
which variant a file is, and whether its shapes fit a config. The per-family facts come from the
file-side table `LAYOUTS` (rows of `Layout`, filled by weights_tools/layouts.py).

Everything here works on a `{key: shape}` mapping, never on tensor data, so `inspect_checkpoint`
and `load_checkpoint` share it and a full-size file can be checked from its header alone.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from models import FAMILIES, PREFIXES, AutoencoderKL, SDConfig, UNetConfig, UNetModel, prefixes


@dataclass(frozen=True)
class FolderLayout:
    """A family's diffusers folder: its parts, the key map into the single-file layout and the config reader."""
    parts: dict                 # model part -> folder ("text_encoder": "bert"); extra towers beside it too
    config: Callable            # (folder Path, {part: config.json dict}, scheduler dict or None, model_index dict) -> SDConfig
    key: Callable               # (part, key in its folder, that folder's config.json, where) -> single-file key
    # folder -> single-file prefix of text towers stored as transformers' CLIPTextModel(WithProjection) where
    # the single file keeps OpenCLIP's layout (openclip_keys.hf_plan: q/k/v fused when the loader asks)
    openclip_towers: dict = field(default_factory=dict)
    openclip_readout: tuple | None = None  # (output_layer, final_ln) of those towers as the folder stores them


@dataclass(frozen=True)
class Layout:
    """A family's checkpoint files, the file side; models.FAMILIES holds the model side under the same code.
    One row per family in LAYOUTS (weights_tools/layouts.py fills it)."""
    family: str                 # the models.FAMILIES code
    recognise: Callable         # canonical {key: shape} of a single file -> evidence that it is this family, or None
    default_config: Callable    # prediction type (None: not known yet) -> the config of a file that names none
    default_source: str         # how messages name that default config
    carried: Callable           # SDConfig -> {key: tensor}: buffers real files carry beside the weights
    folder: FolderLayout | None = None  # its diffusers folder, if it has one
    unused: tuple = ()          # single-file keys (or prefixes) its files hold and the model never reads
    position_ids: tuple = ()    # single-file keys of text `position_ids` buffers (never read)
    predicts: Callable | None = None  # (Source, SDConfig) -> (prediction, why): the rule when nothing says
    models: dict = field(default_factory=dict)  # prediction type -> model name in reports (SD 2.x base / v)
    config_hint: str = ""       # which configs/ files describe it, for messages
    # (canonical {key: shape}, default config) -> that config fitted to what the file's keys say, for a file that
    # names none (SDXL: a distilled UNet's transformer depths, SSD-1B and Segmind-Vega); None: the default as is
    fitted: Callable | None = None


# code -> Layout, in recognition order (a single file is the first family whose `recognise` answers)
LAYOUTS: dict[str, Layout] = {}


def family_name(code: str) -> str:
    """The variant name of a family code ("sd2" -> "SD 2.x"): the name detect_variant and reports use."""
    return FAMILIES[code].name


def family_code(variant: str) -> str | None:
    """The family code of a variant name, None for a kind this package does not load."""
    return next((code for code in LAYOUTS if FAMILIES[code].name == variant), None)


def position_ids(n: int) -> torch.Tensor:
    """The int64 (1, n) `position_ids` buffer real files carry."""
    return torch.arange(n, dtype=torch.int64)[None]


def carried_buffers(cfg: SDConfig) -> dict[str, torch.Tensor]:
    """Buffers real files of this family carry beside the weights (its Layout's `carried`)."""
    return LAYOUTS[cfg.family].carried(cfg)


OLD_CLIP_PREFIX = "cond_stage_model.transformer."
CLIP_NAMES = ("embeddings.", "encoder.", "final_layer_norm.")  # CLIP's modules, the level old files omit

# DDPM schedule buffers Lightning saves beside the model (CompVis), and the discrete denoiser's noise levels
# SGM saves (`denoiser.sigmas`; SDXL files from SGM and A1111); SD recomputes them from the config.
SCHEDULE_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "denoiser.sigmas", "denoiser.log_sigmas"})

# 1x1 conv <-> linear shims a loader accepts in either shape (spec §2): UNet proj_in/proj_out and
# the VAE attention q/k/v/proj_out weights ([C,C] in diffusers-converted files, [C,C,1,1] in CompVis).
SHIM_RE = re.compile(r"^(model\.diffusion_model\..*\.proj_(in|out)\.weight"
                     r"|first_stage_model\.(encoder|decoder)\..*attn.*\.(q|k|v|proj_out)\.weight)$")

# a UNet saved alone in diffusers' layout (SDXL-Lightning's and Hyper-SD's `*_unet.safetensors`): variant ->
# (the key that tells it, family), checked in order; such a file is refused with what else it needs
UNET_ALONE = {"SDXL UNet alone": ("add_embedding.linear_1.weight", "sdxl"), "UNet alone": ("conv_in.weight", None)}
DISTILLED_SDXL = "distilled SDXL"  # SDXL with transformer blocks removed (SSD-1B, Segmind-Vega): loads as SDXL
UNSUPPORTED = ("inpainting", "pix2pix", "SDXL inpainting", "SDXL pix2pix", *UNET_ALONE, "depth",
               "upscaler", "SDXL refiner", "unCLIP", "SD3", "Flux", "Kandinsky",
               "DeepFloyd IF", "PixArt", "Stable Cascade", "DiT", "Playground v2.5",
               "CosXL-style EDM v-prediction", "unknown")
# what a refused kind is, where its name alone does not say why it cannot run here
KIND_NOTES = {"SDXL inpainting": ": its UNet reads 9 channels (the noisy latents, the mask and the masked picture's "
                                 "latents); SDXL base text-to-image files read 4",
              "SDXL pix2pix": ": an instruct-pix2pix model, its UNet reads 8 channels (the noisy latents and the "
                              "input picture's latents); SDXL base text-to-image files read 4",
              "SDXL refiner": ": the refiner is an img2img model (it refines SDXL base's latents at low noise) "
                              "with one text tower (OpenCLIP bigG) and aesthetic-score conditioning",
              "Playground v2.5": ": it has SDXL's layout but was trained on an EDM noise schedule (continuous sigmas, "
                                 "EDMDPMSolverMultistepScheduler / EDMEulerScheduler) and per-channel latent statistics "
                                 "(the VAE's latents_mean / latents_std), neither of which this package's samplers "
                                 "model; loaded as SDXL it would give wrong pictures: use diffusers' "
                                 "StableDiffusionXLPipeline with its own scheduler",
              "Flux": " as a single file: BFL's `flux1-*.safetensors` holds the transformer alone (no VAE, no "
                      "text encoders); load it with its parts (--vae ae.safetensors, --clip-l clip_l.safetensors, "
                      "--t5 t5xxl_fp16.safetensors, --base a FLUX.1 diffusers folder for the tokenizers), or load "
                      "the FLUX.1 diffusers folder (model_index.json names FluxPipeline)",
              "CosXL-style EDM v-prediction": ": its sampling follows a continuous EDM sigma range "
                                              "(edm_vpred.sigma_min / sigma_max), which this package's DDIM / PLMS "
                                              "samplers do not model"}
# UNet input channels of the image-conditioned kinds (text-to-image: 4)
CHANNEL_KINDS = {9: "inpainting", 8: "pix2pix", 5: "depth", 7: "upscaler"}
SUPPORTED_KINDS = ("Stable Diffusion v1.x and 2.x text-to-image checkpoints (v1-1 ... v1-5, 2.0 / 2.1 base and v, "
                   "and fine-tunes of them), SDXL base 1.0 and LDM-400M are supported")


class CheckpointError(ValueError):
    """A checkpoint this package cannot read or does not support. The message says what was found
    and what is supported, in one paragraph."""


class BadConfig(CheckpointError):
    """A checkpoint's own config files cannot describe a model: unreadable, a value missing or of the wrong
    kind, or parts that disagree. Refused by loading and inspection alike, before any weight file is opened
    (where a readable config describes a model this package does not run, the folder is described instead)."""


def canonical_key(key: str) -> str:
    """The key in today's layout: old files write CLIP without the `text_model.` level."""
    if key.startswith(OLD_CLIP_PREFIX) and key[len(OLD_CLIP_PREFIX):].startswith(CLIP_NAMES):
        return PREFIXES["text_encoder"] + key[len(OLD_CLIP_PREFIX):]
    return key


def part_of(key: str) -> str:
    """unet / vae / text_encoder / ema / schedule / position_ids / unused / other, for a canonical key.
    Each family's text tower has its own prefix (models.FAMILIES), its never-read keys their own list (LAYOUTS)."""
    if any(key in row.position_ids for row in LAYOUTS.values()):
        return "position_ids"
    if any(key.startswith(row.unused) for row in LAYOUTS.values() if row.unused):
        return "unused"
    for part, prefix in [*PREFIXES.items(), *(("text_encoder", FAMILIES[c].text_prefix) for c in LAYOUTS),
                         ("text_encoder", OLD_CLIP_PREFIX)]:
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
    (("edm_mean", "edm_std"), "Playground v2.5", "the latent statistics `edm_mean` / `edm_std`"),
    (("edm_vpred.",), "CosXL-style EDM v-prediction",
     "the EDM noise range `edm_vpred.sigma_max` / `edm_vpred.sigma_min`"),
)


def detect_variant(shapes: dict[str, tuple]) -> tuple[str, str]:
    """(variant, evidence) from canonical keys and shapes: a family's name (models.FAMILIES) or a kind of
    UNSUPPORTED. Kinds that are not text-to-image first, then each family's `recognise` in LAYOUTS' order."""
    for marks, variant, evidence in KEY_MARKS:
        if any(k.startswith(marks) for k in shapes):
            return variant, f"found {evidence}"
    if not any(k.startswith("conditioner.embedders.1.") for k in shapes) and \
            any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
        return "SDXL refiner", "one OpenCLIP bigG embedder `conditioner.embedders.0.model.*`, no CLIP-L"
    unet = PREFIXES["unet"]
    first = shapes.get(unet + "input_blocks.0.0.weight")
    if first is not None and len(first) == 4 and first[1] != 4:
        name = CHANNEL_KINDS.get(first[1], "unknown")
        sdxl = first[1] in (8, 9) and LAYOUTS["sdxl"].recognise(shapes)
        return (f"SDXL {name}" if sdxl else name), \
            f"`{unet}input_blocks.0.0.weight` has {first[1]} input channels (text-to-image: 4)" + (f"; {sdxl}" if sdxl else "")
    for code, row in LAYOUTS.items():
        evidence = row.recognise(shapes)
        if evidence:
            distilled = distilled_sdxl(shapes) if code == "sdxl" else None
            return family_name(code), f"{evidence}; {DISTILLED_SDXL}: {distilled}" if distilled else evidence
    if any(k.startswith("down_blocks.") for k in shapes):
        for variant, (key, _) in UNET_ALONE.items():
            if key in shapes:
                return variant, f"diffusers UNet keys (`{key}`, `down_blocks.*`) and nothing else"
    return "unknown", f"no UNet keys (`{unet}*`)"


def transformer_depths(shapes: dict) -> dict[tuple[str, int], int]:
    """Transformer blocks of each SpatialTransformer an SGM UNet's keys hold: (side, block) -> depth, side
    `input_blocks` / `output_blocks` / `middle_block` (block 0). A transformer with its norm and projections but
    no blocks has depth 0 (distilled SDXL keeps them where it removed a block's every layer)."""
    unet = re.escape(PREFIXES["unet"])
    depth: dict[tuple[str, int], int] = {}
    for k in shapes:
        if m := re.match(rf"{unet}(input_blocks\.\d+|output_blocks\.\d+|middle_block)\.1\."
                         rf"(?:transformer_blocks\.(\d+)\.|proj_in\.weight$)", k):
            side, _, n = m[1].partition(".")
            site = (side, int(n or 0))
            depth[site] = max(depth.get(site, 0), int(m[2]) + 1 if m[2] else 0)
    return depth


def depths_in_file(shapes: dict, u: UNetConfig) -> dict:
    """The UNetConfig depth fields an SGM UNet's keys say, on `u`'s levels and blocks per level (a config of the
    family that names the widths): a depth per level on the way down (the deepest of the level's blocks), one
    per output block where they differ from their level's, and the middle block's kind (no transformer: one
    resnet). Read from key names alone, so a distilled SDXL file that names no config (SSD-1B, Segmind-Vega)
    builds its own UNet; `validate_shapes` then checks every key and shape against it."""
    depth, per, levels = transformer_depths(shapes), u.num_res_blocks + 1, len(u.channel_mult)
    down = tuple(max((depth.get(("input_blocks", level * per + 1 + i), 0) for i in range(u.num_res_blocks)), default=0)
                 for level in range(levels))
    out = tuple(depth.get(("output_blocks", n), 0) for n in range(levels * per))
    same = all(out[n] == down[levels - 1 - n // per] for n in range(levels * per))
    return {"transformer_depth": down, "transformer_depth_output": None if same else out,
            "middle": "attention" if ("middle_block", 0) in depth else "resnet"}


def distilled_sdxl(shapes: dict) -> str | None:
    """Evidence that an SDXL-keyed single file is a distilled SDXL (SSD-1B, Segmind-Vega), or None: a middle
    block without a transformer, or output blocks whose transformer depths differ from their level's input blocks'."""
    depth, unet = transformer_depths(shapes), re.escape(PREFIXES["unet"])
    ops = sorted(int(m[1]) for k in shapes if (m := re.match(rf"{unet}input_blocks\.(\d+)\.0\.op\.weight$", k)))
    if not ops or not any(side == "input_blocks" for side, _ in depth):
        return None
    if ("middle_block", 0) not in depth:
        return "no transformer in the middle block (`middle_block.1.transformer_blocks.*`)"
    per, levels = ops[0], len(ops) + 1  # blocks per level (the resnets and a resampler slot), levels
    down = {(n - 1) // per: d for (side, n), d in depth.items() if side == "input_blocks"}
    for (side, n), d in sorted(depth.items()):
        if side == "output_blocks" and down.get(levels - 1 - n // per, 0) != d:
            return (f"`output_blocks.{n}` has {d} transformer blocks where its level's input blocks "
                    f"have {down.get(levels - 1 - n // per, 0)}")
    return None


# Segmind's distilled SDXL models by their UNet, on SDXL base's widths (model_channels 320, channel_mult 1 2 4,
# a 2048-wide context) and a middle block of one resnet (diffusers' configs of segmind/SSD-1B and
# segmind/Segmind-Vega: transformer_layers_per_block, reverse_transformer_layers_per_block, mid_block_type
# UNetMidBlock2D): name -> (depth per level on the way down, depth per output block)
DISTILLED_MODELS = {"SSD-1B": ((0, 2, 4), (4, 4, 10, 2, 1, 1, 0, 0, 0)),
                    "Segmind-Vega": ((0, 1, 2), (2, 2, 2, 1, 1, 1, 0, 0, 0))}


def distilled_name(u: UNetConfig) -> str | None:
    """What a distilled SDXL UNet is: SSD-1B or Segmind-Vega where its depths and widths are theirs, else
    "distilled SDXL" with its depths; None for a UNet that is not distilled (SDXL base's shape)."""
    if u.transformer_depth_output is None and u.middle == "attention":
        return None
    levels, per = len(u.channel_mult), u.num_res_blocks + 1
    down = tuple(u.depth(level) for level in range(levels))
    up = tuple(u.output_depth(n, levels - 1 - n // per) for n in range(levels * per))
    widths = (u.model_channels, tuple(u.channel_mult), u.context_dim, u.middle) == (320, (1, 2, 4), 2048, "resnet")
    name = next((n for n, d in DISTILLED_MODELS.items() if widths and d == (down, up)), None)
    return name or (f"{DISTILLED_SDXL} (transformer depths down {list(down)}, up {list(up)}, middle block "
                    f"{'of one resnet' if u.middle == 'resnet' else 'with a transformer'})")


def refusal(variant: str, evidence: str, where: str, family: str | None = None) -> str | None:
    """The one place a family is accepted: None (it loads) for a family's variant whose code matches the
    config's (`family`; None for any), else why it does not; every other kind is named and refused.
    "unknown" passes: the missing component is reported by `check_components`, with a better message."""
    if variant == "unknown":
        return None
    if variant in UNET_ALONE:
        return f"{where}: this is an {variant} file ({evidence}). " + \
            missing_fix(UNET_ALONE[variant][1] or "sd1", ["vae", "text_encoder"])
    code = family_code(variant)
    if code is not None:
        if family is None or code == family:
            return None
        return (f"{where}: this is an {variant} checkpoint ({evidence}) but the config describes the {family!r} "
                f"family; pass a config of family {code!r}{LAYOUTS[code].config_hint} or none")
    return (f"{where}: this is a {variant} checkpoint ({evidence}); {SUPPORTED_KINDS}; {variant} models are "
            f"not supported{KIND_NOTES.get(variant, '')}")


def check_variant(shapes: dict[str, tuple], where: str, family: str | None = None, variant: tuple | None = None) -> None:
    """Refuse what `refusal` refuses; `variant`: (variant, evidence) when already detected."""
    problem = refusal(*(variant or detect_variant(shapes)), where, family)
    if problem:
        raise CheckpointError(problem)


def check_components(parts: dict[str, dict], where: str, family: str = "sd1") -> None:
    """Every part of the family's model is in the file, or a message naming the family and what to pass."""
    found = [p for p in PREFIXES if parts[p]]
    missing = [p for p in PREFIXES if not parts[p]]
    if missing:
        names = ", ".join(f"{p} (`{prefixes_of(family)[p]}*`)" for p in missing)
        raise CheckpointError(f"{where}: missing component(s) {names}; found {', '.join(found) or 'none'}. "
                              f"{missing_fix(family, missing)}")


def prefixes_of(family: str) -> dict[str, str]:
    return PREFIXES | {"text_encoder": FAMILIES[family].text_prefix}


def missing_fix(family: str, missing: list[str]) -> str:
    """What a file lacking parts is, and what to pass: a VAE alone (--vae), or a UNet alone (a base model)."""
    name = FAMILIES[family].name
    whole = (f"An {name} checkpoint must hold the UNet, the VAE and the text encoder{'s' if family == 'sdxl' else ''} "
             "(a single file with all their prefixes, or a diffusers folder with unet/, vae/ and text_encoder/"
             f"{' and text_encoder_2/' if family == 'sdxl' else ''})")
    if missing == ["vae"]:
        return (f"{whole}; a file shipped without its VAE loads with one given: --vae PATH (vae= in the API), a "
                f"VAE .safetensors / .ckpt or a diffusers vae/ folder{' (SDXL: sdxl_vae or sdxl-vae-fp16-fix)' if family == 'sdxl' else ''}")
    if "unet" in missing or "text_encoder" not in missing:
        return whole
    return (f"{whole}; this is an {name} UNet alone (as SDXL-Lightning and Hyper-SD ship their UNets): it runs "
            f"inside its base model, whose VAE and text encoders this file lacks; load it with the base model's file "
            "or diffusers folder: --base BASE (base= in the API), e.g. `p2p generate --ckpt THIS_FILE --base "
            "sd_xl_base_1.0.safetensors ...`")


# ---------------------------------------------------------------------------------------------- shapes
def model_shapes(cfg: SDConfig) -> dict[str, tuple]:
    """`{prefixed key: shape}` of the model a config builds, on the meta device (no memory)."""
    return dict(_model_shapes(cfg))


@functools.lru_cache(maxsize=8)
def _model_shapes(cfg: SDConfig) -> tuple:
    with torch.device("meta"):  # the parts alone: shapes need no tokenizer (LDM's reads a user's file)
        parts = {"unet": UNetModel(cfg.unet), "vae": AutoencoderKL(cfg.vae),
                 "text_encoder": FAMILIES[cfg.family].text_encoder(cfg.text)}
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
                    strict: bool = True, config_source: str = "the given config", variant: tuple | None = None,
                    guessed: bool = False) -> None:
    """Raise CheckpointError unless the canonical `{key: shape}` mapping loads into `StableDiffusion(cfg)`.

    `strict` also refuses keys under the model prefixes that the model does not have, and keys
    outside every known group (not EMA, not a schedule buffer). `variant`: the file's (variant, evidence)
    when already detected; `guessed`: the config is a family's default, not one the caller or file gave.
    """
    parts = split_parts(shapes)
    check_variant(shapes, where, cfg.family, variant)
    check_components(parts, where, cfg.family)
    problems = shape_problems(model_keys(shapes), model_shapes(cfg))
    problems["unexpected"] = leftover_keys(shapes, cfg) if strict else []
    if any(problems.values()):
        hint = ("pass config= (a CompVis v1-inference.yaml, or an SDConfig) describing this architecture"
                if guessed else f"check that {config_source} describes this file")
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
# the VAE's latent scale and shift: released VAEs use 0.13025 (SDXL) to 1.5305 (SD3), shifts up to 0.16;
# outside these a run gives a black, saturated or inverted picture, or nan after the whole sampling loop
FACTOR_BOUNDS = {"scale_factor": (1e-3, 10.0), "shift_factor": (-10.0, 10.0)}


def plausible_number(value, lo: float, hi: float) -> bool:
    """A finite int or float (not a bool, not a string) from lo to hi."""
    return type(value) in (int, float) and math.isfinite(value) and lo <= value <= hi


def factor_problem(name: str, value) -> str | None:
    """Why a VAE factor (`FACTOR_BOUNDS`' name) cannot be, or None."""
    lo, hi = FACTOR_BOUNDS[name]
    return None if plausible_number(value, lo, hi) else f"{str(value)[:40]}, not a finite number from {lo:g} to {hi:g}"


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
    for name in FACTOR_BOUNDS:
        problem = factor_problem(name, getattr(cfg, name))
        if problem:
            raise bad(name, getattr(cfg, name), problem.partition(", ")[2])
    u = cfg.unet
    divisor, name = (u.num_head_channels, "unet.num_head_channels") if u.num_head_channels > 0 else (u.num_heads, "unet.num_heads")
    last = len(u.channel_mult) - 1  # the levels with attention (diffusers' test UNets: not the first) and the middle
    for level, m in enumerate(u.channel_mult):
        attends = level == last or (2 ** level in u.attention_resolutions and u.depth(level) > 0)
        if attends and (u.model_channels * m) % divisor:
            raise bad(name, divisor, f"which does not divide {u.model_channels * m}")
    for tower in text_configs(cfg):
        if tower.width % tower.heads:
            raise bad("text.heads", tower.heads, f"which does not divide the width {tower.width}")
    for label, value, (lo, hi) in extra_numbers(cfg):
        if type(value) is not int or not lo <= value <= hi:
            raise bad(label, value, f"outside {lo}..{hi}")
    depth = u.transformer_depth
    if isinstance(depth, tuple) and len(depth) != len(u.channel_mult):
        raise bad("unet.transformer_depth (diffusers: transformer_layers_per_block)", list(depth),
                  f"not one number per level ({len(u.channel_mult)} levels)")


def extra_numbers(cfg: SDConfig) -> list[tuple[str, object, tuple[int, int]]]:
    """(label, value, bounds) of the numbers BOUNDS does not hold: the latent side the model was trained at
    (its default picture size: 100000 would ask for 160 GB) and an LDMBert tower's head width."""
    out = [("image_size (the latent side; diffusers: unet/config.json sample_size)", cfg.image_size, (1, 512))]
    out += [("text.head_dim", t.head_dim, (1, 1024)) for t in text_configs(cfg) if hasattr(t, "head_dim")]
    return out


# OpenCLIP's names for BOUNDS' text.* numbers (SDXL's second tower)
OPENCLIP_NUMBERS = {"max_position_embeddings": "context_length", "intermediate_size": "mlp_width"}


def text_configs(cfg: SDConfig) -> list:
    """The text tower configs a model has (its family's `towers`: SDXL's two, else its one)."""
    return list(FAMILIES[cfg.family].towers(cfg.text))


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
