"""The MM-DiT of Stable Diffusion 3 / 3.5 (diffusers' SD3Transformer2DModel), with its module names.

The latent (B, 16, h, w) is cut into 2 x 2 patches (a strided conv), plus a 2-D sin-cos position
embedding cropped from the centre of a pos_embed_max_size^2 table; the text context (B, S_txt, 4096:
CLIP-L | CLIP-G padded, then T5) is projected by `context_embedder`. The timestep's sinusoidal
embedding plus the pooled text vector's projection form `temb`, which modulates every block (AdaLN-Zero:
shift, scale and gate from silu(temb)). Each joint block runs one attention over [image | text]
(models.joint.joint_attention, the edit's entry); the last block reads the context only
(`context_pre_only`: its text stream ends there). SD3.5 adds RMS-norm of q and k per head (`qk_norm`)
and, in `dual_attention_layers`, a second image-only self-attention `attn2` (not joint: it is never
edited, though the official MM-DiT Prompt-to-Prompt counts it in its block indices).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attend
from .joint import JointSite, joint_attention
from .unet import timestep_embedding


@dataclass(frozen=True)
class SD3Config:
    """transformer/config.json of a diffusers SD3 / SD3.5 folder (SD3-medium's numbers by default)."""
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 24
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1536
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 192
    dual_attention_layers: tuple = ()  # SD3.5-medium: 0..12
    qk_norm: str | None = None         # SD3.5: "rms_norm"

    def __post_init__(self):
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm {self.qk_norm!r} is not one SD3 / SD3.5 uses (None or 'rms_norm')")
        if self.caption_projection_dim != self.width:
            raise ValueError(f"caption_projection_dim ({self.caption_projection_dim}) must equal the blocks' width "
                             f"num_attention_heads x attention_head_dim ({self.width}), as in every SD3 model")

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, c: dict) -> "SD3Config":
        """From the config.json's keys (defaults for absent ones; diffusers' bookkeeping keys ignored)."""
        kw = {f.name: c[f.name] for f in fields(cls) if f.name in c}
        kw["dual_attention_layers"] = tuple(kw.get("dual_attention_layers") or ())
        out_channels = kw.get("out_channels")
        kw["out_channels"] = out_channels if out_channels is not None else kw.get("in_channels", 16)
        return cls(**kw)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M, dim) [sin | cos] of positions at frequencies 10000^(-2i/dim), in float64 as diffusers."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = torch.outer(pos.reshape(-1).double(), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, size: int, base_size: int) -> torch.Tensor:
    """(size^2, dim) float32 2-D sin-cos table over a size x size grid, row-major: the first half of the
    channels encodes the column, the second the row (diffusers' get_2d_sincos_pos_embed)."""
    coords = torch.arange(size, dtype=torch.float32) / (size / base_size)
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"))  # [column, row] per position
    return torch.cat([sincos_1d(dim // 2, grid[0]), sincos_1d(dim // 2, grid[1])], dim=1).float()


class PatchEmbed(nn.Module):
    """p x p patches by a strided conv, plus the centre crop of the position table (`pos_embed`, saved in files)."""

    def __init__(self, cfg: SD3Config):
        super().__init__()
        self.patch, self.max_size = cfg.patch_size, cfg.pos_embed_max_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        table = sincos_2d(cfg.width, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size)
        self.register_buffer("pos_embed", table.unsqueeze(0))

    def cropped(self, rows: int, cols: int) -> torch.Tensor:
        if rows > self.max_size or cols > self.max_size:
            raise ValueError(f"a latent of {rows} x {cols} patches exceeds the position table's {self.max_size} x "
                             f"{self.max_size} (pos_embed_max_size): give a smaller height / width")
        top, left = (self.max_size - rows) // 2, (self.max_size - cols) // 2
        table = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)
        return table[:, top:top + rows, left:left + cols].reshape(1, rows * cols, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        tokens = self.proj(x).flatten(2).transpose(1, 2).contiguous()
        return (tokens + self.cropped(rows, cols)).to(tokens.dtype)


class MLP(nn.Module):
    """linear_1, silu, linear_2 (diffusers' TimestepEmbedding and PixArtAlphaTextProjection with silu)."""

    def __init__(self, d_in: int, d: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(d_in, d), nn.Linear(d, d)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """temb = MLP(sinusoidal(t), 256 channels, cosine first) + MLP(pooled text)."""

    def __init__(self, width: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder, self.text_embedder = MLP(256, width), MLP(pooled_dim, width)

    def forward(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_embedding(t, 256).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, eps 1e-6: every norm the modulation then scales and shifts."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaNorm(nn.Module):
    """silu(temb) -> n modulation vectors (`linear`): AdaLayerNormZero (6), SD3.5's ...ZeroX (9),
    AdaLayerNormContinuous (2: scale, shift)."""

    def __init__(self, width: int, n: int):
        super().__init__()
        self.linear = nn.Linear(width, n * width)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.linear.out_features // self.linear.in_features, dim=1)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the head dimension, the mean in fp32 (diffusers' RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


def qk_norms(qk_norm: str | None, head_dim: int) -> tuple[nn.Module, nn.Module]:
    return (RMSNorm(head_dim), RMSNorm(head_dim)) if qk_norm else (nn.Identity(), nn.Identity())


class FeedForward(nn.Module):
    """diffusers' FeedForward with gelu (tanh), in its layout: net.0.proj, (net.1 dropout), net.2."""

    def __init__(self, width: int):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(width, 4 * width)
        self.net = nn.ModuleList([proj, nn.Dropout(0.0), nn.Linear(4 * width, width)])

    def forward(self, x):
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


def heads(x: torch.Tensor, n: int) -> torch.Tensor:
    return rearrange(x, "b s (h d) -> b h s d", h=n)


class SelfAttention(nn.Module):
    """SD3.5's image-only `attn2`: to_q, to_k, to_v, qk-norm, to_out.0. Not a joint call: never edited."""

    def __init__(self, cfg: SD3Config):
        super().__init__()
        w, self.heads = cfg.width, cfg.num_attention_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(w, w), nn.Linear(w, w), nn.Linear(w, w)
        self.norm_q, self.norm_k = qk_norms(cfg.qk_norm, cfg.attention_head_dim)
        self.to_out = nn.ModuleList([nn.Linear(w, w)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.norm_q(heads(self.to_q(x), self.heads)), self.norm_k(heads(self.to_k(x), self.heads))
        out = attend(q, k, heads(self.to_v(x), self.heads))
        return self.to_out[0](rearrange(out, "b h s d -> b s (h d)"))


class JointAttention(SelfAttention):
    """The joint attention of a block: image (to_q, ...) and text (add_q_proj, ...) projections, one softmax
    over [image | text] through joint_attention, the outputs split back (to_out.0, to_add_out)."""

    def __init__(self, cfg: SD3Config, context_pre_only: bool):
        super().__init__(cfg)
        w = cfg.width
        self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(w, w), nn.Linear(w, w), nn.Linear(w, w)
        self.norm_added_q, self.norm_added_k = qk_norms(cfg.qk_norm, cfg.attention_head_dim)
        self.to_add_out = None if context_pre_only else nn.Linear(w, w)

    def forward(self, x: torch.Tensor, c: torch.Tensor, site: JointSite, attn_override=None):
        n = self.heads
        q = torch.cat([self.norm_q(heads(self.to_q(x), n)), self.norm_added_q(heads(self.add_q_proj(c), n))], dim=2)
        k = torch.cat([self.norm_k(heads(self.to_k(x), n)), self.norm_added_k(heads(self.add_k_proj(c), n))], dim=2)
        v = torch.cat([heads(self.to_v(x), n), heads(self.add_v_proj(c), n)], dim=2)
        out = rearrange(joint_attention(q, k, v, site, attn_override), "b h s d -> b s (h d)").to(q.dtype)
        img, txt = out[:, site.image], out[:, site.text]
        return self.to_out[0](img), (self.to_add_out(txt) if self.to_add_out is not None else None)


class JointTransformerBlock(nn.Module):
    """One MM-DiT block: AdaLN-Zero on both streams, the joint attention, gated residuals, gelu MLPs; the
    last block (`context_pre_only`) modulates the text with AdaLayerNormContinuous and drops its stream."""

    def __init__(self, cfg: SD3Config, context_pre_only: bool, dual: bool):
        super().__init__()
        w = cfg.width
        self.context_pre_only, self.dual = context_pre_only, dual
        self.norm1 = AdaNorm(w, 9 if dual else 6)
        self.norm1_context = AdaNorm(w, 2 if context_pre_only else 6)
        self.attn = JointAttention(cfg, context_pre_only)
        self.attn2 = SelfAttention(cfg) if dual else None
        self.ff = FeedForward(w)
        self.ff_context = None if context_pre_only else FeedForward(w)

    def forward(self, x, c, temb, site: JointSite, attn_override=None):
        mods = self.norm1(temb)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        normed = layer_norm(x)
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context(temb)
            c_in = modulate(layer_norm(c), c_shift, c_scale)
        else:
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
            c_in = modulate(layer_norm(c), c_shift, c_scale)
        attn, c_attn = self.attn(modulate(normed, shift, scale), c_in, site, attn_override)
        x = x + gate.unsqueeze(1) * attn
        if self.dual:  # SD3.5: image-only self-attention on the same norm, its own shift / scale / gate
            shift2, scale2, gate2 = mods[6:]
            x = x + gate2.unsqueeze(1) * self.attn2(modulate(normed, shift2, scale2))
        x = x + gate_mlp.unsqueeze(1) * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))
        if self.context_pre_only:
            return None, x
        c = c + c_gate.unsqueeze(1) * c_attn
        c = c + c_gate_mlp.unsqueeze(1) * self.ff_context(modulate(layer_norm(c), c_shift_mlp, c_scale_mlp))
        return c, x


class SD3Transformer(nn.Module):
    """forward(x (B, 16, h, w), t (B,) timesteps = sigma * 1000, context (B, S_txt, joint_attention_dim),
    pooled (B, pooled_projection_dim), attn_override) -> velocity (B, 16, h, w)."""

    def __init__(self, cfg: SD3Config):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = TimeTextEmbed(w, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            [JointTransformerBlock(cfg, i == cfg.num_layers - 1, i in cfg.dual_attention_layers)
             for i in range(cfg.num_layers)])
        self.norm_out = AdaNorm(w, 2)
        self.proj_out = nn.Linear(w, cfg.patch_size ** 2 * cfg.out_channels)

    def sites(self, rows: int, cols: int, text_len: int) -> list[JointSite]:
        """One JointSite per block, for an image of rows x cols patches and text_len text tokens. The index
        counts every attention processor in diffusers' order (a dual block's `attn2` follows its `attn`), as
        the official MM-DiT Prompt-to-Prompt numbers blocks."""
        out, index, n_img = [], 0, rows * cols
        for i, block in enumerate(self.transformer_blocks):
            out.append(JointSite(index, f"transformer_blocks.{i}", "joint", slice(0, n_img),
                                 slice(n_img, n_img + text_len), self.cfg.num_attention_heads, (rows, cols)))
            index += 2 if block.dual else 1
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                attn_override=None) -> torch.Tensor:
        p = self.cfg.patch_size
        rows, cols = x.shape[-2] // p, x.shape[-1] // p
        h = self.pos_embed(x)
        temb = self.time_text_embed(t, pooled)
        c = self.context_embedder(context)
        for block, site in zip(self.transformer_blocks, self.sites(rows, cols, c.shape[1])):
            c, h = block(h, c, temb, site, attn_override)
        scale, shift = self.norm_out(temb)
        h = self.proj_out(modulate(layer_norm(h), shift, scale))
        return rearrange(h, "b (r c) (p q o) -> b o (r p) (c q)", r=rows, c=cols, p=p, q=p)

