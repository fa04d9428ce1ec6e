"""An SD 2.x-style reference built offline from our own seeded tiny weights (configs/tiny-sd2.yaml).

Our model's state dict in the single-file layout (with the `logit_scale` and unused `text_projection`
real SD 2.x files carry) goes through diffusers' OWN converters: `convert_ldm_unet_checkpoint` /
`convert_ldm_vae_checkpoint` with the configs `create_*_diffusers_config_from_ldm` builds from our
`to_ldm()`, `convert_open_clip_checkpoint` into transformers' 23-layer CLIPTextModel. With the "!"-padded
CLIPTokenizer and `DDIMScheduler(prediction_type="v_prediction")` the parts are saved as a diffusers
folder and `StableDiffusionPipeline` is loaded back from it. Nothing here touches a model hub.
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

import oracles as O
import openclip_oracles as OC

SD2_PREFIX = "cond_stage_model.model."


@functools.lru_cache(maxsize=None)
def ours(seed: int = O.SEED):
    """Our tiny SD 2.x model (v-prediction), seeded non-trivial weights, fp32, eval, no grad."""
    sd, _ = O.seeded_model("tiny-sd2", seed)
    sd.text_encoder.load_state_dict(OC.seeded_tower(sd.cfg.text, seed).state_dict())
    return sd.float().eval().requires_grad_(False)


@functools.lru_cache(maxsize=None)
def single_file_state(seed: int = O.SEED) -> dict[str, torch.Tensor]:
    """Our weights as a real SD 2.x single file holds them, with its unused logit_scale and text_projection."""
    sd = ours(seed)
    out = O.ldm_state_dict(sd)
    width = sd.cfg.text.width
    out[SD2_PREFIX + "logit_scale"] = torch.tensor(4.6052)
    out[SD2_PREFIX + "text_projection"] = O.randn(width, width, seed=3) / width ** 0.5
    return out


def write_single_file(path, seed: int = O.SEED, **metadata) -> Path:
    """The single file, with our config as `ldm_config` metadata unless `metadata` says otherwise."""
    from safetensors.torch import save_file

    meta = metadata or {"ldm_config": ours(seed).cfg.to_json()}
    save_file({k: v.contiguous() for k, v in single_file_state(seed).items()}, str(path), meta)
    return Path(path)


def _converted(ckpt: dict, ldm_cfg: dict):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    # the latent side the model trains at, as a released folder's config.json says it (the builder
    # derives it from other fields; 32 here = 64 px through the tiny VAE)
    ucfg = sfu.create_unet_diffusers_config_from_ldm(ldm_cfg, ckpt) | {"sample_size": ldm_cfg["model"]["params"]["image_size"]}
    unet = UNet2DConditionModel(**ucfg)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(ckpt, ucfg), strict=True)
    vcfg = sfu.create_vae_diffusers_config_from_ldm(ldm_cfg, ckpt)
    vae = AutoencoderKL(**vcfg)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(ckpt, vcfg), strict=True)
    return unet, vae


@functools.lru_cache(maxsize=None)
def folder(seed: int = O.SEED) -> Path:
    """A diffusers SD 2.x-style folder made by diffusers' converters from our single file."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sd, ckpt = ours(seed), single_file_state(seed)
    unet, vae = _converted(ckpt, sd.cfg.to_ldm())
    text_state = {k[len(SD2_PREFIX):]: v for k, v in ckpt.items() if k.startswith(SD2_PREFIX)}
    text = OC.ref_hf(text_state, sd.cfg.text, SD2_PREFIX, layers=sd.cfg.text.layers - 1, eos_token_id=2)
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", **O.DDIM_KW)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=OC.hf_tokenizer_bang(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = Path(tempfile.mkdtemp(prefix="tiny-sd2-diffusers-"))
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


@functools.lru_cache(maxsize=None)
def pipeline(seed: int = O.SEED):
    """StableDiffusionPipeline loaded offline from `folder(seed)`, fp32."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder(seed)), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe
