"""AutoencoderKL (CompVis `ldm.modules.diffusionmodules.model`), with the checkpoint's module names.

Two details that drift silently when missed: every GroupNorm here has eps 1e-6, and the encoder's
downsample pads (0, 1, 0, 1) then convolves with stride 2 and no padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import VAEConfig
from .unet import Upsample  # the same layer in both: nearest x2, then a 3x3 conv named `conv`


def Normalize(ch: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int = 32):
        super().__init__()
        self.norm1 = Normalize(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch, groups)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels; q, k, v, proj_out are 1x1 convs."""

    def __init__(self, ch: int, groups: int = 32):
        super().__init__()
        self.norm = Normalize(ch, groups)
        self.q, self.k, self.v = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        # contiguous: on the CPU, strided views send the fused kernel to its N x N fallback (16 GiB at a 256 latent)
        q, k, v = (rearrange(f(y), "b c h w -> b 1 (h w) c").contiguous() for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)  # scale c^-0.5, as CompVis
        return x + self.proj_out(rearrange(y, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: right and bottom only


class Mid(nn.Module):
    def __init__(self, ch: int, groups: int = 32):
        super().__init__()
        self.block_1, self.attn_1 = ResnetBlock(ch, ch, groups), AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution of the encoder (`down.i`) or decoder (`up.i`): blocks, their attention, a resampler."""

    def __init__(self, chans: list[tuple[int, int]], attn: bool, resample: nn.Module | None, name: str,
                 groups: int = 32):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(i, o, groups) for i, o in chans])
        self.attn = nn.ModuleList([AttnBlock(o, groups) for _, o in chans] if attn else [])
        if resample is not None:
            setattr(self, name, resample)
        self.resample = name if resample is not None else None

    def forward(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        return getattr(self, self.resample)(x) if self.resample else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, n = cfg.ch, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in, res = ch, cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            out = ch * mult
            chans = [(block_in if j == 0 else out, out) for j in range(cfg.num_res_blocks)]
            self.down.append(Level(chans, res in cfg.attn_resolutions,
                                   Downsample(out) if i != n - 1 else None, "downsample", cfg.norm_groups))
            block_in = out
            res = res // 2 if i != n - 1 else res
        self.mid = Mid(block_in, cfg.norm_groups)
        self.norm_out = Normalize(block_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, n = cfg.ch, len(cfg.ch_mult)
        block_in = ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = Mid(block_in, cfg.norm_groups)
        levels = []  # built from the lowest resolution up; `up.i` is indexed like the encoder's `down.i`
        for i in reversed(range(n)):
            out = ch * cfg.ch_mult[i]
            chans = [(block_in if j == 0 else out, out) for j in range(cfg.num_res_blocks + 1)]
            levels.insert(0, Level(chans, res in cfg.attn_resolutions, Upsample(out) if i != 0 else None, "upsample",
                                   cfg.norm_groups))
            block_in = out
            res = res * 2 if i != 0 else res
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1) if cfg.use_quant_conv else nn.Identity()
        self.post_quant_conv = (nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1) if cfg.use_post_quant_conv
                                else nn.Identity())

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of the posterior, logvar clamped to [-30, 20] as CompVis."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))
