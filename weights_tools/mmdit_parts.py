"""The pieces of MM-DiT single files: renamed / split tensors read lazily, the LDM-named 16-channel VAE's config
from its shapes, and the text encoders' towers (CLIP-L, CLIP-G, T5) from whichever file holds them.

A released single file carries no config.json: everything is read from the shapes, and the few numbers shapes
cannot say (heads, activations) are the released towers' own (`RELEASED_CLIP`, T5 v1.1 XXL), or a diffusers
folder's config.json where one is given.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from models.config import CLIPTextConfig, VAEConfig
from models.mmdit_text import CLIPTower
from models.t5 import T5Config, T5EncoderModel

from .layout import CheckpointError
from .mmdit_text import clip_tower, t5_encoder
from .sd3_keys import Piece
from .sources import Source

# CLIP text towers by width: (heads, the MLP's width, activation); SD3's CLIP-L and CLIP-G, Flux's CLIP-L
RELEASED_CLIP = {768: (12, 3072, "quick_gelu"), 1280: (20, 5120, "gelu")}
T5_XXL_WIDTH = 4096
# keys a text-encoder file may hold that a tower does not read: a CLIP-L's projection where Flux reads none,
# CLIP's logit scale (a whole CLIP model's file)
OPTIONAL_TEXT = ("text_projection.weight", "logit_scale")


def piece_shape(src: Source, p: Piece) -> tuple:
    shape = tuple(src.entries[p.key][0])
    return shape if p.start is None else (p.stop - p.start, *shape[1:])


def mapped(src: Source, plan: dict[str, Piece], where: str) -> Source:
    """`src` under our names (`plan`: our key -> Piece), each tensor read from the file only when asked."""
    missing = sorted({p.key for p in plan.values()} - set(src.entries))
    if missing:
        raise CheckpointError(f"{where}: internal error, the key map names keys the file lacks: {missing[:5]}")

    def fetch(key: str) -> torch.Tensor:
        p = plan[key]
        t = src.fetch(p.key)
        t = t if p.start is None else t[p.start:p.stop]
        if p.swap:
            shift, scale = t.chunk(2, dim=0)
            t = torch.cat([scale, shift], dim=0)
        return t

    entries = {k: (piece_shape(src, p), src.entries[p.key][1]) for k, p in plan.items()}
    return dataclasses.replace(src, where=where, entries=entries, fetch=fetch)


def prefixed(src: Source, prefix: str, where: str | None = None, drop: tuple = ()) -> Source:
    """The keys of `src` under `prefix`, with it removed (and the `drop` ones left out)."""
    names = {k[len(prefix):]: k for k in src.entries if k.startswith(prefix) and k[len(prefix):] not in drop}
    return dataclasses.replace(src, where=where or src.where, entries={k: src.entries[v] for k, v in names.items()},
                               fetch=lambda key: src.fetch(names[key]))


def with_identity_projection(src: Source) -> Source:
    """A CLIP-L tower's tensors with an identity `text_projection` where the file has none: SD3's CLIP-L projection
    is the identity (the SD3 reference code's; diffusers' single-file loader sets it so too), and a CLIP-L file
    kept for SD3 may store none."""
    if "text_projection.weight" in src.entries or "text_model.embeddings.token_embedding.weight" not in src.entries:
        return src
    shape, dtype = src.entries["text_model.embeddings.token_embedding.weight"]
    fetch = src.fetch
    return dataclasses.replace(src, entries=src.entries | {"text_projection.weight": ((shape[1], shape[1]), dtype)},
                               fetch=lambda key: torch.eye(shape[1], dtype=dtype) if key == "text_projection.weight"
                               else fetch(key))


# ------------------------------------------------------------------------------------------------- VAE
def count(shapes, pattern: str) -> int:
    return len({m[1] for k in shapes if (m := re.match(pattern, k))})


def ldm_vae_config(shapes: dict[str, tuple], where: str) -> VAEConfig:
    """The VAEConfig of a VAE in the original LDM names (`encoder.down.N.block.M...`, keys without prefix) from
    its shapes: SD3's `first_stage_model.*`, BFL's `ae.safetensors`."""
    try:
        ch, in_ch = shapes["encoder.conv_in.weight"][:2]
        levels = count(shapes, r"encoder\.down\.(\d+)\.")
        mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
        z = shapes["encoder.conv_out.weight"][0] // 2
        embed = shapes["quant_conv.weight"][0] // 2 if "quant_conv.weight" in shapes else z
        return VAEConfig(in_channels=in_ch, out_ch=shapes["decoder.conv_out.weight"][0], ch=ch, ch_mult=mult,
                         num_res_blocks=count(shapes, r"encoder\.down\.0\.block\.(\d+)\."), z_channels=z,
                         embed_dim=embed, use_quant_conv="quant_conv.weight" in shapes,
                         use_post_quant_conv="post_quant_conv.weight" in shapes)
    except (KeyError, IndexError, ZeroDivisionError) as e:
        raise CheckpointError(f"{where}: not a whole VAE in the LDM names (no {e}); give the VAE file "
                              "(`ae.safetensors` for Flux) or a diffusers folder holding vae/") from e


# --------------------------------------------------------------------------------------------- text
def released_clip(shapes: dict[str, tuple], where: str, projection: bool) -> CLIPTower:
    """A CLIP tower of a released width (CLIP-L 768, CLIP-G 1280) sized from its file's shapes."""
    vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
    if width not in RELEASED_CLIP:
        raise CheckpointError(f"{where}: a CLIP text tower of width {width}; only the released CLIP-L (768) and "
                              "CLIP-G (1280) are known without a config: give a diffusers folder (--base) whose "
                              "text_encoder*/config.json describes it")
    heads, mlp, act = RELEASED_CLIP[width]
    cfg = CLIPTextConfig(vocab_size=vocab, max_position_embeddings=shapes["text_model.embeddings.position_embedding"
                                                                           ".weight"][0],
                         width=width, layers=count(shapes, r"text_model\.encoder\.layers\.(\d+)\."), heads=heads,
                         intermediate_size=mlp, hidden_act=act)
    return CLIPTower(cfg, 49407, width if projection else None)


def released_t5(shapes: dict[str, tuple], where: str) -> T5EncoderModel:
    """T5 v1.1 XXL (SD3's and Flux's) sized from its file's shapes."""
    emb = shapes.get("shared.weight") or shapes.get("encoder.embed_tokens.weight")
    if emb is None or emb[1] != T5_XXL_WIDTH:
        raise CheckpointError(f"{where}: not T5 v1.1 XXL's encoder (`shared.weight` of width {T5_XXL_WIDTH}: "
                              f"found {emb}); give a diffusers folder (--base) whose T5 config.json describes it")
    return T5EncoderModel(T5Config(vocab_size=emb[0], d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0"
                                                                   ".weight"][0],
                                   num_layers=count(shapes, r"encoder\.block\.(\d+)\.")))


def tower(kind: str, src: Source, config_folder: Path | None, projection: bool):
    """The meta-device module of a text tower (`kind`: clip_l, clip_g, t5): from the config.json of a diffusers
    folder's part where one is given, else the released tower's sizes read from the file's shapes."""
    with torch.device("meta"):
        if config_folder is not None:
            return t5_encoder(config_folder) if kind == "t5" else clip_tower(config_folder, projection)
        if kind == "t5":
            return released_t5(src.shapes, src.where)
        try:
            return released_clip(src.shapes, src.where, projection)
        except KeyError as e:
            raise CheckpointError(f"{src.where}: not a CLIP text encoder in transformers' names (no {e}); "
                                  f"give the {kind} file (`{kind}.safetensors`)") from e
