"""MasaCtrl's mutual self-attention (Cao et al. 2023), as a spec of plain functions.

From UNet call `start_step` and transformer block `start_layer` on, each guidance half's self-attention
attends with every row's queries to that half's SOURCE keys and values:

    out_b = softmax(q_b k_src^T / sqrt(d)) v_src        (b = source and targets of the half)

so the source's own output is plain self-attention and the targets take the source's content where
their queries ask for it. Cross-attention is left to the map edit it composes with (`cross`), if any.

The mask-guided variant (`mask_words`, MasaCtrl's MutualSelfAttentionControlMaskAuto) reads the
cross-attention maps of the 16x16 layers (16 scaled with the model's default latent side, as the
reference's other pixel numbers: `models.attention.relative_side`) of the same UNet call, earlier blocks
only: head- then layer-averaged, the word's token columns summed, min-max normalised per row, nearest-
resized to the block's side and thresholded (>= mask_threshold). The target attends to the source's
foreground keys for its foreground queries and to its background keys for the others:

    out = softmax(s + M_fg) v_src * m_tgt + softmax(s + M_bg) v_src * (1 - m_tgt)

with M_fg = +1 on the source's foreground keys and the dtype's min (float32's) elsewhere, M_bg = 0 / min (their code's
additive masks: the +1 changes nothing but rounding; min, not -inf: a row with every key shut is a
uniform average). The masks come from the conditional rows and serve both guidance halves (in the
low-memory mode, whose halves are two UNet calls, each half's masks come from its own rows). A block
before the first 16x16 map of its call gets the unmasked mutual attention. docs/masactrl.md maps the
knobs onto their code and lists the quirks reproduced.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

from models.attention import attend, relative_side

from .align import word_token_indices
from .control import AttentionCall, AttentionRule, Edit, Spec

MASK_SIDE = 16  # MaskAuto's hard-coded 16x16 maps (SD v1 at 512 px: level 2)


@dataclass(frozen=True)
class MutualSelfAttention(Spec):
    """MasaCtrl. start_step: the first UNet call (0-based) with mutual self-attention; start_layer: the first
    transformer block (in call order; SD v1: 0-5 down, 6 mid, 7-15 up; SDXL base: 70 blocks). mask_words:
    (source word, target word) for the mask-guided variant, mask_threshold its threshold; mask_side: the side
    of the maps it reads (None: 16, scaled with the model's default latent side). cross: a Prompt-to-Prompt
    spec (Replace / Refine / Reweight) whose cross-attention edit runs in the same pass (its self-attention
    injection does not: the self-attention is MasaCtrl's)."""
    start_step: int = 4
    start_layer: int = 10
    mask_words: Union[tuple, None] = None
    mask_threshold: float = 0.1
    mask_side: Union[int, None] = None
    cross: Union[Edit, None] = None

    def map_edit(self):
        """`cross` with its self-attention injection switched off (an empty window): its cross-attention edit."""
        return None if self.cross is None else dataclasses.replace(self.cross, self_replace_steps=(0.0, 0.0))

    def attention(self, tokenizer, prompts) -> AttentionRule:
        if not (isinstance(self.start_step, int) and self.start_step >= 0 and isinstance(self.start_layer, int)
                and self.start_layer >= 0):
            raise ValueError(f"MutualSelfAttention: start_step and start_layer must be integers >= 0, got "
                             f"{self.start_step!r} and {self.start_layer!r}")
        if self.mask_words is None:
            return AttentionRule(self.attend_fn(None), check=self.check)
        if len(self.mask_words) != 2:
            raise ValueError(f"mask_words must be (source word, target word), got {self.mask_words!r}")
        if not 0 <= self.mask_threshold <= 1:
            raise ValueError(f"mask_threshold must be in [0, 1] (the maps are min-max normalised), got "
                             f"{self.mask_threshold!r}")
        src, tgt = self.mask_words
        columns = [word_token_indices(tokenizer, prompts[0], src)]
        columns += [word_token_indices(tokenizer, p, tgt) for p in prompts[1:]]
        side = self.mask_side
        return AttentionRule(self.attend_fn(columns), keeps=lambda call: call.site.pixels == _side(call, side) ** 2,
                             check=self.check)

    def check(self, sites) -> None:
        """start_layer within the model's transformer blocks (SD v1: 16; SDXL base: 70)."""
        blocks = len({s.block for s in sites})
        if self.start_layer >= blocks:
            raise ValueError(f"start_layer {self.start_layer} is past the model's {blocks} transformer blocks "
                             f"(0..{blocks - 1} in call order): MasaCtrl would edit nothing; pick a smaller one")

    def attend_fn(self, columns):
        """f(call, q, k, v): the mutual (and, with token columns, masked) self-attention of the edited blocks."""
        def mutual(call: AttentionCall, q, k, v):
            if call.site.is_cross or call.step < self.start_step or call.site.block < self.start_layer:
                return None
            if call.site.block < 0:
                raise ValueError("MutualSelfAttention needs the UNet's transformer-block index (Site.block)")
            if columns is None or not call.maps:
                return mutual_attention(q, k, v, call.prompts)
            return masked_mutual_attention(call, q, k, v, *masks(call, columns, self.mask_threshold))
        return mutual


def _side(call: AttentionCall, side):
    return side if side is not None else relative_side(MASK_SIDE, call.default_side)


def mutual_attention(q, k, v, prompts: int):
    """Every row of each guidance half attends to that half's source keys and values, as one fused call per
    half: the half's B query sets side by side (B N queries) against the source's N keys. q, k, v:
    (halves B, heads, N, d)."""
    n = q.shape[0] // prompts
    H, N, d = q.shape[1:]
    qh = q.view(n, prompts, H, N, d).transpose(1, 2).reshape(n, H, prompts * N, d)
    src = slice(0, None, prompts)                      # row 0 of each half
    out = attend(qh, k[src], v[src])                   # (halves, heads, B N, d)
    return out.view(n, H, prompts, N, d).transpose(1, 2).reshape(q.shape)


def masks(call: AttentionCall, columns, threshold: float):
    """(source key mask (N,), target query masks (B-1, N)), binary, at this block's side, from the kept maps of
    the conditional rows: mean over layers, the word's columns summed, min-max normalised, nearest-resized."""
    cond = call.rows("cond" if "cond" in call.halves else call.halves[0])  # low memory: each half's own call
    maps = torch.stack([m[cond].reshape(call.prompts, s.h, s.w, -1) for s, m in call.maps]).mean(0)
    words = torch.stack([maps[b, ..., columns[b]].sum(-1) for b in range(call.prompts)])   # (B, h, w)
    lo = words.flatten(1).min(1).values[:, None, None]
    hi = words.flatten(1).max(1).values[:, None, None]
    words = (words - lo) / (hi - lo)
    h, w = call.site.h, call.site.w
    sized = F.interpolate(words[:, None], (h, w)).flatten(1)                                 # nearest
    binary = (sized >= threshold).to(torch.float32)
    return binary[0], binary[1:]


def masked_mutual_attention(call: AttentionCall, q, k, v, key_mask, query_masks):
    """The mask-guided mutual attention: the sources plain, each target's foreground queries on the source's
    foreground keys and its background queries on the background keys (see the module)."""
    B, low = call.prompts, torch.finfo(q.dtype).min          # their sim's dtype's min: never -inf (a NaN row)
    fg = torch.where(key_mask == 1, 1.0, low).to(q.device)[None, None, None]
    bg = torch.where(key_mask == 0, 0.0, low).to(q.device)[None, None, None]
    out = []
    for half in call.halves:
        rows = call.rows(half)
        qh, kh, vh = q[rows], k[rows], v[rows]
        ks, vs = kh[:1].expand(B - 1, -1, -1, -1), vh[:1].expand(B - 1, -1, -1, -1)
        m = query_masks.to(q.device, q.dtype)[:, None, :, None]                                  # (B-1, 1, N, 1)
        tgt = attend(qh[1:], ks, vs, fg) * m + attend(qh[1:], ks, vs, bg) * (1 - m)
        out += [attend(qh[:1], kh[:1], vh[:1]), tgt]
    return torch.cat(out)
