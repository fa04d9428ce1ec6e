"""`norm_num_groups` other than 32 in a diffusers folder's unet/ and vae/ config.json: every GroupNorm of the
UNet (resnets, transformers' input norm, the output norm) and of the VAE uses it; the folder generates as
diffusers' StableDiffusionPipeline does, the written single file keeps the number in its config, and a value
that does not divide the channels is refused by name."""
import json
import os
import shutil

import pytest
import torch

import oracles as O
from models.vae import AutoencoderKL as OurVAE
from p2p import generate
from weights_tools import BadConfig, convert_checkpoint, load_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

GROUPS, STEPS, GUIDANCE, H, W = 8, 4, 7.5, 32, 48


def randomised(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model.float().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def pipe():
    unet = diffusers.UNet2DConditionModel(**{**O.ref_unet().config, "norm_num_groups": GROUPS})
    vae = diffusers.AutoencoderKL(**{**O.ref_vae().config, "norm_num_groups": GROUPS})
    pipe = diffusers.StableDiffusionPipeline(vae=randomised(vae, 1), text_encoder=O.ref_text_encoder(),
                                             tokenizer=O.hf_tokenizer(), unet=randomised(unet, 2),
                                             scheduler=O.ref_scheduler(), safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def folder(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("groups") / "tiny-sd"
    pipe.save_pretrained(path)
    return path


def test_the_folder_generates_as_diffusers(pipe, folder):
    sd = load_checkpoint(folder).float().eval()
    norms = [m for m in sd.unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    norms += [m for m in sd.vae.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and {m.num_groups for m in norms} == {GROUPS}
    prompts, x_T = O.tiny_generate_inputs(H, W)
    ours = generate(sd, prompts, latents=x_T, num_steps=STEPS, guidance_scale=GUIDANCE, height=H, width=W,
                    progress=False)
    ref = pipe(prompts, height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0,
               latents=x_T.expand(len(prompts), -1, -1, -1).clone(), output_type="latent").images
    diff, scale = O.compare(ours.latents, ref)
    assert diff <= 1e-4 * scale, (diff, scale)
    with torch.no_grad():
        ref_img = pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample
        diff, scale = O.compare(sd.decode(ours.latents), ref_img)
    assert diff <= 1e-4 * scale, (diff, scale)


def test_the_single_file_keeps_the_groups(folder, tmp_path):
    out = convert_checkpoint(folder, tmp_path / "tiny.safetensors")
    a, b = load_checkpoint(folder), load_checkpoint(out)
    assert b.cfg.unet.norm_groups == b.cfg.vae.norm_groups == GROUPS and b.cfg == a.cfg
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert OurVAE(b.cfg.vae).decoder.norm_out.num_groups == GROUPS


@pytest.mark.parametrize("part, value", [("unet", 7), ("vae", 0), ("unet", "8")])
def test_groups_that_cannot_split_the_channels_are_refused(folder, tmp_path, part, value):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / part / "config.json").read_text())
    (bad / part / "config.json").write_text(json.dumps({**config, "norm_num_groups": value}))
    with pytest.raises(BadConfig, match=f"{part}/config.json has `norm_num_groups`"):
        load_checkpoint(bad)


UNET = dict(block_out_channels=[32, 64], layers_per_block=1, sample_size=16, cross_attention_dim=32,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            attention_head_dim=8)


@pytest.mark.parametrize("key, value", [("norm_eps", 1e-6), ("act_fn", "gelu"), ("time_cond_proj_dim", 256),
                                        ("resnet_time_scale_shift", "scale_shift"), ("conv_in_kernel", 1),
                                        ("only_cross_attention", [False, True]), ("flip_sin_to_cos", False)])
def test_a_unet_setting_this_unet_does_not_model_is_refused_by_name(key, value):
    """A diffusers UNet config that sets what this UNet does not model (a GroupNorm eps, an activation, LCM's
    guidance embedding, ...) loaded and gave wrong pictures: it is refused, naming the key."""
    from weights_tools import BadConfig, diffusers_keys

    diffusers_keys.unet_config(dict(UNET, **{key: diffusers_keys.UNMODELLED.get(key, False)}), "unet")  # the default
    with pytest.raises(BadConfig, match=rf"sets {key}=.*runs only the values in brackets"):
        diffusers_keys.unet_config(dict(UNET, **{key: value}), "unet")


def test_stock_values_of_those_settings_load():
    from weights_tools import diffusers_keys

    stock = dict(UNET, act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True,
                 freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-05, only_cross_attention=False,
                 upcast_attention=True, dual_cross_attention=False, resnet_time_scale_shift="default",
                 num_class_embeds=None)  # SD 2.1's unet/config.json spells these so
    diffusers_keys.unet_config(stock, "unet")
