"""Sampling an MM-DiT model (SD3 / SD3.5, Flux: models/mmdit_model.py's protocol) as diffusers' pipelines do.

    for i in range(num_steps):
        override = controller.override(i)            # the joint attention's override at step i, or None
        v = the guided velocity at x, t_i            # SD3: one call on [uncond..., cond...], v = u + g (c - u);
                                                     # Flux: one call, g in its guidance embedding
        x = sampler.step(v, i, x)                    # flow-matching Euler (models/flow.py)
        x = controller.after_step(i, x)              # LocalBlend; advances the controller's step
    images = decode(x)

x_T is (1 or B, C, H/f, W/f), C and f the model's latent channels and VAE downsampling (SD3, Flux: 16 and 8):
one CPU draw from manual_seed(seed), shared by the batch, unless given.
Under classifier-free guidance the override sees the full transformer batch, the conditional rows
second; the unconditional rows' text is the negative prompt ("" by default) through every encoder.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .outputs import Output, check_finite, initial_noise


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


def guidance_batch(m, guidance_scale: float) -> bool:
    """Whether a step runs the classifier-free guidance batch: SD3 above guidance 1, as its pipeline
    (`do_classifier_free_guidance = guidance_scale > 1`); at 1 or below the conditional rows alone."""
    return m.uses_cfg and guidance_scale > 1


def guidance_inputs(m, cond, negative, guidance_scale: float):
    """(the transformer's TextCond, its guidance embedding or None): SD3's batch [uncond..., cond...], the
    negative prompt encoded once per row as diffusers does (a TextCond of one row is expanded), or the
    conditional rows alone at guidance <= 1; Flux's own rows and guidance_scale in each row."""
    rows = cond.context.shape[0]
    if guidance_batch(m, guidance_scale):
        uncond = text_cond(m, [negative] * rows if isinstance(negative, str) else negative)
        if uncond.context.shape[0] == 1:
            uncond = type(uncond)(uncond.context.expand(rows, -1, -1), uncond.pooled.expand(rows, -1))
        return joined(uncond, cond), None
    if m.uses_cfg or not m.guidance_embeds:
        return cond, None
    return cond, torch.full((rows,), float(guidance_scale), device=m.device, dtype=torch.float32)


def guided_velocity(m, x, t, batch_cond, guidance, guidance_scale: float, attn_override=None) -> torch.Tensor:
    """v at latents x (B, C, h, w) and timestep t: with CFG one call on [x, x], v = u + g (c - u)."""
    if not guidance_batch(m, guidance_scale):
        return m.velocity(x, t, batch_cond, guidance, attn_override)
    v_u, v_c = m.velocity(torch.cat([x, x]), t, batch_cond, None, attn_override).chunk(2)
    return v_u + guidance_scale * (v_c - v_u)


def joint_denoise(m, cond, x_T, sampler, guidance_scale: float, negative="", controller=None,
                  progress: bool = True, desc: str = "sampling", correction=None) -> torch.Tensor:
    """The loop of the module docstring from x_T to z0 (B, C, h, w); cond: the prompts' TextCond.
    correction(i, x) -> x, if given, adjusts the latents after step i, before the controller's after_step
    (the source row that follows an inversion: p2p.joint_inversion)."""
    rows = cond.context.shape[0]
    x = x_T.to(m.device, m.dtype).expand(rows, -1, -1, -1)
    batch_cond, guidance = guidance_inputs(m, cond, negative, guidance_scale)
    check_finite(batch_cond.context, "the text encoders' output")
    for i, t in enumerate(tqdm(sampler.timesteps, desc=desc, disable=not progress, leave=False)):
        override = controller.override(i) if controller is not None else None
        v = guided_velocity(m, x, t.to(m.device), batch_cond, guidance, guidance_scale, override)
        x = sampler.step(v, i, x)
        if correction is not None:
            x = correction(i, x)
        if controller is not None:
            x = controller.after_step(i, x)
        check_finite(x, f"the latents after step {i} (t={float(t):.2f})")
    return x


def initial_joint_latent(m, seed: int, height: int, width: int, latents=None, batch: int = 1) -> torch.Tensor:
    """x_T: `latents` if given (1 or B rows), else one CPU draw from manual_seed(seed)."""
    return initial_noise((m.latent_channels, *m.latent_grid(height, width)), seed, height, width, latents, batch)


def to_uint8_rounded(images: torch.Tensor) -> np.ndarray:
    """[0, 1] (N, 3, H, W) -> uint8 (N, H, W, 3), rounded as diffusers' pipelines make their pictures."""
    return (images.float().permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def model_defaults(m, num_steps: int | None, guidance_scale: float | None) -> tuple[int, float]:
    """(num_steps, guidance_scale): those given, else the model's own (`m.default_steps`, `m.default_guidance`:
    SD3 28 and 7.0, FLUX.1-dev 28 and 3.5, schnell 4 and 0.0)."""
    return (m.default_steps if num_steps is None else num_steps,
            m.default_guidance if guidance_scale is None else guidance_scale)


@torch.no_grad()
def joint_generate(m, prompts, *, seed: int = 0, latents=None, num_steps: int | None = None,
                   guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                   negative_prompt="", controller=None, progress: bool = True, correction=None) -> Output:
    """Text-to-image with an MM-DiT model. prompts: strings or their TextCond; negative_prompt: SD3's
    unconditional text (a string or a TextCond of 1 or B rows; Flux has none). Sizes default to the model's
    (`m.default_size`), steps and guidance to its own (`model_defaults`); the schedule is the folder's
    (`m.sampler`). correction: joint_denoise's. Returns images (uint8, rounded), z0, x_T."""
    height, width = height or m.default_size, width or m.default_size
    num_steps, guidance_scale = model_defaults(m, num_steps, guidance_scale)
    cond = text_cond(m, prompts)
    x_T = initial_joint_latent(m, seed, height, width, latents, cond.context.shape[0])
    z0 = joint_denoise(m, cond, x_T, m.sampler(num_steps, height, width), guidance_scale, negative_prompt,
                       controller, progress, correction=correction)
    images = check_finite(m.decode(z0), "the VAE decoder's output")
    return Output(images=to_uint8_rounded(images), latents=z0, x_T=x_T,
                  attention=getattr(controller, "store", None))
