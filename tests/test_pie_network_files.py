"""PIE-Bench's metric networks refuse wrong, truncated or missing files, and bad pictures and masks, with a
message naming the file and what is expected; the quirk switches are checked."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models.clip_vision import CLIPPair, CLIPVisionConfig
from models.config import CLIPTextConfig
from models.vit import VisionTransformer, ViTConfig
from p2p.bench.clipscore import clip_pixels, clip_similarity, load_clip, text_ids
from p2p.bench.structure import load_dino, structure_distance
from weights_tools.layout import CheckpointError

SMALL_VIT = ViTConfig(width=64, layers=2, heads=1, mlp_width=32, patch_size=8, grid=4)


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dino") / "dino_vitbase8_pretrain.pth"
    torch.save(VisionTransformer(SMALL_VIT).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A small CLIPModel-layout safetensors file: 64-wide heads, CLIP's 49408 ids (its own vocabulary)."""
    torch.manual_seed(0)
    model = CLIPPair(CLIPTextConfig(width=64, layers=1, heads=1, intermediate_size=32),
                     CLIPVisionConfig(width=64, layers=1, heads=1, intermediate_size=32, patch_size=32), 16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    path = tmp_path_factory.mktemp("clip") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def truncated(path, tmp_path):
    cut = tmp_path / ("cut-" + path.name)
    data = path.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    return cut


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth.*dino_vitbase8_pretrain.pth"):
        load_dino(tmp_path / "nothere.pth")
    with pytest.raises(FileNotFoundError, match="nothere.*clip-vit-large-patch14"):
        load_clip(tmp_path / "nothere")


def test_truncated_files_are_refused(dino_file, clip_file, tmp_path):
    with pytest.raises(CheckpointError, match=r"(?s)truncated.*dino_vitbase8_pretrain\.pth"):
        load_dino(truncated(dino_file, tmp_path))
    with pytest.raises(CheckpointError, match=r"(?s)cut-model\.safetensors.*clip-vit-large-patch14"):
        load_clip(truncated(clip_file, tmp_path))


def test_a_picture_is_not_a_weights_file(tmp_path):
    png = tmp_path / "dino.pth"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(CheckpointError, match="PNG image.*dino_vitbase8_pretrain.pth"):
        load_dino(png)


def test_each_network_refuses_the_others_file(dino_file, clip_file):
    with pytest.raises(ValueError, match="not a DINO ViT backbone.*dino_vitbase8_pretrain.pth"):
        load_dino(clip_file)
    with pytest.raises(ValueError, match="not a CLIP model.*clip-vit-large-patch14"):
        load_clip(dino_file)


def test_a_clip_file_of_another_vocabulary_needs_its_tokenizer(clip_file, tmp_path):
    state = load_file(str(clip_file))
    state["text_model.embeddings.token_embedding.weight"] = torch.zeros(1000, 64)
    path = tmp_path / "small-vocab.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="no tokenizer files.*1000 token ids.*tokenizer="):
        load_clip(path)


def test_dino_loads_the_architecture_of_its_shapes(dino_file):
    model = load_dino(dino_file)
    assert model.cfg == SMALL_VIT and not model.training
    img = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    d = structure_distance(model, img, img[::-1].copy(), layer=1, size=32, max_size=None)
    assert d > 0 and math.isfinite(d)
    # by default the file's last block (the official block 11 of ViT-B/8's 12), here block 1 of 2
    assert structure_distance(model, img, img[::-1].copy(), size=32, max_size=None) == d
    assert structure_distance(model, img, img[::-1].copy(), layer=0, size=32, max_size=None) != d


def test_bad_pictures_are_refused(dino_file, clip_file):
    model, scorer = load_dino(dino_file), load_clip(clip_file)
    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8 \\(H, W, 3\\)"):
        structure_distance(model, img.astype(np.float32), img)
    with pytest.raises(ValueError, match="differ in size"):
        structure_distance(model, img, np.zeros((32, 40, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 \\(H, W, 3\\)"):
        clip_similarity(scorer, np.zeros((32, 32, 4), np.uint8), "a cat")


def test_masks_are_checked_and_an_empty_one_gives_nan(clip_file):
    scorer = load_clip(clip_file)
    img = np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="does not fit"):
        clip_similarity(scorer, img, "a cat", np.ones((48, 64)))
    with pytest.raises(ValueError, match="divide a 0/255 mask by 255"):
        clip_similarity(scorer, img, "a cat", np.full((64, 48), 255, np.uint8))
    empty = np.zeros((64, 48))
    assert math.isnan(clip_similarity(scorer, img, "a cat", empty))
    black = clip_similarity(scorer, np.zeros_like(img), "a cat")
    assert clip_similarity(scorer, img, "a cat", empty, empty_mask="score") == black
    with pytest.raises(ValueError, match="empty_mask"):
        clip_similarity(scorer, img, "a cat", empty, empty_mask="zero")


def test_a_long_prompt_is_cut_as_torchmetrics_or_keeps_its_eos(clip_file):
    scorer = load_clip(clip_file)
    tok = scorer.tokenizer
    prompt = "a photo of a small dog on a red sofa, " * 12
    cut, kept = (text_ids(scorer, prompt, keep_eos=k)[0].tolist() for k in (False, True))
    content = tok.encode(prompt)
    assert cut == [tok.bos, *content[:76]] and kept == [tok.bos, *content[:75], tok.eos]
    with torch.no_grad():
        assert not torch.equal(*(scorer.model.text_features(torch.tensor([ids])) for ids in (cut, kept)))
    short = "a photo of a small dog"
    assert text_ids(scorer, short)[0].tolist() == text_ids(scorer, short, keep_eos=True)[0].tolist() == \
        [tok.bos, *tok.encode(short), tok.eos]


def test_a_folder_config_sets_the_heads(clip_file, tmp_path):
    """config.json beside the weights gives the heads (here 2 of 32) that the shapes cannot."""
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(clip_file.read_bytes())
    (folder / "config.json").write_text(json.dumps({"text_config": {"num_attention_heads": 2},
                                                    "vision_config": {"num_attention_heads": 4}}))
    scorer = load_clip(folder)
    assert (scorer.model.text_model.cfg.heads, scorer.model.vision_model.cfg.heads) == (2, 4)


def test_the_score_is_100_cos_clamped_at_zero(clip_file):
    """100 * cos of the two unit embeddings, and 0 where the cosine is negative (torchmetrics' max(score, 0)):
    the image projection negated flips the cosine's sign."""
    scorer = load_clip(clip_file)
    img = np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    signs = []
    for _ in range(2):
        with torch.no_grad():
            a = scorer.model.image_features(clip_pixels(img, scorer.image_size))
            b = scorer.model.text_features(text_ids(scorer, "a cat"))
            cos = torch.nn.functional.cosine_similarity(a, b).item()
            assert clip_similarity(scorer, img, "a cat") == pytest.approx(max(100 * cos, 0.0), rel=1e-5, abs=1e-6)
            scorer.model.visual_projection.weight.neg_()
        signs.append(cos > 0)
    assert sorted(signs) == [False, True]  # both sides of the clamp were met
