"""Full-size SD v1.5 on the meta device (no memory): our module tree has exactly the keys and
shapes of a real v1.5 single file, checked against diffusers / transformers models built from
their own SD v1.5 configs - a list derived independently of our code."""
import os

import pytest
import torch

from models import PREFIXES, SDConfig, StableDiffusion
from weights_tools import CheckpointError, model_shapes, validate_shapes
from weights_tools.layout import OLD_CLIP_PREFIX, SCHEDULE_KEYS
from weights_tools.layouts import POSITION_IDS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

# diffusers' and transformers' published SD v1.5 / CLIP ViT-L/14 configs, written out here
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
VIT_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")


@pytest.fixture(scope="module")
def ours():
    """Our full-size model's state dict with the single-file prefixes (meta tensors)."""
    with torch.device("meta"):
        sd = StableDiffusion(SDConfig())
    return {PREFIXES[p] + k: v for p in PREFIXES for k, v in getattr(sd, p).state_dict().items()}


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def test_counts(ours):
    counts = {p: sum(k.startswith(prefix) for k in ours) for p, prefix in PREFIXES.items()}
    assert counts == {"unet": 686, "vae": 248, "text_encoder": 196}
    assert all(v.is_meta for v in ours.values())


def test_unet_matches_diffusers(ours):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ref = UNet2DConditionModel(**SD15_UNET)
    # diffusers' own converter maps our keys into its layout; the converters work on meta tensors
    converted = sfu.convert_ldm_unet_checkpoint(ours, dict(SD15_UNET))
    assert shapes(converted) == shapes(ref.state_dict())


def test_vae_matches_diffusers(ours):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        ref = AutoencoderKL(**SD15_VAE)
    converted = sfu.convert_ldm_vae_checkpoint(ours, dict(SD15_VAE))
    assert shapes(converted) == shapes(ref.state_dict())


def test_clip_matches_transformers(ours):
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        ref = CLIPTextModel(CLIPTextConfig(**VIT_L14_TEXT))
    converted = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(ours).items()}
    assert shapes(converted) == shapes(ref.state_dict())


def test_validate_real_file_layout(ours):
    """The key/shape check load and inspect share, on a full-size v1.5-like header: no 4 GB needed."""
    header = shapes(ours)
    header[POSITION_IDS] = (1, 77)
    header |= {k: (1000,) for k in SCHEDULE_KEYS} | {"model_ema.decay": (), "model_ema.num_updates": ()}
    header |= {"model_ema.diffusion_modelout2weight": (4, 320, 3, 3)}
    for k in list(header):  # diffusers-converted files store these 1x1 convs as linear weights
        if k.endswith((".proj_in.weight", ".proj_out.weight", "attn_1.q.weight")):
            header[k] = header[k][:2]
    validate_shapes(header, SDConfig(), "v1-5-pruned.safetensors")
    old = {k.replace(PREFIXES["text_encoder"], OLD_CLIP_PREFIX): v for k, v in header.items()}
    from weights_tools.layout import canonical_key
    validate_shapes({canonical_key(k): v for k, v in old.items()}, SDConfig(), "sd-v1-1.ckpt")
    assert model_shapes(SDConfig()) == shapes(ours)


def test_validate_heads_cannot_be_guessed(ours):
    """Same shapes, different head count: shapes validate against either; the config decides."""
    header = shapes(ours)
    validate_shapes(header, SDConfig(unet=SDConfig().unet.__class__(num_heads=5)), "x")
    header[PREFIXES["unet"] + "out.2.weight"] = (4, 320, 1, 1)
    with pytest.raises(CheckpointError, match=r"1 mismatched: model\.diffusion_model\.out\.2\.weight"):
        validate_shapes(header, SDConfig(), "x")
