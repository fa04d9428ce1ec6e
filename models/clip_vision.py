"""CLIP's image tower and the pair of towers with their projections, for CLIP similarity.

Module names are transformers' `CLIPModel` keys: `vision_model.embeddings.{class_embedding, patch_embedding,
position_embedding}`, `vision_model.pre_layrnorm` (sic), `vision_model.encoder.layers.N.*` (the text tower's
pre-LN layers without the causal mask), `vision_model.post_layernorm`, `visual_projection`; the text side is
models/clip.py's `CLIPTextModel` under `text_model.` with `text_projection`. An image embedding is the class
token after the last layer and `post_layernorm`, projected; a text embedding is the final-layer-normed state at
the position of the largest token id (EOS, 49407, the largest id of CLIP's vocabulary), projected.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .clip import CLIPTextModel, Encoder
from .config import CLIP_ACTIVATIONS, CLIPTextConfig


@dataclass(frozen=True)
class CLIPVisionConfig:
    """CLIP ViT-L/14 at 224 px by default (openai/clip-vit-large-patch14's vision_config)."""
    width: int = 1024
    layers: int = 24
    heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 14
    image_size: int = 224
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in CLIP_ACTIVATIONS:
            raise ValueError(f"the vision tower's hidden_act {str(self.hidden_act)[:40]!r} is not one this CLIP "
                             f"implements ({', '.join(CLIP_ACTIVATIONS)}; CLIP-L: quick_gelu)")
        if self.width % self.heads:
            raise ValueError(f"the vision tower's width {self.width} is not a multiple of its {self.heads} heads")

    @property
    def positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.positions, cfg.width)

    def forward(self, pixels):
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, HW, width)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1)
        if x.shape[1] != self.position_embedding.num_embeddings:
            raise ValueError(f"pixels {tuple(pixels.shape[-2:])} give {x.shape[1]} positions; the tower has "
                             f"{self.position_embedding.num_embeddings} (preprocess to its image size first)")
        return x + self.position_embedding.weight[None]


class CLIPVisionTransformer(nn.Module):
    """Pixels (B, 3, S, S), normalised -> the class token after post_layernorm (B, width)."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.encoder = Encoder(cfg, causal=False)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, pixels):
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return self.post_layernorm(x[:, 0])


class CLIPPair(nn.Module):
    """Both towers and their projections, named as `CLIPModel`'s keys (`logit_scale` is not read)."""

    def __init__(self, text: CLIPTextConfig, vision: CLIPVisionConfig, projection_dim: int):
        super().__init__()
        self.text_model = CLIPTextModel(text)
        self.vision_model = CLIPVisionTransformer(vision)
        self.text_projection = nn.Linear(text.width, projection_dim, bias=False)
        self.visual_projection = nn.Linear(vision.width, projection_dim, bias=False)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, projection_dim), not normalised: transformers' `get_image_features`."""
        return self.visual_projection(self.vision_model(pixels))

    def text_features(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, projection_dim), not normalised: the state at each row's largest id (EOS) as transformers'
        `get_text_features` pools for CLIP configs with the legacy eos_token_id."""
        states = self.text_model(ids)  # (B, L, width), after final_layer_norm
        pooled = states[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
        return self.text_projection(pooled)
