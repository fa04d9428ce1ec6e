"""LDMBert: LDM-400M's text tower (`cond_stage_model.transformer`, CompVis' BERTEmbedder).

Despite the name it is not BERT: a 32-layer pre-LN transformer encoder trained from scratch with
LDM, on BERT's WordPiece ids (models/wordpiece.py). Token plus learned absolute position
embeddings, then layers alternating self-attention (8 heads of 64, no q/k/v bias, no mask: padding
is attended to, as in training) and a GELU feed-forward (x4), each `x + f(LayerNorm(x))`, then a
final LayerNorm. All 77 positions go to cross-attention.

Module names are the CompVis keys (x_transformer.py's TransformerWrapper): `token_emb`,
`pos_emb.emb`, `attn_layers.layers.{2i}` (attention) and `.{2i+1}` (feed-forward), each
`.0` = its LayerNorm and `.1` = the block, `norm`. The checkpoint's `to_logits` (a language-model
head, unused for embeddings) is not built; weights_tools drops it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .wordpiece import CONTEXT_LENGTH, WordPieceTokenizer


BERT_EMBEDDER = "ldm.modules.encoders.modules.BERTEmbedder"  # the CompVis config's cond_stage_config target


@dataclass(frozen=True)
class LDMBertConfig:
    vocab_size: int = 30522
    max_position_embeddings: int = CONTEXT_LENGTH
    width: int = 1280          # n_embed; also the UNet's context_dim
    layers: int = 32           # n_layer: 32 attention + 32 feed-forward sublayers
    heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 5120  # the feed-forward's width: 4 x width in CompVis' FeedForward
    vocab: str | None = None   # the user's BERT `vocab.txt`: not part of the weights, never shipped

    def tokenizer(self) -> WordPieceTokenizer:
        if self.vocab is None:
            raise ValueError("LDM's text tower tokenises with BERT's WordPiece vocabulary, which the single "
                             "checkpoint file does not hold: pass its vocab.txt (load_checkpoint(..., "
                             "tokenizer=PATH), or `--tokenizer PATH`; the diffusers folder's "
                             "tokenizer/vocab.txt is that file)")
        tok = WordPieceTokenizer(Path(self.vocab), self.max_position_embeddings)
        if len(tok) != self.vocab_size:
            raise ValueError(f"vocabulary {self.vocab} has {len(tok)} tokens but the text tower's embedding has "
                             f"{self.vocab_size} rows: pass the vocab.txt this checkpoint was trained with "
                             f"(bert-base-uncased's, 30522 tokens, for LDM-400M)")
        return tok


    @classmethod
    def from_ldm(cls, params: dict, vocab: str | None = None) -> "LDMBertConfig":
        """From a CompVis `BERTEmbedder`'s params (n_embed, n_layer, vocab_size, max_seq_len); the
        heads and the feed-forward are x_transformer's defaults (8 of 64, 4 x n_embed), unless the
        params spell them (tiny test models do)."""
        width = params["n_embed"]
        return cls(vocab_size=params.get("vocab_size", 30522), max_position_embeddings=params.get("max_seq_len", 77),
                   width=width, layers=params["n_layer"], heads=params.get("heads", 8),
                   head_dim=params.get("head_dim", 64), intermediate_size=params.get("intermediate_size", 4 * width),
                   vocab=vocab)

    def to_ldm(self) -> dict:
        """The inverse of `from_ldm`: a CompVis cond_stage_config (the vocabulary path is not part of it)."""
        params = dict(n_embed=self.width, n_layer=self.layers, vocab_size=self.vocab_size,
                      max_seq_len=self.max_position_embeddings)
        if (self.heads, self.head_dim, self.intermediate_size) != (8, 64, 4 * self.width):
            params |= dict(heads=self.heads, head_dim=self.head_dim, intermediate_size=self.intermediate_size)
        return {"target": BERT_EMBEDDER, "params": params}


class PositionalEmbedding(nn.Module):
    """Learned absolute positions (`pos_emb.emb`)."""

    def __init__(self, cfg: LDMBertConfig):
        super().__init__()
        self.emb = nn.Embedding(cfg.max_position_embeddings, cfg.width)

    def forward(self, n: int, device) -> torch.Tensor:
        return self.emb(torch.arange(n, device=device))[None]


class Attention(nn.Module):
    def __init__(self, cfg: LDMBertConfig):
        super().__init__()
        self.heads, inner = cfg.heads, cfg.heads * cfg.head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(cfg.width, inner, bias=False) for _ in range(3))
        self.to_out = nn.Linear(inner, cfg.width)

    def forward(self, x):
        q, k, v = (rearrange(f(x), "b n (h d) -> b h n d", h=self.heads) for f in (self.to_q, self.to_k, self.to_v))
        y = F.scaled_dot_product_attention(q, k, v)  # bidirectional, no padding mask
        return self.to_out(rearrange(y, "b h n d -> b n (h d)"))


class FeedForward(nn.Module):
    def __init__(self, cfg: LDMBertConfig):
        super().__init__()
        inner = cfg.intermediate_size
        # net.0 = (Linear, exact GELU), net.1 = the training dropout, net.2 = Linear: the checkpoint's indices
        self.net = nn.Sequential(nn.Sequential(nn.Linear(cfg.width, inner), nn.GELU()), nn.Identity(),
                                 nn.Linear(inner, cfg.width))

    def forward(self, x):
        return self.net(x)


class PreNormResidual(nn.ModuleList):
    """x + block(LayerNorm(x)); stored as [norm, block] so the keys read `.0.weight`, `.1.to_q.weight`."""

    def __init__(self, width: int, block: nn.Module):
        super().__init__([nn.LayerNorm(width), block])

    def forward(self, x):
        norm, block = self
        return x + block(norm(x))


class AttentionLayers(nn.Module):
    def __init__(self, cfg: LDMBertConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            PreNormResidual(cfg.width, Attention(cfg) if i % 2 == 0 else FeedForward(cfg))
            for i in range(2 * cfg.layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class LDMBertModel(nn.Module):
    """Token ids (N, 77) -> embeddings (N, 77, width), after the final LayerNorm."""

    def __init__(self, cfg: LDMBertConfig):
        super().__init__()
        self.cfg = cfg
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_emb = PositionalEmbedding(cfg)
        self.attn_layers = AttentionLayers(cfg)
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, ids):
        x = self.token_emb(ids) + self.pos_emb(ids.shape[1], ids.device)
        return self.norm(self.attn_layers(x))
