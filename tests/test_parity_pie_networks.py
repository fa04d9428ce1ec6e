"""PIE-Bench's two network metrics against independent implementations with the same random weights.

* CLIP similarity: transformers' CLIPModel (a small random config saved with save_pretrained) scored by
  torchmetrics' own CLIPScore with transformers' PIL CLIP image processor and CLIPTokenizer, the official
  metric's code path.
* Structure distance: DINO's ViT against transformers' ViTModel (dino-vitb8 is one), its keys converted to
  DINO's layout; the key self-similarity and the distance against the official formulas on its keys.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import oracles as O
from models.vit import VisionTransformer, ViTConfig
from p2p.bench.clipscore import clip_pixels, clip_similarity, load_clip
from p2p.bench.structure import dino_input, key_self_similarity, load_dino, resized_size, structure_distance

transformers = pytest.importorskip("transformers")
CLIPScore = pytest.importorskip("torchmetrics.multimodal.clip_score").CLIPScore

RTOL = 1e-5


def picture(h=512, w=512, seed=0) -> np.ndarray:
    """A real-looking picture: smooth shapes and gradients with some noise, uint8 (H, W, 3)."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(6 * x + c) * np.cos(4 * y - c) for c in (0.0, 1.0, 2.0)], -1) * 90 + 128
    for _ in range(6):
        cy, cx, r = g.uniform(0, 1, 3) * (h / max(h, w), w / max(h, w), 0.3)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r ** 2] = g.uniform(0, 255, 3)
    return np.clip(img + g.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def jitter(model: torch.nn.Module, seed: int) -> None:
    """Every parameter moved off its initial value (LayerNorms included), so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


# ------------------------------------------------------------------------------------------------ CLIP
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A small random CLIPModel (CLIP's vocabulary and 77 positions, the legacy eos_token_id 2 of
    openai/clip-vit-large-patch14's config), saved with its tokenizer as transformers writes them."""
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=128, num_attention_heads=2, num_hidden_layers=2,
                         intermediate_size=37, max_position_embeddings=77, eos_token_id=2, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=192, num_attention_heads=3, num_hidden_layers=2, intermediate_size=64,
                           patch_size=32, image_size=224, hidden_act="quick_gelu"),
        projection_dim=24)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    jitter(model, 1)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    O.hf_tokenizer().save_pretrained(folder)
    return folder, model


class Features(torch.nn.Module):
    """The CLIPModel as torchmetrics calls it: transformers 5 returns the projected embeddings as an output's
    pooler_output where earlier versions (the official environment's) returned the tensor itself."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kw):
        out = self.model.get_image_features(*args, **kw)
        return getattr(out, "pooler_output", out)

    def get_text_features(self, *args, **kw):
        out = self.model.get_text_features(*args, **kw)
        return getattr(out, "pooler_output", out)


@pytest.fixture(scope="module")
def official(clip_folder):
    """torchmetrics' CLIPScore over the same CLIPModel, with the PIL image processor of CLIP's settings."""
    _, model = clip_folder
    processor = transformers.CLIPProcessor(image_processor=transformers.CLIPImageProcessorPil(),
                                           tokenizer=O.hf_tokenizer())
    metric = CLIPScore(model_name_or_path=lambda: (Features(model), processor))

    def score(image: np.ndarray, text: str, mask=None) -> float:
        if mask is not None:  # as the official calculate_clip_similarity
            image = np.uint8(image * mask)
        return metric(torch.tensor(image).permute(2, 0, 1), text).item()
    return score


def test_clip_pixels_equal_the_image_processor(clip_folder):
    """Resize (PIL bicubic to uint8), crop, rescale and normalise as CLIPImageProcessorPil with CLIP's settings,
    on a square, a wide and a tall picture."""
    processor = transformers.CLIPImageProcessorPil()
    for h, w in ((512, 512), (480, 640), (700, 333)):
        img = picture(h, w, seed=h)
        want = processor(images=torch.tensor(img).permute(2, 0, 1), return_tensors="pt")["pixel_values"]
        got = clip_pixels(img)
        assert got.shape == want.shape == (1, 3, 224, 224)
        assert (got - want).abs().max().item() < 1e-6, (h, w)


@pytest.mark.parametrize("prompt", ["a slanted rusty mountain bicycle on the road in front of a building",
                                    "a cat, " * 40])  # the second is longer than 77 ids: torchmetrics cuts it
def test_clip_similarity_equals_torchmetrics(clip_folder, official, prompt):
    folder, _ = clip_folder
    scorer = load_clip(folder)
    img = picture(seed=3)
    want, got = official(img, prompt), clip_similarity(scorer, img, prompt)
    assert want > 0
    assert abs(got - want) <= RTOL * abs(want), (got, want)


def test_clip_similarity_of_the_edited_part_equals_torchmetrics(clip_folder, official):
    """The picture times the mask at full size, then the processor: the official edited-part score."""
    folder, _ = clip_folder
    scorer = load_clip(folder)
    img, mask = picture(seed=4), np.zeros((512, 512), np.float64)
    mask[100:300, 150:420] = 1
    prompt = "a red heart"
    want = official(img, prompt, np.repeat(mask[..., None], 3, axis=2))
    got = clip_similarity(scorer, img, prompt, mask)
    assert abs(got - want) <= RTOL * abs(want), (got, want)
    assert abs(got - clip_similarity(scorer, img, prompt)) > 1e-3  # the mask changes the picture scored


def test_a_single_weights_file_loads_with_clips_own_vocabulary(clip_folder, tmp_path):
    """The weights file alone (no config.json, no tokenizer files): sizes from its shapes, CLIP's 64-wide
    heads, CLIP's own vocabulary; it scores as the folder does."""
    folder, _ = clip_folder
    single = tmp_path / "clip.safetensors"
    single.write_bytes((folder / "model.safetensors").read_bytes())
    img, prompt = picture(seed=5), "a dog on the grass"
    scorer = load_clip(single)
    assert (scorer.model.text_model.cfg.heads, scorer.model.vision_model.cfg.heads) == (2, 3)
    want = clip_similarity(load_clip(folder), img, prompt)
    assert clip_similarity(scorer, img, prompt) == pytest.approx(want, rel=1e-6)


def test_clip_image_features_equal_transformers(clip_folder):
    folder, model = clip_folder
    scorer = load_clip(folder)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want, got = Features(model).get_image_features(pixels), scorer.model.image_features(pixels)
    assert (got - want).abs().max() <= RTOL * want.abs().max()


# ------------------------------------------------------------------------------------------------ DINO
DINO = ViTConfig(width=128, layers=3, heads=2, mlp_width=256, patch_size=8, grid=8)


# transformers' ViT layer names -> DINO's: 5.x (`layers.N.attention.q_proj`, ...) and 4.x (`encoder.layer.N.`)
VIT_NAMES = {
    5: ("layers.{}.", {"layernorm_before": "norm1", "attention.o_proj": "attn.proj", "layernorm_after": "norm2",
                       "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
        ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
    4: ("encoder.layer.{}.", {"layernorm_before": "norm1", "attention.output.dense": "attn.proj",
                              "layernorm_after": "norm2", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"},
        ("attention.attention.query", "attention.attention.key", "attention.attention.value"))}


def vit_version(state: dict) -> int:
    return 5 if "layers.0.layernorm_before.weight" in state else 4


def dino_keys_from_vit(state: dict, layers: int) -> dict:
    """transformers ViTModel's keys -> DINO's backbone keys (q, k and v fused into qkv)."""
    out = {"cls_token": state["embeddings.cls_token"], "pos_embed": state["embeddings.position_embeddings"],
           "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": state["layernorm.weight"], "norm.bias": state["layernorm.bias"]}
    prefix, names, qkv = VIT_NAMES[vit_version(state)]
    for i in range(layers):
        hf, ours = prefix.format(i), f"blocks.{i}."
        for kind in ("weight", "bias"):
            for a, b in names.items():
                out[f"{ours}{b}.{kind}"] = state[f"{hf}{a}.{kind}"]
            out[f"{ours}attn.qkv.{kind}"] = torch.cat([state[f"{hf}{p}.{kind}"] for p in qkv])
    return out


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    cfg = transformers.ViTConfig(hidden_size=DINO.width, num_hidden_layers=DINO.layers,
                                 num_attention_heads=DINO.heads, intermediate_size=DINO.mlp_width,
                                 patch_size=DINO.patch_size, image_size=DINO.grid * DINO.patch_size,
                                 hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)
    torch.manual_seed(0)
    vit = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    jitter(vit, 2)
    path = tmp_path_factory.mktemp("dino") / "dino_vitbase8_pretrain.pth"
    torch.save(dino_keys_from_vit(vit.state_dict(), DINO.layers), path)
    return path, vit


def official_self_similarity(keys: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The official attn_cosine_sim, written from its formula: (1, N, N)."""
    x = keys[None]
    norm = x.norm(dim=2, keepdim=True)
    return (x @ x.permute(0, 2, 1)) / torch.clamp(norm @ norm.permute(0, 2, 1), min=eps)


def vit_last_keys(vit, pixels: torch.Tensor) -> torch.Tensor:
    """transformers ViTModel's last layer's keys (N, width) from its hidden states."""
    with torch.no_grad():
        h = vit(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][0]
        v5 = vit_version(vit.state_dict()) == 5
        layer = vit.layers[-1] if v5 else vit.encoder.layer[-1]
        key = layer.attention.k_proj if v5 else layer.attention.attention.key
        return key(layer.layernorm_before(h))


def test_dino_loads_with_the_architecture_of_its_shapes(dino):
    path, _ = dino
    assert load_dino(path).cfg == DINO


def test_dino_tokens_equal_transformers_vit(dino):
    path, vit = dino
    model = load_dino(path)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want, got = vit(pixel_values=pixels).last_hidden_state, model(pixels)
    assert (got - want).abs().max() <= RTOL * want.abs().max()


def test_dino_last_keys_and_self_similarity_equal_transformers(dino):
    path, vit = dino
    model = load_dino(path)
    pixels = torch.randn(1, 3, 64, 64) * 3
    want = vit_last_keys(vit, pixels)
    with torch.no_grad():
        got = model.keys(pixels, DINO.layers - 1)[0]
    assert (got - want).abs().max() <= RTOL * want.abs().max()
    sim_want = official_self_similarity(want)[0]
    assert (key_self_similarity(got) - sim_want).abs().max() <= RTOL


def test_structure_distance_equals_the_official_formula_on_transformers_keys(dino):
    """Two 64 px pictures (the model's trained grid, as 224 px is DINO ViT-B/8's): 0..255 floats normalised
    with ImageNet's mean and std, the last layer's key self-similarities, their mean squared difference."""
    path, vit = dino
    model = load_dino(path)
    a, b = picture(64, 64, seed=6), picture(64, 64, seed=7)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def keys(img):
        x = (torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None] - mean) / std
        return vit_last_keys(vit, x)
    want = F.mse_loss(official_self_similarity(keys(b)), official_self_similarity(keys(a))).item()
    got = structure_distance(model, a, b, layer=DINO.layers - 1, size=64, max_size=None)
    assert want > 0
    assert abs(got - want) <= RTOL * want, (got, want)
    assert structure_distance(model, a, a, layer=DINO.layers - 1, size=64, max_size=None) == 0.0


def test_dino_input_resizes_as_torchvision_resize_224_max_480():
    """torchvision's Resize(224, max_size=480) sizes; 512 x 512 (PIE-Bench) -> 224 x 224, bilinear without
    antialiasing (torchvision 0.13's tensor Resize), on 0..255 values."""
    assert resized_size(512, 512) == (224, 224)
    assert resized_size(512, 768) == (224, 336)
    assert resized_size(1000, 300) == (480, 144)  # 746 > 480: both shrink, int(480 * 224 / 746) = 144
    img = picture(512, 512, seed=8)
    x = dino_input(img)
    raw = torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None]
    plain = F.interpolate(raw, size=(224, 224), mode="bilinear", align_corners=False)
    assert torch.allclose(x[0, 0] * 0.229 + 0.485, plain[0, 0], atol=1e-3)
    assert x.abs().max() > 100  # the official range quirk: 0..255 reaches the normalisation
    assert dino_input(img, pixel_range=1.0).abs().max() < 3


def test_dino_position_embedding_follows_dinos_interpolation(dino):
    """The trained grid of a square picture keeps pos_embed; any other grid (also a non-square picture of as
    many patches) is resampled bicubically with DINO's +0.1 scale, a little off transformers' size-based one."""
    path, vit = dino
    model = load_dino(path)
    assert model.position_embedding(64, 64) is model.pos_embed
    moved = model.position_embedding(64, 71)  # 8 x 8 patches, yet not square: resampled, as DINO does
    assert moved.shape == model.pos_embed.shape and not torch.equal(moved, model.pos_embed)
    pixels = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        theirs = vit.embeddings.interpolate_pos_encoding(torch.zeros(1, 61, DINO.width), 48, 80)
        ours = model.position_embedding(48, 80)
    assert ours.shape == theirs.shape == (1, 61, DINO.width)
    gap = (ours - theirs).abs().max().item()
    assert 0 < gap < 0.2 * theirs.abs().max().item(), gap
    assert model(pixels).shape == (1, 61, DINO.width)
