"""LDM-400M (the "ldm" family): its configs, both checkpoint layouts, the full-size key layout, a 10-step
generation against diffusers' LDMTextToImagePipeline, edits and inversion on a tiny LDM, and the
errors for a missing or mismatched vocabulary. Tiny sizes, random weights, fp32."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import ldm_oracles as L
import oracles as O
from models import SDConfig, StableDiffusion, load_config, prefixes
from models.ldmbert import LDMBertConfig, LDMBertModel
from p2p import LocalBlend, Refine, Replace, Reweight, edit, generate, invert
from p2p.align import word_token_indices
from p2p.cli import main
from p2p.inversion import reconstruct
from conftest import GOLDEN_CKPT
from weights_tools import CheckpointError, inspect_checkpoint, load_checkpoint, model_shapes
from weights_tools.tiny import make_tiny  # (the package attribute is shadowed once weights_tools.make_tiny, the CLI, is imported)

STEPS, GUIDANCE, H, W = 10, 5.0, 64, 96
KW = dict(seed=3, num_steps=4, height=64, width=64, progress=False)
SRC, LION = "a painting of a squirrel eating a burger", "a painting of a lion eating a burger"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd():
    return L.tiny_ldm()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, sd):
    """The tiny LDM as a CompVis single file (LM head included, as real files have), config in its metadata."""
    path = tmp_path_factory.mktemp("ldm") / "tiny-ldm.safetensors"
    save_file(L.single_file_state(sd), str(path), {"ldm_config": sd.cfg.to_json()})
    return path


# ------------------------------------------------------------------------------ configs
def test_ldm_400m_config():
    cfg = load_config("ldm-400m")
    assert cfg.family == "ldm" and isinstance(cfg.text, LDMBertConfig) and cfg.text == LDMBertConfig()
    assert (cfg.unet.context_dim, cfg.unet.model_channels, cfg.unet.channel_mult) == (1280, 320, (1, 2, 4, 4))
    assert (cfg.unet.attention_resolutions, cfg.unet.num_heads, cfg.scale_factor) == ((4, 2, 1), 8, 0.18215)
    assert (cfg.default_height, cfg.default_width) == (256, 256)
    assert SDConfig.from_ldm(cfg.to_ldm()) == cfg
    tiny = L.tiny_ldm_config()
    assert SDConfig.from_ldm(json.loads(tiny.to_json())) == tiny.replace(text=dataclasses.replace(tiny.text, vocab=None))


def test_tokenizer_needs_a_vocabulary_of_the_embedding_size(tmp_path):
    with pytest.raises(ValueError, match=r"vocab\.txt.*tokenizer=PATH"):
        LDMBertConfig().tokenizer()
    with pytest.raises(ValueError, match=r"has \d+ tokens but the text tower's embedding has 30522 rows"):
        LDMBertConfig(vocab=str(L.vocab_dir() / "vocab.txt")).tokenizer()
    with pytest.raises(ValueError, match="vocab.txt"):
        StableDiffusion(L.tiny_ldm_config().replace(text=L.tiny_ldmbert_config()))


# ------------------------------------------------------------------------------ full-size key layout
def test_full_size_layout_matches_diffusers_and_compvis():
    """LDM-400M built on the meta device has the real single file's keys and shapes: UNet and VAE through
    diffusers' own converters into diffusers' models built from the published LDM configs, the text
    tower against CompVis' BERTEmbedder layout (its LM head is the one key not built)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    cfg = load_config("ldm-400m")
    ours = model_shapes(cfg)
    meta = {k: torch.empty(s, device="meta") for k, s in ours.items()}
    unet_cfg = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, attention_head_dim=8,
                    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1280,
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae_cfg = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
                   block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4)
    with torch.device("meta"):
        ref_unet, ref_vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg)
    shapes = lambda state: {k: tuple(v.shape) for k, v in state.items()}  # noqa: E731
    assert shapes(sfu.convert_ldm_unet_checkpoint(meta, dict(unet_cfg))) == shapes(ref_unet.state_dict())
    assert shapes(sfu.convert_ldm_vae_checkpoint(meta, dict(vae_cfg))) == shapes(ref_vae.state_dict())
    text = {k.removeprefix("cond_stage_model.transformer."): s for k, s in ours.items()
            if k.startswith("cond_stage_model.")}
    want = L.compvis_bert_shapes()
    assert text == {k: s for k, s in want.items() if not k.startswith("to_logits.")}
    counts = {p: sum(k.startswith(pre) for k in ours) for p, pre in prefixes(cfg).items()}
    assert counts == {"unet": 686, "vae": 248, "text_encoder": 4 + 32 * 13}


def test_full_size_header_validates_and_inspects():
    from weights_tools.layout import detect_variant, validate_shapes

    cfg = load_config("ldm-400m")
    header = model_shapes(cfg) | {"cond_stage_model.transformer." + k: s for k, s in L.compvis_bert_shapes().items()
                                  if k.startswith("to_logits.")}
    assert detect_variant(header)[0] == "LDM-400M"
    validate_shapes(header, cfg, "txt2img-f8-large/model.ckpt")
    with pytest.raises(CheckpointError, match=r"LDM-400M checkpoint .* family 'ldm'"):
        validate_shapes(header, SDConfig(), "model.ckpt")


# ------------------------------------------------------------------------------ loading
def test_single_file_loads_with_its_vocabulary(sd, tiny_file):
    got = load_checkpoint(tiny_file, tokenizer=L.vocab_dir() / "vocab.txt")
    assert got.cfg.family == "ldm" and got.tokenizer.bos == 2 and got.tokenizer.pad == 0
    for part in ("unet", "vae", "text_encoder"):
        ref = getattr(sd, part).state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in getattr(got, part).state_dict().items())
    ids = got.tokenize(["a squirrel"])
    assert ids[0, :5].tolist() == L.hf_bert_ids(["a squirrel"])[0, :5].tolist()
    info = inspect_checkpoint(tiny_file)
    assert info["variant"] == "LDM-400M" and info["loadable"]
    assert info["parts"]["unused"]["tensors"] == 2   # the LM head, never read


def test_single_file_without_vocabulary_is_refused(tiny_file, tmp_path):
    with pytest.raises(CheckpointError, match=r"tiny-ldm\.safetensors.*vocab\.txt.*tokenizer=PATH"):
        load_checkpoint(tiny_file)
    small = tmp_path / "vocab.txt"
    small.write_text("\n".join(L.VOCAB[:-3]) + "\n")
    with pytest.raises(CheckpointError, match=rf"has {len(L.VOCAB) - 3} tokens but the text tower's embedding "
                                              rf"has {len(L.VOCAB)} rows"):
        load_checkpoint(tiny_file, tokenizer=small)
    with pytest.raises(CheckpointError, match="BERT vocabulary .* not found"):
        load_checkpoint(tiny_file, tokenizer=tmp_path / "missing.txt")
    with pytest.raises(CheckpointError, match="only LDM-400M reads"):
        load_checkpoint(GOLDEN_CKPT, tokenizer=small)


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory, sd):
    """LDM-400M's diffusers layout (bert/, unet/, vqvae/, tokenizer/, scheduler/), written by diffusers."""
    pipe = L.ref_ldm_pipeline()
    folder = tmp_path_factory.mktemp("ldm-diffusers") / "ldm-text2im-tiny"
    pipe.unet.save_pretrained(folder / "unet")
    pipe.vqvae.save_pretrained(folder / "vqvae")
    pipe.bert.save_pretrained(folder / "bert")
    pipe.tokenizer.save_pretrained(folder / "tokenizer")   # transformers 5 writes tokenizer.json only
    L.write_vocab(folder / "tokenizer")                     # the hub's folder has vocab.txt
    pipe.scheduler.save_pretrained(folder / "scheduler")
    return folder


def test_diffusers_folder_loads(sd, diffusers_folder):
    got = load_checkpoint(diffusers_folder)   # the vocabulary from its tokenizer/vocab.txt
    assert (got.cfg.unet, got.cfg.family, got.cfg.image_size) == (sd.cfg.unet, "ldm", sd.cfg.image_size)
    assert dataclasses.replace(got.cfg.text, vocab=None) == dataclasses.replace(sd.cfg.text, vocab=None)
    for part in ("unet", "vae", "text_encoder"):
        ref = getattr(sd, part).state_dict()
        mine = getattr(got, part).state_dict()
        assert mine.keys() == ref.keys() and all(torch.equal(v, ref[k]) for k, v in mine.items())
    assert inspect_checkpoint(diffusers_folder)["variant"] == "LDM-400M"
    assert got.tokenize(L.WORDPIECE_PROMPTS[:6]).tolist() == L.hf_bert_ids(L.WORDPIECE_PROMPTS[:6]).tolist()


def test_diffusers_folder_vocabulary_from_tokenizer_json(diffusers_folder, tmp_path):
    import shutil

    folder = tmp_path / "json-only"
    shutil.copytree(diffusers_folder, folder)
    (folder / "tokenizer" / "vocab.txt").unlink()
    got = load_checkpoint(folder)
    assert got.tokenize(L.WORDPIECE_PROMPTS[:6]).tolist() == L.hf_bert_ids(L.WORDPIECE_PROMPTS[:6]).tolist()
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer=PATH"):
        load_checkpoint(folder)


def test_diffusers_folder_converts_to_the_single_file(diffusers_folder, tiny_file, tmp_path):
    from weights_tools import convert_checkpoint

    back = load_file(str(convert_checkpoint(diffusers_folder, tmp_path / "back.safetensors")))
    ref = load_file(str(tiny_file))
    kept = {k for k in ref if not k.startswith("cond_stage_model.transformer.to_logits")}
    assert back.keys() == kept and all(torch.equal(back[k], ref[k]) for k in kept)


# ------------------------------------------------------------------------------ generation parity
@pytest.fixture(scope="module")
def runs(sd):
    pipe = L.ref_ldm_pipeline()
    prompts = ["a photo of a cat riding a bicycle", "unhappy squirrels eating burgers"]
    x_T = O.randn(1, 4, H // sd.latent_downsample, W // sd.latent_downsample, seed=7)
    ours = generate(sd, prompts, latents=x_T, num_steps=STEPS, guidance_scale=GUIDANCE, height=H, width=W,
                    progress=False)
    seen, decode = {}, pipe.vqvae.decode

    def seeing(z, **kw):   # the pipeline decodes z0 / scaling_factor and returns no latents: catch them here
        seen["z0"] = z * pipe.vqvae.config.scaling_factor
        return decode(z, **kw)

    pipe.vqvae.decode = seeing
    try:
        ref_img = pipe(prompts, height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0,
                       latents=x_T.expand(len(prompts), -1, -1, -1).clone(), output_type="np").images
    finally:
        pipe.vqvae.decode = decode
    return ours, seen["z0"], ref_img


def test_generate_matches_ldm_pipeline(runs):
    ours, ref_z0, ref_img = runs
    diff, scale = O.compare(ours.latents, ref_z0)
    msg = f"LDM generate z0 vs LDMTextToImagePipeline ({STEPS} steps, cfg {GUIDANCE}): max|diff| = {diff:.3e}, " \
          f"ref scale = {scale:.3f}"
    print("\n  " + msg, end="")
    assert diff <= 1e-4 * scale, msg
    assert (ours.latents[0] - ours.latents[1]).abs().max() > 1e-2
    ref_u8 = (ref_img * 255).astype(np.uint8)   # truncation, as the reference's latent2image
    d8 = np.abs(ours.images.astype(int) - ref_u8.astype(int))
    print(f"\n  LDM uint8 images: max|diff| = {d8.max()} LSB, {int((d8 > 0).sum())} of {d8.size} values differ", end="")
    assert ours.images.shape == (2, H, W, 3) and d8.max() <= 1


# ------------------------------------------------------------------------------ edits and inversion
def test_word_positions_cover_wordpiece_pieces(sd):
    tok = sd.tokenizer
    assert [tok.decoder[i] for i in tok.encode("unhappy squirrels")] == ["un", "##happy", "squirrel", "##s"]
    assert word_token_indices(tok, "a photo of unhappy squirrels", "unhappy") == [4, 5]
    assert word_token_indices(tok, "a photo of unhappy squirrels", "squirrels") == [6, 7]
    assert word_token_indices(tok, "crème brûlée, please", "brûlée,") == [2, 3]


def test_replace_with_itself_is_generate_and_edits_run(sd):
    same = edit(sd, [SRC, SRC], Replace(1.0, 1.0), **KW)
    torch.testing.assert_close(same.latents, generate(sd, [SRC, SRC], **KW).latents, rtol=0, atol=1e-4)
    blend = LocalBlend(("squirrel", "lion"))
    for spec, prompts in ((Replace(0.8, 0.4), [SRC, LION]),
                          (Refine(0.8, 0.4), [SRC, "a painting of a squirrel eating a big burger"]),
                          (Reweight(0.8, 0.4, equalizer={"burger": 3.0}), [SRC, SRC])):
        out = edit(sd, prompts, spec, local_blend=blend if spec.__class__ is Replace else None, **KW)
        assert out.images.shape == (2, 64, 64, 3) and torch.isfinite(out.latents).all()
        assert (out.latents[0] - out.latents[1]).abs().max() > 1e-4, spec


def test_inversion_methods_run(sd):
    img = torch.linspace(-1, 1, 64)[None, None, :, None].expand(1, 3, 64, 64).clone()
    direct = invert(sd, img, SRC, method="direct", num_steps=3, progress=False)
    z = reconstruct(sd, direct, progress=False)
    assert (z - direct.image_latents).abs().max() <= 1e-4 * direct.image_latents.abs().max()
    for method in ("ddim", "null-text", "negative-prompt"):
        inv = invert(sd, img, SRC, method=method, num_steps=3, num_inner_steps=2, progress=False)
        out = edit(sd, [SRC, LION], Replace(0.8, 0.4), inversion=inv, progress=False)
        assert torch.isfinite(out.latents).all(), method


def test_cli_inspect_names_ldm(tiny_file, capsys):
    assert main(["inspect", str(tiny_file)]) == 0
    assert "LDM-400M" in capsys.readouterr().out


def test_make_tiny_ldm(tmp_path):
    path = make_tiny(tmp_path / "t.safetensors", config=L.tiny_ldm_config())
    assert not any("position_ids" in k for k in load_file(str(path)))
    got = load_checkpoint(path, tokenizer=L.vocab_dir() / "vocab.txt")
    assert isinstance(got.text_encoder, LDMBertModel)


def test_cli_edit_with_tokenizer(tiny_file, tmp_path, capsys):
    out = tmp_path / "edit.png"
    args = ["edit", "--ckpt", str(tiny_file), "--prompt", SRC, "--edit", LION, "--blend", "squirrel", "lion",
            "--steps", "2", "--height", "64", "--width", "64", "-o", str(out)]
    assert main(args) == 2 and not out.exists()
    assert "--tokenizer PATH" in capsys.readouterr().err
    assert main(args + ["--tokenizer", str(L.vocab_dir() / "vocab.txt")]) == 0
    assert out.exists() and out.with_name(out.name + ".json").exists()


def test_ldm_notebook_local_blend_differs_without_pooling(sd):
    """The LDM notebook's LocalBlend resizes the unpooled map (pool=False): a smaller mask, a different edit."""
    from p2p import AttentionStore

    prompts, kw = [SRC, LION], KW | dict(height=128, width=128)   # 16x16 latents, 8x8 maps at level 1
    out = edit(sd, prompts, Replace(0.8, 0.4), store=AttentionStore(), **kw)
    blends = [LocalBlend(("squirrel", "lion"), threshold=0.7, level=1, pool=p) for p in (True, False)]
    pooled, unpooled = (b.build(sd.tokenizer, prompts, 4, sd.unet.sites).mask_for(out.attention, (16, 16))
                        for b in blends)
    assert 0 < unpooled.sum() < pooled.sum() < pooled.numel()
    assert (pooled | unpooled).equal(pooled)   # max-pooling only grows the mask
    a, b = (edit(sd, prompts, Replace(0.8, 0.4), local_blend=blend, **kw) for blend in blends)
    assert (a.latents - b.latents).abs().max() > 1e-4


def test_sweep_on_the_single_file_with_its_vocabulary(tiny_file, tmp_path):
    """`p2p sweep --tokenizer`: the cells load the LDM single file with the vocabulary given, and words
    become token positions with the model's own WordPiece tokenizer (a 2-cell grid, 2 steps)."""
    cfg = tmp_path / "abl.yaml"
    cfg.write_text(f"""description: LDM sweep
ckpt: {tiny_file}
prompt: {SRC}
edits: [{LION}]
mode: replace
local_blend: {{words: [squirrel, lion], threshold: 0.8}}
num_steps: 2
height: 64
width: 64
grid:
  cross_replace_steps: [0.4, 0.8]
""")
    out = tmp_path / "run"
    assert main(["sweep", str(cfg), "-o", str(out), "--no-progress", "--tokenizer",
                 str(L.vocab_dir() / "vocab.txt")]) == 0
    assert len(json.loads((out / "metrics.json").read_text())["cells"]) == 2
    assert main(["sweep", str(cfg), "-o", str(tmp_path / "bad"), "--no-progress"]) == 2   # no vocabulary
