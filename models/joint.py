"""Joint attention of multimodal diffusion transformers (SD3 / SD3.5 MM-DiT blocks, Flux double- and
single-stream blocks): the one function every such block's attention goes through, and the place an edit
reaches it.

In these models text and image tokens attend jointly: one softmax over the concatenated sequence. The
order differs by model (SD3: [image | text]; Flux: [text | image]), so every call carries a `JointSite`
saying which positions are which. q and k arrive after the model's qk-norm and RoPE, exactly what the
softmax reads.

An edit is a function `attn_override(site, q, k, v) -> (q, k, v)` passed down the transformer's forward:
it may read (store maps) and return replaced tensors; the attention then runs on what it returns. With
no override the call is the plain model's, bit for bit."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import attend


@dataclass(frozen=True)
class JointSite:
    """Where a joint attention call happens.

    index: the block's position among the model's attention processors as the official MM-DiT
        Prompt-to-Prompt counts them (SD3: transformer_blocks 0..; SD3.5's image-only `attn2` layers count
        too but never reach here; Flux: double-stream blocks first, then single-stream blocks).
    name: the block's module path in the diffusers layout (e.g. "transformer_blocks.1",
        "single_transformer_blocks.0").
    kind: "joint" (SD3 / SD3.5), "double" or "single" (Flux).
    image, text: the slices of the joint sequence holding the image and the text tokens.
    heads: attention heads; grid: the image tokens' (rows, cols), row-major."""
    index: int
    name: str
    kind: str
    image: slice
    text: slice
    heads: int
    grid: tuple[int, int]


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: JointSite,
                    attn_override=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the whole joint sequence: q, k, v are (B, heads, S, d), after qk-norm
    and RoPE. attn_override(site, q, k, v) -> (q, k, v), if given, sees them first and may replace them."""
    if attn_override is not None:
        q, k, v = attn_override(site, q, k, v)
    return attend(q, k, v)
