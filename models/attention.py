"""The one place attention weights are formed.

Every attention layer of the UNet knows its `Site`: where it sits (down / mid / up), its
resolution level, its position in the call order of one UNet forward, whether it is self- or
cross-attention, and the latent size it runs at. A caller steers it with `attn_override`, an
argument (not a hook) passed down from `unet(x, t, context, attn_override=...)`:

    attn_override(site, q, k, v) -> out or None        q: (B, heads, N, d), k, v: (B, heads, K, d)

It returns the attention output (B, heads, N, d), usually `M @ v` with `M` formed by
`attention_probs(q, k)` and then edited, or None to let this layer run plain fused attention.
`attn_override=None` runs `F.scaled_dot_product_attention` everywhere.
"""
from __future__ import annotations

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

    @property
    def pixels(self) -> int:
        return self.h * self.w

    @property
    def key(self) -> str:
        """The reference's store key, e.g. "down_cross"."""
        return f"{self.place}_{'cross' if self.is_cross else 'self'}"


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """M = softmax(q k^T / sqrt(d)): (B, heads, N, K). The explicit map the paper edits.

    q k^T and the softmax run in fp32 whatever the model's dtype (in fp16 the logits overflow, and
    a half softmax rounds small weights to 0); M comes back in q's dtype, to multiply v. For an
    fp32 model the casts are no-ops and the result is bit-identical."""
    sim = torch.einsum("bhnd,bhkd->bhnk", q.float(), k.float()) * q.shape[-1] ** -0.5
    return sim.softmax(dim=-1).to(q.dtype)


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
            site = self.site if hw is None else Site(self.site.place, self.site.level, self.site.index,
                                                     self.site.is_cross, *hw)
            out = attn_override(site, q, k, v)
        if out is None:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))
