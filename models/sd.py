"""StableDiffusion: the parts together. It knows nothing about editing."""
from __future__ import annotations

import torch
from torch import nn

from .clip import CLIPTextModel, default_tokenizer
from .config import SDConfig
from .ddim import DDIM
from .unet import UNetModel
from .vae import AutoencoderKL

# checkpoint prefix of each part, in the original single-file layout
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.transformer.text_model."}


class StableDiffusion(nn.Module):
    def __init__(self, cfg: SDConfig = SDConfig()):
        super().__init__()
        self.cfg = cfg
        self.unet = UNetModel(cfg.unet)
        self.vae = AutoencoderKL(cfg.vae)
        self.text_encoder = CLIPTextModel(cfg.text)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def latent_downsample(self) -> int:
        return self.cfg.vae.downsample

    def tokenize(self, prompts) -> torch.Tensor:
        """(N, 77) int64 token ids, padded with EOS (49407) like SD v1's CLIPTokenizer."""
        return default_tokenizer()(prompts, self.cfg.text.max_position_embeddings)

    def encode_text(self, prompts) -> torch.Tensor:
        """(N, 77, context_dim): CLIP last_hidden_state (after the final layer norm)."""
        return self.text_encoder(self.tokenize(prompts).to(self.device))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (N, 3, H, W) -> posterior mean * scale factor (no sampling)."""
        mean, _ = self.vae.encode_moments(images.to(self.device, self.dtype))
        return mean * self.cfg.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (N, 4, h, w) -> images in [-1, 1] (not clamped), (N, 3, H, W)."""
        return self.vae.decode(latents.to(self.device, self.dtype) / self.cfg.scale_factor)

    def scheduler(self, num_steps: int = 50, steps_offset: int = 1) -> DDIM:
        c = self.cfg
        return DDIM.create(num_steps, steps_offset, c.linear_start, c.linear_end, c.num_train_timesteps)
