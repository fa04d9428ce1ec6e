"""Real photographs on MM-DiT models (SD3 / SD3.5 / Flux): inversion by the reverse Euler ODE, and the edits
and reconstructions from it (what p2p.invert, p2p.edit and p2p.inversion.reconstruct run for such a model).

Flow matching samples x(sigma_{i+1}) = x(sigma_i) + (sigma_{i+1} - sigma_i) v(x(sigma_i), sigma_i) down the
folder's schedule sigma_0 ~ 1 > ... > sigma_N = 0. The inversion walks the same schedule back from the photo's
latent z0 = m.encode(photo) at sigma_N = 0 up to x_T at sigma_0: x(sigma_i) = x(sigma_{i+1}) +
(sigma_i - sigma_{i+1}) v(x(sigma_{i+1}), sigma_{i+1}) (FlowMatchEuler.inverse_step), the velocity taken
where each step starts, under the source prompt. Euler's error is first order in the step size, so sampling
back from x_T gives the photo to the sampler's accuracy: closer as the steps grow (docs/mmdit-p2p.md has the
measured errors). Guidance: SD3 with classifier-free guidance at `guidance_scale` (default 1.0: the
conditional rows alone, the usual flow-inversion practice); Flux its distilled guidance embedding (default
the model's own: FLUX.1-dev 3.5; schnell embeds none).

trajectory[k] is the latent after k inversion steps (at sigma_{N-k}): trajectory[0] = z0, trajectory[N] = x_T,
as p2p.inversion's. An edit from it starts every row at x_T, and its source row (`source_row`, as a UNet
inversion's): "free" (the default) samples like the other rows; "trajectory" is set after every step to the
trajectory's latent at the step's sigma, so it ends on z0 exactly; "inputs" the same, but the last step's
output is kept.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .fingerprint import fingerprint
from .images import load_image
from .joint_pipeline import guidance_inputs, guided_velocity, joint_denoise, model_defaults, text_cond
from .outputs import check_finite

METHOD = "flow"             # p2p.settings.METHODS' name of this inversion
SAMPLER = "flow-euler"      # what a saved Inversion records as its sampler (models.flow.FlowMatchEuler)
PREDICTION = "flow"         # its prediction type: a velocity
SOURCE_ROWS = ("trajectory", "inputs", "free")  # of p2p.settings.SOURCE_ROWS, those this inversion serves


def inversion_defaults(m) -> dict:
    """What invert() takes on an MM-DiT model when given none: the reverse-Euler method, the model's own steps,
    and guidance 1.0 on SD3 (conditional only), the model's own distilled guidance on Flux."""
    steps, guidance = model_defaults(m, None, None)
    return {"method": METHOD, "num_steps": steps, "guidance_scale": 1.0 if m.uses_cfg else guidance}


def photo_input(m, image, height: int | None, width: int | None, offsets=(0, 0, 0, 0)) -> torch.Tensor:
    """The photo as m.encode's input, (1, 3, H, W) in [0, 1]: a (1, 3, H, W) tensor in [-1, 1] (p2p.invert's
    convention) as it is, else a path or PIL image loaded at height x width (default: the model's size)."""
    if not torch.is_tensor(image):
        height, width = height or m.default_size, width or m.default_size
        m.latent_grid(height, width)
        return (load_image(image, height, width, offsets, m.token_side) + 1) / 2
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"an image tensor must be (1, 3, H, W) in [-1, 1], got {tuple(image.shape)}")
    m.latent_grid(image.shape[2], image.shape[3])
    return (image + 1) / 2


@torch.no_grad()
def flow_trajectory(m, z0: torch.Tensor, cond, sampler, guidance_scale: float, progress: bool = True) -> list:
    """z0 -> [z0, ..., x_T]: the reverse Euler walk of the module docstring, one transformer call per step."""
    batch_cond, guidance = guidance_inputs(m, cond, "", guidance_scale)
    z, trajectory = z0, [z0]
    for i in tqdm(range(sampler.num_steps - 1, -1, -1), desc="flow inversion", disable=not progress, leave=False):
        t = (sampler.sigmas[i + 1] * m.flow.num_train_timesteps).to(m.device)
        z = sampler.inverse_step(guided_velocity(m, z, t, batch_cond, guidance, guidance_scale), i, z)
        trajectory.append(check_finite(z, f"the latents after inversion step {sampler.num_steps - i}"))
    return trajectory


def joint_inversion(m, image, prompt: str, method: str | None = None, num_steps: int | None = None,
                    guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                    offsets=(0, 0, 0, 0), progress: bool = True) -> dict:
    """The fields of a p2p.Inversion of `image` under `prompt` by the reverse Euler ODE (None: inversion_defaults)."""
    own = inversion_defaults(m)
    method = own["method"] if method is None else method
    if method != METHOD:
        raise ValueError(f"method={method!r}: an MM-DiT model ({m.family}) is inverted by the reverse Euler ODE, "
                         f"method={METHOD!r} (the default); the other methods are the UNet models'")
    num_steps = own["num_steps"] if num_steps is None else num_steps
    guidance_scale = own["guidance_scale"] if guidance_scale is None else guidance_scale
    x = photo_input(m, image, height, width, offsets)
    height, width = x.shape[2:]
    sampler = m.sampler(num_steps, height, width)
    with torch.no_grad():
        z0 = m.encode(x)
        cond = text_cond(m, [prompt])
    trajectory = flow_trajectory(m, z0, cond, sampler, guidance_scale, progress)
    return dict(method=method, prompt=prompt, num_steps=num_steps, guidance_scale=float(guidance_scale),
                steps_offset=0, height=int(height), width=int(width), x_T=trajectory[-1], trajectory=trajectory,
                info={"offsets": list(offsets)}, model=fingerprint(m), sampler=SAMPLER, prediction_type=PREDICTION,
                scale_factor=m.scaling_factor, shift_factor=m.shift_factor)


def source_mode(source_row: str | None) -> str:
    """The source row's rule (None: "free"); "residual" is Direct Inversion's, which this inversion has not."""
    mode = "free" if source_row is None else source_row
    if mode not in SOURCE_ROWS:
        raise ValueError(f"source_row={source_row!r}: an MM-DiT inversion's source row is one of "
                         f"{', '.join(SOURCE_ROWS)} ('residual' adds Direct Inversion's residuals, a UNet method's)")
    return mode


def source_correction(inversion, source_row: str | None = None):
    """correction(i, x) -> x after step i (joint_denoise) for the source row's rule (module docstring), or None."""
    mode = source_mode(source_row)
    if mode == "free":
        return None
    n = inversion.num_steps
    path = [inversion.trajectory[n - 1 - i] for i in range(n - 1)]  # after step i: the latent at sigma_{i+1}
    path.append(inversion.trajectory[0] if mode == "trajectory" else None)
    return lambda i, x: x if path[i] is None else torch.cat([path[i].to(x), x[1:]])


def check_inverted(m, inversion, allow_other_model: bool) -> None:
    """The inversion fits this model: made by this module (not a UNet's), with its weights (Inversion.check_model)."""
    if inversion.sampler != SAMPLER:
        raise ValueError(f"this inversion was made with a UNet model ({inversion.method!r}, sampler "
                         f"{inversion.sampler!r}): invert the photo again with this {m.family} model")
    inversion.check_model(m, allow_other_model)


def edit_settings(m, inversion, prompts, num_steps, guidance_scale, height, width, latents, negative_prompt,
                  allow_other_model: bool) -> tuple:
    """(num_steps, guidance_scale, height, width, x_T) of an edit from `inversion`: its steps and size (another
    value is an error), its guidance unless one is given (a free source row then drifts from the photo; a
    trajectory one does not), its x_T."""
    check_inverted(m, inversion, allow_other_model)
    if not prompts or prompts[0] != inversion.prompt:
        raise ValueError(f"prompts[0] must be the inverted prompt {inversion.prompt!r}, got "
                         f"{prompts[0] if prompts else None!r}")
    if latents is not None:
        raise ValueError("an edit from an inversion starts from its x_T: do not pass latents as well")
    if negative_prompt:
        raise ValueError(f"negative_prompt={negative_prompt!r} with an inversion: it was made with the empty "
                         "negative prompt, which its edits keep (leave it out)")
    for key, value in (("num_steps", num_steps), ("height", height), ("width", width)):
        if value is not None and value != getattr(inversion, key):
            raise ValueError(f"{key}={value} conflicts with the inversion's {key}={getattr(inversion, key)}; an "
                             f"edit from an inversion samples its steps at its size (leave {key} out)")
    guidance_scale = inversion.guidance_scale if guidance_scale is None else guidance_scale
    return inversion.num_steps, guidance_scale, inversion.height, inversion.width, inversion.x_T


@torch.no_grad()
def joint_reconstruct(m, inversion, progress: bool = True, allow_other_model: bool = False,
                      source_row: str | None = None) -> torch.Tensor:
    """z0 (1, 16, h, w) sampled back from the inversion's x_T under its prompt and guidance (the source row of
    an edit from it, under the same `source_row` rule)."""
    check_inverted(m, inversion, allow_other_model)
    sampler = m.sampler(inversion.num_steps, inversion.height, inversion.width)
    return joint_denoise(m, text_cond(m, [inversion.prompt]), inversion.x_T, sampler, inversion.guidance_scale,
                         progress=progress, desc="reconstruction", correction=source_correction(inversion, source_row))
