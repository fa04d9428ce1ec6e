"""diffusers' own tiny test pipelines for SD3, SD3.5 and Flux (their fast tests' `get_dummy_components`), which
differ from the real models in what a loader may assume away: 1 x 1 patches, a one-level VAE (no downsampling:
vae_scale_factor 2 ** (1 - 1) = 1) with one norm group, 4 latent channels (SD3) or 1 (Flux, packed 2 x 2 into the
transformer's 4), a T5 narrower than the two CLIP towers side by side (SD3 crops the CLIP features to T5's
width), joint_attention_dim 32, axes_dims_rope (4, 4, 8). Saved by diffusers, each folder loads with
`load_checkpoint` and generates as StableDiffusion3Pipeline / FluxPipeline do from the same x_T.

The fast tests read their T5 and tokenizers from the hub (hf-internal-testing/tiny-random-t5, tiny-random-clip);
here the T5 is built from that model's configuration (d_model 32, d_kv 8, d_ff 37, 5 layers, 4 heads, 8
relative-position buckets, vocabulary 1000, the original T5's relu feed-forward, initializer_factor 0.002),
seeded, in eval mode as from_pretrained leaves it, and the tokenizers are
a CLIP BPE of 1000 ids (test_diffusers_test_pipelines.tiny_bpe) and the tiny T5 tokenizer of tests/fixtures/mmdit.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

import p2p
from models.flux import pack, unpack
from test_diffusers_test_pipelines import tiny_bpe
from weights_tools import load_checkpoint

pytest.importorskip("diffusers")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # each pipeline is built and run, ~10 s
MMDIT = Path(__file__).parent / "fixtures" / "mmdit"
PROMPTS = ["a photo of a cat riding a bicycle", "a lion eating a burger"]
STEPS, H, W = 3, 32, 48
CLIP = dict(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
            num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000, hidden_act="gelu",
            projection_dim=32)
# hf-internal-testing/tiny-random-t5's config.json (as exported from the hub model), seeded weights of our own
TINY_RANDOM_T5 = dict(d_model=32, d_kv=8, d_ff=37, num_layers=5, num_decoder_layers=5, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=128, vocab_size=1000,
                      feed_forward_proj="relu", dropout_rate=0.1, initializer_factor=0.002, layer_norm_epsilon=1e-6,
                      bos_token_id=0, eos_token_id=1, pad_token_id=0, decoder_start_token_id=0)
SD35 = dict(num_layers=2, pos_embed_max_size=96, dual_attention_layers=(0,), qk_norm="rms_norm")


def t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(**TINY_RANDOM_T5)).eval()  # eval, as from_pretrained leaves the hub's


def t5_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MMDIT / "tiny-sd3" / "tokenizer_3"), local_files_only=True)



def sd3_test_pipeline(clip_tokenizer, transformer_extra: dict):
    """StableDiffusion3PipelineFastTests.get_dummy_components (SD3.5: the SD3.5 transformer tests' settings)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**{**dict(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4),
        **transformer_extra})
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP))
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP))
    text_encoder_3 = t5()
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
        text_encoder_2=text_encoder_2, text_encoder_3=text_encoder_3, tokenizer=clip_tokenizer,
        tokenizer_2=clip_tokenizer, tokenizer_3=t5_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_test_pipeline(clip_tokenizer):
    """FluxPipelineFastTests.get_dummy_components."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP))
    text_encoder_2 = t5()
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                        text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=clip_tokenizer,
                        tokenizer_2=t5_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# family -> (what the folder holds: latent channels, VAE downsample, latent pixels per token, default size)
EXPECTED = {"SD3": (4, 1, 1, 32), "SD3.5": (4, 1, 1, 32), "Flux": (1, 1, 2, 128)}


@pytest.fixture(scope="module", params=list(EXPECTED))
def built(request, tmp_path_factory):
    """(family, the diffusers pipeline, our model loaded from the folder the pipeline saved)."""
    family, root = request.param, tmp_path_factory.mktemp(request.param)
    tokenizer = tiny_bpe(root / "bpe", pad="<|endoftext|>")
    pipe = (flux_test_pipeline(tokenizer) if family == "Flux"
            else sd3_test_pipeline(tokenizer, SD35 if family == "SD3.5" else {}))
    pipe.save_pretrained(root / "saved")
    return family, pipe, load_checkpoint(root / "saved")


def x_T(m, seed=5):
    f = m.latent_downsample
    return torch.randn((1, m.latent_channels, H // f, W // f), generator=torch.Generator().manual_seed(seed))


def pipeline_output(family, pipe, x, guidance, output_type):
    """The pipeline's z0 (unpacked for Flux) or its pictures as uint8, from x_T x for both prompts."""
    x = x.expand(len(PROMPTS), -1, -1, -1)
    out = pipe(prompt=PROMPTS, latents=pack(x) if family == "Flux" else x, guidance_scale=guidance, height=H,
               width=W, num_inference_steps=STEPS, output_type=output_type).images
    if output_type == "np":
        return np.round(out * 255).astype(np.int16)
    return unpack(out, *x.shape[2:]) if family == "Flux" else out


def test_the_folder_tells_the_latent_and_token_sizes(built):
    family, pipe, m = built
    assert m.family == family
    assert (m.latent_channels, m.latent_downsample, m.latent_patch, m.default_size) == EXPECTED[family]
    assert m.latent_downsample == pipe.vae_scale_factor
    cond = m.encode_prompts(PROMPTS)
    assert cond.context.shape[-1] == 32  # SD3: the two CLIP towers' 64 channels cropped to T5's 32


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_generates_as_the_pipeline(built, guidance):
    family, pipe, m = built
    x = x_T(m)
    ours = p2p.generate(m, PROMPTS, latents=x, num_steps=STEPS, guidance_scale=guidance, height=H, width=W,
                        progress=False)
    theirs = pipeline_output(family, pipe, x, guidance, "latent")
    assert ours.latents.shape == theirs.shape == (2, *x.shape[1:])
    assert (ours.latents - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    images = pipeline_output(family, pipe, x, guidance, "np")
    assert np.abs(ours.images.astype(np.int16) - images).max() <= 1


def test_an_edit_keeps_the_source_row_and_changes_the_others(built):
    _, _, m = built
    prompts = ["a photo of a cat riding a bicycle", "a photo of a dog riding a bicycle"]
    kw = dict(latents=x_T(m, seed=9), num_steps=STEPS, guidance_scale=4.0, height=H, width=W, progress=False)
    edited = p2p.edit(m, prompts, p2p.JointReplace(0.5), **kw)
    plain = p2p.generate(m, prompts, **kw)
    assert torch.allclose(edited.latents[0], plain.latents[0], rtol=0, atol=1e-5)
    assert not torch.allclose(edited.latents[1], plain.latents[1], rtol=0, atol=1e-5)


def test_local_blend_is_refused_where_tokens_are_not_16_pixels(built):
    """The official LocalBlend builds its mask on an (H/16, W/16) grid, which these models' tokens (1 x 1 or 2 x 2
    pixels) do not have: refused, naming the token size."""
    _, _, m = built
    side = m.token_side
    with pytest.raises(ValueError, match=f"16 x 16 pixels.*{side} x {side}.*edit without local_blend"):
        p2p.edit(m, ["a cat", "a dog"], p2p.JointReplace(0.5), local_blend=p2p.LocalBlend(("cat", "dog")),
                 latents=x_T(m), num_steps=STEPS, height=H, width=W, progress=False)


def test_a_photo_inverts_and_edits_at_the_models_sizes(built):
    """A photo loaded at 34 x 50 (multiples of the model's 1- or 2-pixel tokens, not of the real models' 16)
    inverts to the model's own latent and edits at that size."""
    from PIL import Image

    _, _, m = built
    h, w = 34, 50
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    inv = p2p.invert(m, photo, "a photo of a cat", num_steps=STEPS, height=h, width=w, progress=False)
    assert tuple(inv.x_T.shape) == (1, m.latent_channels, h // m.latent_downsample, w // m.latent_downsample)
    out = p2p.edit(m, ["a photo of a cat", "a photo of a dog"], p2p.JointReplace(0.5), inversion=inv, progress=False)
    assert out.images.shape == (2, h, w, 3)
