"""A VAE from its own file in place of the checkpoint's (`load_checkpoint(..., vae=PATH)`, `--vae`).

Fine-tuned VAEs ship alone: `vae-ft-mse-840000-ema-pruned.safetensors` (CompVis names, with or
without `first_stage_model.`), a diffusers `vae/` folder, or a diffusers-named single file. Each
becomes `first_stage_model.*` keys in the single-file layout and replaces the checkpoint's VAE
keys, so a checkpoint that ships without a VAE loads when one is given. Keys of the VAE file that
are not the VAE's own (a training checkpoint's `loss.*`) land under the prefix too: strict loading
refuses them, non-strict loading lists and ignores them, as for the checkpoint's own.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from models import PREFIXES

from . import diffusers_keys
from .layout import CheckpointError, part_of
from .sources import Source, open_source, open_weights, read_json

VAE = PREFIXES["vae"]
COMPVIS_VAE = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def open_vae(path) -> Source:
    """A standalone VAE (file, diffusers `vae/` folder, or a model folder holding one) as a Source
    whose keys are `first_stage_model.*`."""
    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").exists() else path
        if not (folder / "config.json").exists():
            raise CheckpointError(f"{path}: a folder without config.json (nor vae/config.json): not a diffusers VAE "
                                  "folder; give a VAE .safetensors / .ckpt or a diffusers vae/ folder")
        src = open_weights(folder)
        cfg = read_json(folder / "config.json")
        return renamed(src, {k: VAE + diffusers_keys.vae_key(k, cfg, str(folder)) for k in src.entries})
    src = open_source(path)
    keys = list(src.entries)
    if any(k.startswith(VAE) for k in keys):  # a whole checkpoint, or a VAE saved with the prefix: its VAE
        return renamed(src, {k: k for k in keys if part_of(k) == "vae"})
    if any(re.match(r"(en|de)coder\.(down_blocks|up_blocks|mid_block)\.", k) for k in keys):
        levels = len({m[1] for k in keys if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
        cfg = {"block_out_channels": [0] * levels}  # the key map needs the number of levels alone
        return renamed(src, {k: VAE + diffusers_keys.vae_key(k, cfg, str(path)) for k in keys})
    if not any(k.startswith(COMPVIS_VAE) for k in keys):
        raise CheckpointError(f"{path}: no VAE keys (`encoder.*`, `decoder.*`, `first_stage_model.*`, or diffusers' "
                              f"`decoder.up_blocks.*`) among {len(keys)} tensors such as {keys[:3]}; not a VAE file")
    return renamed(src, {k: VAE + k for k in keys})


def renamed(src: Source, names: dict[str, str]) -> Source:
    """`src` with its keys renamed (file key -> new key), only those kept."""
    back = {new: old for old, new in names.items()}
    return dataclasses.replace(src, entries={new: src.entries[old] for old, new in names.items()},
                               fetch=lambda key: src.fetch(back[key]))


def with_vae(src: Source, vae: Source) -> Source:
    """`src` with its VAE keys replaced by `vae`'s."""
    return with_part(src, vae, "vae")


def with_part(src: Source, other: Source, part: str) -> Source:
    """`src` with its keys of `part` ("vae", "unet") replaced by `other`'s."""
    entries = {k: e for k, e in src.entries.items() if part_of(k) != part}
    own = dict.fromkeys(entries, src.fetch) | dict.fromkeys(other.entries, other.fetch)
    return dataclasses.replace(src, entries=entries | other.entries, fetch=lambda key: own[key](key),
                               format=f"{src.format}, {part.upper()} from {other.where}")
