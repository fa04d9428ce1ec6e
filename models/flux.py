"""The Flux transformer (FLUX.1-dev / schnell): double-stream blocks, then single-stream blocks, with
diffusers' `FluxTransformer2DModel` module names, so a diffusers `transformer/` folder loads key for key.

What it computes, per call:
- The latent arrives packed: 2x2 patches of the 16-channel latent, 64 values per token, row-major over the
  (h/2, w/2) grid (`pack` / `unpack` are FluxPipeline's `_pack_latents` / `_unpack_latents`).
- Conditioning vector: sinusoidal embedding of 1000 t (and of 1000 g, the distilled guidance, in models that
  embed it: FLUX.1-dev) plus the pooled CLIP text, through small MLPs; it drives every AdaLN.
- Rotary position: each token has 3 ids (text: zeros; image: (0, row, col)); each axis rotates its own share
  of the head's channels (`axes_dims_rope`), adjacent channel pairs (re, im).
- Double-stream block: image and text keep their own AdaLN, projections, qk RMS-norm and feed-forwards, and
  attend jointly over [text | image].
- Single-stream block: one stream [text | image]; attention and MLP in parallel from the same AdaLN output,
  concatenated into one output projection.
Every attention goes through `models.joint.joint_attention` with its `JointSite`: q, k after qk-norm and RoPE.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .joint import JointSite, joint_attention
from .unet import timestep_embedding

ROPE_THETA = 10000
TIME_CHANNELS = 256  # sinusoidal width of the time and guidance embeddings


@dataclass(frozen=True)
class FluxConfig:
    """`FluxTransformer2DModel`'s config.json. Defaults: FLUX.1-dev / schnell (schnell: guidance_embeds False)."""
    in_channels: int = 64           # packed: 16 latent channels x 2 x 2
    out_channels: int = 64
    num_layers: int = 19            # double-stream blocks
    num_single_layers: int = 38     # single-stream blocks
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # T5's width
    pooled_projection_dim: int = 768  # CLIP-L's pooled width
    guidance_embeds: bool = True
    axes_dims_rope: tuple = (16, 56, 56)

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, c: dict, where: str = "transformer/config.json") -> "FluxConfig":
        """From a diffusers FluxTransformer2DModel config.json dict. Refuses what this transformer does not run."""
        if c.get("patch_size", 1) != 1:
            raise ValueError(f"{where}: patch_size={c['patch_size']!r}; Flux packs 2x2 latent patches into "
                             "64 channels outside the transformer and runs patch_size 1 only")
        fields = {k: c[k] for k in cls.__dataclass_fields__ if k in c and c[k] is not None}
        fields["axes_dims_rope"] = tuple(fields.get("axes_dims_rope", cls.axes_dims_rope))
        fields.setdefault("out_channels", fields.get("in_channels", cls.in_channels))
        fields.setdefault("guidance_embeds", False)  # diffusers' default: a config without it is schnell-like
        cfg = cls(**fields)
        if sum(cfg.axes_dims_rope) != cfg.attention_head_dim or any(d % 2 for d in cfg.axes_dims_rope):
            raise ValueError(f"{where}: axes_dims_rope={list(cfg.axes_dims_rope)} must be even and sum to "
                             f"attention_head_dim={cfg.attention_head_dim}")
        return cfg


# ------------------------------------------------------------------------------------- packing and ids
def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latent -> (B, h/2 * w/2, 4C) tokens: each 2x2 patch's values, channel-major (FluxPipeline)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent of {h}x{w}: Flux packs 2x2 patches, so both sides must be even "
                         "(image sides multiples of 2 x the VAE's downsampling: 16 for FLUX.1)")
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def position_ids(text_len: int, grid: tuple[int, int]) -> torch.Tensor:
    """(T + rows*cols, 3) ids of [text | image]: text all zeros; image (0, row, col), row-major (FluxPipeline)."""
    rows, cols = grid
    img = torch.zeros(rows, cols, 3)
    img[..., 1] = img[..., 1] + torch.arange(rows)[:, None]
    img[..., 2] = img[..., 2] + torch.arange(cols)[None, :]
    return torch.cat([torch.zeros(text_len, 3), img.reshape(rows * cols, 3)])


def rope(ids: torch.Tensor, axes_dims: tuple, theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (S, head_dim): per axis, angles id * theta^(-2i/d) in float64, each repeated for the
    (re, im) pair it rotates (diffusers' FluxPosEmbed: use_real, repeat_interleave_real)."""
    pos = ids.double()
    cos, sin = [], []
    for i, d in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles = torch.outer(pos[:, i], freqs)
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent channel pair (re, im) of x (B, heads, S, d) by its angle; in fp32, back to x's dtype."""
    re, im = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-im, re], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ------------------------------------------------------------------------------------- embeddings
class MLPEmbedder(nn.Module):
    """linear_1, SiLU, linear_2 (diffusers' TimestepEmbedding and PixArtAlphaTextProjection with silu)."""

    def __init__(self, dim_in: int, width: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, width)
        self.linear_2 = nn.Linear(width, width)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """The conditioning vector: MLP(sin(1000 t)) [+ MLP(sin(1000 g))] + MLP(pooled text)."""

    def __init__(self, width: int, pooled_dim: int, guidance_embeds: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(TIME_CHANNELS, width)
        self.guidance_embedder = MLPEmbedder(TIME_CHANNELS, width) if guidance_embeds else None
        self.text_embedder = MLPEmbedder(pooled_dim, width)

    def forward(self, t: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        """t, guidance: (B,) already scaled by 1000; pooled: (B, P)."""
        emb = self.timestep_embedder(timestep_embedding(t, TIME_CHANNELS).to(pooled.dtype))
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(timestep_embedding(guidance, TIME_CHANNELS).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


class AdaNorm(nn.Module):
    """LayerNorm without affine, modulated by chunks of linear(SiLU(emb)): diffusers' AdaLayerNormZero (6 chunks:
    shift, scale, gate of attention, then of the MLP) and AdaLayerNormZeroSingle (3 chunks)."""

    def __init__(self, width: int, chunks: int):
        super().__init__()
        self.linear = nn.Linear(width, chunks * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.chunks = chunks

    def forward(self, x: torch.Tensor, emb: torch.Tensor):
        """(modulated norm of x, the remaining chunks: gate [, shift_mlp, scale_mlp, gate_mlp]), each (B, width)."""
        shift, scale, *rest = self.linear(F.silu(emb)).chunk(self.chunks, dim=1)
        return modulate(self.norm(x), shift, scale), rest


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaNormOut(nn.Module):
    """The final AdaLN (diffusers' AdaLayerNormContinuous): its linear gives scale first, then shift."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)

    def forward(self, x, emb):
        scale, shift = self.linear(F.silu(emb).to(x.dtype)).chunk(2, dim=1)
        return modulate(self.norm(x), shift, scale)


# ------------------------------------------------------------------------------------- blocks
class GELUProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """net.0.proj, tanh-GELU, net.2 (diffusers' FeedForward "gelu-approximate"; net.1 is its dropout)."""

    def __init__(self, width: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(width, mult * width), nn.Dropout(0.0), nn.Linear(mult * width, width)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class Attention(nn.Module):
    """Flux attention: to_q/k/v with per-head RMS qk-norm; with `added` (double blocks) also the text stream's
    add_q/k/v_proj, norm_added_q/k and output projections to_out.0 (image) / to_add_out (text)."""

    def __init__(self, width: int, heads: int, head_dim: int, added: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(width, width) for _ in range(3))
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
        if added:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(width, width) for _ in range(3))
            self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
            self.to_out = nn.ModuleList([nn.Linear(width, width), nn.Dropout(0.0)])
            self.to_add_out = nn.Linear(width, width)

    def heads_of(self, x: torch.Tensor, proj: nn.Module, norm: nn.Module | None = None) -> torch.Tensor:
        """(B, S, width) -> (B, heads, S, d), RMS-normed per head where `norm` is given."""
        x = proj(x).unflatten(-1, (self.heads, self.head_dim))
        return (x if norm is None else norm(x)).transpose(1, 2)

    def qkv(self, x: torch.Tensor, context: torch.Tensor | None):
        """q, k, v of [context | x] (context: the text stream of a double block, None in single blocks)."""
        q, k, v = (self.heads_of(x, self.to_q, self.norm_q), self.heads_of(x, self.to_k, self.norm_k),
                   self.heads_of(x, self.to_v))
        if context is None:
            return q, k, v
        cq, ck, cv = (self.heads_of(context, self.add_q_proj, self.norm_added_q),
                      self.heads_of(context, self.add_k_proj, self.norm_added_k), self.heads_of(context, self.add_v_proj))
        return torch.cat([cq, q], dim=2), torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)

    def forward(self, x, context, rotary, site: JointSite, attn_override=None):
        """Joint attention of [context | x] with RoPE on q and k: (B, S, width) (S = T + N), heads merged."""
        q, k, v = self.qkv(x, context)
        q, k = apply_rope(q, *rotary), apply_rope(k, *rotary)  # (B, heads, T + N, d)
        out = joint_attention(q, k, v, site, attn_override)
        return out.transpose(1, 2).flatten(2).to(q.dtype)


def clip_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp16 residual streams are clipped to the finite range, as diffusers does after each block."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class DoubleStreamBlock(nn.Module):
    """diffusers' FluxTransformerBlock: image (norm1, ff) and text (norm1_context, ff_context) streams, each with
    its own AdaLN-Zero, joined only in the attention."""

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1, self.norm1_context = AdaNorm(width, 6), AdaNorm(width, 6)
        self.attn = Attention(width, heads, head_dim, added=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(width)
        self.norm2_context = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(width)

    def forward(self, x, context, emb, rotary, site: JointSite, attn_override=None):
        """x: (B, N, width) image, context: (B, T, width) text -> (context, x)."""
        nx, (gate, shift_mlp, scale_mlp, gate_mlp) = self.norm1(x, emb)
        nc, (c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(context, emb)
        out = self.attn(nx, nc, rotary, site, attn_override)
        c_out, x_out = out[:, :context.shape[1]], out[:, context.shape[1]:]
        x = x + gate.unsqueeze(1) * self.attn.to_out[0](x_out.contiguous())
        x = x + gate_mlp.unsqueeze(1) * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))
        context = context + c_gate.unsqueeze(1) * self.attn.to_add_out(c_out.contiguous())
        ff_c = self.ff_context(modulate(self.norm2_context(context), c_shift_mlp, c_scale_mlp))
        return clip_fp16(context + c_gate_mlp.unsqueeze(1) * ff_c), x


class SingleStreamBlock(nn.Module):
    """diffusers' FluxSingleTransformerBlock on the one stream [text | image]: attention and a tanh-GELU MLP
    (4x) in parallel from one AdaLN, `proj_out` on their concatenation, gated."""

    def __init__(self, width: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        mlp = int(width * mlp_ratio)
        self.norm = AdaNorm(width, 3)
        self.proj_mlp = nn.Linear(width, mlp)
        self.proj_out = nn.Linear(width + mlp, width)
        self.attn = Attention(width, heads, head_dim, added=False)

    def forward(self, h, emb, rotary, site: JointSite, attn_override=None):
        """h: (B, T + N, width) -> the same."""
        nh, (gate,) = self.norm(h, emb)
        mlp = F.gelu(self.proj_mlp(nh), approximate="tanh")
        attn = self.attn(nh, None, rotary, site, attn_override)
        return clip_fp16(h + gate.unsqueeze(1) * self.proj_out(torch.cat([attn, mlp], dim=2)))


# ------------------------------------------------------------------------------------- the transformer
class FluxTransformer(nn.Module):
    """diffusers' FluxTransformer2DModel. forward takes the packed latent and returns packed velocity."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.cfg = cfg
        w, heads, d = cfg.width, cfg.num_attention_heads, cfg.attention_head_dim
        self.time_text_embed = TimeTextEmbed(w, cfg.pooled_projection_dim, cfg.guidance_embeds)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, w)
        self.x_embedder = nn.Linear(cfg.in_channels, w)
        self.transformer_blocks = nn.ModuleList(DoubleStreamBlock(w, heads, d) for _ in range(cfg.num_layers))
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(w, heads, d) for _ in range(cfg.num_single_layers))
        self.norm_out = AdaNormOut(w)
        self.proj_out = nn.Linear(w, cfg.out_channels)

    def joint_sites(self, text_len: int, grid: tuple[int, int]) -> list[JointSite]:
        """The sites of every joint attention, in the official counting order: double blocks, then single."""
        n = grid[0] * grid[1]
        common = dict(text=slice(0, text_len), image=slice(text_len, text_len + n),
                      heads=self.cfg.num_attention_heads, grid=tuple(grid))
        double = [JointSite(index=i, name=f"transformer_blocks.{i}", kind="double", **common)
                  for i in range(self.cfg.num_layers)]
        single = [JointSite(index=self.cfg.num_layers + j, name=f"single_transformer_blocks.{j}", kind="single",
                            **common) for j in range(self.cfg.num_single_layers)]
        return double + single

    def conditioning(self, t, guidance, pooled, dtype) -> torch.Tensor:
        """The AdaLN vector: t and guidance arrive in [0, 1] units (sigma, as FluxPipeline passes them) and are
        embedded at 1000x, after rounding to the activations' dtype as diffusers does."""
        if self.cfg.guidance_embeds and guidance is None:
            raise ValueError("this Flux transformer embeds distilled guidance (guidance_embeds, FLUX.1-dev): "
                             "pass guidance, e.g. 3.5")
        t = t.to(dtype) * 1000
        g = guidance.to(dtype) * 1000 if self.cfg.guidance_embeds else None
        return self.time_text_embed(t, g, pooled)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                grid: tuple[int, int], guidance: torch.Tensor | None = None, attn_override=None) -> torch.Tensor:
        """x: (B, rows*cols, in_channels) packed latent on the (rows, cols) grid; t, guidance: (B,); context:
        (B, T, joint_attention_dim) T5 states; pooled: (B, pooled_projection_dim) -> (B, rows*cols, out_channels).
        guidance is ignored by models without a guidance embedding (schnell)."""
        h = self.x_embedder(x)
        emb = self.conditioning(t, guidance, pooled, h.dtype)
        context = self.context_embedder(context)
        text_len = context.shape[1]
        cos, sin = rope(position_ids(text_len, grid), self.cfg.axes_dims_rope)
        rotary = (cos.to(x.device), sin.to(x.device))
        sites = self.joint_sites(text_len, grid)
        for block, site in zip(self.transformer_blocks, sites):
            context, h = block(h, context, emb, rotary, site, attn_override)
        h = torch.cat([context, h], dim=1)
        for block, site in zip(self.single_transformer_blocks, sites[self.cfg.num_layers:]):
            h = block(h, emb, rotary, site, attn_override)
        return self.proj_out(self.norm_out(h[:, text_len:], emb))
