"""Algorithm 1 of the paper: `generate()` (plain text-to-image) and `edit()` (Prompt-to-Prompt).

Both run the reference's loop: one CPU noise draw shared by the batch, classifier-free guidance
with the batch ordered [uncond..., cond...] in one UNet call (two halves in the low-memory mode,
as the reference's LOW_RESOURCE), DDIM with eta 0 (or PLMS, sampler="plms", as the reference's stable
notebook), and images made uint8 by truncation. The loop makes the sampler's UNet calls
(`sampler.calls`, models/sampler.py), knows the index of each and asks the controller for that call's
attention override; nothing advances as a side effect of a forward pass. The controller is built from
the same calls and reads, at each, the row of the (T + 1)-row edit schedules the sampler names: the
reference's counter for DDIM (call i, row i) and PLMS (N steps are N + 1 calls, all N + 1 rows used).
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
from tqdm.auto import tqdm

from .blend import for_model
from .config import EditConfig, GenerateConfig
from .control import Controller
from .joint_control import joint_edit
from .joint_pipeline import is_mmdit, joint_generate
from .outputs import NonFiniteError, Output, check_finite, initial_noise  # noqa: F401  (NonFiniteError: named here too)
from .settings import check_values, refuse_old_names


def picture_size(sd, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width): the ones given, else the model's default size."""
    return height or sd.cfg.default_height, width or sd.cfg.default_width


def initial_latent(sd, seed: int, height: int, width: int, latents=None, batch: int = 1) -> torch.Tensor:
    """x_T: `latents` if given (1 or N rows), else ONE CPU draw from manual_seed(seed), expanded to the batch."""
    sd.cfg.check_size(height, width)
    f = sd.latent_downsample
    return initial_noise((sd.cfg.unet.in_channels, height // f, width // f), seed, height, width, latents, batch)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3), truncating like the reference's latent2image."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)


def guidance(eps_u: torch.Tensor, eps_c: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_u + w (eps_c - eps_u). Affine, so it is the same on the model's own
    predictions (v for a v model) as on the eps they amount to at one x_t."""
    return eps_u + guidance_scale * (eps_c - eps_u)


def guided_step(sd, x, t, uncond, cond, guidance_scale, scheduler, attn_override=None,
                low_memory: bool = False, feature_override=None, uncond_override=None) -> torch.Tensor:
    """One guided sampler step of latents x (B, 4, h, w): the sampling loop's, and the one the inversion
    methods retrace. ONE UNet call on the batch [uncond..., cond...], as the reference; low_memory:
    two calls of B rows, the unconditional one with uncond_override (None: plain, as the reference;
    attn_override must then take the conditional rows alone: `Controller.override(i, cond_only=True)`;
    an attention rule or an injection steers the unconditional call through `Controller.override_uncond(i)`).
    feature_override: the ResBlocks' (models/unet.py), on every call. cond (B, 77, d); uncond (1 or B, 77, d),
    shared by the rows. Guidance runs on the model's own predictions (sd.predict), which the sampler's step
    takes (models/sampler.py)."""
    uncond = uncond.expand(x.shape[0], -1, -1)
    if low_memory:  # the reference's LOW_RESOURCE: half the UNet's activations at a time
        out_u = sd.predict(x, t, uncond, attn_override=uncond_override, feature_override=feature_override)
        out_c = sd.predict(x, t, cond, attn_override=attn_override, feature_override=feature_override)
    else:
        out_u, out_c = sd.predict(torch.cat([x, x]), t, torch.cat([uncond, cond]), attn_override=attn_override,
                                  feature_override=feature_override).chunk(2)
    return scheduler.step(guidance(out_u, out_c, guidance_scale), t, x)


def denoise(sd, cond, uncond, x_T, scheduler, guidance_scale, controller=None, progress=True, desc="sampling",
            correction=None, low_memory: bool = False):
    """The guided sampling loop, one pass per UNet call i of the sampler (scheduler.calls: PLMS evaluates
    its first step twice), i being what the controller is asked about. cond (B, 77, d); uncond (B, 77, d)
    or a list of one per call (null-text, whose samplers make one call per step).

    correction(i, x) -> x, if given, adjusts the latents after step i, before the controller's
    step_callback (Direct Inversion adds its residual to the source row there; see p2p.inversion).
    low_memory: each step's guidance batch in two halves (see guided_step)."""
    x = x_T.to(sd.device, sd.dtype).expand(cond.shape[0], -1, -1, -1)
    for text in [cond, *(uncond if isinstance(uncond, (list, tuple)) else [uncond])]:
        check_finite(text, "the text encoder's output")
    timesteps = [c.timestep for c in scheduler.calls]
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress, leave=False)):
        u = uncond[i] if isinstance(uncond, (list, tuple)) else uncond
        x = guided_step(sd, x, t, u, cond, guidance_scale, scheduler, low_memory=low_memory,
                        **step_overrides(controller, i, low_memory))
        if correction is not None:
            x = correction(i, x)
        if controller is not None:
            x = controller.step_callback(i, x)
        check_finite(x, f"the latents after UNet step {i} (t={t})")
    return x


def step_overrides(controller, i: int, low_memory: bool) -> dict:
    """guided_step's overrides for UNet call i: the controller's attention override (the conditional half's
    alone in the low-memory mode: a controller without that mode need not take cond_only) and, where the
    controller has them, its ResBlock override and the unconditional half's."""
    if controller is None:
        return {}
    out = {"attn_override": controller.override(i, cond_only=True) if low_memory else controller.override(i)}
    if hasattr(controller, "feature_override"):
        out["feature_override"] = controller.feature_override(i)
    if low_memory and hasattr(controller, "override_uncond"):
        out["uncond_override"] = controller.override_uncond(i)
    return out


@contextlib.contextmanager
def visiting(sd, part: str, offload: bool):
    """Sequential offload: with offload, sd.<part> (the text encoder or the VAE) comes to the UNet's
    device for the block and goes back to the CPU after, so that it holds no accelerator memory while
    the UNet runs. Without, nothing moves."""
    module = getattr(sd, part)
    if offload:
        module.to(next(sd.unet.parameters()).device)
    try:
        yield module
    finally:
        if offload:
            module.to("cpu")


def decoded(sd, z0, x_T, low_memory: bool, offload: bool, attention=None) -> Output:
    """The Output of a loop that ended at z0: the VAE's pictures (one at a time and tiled, low_memory) as uint8."""
    with visiting(sd, "vae", offload):
        images = to_uint8(check_finite(sd.decode(z0, low_memory=low_memory), "the VAE decoder's output"))
    return Output(images=images, latents=z0, x_T=x_T, attention=attention)


def unet_only(**given) -> None:
    """Refuse, for an MM-DiT model, a UNet sampling option set away from its default (GenerateConfig's; off;
    None: not given)."""
    said = [f"{k}={v!r}" for k, v in given.items() if v is not None and v != getattr(GenerateConfig, k, False)]
    if said:
        raise ValueError(f"{', '.join(said)}: an MM-DiT model (SD3 / SD3.5 / Flux) samples with its folder's "
                         "flow-matching schedule in one batch; these options are the UNet models' (leave them out)")


@refuse_old_names
@torch.no_grad()
def generate(sd, prompts, *, seed: int = GenerateConfig.seed, latents=None, num_steps: int | None = None,
             guidance_scale: float | None = None, height: int | None = GenerateConfig.height,
             width: int | None = GenerateConfig.width, steps_offset: int = GenerateConfig.steps_offset,
             sampler: str = GenerateConfig.sampler, progress: bool = True, low_memory: bool = False,
             offload: bool = False) -> Output:
    """Plain text-to-image with classifier-free guidance: the loop Algorithm 1 extends. sampler: "ddim"
    (eta 0) or "plms" (also "pndm": PLMS, as the reference's stable notebook: N + 1 UNet calls for N steps),
    one of models.sd.SAMPLERS.
    low_memory: the guidance batch in two halves and the VAE one image at a time (tiled above
    models.sd.TILE latents a side); the same pictures. offload: the text encoder and the VAE stay on
    the CPU and visit the UNet's device only while they run (see `visiting`).
    An MM-DiT model (SD3 / SD3.5 / Flux) samples with p2p.joint_pipeline.joint_generate: flow matching on its
    folder's schedule, guidance as its pipeline (sampler, steps_offset, low_memory and offload are the UNet's).
    num_steps and guidance_scale None: the model's own (an MM-DiT model's: SD3 28 and 7.0, FLUX.1-dev 28 and
    3.5, schnell 4 and 0.0; a UNet's: GenerateConfig's 50 and 7.5)."""
    check_values(GenerateConfig(seed=seed, num_steps=num_steps, guidance_scale=guidance_scale, height=height,
                                width=width, steps_offset=steps_offset, sampler=sampler), "generate()")
    if is_mmdit(sd):
        unet_only(sampler=sampler, steps_offset=steps_offset, low_memory=low_memory, offload=offload)
        return joint_generate(sd, prompts, seed=seed, latents=latents, num_steps=num_steps,
                              guidance_scale=guidance_scale, height=height, width=width, progress=progress)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    num_steps = GenerateConfig.num_steps if num_steps is None else num_steps
    guidance_scale = GenerateConfig.guidance_scale if guidance_scale is None else guidance_scale
    height, width = picture_size(sd, height, width)
    x_T = initial_latent(sd, seed, height, width, latents, len(prompts))
    with visiting(sd, "text_encoder", offload):
        cond = sd.encode_text(prompts)
        uncond = sd.encode_text([""])
    z0 = denoise(sd, cond, uncond, x_T, sd.scheduler(num_steps, steps_offset, sampler), guidance_scale,
                 progress=progress, low_memory=low_memory)
    return decoded(sd, z0, x_T, low_memory, offload)


def mmdit_to(joint_fn):
    """A decorator: the UNet entry point it wraps hands an MM-DiT model (SD3 / SD3.5 / Flux) to `joint_fn`, with
    the same arguments."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(sd, *args, **kwargs):
            return (joint_fn if is_mmdit(sd) else fn)(sd, *args, **kwargs)
        return call
    return wrap


@refuse_old_names
@mmdit_to(joint_edit)
@torch.no_grad()
def edit(sd, prompts, spec=None, *, local_blend=None, seed: int = EditConfig.seed, latents=None,
         num_steps: int | None = None, guidance_scale: float | None = None, height: int | None = EditConfig.height,
         width: int | None = EditConfig.width, steps_offset: int | None = None, sampler: str | None = None, store=None,
         fast: bool = True, progress: bool = True, inversion=None, low_memory: bool = False,
         offload: bool = False, allow_other_model: bool = False,
         source_row: str | None = EditConfig.source_row,
         negative_prompt: str = EditConfig.negative_prompt) -> Output:
    """Prompt-to-Prompt (Algorithm 1): prompts[0] is the source P, prompts[1:] the edited prompts P*.

    All prompts run in one batch from the same x_T; at step t the controller injects the source's
    maps M_t into the edited prompts through `spec` (Replace / Refine / Reweight), and LocalBlend,
    if given, keeps the source latents outside the edited words' mask. `spec=None` is plain
    generation with the attention maps kept (`out.attention`). `store` chooses which maps are kept
    (default: cross-attention maps of layers up to 32x32 in SD v1, as the reference; see AttentionStore).
    low_memory and offload as in generate(): the controller then sees the conditional call alone.

    Defaults (None): EditConfig's, num_steps 50, guidance_scale 7.5, steps_offset 1, sampler "ddim".
    sampler "plms" (also "pndm"): PLMS, N + 1 UNet calls for N steps; the controller reads the schedule
    row of each call the sampler makes (see the module). negative_prompt: the unconditional rows' prompt.
    `inversion` (p2p.invert's result) edits a real image: x_T, the unconditional embedding(s) and any
    per-step correction come from it, prompts[0] must be its prompt, and steps / guidance / offset / size
    are its own (passing a different value is an error; `seed` is unused); it samples with the inversion's
    sampler (one with an inverse step: DDIM). A spec that follows the inversion (PlugAndPlay) takes its own
    steps and guidance instead, and its source row is the inversion's latent at each of its timesteps.
    Other weights than the inversion's are an error, a warning with allow_other_model (Inversion.check_model).
    source_row: how the source row follows the inversion (Inversion.source_correction; None: the method's).
    An MM-DiT model goes to joint_control.joint_edit (docs/mmdit-p2p.md): maps only in a given store."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    follow = inversion is not None and getattr(spec, "follows_inversion", False)
    num_steps, guidance_scale, steps_offset, height, width, latents, sampler = edit_settings(
        sd, prompts, spec, inversion, allow_other_model, num_steps, guidance_scale, steps_offset, height, width,
        latents, sampler)
    check_values(EditConfig(seed=seed, num_steps=num_steps, guidance_scale=guidance_scale, height=height, width=width,
                            steps_offset=steps_offset, sampler=sampler, negative_prompt=negative_prompt,
                            source_row=source_row), "edit()")
    if source_row is not None and inversion is None:
        raise ValueError(f"source_row={source_row!r} says how the source row follows an inversion: pass inversion=")
    height, width = picture_size(sd, height, width)
    scheduler = sd.scheduler(num_steps, steps_offset, sampler)
    latents, correction = inversion.source_path(sd, scheduler) if follow else (latents, None)
    x_T = initial_latent(sd, seed, height, width, latents, len(prompts))
    local_blend = for_model(local_blend, sd)  # LocalBlend(level=None): the model's recommended level
    controller = Controller(sd.tokenizer, prompts, spec, num_steps, sd.unet.sites, local_blend, store, fast,
                            calls=scheduler.calls, default_side=sd.cfg.image_size, feature_sites=sd.unet.feature_sites)
    with visiting(sd, "text_encoder", offload):
        cond, uncond, own = edit_texts(sd, prompts, spec, negative_prompt, None if follow else inversion, follow,
                                       scheduler, source_row)
    z0 = denoise(sd, cond, uncond, x_T, scheduler, guidance_scale, controller, progress=progress,
                 desc="Prompt-to-Prompt", correction=correction or own, low_memory=low_memory)
    return decoded(sd, z0, x_T, low_memory, offload, controller.store)


def edit_settings(sd, prompts, spec, inversion, allow_other_model: bool, *given) -> tuple:
    """edit()'s (num_steps, guidance_scale, steps_offset, height, width, latents, sampler): those `given`, with
    an inversion's own (Inversion.edit_settings, or .follow_settings for a spec that follows it), then
    EditConfig's defaults for those still None."""
    names = ("num_steps", "guidance_scale", "steps_offset", "height", "width", "latents", "sampler")
    values = dict(zip(names, given))
    if inversion is not None:
        inversion.check_model(sd, allow_other_model)
        follow = getattr(spec, "follows_inversion", False)
        values = (inversion.follow_settings if follow else inversion.edit_settings)(prompts, *given)
    for key in ("num_steps", "guidance_scale", "steps_offset", "sampler"):  # None: the inversion's, else these
        values[key] = getattr(EditConfig, key) if values[key] is None else values[key]
    return tuple(values[k] for k in names)


def edit_texts(sd, prompts, spec, negative_prompt: str, inversion=None, inverted: bool = False, scheduler=None,
               source_row=None):
    """(cond, uncond, correction) of an edit: the inversion's unconditional embedding(s) and correction if it
    has them, else the rows' prompts as the spec gives them (Edit.row_prompts; inverted: its source row
    follows an inversion) and no correction."""
    if inversion is not None:
        if negative_prompt:
            raise ValueError(f"negative_prompt={negative_prompt!r} with a {inversion.method!r} inversion: an edit "
                             f"from an inversion uses the inversion's unconditional embedding (leave it out)")
        cond = sd.encode_text(prompts)
        return (cond, *inversion.guidance_inputs(sd, cond, scheduler, source_row))
    rows = spec.row_prompts(prompts, negative_prompt, inverted) if spec is not None else (prompts, [negative_prompt])
    return sd.encode_text(rows[0]), sd.encode_text(rows[1]), None
