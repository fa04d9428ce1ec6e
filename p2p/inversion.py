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
  editing, the source row is the inversion latent itself after each step (before LocalBlend), so it
  follows the inversion trajectory exactly and ends on the photo's latents; the edited rows do not.
  Their code adds r_t instead (`source_row="residual"`): exact only while the edit's UNet calls round
  as the inversion's pass did, which explicit maps kept for LocalBlend or another batch size break,
  and the sampling dynamics amplify any difference. Cost: DDIM inversion plus one guided pass.

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

from models import FAMILIES, PREDICTION_TYPES
from models.sampler import has_inverse_step
from models.textfile import BadTextFile, parse_json
from models.sd import SAMPLERS
from weights_tools.files import write_bytes_atomic

from . import joint_inversion
from .config import InvertConfig
from .settings import METHODS, SOURCE_ROWS, check_values, refuse_old_names
from .fingerprint import DTYPES, Fingerprint, fingerprint
from .images import load_image
from .joint_pipeline import is_mmdit
from .pipeline import denoise, guidance, guided_step, picture_size, unet_only

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
    # how the model's numbers were read (READING; None: saved before inversions recorded it): the same weights
    # read as another prediction type or VAE scale retrace another trajectory
    prediction_type: str | None = None
    scale_factor: float | None = None
    shift_factor: float | None = None

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

    def guidance_inputs(self, sd, cond: torch.Tensor, scheduler=None, source_row: str | None = None):
        """(uncond, correction) for `pipeline.denoise`: the unconditional embedding(s) every row gets,
        and the per-step correction of the source row (`source_correction`) or None. cond: (B, 77, d), row 0
        the source; scheduler: the edit's sampler (None: this inversion's own)."""
        dev = dict(device=sd.device, dtype=sd.dtype)
        scheduler = scheduler if scheduler is not None else sd.scheduler(self.num_steps, self.steps_offset,
                                                                         self.sampler)
        correction = self.source_correction(sd, scheduler, source_row)
        if self.method == "null-text":  # the same {empty}_t for the source and the edited rows, as the reference
            return [u.to(**dev)[None] for u in self.uncond_embeddings], correction
        if self.method == "negative-prompt":  # the source prompt's embedding as the unconditional one
            return cond[:1], correction
        return sd.encode_text([""]), correction

    def source_row_mode(self, source_row: str | None) -> str:
        """The source row's rule (SOURCE_ROWS): the one given, else "trajectory" for Direct Inversion, "free"
        for the others."""
        mode = source_row if source_row is not None else "trajectory" if self.method == "direct" else "free"
        if mode not in SOURCE_ROWS:
            raise ValueError(f"source_row must be one of {', '.join(SOURCE_ROWS)}, got {mode!r}")
        if mode == "residual" and self.residuals is None:
            raise ValueError(f"source_row='residual' adds Direct Inversion's residuals, which a {self.method!r} "
                             f"inversion has none of: invert with method='direct', or use source_row='trajectory'")
        return mode

    def latents_at(self, sd, timesteps) -> list:
        """The inversion's latent at each of these timesteps, each one of the inversion's own (trajectory[k] is
        the latent after k inversion steps, at the k-th smallest timestep)."""
        own = [c.timestep for c in step_calls(sd.scheduler(self.num_steps, self.steps_offset, self.sampler))]
        where = {t: len(own) - k for k, t in enumerate(own)}  # own is descending: own[0] is trajectory[-1]
        missing = [int(t) for t in timesteps if int(t) not in where]
        if missing:
            raise ValueError(f"the edit's timesteps {missing} are not among the inversion's ({own[::-1]}): the "
                             f"source row can follow the inversion only at timesteps it visited; edit with the "
                             f"inversion's steps and offset, or invert with steps that contain the edit's")
        return [self.trajectory[where[int(t)]] for t in timesteps]

    def source_correction(self, sd, scheduler, source_row: str | None = None):
        """correction(i, x) -> x after UNet call i of the edit (pipeline.denoise), for the source row's rule:

        - "trajectory" (Direct Inversion's default): the source row is set to the inversion's latent at the
          next call's timestep, and after the last call to the photo's latents trajectory[0]: it follows the
          inversion exactly, so its picture is the photo's (up to the VAE), whatever else the edit changes;
        - "inputs": the same before every call, but the last call's output is kept (MasaCtrl's
          `ref_intermediate_latents`: the source's final latent is one step from the last inversion latent);
        - "residual": Direct Inversion's additive form, x_src + r_i (PnPInversion's code): exact only where
          the edit's UNet calls round as the inversion's pass did;
        - "free": no correction (DDIM, null-text and negative-prompt inversions' default)."""
        mode = self.source_row_mode(source_row)
        dev = dict(device=sd.device, dtype=sd.dtype)
        if mode == "free":
            return None
        if mode == "residual":
            residuals = [r.to(**dev) for r in self.residuals]
            return lambda i, x: torch.cat([x[:1] + residuals[i], x[1:]])
        calls = step_calls(scheduler)
        nxt = [z.to(**dev) for z in self.latents_at(sd, [c.timestep for c in calls[1:]])]
        nxt.append(self.trajectory[0].to(**dev) if mode == "trajectory" else None)
        return lambda i, x: x if nxt[i] is None else torch.cat([nxt[i].expand(1, *x.shape[1:]), x[1:]])

    def check_model(self, sd, allow_other_model: bool = False) -> None:
        """An error (a warning with allow_other_model) when `sd` holds other weights than the model this
        inversion was made with: its x_T and embeddings reconstruct the photo with that model only.
        A model read otherwise (another prediction type or VAE scale) is always an error, and its shapes must
        fit `sd` either way (check_shapes)."""
        self.check_shapes(sd)
        self.check_reading(sd)
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

    def check_reading(self, sd) -> None:
        """An error when `sd` reads its weights otherwise than the model this inversion was made with (a v model
        loaded as epsilon reconstructs ~11x worse); a warning for an inversion saved before it was recorded."""
        if self.prediction_type is None:
            warnings.warn("this inversion was saved without the prediction type it was made under (an older p2p): "
                          "it cannot be checked against this model's; invert the photo again to record it",
                          stacklevel=4)
            return
        theirs = reading(sd)
        differ = [f"{k} {getattr(self, k)!r} (this model: {theirs[k]!r})" for k in READING
                  if getattr(self, k) is not None and getattr(self, k) != theirs[k]]
        fix = ("Load the checkpoint the same way (p2p edit --prediction-type {0}, and the same --vae; "
               "load_checkpoint(..., prediction_type={0!r})), or invert the photo again".format(self.prediction_type)
               if not is_mmdit(sd) else f"It was made with another {sd.family} folder: invert the photo again with "
               "this one")
        if differ:
            raise ValueError(f"this inversion was made under {', '.join(differ)}: it reconstructs the photo only with "
                             f"the model read as it was then. {fix}")

    def check_shapes(self, sd) -> None:
        """An error, before anything runs, when x_T or null-text's embeddings do not have the shapes `sd`
        samples with (latent channels and side, text context): allow_other_model waives other weights of one
        architecture, not a model of another kind (an SD v1 inversion on SDXL would fail inside the loop)."""
        problems = []
        latent = latent_shape(sd, self.height, self.width)
        if tuple(self.x_T.shape) != latent:
            problems.append(f"its x_T is {tuple(self.x_T.shape)}, where this model samples {latent} at "
                            f"{self.height}x{self.width} px")
        if self.uncond_embeddings is not None:
            with torch.no_grad():
                context = tuple(sd.encode_text([""]).shape[1:])
            if tuple(self.uncond_embeddings[0].shape) != context:
                problems.append(f"its null-text embeddings are {tuple(self.uncond_embeddings[0].shape)}, where this "
                                f"model's text context is {context}")
        if problems:
            raise ValueError(f"this inversion does not fit this {family_name(sd)} model: "
                             f"{'; '.join(problems)}. It was made with a model of another kind: invert the photo "
                             "again with this one (allow_other_model waives other weights, not other shapes)")

    # ------------------------------------------------------------------ files
    def to_bytes(self) -> bytes:
        """One safetensors file: the tensors, and every setting as JSON in its metadata."""
        tensors = {"x_T": self.x_T, "trajectory": torch.cat(list(self.trajectory))}
        if self.uncond_embeddings is not None:
            tensors["uncond_embeddings"] = torch.stack(list(self.uncond_embeddings))
        if self.residuals is not None:
            tensors["residuals"] = torch.cat(list(self.residuals))
        meta = {k: getattr(self, k) for k in ("method", "prompt", "sampler", *SETTINGS)} | {"info": self.info}
        meta |= {k: getattr(self, k) for k in READING if getattr(self, k) is not None}
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


def reading(sd) -> dict:
    """How the model reads its numbers (READING): a UNet model's config, an MM-DiT model's velocity and VAE factors."""
    if is_mmdit(sd):
        return {"prediction_type": joint_inversion.PREDICTION, "scale_factor": sd.scaling_factor,
                "shift_factor": sd.shift_factor}
    return {k: getattr(sd.cfg, k) for k in READING}


def latent_shape(sd, height: int, width: int) -> tuple:
    """(1, C, h, w): the latent the model samples at height x width px."""
    if is_mmdit(sd):
        return (1, sd.latent_channels, height // sd.latent_downsample, width // sd.latent_downsample)
    f = sd.latent_downsample
    return (1, sd.cfg.unet.in_channels, height // f, width // f)


def family_name(sd) -> str:
    return sd.family if is_mmdit(sd) else FAMILIES[sd.cfg.family].name


SAVED_TYPES = {"method": str, "prompt": str, "num_steps": int, "guidance_scale": (int, float), "steps_offset": int,
               "height": int, "width": int, "info": dict}  # a saved Inversion's metadata (SETTINGS and the rest)
READING = ("prediction_type", "scale_factor", "shift_factor")  # SDConfig's fields an inversion records
# absent from files saved before inversions recorded them (sampler: ddim)
OPTIONAL = {"model": dict, "sampler": str, "prediction_type": str, "scale_factor": (int, float),
            "shift_factor": (int, float)}


def check_saved(path, text: str, tensors: dict) -> dict:
    """The metadata of a saved Inversion, checked with its tensors before anything is built from them."""
    def bad(why):
        return ValueError(f"{path}: not a usable saved Inversion: {why}; make it again with `p2p invert`")

    try:
        meta = parse_json(text, "metadata")
    except BadTextFile as e:
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
    if not has_inverse_step(SAMPLERS.get(sampler)) and sampler != joint_inversion.SAMPLER:
        raise bad(f"sampler {sampler[:40]!r} is not a known sampler with an inverse step")
    if meta.get("prediction_type", PREDICTION_TYPES[0]) not in (*PREDICTION_TYPES, joint_inversion.PREDICTION):
        raise bad(f"prediction_type {meta['prediction_type'][:40]!r} is not one of {', '.join(PREDICTION_TYPES)} "
                  f"or {joint_inversion.PREDICTION!r}")
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


def step_calls(scheduler) -> tuple:
    """The sampler's calls, which the inversions retrace one per step (call i reading row i)."""
    calls = scheduler.calls
    if [c.row for c in calls] != list(range(scheduler.num_steps)):
        raise ValueError(f"the inversions retrace one UNet call per step, but {type(scheduler).__name__} makes "
                         f"{len(calls)} calls for {scheduler.num_steps} steps (reading the rows "
                         f"{[c.row for c in calls]}); invert with a sampler of one call per step, such as 'ddim'")
    return calls


def step_timesteps(scheduler) -> list[int]:
    """The timesteps of the sampler's calls, which the inversions retrace one per step."""
    return [c.timestep for c in step_calls(scheduler)]


@torch.no_grad()
def ddim_inversion(sd, z0: torch.Tensor, cond: torch.Tensor, scheduler, progress: bool = True) -> list:
    """z_0 -> [z*_0, ..., z*_T], conditional only, the model evaluated at the destination timestep (as the
    reference's ddim_loop); the sampler's inverse step reads its prediction as eps there."""
    z, trajectory = z0, [z0]
    for t in tqdm(step_timesteps(scheduler)[::-1], desc="DDIM inversion", disable=not progress, leave=False):
        z = scheduler.inverse_step(sd.predict(z, t, cond), t, z)
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
                out_c = sd.predict(latent, t, cond)
            loss_item, j = float("nan"), 0
            for j in range(num_inner_steps):
                with torch.enable_grad():
                    out_u = sd.predict(latent, t, uncond.to(cond.dtype))
                    z = scheduler.step(guidance(out_u, out_c, guidance_scale), t, latent)
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
def invert(sd, image, prompt: str, method: str | None = None, num_steps: int | None = None,
           guidance_scale: float | None = None, num_inner_steps: int = InvertConfig.num_inner_steps,
           early_stop_epsilon: float = InvertConfig.early_stop_epsilon, steps_offset: int = InvertConfig.steps_offset,
           height: int | None = InvertConfig.height, width: int | None = InvertConfig.width,
           offsets=InvertConfig.offsets, sampler: str = InvertConfig.sampler, progress: bool = True,
           low_memory: bool = False) -> Inversion:
    """Invert a real image for editing with `edit(sd, [prompt, ...], spec, inversion=inv)`.

    image: a path, a PIL image (any mode; see p2p.images) or a (1, 3, H, W) tensor in [-1, 1].
    method: "null-text" (the default, the paper's), "ddim", "negative-prompt" or "direct" (see the module);
    num_steps and guidance_scale None: InvertConfig's (50, 7.5).
    The null-text notebook ran with steps_offset 0 (timesteps 980..0); the default here is 1 (981..1),
    as generate() and edit(); pass steps_offset=0 to match the notebook. low_memory: guided steps in
    two halves (see pipeline.guided_step; DDIM inversion runs the conditional half alone anyway) and the
    photo encoded in tiles (StableDiffusion.encode). sampler: one of SAMPLERS with an inverse step ("ddim"); one without fails, naming it and the fix.
    An MM-DiT model (SD3 / SD3.5 / Flux) is inverted by the reverse Euler ODE, method "flow"
    (p2p.joint_inversion; None: the model's steps, guidance 1.0 on SD3 and the model's own on Flux)."""
    if method is not None and method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    check_values(InvertConfig(method=method, num_steps=num_steps, guidance_scale=guidance_scale,
                              num_inner_steps=num_inner_steps, early_stop_epsilon=early_stop_epsilon,
                              steps_offset=steps_offset, height=height, width=width, offsets=tuple(offsets)),
                 "invert()")
    if is_mmdit(sd):
        unet_only(sampler=sampler, steps_offset=steps_offset, low_memory=low_memory)
        return Inversion(**joint_inversion.joint_inversion(sd, image, prompt, method, num_steps, guidance_scale,
                                                           height, width, offsets, progress))
    return unet_inversion(sd, image, prompt, InvertConfig.method if method is None else method,
                          InvertConfig.num_steps if num_steps is None else num_steps,
                          InvertConfig.guidance_scale if guidance_scale is None else guidance_scale, num_inner_steps,
                          early_stop_epsilon, steps_offset, height, width, offsets, sampler, progress, low_memory)


def unet_inversion(sd, image, prompt, method, num_steps, guidance_scale, num_inner_steps, early_stop_epsilon,
                   steps_offset, height, width, offsets, sampler, progress, low_memory) -> Inversion:
    """invert() on a UNet model: DDIM inversion, then the method's own pass (the module docstring)."""
    require_inverse_step(sampler, "invert()")
    sampler = InvertConfig.sampler if sampler is None else sampler
    if method not in METHODS or method == joint_inversion.METHOD:
        raise ValueError(f"method must be one of {', '.join(m for m in METHODS if m != joint_inversion.METHOD)} "
                         f"(method {joint_inversion.METHOD!r} inverts an MM-DiT model); got {method!r}")
    x = model_input(sd, image, *picture_size(sd, height, width), offsets)
    height, width = x.shape[2:]
    scheduler = sd.scheduler(num_steps, steps_offset, sampler)
    with torch.no_grad():
        z0 = sd.encode(x, low_memory=low_memory)
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
                     info=info, model=fingerprint(sd), sampler=sampler, **reading(sd))


@torch.no_grad()
def reconstruct(sd, inversion: Inversion, progress: bool = True, low_memory: bool = False,
                allow_other_model: bool = False, source_row: str | None = None) -> torch.Tensor:
    """z_0 from sampling the inverted prompt alone from the inversion (what the source row of an edit gets,
    under the same `source_row` rule, see Inversion.source_correction; an MM-DiT model's: p2p.joint_inversion).
    An inversion made with other weights than `sd`'s is refused (warned of with allow_other_model)."""
    if is_mmdit(sd):
        unet_only(low_memory=low_memory)
        return joint_inversion.joint_reconstruct(sd, inversion, progress, allow_other_model, source_row)
    inversion.check_model(sd, allow_other_model)
    cond = sd.encode_text([inversion.prompt])
    scheduler = sd.scheduler(inversion.num_steps, inversion.steps_offset, inversion.sampler)
    uncond, correction = inversion.guidance_inputs(sd, cond, scheduler, source_row)
    return denoise(sd, cond, uncond, inversion.x_T, scheduler,
                   inversion.guidance_scale, progress=progress, desc="reconstruction", correction=correction,
                   low_memory=low_memory)
