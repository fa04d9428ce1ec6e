"""An MM-DiT text-to-image model (SD3 / SD3.5; Flux builds on the same wrapper): the parts together, as the
sampling loop (p2p/joint_pipeline.py) and the joint-attention controller read them.

    m.vae, m.decode(z) -> images (B, 3, H, W) in [0, 1], m.encode(images) -> z
    m.latent_channels, m.latent_downsample: the VAE's (16 and 8 in SD3 / Flux; diffusers' test pipelines: 4 or
        1 and 1), m.latent_patch: latent pixels per image token side (SD3: the patch size; Flux: 2, its packing)
    m.encode_prompts(prompts) -> TextCond (context (B, S_txt, W), pooled (B, P)); m.tokenizers
    m.uses_cfg, m.guidance_embeds, m.flow (FlowConfig), m.sampler(num_steps, height, width), m.default_size
    m.default_steps, m.default_guidance: what the model's diffusers pipeline samples with when given none
    m.velocity(x, t, cond, guidance=None, attn_override=None) -> v, x the latent (B, C, h, w) and t the
        sampler's timestep (sigma * 1000; each model converts it as its diffusers pipeline does)
    m.joint_sites(height, width) -> [JointSite], m.text_positions

A TextCond is any object with `.context` and `.pooled` built as TextCond(context, pooled) (the text
module's; the loop concatenates the guidance batch with `type(cond)(context, pooled)`).
Latents are in diffusion space: the VAE's latent is (z_vae - shift_factor) * scaling_factor.
"""
from __future__ import annotations

import torch
from torch import nn

from .flow import FlowConfig, FlowMatchEuler
from .joint import JointSite
from .mmdit import SD3Transformer
from .vae import AutoencoderKL


class MMDiTModel(nn.Module):
    """What SD3 and Flux share: the VAE with its scaling and shift, the text module, the flow schedule.
    A subclass adds its transformer, `velocity`, `joint_sites`, `uses_cfg`, `guidance_embeds` and the text
    layout (`text_positions`)."""
    family = ""  # what p2p inspect and messages call it ("SD3", "SD3.5", "Flux")
    pipeline_sigmas = False  # the pipeline passes linspace(1, 1/N, N) sigmas to its scheduler (FluxPipeline)

    def __init__(self, vae: AutoencoderKL, flow: FlowConfig, scaling_factor: float, shift_factor: float,
                 text: nn.Module | None = None):
        super().__init__()
        self.vae, self.text, self.flow = vae, text, flow
        self.scaling_factor, self.shift_factor = float(scaling_factor), float(shift_factor)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        """The VAE's latent channels (vae/config.json's latent_channels)."""
        return self.vae.cfg.z_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent pixel: 2 ** (levels - 1) of the VAE (the pipelines' vae_scale_factor)."""
        return self.vae.cfg.downsample

    @property
    def token_side(self) -> int:
        """Pixels per image token side (16 in SD3 / SD3.5 / Flux): sizes are multiples of it."""
        return self.latent_downsample * self.latent_patch

    @property
    def tokenizers(self) -> dict:
        """name -> tokenizer ("clip", "clip_g", "t5"): the text module's."""
        return dict(getattr(self.text, "tokenizers", {}))

    def encode_prompts(self, prompts: list[str]):
        """TextCond of the prompts, by the text module."""
        if self.text is None:
            raise ValueError(f"this {self.family} model was loaded without its text encoders: pass the prompts' "
                             "TextCond (context, pooled) instead of strings, or load the folder with its text")
        return self.text.encode(list(prompts))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) in diffusion space -> images (B, 3, f h, f w) in [0, 1], f the VAE's downsample."""
        images = self.vae.decode(z.to(self.dtype) / self.scaling_factor + self.shift_factor)
        return (images / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> latents in diffusion space (the posterior's mean, as an inversion starts)."""
        mean, _ = self.vae.encode_moments(images.to(self.device, self.dtype) * 2 - 1)
        return (mean - self.shift_factor) * self.scaling_factor

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the latent of a height x width picture; sizes must be multiples of `token_side` (SD3, Flux:
        16, an 8x VAE and 2 x 2 patches), as the pipelines require."""
        f, p = self.latent_downsample, self.latent_patch
        if height <= 0 or width <= 0 or height % (f * p) or width % (f * p):
            raise ValueError(f"height and width must be positive multiples of {f * p} for {self.family or 'an MM-DiT'} "
                             f"(a {f}x VAE and {p} x {p} patches), got {height} x {width}")
        return height // self.latent_downsample, width // self.latent_downsample

    def sampler(self, num_steps: int, height: int, width: int) -> FlowMatchEuler:
        """The flow schedule of a run: its dynamic shift (where the folder's scheduler has one) reads the
        image's token count, (h/p)(w/p) for p x p patches."""
        h, w = self.latent_grid(height, width)
        p = self.latent_patch
        return FlowMatchEuler.create(num_steps, self.flow, (h // p) * (w // p), self.pipeline_sigmas)


class SD3(MMDiTModel):
    """Stable Diffusion 3 / 3.5: the MM-DiT, classifier-free guidance, text [77 CLIP | T5] positions."""
    uses_cfg = True
    guidance_embeds = False
    default_steps, default_guidance = 28, 7.0  # StableDiffusion3Pipeline's num_inference_steps, guidance_scale

    def __init__(self, transformer: SD3Transformer, vae: AutoencoderKL, flow: FlowConfig, scaling_factor: float,
                 shift_factor: float, text: nn.Module | None = None, t5_length: int = 256):
        super().__init__(vae, flow, scaling_factor, shift_factor, text)
        self.transformer, self.t5_length = transformer, t5_length
        cfg = transformer.cfg
        self.family = "SD3.5" if cfg.qk_norm or cfg.dual_attention_layers else "SD3"
        self.latent_patch = cfg.patch_size
        self.default_size = cfg.sample_size * self.latent_downsample  # 1024 px for SD3 / SD3.5

    @property
    def text_positions(self) -> dict[str, slice]:
        """Where each tokenizer's tokens sit in the text sequence: 77 CLIP positions (CLIP-L and CLIP-G side
        by side in width), then T5's t5_length."""
        return {"clip": slice(0, 77), "t5": slice(77, 77 + self.t5_length)}

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond, guidance=None, attn_override=None) -> torch.Tensor:
        """The transformer's output at timestep t (sigma * 1000, as StableDiffusion3Pipeline passes it)."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        return self.transformer(x, t, cond.context.to(x.dtype), cond.pooled.to(x.dtype), attn_override)

    def joint_sites(self, height: int, width: int) -> list[JointSite]:
        h, w = self.latent_grid(height, width)
        return self.transformer.sites(h // self.latent_patch, w // self.latent_patch, 77 + self.t5_length)
