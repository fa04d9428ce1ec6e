"""Tiny single files in the released layouts, written from the tiny diffusers folders' own weights: SD3's
official file (`model.diffusion_model.*` + `first_stage_model.*` + `text_encoders.*`), BFL's Flux transformer,
`ae.safetensors`, and ComfyUI's `clip_l.safetensors` / `clip_g.safetensors` / `t5xxl_fp16.safetensors`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from weights_tools.diffusers_keys import vae_key
from weights_tools.flux_keys import DOUBLE, PARAMS, SINGLE, SWAPPED, TOP as FLUX_TOP
from weights_tools.sd3_keys import BLOCK, PREFIX, TOP

FIXTURES = Path(__file__).parent / "fixtures" / "mmdit"
TINY_SD3, TINY_FLUX = FIXTURES / "tiny-sd3", FIXTURES / "tiny-flux"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(f for f in folder.iterdir() if f.suffix == ".safetensors")))


def swapped(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def fused(ours: dict, table: dict, prefix_of, swap_of) -> dict:
    """The file's tensors: each file module's row blocks (our tensors) concatenated, in row order."""
    out = {}
    for module_key, (names, our_prefix) in prefix_of(ours).items():
        for param in ("weight", "bias"):
            parts = [ours.get(f"{our_prefix}{n}.{param}") for n in names]
            if all(p is not None for p in parts):
                t = torch.cat(parts, dim=0)
                out[f"{module_key}.{param}"] = swapped(t) if swap_of(module_key) else t
    return out


def sd3_official(ours: dict) -> dict:
    """diffusers' SD3 transformer state dict -> the official single-file names (under model.diffusion_model.)."""
    n = 1 + max(int(k.split(".")[1]) for k in ours if k.startswith("transformer_blocks."))

    def modules(_):
        out = {m: (names, "") for m, names in TOP.items()}
        return out | {f"joint_blocks.{i}.{m}": (names, f"transformer_blocks.{i}.") for i in range(n)
                      for m, names in BLOCK.items()}

    def swap(m):
        return m in ("final_layer.adaLN_modulation.1", f"joint_blocks.{n - 1}.context_block.adaLN_modulation.1")

    out = fused(ours, TOP, modules, swap) | {"pos_embed": ours["pos_embed.pos_embed"]}
    return {PREFIX + k: v for k, v in out.items()}


def bfl_official(ours: dict, prefix: str = "") -> dict:
    """diffusers' Flux transformer state dict -> BFL's names."""
    double = 1 + max(int(k.split(".")[1]) for k in ours if k.startswith("transformer_blocks."))
    single = 1 + max(int(k.split(".")[1]) for k in ours if k.startswith("single_transformer_blocks."))

    def modules(_):
        out = {m: (names, "") for m, names in FLUX_TOP.items()}
        out |= {f"double_blocks.{i}.{m}": (names, f"transformer_blocks.{i}.") for i in range(double)
                for m, names in DOUBLE.items()}
        return out | {f"single_blocks.{i}.{m}": (names, f"single_transformer_blocks.{i}.") for i in range(single)
                      for m, names in SINGLE.items()}

    out = fused(ours, FLUX_TOP, modules, lambda m: m == SWAPPED)
    out = {(k[:-len(".weight")] + ".scale" if "_norm." in k else k): v for k, v in out.items()}
    assert set(PARAMS) >= {k.rpartition(".")[2] for k in out}
    return {prefix + k: v for k, v in out.items()}


def ldm_vae(folder: Path) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    return {vae_key(k, cfg): v for k, v in weights(folder).items()}


def write_sd3(path: Path, folder: Path = TINY_SD3, text: bool = True) -> Path:
    """An official-layout SD3 single file from a diffusers SD3 folder's weights; `text`: with its text encoders.
    Its transformer config rides in the `mmdit_config` metadata: the tiny SD3's 8-wide heads without qk-norm are
    not in its shapes."""
    tensors = sd3_official(weights(folder / "transformer"))
    tensors |= {"first_stage_model." + k: v for k, v in ldm_vae(folder / "vae").items()}
    if text:
        for kind, part in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5xxl", "text_encoder_3")):
            tensors |= {f"text_encoders.{kind}.transformer.{k}": v for k, v in weights(folder / part).items()}
    config = (folder / "transformer" / "config.json").read_text()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"mmdit_config": config})
    return path


def write_flux(folder: Path, dst: Path, prefix: str = "") -> dict[str, Path]:
    """flux1-dev.safetensors, ae.safetensors, clip_l.safetensors, t5xxl_fp16.safetensors from a Flux folder."""
    files = {"transformer": bfl_official(weights(folder / "transformer"), prefix), "vae": ldm_vae(folder / "vae"),
             "clip_l": weights(folder / "text_encoder"), "t5": weights(folder / "text_encoder_2")}
    names = {"transformer": "flux1-dev.safetensors", "vae": "ae.safetensors", "clip_l": "clip_l.safetensors",
             "t5": "t5xxl_fp16.safetensors"}
    out = {}
    for part, tensors in files.items():
        out[part] = dst / names[part]
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out[part]))
    return out


def tokenizer_folder(folder: Path, dst: Path) -> Path:
    """A diffusers folder without weights: model_index.json, the tokenizers and the config.json files (what a
    user keeps to give tokenizers and configs to single files)."""
    shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst
