"""Sampling an MM-DiT model (SD3 / SD3.5, Flux: models/mmdit_model.py's protocol) as diffusers' pipelines do.

    for i in range(num_steps):
        override = controller.override(i)            # the joint attention's override at step i, or None
        v = the guided velocity at x, t_i            # SD3: one call on [uncond..., cond...], v = u + g (c - u);
                                                     # Flux: one call, g in its guidance embedding
        x = sampler.step(v, i, x)                    # flow-matching Euler (models/flow.py)
        x = controller.after_step(i, x)              # LocalBlend; advances the controller's step
    images = decode(x)

x_T is (1 or B, 16, H/8, W/8): one CPU draw from manual_seed(seed), shared by the batch, unless given.
Under classifier-free guidance the override sees the full transformer batch, the conditional rows
second; the unconditional rows' text is the negative prompt ("" by default) through every encoder.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .outputs import Output, check_finite


def is_mmdit(model) -> bool:
    """Whether a model follows the MM-DiT protocol (a velocity, not a UNet's eps)."""
    return callable(getattr(model, "velocity", None))


def text_cond(m, prompts):
    """TextCond of prompts: encoded by the model's text module, or a TextCond given as is."""
    if hasattr(prompts, "context") and hasattr(prompts, "pooled"):
        return prompts
    return m.encode_prompts([prompts] if isinstance(prompts, str) else list(prompts))


def joined(a, b):
    """The TextCond of a's rows then b's (the guidance batch [uncond..., cond...])."""
    return type(a)(torch.cat([a.context, b.context]), torch.cat([a.pooled, b.pooled]))


def guidance_inputs(m, cond, negative, guidance_scale: float):
    """(the transformer's TextCond, its guidance embedding or None): SD3's batch [uncond..., cond...], the
    negative prompt encoded once per row as diffusers does (a TextCond of one row is expanded); Flux's own rows and guidance_scale in each row."""
    rows = cond.context.shape[0]
    if m.uses_cfg:
        uncond = text_cond(m, [negative] * rows if isinstance(negative, str) else negative)
        if uncond.context.shape[0] == 1:
            uncond = type(uncond)(uncond.context.expand(rows, -1, -1), uncond.pooled.expand(rows, -1))
        return joined(uncond, cond), None
    g = torch.full((rows,), float(guidance_scale), device=m.device, dtype=torch.float32)
    return cond, (g if m.guidance_embeds else None)


def guided_velocity(m, x, t, batch_cond, guidance, guidance_scale: float, attn_override=None) -> torch.Tensor:
    """v at latents x (B, 16, h, w) and timestep t: with CFG one call on [x, x], v = u + g (c - u)."""
    if not m.uses_cfg:
        return m.velocity(x, t, batch_cond, guidance, attn_override)
    v_u, v_c = m.velocity(torch.cat([x, x]), t, batch_cond, None, attn_override).chunk(2)
    return v_u + guidance_scale * (v_c - v_u)


def joint_denoise(m, cond, x_T, sampler, guidance_scale: float, negative="", controller=None,
                  progress: bool = True, desc: str = "sampling") -> torch.Tensor:
    """The loop of the module docstring from x_T to z0 (B, 16, h, w); cond: the prompts' TextCond."""
    rows = cond.context.shape[0]
    x = x_T.to(m.device, m.dtype).expand(rows, -1, -1, -1)
    batch_cond, guidance = guidance_inputs(m, cond, negative, guidance_scale)
    check_finite(batch_cond.context, "the text encoders' output")
    for i, t in enumerate(tqdm(sampler.timesteps, desc=desc, disable=not progress, leave=False)):
        override = controller.override(i) if controller is not None else None
        v = guided_velocity(m, x, t.to(m.device), batch_cond, guidance, guidance_scale, override)
        x = sampler.step(v, i, x)
        if controller is not None:
            x = controller.after_step(i, x)
        check_finite(x, f"the latents after step {i} (t={float(t):.2f})")
    return x


def initial_joint_latent(m, seed: int, height: int, width: int, latents=None, batch: int = 1) -> torch.Tensor:
    """x_T: `latents` if given (1 or B rows), else one CPU draw from manual_seed(seed)."""
    shape = (m.latent_channels, *m.latent_grid(height, width))
    if latents is None:
        return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))
    latents = torch.as_tensor(latents)
    if latents.dim() != 4 or tuple(latents.shape[1:]) != shape or latents.shape[0] not in (1, batch):
        raise ValueError(f"latents must have shape (1 or {batch}, {', '.join(map(str, shape))}) for a "
                         f"{height} x {width} picture, got {tuple(latents.shape)}")
    return latents


def to_uint8_rounded(images: torch.Tensor) -> np.ndarray:
    """[0, 1] (N, 3, H, W) -> uint8 (N, H, W, 3), rounded as diffusers' pipelines make their pictures."""
    return (images.float().permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def joint_generate(m, prompts, *, seed: int = 0, latents=None, num_steps: int = 28, guidance_scale: float = 7.0,
                   height: int | None = None, width: int | None = None, negative_prompt="", controller=None,
                   progress: bool = True) -> Output:
    """Text-to-image with an MM-DiT model. prompts: strings or their TextCond; negative_prompt: SD3's
    unconditional text (a string or a TextCond of 1 or B rows; Flux has none). Sizes default to the model's
    (`m.default_size`); the schedule is the folder's (`m.sampler`). Returns images (uint8, rounded), z0, x_T."""
    height, width = height or m.default_size, width or m.default_size
    cond = text_cond(m, prompts)
    x_T = initial_joint_latent(m, seed, height, width, latents, cond.context.shape[0])
    z0 = joint_denoise(m, cond, x_T, m.sampler(num_steps, height, width), guidance_scale, negative_prompt,
                       controller, progress)
    images = check_finite(m.decode(z0), "the VAE decoder's output")
    return Output(images=to_uint8_rounded(images), latents=z0, x_T=x_T,
                  attention=getattr(controller, "store", None))
