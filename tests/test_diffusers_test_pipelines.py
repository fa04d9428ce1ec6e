"""diffusers' own tiny test pipelines, which researchers reuse in their unit tests: the StableDiffusion2 fast
tests' components (a UNet whose first level has no attention, heads (2, 4), linear projections; a 5-layer gelu
CLIP text tower with a vocabulary of 1000; its own tokenizer) saved by diffusers load with the folder's own
tokenizer (tokenizer.json as transformers saves it, or vocab.json + merges.txt) and generate as the pipeline
does; the SD v1 fast tests' components (widths 4 and 8 with 2 norm groups, 8 heads, no attention at the first
level, a quick_gelu tower) likewise; and the SDXL fast tests' (widths 32 and 64 with one norm group, two gelu
towers of a vocabulary of 1000, each with its own tokenizer folder and padding)."""
import gzip
import json
import shutil

import pytest
import torch

import oracles as O
from models import SDConfig
from weights_tools import BadConfig, diffusers_keys, load_checkpoint
from weights_tools.layout import check_plausible

pytest.importorskip("diffusers")
VOCAB = 1000
STEPS, GUIDANCE, H, W = 4, 7.5, 32, 32
PROMPTS = ["a photo of a cat riding a bicycle", "a lion eating a burger"]


def tiny_bpe(folder, pad: str):
    """A CLIP BPE tokenizer of VOCAB ids: the byte symbols, their word-final forms, CLIP's first merges and the
    two special tokens, as vocab.json / merges.txt / tokenizer_config.json."""
    from transformers import CLIPTokenizer

    with gzip.open(O.open_clip_bpe_path(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:1 + VOCAB - 512 - 2]
    symbols = list(O._bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad, "model_max_length": 77}))
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert len(tok) == VOCAB
    return tok


def fast_test_pipeline(tokenizer, unet: dict, vae: dict, text: dict):
    """A StableDiffusionPipeline as diffusers' fast tests assemble one (get_dummy_components): seeded parts with
    these settings beside the shared ones, DDIM, no safety checker."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, cross_attention_dim=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), **unet)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], **vae)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=VOCAB, **text))
    pipe = StableDiffusionPipeline(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd1_test_pipeline(tokenizer):
    """StableDiffusionPipelineFastTests: widths 4 and 8 with 2 norm groups, 8 heads, a quick_gelu tower."""
    return fast_test_pipeline(tokenizer, dict(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2),
                         dict(block_out_channels=[4, 8], norm_num_groups=2), {})


def sd2_test_pipeline(tokenizer):
    """StableDiffusion2PipelineFastTests: widths 32 and 64, heads (2, 4), linear projections, a gelu tower."""
    return fast_test_pipeline(tokenizer, dict(block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=(2, 4),
                                         use_linear_projection=True),
                         dict(block_out_channels=[32, 64], sample_size=128), dict(hidden_act="gelu", projection_dim=512))


def test_sd1_test_pipeline_loads_and_matches(tmp_path):
    pipe = sd1_test_pipeline(tiny_bpe(tmp_path / "bpe", pad="<|endoftext|>"))
    pipe.save_pretrained(tmp_path / "saved")
    sd = load_checkpoint(tmp_path / "saved")
    assert sd.cfg.family == "sd1" and sd.cfg.unet.norm_groups == 2 and sd.cfg.vae.norm_groups == 2
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(sd.tokenize(PROMPTS), ids)
    diff, scale = O.z0_against_pipeline(sd, pipe, PROMPTS, STEPS, GUIDANCE, H, W)
    assert diff <= 1e-4 * scale, (diff, scale)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd2-test-pipeline")
    pipe = sd2_test_pipeline(tiny_bpe(root / "bpe", pad="!"))
    pipe.save_pretrained(root / "saved")
    files = root / "vocab-files"  # the same folder, its tokenizer as vocab.json + merges.txt
    shutil.copytree(root / "saved", files, ignore=lambda d, names: [n for n in names if n == "tokenizer"])
    shutil.copytree(root / "bpe", files / "tokenizer")
    return pipe, root / "saved", files


@pytest.mark.parametrize("which", ["saved", "vocab-files"])
def test_sd2_test_pipeline_loads_and_matches(sd2, which):
    pipe, saved, files = sd2
    sd = load_checkpoint(saved if which == "saved" else files)
    assert sd.cfg.family == "sd2" and sd.cfg.text.vocab_size == VOCAB and sd.cfg.unet.attention_resolutions == (2,)
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(sd.tokenize(PROMPTS), ids)
    diff, scale = O.z0_against_pipeline(sd, pipe, PROMPTS, STEPS, GUIDANCE, H, W)
    assert diff <= 1e-4 * scale, (diff, scale)


def test_a_first_level_without_attention_is_plausible():
    """StableDiffusionPipelineFastTests' UNet: 8 heads over widths 4 and 8, the first level without attention."""
    unet = dict(block_out_channels=[4, 8], layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=2)
    ucfg, _ = diffusers_keys.unet_config(unet, "unet")
    check_plausible(SDConfig(unet=ucfg), "diffusers' SD test UNet")


def test_a_small_vocabulary_without_its_tokenizer_is_refused(sd2, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(sd2[1], copy, ignore=lambda d, names: [n for n in names if n == "tokenizer"])
    with pytest.raises(BadConfig, match=r"vocabulary of 1000, not CLIP's 49408, and the folder holds no tokenizer/"):
        load_checkpoint(copy)


def sdxl_test_pipeline(tokenizer, tokenizer_2):
    """StableDiffusionXLPipelineFastTests' components (get_dummy_components), seeded as there: widths 32 and 64
    with one norm group, the first level without attention, heads (2, 4), transformer_layers_per_block (1, 2),
    size ids of width 8 (80 = 6 * 8 + 32 vector channels), two 5-layer gelu towers of a vocabulary of 1000 (the
    second with its projection, 32), their own tokenizers; DDIM, the scheduler our sampler is held to."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                                cross_attention_dim=64, norm_num_groups=1)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                              timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, sample_size=128)
    torch.manual_seed(0)
    config = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
                            num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=VOCAB,
                            hidden_act="gelu", projection_dim=32)
    text_encoder = CLIPTextModel(config)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                     text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-test-pipeline")
    pipe = sdxl_test_pipeline(tiny_bpe(root / "bpe", pad="<|endoftext|>"), tiny_bpe(root / "bpe_2", pad="!"))
    pipe.save_pretrained(root / "saved")
    return pipe, root / "saved"


def test_sdxl_test_pipeline_loads_and_matches(sdxl):
    """Its own two tokenizers are read, each with its own padding, and it generates as StableDiffusionXLPipeline
    from the same latents (z0 within 1e-4, pictures within one uint8 level)."""
    import numpy as np
    from p2p import generate

    pipe, saved = sdxl
    sd = load_checkpoint(saved)
    assert sd.cfg.family == "sdxl" and sd.cfg.text.clip.vocab_size == sd.cfg.text.openclip.vocab_size == VOCAB
    assert sd.cfg.unet.norm_groups == 1 and sd.cfg.text.clip.tokenizer == str(saved / "tokenizer")
    ids = [tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
           for tok in (pipe.tokenizer, pipe.tokenizer_2)]
    assert torch.equal(sd.tokenize(PROMPTS), torch.stack(ids, dim=1)) and not torch.equal(*ids)  # two paddings
    x_T = O.randn(1, 4, H // sd.latent_downsample, W // sd.latent_downsample, seed=7)
    ours = generate(sd, PROMPTS, latents=x_T, num_steps=STEPS, guidance_scale=GUIDANCE, height=H, width=W,
                    progress=False)
    with torch.no_grad():
        ref = pipe(PROMPTS, height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0,
                   latents=x_T.expand(len(PROMPTS), -1, -1, -1).clone(), output_type="latent").images
        pictures = pipe.image_processor.postprocess(pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample,
                                                    output_type="np")
    diff, scale = O.compare(ours.latents, ref)
    print(f"\n  SDXL test pipeline: z0 max|diff| / scale = {diff / scale:.2e}", end="")
    assert diff <= 1e-4 * scale, (diff, scale)
    levels = np.abs(ours.images.astype(int) - (pictures * 255).astype(int)).max()
    print(f", pictures: {levels} uint8 levels apart", end="")
    assert levels <= 1, levels


def test_an_sdxl_folder_with_a_small_vocabulary_needs_its_tokenizers(sdxl, tmp_path):
    """Without tokenizer_2/ (or with towers of two vocabulary sizes) it is refused by name, before any tensor."""
    copy = tmp_path / "model"
    shutil.copytree(sdxl[1], copy, ignore=lambda d, names: [n for n in names if n == "tokenizer_2"])
    with pytest.raises(BadConfig, match=r"vocabularies of \[1000\] \(CLIP's: 49408\).*it lacks tokenizer_2/: add the tokenizers"):
        load_checkpoint(copy)
    shutil.copytree(sdxl[1] / "tokenizer_2", copy / "tokenizer_2")
    config = json.loads((copy / "text_encoder_2" / "config.json").read_text())
    (copy / "text_encoder_2" / "config.json").write_text(json.dumps(config | {"vocab_size": 49408}))
    with pytest.raises(BadConfig, match=r"vocabularies of \[1000, 49408\].*one vocab_size"):
        load_checkpoint(copy)
