"""The text conditioning of the MM-DiT models: SD3 / SD3.5 (CLIP-L, CLIP-G, T5) and Flux (CLIP-L, T5).

What the transformer reads is a `TextCond`: `context` (B, S_txt, W), the token sequence its joint attention
attends with the image, and `pooled` (B, P), one vector per prompt for its AdaLN conditioning.

SD3 (diffusers' StableDiffusion3Pipeline, `encode_prompt`):
- CLIP-L and CLIP-G (transformers' CLIPTextModelWithProjection) each read 77 positions, padded with
  end-of-text (CLIP-L) and "!" (CLIP-G); each gives `hidden_states[-2]` (the penultimate layer's output, no
  final LayerNorm); the two are concatenated over channels and zero-padded to T5's width;
- T5 reads `t5_length` positions (max_sequence_length, 256 by default), no attention mask: `last_hidden_state`;
- context = [CLIP (77 tokens) | T5 (t5_length tokens)] over the sequence;
- pooled = [CLIP-L text_embeds | CLIP-G text_embeds]: each tower's last layer, final LayerNorm, at the first
  end-of-text position, through its text_projection.
Flux (FluxPipeline): context = T5's last_hidden_state (512 positions by default); pooled = CLIP-L's
pooler_output (the final-LayerNorm state at the first end-of-text, no projection).

The modules carry the diffusers folder's component names (`text_encoder`, `text_encoder_2`, `text_encoder_3`)
and, inside them, transformers' key names, so each component's model.safetensors loads without a key map
(weights_tools.mmdit_text reads the folders).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .clip import CLIPTextModel
from .config import CLIPTextConfig
from .t5 import T5Config, T5EncoderModel

CLIP_LENGTH = 77          # the CLIP towers' positions (tokenizer_max_length in the pipelines)
SD3_T5_LENGTH = 256       # StableDiffusion3Pipeline's max_sequence_length default
FLUX_T5_LENGTH = 512      # FluxPipeline's
LEGACY_EOS_ID = 2         # transformers' CLIP configs older than its fix say eos_token_id 2: it then pools at argmax(ids)


@dataclass
class TextCond:
    """What an MM-DiT transformer reads of the prompts: `context` (B, S_txt, W) and `pooled` (B, P)."""
    context: torch.Tensor
    pooled: torch.Tensor


class CLIPTower(nn.Module):
    """transformers' CLIPTextModel / CLIPTextModelWithProjection under its key names (`text_model.*`,
    `text_projection`): ids (B, 77) -> (hidden_states[-2] (B, 77, width), pooled (B, P))."""

    def __init__(self, cfg: CLIPTextConfig, eos_token_id: int, projection_dim: int | None):
        super().__init__()
        if cfg.layers < 2:
            raise ValueError(f"a CLIP tower of {cfg.layers} layer has no penultimate layer (SD3 reads hidden_states[-2])")
        self.eos_token_id = eos_token_id
        self.text_model = CLIPTextModel(cfg)
        if projection_dim is not None:
            self.text_projection = nn.Linear(cfg.width, projection_dim, bias=False)
        else:
            self.text_projection = None

    def pool_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """The end-of-text position of each row, as transformers picks it: the first `eos_token_id` (the
        largest id where a config says the legacy eos_token_id 2)."""
        if self.eos_token_id == LEGACY_EOS_ID:
            return ids.argmax(dim=-1)
        return (ids == self.eos_token_id).int().argmax(dim=-1)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tm = self.text_model
        penultimate = tm.encoder(tm.embeddings(ids), len(tm.encoder.layers) - 1)   # (B, 77, width)
        last = tm.final_layer_norm(tm.encoder.layers[-1](penultimate))
        pooled = last[torch.arange(len(ids), device=ids.device), self.pool_positions(ids)]
        return penultimate, pooled if self.text_projection is None else self.text_projection(pooled)


class SD3Text(nn.Module):
    """SD3 / SD3.5's three text encoders. `encode(prompts) -> TextCond` with context (B, 77 + t5_length,
    T5 width) and pooled (B, CLIP-L projection + CLIP-G projection). `tokenizers`: "clip" (CLIP-L, the one word
    positions are counted in), "clip_g", "t5"."""

    def __init__(self, clip_l: CLIPTower, clip_g: CLIPTower, t5: T5EncoderModel, tokenizers: dict):
        super().__init__()
        if clip_l.text_projection is None or clip_g.text_projection is None:
            raise ValueError("SD3's CLIP towers are CLIPTextModelWithProjection: the pooled vector is their "
                             "projected text_embeds, so each needs its text_projection")
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = clip_l, clip_g, t5
        self.tokenizers = tokenizers
        self.t5_length = SD3_T5_LENGTH

    def encode(self, prompts: list[str] | str) -> TextCond:
        device = self.text_encoder_3.shared.weight.device
        clip_l, pooled_l = self.text_encoder(self.tokenizers["clip"](prompts, CLIP_LENGTH).to(device))
        clip_g, pooled_g = self.text_encoder_2(self.tokenizers["clip_g"](prompts, CLIP_LENGTH).to(device))
        t5 = self.text_encoder_3(self.tokenizers["t5"](prompts, self.t5_length).to(device))
        clip = torch.cat([clip_l, clip_g], dim=-1)                      # (B, 77, width_l + width_g)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))          # zeros up to T5's width (as diffusers)
        return TextCond(context=torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                        pooled=torch.cat([pooled_l, pooled_g], dim=-1))


class FluxText(nn.Module):
    """Flux's two text encoders. `encode(prompts) -> TextCond` with context (B, t5_length, T5 width) and pooled
    (B, CLIP-L width). `tokenizers`: "clip", "t5" (word positions are counted in T5's)."""

    def __init__(self, clip_l: CLIPTower, t5: T5EncoderModel, tokenizers: dict):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = clip_l, t5
        self.tokenizers = tokenizers
        self.t5_length = FLUX_T5_LENGTH

    def encode(self, prompts: list[str] | str) -> TextCond:
        device = self.text_encoder_2.shared.weight.device
        _, pooled = self.text_encoder(self.tokenizers["clip"](prompts, CLIP_LENGTH).to(device))
        context = self.text_encoder_2(self.tokenizers["t5"](prompts, self.t5_length).to(device))
        return TextCond(context=context, pooled=pooled.to(context.dtype))
