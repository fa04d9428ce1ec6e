"""The one place attention is defined.

`attention_probs(q, k)` is the definition of a map, `attend(q, k, v)` = attention_probs(q, k) @ v the
attention output: every attention call of the UNet, on every path (plain generation, the edit's map
and value-side paths, the inversions, the low-memory halves), computes through `attend`. The fused
kernel (`F.scaled_dot_product_attention`) is its fast form, used only while it equals the current
`attention_probs`: checked once per definition on small random probes (see `fused_matches`). A
researcher who changes `attention_probs` (a temperature, a clamp, a sparsity pattern) changes every
picture; the explicit form then runs everywhere, with one warning.

Every attention layer of the UNet knows its `Site`: where it sits (down / mid / up), its
resolution level, its position in the call order of one UNet forward, whether it is self- or
cross-attention, its number of heads and the latent size it runs at. A caller steers it with
`attn_override`, an argument (not a hook) passed down from `unet(x, t, context, attn_override=...)`:

    attn_override(site, q, k, v) -> out or None        q: (B, heads, N, d), k, v: (B, heads, K, d)

It returns the attention output (B, heads, N, d), usually `M @ v` with `M` formed by
`attention_probs(q, k)` and then edited, or None to let this layer run `attend(q, k, v)`.
"""
from __future__ import annotations

import inspect
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass(frozen=True)
class Site:
    """Where one attention call happens. `index` is its position in one UNet forward (SD v1: 0..31)."""
    place: str     # "down", "mid" or "up"
    level: int     # resolution level: the latent is downsampled by 2**level here
    index: int     # call order within one UNet forward, self before cross in each transformer block
    is_cross: bool
    h: int = 0     # latent height and width at this layer (filled in at run time)
    w: int = 0
    heads: int = 0  # attention heads of the layer (0: not known)
    block: int = -1  # its transformer block's position in call order (SD v1: 0-5 down, 6 mid, 7-15 up; -1: not known)

    @property
    def pixels(self) -> int:
        return self.h * self.w

    @property
    def key(self) -> str:
        """The reference's store key, e.g. "down_cross"."""
        return f"{self.place}_{'cross' if self.is_cross else 'self'}"

    def at(self, h: int, w: int) -> "Site":
        """This site at a latent of h x w at this layer."""
        return Site(self.place, self.level, self.index, self.is_cross, h, w, self.heads, self.block)


REFERENCE_SIDE = 64  # SD v1's default latent side (512 px / 8): the side the reference's pixel numbers are for


def relative_side(side: int, default_side: int | None) -> int:
    """A latent side the reference gives for SD v1 at 512 px (64 latents a side), for a model whose default
    latent side is `default_side`: scaled with it where the model's default is larger (SDXL at 1024, 128
    latents: x2), the reference's own where it is not (SD v1 at every picture size, LDM-400M at 256 px
    and the small test models keep the reference's layers). None: SD v1's."""
    return max(side, side * (default_side or REFERENCE_SIDE) // REFERENCE_SIDE)


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """M = softmax(q k^T / sqrt(d) + mask): (B, heads, N, K). The explicit map the paper edits; mask (optional)
    is an additive pre-softmax term broadcastable to (B, heads, N, K) (a large negative number shuts a key).

    q k^T and the softmax run in fp32 whatever the model's dtype (in fp16 the logits overflow, and
    a half softmax rounds small weights to 0); M comes back in q's dtype, to multiply v. For an
    fp32 model the casts are no-ops and the result is bit-identical."""
    sim = torch.einsum("bhnd,bhkd->bhnk", q.float(), k.float()) * q.shape[-1] ** -0.5
    if mask is not None:
        sim = sim + mask.float()
    return sim.softmax(dim=-1).to(q.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention output attention_probs(q, k, mask) @ v: (B, heads, N, d). The fused kernel where it equals
    the current definition (checked once per definition), else the explicit form. mask: see attention_probs."""
    if fused_matches():  # contiguous: strided views send the CPU kernel to its N x N fallback (same numbers)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
    if mask is None:  # a researcher's own definition need not take a mask until an edit passes one
        return _module.attention_probs(q, k) @ v
    return _module.attention_probs(q, k, mask) @ v


_module = sys.modules[__name__]  # the definition is looked up here at call time: an edited or patched one counts
_FUSED: dict = {}                # (attention_probs, its __code__) -> whether the fused kernel equals it
PROBE_SHAPES = ((2, 3, 16, 77, 8), (1, 2, 24, 24, 16))  # (B, heads, N, K, d): cross-like and self-like probes


def fused_matches() -> bool:
    """Whether F.scaled_dot_product_attention equals attention_probs(q, k) @ v for the current
    `models.attention.attention_probs`. Checked once per definition (keyed by the function and its code),
    on random fp32 probes of cross- and self-attention shapes; a definition that differs gets one warning."""
    fn = _module.attention_probs
    key = (fn, fn.__code__)
    verdict = _FUSED.get(key)
    if verdict is None:
        verdict = _FUSED[key] = _check_fused(fn)
    return verdict


def _check_fused(fn) -> bool:
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for b, h, n, kk, d in PROBE_SHAPES:
        q, k, v = (torch.randn(b, h, m, d, generator=g, dtype=torch.float32, device="cpu") * s
                   for m, s in ((n, 2.0), (kk, 2.0), (kk, 1.0)))
        with torch.no_grad(), torch.autocast("cpu", enabled=False):   # the definition itself, in fp32
            diff = (fn(q, k) @ v - F.scaled_dot_product_attention(q, k, v)).abs().max()
            if "mask" in inspect.signature(fn).parameters:            # and with an additive mask
                mask = torch.randn(1, 1, n, kk, generator=g) * 3
                diff = torch.maximum(diff, (fn(q, k, mask) @ v - F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask)).abs().max())
        worst = max(worst, float(diff.nan_to_num(float("inf"))))
    if worst <= 1e-5:
        return True
    warnings.warn(f"models.attention.attention_probs no longer matches the fused kernel "
                  f"F.scaled_dot_product_attention (max difference {worst:.2g} on random probes): every UNet "
                  f"attention call runs the explicit form attention_probs(q, k) @ v", stacklevel=4)
    return False


class CrossAttention(nn.Module):
    """Multi-head attention with separate to_q/to_k/to_v (no bias) and to_out = [Linear, Dropout]."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        self.site: Site | None = None  # set by the UNet once its layers are built

    def forward(self, x, context=None, attn_override=None, hw=None):
        context = x if context is None else context
        q, k, v = (rearrange(f(t), "b n (h d) -> b h n d", h=self.heads)
                   for f, t in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        out = None
        if attn_override is not None:
            out = attn_override(self.site if hw is None else self.site.at(*hw), q, k, v)
        if out is None:
            out = attend(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))
