"""OpenCLIP text towers: ViT-H/14 (SD 2.x, `cond_stage_model.model`) and ViT-bigG/14 (SDXL's second
tower, `conditioner.embedders.1.model`), with OpenCLIP's own module names.

The same pre-LN causal transformer as CLIP-L, but exact (erf) GELU, a fused q/k/v projection
(`attn.in_proj_weight`, as nn.MultiheadAttention stores it), a learned `positional_embedding`
parameter and a `text_projection` matrix (width, dim) applied as `x @ text_projection`.
Which hidden state becomes the context differs by model (Stability's FrozenOpenCLIPEmbedder and
FrozenOpenCLIPEmbedder2):
- SD 2.x: the penultimate block's output, through `ln_final`. diffusers folders store the tower
  cut to 23 layers, whose last output is the same thing.
- SDXL: the penultimate block's output without `ln_final`; the pooled vector is the LAST block's
  output through `ln_final`, taken at the end-of-text position (the largest id in the row: the
  tokenizer pads with "!" = 0) and projected by `text_projection`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .clip import BANG, Tokenizer
from .config import OpenCLIPTextConfig, context_layers


# SD 2.x single files: 24 layers, the context is the 23rd block's output through ln_final
VIT_H_14 = OpenCLIPTextConfig(width=1024, layers=24, heads=16, output_layer="penultimate", final_ln=True)
# SDXL: the 31st block's output as it is (2nd half of the 2048 context), and a pooled vector of 1280
VIT_BIGG_14 = OpenCLIPTextConfig(width=1280, layers=32, heads=20, output_layer="penultimate", final_ln=False,
                                 projection_dim=1280)


@functools.lru_cache()
def openclip_tokenizer() -> Tokenizer:
    return Tokenizer(pad=BANG)


class Attention(nn.Module):
    """Causal multi-head self-attention with nn.MultiheadAttention's parameter names (fused in_proj)."""

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3 width): q, k, v in that order
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(cfg.width, cfg.mlp_width), nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact GELU (nn.GELU), not CLIP-L's quick_gelu


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(cfg) for _ in range(cfg.layers)])


class OpenCLIPTextModel(nn.Module):
    """Token ids (N, L) -> context (N, L, width); `encode` also gives the pooled, projected vector."""

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))
        else:
            self.text_projection = None

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context (N, L, width), pooled (N, projection_dim)), pooled None without a projection.

        Blocks past the context's layer run only when the pooled vector needs them."""
        blocks = self.transformer.resblocks
        split = context_layers(len(blocks), self.cfg.output_layer)
        x = self.token_embedding(ids) + self.positional_embedding[:ids.shape[1]]
        for block in blocks[:split]:
            x = block(x)
        context = self.ln_final(x) if self.cfg.final_ln else x
        if self.text_projection is None:
            return context, None
        for block in blocks[split:]:
            x = block(x)
        # end-of-text sits at the row's largest id (49407; padding is "!" = 0): the first such position
        eot = self.ln_final(x)[torch.arange(len(ids), device=ids.device), ids.argmax(dim=-1)]
        return context, eot @ self.text_projection

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encode(ids)[0]
