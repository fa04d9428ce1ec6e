"""A UNet from its own file in place of a base model's (`load_checkpoint(UNET, base=BASE)`, `--base`).

Distilled and fine-tuned UNets ship alone (SDXL-Lightning's and Hyper-SD's `*_unet.safetensors`, in
diffusers' names): the VAE and the text towers come from the base model they were trained from (a single
file or a diffusers folder). The UNet file's keys become `model.diffusion_model.*` keys in the single-file
layout (diffusers' names mapped with the base's UNet architecture; a whole checkpoint gives its UNet) and
replace the base's UNet keys; every key and shape is then checked as for any checkpoint.
"""
from __future__ import annotations

from pathlib import Path

from models import PREFIXES, SDConfig

from .layout import LAYOUTS, UNET_ALONE, CheckpointError, part_of
from .sources import Source, open_source, open_weights
from .vae_swap import renamed

UNET = PREFIXES["unet"]


def unet_folder_config(cfg: SDConfig) -> dict:
    """What the diffusers key map reads of a unet/config.json, from the base's architecture."""
    u, levels = cfg.unet, len(cfg.unet.channel_mult)
    attends = [2 ** level in u.attention_resolutions and u.depth(level) > 0 for level in range(levels)]
    return {"layers_per_block": u.num_res_blocks,
            "up_block_types": ["CrossAttnUpBlock2D" if attends[levels - 1 - i] else "UpBlock2D" for i in range(levels)]}


def open_unet(path, cfg: SDConfig) -> Source:
    """A UNet file (diffusers' names or the single-file layout) or a diffusers unet/ folder, as a Source whose
    keys are `model.diffusion_model.*`; `cfg`: the base model's architecture."""
    path = Path(path)
    src = open_weights(path) if path.is_dir() else open_source(path)
    keys = list(src.entries)
    if any(k.startswith(UNET) for k in keys):  # a whole checkpoint, or a UNet saved with the prefix: its UNet
        return renamed(src, {k: k for k in keys if part_of(k) == "unet"})
    if path.is_dir() or src.variant[0] in UNET_ALONE:
        folder = unet_folder_config(cfg)
        to_key = LAYOUTS[cfg.family].folder.key
        return renamed(src, {k: to_key("unet", k, folder, str(path)) for k in keys})
    raise CheckpointError(f"{path}: no UNet keys (`{UNET}*`, or diffusers' `down_blocks.*` with `conv_in.weight`) "
                          f"among {len(keys)} tensors such as {keys[:3]}; not a UNet file")
