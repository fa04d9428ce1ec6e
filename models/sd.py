"""StableDiffusion: the parts together. It knows nothing about editing."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .attention import relative_side
from .config import SDConfig, family
from .ddim import DDIM, alphas_cumprod
from .families import FAMILIES
from .pndm import PNDM
from .prediction import as_eps
from .unet import UNetModel
from .vae import AutoencoderKL


def prefixes(cfg: SDConfig) -> dict[str, str]:
    """Checkpoint prefix of each part, in the original single-file layout, for this config's family."""
    return {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": family(cfg.family).text_prefix}


PREFIXES = prefixes(SDConfig())  # SD v1's

TILE = 64  # low-memory decoding: latent tiles of 64 (512 px in SD v1), relative to the model's default latent side
# (SDXL: 128, see models.attention.relative_side), neighbours overlapping by a quarter


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of side `tile` covering [0, n), neighbours overlapping by `overlap` or more, the
    last flush with n; [0] (one tile of side n) when n <= tile."""
    if n <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tiles of side {tile} need an overlap in [0, {tile}), got {overlap}")
    return list(range(0, n - tile, tile - overlap)) + [n - tile]


def seam_ramp(n: int, ramp: int) -> torch.Tensor:
    """Blend weights (n,) rising linearly over `ramp` pixels at both ends of a tile, 1 inside."""
    i = torch.arange(n, dtype=torch.float32) + 0.5
    return (torch.minimum(i, n - i) / ramp).clamp(max=1.0)


def decode_tiled(decode, z: torch.Tensor, tile: int, overlap: int, f: int) -> torch.Tensor:
    """decode(z) for one latent z (1, C, h, w), in tiles of tile x tile latents overlapping by `overlap`,
    each decoded alone and blended with linear ramps across the seams (f: pixels per latent).

    Exact when z fits one tile. Otherwise not: each tile's GroupNorm statistics and the mid-block
    attention see that tile only, not the whole picture (as diffusers' tiled VAE); the pictures
    differ most near the seams (tests/test_low_memory.py measures and bounds it)."""
    return run_tiled(decode, z, tile, overlap, 1, f)


def encode_tiled(encode, x: torch.Tensor, tile: int, overlap: int, f: int) -> torch.Tensor:
    """encode(x) for one image x (1, 3, H, W), H and W multiples of f, in tiles of tile x tile latents
    (tile * f pixels) overlapping by `overlap` latents, blended as decode_tiled blends, and as it is
    exact only when the image fits one tile."""
    return run_tiled(encode, x, tile, overlap, f, 1)


def run_tiled(fn, x: torch.Tensor, tile: int, overlap: int, f_in: int, f_out: int) -> torch.Tensor:
    """fn(x) in tiles laid out on the latent grid: a tile at latent (y, x) of side `tile` reads
    x[..., y * f_in : (y + tile) * f_in, ...] and its output lands at y * f_out."""
    h, w = x.shape[-2] // f_in, x.shape[-1] // f_in
    if h <= tile and w <= tile:
        return fn(x)
    out = weight = None
    for y in tile_starts(h, tile, overlap):
        for c in tile_starts(w, tile, overlap):
            part = fn(x[..., y * f_in:(y + tile) * f_in, c * f_in:(c + tile) * f_in]).float()
            th, tw = part.shape[-2:]
            if out is None:
                out = part.new_zeros(*part.shape[:2], h * f_out, w * f_out)
                weight = part.new_zeros(h * f_out, w * f_out)
            ramp = (seam_ramp(th, overlap * f_out)[:, None] * seam_ramp(tw, overlap * f_out)[None]).to(part.device)
            out[..., y * f_out:y * f_out + th, c * f_out:c * f_out + tw] += part * ramp
            weight[y * f_out:y * f_out + th, c * f_out:c * f_out + tw] += ramp
    return (out / weight).to(x.dtype)


class StableDiffusion(nn.Module):
    blend_level: int | None = None  # the attention level a word mask should be read at (None: the deepest);
    #                                  a loader sets it for a checkpoint that recommends one

    def __init__(self, cfg: SDConfig = SDConfig(), tokenizer=None):
        """tokenizer: the one the text tower reads (default: the tower's own, built from the config).
        Every tokenizer has encode(text) (content ids), decode(ids), __call__(prompts, length) and the
        ids bos, eos, pad, and length (token positions, 77)."""
        super().__init__()
        self.cfg = cfg
        fam = FAMILIES[cfg.family]
        self.unet = UNetModel(cfg.unet)
        self.vae = AutoencoderKL(cfg.vae)
        self.text_encoder = fam.text_encoder(cfg.text)
        self.tokenizer = tokenizer if tokenizer is not None else fam.tokenizer(cfg.text)
        with torch.device("cpu"):  # a plain tensor, not a buffer: never on the meta device a loader builds on
            self.alphas_cumprod = alphas_cumprod(cfg.linear_start, cfg.linear_end, cfg.num_train_timesteps,
                                                 cfg.schedule)

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
        """(N, 77) int64 token ids, as the family's tokenizer pads them (SD v1: with EOS, 49407)."""
        return self.tokenizer(prompts, self.tokenizer.length)

    def encode_text(self, prompts) -> torch.Tensor:
        """(N, 77, context_dim): the context cross-attention reads (SD v1: CLIP's last_hidden_state).
        SDXL: (N, 78, 2048), the pooled vector as the last row (models/sdxl_text.py), and all zeros for
        the prompt "" where its config says so (zeros_for_empty, SDXL base's default)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        context = self.text_encoder(self.tokenize(prompts).to(self.device))
        if getattr(self.cfg.text, "zeros_for_empty", False):
            empty = torch.tensor([p == "" for p in prompts], device=context.device)
            context = context.masked_fill(empty[:, None, None], 0.0)
        return context

    def conditioning(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the context cross-attention reads, the UNet's vector conditioning y or None), as the family's
        `conditioning` makes them for x's picture size (SDXL: the pooled row and the size ids)."""
        f = self.latent_downsample
        return FAMILIES[self.cfg.family].conditioning(self.cfg, context, x.shape[-2] * f, x.shape[-1] * f)

    def predict(self, x: torch.Tensor, t, context: torch.Tensor, attn_override=None,
                feature_override=None) -> torch.Tensor:
        """The UNet's output at x_t and t: the model's own prediction, of kind cfg.prediction_type (eps, or v
        for a v model), what a sampler's step takes (models/sampler.py). context: what encode_text gives
        (SDXL: with its pooled row, see `conditioning`). attn_override / feature_override: passed to the UNet
        (models/unet.py)."""
        context, y = self.conditioning(x, context)
        return self.unet(x, t, context, attn_override=attn_override, y=y, feature_override=feature_override)

    def eps(self, x: torch.Tensor, t, context: torch.Tensor, attn_override=None, feature_override=None) -> torch.Tensor:
        """The noise prediction eps(x_t, t, context): `predict`'s output turned into eps at x_t and t from what
        the model predicts (models/prediction.py, the one place eps and v meet: an epsilon model's output as
        it is). t: one timestep, or one per row."""
        out = self.predict(x, t, context, attn_override=attn_override, feature_override=feature_override)
        a = self.alphas_cumprod[torch.as_tensor(t, dtype=torch.long).cpu()].reshape(-1, 1, 1, 1).to(x.device)
        return as_eps(self.cfg.prediction_type, out, x, a)

    def vae_dtype(self, upcast: bool | None) -> torch.dtype:
        """The dtype the VAE runs in: fp32 if `upcast`, else the model's. None: upcast an fp16 model
        only, whose VAE overflows to inf (NaN, black pictures) at SD's activations; bf16 has fp32's range."""
        upcast = self.dtype == torch.float16 if upcast is None else upcast
        return torch.float32 if upcast else self.dtype

    def encode(self, images: torch.Tensor, upcast: bool | None = None, low_memory: bool = False,
               tile: int | None = None) -> torch.Tensor:
        """Images in [-1, 1], (N, 3, H, W) -> posterior mean * scale factor (no sampling), in the
        model's dtype. `upcast`: run the VAE in fp32 (see `vae_dtype`). low_memory, tile: as decode's
        (one image at a time, in overlapping tiles of `tile` latents: encode_tiled)."""
        dtype = self.vae_dtype(upcast)
        x = images.to(self.device, dtype)
        with as_dtype(self.vae, dtype):
            if low_memory:
                f, tile = self.latent_downsample, tile or relative_side(TILE, self.cfg.image_size)
                mean_of = lambda p: self.vae.encode_moments(p)[0]  # noqa: E731
                mean = torch.cat([encode_tiled(mean_of, x[i:i + 1], tile, tile // 4, f) for i in range(len(x))])
            else:
                mean, _ = self.vae.encode_moments(x)
        return ((mean - self.cfg.shift_factor) * self.cfg.scale_factor).to(self.dtype)

    def decode(self, latents: torch.Tensor, upcast: bool | None = None, low_memory: bool = False,
               tile: int | None = None) -> torch.Tensor:
        """Latents (N, 4, h, w) -> images in [-1, 1] (not clamped), (N, 3, H, W), in the dtype the VAE
        ran in. `upcast`: run the VAE in fp32 (see `vae_dtype`). low_memory: one image at a time, and
        latents with a side above `tile` in overlapping tiles (see decode_tiled); None: TILE relative to the
        model's default latent side."""
        dtype = self.vae_dtype(upcast)
        z = latents.to(self.device, dtype) / self.cfg.scale_factor + self.cfg.shift_factor
        with as_dtype(self.vae, dtype):
            if not low_memory:
                return self.vae.decode(z)
            f, tile = self.latent_downsample, tile or relative_side(TILE, self.cfg.image_size)
            return torch.cat([decode_tiled(self.vae.decode, z[i:i + 1], tile, tile // 4, f) for i in range(len(z))])

    def scheduler(self, num_steps: int = 50, steps_offset: int = 1, sampler: str = "ddim"):
        """A fresh sampler over this model's noise schedule: one of SAMPLERS, given the model's prediction
        type (models/sampler.py; one per run: PLMS keeps its run's history)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; known samplers: {', '.join(SAMPLERS)}")
        c = self.cfg
        return SAMPLERS[sampler].create(num_steps, steps_offset, c.linear_start, c.linear_end, c.num_train_timesteps,
                                        prediction_type=c.prediction_type, schedule=c.schedule)


# name -> a sampler class (the protocol in models/sampler.py). plms (also pndm): PLMS as the reference's
# stable notebook, N + 1 UNet calls for N steps; a name is all the config, the CLI and the sweep need
SAMPLERS = {"ddim": DDIM, "plms": PNDM, "pndm": PNDM}


@contextlib.contextmanager
def as_dtype(module: nn.Module, dtype: torch.dtype):
    """Run `module` in `dtype` for the block, then cast it back (fp16 / bf16 -> fp32 -> back is exact).
    The parameters stay the same objects; only their data is cast, and only when the dtype differs."""
    old = next(module.parameters()).dtype
    if old == dtype:
        yield module
        return
    module.to(dtype)
    try:
        yield module
    finally:
        module.to(old)
