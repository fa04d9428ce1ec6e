"""The T5 v1.1 encoder SD3 / SD3.5 (`text_encoder_3`) and Flux (`text_encoder_2`) read their prompts with.

Module names are transformers' `T5EncoderModel`'s, so a diffusers folder's `model.safetensors` loads
without a key map: `shared.weight` (also saved as `encoder.embed_tokens.weight`: one embedding),
`encoder.block.N.layer.0.SelfAttention.{q,k,v,o}`, `encoder.block.0.layer.0.SelfAttention.relative_attention_bias`,
`encoder.block.N.layer.{0,1}.layer_norm`, `encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}`,
`encoder.final_layer_norm`.

What sets T5 apart from CLIP's tower:
- no absolute positions: a learned bias per head and *relative-position bucket* is added to the attention
  logits; only the first block holds the table, every block adds the same bias;
- the logits q k^T are NOT divided by sqrt(d) (T5 folds the scale into its initialisation);
- RMS norm without mean or bias (T5LayerNorm), pre-norm residual blocks, a final norm;
- a gated-GELU feed-forward (v1.1): wo(gelu_tanh(wi_0 x) * wi_1 x), no biases anywhere (the original T5's
  `feed_forward_proj="relu"`, wo(relu(wi x)), is read too: diffusers' own test pipelines use one);
- no attention mask here: SD3 and Flux encode the pad tokens and attend to them.

fp16, as transformers runs T5 (T5 overflows fp16's range in its feed-forward): a model loaded in fp16 keeps
each `wo` in fp32 (transformers' `_keep_in_fp32_modules = ["wo"]`), the feed-forward's input is cast to
`wo`'s dtype, so from the first block on the residual stream is fp32; and wherever the hidden state is fp16
it is clamped to fp16's finite range (transformers' T5Block clamp). bf16 needs neither.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .clip import ACTIVATIONS


@dataclass(frozen=True)
class T5Config:
    """A T5 encoder's sizes (defaults: T5 v1.1 XXL, the one SD3 and Flux ship), transformers' names."""
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"  # gated-gelu's activation: transformers' gelu_new, GELU's tanh form
    gated: bool = True  # T5 v1.1's wi_0 / wi_1 gate; False: the original T5's single wi

    def __post_init__(self):
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"T5's dense_act_fn {str(self.dense_act_fn)[:40]!r} is not one this encoder implements "
                             f"({', '.join(ACTIVATIONS)}; T5 v1.1: gelu_new)")
        if min(self.vocab_size, self.d_model, self.d_kv, self.d_ff, self.num_layers, self.num_heads,
               self.relative_attention_num_buckets, self.relative_attention_max_distance) < 1:
            raise ValueError(f"T5 sizes must be positive: {self}")

    @classmethod
    def from_hf(cls, config: dict) -> "T5Config":
        """From a transformers `T5EncoderModel` config.json: T5 v1.1's gated feed-forward ("gated-gelu", SD3's
        and Flux's) or the original T5's ungated one ("relu", transformers' default)."""
        proj = str(config.get("feed_forward_proj", "relu"))
        gated = proj.startswith("gated-")
        act = "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1]  # as transformers' T5Config derives it
        try:
            return cls(vocab_size=int(config["vocab_size"]), d_model=int(config["d_model"]), d_kv=int(config["d_kv"]),
                       d_ff=int(config["d_ff"]), num_layers=int(config["num_layers"]), num_heads=int(config["num_heads"]),
                       relative_attention_num_buckets=int(config.get("relative_attention_num_buckets", 32)),
                       relative_attention_max_distance=int(config.get("relative_attention_max_distance", 128)),
                       layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-6)), dense_act_fn=act,
                       gated=gated)
        except KeyError as e:
            raise ValueError(f"T5 config.json lacks {e}: not a transformers T5 config") from None


def relative_position_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional buckets of `relative` = key position - query position: half the buckets for
    keys after the query; in each half, exact buckets for |d| < num_buckets/4, then logarithmic bins up to
    `max_distance` (farther keys share the last bin)."""
    half = num_buckets // 2
    bucket = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    log_bin = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    log_bin = log_bin.clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, log_bin)


class T5LayerNorm(nn.Module):
    """RMS norm: x / sqrt(mean(x^2) + eps) * weight; no mean, no bias; the mean square in fp32."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.cfg, self.heads = cfg, cfg.num_heads
        inner = cfg.num_heads * cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, n: int) -> torch.Tensor:
        """(1, heads, n, n): the learned bias of each (query, key) pair's relative-position bucket."""
        pos = torch.arange(n, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x, bias):
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        # softmax(q k^T + bias) v: scale 1, T5 does not divide by sqrt(d_kv)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # (B, heads, n, d_kv)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = ACTIVATIONS[cfg.dense_act_fn]

    def forward(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x)
        return self.wo(h.to(self.wo.weight.dtype))  # wo stays fp32 in an fp16 model (see the module docstring)


class T5DenseActDense(nn.Module):
    """The original T5's feed-forward: wo(act(wi x)), no biases."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = ACTIVATIONS[cfg.dense_act_fn]

    def forward(self, x):
        return self.wo(self.act(self.wi(x)).to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg) if cfg.gated else T5DenseActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """transformers' T5Block clamp: an fp16 hidden state is kept within fp16's range (1000 below its max
    where it already overflowed), so inf does not turn into NaN in the next norm. Other dtypes pass."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return torch.clamp(x, min=-limit, max=limit)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias), T5LayerFF(cfg)])

    def forward(self, x, bias):
        x = clamp_fp16(self.layer[0](x, bias))
        return clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList([T5Block(cfg, has_relative_attention_bias=i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        bias = self.block[0].layer[0].SelfAttention.position_bias(ids.shape[1])  # shared by every block
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nn.Module):
    """Token ids (B, S) -> last_hidden_state (B, S, d_model); every position attends to every other
    (no mask: pad tokens are encoded as SD3's and Flux's pipelines encode them)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, self.shared)  # encoder.embed_tokens is `shared`: one table, two names

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(ids)

    def keep_wo_in_fp32(self) -> "T5EncoderModel":
        """Make the feed-forward output projections fp32, as transformers loads T5 in fp16."""
        for block in self.encoder.block:
            block.layer[1].DenseReluDense.wo.float()
        return self
