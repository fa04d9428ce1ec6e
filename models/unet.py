"""The Stable Diffusion UNet (CompVis / SGM `openaimodel.UNetModel`), with the checkpoint's own module names.

One module for SD 1, SD 2 and SDXL: they differ by `UNetConfig` alone (head width, linear projections,
which levels attend, transformer depth per level, SDXL's vector conditioning `label_emb`).

`unet.input_blocks[1][1].proj_in` is `model.diffusion_model.input_blocks.1.1.proj_in` in the file,
so loading is a strict `load_state_dict` after the prefix is stripped. Dropout sits at the indices
where the checkpoint has no tensors (`out_layers.2`, `ff.net.1`, `to_out.1`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import CrossAttention, Site
from .config import UNetConfig


@dataclass(frozen=True)
class FeatureSite:
    """Where one ResBlock runs. `index` is its position among the ResBlocks of one UNet forward (SD v1:
    0..21), `block` its position among its level's ResBlocks of that part (the decoder has
    num_res_blocks + 1 a level), `attn_index` the number of attention calls made before it (so the
    attention sites from this block on have Site.index >= attn_index)."""
    place: str     # "down", "mid" or "up"
    level: int     # resolution level: the latent is downsampled by 2**level here
    index: int
    block: int
    attn_index: int
    h: int = 0     # latent height and width at this block (filled in at run time)
    w: int = 0

    def at(self, h: int, w: int) -> "FeatureSite":
        return FeatureSite(self.place, self.level, self.index, self.block, self.attn_index, h, w)


class Sites(list):
    """The attention Sites of a UNet in call order, with `features`: its ResBlocks' FeatureSites (a caller
    handed the sites has both)."""

    def __init__(self, sites, features=()):
        super().__init__(sites)
        self.features = list(features)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back (CompVis `GroupNorm32`), eps 1e-5. Its weight and
    bias are upcast too: in an fp16 / bf16 model they are half (CompVis kept them fp32)."""

    def forward(self, x):
        w, b = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type(x.dtype)


class Conv2d(nn.Conv2d):
    """nn.Conv2d, run in fp32 for an fp16 input on the CPU and cast back: PyTorch's CPU fp16
    convolution is its slow reference loop (~100x the fp32 time), so only this op is upcast there."""

    def forward(self, x):
        if x.dtype != torch.float16 or x.device.type != "cpu":
            return super().forward(x)
        bias = None if self.bias is None else self.bias.float()
        return self._conv_forward(x.float(), self.weight.float(), bias).half()


def normalization(ch: int, groups: int = 32) -> nn.GroupNorm:
    return GroupNorm32(groups, ch, eps=1e-5)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cosine first (CompVis `util.timestep_embedding`; not `model.py`'s sin-first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, ch: int, emb_ch: int, out_ch: int, groups: int = 32):
        super().__init__()
        self.in_layers = nn.Sequential(normalization(ch, groups), nn.SiLU(), Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(normalization(out_ch, groups), nn.SiLU(), nn.Dropout(0.0),
                                        Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out_ch else Conv2d(ch, out_ch, 1)
        self.site: FeatureSite | None = None  # set by the UNet once its layers are built

    def forward(self, x, emb, feature_override=None):
        """skip(x) + h, h the residual branch; feature_override(site, h) -> h' or None replaces h."""
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        h = self.out_layers(h)
        if feature_override is not None:
            new = feature_override(self.site.at(*h.shape[-2:]), h)
            h = h if new is None else new
        return self.skip_connection(x) + h


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)         # self-attention
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)  # cross-attention on the text
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context, attn_override=None, hw=None):
        x = x + self.attn1(self.norm1(x), None, attn_override, hw)
        x = x + self.attn2(self.norm2(x), context, attn_override, hw)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, ch: int, heads: int, dim_head: int, depth: int, context_dim: int, linear: bool,
                 groups: int = 32):
        super().__init__()
        inner = heads * dim_head
        self.linear = linear
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, inner) if linear else Conv2d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(inner, ch) if linear else Conv2d(inner, ch, 1)

    def forward(self, x, context, attn_override=None):
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)
        y = rearrange(y, "b c h w -> b (h w) c")  # (B, HW, C)
        if self.linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context, attn_override, (h, w))
        if self.linear:
            y = self.proj_out(y)
        y = rearrange(y, "b (h w) c -> b c h w", h=h, w=w)
        if not self.linear:
            y = self.proj_out(y)
        return x + y


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = Conv2d(ch, ch, 3, stride=2, padding=1)  # symmetric padding in the UNet (not the VAE)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context, attn_override=None, feature_override=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, feature_override)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, attn_override)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_ch, groups = mc * 4, cfg.norm_groups

        def transformer(ch, level, depth=None):
            return SpatialTransformer(ch, *cfg.heads(ch), cfg.depth(level) if depth is None else depth,
                                      cfg.context_dim, cfg.use_linear_in_transformer, groups)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.adm_in_channels:  # SDXL: the vector y joins the timestep embedding (SGM's "sequential" label_emb)
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)))

        # Input blocks: every output is kept as a skip for the output blocks.
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_ch, mult * mc, groups)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2

        last = len(cfg.channel_mult) - 1  # the middle block attends at the last level's depth (distilled: one resnet)
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_ch, ch, groups), transformer(ch, last),
                                                    ResBlock(ch, emb_ch, ch, groups)) if cfg.middle == "attention" else \
            TimestepEmbedSequential(ResBlock(ch, emb_ch, ch, groups))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb_ch, mc * mult, groups)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:  # (a distilled block of depth 0 keeps its norm and projections)
                    layers.append(transformer(ch, level, cfg.output_depth(len(self.output_blocks), level)))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch, groups), nn.SiLU(), Conv2d(mc, cfg.out_channels, 3, padding=1))
        sites, self.feature_sites = self._assign_sites()
        self.sites = Sites(sites, self.feature_sites)

    def _assign_sites(self) -> tuple[list[Site], list[FeatureSite]]:
        """Give every attention module its Site and every ResBlock its FeatureSite, in the order one
        forward pass calls them."""
        sites, features = [], []
        parts = [("down", self.input_blocks), ("mid", [self.middle_block]), ("up", self.output_blocks)]
        n_levels = len(self.cfg.channel_mult)
        for place, blocks in parts:
            level = 0 if place == "down" else n_levels - 1
            in_level = 0
            for block in blocks:
                for layer in block:
                    if isinstance(layer, Downsample):
                        level, in_level = level + 1, 0
                    if isinstance(layer, ResBlock):
                        layer.site = FeatureSite(place, level, len(features), in_level, len(sites))
                        features.append(layer.site)
                        in_level += 1
                    if isinstance(layer, SpatialTransformer):
                        for tb in layer.transformer_blocks:
                            block = len({s.block for s in sites})  # transformer blocks so far, in call order
                            for attn, is_cross in ((tb.attn1, False), (tb.attn2, True)):
                                attn.site = Site(place, level, len(sites), is_cross, heads=attn.heads, block=block)
                                sites.append(attn.site)
                    if isinstance(layer, Upsample):
                        level, in_level = level - 1, 0
        return sites, features

    def forward(self, x, t, context, attn_override=None, y=None, feature_override=None):
        """eps (v for a v-model) = unet(x (B, 4, h, w), t (int, () or (B,)), context (B, 77, d)); h, w multiples of
        cfg.downsample. y (B, cfg.adm_in_channels): the vector conditioning of an SDXL-style UNet
        (models.sdxl.vector_conditioning builds it), required there and refused elsewhere.
        attn_override(site, q, k, v) steers every attention call (models/attention.py);
        feature_override(feature_site, h) -> h' or None every ResBlock's residual branch h (B, C, h, w),
        the block's output being skip(x) + h'."""
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        emb = self._add_label_embedding(emb, y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context, attn_override, feature_override)
            hs.append(h)
        h = self.middle_block(h, emb, context, attn_override, feature_override)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context, attn_override, feature_override)
        return self.out(h)

    def _add_label_embedding(self, emb, y):
        """emb + label_emb(y) (SGM's ADM conditioning); emb itself for a UNet without it."""
        n = self.cfg.adm_in_channels
        if not n:
            if y is not None:
                raise ValueError("y was given, but this UNet has no vector conditioning (adm_in_channels = 0); "
                                 "pass y=None (only SDXL-style UNets take pooled text and size ids)")
            return emb
        if y is None or y.shape != (emb.shape[0], n):
            got = "none" if y is None else tuple(y.shape)
            raise ValueError(f"this UNet needs y of shape ({emb.shape[0]}, {n}) (pooled text and size ids, "
                             f"models.sdxl.vector_conditioning builds it), got {got}")
        return emb + self.label_emb(y.to(emb.dtype))
