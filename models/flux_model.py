"""FLUX.1 (dev / schnell) as an MM-DiT model (models/mmdit_model.py's protocol): the Flux transformer, the
16-channel VAE, the text (CLIP-L pooled + T5) and the dynamically shifted flow schedule.

What differs from SD3, as FluxPipeline runs it:
- no classifier-free guidance: one transformer call per step; FLUX.1-dev embeds the guidance scale instead
  (`guidance_embeds`), schnell embeds none;
- the latent is packed into 2x2 patches before the transformer and unpacked after (`velocity` takes and
  returns the (B, 16, h, w) latent, the same numbers as the pipeline's packed loop);
- the transformer's timestep is sigma (the pipeline passes timestep / 1000; the transformer multiplies by
  1000 again), and the text sequence is T5's alone, [text | image] in every attention.
"""
from __future__ import annotations

import torch
from torch import nn

from .flow import FlowConfig
from .flux import FluxTransformer, pack, unpack
from .joint import JointSite
from .mmdit_model import MMDiTModel
from .vae import AutoencoderKL

T5_LENGTH = 512      # FluxPipeline's max_sequence_length
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline's default_sample_size: 1024 px with the 8x VAE


class Flux(MMDiTModel):
    """FLUX.1: the Flux transformer, distilled guidance where it embeds one, text = T5's t5_length positions."""
    uses_cfg = False
    family = "Flux"
    pipeline_sigmas = True  # FluxPipeline hands its scheduler linspace(1, 1/N, N), schnell's static schedule too
    latent_patch = 2  # FluxPipeline packs 2 x 2 latent pixels into a token

    def __init__(self, transformer: FluxTransformer, vae: AutoencoderKL, flow: FlowConfig, scaling_factor: float,
                 shift_factor: float, text: nn.Module | None = None, t5_length: int = T5_LENGTH):
        super().__init__(vae, flow, scaling_factor, shift_factor, text)
        self.transformer, self.t5_length = transformer, t5_length

    @property
    def default_size(self) -> int:
        """FluxPipeline's default height and width: default_sample_size x its vae_scale_factor."""
        return DEFAULT_SAMPLE_SIZE * self.latent_downsample

    @property
    def guidance_embeds(self) -> bool:
        """FLUX.1-dev embeds the guidance scale (one call per step); schnell does not."""
        return self.transformer.cfg.guidance_embeds

    @property
    def default_steps(self) -> int:
        """FLUX.1-dev: FluxPipeline's 28 steps; schnell, timestep-distilled: 4 (its model card's)."""
        return 28 if self.guidance_embeds else 4

    @property
    def default_guidance(self) -> float:
        """FLUX.1-dev: FluxPipeline's 3.5, embedded; schnell embeds none (0.0: no effect)."""
        return 3.5 if self.guidance_embeds else 0.0

    @property
    def variant(self) -> str:
        return "FLUX.1-dev" if self.guidance_embeds else "FLUX.1-schnell"

    @property
    def text_positions(self) -> dict[str, slice]:
        """The text sequence is T5's tokens alone (CLIP-L gives only the pooled vector)."""
        return {"t5": slice(0, self.t5_length)}

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond, guidance=None, attn_override=None) -> torch.Tensor:
        """The transformer's velocity for the latent x (B, 16, h, w) at the sampler's timestep t (sigma * 1000),
        passed as FluxPipeline does (t in the latents' dtype, / 1000); guidance: the distilled guidance scale
        (a number or (B,)), needed by FLUX.1-dev, ignored by schnell."""
        b, _, h, w = x.shape
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b).to(x.dtype) / 1000
        g = None
        if self.guidance_embeds:
            if guidance is None:
                raise ValueError(f"{self.variant} embeds the guidance scale: pass guidance (FLUX.1-dev: 3.5)")
            g = torch.as_tensor(guidance, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
        out = self.transformer(pack(x), t, cond.context.to(x.dtype), cond.pooled.to(x.dtype), (h // 2, w // 2),
                               g, attn_override)
        return unpack(out, h, w)

    def joint_sites(self, height: int, width: int) -> list[JointSite]:
        """Every joint attention's site at this picture size: double blocks, then single blocks."""
        h, w = self.latent_grid(height, width)
        return self.transformer.joint_sites(self.t5_length, (h // 2, w // 2))
