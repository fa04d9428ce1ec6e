"""SDXL's text conditioning: two towers read side by side, and the one tensor that carries them.

SDXL base runs CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 on the same prompt (the same BPE ids; CLIP's
copy padded with end-of-text, OpenCLIP's with "!"; a diffusers folder whose towers have their own
vocabulary, as diffusers' SDXL test pipelines, gives both tokenizers in tokenizer/ and tokenizer_2/,
each tower's config naming its folder), reads both at their penultimate layer without a
final norm, and concatenates the two contexts: 768 + 1280 = 2048 channels. bigG also gives a pooled,
projected vector (1280) that the UNet reads through its vector conditioning `y` (models/sdxl.py).

The module's names are the single file's (`conditioner.embedders.0.transformer.text_model.*`,
`conditioner.embedders.1.model.*`), so loading needs no key map.

One tensor, one extra row. Everything downstream of the text encoder (guidance batches, expansion,
finiteness checks, null-text optimisation, inversion files) handles ONE context tensor per prompt. So
the tower returns (N, 77 + 1, 2048): the 77 token rows the UNet's cross-attention reads, then one row
holding the pooled vector in its first 1280 channels (the rest zero). `StableDiffusion.eps` splits that
row off (models.sdxl.split_pooled) and builds `y` from it and the picture's size. Null-text inversion
thus optimises both towers' unconditional embeddings and the pooled vector together.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .clip import BANG, EOS, CLIPTextModel, Tokenizer, read_bpe_folder
from .config import CLIPTextConfig
from .openclip import VIT_BIGG_14, OpenCLIPTextConfig, OpenCLIPTextModel
from .sdxl import BASE_SIZE_EMBED_DIM

# SDXL's first tower: CLIP ViT-L/14 read at hidden_states[-2] (SGM: layer "hidden", layer_idx 11)
SDXL_CLIP_L = CLIPTextConfig(output_layer="penultimate", final_ln=False)


@dataclass(frozen=True)
class SDXLTextConfig:
    clip: CLIPTextConfig = SDXL_CLIP_L
    openclip: OpenCLIPTextConfig = VIT_BIGG_14
    # the empty prompt encodes to zeros (context and pooled), as SDXL base's pipeline config says
    # (force_zeros_for_empty_prompt) and as SGM drops text in training; False: the "" encoding
    zeros_for_empty: bool = True
    # channels of each size number's sinusoidal embedding in the vector conditioning (models/sdxl.py):
    # SGM's ConcatTimestepEmbedderND `outdim`, diffusers' `addition_time_embed_dim`; SDXL base: 256
    size_embed_dim: int = BASE_SIZE_EMBED_DIM

    def __post_init__(self):
        if self.size_embed_dim <= 0 or self.size_embed_dim % 2:
            raise ValueError(f"size_embed_dim (the size ids' embedding width) must be a positive even number, "
                             f"got {self.size_embed_dim}")
        if self.openclip.projection_dim is None:
            raise ValueError("SDXL's second tower needs its text_projection (projection_dim): it gives the pooled "
                             "vector the UNet's vector conditioning reads")
        if self.pooled_dim > self.context_dim:
            raise ValueError(f"the pooled vector ({self.pooled_dim}) must fit in one context row "
                             f"({self.context_dim} channels)")
        if self.clip.max_position_embeddings != self.openclip.context_length:
            raise ValueError(f"the two towers read the same token positions; got {self.clip.max_position_embeddings} "
                             f"and {self.openclip.context_length}")

    @property
    def context_dim(self) -> int:
        return self.clip.width + self.openclip.width

    @property
    def pooled_dim(self) -> int:
        return self.openclip.projection_dim

    def tokenizer(self) -> "SDXLTokenizer":
        """CLIP's BPE with both towers' paddings, or, where the towers' configs name a folder's tokenizer/ and
        tokenizer_2/ (their `tokenizer`), the folder's own two (SDXLTokenizer.from_folders)."""
        folders = (self.clip.tokenizer, self.openclip.tokenizer)
        if folders == (None, None):
            return sdxl_tokenizer()
        if None in folders:
            raise ValueError(f"SDXL's two towers read one vocabulary: both or neither name a tokenizer folder, "
                             f"got {folders}")
        return sdxl_folder_tokenizer(*folders)

    # ---- SGM's `conditioner_config` (sd_xl_base.yaml), read and written ----
    @classmethod
    def from_sgm(cls, conditioner: dict) -> "SDXLTextConfig":
        """From an SGM `conditioner_config`: SDXL base's two text embedders and the width of its size
        embedders (their `outdim`, one for all three). Test models give their towers' sizes in a `tiny`
        block of each embedder."""
        found, widths = {}, set()
        for emb in conditioner["params"]["emb_models"]:
            name = str(emb.get("target", "")).rsplit(".", 1)[-1]
            if name in SGM_TOWERS:
                found[name] = emb.get("params") or {}
            elif name == SGM_SIZE_EMBEDDER:
                widths.add((emb.get("params") or {}).get("outdim"))
        if len(widths) != 1 or None in widths:
            raise ValueError(f"SDXL conditioner's size embedders ({SGM_SIZE_EMBEDDER}) give outdim {sorted(map(str, widths))}; "
                             "SDXL has three of one width (base: 256)")
        if set(found) != set(SGM_TOWERS):
            raise ValueError(f"SDXL conditioner has text embedders {sorted(found) or 'none'}; SDXL base has "
                             f"{' and '.join(SGM_TOWERS)} (the refiner's single OpenCLIP tower is not supported)")
        clip = sgm_tower(found["FrozenCLIPEmbedder"], SDXL_CLIP_L)
        openclip = sgm_tower(found["FrozenOpenCLIPEmbedder2"], VIT_BIGG_14)
        return cls(clip=clip, openclip=openclip, size_embed_dim=int(widths.pop()))

    def to_sgm(self) -> dict:
        """The inverse of `from_sgm`: SDXL base's conditioner_config (a `tiny` block where sizes differ). A
        folder's tokenizer paths are not written: they name files on this machine, not in the checkpoint."""
        models = []
        for name, cfg, default in (("FrozenCLIPEmbedder", self.clip, SDXL_CLIP_L),
                                   ("FrozenOpenCLIPEmbedder2", self.openclip, VIT_BIGG_14)):
            params, cfg = dict(SGM_TOWERS[name]), dataclasses.replace(cfg, tokenizer=None)
            if cfg != default:
                params["tiny"] = dataclasses.asdict(cfg)
            models.append({"is_trainable": False, "input_key": "txt", "target": SGM_PREFIX + name, "params": params})
        models += [{"is_trainable": False, "input_key": key, "target": SGM_PREFIX + SGM_SIZE_EMBEDDER,
                    "params": {"outdim": self.size_embed_dim}} for key in SGM_SIZE_KEYS]
        return {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": models}}


SGM_PREFIX = "sgm.modules.encoders.modules."
# sd_xl_base.yaml's text embedders and what their params say (layer_idx 11 of 12: the penultimate)
SGM_TOWERS = {"FrozenCLIPEmbedder": {"layer": "hidden", "layer_idx": 11},
              "FrozenOpenCLIPEmbedder2": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True,
                                          "layer": "penultimate", "always_return_pooled": True, "legacy": False}}
SGM_SIZE_EMBEDDER = "ConcatTimestepEmbedderND"
SGM_SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


def sgm_tower(params: dict, default):
    """One tower's config: SDXL's full-size one, or the `tiny` sizes a test model's config gives."""
    tiny = params.get("tiny")
    return default if tiny is None else type(default)(**tiny)


class SDXLTokenizer(Tokenizer):
    """CLIP's BPE with both of SDXL's paddings: `__call__` gives (N, 2, length), row 0 padded with `pad`
    (end-of-text, the CLIP-L tower's), row 1 with `pad_2` ("!", bigG's). Content ids, BOS and EOS are the
    same in both, so a word has the same positions for both towers (what p2p.align counts)."""

    pad_2 = BANG  # the second tower's padding id

    def __call__(self, prompts, length: int = Tokenizer.length) -> torch.Tensor:
        first = super().__call__(prompts, length)
        after_eos = torch.cumsum((first == self.eos).long(), dim=1) - (first == self.eos).long() > 0
        return torch.stack([first, first.masked_fill(after_eos, self.pad_2)], dim=1)

    @classmethod
    def from_folders(cls, first: str | Path, second: str | Path) -> "SDXLTokenizer":
        """A diffusers SDXL folder's own two tokenizers (tokenizer/ and tokenizer_2/, as Tokenizer.from_folder
        reads one): one vocabulary and merges, which both must hold, and each folder's own padding (its
        tokenizer_config.json's pad_token)."""
        tok = cls.from_folder(first)
        vocab, merges, pad = read_bpe_folder(Path(second))
        if vocab != tok.encoder or merges != list(tok.ranks):
            raise ValueError(f"{first} and {second}: SDXL's two tokenizers must share one vocabulary and its merges "
                             "(a word's token positions are counted once for both towers); these differ")
        if pad not in vocab:
            raise ValueError(f"{second}: its pad_token {pad!r} is not in its vocabulary")
        tok.pad_2 = vocab[pad]
        return tok


@functools.lru_cache()
def sdxl_tokenizer() -> SDXLTokenizer:
    return SDXLTokenizer(pad=EOS)


@functools.lru_cache()
def sdxl_folder_tokenizer(first: str, second: str) -> SDXLTokenizer:
    return SDXLTokenizer.from_folders(first, second)


def holder(name: str, module: nn.Module) -> nn.Module:
    """An empty module whose one child is `module` under `name`: the single file's extra key levels."""
    m = nn.Module()
    setattr(m, name, module)
    return m


class SDXLTextModel(nn.Module):
    """Ids (N, 2, 77) (SDXLTokenizer) -> (N, 78, 2048): the concatenated contexts and the pooled row."""

    def __init__(self, cfg: SDXLTextConfig):
        super().__init__()
        self.cfg = cfg
        self.embedders = nn.ModuleList([holder("transformer", holder("text_model", CLIPTextModel(cfg.clip))),
                                        holder("model", OpenCLIPTextModel(cfg.openclip))])

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (N, 77, 2048), pooled (N, 1280)) from ids (N, 2, 77)."""
        if ids.dim() != 3 or ids.shape[1] != 2:
            raise ValueError(f"SDXL's text encoder takes ids (N, 2, length), both paddings (SDXLTokenizer), "
                             f"got shape {tuple(ids.shape)}")
        first = self.embedders[0].transformer.text_model(ids[:, 0])
        second, pooled = self.embedders[1].model.encode(ids[:, 1])
        return torch.cat([first, second], dim=-1), pooled

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        context, pooled = self.encode(ids)
        return join_pooled(context, pooled)


def join_pooled(context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(N, L, D) and (N, P) -> (N, L + 1, D): the pooled vector as a last row, zero past its P channels."""
    row = context.new_zeros(context.shape[0], 1, context.shape[-1])
    row[:, 0, :pooled.shape[-1]] = pooled
    return torch.cat([context, row], dim=1)


def split_pooled(context: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `join_pooled`: (token rows (N, L, D), pooled (N, pooled_dim))."""
    return context[:, :-1], context[:, -1, :pooled_dim]
