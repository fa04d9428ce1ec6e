"""Diffusers folders of MM-DiT models (SD3, SD3.5, Flux) -> models.mmdit_model / models.flux_model, beside the
UNet families' path.

An MM-DiT folder is told by its model_index.json pipeline class (`PIPELINES`, one row per pipeline: the
loader, the detection of its variant, the check p2p inspect runs). Its parts keep diffusers' names (the transformer's modules are
diffusers'), so a part loads by building it on the meta device from its config.json and assigning the
folder's tensors strictly; the VAE goes through the library's VAE key map (vae_swap.open_vae).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

from models.flow import FlowConfig
from models.flux import FluxConfig, FluxTransformer
from models.flux_model import T5_LENGTH, Flux
from models.mmdit import SD3Config, SD3Transformer
from models.mmdit_model import SD3, MMDiTModel
from models.vae import AutoencoderKL

from .diffusers_keys import vae_config
from .layout import CheckpointError, factor_problem
from .mmdit_text import load_flux_text, load_sd3_text, require
from .sources import Source, open_weights, read_json
from .vae_swap import VAE, open_vae


class Pipeline(NamedTuple):
    """One MM-DiT pipeline class: `load(folder, device, dtype, text: bool)`, `variant(folder) -> (name, evidence)`
    and `check(folder)`, which raises CheckpointError where loading would, reading no tensor."""
    load: Callable
    variant: Callable
    check: Callable


def model_index(path) -> dict | None:
    """A folder's model_index.json, or None for anything else."""
    index = Path(path) / "model_index.json"
    return read_json(index) if Path(path).is_dir() and index.is_file() else None


def mmdit_pipeline(path) -> Pipeline | None:
    """The PIPELINES row of a diffusers MM-DiT folder, or None (a single file, a UNet family's folder)."""
    index = model_index(path)
    return PIPELINES.get(index.get("_class_name")) if index is not None else None


def fits(have: tuple, want: tuple) -> bool:
    """A stored shape fits the module's: equal, or the documented shim of a 1x1 conv stored as a linear
    ([C, C] for [C, C, 1, 1]: diffusers' VAE attention)."""
    return tuple(have) == want or (len(want) == 4 and want[2:] == (1, 1) and tuple(have) == want[:2])


def check_fit(module: nn.Module, src: Source, where: str, prefix: str = "") -> None:
    """Refuse, from the headers alone, tensors (under `prefix`) that do not fit a module built from the config:
    each missing, extra or misshapen key is named."""
    wanted = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    have = {k[len(prefix):]: s for k, s in src.shapes.items() if k.startswith(prefix)}
    missing, extra = sorted(set(wanted) - set(have)), sorted(set(have) - set(wanted))
    wrong = [f"{k} {have[k]} (the config says {s})" for k, s in wanted.items() if k in have and not fits(have[k], s)]
    if missing or extra or wrong:
        raise CheckpointError(f"{where}: its tensors do not fit its config.json: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}, misshapen {wrong[:5]}; the folder is incomplete or mixed")


def load_part(module: nn.Module, src: Source, device, dtype, where: str, prefix: str = "") -> nn.Module:
    """Assign `src`'s tensors (under `prefix`) to a module built on the meta device, strictly (check_fit)."""
    check_fit(module, src, where, prefix)
    wanted = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    state = {k: src.fetch(prefix + k).reshape(s).to(device=device, dtype=dtype, copy=True) for k, s in wanted.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module


class Part(NamedTuple):
    """A folder's part, built on the meta device from its config, and its tensors (headers read, not the data)."""
    module: nn.Module
    src: Source
    where: str
    prefix: str = ""


def config_of(path: Path, make: Callable):
    """make(config.json's dict), a config that cannot describe the part named with its file."""
    try:
        return make(read_json(path))
    except CheckpointError:  # unreadable: read_json names it
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot describe the model ({type(e).__name__}: {e}); the folder is "
                              "incomplete or not a diffusers MM-DiT folder") from e


def vae_factors(folder: Path) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of vae/config.json, refused unless plausible."""
    path = folder / "vae" / "config.json"
    c = read_json(path)
    factors = (c.get("scaling_factor"), c.get("shift_factor") or 0.0)
    for name, key, value in zip(("scale_factor", "shift_factor"), ("scaling_factor", "shift_factor"), factors):
        problem = factor_problem(name, value)
        if problem:
            raise CheckpointError(f"{path}: {key} is {problem}; the latents would be scaled wrongly (SD3: 1.5305 "
                                  "and 0.0609, Flux: 0.3611 and 0.1159); fix the file")
    return float(factors[0]), float(factors[1])


def vae_part(folder: Path) -> Part:
    with torch.device("meta"):
        vae = AutoencoderKL(config_of(folder / "vae" / "config.json", vae_config))
    return Part(vae, open_vae(folder / "vae"), str(folder / "vae"), VAE)


def load_flow(folder: Path) -> FlowConfig:
    path = folder / "scheduler" / "scheduler_config.json"
    return config_of(path, lambda c: FlowConfig.from_scheduler_config(c, str(path)))


def transformer_parts(folder: Path, make_config: Callable, make_model: Callable, text_parts: tuple, family: str
                      ) -> dict[str, Part]:
    """The transformer and the VAE of a folder, on the meta device, with their tensors' headers; the text
    encoders' folders must be there too."""
    require(folder, ("transformer", "vae", *text_parts), family)
    cfg = config_of(folder / "transformer" / "config.json", make_config)
    with torch.device("meta"):
        transformer = make_model(cfg)
    return {"transformer": Part(transformer, open_weights(folder / "transformer"), str(folder / "transformer")),
            "vae": vae_part(folder)}


def sd3_parts(folder: Path) -> dict[str, Part]:
    return transformer_parts(folder, SD3Config.from_diffusers, SD3Transformer,
                             ("text_encoder", "text_encoder_2", "text_encoder_3"), "SD3")


def flux_parts(folder: Path) -> dict[str, Part]:
    return transformer_parts(folder, FluxConfig.from_diffusers, FluxTransformer, ("text_encoder", "text_encoder_2"),
                             "Flux")


def checked(folder: Path, parts_of: Callable) -> tuple[float, float, FlowConfig, dict[str, Part]]:
    """(scaling_factor, shift_factor, the flow schedule, the parts): everything loading checks before reading
    a tensor (p2p inspect's `loadable`)."""
    scaling, shift = vae_factors(folder)
    flow, parts = load_flow(folder), parts_of(folder)
    for part in parts.values():
        check_fit(*part)
    return scaling, shift, flow, parts


def loaded(parts: dict[str, Part], device, dtype) -> tuple[nn.Module, AutoencoderKL]:
    """(transformer, VAE) with the folder's tensors."""
    return tuple(load_part(p.module, p.src, device, dtype, p.where, p.prefix) for p in parts.values())


def load_sd3(folder: Path, device="cpu", dtype=torch.float32, text: bool = True) -> SD3:
    """An SD3 / SD3.5 diffusers folder: transformer/, vae/, scheduler/ and, with text, the three text encoders
    and their tokenizers (weights_tools.mmdit_text). Every part is checked before any tensor is read."""
    scaling, shift, flow, parts = checked(folder, sd3_parts)
    transformer, vae = loaded(parts, device, dtype)
    encoders = load_sd3_text(folder, dtype, device) if text else None
    model = SD3(transformer, vae, flow, scaling, shift, encoders, encoders.t5_length if encoders is not None else 256)
    return model.requires_grad_(False).eval()


def load_flux(folder: Path, device="cpu", dtype=torch.float32, text: bool = True) -> Flux:
    """A FLUX.1 (dev / schnell) diffusers folder: transformer/, vae/, scheduler/ and, with text, CLIP-L and T5
    and their tokenizers (weights_tools.mmdit_text)."""
    scaling, shift, flow, parts = checked(folder, flux_parts)
    transformer, vae = loaded(parts, device, dtype)
    encoders = load_flux_text(folder, dtype, device) if text else None
    model = Flux(transformer, vae, flow, scaling, shift, encoders,
                 encoders.t5_length if encoders is not None else T5_LENGTH)
    return model.requires_grad_(False).eval()


def check_sd3(folder: Path) -> None:
    checked(folder, sd3_parts)


def check_flux(folder: Path) -> None:
    checked(folder, flux_parts)


def sd3_variant(folder: Path) -> tuple[str, str]:
    """SD3.5 where the transformer has SD3.5's qk RMS-norm or dual-attention blocks, else SD3."""
    path = folder / "transformer" / "config.json"
    c = read_json(path) if path.is_file() else {}
    said = [s for s, on in ((f"qk_norm {c.get('qk_norm')!r}", c.get("qk_norm")),
                            ("dual_attention_layers", c.get("dual_attention_layers"))) if on]
    if said:
        return "SD3.5", f"model_index.json names StableDiffusion3Pipeline; transformer/config.json has {', '.join(said)}"
    return "SD3", "model_index.json names StableDiffusion3Pipeline; transformer/config.json: no qk_norm, no dual attention"


def flux_variant(folder: Path) -> tuple[str, str]:
    """FLUX.1-dev where the transformer embeds the guidance scale (guidance_embeds), else FLUX.1-schnell."""
    path = folder / "transformer" / "config.json"
    if (read_json(path) if path.is_file() else {}).get("guidance_embeds"):
        return "FLUX.1-dev", "model_index.json names FluxPipeline; transformer/config.json has guidance_embeds true"
    return "FLUX.1-schnell", "model_index.json names FluxPipeline; transformer/config.json: no guidance_embeds"


PIPELINES: dict[str, Pipeline] = {"StableDiffusion3Pipeline": Pipeline(load_sd3, sd3_variant, check_sd3),
                                  "FluxPipeline": Pipeline(load_flux, flux_variant, check_flux)}


def load_mmdit(path, device="cpu", dtype=torch.float32, text: bool = True) -> MMDiTModel:
    """A diffusers MM-DiT folder (PIPELINES' pipeline classes) as its model, in eval mode; text=False leaves
    the text encoders out (the prompts are then given as TextCond)."""
    row = mmdit_pipeline(path)
    if row is None:
        raise CheckpointError(f"{path}: not a diffusers MM-DiT folder (its model_index.json must name one of "
                              f"{', '.join(PIPELINES)})")
    return row.load(Path(path), device, dtype, text)
