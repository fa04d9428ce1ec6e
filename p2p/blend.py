"""LocalBlend: keep the latents outside the edited words' attention mask (paper section 3.2, "local editing").

After each step, the cross-attention maps of the blend words (summed over the steps so far, at
the deepest down/up attention level unless `level` says otherwise: 16x16 for SD v1 at 512 px) are
max-pooled 3x3, resized to the latent, divided by their maximum and thresholded; the mask of the
source word OR the edited word selects where the edited latents are kept; elsewhere they are the
source's.

One class covers the reference variants: the stable notebook's (threshold 0.3, from the first
step), the null-text notebook's (`start_blend`, `th` pair, `substruct_words`) and the LDM
notebook's. The reference's stable version breaks for more than two prompts; here every edited
prompt is blended with the source on its own mask.

The LDM notebook (LDM-400M at 256 px) reads `down_cross[:2] + up_cross[3:6]` of a store that keeps
maps of at most 16x16 pixels: its five 16x16 maps, level 1 of a 32x32 latent (`level=1`; None
reads the deepest level, 8x8 there). It computes the max-pooled map and then resizes the unpooled
one, discarding the pooling: `pool=False` does the same.
"""
from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .align import word_token_indices
from .store import read_sites


@dataclass(frozen=True)
class LocalBlend:
    """words[i]: a word or a tuple of words of prompt i (one entry per prompt, source first).

    threshold: mask threshold on the max-normalised, pooled map (th[0] when th is given).
    start_blend: fraction of the steps before blending starts (null-text notebook: 0.2).
    substruct_words: words whose (unpooled, th[1]-thresholded) mask is removed from the blend mask.
    pool: False resizes the map without the 3x3 max-pool, as the LDM notebook does (see the module).
    level: resolution level of the down/up cross-attention maps the mask is made from (the latent is
    downsampled by 2**level there); None: the deepest, as the reference (level 2, 16x16, for SD v1
    at 512 px). A model whose deepest maps are coarse for its picture (the miniature's are 8x8 for
    64 px) gets a mask as fine, relative to the picture, as SD's from a shallower level.
    end_blend: fraction of the steps after which blending stops (steps [int(T start_blend), int(T end_blend))
    blend); None: to the last step on a UNet, 0.5 on an MM-DiT model (the official MM-DiT default).
    blocks: MM-DiT models only: the joint blocks whose maps make the mask (indices in the official counting,
    models.joint.JointSite.index; None: all); a UNet's maps are chosen by `level` (p2p.joint_control).
    """
    words: tuple
    threshold: float = 0.3
    start_blend: float = 0.0
    substruct_words: tuple | None = None
    th: tuple | None = None
    level: int | None = None
    pool: bool = True  # max-pool the map 3x3 before resizing it; False: the LDM notebook's unpooled map
    end_blend: float | None = None
    blocks: tuple | None = None

    def __post_init__(self):
        # the map is max-normalised to [0, 1]: a threshold outside it (or nan) gives an empty or a full
        # mask, i.e. an "edit" equal to the source or unblended, without a word
        for name, value in (("threshold", self.threshold), ("start_blend", self.start_blend),
                            *((("end_blend", self.end_blend),) if self.end_blend is not None else ()),
                            *((f"th[{i}]", t) for i, t in enumerate(self.th or ()))):
            if not fraction(value):
                raise ValueError(f"LocalBlend {name} must be a finite number from 0 to 1, got {value!r}")
        if self.th is not None and len(self.th) != 2:
            raise ValueError(f"LocalBlend th must be [mask threshold, substruct threshold], got {self.th!r}")
        if self.end_blend is not None and self.end_blend < self.start_blend:
            raise ValueError(f"LocalBlend end_blend={self.end_blend} is before start_blend={self.start_blend}")

    def thresholds(self) -> tuple[float, float]:
        return tuple(self.th) if self.th is not None else (self.threshold, self.threshold)

    def build(self, tokenizer, prompts, num_steps: int, sites) -> "Blender":
        if self.blocks is not None:
            raise ValueError(f"LocalBlend blocks={self.blocks!r} names joint blocks of an MM-DiT model (SD3, Flux); "
                             f"a UNet's maps are chosen by level= (leave blocks out)")
        alpha = word_alpha(tokenizer, prompts, self.words, "LocalBlend words")
        sub = (word_alpha(tokenizer, prompts, self.substruct_words, "LocalBlend substruct_words")
               if self.substruct_words is not None else None)
        try:
            layers = frozenset(s.index for s in read_sites(sites, self.level))
        except ValueError as err:
            raise ValueError(f"LocalBlend {err}") from None
        end = None if self.end_blend is None else int(self.end_blend * num_steps)
        return Blender(alpha, sub, layers, int(self.start_blend * num_steps), *self.thresholds(), self.pool, end)


def fraction(value) -> bool:
    """A finite number from 0 to 1 (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


def for_model(blend: LocalBlend | None, sd) -> LocalBlend | None:
    """`blend` with the model's recommended level (`sd.blend_level`, a named checkpoint's) where it gives none:
    the one rule for which maps a mask, and the pictures of it, are made from."""
    if blend is None or blend.level is not None:
        return blend
    return dataclasses.replace(blend, level=model_level(sd))


def model_level(sd) -> int | None:
    """The level a model's masks and attention pictures read by default (None: the deepest)."""
    return getattr(sd, "blend_level", None)


def word_alpha(tokenizer, prompts, words, what: str) -> torch.Tensor:
    """(B, K) with 1 at the token columns of words[i] in prompts[i]."""
    if isinstance(words, str) or len(words) != len(prompts):
        raise ValueError(f"{what} must give one word (or tuple of words) per prompt, source first: "
                         f"{len(prompts)} prompts, got {words!r}")
    alpha = torch.zeros(len(prompts), tokenizer.length)
    for i, (prompt, ws) in enumerate(zip(prompts, words)):
        for w in ((ws,) if isinstance(ws, (str, int)) else ws):
            alpha[i, word_token_indices(tokenizer, prompt, w)] = 1
    return alpha


@dataclass(frozen=True)
class Blender:
    alpha: torch.Tensor          # (B, K) blend words
    substruct: torch.Tensor | None
    layers: frozenset            # site indices of the maps the mask is made from
    start: int                   # first step index that blends
    th_pool: float
    th_sub: float
    pool: bool = True            # max-pool the blend words' map (the substruct map is never pooled)
    end: int | None = None       # first step index that no longer blends (None: none)

    def mask(self, maps: torch.Tensor, alpha: torch.Tensor, size, pool: bool, th: float) -> torch.Tensor:
        """maps (B, h, w, K) summed over layers -> bool mask (B, 1, *size), OR-ed with the source's."""
        m = (maps * alpha.to(maps)[:, None, None, :]).sum(-1)[:, None]  # (B, 1, h, w)
        if pool:
            m = F.max_pool2d(m, 3, stride=1, padding=1)
        m = F.interpolate(m, size=size)
        m = m / m.amax(dim=(2, 3), keepdim=True)
        m = m > th
        return m[:1] | m

    def mask_for(self, store, size) -> torch.Tensor:
        """The blend mask from the maps stored so far, bool (B, 1, *size); row 0 is the source's."""
        # fp32 whatever the model's dtype: the max-normalised threshold must not see half rounding
        maps = store.layer_mean([store.sites[i] for i in sorted(self.layers)], average=False).float()  # (B, h, w, K)
        mask = self.mask(maps, self.alpha, size, self.pool, self.th_pool)
        if self.substruct is not None:
            mask = mask & ~self.mask(maps, self.substruct, size, False, self.th_sub)
        return mask

    def __call__(self, step: int, x: torch.Tensor, store) -> torch.Tensor:
        if step < self.start or (self.end is not None and step >= self.end):
            return x
        mask = self.mask_for(store, x.shape[2:]).to(x.dtype)[1:]
        return torch.cat([x[:1], x[:1] + mask * (x[1:] - x[:1])])
