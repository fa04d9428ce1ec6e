"""Real photographs: invert an image into the sampler's x_T, then edit it with Prompt-to-Prompt.

Four methods; `invert()` runs one, `edit(sd, prompts, spec, inversion=inv)` edits from it.

- "ddim": DDIM inversion as the null-text notebook does it (Mokady et al. 2022, Sec. 3.1):
  conditional only (guidance 1), eps evaluated at the DESTINATION timestep,
  z*_{t} = DDIM_next(eps(z*_{t-1}, t, C), t). Exact only as the step size goes to 0; with the
  usual guidance 7.5 when editing, the reconstruction drifts.
- "null-text": null-text inversion (Mokady, Hertz, Aberman, Pritch, Cohen-Or, "Null-text
  Inversion for Editing Real Images using Guided Diffusion Models", CVPR 2023). Starting from
  z_T = z*_T, for each step the unconditional embedding {empty}_t is tuned so that one guided DDIM
  step lands on the DDIM-inversion latent z*_{t-1}. As the reference: a fresh Adam per step with
  lr 1e-2 (1 - i/100), up to `num_inner_steps` iterations, stop when the loss (taken before the
  update) is below eps + 2e-5 i, warm start from the previous step's embedding.
  Cost: 1 + 2k UNet evaluations per step (k inner iterations, each a forward and a backward).
- "negative-prompt": negative-prompt inversion (Miyake, Iohara, Saito, Tanaka, "Negative-prompt
  Inversion: Fast Image Inversion for Editing with Text-guided Diffusion Models", 2023): DDIM
  inversion, then the SOURCE prompt's embedding stands in for the null-text one while editing,
  for every row. No optimisation: the cost of DDIM inversion.
- "direct": Direct Inversion (Ju, Zhang, Liu, Wu, Xu, "PnP Inversion: Boosting Diffusion-based
  Editing with 3 Lines of Code" (Direct Inversion), ICLR 2024): DDIM inversion, then one guided
  pass along the inversion trajectory storing each step's residual r_t = z*_{t-1} - step(z_t). While
  editing, the source row's latent gets r_t added after each step (before LocalBlend, as their
  code), so the source branch reproduces the inversion trajectory exactly; the edited rows do
  not. Cost: DDIM inversion plus one guided pass.

Memory (null-text): the UNet's parameters never require grad during the optimisation (restored
afterwards); the unconditional embedding is the only leaf, and grad is enabled only around the
inner loop. The reference left `requires_grad` on, which allocates a .grad per weight.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm.auto import tqdm

from safetensors.torch import save as safetensors_bytes

from models.sampler import has_inverse_step
from models.sd import SAMPLERS
from weights_tools.files import write_bytes_atomic

from .config import InvertConfig
from .settings import METHODS, check_values, refuse_old_names
from .fingerprint import DTYPES, Fingerprint, fingerprint
from .images import load_image
from .pipeline import denoise, guidance, guided_step, picture_size

FORMAT = "p2p-inversion"
SETTINGS = ("num_steps", "guidance_scale", "steps_offset", "height", "width")  # what an edit from it reuses


def require_inverse_step(sampler, what: str) -> None:
    """An inversion and the edits from it run a sampler with an inverse step (models/sampler.py): its
    trajectory, null-text's embeddings and Direct Inversion's residuals belong to that sampler's steps,
    one UNet call each. sampler: a name of SAMPLERS, or None (the default, DDIM)."""
    if sampler is None:
        return
    if sampler not in SAMPLERS:
        raise ValueError(f"{what}: unknown sampler {sampler!r}; known samplers: {', '.join(SAMPLERS)}")
    if not has_inverse_step(SAMPLERS[sampler]):
        invertible = [name for name, cls in SAMPLERS.items() if has_inverse_step(cls)]
        raise ValueError(f"{what}: sampler={sampler!r} with an inversion: inversion and the edits from it need "
                         f"DDIM or another sampler with an inverse step (inverse_step), whose steps the inversion "
                         f"retraces, and {SAMPLERS[sampler].__name__} has none; leave the sampler out (or use "
                         f"{', '.join(map(repr, invertible))}), or use {sampler!r} for generated pictures only")


@dataclass
class Inversion:
    """What editing a real image needs. trajectory[k] is the DDIM-inversion latent after k steps:
    trajectory[0] = z_0 (the image's latents), trajectory[-1] = z*_T = x_T; each (1, 4, h, w).
    uncond_embeddings[i] (77, d), fp32, is null-text's {empty}_t for denoising step i (None for the others);
    residuals[i] (1, 4, h, w) is Direct Inversion's correction after step i (None for the others)."""
    method: str
    prompt: str
    num_steps: int
    guidance_scale: float
    steps_offset: int
    height: int
    width: int
    x_T: torch.Tensor
    trajectory: list
    uncond_embeddings: list | None = None
    residuals: list | None = None
    info: dict = field(default_factory=dict)  # inner iterations and losses per step, inversion settings
    model: Fingerprint | None = None  # the weights it was made with (None: saved before inversions recorded it)
    sampler: str = "ddim"  # the one it retraces, with an inverse step (see require_inverse_step)

    @property
    def image_latents(self) -> torch.Tensor:
        return self.trajectory[0]

    # ------------------------------------------------------------------ editing from it
    def edit_settings(self, prompts, num_steps=None, guidance_scale=None, steps_offset=None, height=None,
                      width=None, latents=None, sampler=None) -> dict:
        """The sampling settings an edit from this inversion runs with; a clear error on any conflict."""
        require_inverse_step(sampler, "edit()")
        if sampler is not None and sampler != self.sampler:
            raise ValueError(f"sampler={sampler!r} conflicts with the inversion's sampler={self.sampler!r}; an edit "
                             f"from an inversion samples with the sampler it retraces (leave sampler out)")
        if not prompts or prompts[0] != self.prompt:
            raise ValueError(f"prompts[0] must be the inverted prompt {self.prompt!r}, got "
                             f"{prompts[0] if prompts else None!r}")
        if latents is not None:
            raise ValueError("an edit from an inversion starts from its x_T: do not pass latents as well")
        mine = {k: getattr(self, k) for k in SETTINGS}
        given = dict(zip(SETTINGS, (num_steps, guidance_scale, steps_offset, height, width)))
        for key, value in given.items():
            if value is not None and value != mine[key]:
                raise ValueError(f"{key}={value} conflicts with the inversion's {key}={mine[key]}; "
                                 f"an edit from an inversion uses the inversion's settings (leave {key} out)")
        return mine | {"latents": self.x_T, "sampler": self.sampler}

    def follow_settings(self, prompts, num_steps=None, guidance_scale=None, steps_offset=None, height=None,
                        width=None, latents=None, sampler=None) -> dict:
        """The settings of an edit whose source row follows this inversion (Edit.follows_inversion): its own
        steps and guidance, this inversion's size, offset and sampler (a conflict is an error)."""
        mine = self.edit_settings(prompts, self.num_steps, self.guidance_scale, steps_offset, height, width,
                                  latents, sampler)
        return mine | {"num_steps": num_steps, "guidance_scale": guidance_scale, "latents": None}

    def source_path(self, sd, scheduler):
        """(x_T, correction) of an edit whose source row is this inversion's stored latent at each of the edit's
        timesteps (scheduler.calls): x_T is the latent at the first, and correction(i, x) sets the source row
        after step i to the latent at the next (after the last, the image's latents). The edit's timesteps must
        be among this inversion's; an error lists the step counts whose are."""
        ours = step_timesteps(sd.scheduler(self.num_steps, self.steps_offset, self.sampler))[::-1]
        at = {int(t): z for t, z in zip(ours, self.trajectory[1:])}
        wanted = [int(t) for t in step_timesteps(scheduler)]
        missing = [t for t in wanted if t not in at]
        if missing:
            fits = [n for n in range(1, self.num_steps + 1) if self._serves(sd, n, at)]
            raise ValueError(f"the edit's timesteps {missing[:8]} are not among the {self.num_steps}-step inversion's "
                             f"({ours[0]}, {ours[1] if len(ours) > 1 else ''}..., {ours[-1]}), whose stored latents "
                             f"drive the source row: edit with num_steps one of {fits}, or invert with more steps")
        dev = dict(device=sd.device, dtype=sd.dtype)
        path = [at[t].to(**dev) for t in wanted[1:]] + [self.trajectory[0].to(**dev)]
        return at[wanted[0]], lambda i, x: torch.cat([path[i], x[1:]])

    def _serves(self, sd, n: int, at: dict) -> bool:
        """Whether an n-step edit's timesteps are all among this inversion's (`at`)."""
        try:
            return all(int(t) in at for t in step_timesteps(sd.scheduler(n, self.steps_offset, self.sampler)))
        except ValueError:  # an offset n steps cannot take
            return False

    def guidance_inputs(self, sd, cond: torch.Tensor):
        """(uncond, correction) for `pipeline.denoise`: the unconditional embedding(s) every row gets,
        and the per-step latent correction (Direct Inversion) or None. cond: (B, 77, d), row 0 the source."""
        dev = dict(device=sd.device, dtype=sd.dtype)
        if self.method == "null-text":  # the same {empty}_t for the source and the edited rows, as the reference
            return [u.to(**dev)[None] for u in self.uncond_embeddings], None
        if self.method == "negative-prompt":  # the source prompt's embedding as the unconditional one
            return cond[:1], None
        uncond = sd.encode_text([""])
        if self.method == "direct":
            residuals = [r.to(**dev) for r in self.residuals]
            # only the source row is corrected: it then retraces the inversion trajectory
            return uncond, lambda i, x: torch.cat([x[:1] + residuals[i], x[1:]])
        return uncond, None

    def check_model(self, sd, allow_other_model: bool = False) -> None:
        """An error (a warning with allow_other_model) when `sd` holds other weights than the model this
        inversion was made with: its x_T and embeddings reconstruct the photo with that model only."""
        if self.model is None:
            warnings.warn("this inversion was saved without the fingerprint of the model it was made with (an "
                          "older p2p): it cannot be checked against this model; invert the photo again to record it",
                          stacklevel=3)
            return
        mine = fingerprint(sd)
        if self.model.matches(mine):
            return
        what = (f"this inversion was made with the model {self.model}, not with this one, {mine}: it reconstructs "
                "the photo only with the weights it was made with")
        if not allow_other_model:
            raise ValueError(f"{what}. Invert the photo again with this model, or edit anyway with "
                             "allow_other_model=True (p2p edit --allow-other-model)")
        warnings.warn(f"{what}; editing anyway (allow_other_model)", stacklevel=3)

    # ------------------------------------------------------------------ files
    def to_bytes(self) -> bytes:
        """One safetensors file: the tensors, and every setting as JSON in its metadata."""
        tensors = {"x_T": self.x_T, "trajectory": torch.cat(list(self.trajectory))}
        if self.uncond_embeddings is not None:
            tensors["uncond_embeddings"] = torch.stack(list(self.uncond_embeddings))
        if self.residuals is not None:
            tensors["residuals"] = torch.cat(list(self.residuals))
        meta = {k: getattr(self, k) for k in ("method", "prompt", "sampler", *SETTINGS)} | {"info": self.info}
        if self.model is not None:
            tensors["model_sample"] = self.model.sample
            meta["model"] = {"layout": self.model.layout, "dtype": self.model.dtype, "digest": self.model.digest}
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        return safetensors_bytes(tensors, {"format": FORMAT, "inversion": json.dumps(meta)})

    def save(self, path) -> Path:
        """The file `to_bytes` makes, written atomically."""
        return write_bytes_atomic(path, self.to_bytes())

    @classmethod
    def load(cls, path) -> "Inversion":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"inversion file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types for a file that is not one
            raise ValueError(f"{path} is not a safetensors file ({err})") from None
        if metadata.get("format") != FORMAT or "inversion" not in metadata:
            raise ValueError(f"{path} is a safetensors file but not a saved Inversion (no {FORMAT!r} metadata)")
        meta = check_saved(path, metadata["inversion"], tensors)
        model = meta.pop("model", None)
        model = None if model is None else Fingerprint(model["layout"], tensors["model_sample"], model["dtype"])
        return cls(**meta, model=model,
                   x_T=tensors["x_T"], trajectory=list(tensors["trajectory"][:, None]),
                   uncond_embeddings=list(tensors["uncond_embeddings"]) if "uncond_embeddings" in tensors else None,
                   residuals=list(tensors["residuals"][:, None]) if "residuals" in tensors else None)


SAVED_TYPES = {"method": str, "prompt": str, "num_steps": int, "guidance_scale": (int, float), "steps_offset": int,
               "height": int, "width": int, "info": dict}  # a saved Inversion's metadata (SETTINGS and the rest)
OPTIONAL = {"model": dict, "sampler": str}  # absent from files saved before inversions recorded them (sampler: ddim)


def check_saved(path, text: str, tensors: dict) -> dict:
    """The metadata of a saved Inversion, checked with its tensors before anything is built from them."""
    def bad(why):
        return ValueError(f"{path}: not a usable saved Inversion: {why}; make it again with `p2p invert`")

    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad(f"its metadata is not JSON ({e})") from None
    if not isinstance(meta, dict) or not SAVED_TYPES.keys() <= meta.keys() <= SAVED_TYPES.keys() | OPTIONAL.keys():
        got = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise bad(f"its metadata must have the keys {sorted(SAVED_TYPES)} (and optionally {sorted(OPTIONAL)}), "
                  f"has {str(got)[:200]}")
    for key, kind in (SAVED_TYPES | OPTIONAL).items():
        if key in meta and (not isinstance(meta[key], kind) or isinstance(meta[key], bool) or meta[key] != meta[key]):
            name = kind.__name__ if isinstance(kind, type) else "number"
            raise bad(f"{key!r} is {str(meta[key])[:80]!r}, not a {name}")
    if meta["method"] not in METHODS or not 1 <= meta["num_steps"] <= 1000:
        raise bad(f"method {meta['method'][:40]!r} / num_steps {meta['num_steps']} (methods: {', '.join(METHODS)})")
    sampler = meta.get("sampler", "ddim")
    if not has_inverse_step(SAMPLERS.get(sampler)):
        raise bad(f"sampler {sampler[:40]!r} is not a known sampler with an inverse step")
    check_saved_tensors(tensors, meta["num_steps"], meta["method"], bad)
    check_saved_model(meta.get("model"), tensors.get("model_sample"), bad)
    return meta


def check_saved_model(model: dict | None, sample, bad) -> None:
    """The model's fingerprint: its layout hash and dtype, a finite 1-D sample, and the digest they give."""
    if model is None:
        if sample is not None:
            raise bad("it holds model_sample but no 'model' entry in its metadata")
        return
    if model.keys() != {"layout", "dtype", "digest"} or not all(isinstance(v, str) for v in model.values()):
        raise bad(f"'model' must map layout, dtype and digest to strings, got {str(model)[:200]}")
    if model["dtype"] not in DTYPES or len(model["layout"]) != 64:
        raise bad(f"'model' has dtype {model['dtype'][:40]!r} (one of {', '.join(DTYPES)}) and layout "
                  f"{model['layout'][:80]!r} (a SHA-256 hex digest)")
    if sample is None or sample.dim() != 1 or not sample.is_floating_point() or not bool(torch.isfinite(sample).all()):
        raise bad("model_sample must be a finite 1-D float tensor, got "
                  f"{None if sample is None else (tuple(sample.shape), str(sample.dtype))}")
    if Fingerprint(model["layout"], sample, model["dtype"]).digest != model["digest"]:
        raise bad(f"the model's digest {model['digest'][:40]!r} is not the one its layout and sample give")


def check_saved_tensors(tensors: dict, n: int, method: str, bad) -> None:
    """x_T (1, C, h, w); trajectory (n + 1, C, h, w) ending at x_T; null-text's embeddings (n, K, d) and
    Direct Inversion's residuals (n, C, h, w) where the method has them."""
    x = tensors.get("x_T")
    if x is None or x.dim() != 4 or x.shape[0] != 1:
        raise bad(f"x_T must be a (1, C, h, w) tensor, got {None if x is None else tuple(x.shape)}")
    want = {"trajectory": (n + 1, *x.shape[1:])}
    if method == "null-text":
        want["uncond_embeddings"] = (n, *tensors.get("uncond_embeddings", torch.empty(0, 0, 0)).shape[1:])
    if method == "direct":
        want["residuals"] = (n, *x.shape[1:])
    for key, shape in want.items():
        t = tensors.get(key)
        if t is None or tuple(t.shape) != shape or (key == "uncond_embeddings" and t.dim() != 3):
            raise bad(f"{key} must have shape {shape}, got {None if t is None else tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise bad(f"{key} holds nan or inf")


# ---------------------------------------------------------------------------------- the methods
@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """Parameters that do not require grad (no .grad buffers, no weight gradients), restored after."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def step_timesteps(scheduler) -> list[int]:
    """The timesteps of the sampler's calls, which the inversions retrace one per step (call i reading row i)."""
    calls = scheduler.calls
    if [c.row for c in calls] != list(range(scheduler.num_steps)):
        raise ValueError(f"the inversions retrace one UNet call per step, but {type(scheduler).__name__} makes "
                         f"{len(calls)} calls for {scheduler.num_steps} steps (reading the rows "
                         f"{[c.row for c in calls]}); invert with a sampler of one call per step, such as 'ddim'")
    return [c.timestep for c in calls]


@torch.no_grad()
def ddim_inversion(sd, z0: torch.Tensor, cond: torch.Tensor, scheduler, progress: bool = True) -> list:
    """z_0 -> [z*_0, ..., z*_T], conditional only, eps at the destination timestep (as the reference's ddim_loop)."""
    z, trajectory = z0, [z0]
    for t in tqdm(step_timesteps(scheduler)[::-1], desc="DDIM inversion", disable=not progress, leave=False):
        z = scheduler.inverse_step(sd.eps(z, t, cond), t, z)
        trajectory.append(z)
    return trajectory


def null_text_optimization(sd, trajectory, cond, uncond, scheduler, guidance_scale, num_inner_steps=10,
                           early_stop_epsilon=1e-5, progress=True, low_memory=False):
    """Null-text inversion's optimisation (Mokady et al. 2023, Algorithm 1): one {empty}_t per step.
    Its inner loop runs the two halves of guidance apart already; low_memory splits each step's
    closing guided step too (pipeline.guided_step)."""
    timesteps = step_timesteps(scheduler)
    S = len(timesteps)
    if S >= 100:
        raise ValueError(f"null-text inversion's learning rate 1e-2 (1 - i/100) reaches 0 at step 100; "
                         f"use fewer than 100 steps, got {S}")
    latent, embeddings, iterations, losses = trajectory[-1], [], [], []
    bar = tqdm(total=S * num_inner_steps, desc="null-text inversion", disable=not progress, leave=False)
    with frozen(sd.unet):
        for i, t in enumerate(timesteps):
            target = trajectory[S - i - 1]                              # z*_{t-1}
            # warm start, a fresh leaf in fp32 whatever the model's dtype, so Adam's state is fp32 too:
            # fp16 rounds Adam's eps 1e-8 to 0 and small updates away (the reference's fp16 runs go black)
            uncond = uncond.detach().float().clone().requires_grad_(True)
            optimizer = torch.optim.Adam([uncond], lr=1e-2 * (1.0 - i / 100.0))
            with torch.no_grad():
                eps_c = sd.eps(latent, t, cond)
            loss_item, j = float("nan"), 0
            for j in range(num_inner_steps):
                with torch.enable_grad():
                    eps_u = sd.eps(latent, t, uncond.to(cond.dtype))
                    z = scheduler.step(guidance(eps_u, eps_c, guidance_scale), t, latent)
                    loss = F.mse_loss(z.float(), target.float())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                loss_item = loss.item()
                bar.update()
                if loss_item < early_stop_epsilon + 2e-5 * i:           # the loss before this update, as the reference
                    break
            bar.update(num_inner_steps - (j + 1) if num_inner_steps else 0)
            uncond = uncond.detach()
            embeddings.append(uncond[0].clone())
            iterations.append(j + 1 if num_inner_steps else 0)
            losses.append(loss_item)
            with torch.no_grad():
                latent = guided_step(sd, latent, t, uncond.to(cond.dtype), cond, guidance_scale, scheduler,
                                     low_memory=low_memory)
    bar.close()
    return embeddings, {"inner_iterations": iterations, "losses": losses}


@torch.no_grad()
def direct_inversion_residuals(sd, trajectory, cond, uncond, scheduler, guidance_scale, progress=True,
                               low_memory=False) -> list:
    """Direct Inversion (Ju et al. 2024): r_t = z*_{t-1} - guided_step(z_t), z_{t-1} = guided_step(z_t) + r_t.

    The latent follows prev + r (not z* itself), the same arithmetic the editing loop does, so the
    source branch retraces this pass bit for bit (up to the UNet's batch-size rounding)."""
    timesteps = step_timesteps(scheduler)
    S = len(timesteps)
    latent, residuals = trajectory[-1], []
    for i, t in enumerate(tqdm(timesteps, desc="direct inversion", disable=not progress,
                               leave=False)):
        prev = guided_step(sd, latent, t, uncond, cond, guidance_scale, scheduler, low_memory=low_memory)
        residuals.append(trajectory[S - i - 1] - prev)
        latent = prev + residuals[-1]
    return residuals


def model_input(sd, image, height: int, width: int, offsets=(0, 0, 0, 0)) -> torch.Tensor:
    """The image as the VAE's input, (1, 3, H, W) in [-1, 1]: a tensor as it is (its own size), a
    path or PIL image loaded at height x width (p2p.images). Either size must suit the model."""
    if not torch.is_tensor(image):
        sd.cfg.check_size(height, width)
        return load_image(image, height, width, offsets, sd.cfg.size_multiple)
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"an image tensor must be (1, 3, H, W) in [-1, 1], got {tuple(image.shape)}")
    sd.cfg.check_size(image.shape[2], image.shape[3])
    return image


@refuse_old_names
def invert(sd, image, prompt: str, method: str = InvertConfig.method, num_steps: int = InvertConfig.num_steps,
           guidance_scale: float = InvertConfig.guidance_scale, num_inner_steps: int = InvertConfig.num_inner_steps,
           early_stop_epsilon: float = InvertConfig.early_stop_epsilon, steps_offset: int = InvertConfig.steps_offset,
           height: int | None = InvertConfig.height, width: int | None = InvertConfig.width,
           offsets=InvertConfig.offsets, sampler: str = InvertConfig.sampler, progress: bool = True,
           low_memory: bool = False) -> Inversion:
    """Invert a real image for editing with `edit(sd, [prompt, ...], spec, inversion=inv)`.

    image: a path, a PIL image (any mode; see p2p.images) or a (1, 3, H, W) tensor in [-1, 1].
    method: "null-text" (default, the paper's), "ddim", "negative-prompt" or "direct" (see the module).
    The null-text notebook ran with steps_offset 0 (timesteps 980..0); the default here is 1 (981..1),
    as generate() and edit(); pass steps_offset=0 to match the notebook. low_memory: guided steps in
    two halves (see pipeline.guided_step); DDIM inversion runs the conditional half alone anyway.
    sampler: one of SAMPLERS with an inverse step ("ddim"); one without fails, naming it and the fix."""
    require_inverse_step(sampler, "invert()")
    sampler = InvertConfig.sampler if sampler is None else sampler
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    check_values(InvertConfig(method=method, num_steps=num_steps, guidance_scale=guidance_scale,
                              num_inner_steps=num_inner_steps, early_stop_epsilon=early_stop_epsilon,
                              steps_offset=steps_offset, height=height, width=width, offsets=tuple(offsets)),
                 "invert()")
    x = model_input(sd, image, *picture_size(sd, height, width), offsets)
    height, width = x.shape[2:]
    scheduler = sd.scheduler(num_steps, steps_offset, sampler)
    with torch.no_grad():
        z0 = sd.encode(x)
        cond = sd.encode_text([prompt])
        uncond = sd.encode_text([""])
    trajectory = ddim_inversion(sd, z0, cond, scheduler, progress)
    embeddings = residuals = None
    info = {"offsets": list(offsets)}
    if method == "null-text":
        embeddings, stats = null_text_optimization(sd, trajectory, cond, uncond, scheduler, guidance_scale,
                                                   num_inner_steps, early_stop_epsilon, progress, low_memory)
        info |= {"num_inner_steps": num_inner_steps, "early_stop_epsilon": early_stop_epsilon} | stats
    elif method == "direct":
        residuals = direct_inversion_residuals(sd, trajectory, cond, uncond, scheduler, guidance_scale, progress,
                                               low_memory)
    return Inversion(method, prompt, num_steps, float(guidance_scale), steps_offset, int(height), int(width),
                     x_T=trajectory[-1], trajectory=trajectory, uncond_embeddings=embeddings, residuals=residuals,
                     info=info, model=fingerprint(sd), sampler=sampler)


@torch.no_grad()
def reconstruct(sd, inversion: Inversion, progress: bool = True, low_memory: bool = False,
                allow_other_model: bool = False) -> torch.Tensor:
    """z_0 from sampling the inverted prompt alone from the inversion (what the source row of an edit gets).
    An inversion made with other weights than `sd`'s is refused (warned of with allow_other_model)."""
    inversion.check_model(sd, allow_other_model)
    cond = sd.encode_text([inversion.prompt])
    uncond, correction = inversion.guidance_inputs(sd, cond)
    scheduler = sd.scheduler(inversion.num_steps, inversion.steps_offset, inversion.sampler)
    return denoise(sd, cond, uncond, inversion.x_T, scheduler,
                   inversion.guidance_scale, progress=progress, desc="reconstruction", correction=correction,
                   low_memory=low_memory)
