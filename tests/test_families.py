"""Families as tables (models.FAMILIES, weights_tools LAYOUTS): every row builds its tiny model, round-trips
its config and its single-file layout, and generates; an SDXL built as diffusers' own test suite builds
one (size ids embedded at 8 channels, vector conditioning 32 + 6 x 8 = 80) loads from the folder
`StableDiffusionXLPipeline.save_pretrained` writes and generates as that pipeline does; a folder whose
vector-conditioning width disagrees with its towers is refused before any weight file is opened; and
words are checked with the checkpoint's own tokenizer (LDM-400M: WordPiece) before and after loading."""
import dataclasses
import json
import shutil

import pytest
import torch

import ldm_oracles as L
import oracles as O
from models import FAMILIES, SDConfig, StableDiffusion, load_config
from models.clip import default_tokenizer
from models.wordpiece import WordPieceTokenizer
from p2p import LocalBlend, Replace, edit, generate
from p2p.align import word_token_indices
from p2p.blend import word_alpha
from p2p.cli import main
from p2p.config import EditConfig
from weights_tools import CheckpointError, inspect_checkpoint, load_checkpoint, tokenizer_for
from weights_tools.layouts import LAYOUTS
from weights_tools.registry import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# each family's tiny config: a family added to the tables needs one here
TINY = {"sd1": lambda: load_config("tiny"), "sd2": lambda: load_config("tiny-sd2"),
        "sdxl": lambda: load_config("tiny-sdxl"), "ldm": L.tiny_ldm_config}
VOCAB = L.vocab_dir() / "vocab.txt"


def test_every_family_has_a_file_layout_and_a_tiny_config():
    assert list(LAYOUTS) and set(LAYOUTS) == set(FAMILIES) == set(TINY)
    assert {f.code for f in FAMILIES.values()} == set(FAMILIES) and len({f.name for f in FAMILIES.values()}) == len(FAMILIES)


@pytest.mark.parametrize("code", list(FAMILIES))
def test_family_builds_round_trips_and_generates(code, tmp_path):
    cfg = TINY[code]()
    assert cfg.family == code and isinstance(cfg.text, FAMILIES[code].text_config)
    vocab = getattr(cfg.text, "vocab", None)  # LDM's vocabulary file is not part of its config
    back = SDConfig.from_ldm(json.loads(cfg.to_json()))
    assert back == (cfg.replace(text=dataclasses.replace(cfg.text, vocab=None)) if vocab else cfg)
    sd, gen = O.seeded_model(cfg, seed=5)
    O.seeded_init_(sd.text_encoder, gen)
    sd = sd.eval().requires_grad_(False)
    path = save_checkpoint(sd, tmp_path / f"tiny-{code}.safetensors")
    info = inspect_checkpoint(path)
    assert (info["variant"], info["family"], info["loadable"]) == (FAMILIES[code].name, code, True)
    got = load_checkpoint(path, tokenizer=vocab)
    assert got.cfg == cfg
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(sd, part).state_dict(), getattr(got, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    side = 2 * cfg.size_multiple
    out = generate(got, ["a cat riding a bicycle"], seed=1, num_steps=2, height=side, width=side, progress=False)
    assert out.images.shape == (1, side, side, 3) and out.images.std() > 0 and torch.isfinite(out.latents).all()


# ------------------------------------------------------------------ SDXL as diffusers' own tests build it
SIZE_IDS_WIDTH, POOLED = 8, 32
STEPS, GUIDANCE, H, W = 6, 5.0, 32, 48
PROMPTS = ["a photo of a cat riding a bicycle", "a lion eating a burger"]


def dummy_sdxl_pipeline():
    """diffusers' StableDiffusionXLPipeline test components (get_dummy_components): the UNet's
    `addition_time_embed_dim=8`, `projection_class_embeddings_input_dim=80` (6 x 8 + 32), attention heads
    (2, 4), transformer depths (1, 2); two text towers of width 32, 5 layers, exact gelu, a pooled projection
    of 32. Where this library differs it is said: 32 / 64 UNet channels with GroupNorm's 32 groups (its UNet
    normalises in groups of 32, as every released family) where the suite uses 2 / 4 with one group, and
    CLIP's own 49408-token vocabulary (the suite's 1000-token tokenizer is downloaded)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    import openclip_oracles as OC

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=SIZE_IDS_WIDTH, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * SIZE_IDS_WIDTH + POOLED, cross_attention_dim=64)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, sample_size=128)
    text = CLIPTextConfig(bos_token_id=49406, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
                          num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=49408,
                          hidden_act="gelu", projection_dim=POOLED)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text)
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(text)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=O.hf_tokenizer(), tokenizer_2=OC.hf_tokenizer_bang(), unet=unet,
                                     scheduler=O.ref_scheduler(), force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dummy_sdxl(tmp_path_factory):
    pytest.importorskip("diffusers")
    pipe = dummy_sdxl_pipeline()
    folder = tmp_path_factory.mktemp("sdxl-dummy") / "model"
    pipe.save_pretrained(folder)
    return pipe, folder


def test_diffusers_test_suite_sdxl_loads_and_generates_as_its_pipeline(dummy_sdxl):
    pipe, folder = dummy_sdxl
    sd = load_checkpoint(folder)
    assert sd.cfg.family == "sdxl" and sd.cfg.text.size_embed_dim == SIZE_IDS_WIDTH
    assert (sd.cfg.unet.adm_in_channels, sd.cfg.text.pooled_dim, sd.cfg.scale_factor) == (80, POOLED, 0.18215)
    x_T = O.randn(1, 4, H // sd.latent_downsample, W // sd.latent_downsample, seed=7)
    ours = generate(sd, PROMPTS, latents=x_T, num_steps=STEPS, guidance_scale=GUIDANCE, height=H, width=W,
                    progress=False)
    with torch.no_grad():
        ref = pipe(PROMPTS, height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0,
                   latents=x_T.expand(2, -1, -1, -1).clone(), output_type="latent").images
    diff, scale = O.compare(ours.latents, ref)
    assert diff <= 1e-4 * scale, (diff, scale)  # test_parity_sdxl's tolerance for a whole generation
    assert (ours.latents[0] - ours.latents[1]).abs().max() > 1e-3 * scale, "the two prompts gave the same latents"


def test_a_vector_conditioning_that_disagrees_with_its_towers_is_refused_before_any_weight(dummy_sdxl, tmp_path,
                                                                                          monkeypatch):
    import weights_tools.sources as sources

    _, folder = dummy_sdxl
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    unet_json = copy / "unet" / "config.json"
    unet_json.write_text(json.dumps(json.loads(unet_json.read_text()) | {"projection_class_embeddings_input_dim": 81}))

    def no_weights(*args, **kw):
        raise AssertionError("a weight file was opened")

    for name in ("safe_open", "read_safetensors_header", "TorchZip", "open_file"):
        monkeypatch.setattr(sources, name, no_weights)
    for read in (load_checkpoint, inspect_checkpoint):
        with pytest.raises(CheckpointError, match=r"vector conditioning takes 81 channels .*projection_class_embeddings"
                                                  r"_input_dim.* pooled 32 \+ 6 size ids x 8 .*= 80"):
            read(copy)


# ------------------------------------------------------------------ words with the checkpoint's tokenizer
# nine words WordPiece spells letter by letter (the tiny vocabulary has no piece for them): 81 tokens past
# BOS, so the last word lies past the 75-token window; CLIP's BPE needs a few tokens per word
LONG = " ".join(["xylograph"] * 9)
SRC, LION = f"{LONG} squirrel", f"{LONG} lion"


@pytest.fixture(scope="module")
def ldm_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ldm-words") / "tiny-ldm.safetensors"
    return save_checkpoint(L.tiny_ldm(), path)


def test_words_use_the_checkpoints_tokenizer_before_loading(ldm_file, monkeypatch, capsys):
    tok = tokenizer_for(ldm_file, VOCAB)
    assert isinstance(tok, WordPieceTokenizer) and tok.length == 77
    assert word_alpha(default_tokenizer(), [SRC, LION], ["squirrel", "lion"], "LocalBlend words").sum() == 2  # BPE: fits
    cfg = EditConfig(ckpt=str(ldm_file), prompt=SRC, edits=(LION,), local_blend=LocalBlend(("squirrel", "lion")))
    with pytest.raises(ValueError, match="'local_blend.words': .*'squirrel'.* lies past the 75-token limit"):
        cfg.check("edit.yaml", tok)
    with pytest.raises(CheckpointError, match="vocab.txt"):  # a single LDM file: its vocabulary is needed to check
        cfg.check("edit.yaml")

    def not_loaded(*a, **kw):
        raise AssertionError("the words were not checked before loading")

    monkeypatch.setattr("p2p.cli.load_model", not_loaded)
    args = ["edit", "--ckpt", str(ldm_file), "--tokenizer", str(VOCAB), "--prompt", SRC, "--edit", LION,
            "--blend", "squirrel", "lion", "--steps", "2", "-o", "never.png"]
    assert main(args) == 2 and "lies past the 75-token limit" in capsys.readouterr().err


def test_words_use_the_checkpoints_tokenizer_after_loading(ldm_file):
    sd = load_checkpoint(ldm_file, tokenizer=VOCAB)
    before = tokenizer_for(ldm_file, VOCAB)
    prompt = "two squirrels eating burgers"  # WordPiece: squirrel ##s, burger ##s; BPE: one token each
    for word in ("squirrels", "eating", "burgers"):
        assert word_token_indices(sd.tokenizer, prompt, word) == word_token_indices(before, prompt, word)
    assert word_token_indices(sd.tokenizer, prompt, "burgers") != word_token_indices(default_tokenizer(), prompt, "burgers")
    with pytest.raises(ValueError, match="'squirrel'.* lies past the 75-token limit"):
        edit(sd, [SRC, LION], Replace(), local_blend=LocalBlend(("squirrel", "lion")), num_steps=2, height=64,
             width=64, progress=False)


def test_sdxl_and_sd2_tokenizers_before_loading_are_their_models(tmp_path):
    for code in ("sd2", "sdxl"):
        sd = StableDiffusion(TINY[code]())
        path = save_checkpoint(sd, tmp_path / f"{code}.safetensors")
        tok = tokenizer_for(path)
        assert type(tok) is type(sd.tokenizer) and tok.pad == sd.tokenizer.pad
        assert torch.equal(tok(PROMPTS, tok.length), sd.tokenizer(PROMPTS, sd.tokenizer.length))
