"""Diffusers folders of MM-DiT models (SD3, SD3.5, Flux) -> models.mmdit_model / models.flux_model, beside the UNet families' path.

An MM-DiT folder is told by its model_index.json pipeline class (`PIPELINES`, one row per pipeline: the
loader and the detection of its variant). Its parts keep diffusers' names (the transformer's modules are
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
from models.flux_model import Flux
from models.mmdit import SD3Config, SD3Transformer
from models.mmdit_model import SD3, MMDiTModel
from models.vae import AutoencoderKL

from .diffusers_keys import vae_config
from .layout import CheckpointError, factor_problem
from .sources import Source, open_weights, read_json
from .vae_swap import VAE, open_vae


class Pipeline(NamedTuple):
    """One MM-DiT pipeline class: `load(folder, device, dtype, text)` and `variant(folder) -> (name, evidence)`."""
    load: Callable
    variant: Callable


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


def load_part(module: nn.Module, src: Source, device, dtype, where: str, prefix: str = "") -> nn.Module:
    """Assign `src`'s tensors (under `prefix`) to a module built on the meta device, strictly: a missing,
    extra or misshapen key is named."""
    wanted = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    have = {k[len(prefix):]: s for k, s in src.shapes.items() if k.startswith(prefix)}
    missing, extra = sorted(set(wanted) - set(have)), sorted(set(have) - set(wanted))
    wrong = [f"{k} {have[k]} (the config says {s})" for k, s in wanted.items() if k in have and not fits(have[k], s)]
    if missing or extra or wrong:
        raise CheckpointError(f"{where}: its tensors do not fit its config.json: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}, misshapen {wrong[:5]}; the folder is incomplete or mixed")
    state = {k: src.fetch(prefix + k).reshape(s).to(device=device, dtype=dtype, copy=True) for k, s in wanted.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module


def load_vae(folder: Path, device, dtype) -> tuple[AutoencoderKL, float, float]:
    """(the VAE of a folder's vae/, its scaling_factor, its shift_factor), the factors checked."""
    c = read_json(folder / "vae" / "config.json")
    factors = (c.get("scaling_factor"), c.get("shift_factor") or 0.0)
    for name, key, value in zip(("scale_factor", "shift_factor"), ("scaling_factor", "shift_factor"), factors):
        problem = factor_problem(name, value)
        if problem:
            raise CheckpointError(f"{folder / 'vae' / 'config.json'}: {key} is {problem}; the latents would be "
                                  "scaled wrongly (SD3: 1.5305 and 0.0609, Flux: 0.3611 and 0.1159); fix the file")
    with torch.device("meta"):
        vae = AutoencoderKL(vae_config(c))
    load_part(vae, open_vae(folder / "vae"), device, dtype, str(folder / "vae"), VAE)
    return vae, float(factors[0]), float(factors[1])


def load_flow(folder: Path) -> FlowConfig:
    path = folder / "scheduler" / "scheduler_config.json"
    try:
        return FlowConfig.from_scheduler_config(read_json(path), str(path))
    except (ValueError, TypeError) as e:
        raise CheckpointError(str(e)) from e


def load_transformer(folder: Path, device, dtype) -> SD3Transformer:
    try:
        cfg = SD3Config.from_diffusers(read_json(folder / "transformer" / "config.json"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder / 'transformer' / 'config.json'}: {e}") from e
    with torch.device("meta"):
        model = SD3Transformer(cfg)
    return load_part(model, open_weights(folder / "transformer"), device, dtype, str(folder / "transformer"))


def load_sd3(folder: Path, device="cpu", dtype=torch.float32, text: nn.Module | None = None) -> SD3:
    """An SD3 / SD3.5 diffusers folder: transformer/, vae/, scheduler/ (and the text module given)."""
    vae, scaling, shift = load_vae(folder, device, dtype)
    model = SD3(load_transformer(folder, device, dtype), vae, load_flow(folder), scaling, shift, text)
    return model.requires_grad_(False).eval()


def sd3_variant(folder: Path) -> tuple[str, str]:
    """SD3.5 where the transformer has SD3.5's qk RMS-norm or dual-attention blocks, else SD3."""
    c = read_json(folder / "transformer" / "config.json")
    said = [s for s, on in ((f"qk_norm {c.get('qk_norm')!r}", c.get("qk_norm")),
                            ("dual_attention_layers", c.get("dual_attention_layers"))) if on]
    if said:
        return "SD3.5", f"model_index.json names StableDiffusion3Pipeline; transformer/config.json has {', '.join(said)}"
    return "SD3", "model_index.json names StableDiffusion3Pipeline; transformer/config.json: no qk_norm, no dual attention"


def load_flux_transformer(folder: Path, device, dtype) -> FluxTransformer:
    try:
        cfg = FluxConfig.from_diffusers(read_json(folder / "transformer" / "config.json"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder / 'transformer' / 'config.json'}: {e}") from e
    with torch.device("meta"):
        model = FluxTransformer(cfg)
    return load_part(model, open_weights(folder / "transformer"), device, dtype, str(folder / "transformer"))


def load_flux(folder: Path, device="cpu", dtype=torch.float32, text: nn.Module | None = None) -> Flux:
    """A FLUX.1 (dev / schnell) diffusers folder: transformer/, vae/, scheduler/ (and the text module given)."""
    vae, scaling, shift = load_vae(folder, device, dtype)
    model = Flux(load_flux_transformer(folder, device, dtype), vae, load_flow(folder), scaling, shift, text)
    return model.requires_grad_(False).eval()


def flux_variant(folder: Path) -> tuple[str, str]:
    """FLUX.1-dev where the transformer embeds the guidance scale (guidance_embeds), else FLUX.1-schnell."""
    if read_json(folder / "transformer" / "config.json").get("guidance_embeds"):
        return "FLUX.1-dev", "model_index.json names FluxPipeline; transformer/config.json has guidance_embeds true"
    return "FLUX.1-schnell", "model_index.json names FluxPipeline; transformer/config.json: no guidance_embeds"


PIPELINES: dict[str, Pipeline] = {"StableDiffusion3Pipeline": Pipeline(load_sd3, sd3_variant),
                                  "FluxPipeline": Pipeline(load_flux, flux_variant)}


def load_mmdit(path, device="cpu", dtype=torch.float32, text: nn.Module | None = None) -> MMDiTModel:
    """A diffusers MM-DiT folder (PIPELINES' pipeline classes) as its model, in eval mode."""
    row = mmdit_pipeline(path)
    if row is None:
        raise CheckpointError(f"{path}: not a diffusers MM-DiT folder (its model_index.json must name one of "
                              f"{', '.join(PIPELINES)})")
    return row.load(Path(path), device, dtype, text)
