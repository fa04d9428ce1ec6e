"""SDXL oracles, built offline from our own seeded tiny SDXL (configs/tiny-sdxl.yaml).

Our model's weights are exported under the SDXL single file's keys and converted by diffusers' OWN
single-file converters: the UNet (`convert_ldm_unet_checkpoint`, label_emb -> add_embedding), the VAE,
CLIP-L (`convert_ldm_clip_checkpoint`, prefix conditioner.embedders.0.transformer.) and bigG
(`convert_open_clip_checkpoint`, prefix conditioner.embedders.1.model.) into `UNet2DConditionModel`,
`AutoencoderKL`, `CLIPTextModel` and `CLIPTextModelWithProjection`; with the two HF tokenizers (pad
end-of-text, pad "!") and a DDIMScheduler they make a `StableDiffusionXLPipeline`.

One adjustment, said here: diffusers' config builder recognises SDXL ("text_time" added conditioning) by
a context of 1280 or 2048 channels only; the tiny model's is 80, so the built config is given SDXL's
`addition_embed_type="text_time"` / `addition_time_embed_dim=256` as it would be at full size.
"""
from __future__ import annotations

import functools

import torch

import oracles as O
import openclip_oracles as OC

CLIP_PREFIX, OPENCLIP_PREFIX = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."


@functools.lru_cache(maxsize=None)
def ours(seed: int = O.SEED):
    """Our tiny SDXL, seeded non-trivial weights (fused q/k/v biases too), fp32, eval, no grad."""
    sd, gen = O.seeded_model("tiny-sdxl", seed)
    O.seeded_init_(sd.text_encoder, gen)
    with torch.no_grad():
        for block in sd.text_encoder.embedders[1].model.transformer.resblocks:
            block.attn.in_proj_bias.copy_(0.1 * torch.randn(block.attn.in_proj_bias.shape, generator=gen))
    return sd.float().eval().requires_grad_(False)


def single_file_state(sd) -> dict[str, torch.Tensor]:
    """Our weights under the SDXL single file's keys (model.diffusion_model., first_stage_model., conditioner.)."""
    return O.ldm_state_dict(sd)


def unet_config(sd, ckpt) -> dict:
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    cfg = create_unet_diffusers_config_from_ldm(sd.cfg.to_ldm(), ckpt)
    if cfg["addition_embed_type"] is None:  # a tiny context: see the module docstring
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=256, class_embed_type=None)
    return cfg


@functools.lru_cache(maxsize=None)
def ref_parts(seed: int = O.SEED) -> dict:
    """diffusers' / transformers' models converted from our single-file state dict."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    sd = ours(seed)
    ckpt, ldm = single_file_state(sd), sd.cfg.to_ldm()
    ucfg = unet_config(sd, ckpt)
    unet = UNet2DConditionModel(**ucfg)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(ckpt, ucfg), strict=True)
    vcfg = sfu.create_vae_diffusers_config_from_ldm(ldm, ckpt)
    vae = AutoencoderKL(**vcfg)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(ckpt, vcfg), strict=True)
    parts = dict(unet=unet, vae=vae, text_encoder=ref_clip(sd, ckpt),
                 text_encoder_2=OC.ref_hf(tower_state(ckpt, OPENCLIP_PREFIX), sd.cfg.text.openclip, OPENCLIP_PREFIX))
    return {k: m.float().eval().requires_grad_(False) for k, m in parts.items()}


def tower_state(ckpt: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}


def ref_clip(sd, ckpt):
    """transformers' CLIPTextModel with the first tower's weights, through diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    t = sd.cfg.text.clip
    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.max_position_embeddings,
        hidden_act=t.hidden_act, layer_norm_eps=t.layer_norm_eps, bos_token_id=49406, eos_token_id=49407))
    sdict = convert_ldm_clip_checkpoint({k: v for k, v in ckpt.items() if k.startswith(CLIP_PREFIX)})
    sdict = {k.removeprefix("text_model."): v for k, v in sdict.items() if not k.endswith("position_ids")}
    if "text_model" in dict(model.named_children()):  # older transformers keep the prefix
        sdict = {"text_model." + k: v for k, v in sdict.items()}
    missing, unexpected = model.load_state_dict(sdict, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return model


@functools.lru_cache(maxsize=None)
def ref_pipeline(seed: int = O.SEED, force_zeros: bool = True):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**ref_parts(seed), tokenizer=O.hf_tokenizer(), tokenizer_2=OC.hf_tokenizer_bang(),
                                     scheduler=O.ref_scheduler(), force_zeros_for_empty_prompt=force_zeros,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
