"""Plug-and-Play diffusion features (Tumanyan, Geyer, Bagon, Dekel, CVPR 2023), as pnp-diffusers runs it.

The source row is the inversion's stored latent at each timestep of the edit (`Inversion.source_path`),
read by the UNet in the same batch as the edited rows, with the empty prompt (their code's `""`); without
an inversion, the plain generation of the source prompt. For the
first int(n * feature_steps) steps the edited rows' residual branch h of one decoder ResBlock is the
source row's (each row keeps the skip of its own input); for the first int(n * attention_steps) steps the
edited rows' self-attention q and k in the decoder layers from that block on are the source row's (v is
each row's own): softmax(q_src k_src^T / sqrt(d)) v through the fused kernel. Both guidance halves are
injected, each from its own source row. Guidance reads the negative prompt as the unconditional row of the
edited prompts.

The sites follow from the model's levels: the decoder's second ResBlock at the level whose latent is
downsampled 4x (SD v1's `up_blocks[1].resnets[1]`, LDM `output_blocks[4]`; the deepest level of a UNet
with fewer), and every decoder self-attention from that block on (SD v1: `output_blocks` 4-11, 8 layers).
docs/pnp.md has the equations, the knobs and the quirks of their code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

import torch

from models import attention
from models.attention import Site

from .control import Edit, Steps

FEATURE_LEVEL = 2    # SD v1's up_blocks[1]: the decoder level at 1/4 of the latent side
FEATURE_BLOCK = 1    # its second ResBlock (resnets[1], output_blocks[4])
SOURCE_TEXTS = ("empty", "prompt")


@dataclass(frozen=True)
class PlugAndPlay(Edit):
    """feature_steps / attention_steps: the fraction of the n steps (int(n * f), counted from the first) in
    which the decoder ResBlock's residual branch / the decoder self-attention's q and k are the source's.
    source_text: "empty" (their code: the source row reads ""), or "prompt" (the inverted prompt, which
    their inversion used). Edit a photo from `invert(sd, image, source_prompt, method="ddim", guidance_scale=1.0)`
    (the edit's timesteps must be among the inversion's); without an inversion the source row is the plain
    generation of prompts[0] from the seed's x_T."""
    feature_steps: float = 0.8
    attention_steps: float = 0.5
    source_text: str = "empty"
    cross_replace_steps: Steps = 0.0          # no Prompt-to-Prompt map edit
    self_replace_steps: Union[float, tuple] = 0.0

    follows_inversion: ClassVar[bool] = True  # its source row is the inversion's latent at every step

    def __post_init__(self):
        for name in ("feature_steps", "attention_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"PlugAndPlay.{name} must be a fraction of the steps in [0, 1], got {value!r}")
        if self.source_text not in SOURCE_TEXTS:
            raise ValueError(f"PlugAndPlay.source_text must be one of {', '.join(SOURCE_TEXTS)}, "
                             f"got {self.source_text!r}")

    def cross_edit(self, tokenizer, prompts):
        return lambda i, M_src, M_edit: M_edit

    def row_prompts(self, prompts, negative_prompt: str, inverted: bool = False) -> tuple[list, list]:
        """(conditional, unconditional) prompts of the batch rows. The edited rows read their prompts and the
        negative prompt. From an inversion the source row reads "" (source_text "prompt": prompts[0]) in both
        halves, as their code's one source row; without one it is the plain generation of prompts[0]
        (unconditional row "")."""
        if not inverted:
            return list(prompts), [""] + [negative_prompt] * (len(prompts) - 1)
        source = "" if self.source_text == "empty" else prompts[0]
        return [source, *prompts[1:]], [source] + [negative_prompt] * (len(prompts) - 1)

    def injection(self, num_steps: int, sites, feature_sites) -> "Injection":
        feature = feature_site(feature_sites)
        attn = frozenset(s.index for s in sites
                         if s.place == "up" and not s.is_cross and s.index >= feature.attn_index)
        return Injection(int(num_steps * self.feature_steps), int(num_steps * self.attention_steps),
                         feature.index, attn)


def feature_site(feature_sites):
    """The decoder ResBlock PnP injects: the second at the level downsampled 4x (the deepest if fewer)."""
    up = [s for s in feature_sites if s.place == "up"]
    if not up:
        raise ValueError("PlugAndPlay needs the UNet's ResBlock sites: build the Controller with the UNet's "
                         "sites (sd.unet.sites carries them) or feature_sites=sd.unet.feature_sites")
    level = min(FEATURE_LEVEL, max(s.level for s in up))
    return next(s for s in up if s.level == level and s.block == FEATURE_BLOCK)


def from_source(x: torch.Tensor, B: int) -> torch.Tensor:
    """Every row takes the first row of its group of B rows (each guidance half: its source row)."""
    groups = x.reshape(-1, B, *x.shape[1:])
    return groups[:, :1].expand_as(groups).reshape(x.shape)


@dataclass(frozen=True)
class Injection:
    """A resolved PlugAndPlay: the steps (schedule rows) below `feature_steps` / `attention_steps` inject,
    at the ResBlock `feature_index` and the self-attention sites `attention_sites`. Calls see rows in
    groups of B (the prompts), the first of each group the source."""
    feature_steps: int
    attention_steps: int
    feature_index: int
    attention_sites: frozenset

    def qk(self, B: int, i: int, site: Site, q, k):
        """(q, k) with every row's the source's where step i injects at this site, else None."""
        if i >= self.attention_steps or site.index not in self.attention_sites:
            return None
        return from_source(q, B), from_source(k, B)

    def attention(self, B: int, i: int, site: Site, q, k, v):
        qk = self.qk(B, i, site, q, k)
        return None if qk is None else attention.attend(*qk, v)

    def feature(self, B: int, i: int, site, h):
        if i >= self.feature_steps or site.index != self.feature_index:
            return None
        return from_source(h, B)
