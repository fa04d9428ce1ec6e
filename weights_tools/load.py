"""`load_checkpoint`: any supported checkpoint -> `models.StableDiffusion`, one copy of the weights.

The model is built on the meta device (no memory), every tensor is read, reshaped if it is one of
the documented shims, cast to the requested dtype/device, and assigned in place of the meta
parameter (`load_state_dict(assign=True)`), one part at a time.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from typing import NamedTuple

from models import FAMILIES, SDConfig, StableDiffusion, load_config, prefixes

from .family import resolve_prediction
from .layout import CheckpointError, family_code, leftover_keys, model_keys, model_shapes, validate_shapes
from .layouts import LAYOUTS, SD2_SOURCE, sd2_default  # noqa: F401  (SD 2.x's default, imported from here too)
from .mmdit import load_mmdit, mmdit_pipeline
from .mmdit_files import load_mmdit_file, single_file_family
from .registry import named_blend_level, resolve_checkpoint
from .sources import Source, open_source, read_tensor
from .unet_swap import open_unet
from .vae_swap import open_vae, with_part, with_vae


class IgnoredKeys(UserWarning):
    """Non-strict loading skipped keys the model does not have; the message lists them."""


class AssumedPrediction(UserWarning):
    """Nothing in the file said what its UNet predicts: the family's rule chose; the message says how to change it."""


class Resolved(NamedTuple):
    """The architecture a checkpoint is read with, where it came from, and `default`: the code of the
    family whose own config it is because neither the caller nor the file gave one (else None)."""
    config: SDConfig
    source: str
    default: str | None = None


def resolve_config(src: Source, config=None) -> Resolved:
    """The architecture: `config=` (SDConfig, path or name in configs/), else the file's own
    (ldm_config metadata / diffusers config.json), else its family's default (layouts.py) - which
    `validate_shapes` then checks key by key, since shapes alone cannot tell e.g. the number of heads."""
    if isinstance(config, SDConfig):
        return Resolved(config, "the given SDConfig")
    if isinstance(config, dict):
        return Resolved(SDConfig.from_ldm(config), "the given config dict")
    if config is not None:
        try:
            return Resolved(load_config(config), f"config {config}")
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise CheckpointError(f"config {config!r} is not a usable CompVis v1-inference.yaml: {e}") from e
    if src.config is not None:
        return Resolved(src.config, src.config_source)
    row = LAYOUTS[family_code(src.variant[0]) or "sd1"]  # an unknown kind is then named by the shape check
    return Resolved(family_default(src, row.family, None), row.default_source, row.family)


def family_default(src: Source, family: str, prediction: str | None) -> SDConfig:
    """The family's own config for a file that names none (its Layout's `default_config` for the prediction
    type), fitted to what the file's keys say where the family's Layout fits one (SDXL: a distilled UNet's depths)."""
    row = LAYOUTS[family]
    cfg = row.default_config(prediction)
    return row.fitted(src.shapes, cfg) if row.fitted is not None else cfg


def with_tokenizer(cfg: SDConfig, tokenizer, where: str) -> tuple[SDConfig, object]:
    """(config, the tokenizer the text tower reads), built and checked before any tensor is read.

    `tokenizer`: the path of the vocabulary file a family's config names but the file does not hold
    (LDM-400M: BERT's vocab.txt; a diffusers folder's tokenizer/ is found without it); the others'
    vocabularies come with the library (CLIP's BPE with open_clip)."""
    if tokenizer is not None:
        if not hasattr(cfg.text, "vocab"):
            raise CheckpointError(f"{where}: tokenizer= names a BERT vocabulary, which only LDM-400M reads (a text "
                                  f"tower whose vocabulary is not in the file); this {FAMILIES[cfg.family].name} "
                                  "model tokenises with CLIP's own vocabulary: leave it out")
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab=str(tokenizer)))
    try:
        return cfg, FAMILIES[cfg.family].tokenizer(cfg.text)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{where}: {e}") from e


def tokenizer_for(ckpt, tokenizer=None, config=None):
    """The tokenizer a checkpoint's text tower reads, from its config alone (headers and config files; no
    tensor is read), so words can be checked before loading with the tokenizer loading will give:
    CLIP's BPE for SD 1.x / 2.x / SDXL (with each family's padding), BERT's WordPiece for LDM-400M.
    `ckpt`: a path or a registry name; `tokenizer`, `config`: as `load_checkpoint`'s."""
    src = open_source(resolve_checkpoint(ckpt))
    if src.problem:
        raise CheckpointError(src.problem)
    return with_tokenizer(resolve_config(src, config).config, tokenizer, src.where)[1]


def open_checked(path, config=None, strict: bool = True, vae=None,
                 prediction_type=None, base=None) -> tuple[Source, SDConfig, str]:
    """Open (the VAE swapped in from `vae` if given; `path` a UNet alone in `base`'s place if `base` is given),
    resolve the config and the prediction type and validate every key and shape, all before reading a tensor.
    The variant is detected once, when opened."""
    src = open_source(resolve_checkpoint(base if base is not None else path), vae_given=vae is not None)
    if src.problem:
        raise CheckpointError(src.problem)
    if base is not None:
        src = with_part(src, open_unet(path, resolve_config(src, config).config), "unet")
    if vae is not None:
        src = with_vae(src, open_vae(vae))
    cfg, cfg_source, default = resolve_config(src, config)
    validate_shapes(src.shapes, cfg, src.where, strict, cfg_source, variant=src.variant, guessed=default is not None)
    if not strict:
        warn_ignored(src.where, leftover_keys(src.shapes, cfg))
    prediction, why = resolve_prediction(src, cfg, cfg_source, src.variant[0], prediction_type)
    if prediction_type is None and default is not None:
        warn_assumed(src, cfg, prediction, why)
    if default is not None:  # a family's own config may follow the prediction type (SD 2.x: 512 px base, 768 px v)
        cfg = family_default(src, default, prediction)
    return src, said_schedule(src, cfg).replace(prediction_type=prediction), cfg_source


def said_schedule(src: Source, cfg: SDConfig) -> SDConfig:
    """The config with what a file's marker keys say about its schedule (`ztsnr`: zero terminal SNR)."""
    return cfg.replace(schedule=dataclasses.replace(cfg.schedule, zero_snr=True)) if src.zero_snr else cfg


def warn_assumed(src: Source, cfg: SDConfig, prediction: str, why: str) -> None:
    """Warn when the prediction type is the family's rule's choice (SD 2.x: v, unless the 512-px base), nothing said."""
    row = LAYOUTS.get(family_code(src.variant[0]) or "")
    if row is None or row.predicts is None or src.prediction is not None or cfg.prediction_type == "v":
        return
    if (prediction, why) == row.predicts(src, cfg):
        warnings.warn(f"{src.where}: the file does not say what its UNet predicts; assumed {prediction}, the "
                      f"{row.models.get(prediction, prediction)} ({why})", AssumedPrediction, stacklevel=4)


def warn_ignored(where: str, ignored: list[str]) -> None:
    if ignored:
        more = f" ... ({len(ignored)} in all)" if len(ignored) > 20 else ""
        warnings.warn(f"{where}: ignored {len(ignored)} key(s) the model does not have (non-strict): "
                      f"{', '.join(ignored[:20])}{more}", IgnoredKeys, stacklevel=4)


def load_checkpoint(path, device="cpu", dtype=torch.float32, config=None, strict: bool = True,
                    vae=None, prediction_type=None, tokenizer=None, base=None, clip_l=None, clip_g=None,
                    t5=None) -> StableDiffusion:
    """Load a Stable Diffusion v1.x / 2.x, SDXL or LDM-400M checkpoint (.safetensors, .ckpt, diffusers folder) in
    eval mode.

    `path` may also be a name in `weights_tools.registry.CHECKPOINTS` ("miniature": the shipped one).
    `config`: an SDConfig, a CompVis v1-inference.yaml path, or a configs/ name; by default the
    file's own (ldm_config metadata, diffusers config.json) or SD v1's after a full shape check.
    `strict=False` ignores keys the model does not have (`embedding_manager.*`, `first_stage_model.loss.*`,
    `lora_*`) and lists them in an `IgnoredKeys` warning; missing or misshapen keys are always errors.
    `vae`: a standalone VAE (.safetensors / .ckpt with or without `first_stage_model.`, a diffusers
    vae/ folder) used in place of the checkpoint's own, which may then be absent.
    `prediction_type` ("epsilon" or "v") overrides what the file says (its metadata's
    `modelspec.prediction_type`, a config's `parameterization: "v"`, a folder's scheduler_config.json),
    which overrides SD 2.x's rule; the default is epsilon.
    EMA weights, DDPM schedule buffers and `position_ids` are never read. The parameters come back with
    requires_grad=False (call `requires_grad_()` to train); `sd.blend_level` is a named checkpoint's
    recommended LocalBlend level (the level `edit()` reads when LocalBlend gives none).
    `tokenizer`: LDM-400M's BERT vocab.txt (needed for its single file; a diffusers folder has its own).
    An MM-DiT diffusers folder (SD3 / SD3.5: model_index.json names StableDiffusion3Pipeline) loads as its
    models.mmdit_model class through weights_tools.mmdit (the options above are the UNet families').
    `base`: `path` is a UNet alone (SDXL-Lightning's, Hyper-SD's `*_unet.safetensors`, in diffusers' names or
    the single-file layout, or a diffusers unet/ folder); the VAE, the text towers and the config come from
    `base` (a single file or a diffusers folder of the model it was trained from).
    An SD3 / SD3.5 single file or BFL's Flux transformer file loads through weights_tools.mmdit_files: `vae`,
    `clip_l`, `clip_g`, `t5` give the parts it lacks (`ae.safetensors`, `clip_l.safetensors`, ...), `base` a
    diffusers folder of the same model for the rest and the tokenizers.
    """
    texts, unet_only = {"clip_l": clip_l, "clip_g": clip_g, "t5": t5}, dict(
        config=config, strict=strict, prediction_type=prediction_type, tokenizer=tokenizer)
    mmdit = load_mmdit_any(resolve_checkpoint(path), device, dtype, vae, base, texts, unet_only)
    if mmdit is not None:
        return mmdit
    src, cfg, _ = open_checked(path, config, strict, vae, prediction_type, base)
    cfg, tok = with_tokenizer(cfg, tokenizer, src.where)  # before any tensor is read
    with torch.device("meta"):
        model = StableDiffusion(cfg, tokenizer=tok)
    for part, prefix in prefixes(cfg).items():
        module = getattr(model, part)
        wanted = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        state = {k: read_tensor(src, prefix + k, shape, device, dtype) for k, shape in wanted.items()}
        module.load_state_dict(state, strict=True, assign=True)
        del state
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:  # a buffer the checkpoint does not hold would stay unmaterialised
        raise CheckpointError(f"{src.where}: internal error, still on the meta device after loading: {on_meta[:5]}")
    model.blend_level = named_blend_level(path)  # a named checkpoint's recommended LocalBlend level
    return model.requires_grad_(False).eval()  # weights to sample with: sd.decode(...) runs outside no_grad too


def load_mmdit_any(path, device, dtype, vae, base, texts: dict, unet_only: dict):
    """An MM-DiT folder or single file as its model (the UNet families' options refused), None for anything else
    (which the text encoders' options are refused for)."""
    if mmdit_pipeline(path) is not None:
        return load_mmdit_checked(path, device, dtype, vae=vae, base=base, **unet_only, **texts)
    if single_file_family(path) is not None:
        refuse_options(path, "an SD3 / Flux single file", **unet_only)
        return load_mmdit_file(path, device, dtype, base=base, vae=vae, **texts)
    refuse_options(path, "a UNet family's checkpoint (the text encoders' files are SD3's and Flux's)", **texts)
    return None


def load_mmdit_checked(path, device, dtype, **given):
    """An MM-DiT folder, refusing the options that only the UNet families take (with their values given)."""
    refuse_options(path, "an MM-DiT folder (its transformer, VAE, schedule and text come from the folder itself)",
                   **given)
    return load_mmdit(path, device, dtype)


def refuse_options(path, what: str, **given) -> None:
    """Refuse the options given (not None; strict only when False) that `what` does not take."""
    said = [k for k, v in given.items() if v is not None and not (k == "strict" and v)]
    if said:
        raise CheckpointError(f"{path}: {', '.join(said)} cannot be given for {what}; leave them out")


def read_state_dict(path, config=None, strict: bool = True, vae=None,
                    prediction_type=None) -> tuple[dict[str, torch.Tensor], SDConfig, Source]:
    """The model's tensors under their single-file names (canonical, shims reshaped), no model built.

    Used by conversion; tensors keep their stored dtype.
    """
    src, cfg, _ = open_checked(path, config, strict, vae, prediction_type)
    expected = model_shapes(cfg)
    keys = sorted(k for k in model_keys(src.shapes) if k in expected)
    return {k: read_tensor(src, k, expected[k], "cpu", None) for k in keys}, cfg, src
