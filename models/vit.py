"""DINO's Vision Transformer (Caron et al. 2021), with the module names of its released backbone files
(`dino_vitbase8_pretrain.pth`: `cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}`, `norm`).

Pre-LN blocks, LayerNorm eps 1e-6, exact GELU, one fused qkv projection laid out (3, heads, head_dim). The
position embeddings are resized for another grid as DINO's `interpolate_pos_encoding` does: bicubic, with the
scale factor (side + 0.1) / trained side, and left as they are only for a square picture of the trained grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    """DINO ViT-B/8 by default: 12 blocks of width 768, 12 heads, 8 px patches, trained at 224 px (28x28 grid)."""
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    patch_size: int = 8
    grid: int = 28  # the trained side in patches: pos_embed holds grid**2 + 1 rows
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"a ViT's width {self.width} is not a multiple of its {self.heads} heads")


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(rearrange(y, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.width, cfg.mlp_width), nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def keys(self, x):
        """The keys this block's attention forms from its input x: (B, N, width), heads side by side."""
        return self.attn.qkv(self.norm1(x)).chunk(3, dim=-1)[1]


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels):
        return self.proj(pixels).flatten(2).transpose(1, 2)  # (B, HW, width)


class VisionTransformer(nn.Module):
    """Normalised pixels (B, 3, H, W) -> tokens (B, 1 + (H // p) * (W // p), width): the class token first."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid ** 2 + 1, cfg.width))
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """pos_embed for a picture of height x width pixels, as DINO's `interpolate_pos_encoding`: as trained
        only for a square picture of the trained grid (a non-square one of as many patches is resampled too)."""
        rows, cols, side = height // self.cfg.patch_size, width // self.cfg.patch_size, self.cfg.grid
        if rows * cols == side * side and height == width:
            return self.pos_embed
        grid = rearrange(self.pos_embed[:, 1:], "1 (r c) d -> 1 d r c", r=side)
        # DINO adds 0.1 to the target sides so that floor(side * scale) cannot fall one short; the scale, not
        # the size, sets where the bicubic samples, so the +0.1 shifts them slightly
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
        if grid.shape[-2:] != (rows, cols):
            raise ValueError(f"position embeddings resampled to {tuple(grid.shape[-2:])}, not ({rows}, {cols})")
        return torch.cat([self.pos_embed[:, :1], rearrange(grid, "1 d r c -> 1 (r c) d")], dim=1)

    def tokens(self, pixels):
        """The input of the first block: class token and patches, with their position embeddings."""
        patches = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        return x + self.position_embedding(*pixels.shape[-2:])

    def keys(self, pixels, layer: int) -> torch.Tensor:
        """Block `layer`'s attention keys (B, N, width), heads side by side: the later blocks never run."""
        if not -self.cfg.layers <= layer < self.cfg.layers:
            raise ValueError(f"layer {layer}: this ViT has blocks 0..{self.cfg.layers - 1}")
        layer %= self.cfg.layers
        x = self.tokens(pixels)
        for block in self.blocks[:layer]:
            x = block(x)
        return self.blocks[layer].keys(x)

    def forward(self, pixels):
        """Every token after the last block and `norm` (DINO's own forward returns the first, the class token)."""
        x = self.tokens(pixels)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def vit_config(shapes: dict[str, tuple], head_dim: int = 64) -> ViTConfig:
    """The architecture a DINO backbone state dict's shapes give. The head count is not in the shapes: width /
    `head_dim`, 64 for every released DINO ViT (S: 384 / 6, B: 768 / 12)."""
    width = shapes["cls_token"][-1]
    positions = shapes["pos_embed"][1] - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise ValueError(f"pos_embed holds {positions} patch positions, not a square grid")
    layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    return ViTConfig(width=width, layers=layers, heads=max(width // head_dim, 1),
                     mlp_width=shapes["blocks.0.mlp.fc1.weight"][0], patch_size=shapes["patch_embed.proj.weight"][-1],
                     grid=grid)
