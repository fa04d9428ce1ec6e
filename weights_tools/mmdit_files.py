"""SD3 / SD3.5 and Flux from the single files users hold, one copy of the weights.

- SD3 / SD3.5 (`sd3_medium_incl_clips_t5xxlfp16.safetensors`, `sd3_medium.safetensors`, `sd3.5_medium.safetensors`,
  `sd3.5_large.safetensors`): `model.diffusion_model.*` (the official MM-DiT, weights_tools.sd3_keys),
  `first_stage_model.*` (the VAE in LDM names) and, in some, `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`
  (transformers' names).
- Flux: BFL's `flux1-dev.safetensors` / `flux1-schnell.safetensors` (the transformer alone, weights_tools.flux_keys)
  with the files kept beside it: `ae.safetensors` (the VAE, LDM names), `clip_l.safetensors`, `t5xxl_fp16.safetensors`
  (transformers' names, as ComfyUI keeps them).
A part the file lacks comes from its own file (`vae=`, `clip_l=`, `clip_g=`, `t5=`) or from a diffusers folder of
the same model (`base=`), which also gives the tokenizers (no single file carries them), the flow schedule and the
VAE's scale and shift (else the released models' values). Every part is built on the meta device and checked key
by key and shape by shape before any tensor is read; each tensor is then read, split where the file fuses it,
cast and assigned in place.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from models.flow import FlowConfig
from models.flux import FluxTransformer
from models.flux_model import T5_LENGTH, Flux
from models.mmdit import SD3Transformer
from models.mmdit_model import SD3, MMDiTModel
from models.mmdit_text import SD3_T5_LENGTH, FluxText, SD3Text
from models.tokenizer_json import read_tokenizer
from models.vae import AutoencoderKL

from .flux_keys import COMFY_PREFIX, bfl_config, bfl_plan, is_bfl_flux
from .layout import CheckpointError
from .mmdit import PIPELINES, Part, check_fit, load_flow, load_part, mmdit_pipeline, vae_factors
from .mmdit_parts import OPTIONAL_TEXT, ldm_vae_config, mapped, prefixed, tower, with_identity_projection
from .mmdit_text import load_part as load_text_part, text_names
from .sd3_keys import PREFIX, is_sd3_file, sd3_file_config, sd3_plan
from .sources import Source, open_file, open_weights, read_json, sniff, weights_file
from .vae_swap import VAE, open_vae


class Family(NamedTuple):
    """What a single file's family needs beside its transformer: its text towers (kind -> the diffusers folder's
    part), tokenizers (name -> folder), the released VAE scale and shift and flow schedules, its pipeline."""
    name: str
    pipeline: str
    towers: dict
    tokenizers: dict
    factors: tuple
    flat_files: dict  # kind -> the file users keep it in, and the flag that gives it


SD3_FAMILY = Family("SD3", "StableDiffusion3Pipeline",
                    {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"},
                    {"clip": "tokenizer", "clip_g": "tokenizer_2", "t5": "tokenizer_3"}, (1.5305, 0.0609),
                    {"clip_l": "clip_l.safetensors (--clip-l)", "clip_g": "clip_g.safetensors (--clip-g)",
                     "t5": "t5xxl_fp16.safetensors (--t5)"})
FLUX_FAMILY = Family("Flux", "FluxPipeline", {"clip_l": "text_encoder", "t5": "text_encoder_2"},
                     {"clip": "tokenizer", "t5": "tokenizer_2"}, (0.3611, 0.1159),
                     {"clip_l": "clip_l.safetensors (--clip-l)", "t5": "t5xxl_fp16.safetensors (--t5)"})
SD3_TEXT = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
            "t5": "text_encoders.t5xxl.transformer."}
# the released schedulers' settings (scheduler/scheduler_config.json of each model's diffusers folder)
RELEASED_FLOW = {"SD3": FlowConfig(shift=3.0), "FLUX.1-dev": FlowConfig(shift=3.0, use_dynamic_shifting=True),
                 "FLUX.1-schnell": FlowConfig(shift=1.0)}


class Prepared(NamedTuple):
    """A single file's model, checked and on the meta device: parts, text towers (kind -> (module, Source)),
    tokenizers (or None), flow schedule, VAE scale and shift."""
    family: Family
    transformer: Part
    vae: Part
    towers: dict
    tokenizers: dict | None
    flow: FlowConfig
    factors: tuple


def open_single(path) -> Source:
    path = Path(path)
    return open_file(path, path.stat().st_size, sniff(path))


def family_of(keys) -> Family | None:
    return SD3_FAMILY if is_sd3_file(keys) else FLUX_FAMILY if is_bfl_flux(keys) else None


def single_file_family(path) -> Family | None:
    """SD3_FAMILY or FLUX_FAMILY for an MM-DiT single file (headers read), None for anything else."""
    return family_of(open_single(path).entries) if Path(path).is_file() else None


def transformer_part(family: Family, src: Source, base: Path | None) -> Part:
    """The file's transformer on the meta device, its tensors under our names."""
    if family is SD3_FAMILY:
        cfg = sd3_file_config(src.shapes, src.metadata, src.where)
        with torch.device("meta"):
            model = SD3Transformer(cfg)
        return Part(model, mapped(src, sd3_plan(src.shapes), f"{src.where} ({PREFIX}*)"), src.where)
    own = {k: s for k, s in src.shapes.items() if k.startswith(COMFY_PREFIX)} or src.shapes
    axes = read_json(base / "transformer" / "config.json").get("axes_dims_rope") if base_has(base, "transformer") else None
    with torch.device("meta"):
        model = FluxTransformer(bfl_config(own, axes))
    return Part(model, mapped(src, bfl_plan(own), src.where), src.where)


def base_has(base: Path | None, part: str) -> bool:
    return base is not None and (base / part / "config.json").is_file()


def vae_part(src: Source, vae, base: Path | None, family: Family) -> Part:
    """The VAE: `vae` (a file in LDM names, `ae.safetensors`, or a diffusers vae/ folder) if given, else the
    file's own `first_stage_model.*`, else the base folder's vae/."""
    if vae is not None:
        vae_src = open_vae(vae)
    elif any(k.startswith(VAE) for k in src.entries):
        vae_src = src
    elif base_has(base, "vae") and has_weights(base / "vae"):
        vae_src = open_vae(base)
    else:
        raise CheckpointError(f"{src.where}: holds no VAE (no `{VAE}*`); give one: " + (
            "--vae ae.safetensors (BFL's Flux VAE)" if family is FLUX_FAMILY else "--vae FILE (SD3's VAE)")
            + f", or --base a diffusers {family.name} folder holding vae/")
    vae_src = prefixed(vae_src, VAE, f"{vae_src.where} (VAE)")
    with torch.device("meta"):
        model = AutoencoderKL(ldm_vae_config(vae_src.shapes, vae_src.where))
    return Part(model, vae_src, vae_src.where)


def text_source(kind: str, given, src: Source, base: Path | None, family: Family) -> Source | None:
    """A text tower's tensors (transformers' names): its own file if given, else the single file's
    `text_encoders.*`, else the base folder's part; None where none holds it."""
    if given is not None:
        own = open_single(given)
        own = prefixed(own, SD3_TEXT[kind]) if any(k.startswith(SD3_TEXT[kind]) for k in own.entries) else own
    elif kind in SD3_TEXT and any(k.startswith(SD3_TEXT[kind]) for k in src.entries):
        own = prefixed(src, SD3_TEXT[kind], f"{src.where} ({SD3_TEXT[kind]}*)")
    elif base_has(base, family.towers[kind]) and has_weights(base / family.towers[kind]):
        own = open_weights(base / family.towers[kind])
    else:
        return None
    if family is FLUX_FAMILY:
        return prefixed(own, "", drop=OPTIONAL_TEXT)
    own = prefixed(own, "", drop=OPTIONAL_TEXT[1:])
    return with_identity_projection(own) if kind == "clip_l" else own


def has_weights(folder: Path) -> bool:
    try:
        return weights_file(folder).exists()
    except CheckpointError:
        return False


def text_towers(family: Family, src: Source, given: dict, base: Path | None) -> dict:
    """kind -> (meta module, Source), each checked key by key; the missing ones refused with the files that
    hold them."""
    sources = {k: text_source(k, given.get(k), src, base, family) for k in family.towers}
    missing = [k for k, s in sources.items() if s is None]
    if missing:
        raise CheckpointError(f"{src.where}: holds no {', '.join(missing)} text encoder; give "
                              f"{', '.join(family.flat_files[k] for k in missing)}, or --base a diffusers "
                              f"{family.name} folder to take them from (or load with text=False and pass TextCond)")
    out = {}
    for kind, s in sources.items():
        config = base / family.towers[kind] if base_has(base, family.towers[kind]) else None
        module = tower(kind, s, config, projection=family is SD3_FAMILY)
        try:
            text_names(module, s)
        except CheckpointError as e:
            raise CheckpointError(f"the {kind} text encoder: {e}") from e
        out[kind] = (module, s)
    return out


def tokenizers(family: Family, base: Path | None, where: str) -> dict:
    """The tokenizers from the base folder: no single file carries them."""
    folders = {n: base / d for n, d in family.tokenizers.items()} if base is not None else {}
    if base is None or not all((f / "tokenizer.json").is_file() for f in folders.values()):
        raise CheckpointError(f"{where}: a single file carries no tokenizers; give --base a diffusers "
                              f"{family.name} folder holding {', '.join(d + '/' for d in family.tokenizers.values())} "
                              "(tokenizer.json in each), or load with text=False and pass the prompts' TextCond")
    try:
        return {n: read_tokenizer(f) for n, f in folders.items()}
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{base}: {e}") from e


def schedule(family: Family, variant: str, base: Path | None) -> tuple[FlowConfig, tuple]:
    """(flow schedule, (scaling, shift)): the base folder's where it has them, else the released model's."""
    flow = load_flow(base) if base is not None and (base / "scheduler" / "scheduler_config.json").is_file() \
        else RELEASED_FLOW[variant]
    factors = vae_factors(base) if base_has(base, "vae") else family.factors
    return flow, factors


def checked_base(base, family: Family) -> Path | None:
    if base is None:
        return None
    base = Path(base)
    if mmdit_pipeline(base) is not PIPELINES[family.pipeline]:
        raise CheckpointError(f"{base}: --base must be a diffusers {family.name} folder (model_index.json naming "
                              f"{family.pipeline}) to take the missing parts and tokenizers from")
    return base


def prepare(path, text: bool = True, base=None, vae=None, **given) -> Prepared:
    """Everything loading checks, no tensor read: the parts on the meta device and their tensors' headers."""
    src = open_single(path)
    family = family_of(src.entries)
    if family is None:
        raise CheckpointError(f"{path}: not an SD3 / SD3.5 single file (`{PREFIX}joint_blocks.*`) nor BFL's Flux "
                              "transformer (`double_blocks.*`, `img_in.weight`)")
    foreign = sorted(set(given) - set(family.towers))
    if foreign:
        raise CheckpointError(f"{path}: {family.name} reads no {', '.join(foreign)} text encoder (its towers: "
                              f"{', '.join(family.towers)}); leave {', '.join('--' + k.replace('_', '-') for k in foreign)} out")
    base = checked_base(base, family)
    transformer, vae_p = transformer_part(family, src, base), vae_part(src, vae, base, family)
    for part in (transformer, vae_p):
        check_fit(*part)
    towers = text_towers(family, src, given, base) if text else {}
    variant = "SD3" if family is SD3_FAMILY else ("FLUX.1-dev" if transformer.module.cfg.guidance_embeds
                                                  else "FLUX.1-schnell")
    toks = tokenizers(family, base, src.where) if text else None
    return Prepared(family, transformer, vae_p, towers, toks, *schedule(family, variant, base))


def load_mmdit_file(path, device="cpu", dtype=torch.float32, text: bool = True, base=None, vae=None,
                    clip_l=None, clip_g=None, t5=None) -> MMDiTModel:
    """An SD3 / SD3.5 single file or BFL's Flux transformer file as its model (models.mmdit_model.SD3,
    models.flux_model.Flux), in eval mode. `vae`, `clip_l`, `clip_g`, `t5`: the parts' own files; `base`: a
    diffusers folder of the same family for what is still missing, the tokenizers, the schedule and the VAE's
    scale and shift. text=False leaves the text encoders out (prompts are then given as TextCond)."""
    given = {k: v for k, v in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5)) if v is not None}
    p = prepare(path, text, base, vae, **given)
    transformer, vae_model = (load_part(*part[:2], device, dtype, part.where, part.prefix)
                              for part in (p.transformer, p.vae))
    for module, src in p.towers.values():
        load_text_part(module, src, dtype, device)
    if p.family is SD3_FAMILY:
        encoders = SD3Text(*(p.towers[k][0] for k in ("clip_l", "clip_g", "t5")), p.tokenizers) if text else None
        model = SD3(transformer, vae_model, p.flow, *p.factors, encoders, SD3_T5_LENGTH)
    else:
        encoders = FluxText(p.towers["clip_l"][0], p.towers["t5"][0], p.tokenizers) if text else None
        model = Flux(transformer, vae_model, p.flow, *p.factors, encoders, T5_LENGTH)
    return model.requires_grad_(False).eval()
