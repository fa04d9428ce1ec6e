"""Prompt-to-Prompt on joint attention (p2p.joint_control) held to the official MM-DiT editing code's recorded
tensors (tests/fixtures/mmdit: the LocalBlend map math, the masks, the blended latents, the word columns) and
to the rules of its qiki replacement on synthetic projections."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.joint import JointSite
from models.tokenizer_json import read_tokenizer
import p2p.viz
from p2p import LocalBlend
from p2p.blend import Blender
from p2p.joint_control import (METHODS, JointAttentionStore, JointBlender, JointController, JointReplace,
                               blend_alpha, blend_mask, image_text_probs, model_layout, smooth, text_columns,
                               word_maps)

FIX = Path(__file__).parent / "fixtures" / "mmdit"
GRID, LATENT = (6, 8), (12, 16)


def case(name):
    return load_file(FIX / f"{name}.safetensors"), json.loads((FIX / f"{name}.json").read_text())


def layout(model):
    """The text sequence of the tiny models: SD3 77 CLIP-L positions then 256 T5 ones; Flux 512 T5 ones."""
    if model == "sd3":
        return [(read_tokenizer(FIX / "tiny-sd3" / "tokenizer"), slice(0, 77)),
                (read_tokenizer(FIX / "tiny-sd3" / "tokenizer_3"), slice(77, 333))]
    return [(read_tokenizer(FIX / "tiny-flux" / "tokenizer_2"), slice(0, 512))]


def pack(x):
    """(B, 16, h, w) -> Flux's packed (B, h/2 w/2, 64)."""
    B, C, h, w = x.shape
    return x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w // 4, 4 * C)


def unpack(x, h=12, w=16):
    B, _, D = x.shape
    return x.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, h, w)


# the stored blocks of each LocalBlend case in call order: (official index, name, kind)
STORED = {"sd3_qiki_localblend_th": [(1, "transformer_blocks.1", "joint"), (2, "transformer_blocks.2", "joint")],
          "flux_qiki_localblend_th": [(1, "transformer_blocks.1", "double"),
                                      (2, "single_transformer_blocks.0", "single")]}


def site(index, name, kind, text=333, image=48):
    img, txt = (slice(0, image), slice(image, image + text)) if kind == "joint" else (
        slice(text, text + image), slice(0, text))
    return JointSite(index, name, kind, img, txt, 2, GRID)


@pytest.mark.parametrize("name", sorted(STORED))
def test_the_map_math_reproduces_their_aggregate_smoothing_and_masks_exactly(name):
    t, meta = case(name)
    blender = JointBlender(t["alpha_layers"], (1, 2), range(5), meta["threshold"])
    for s in range(5):
        blender.entries = {i: list(t[f"store.{n}"][:s + 1]) for i, n, _ in STORED[name]}
        blender.grid, blender.pool = GRID, STORED[name][0][2] == "joint"
        raw = blender.aggregate()
        assert torch.equal(raw, t["blend_map_raw_steps"][s])
        smoothed = smooth(raw, GRID)
        assert torch.equal(smoothed, t["blend_map_steps"][s])
        mask = blend_mask(smoothed, GRID, LATENT, meta["threshold"], blender.pool).float()
        want = t["mask_steps"][s]
        if name.startswith("flux"):  # one value per packed token: each token's 2x2 latent block
            assert torch.equal(mask[:, 0, ::2, ::2].reshape(1, 48, 1), want)
            assert torch.equal(mask, mask[:, :, ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3))
        else:
            assert torch.equal(mask, want)


@pytest.mark.parametrize("name", sorted(STORED))
def test_after_step_blends_their_latents_bit_for_bit_and_stops_at_end_blend(name):
    t, meta = case(name)
    flux = name.startswith("flux")
    ctrl = JointController(meta["prompts"], JointReplace(), 10, layout(meta["family"]),
                           LocalBlend(tuple(map(tuple, meta["controller"]["local_blend_words"])),
                                      threshold=meta["threshold"], blocks=(1, 2)))
    for s in range(10):
        if s < 5:
            for i, n, kind in STORED[name]:
                ctrl.blend.add(site(i, n, kind, text=333 if not flux else 512), t[f"store.{n}"][s])
        x = t["latents_pre_callback_steps"][s]
        out = ctrl.after_step(s, unpack(x) if flux else x)
        assert torch.equal(pack(out) if flux else out, t["latents_steps"][s]), s
    assert meta["local_blend_steps"] == [0, 5]


@pytest.mark.parametrize("name", sorted(STORED))
def test_word_columns_are_theirs(name):
    t, meta = case(name)
    words = [tuple(w) for w in meta["controller"]["local_blend_words"]]
    alpha = blend_alpha(layout(meta["family"]), meta["prompts"], words)
    assert torch.equal(alpha, t["alpha_layers"])
    assert [torch.nonzero(a).flatten().tolist() for a in alpha] == meta["blend_token_indices"]


def test_word_columns_count_characters_of_decoded_tokens():
    sd3 = layout("sd3")
    prompt = "a watercolor painting of a capybara sitting on a red car."
    assert text_columns(sd3, prompt, "capybara") == [6, 7, 8, 82, 83, 84]     # cap y bara, both encoders
    assert text_columns(sd3, prompt, "car.") == [13, 14, 89, 90]               # the piece and its period
    assert text_columns(sd3, prompt, "red car.") == [12, 13, 14, 88, 89, 90]   # several words: each
    assert text_columns(sd3, prompt, 1) == [2, 78]                            # a piece's position
    with pytest.raises(ValueError, match=r"'car'\] not in prompt .*punctuation included"):
        text_columns(sd3, prompt, "car")   # exact whitespace pieces (their quirk 12), an error, not an empty list
    with pytest.raises(ValueError, match="one word .* per prompt"):
        blend_alpha(sd3, [prompt, prompt], ("cat",))


def synthetic(B, S, heads=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, heads, S, d, generator=g) for _ in range(3)]


SD3_SITE = JointSite(0, "transformer_blocks.0", "joint", slice(0, 6), slice(6, 10), 2, (2, 3))
FLUX_SITE = JointSite(3, "single_transformer_blocks.1", "single", slice(4, 10), slice(0, 4), 2, (2, 3))


@pytest.mark.parametrize("where", [SD3_SITE, FLUX_SITE])
@pytest.mark.parametrize("B", [4, 2])
def test_qiki_gives_the_conditional_target_the_sources_image_q_and_k_only(where, B):
    q, k, v = synthetic(B, 10)
    before = [t.clone() for t in (q, k, v)]
    ctrl = JointController(["a cat", "a dog"], JointReplace(0.2), 10)
    q2, k2, v2 = ctrl.override(1)(where, q, k, v)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), before))          # the caller's tensors untouched
    src, tgt = B - 2, B - 1
    for new, old in ((q2, q), (k2, k)):
        assert torch.equal(new[:tgt], old[:tgt])                               # uncond rows, cond source
        assert torch.equal(new[tgt, :, where.image], old[src, :, where.image])  # image tokens: the source's
        assert torch.equal(new[tgt, :, where.text], old[tgt, :, where.text])    # text tokens: its own
    assert torch.equal(v2, v)
    assert ctrl.override(2) is None and ctrl.override(9) is None             # [int(10 * 0), int(10 * 0.2))


def test_replacement_blocks_and_methods():
    q, k, v = synthetic(2, 10)
    only = JointController(["a", "b"], JointReplace(1.0, blocks=(3,)), 10).override(0)
    assert all(torch.equal(a, b) for a, b in zip(only(SD3_SITE, q, k, v), (q, k, v)))   # block 0 is not in (3,)
    assert not torch.equal(only(FLUX_SITE, q, k, v)[0], q)
    parts = {"image": SD3_SITE.image, "text": SD3_SITE.text, "all": slice(None)}
    for method, pairs in METHODS.items():
        new = dict(zip("qkv", JointController(["a", "b"], JointReplace(1.0, method), 10).override(0)(
            SD3_SITE, q, k, v)))
        for name, old in zip("qkv", (q, k, v)):
            taken = [parts[tokens] for n, tokens in pairs if n == name]
            want = old.clone()
            for s in taken:
                want[1, :, s] = old[0, :, s]
            assert torch.equal(new[name], want), (method, name)


def test_maps_are_stored_before_the_replacement_from_the_conditional_rows():
    q, k, v = synthetic(4, 10, seed=3)
    store = JointAttentionStore()
    ctrl = JointController(["a", "b"], JointReplace(1.0), 10, store=store)
    ctrl.override(0)(SD3_SITE, q, k, v)
    probs = (q[2:, :, :6] @ k[2:].transpose(-1, -2) / 2).softmax(-1).mean(1)[..., 6:]   # d = 4: scale 1/2
    assert torch.allclose(store.sums[0], probs, atol=1e-6)
    assert torch.allclose(image_text_probs(q[2:], k[2:], SD3_SITE), probs, atol=1e-6)
    assert store.maps(1).shape == (2, 3, 4)


@pytest.mark.parametrize("name", sorted(STORED))
def test_word_maps_from_the_fused_kernel_are_the_explicit_softmaxs_column_means(name):
    """On the recorded cases' shapes (the tiny models' heads and head dims) and random q, k: within 1e-6 of the
    explicit fp32 softmax's column means, element by element; a row with no word columns gets zeros."""
    _, meta = case(name)
    flux = name.startswith("flux")
    heads, d = (2, 16) if flux else (4, 8)
    words = [tuple(w) for w in meta["controller"]["local_blend_words"]]
    alpha = blend_alpha(layout(meta["family"]), meta["prompts"], words)
    alpha = torch.cat([alpha, torch.zeros_like(alpha[:1])])
    for i, n, kind in STORED[name]:
        where = site(i, n, kind, text=512 if flux else 333)
        g = torch.Generator().manual_seed(i)
        q, k = (torch.randn(3, heads, 48 + where.text.stop - where.text.start, d, generator=g) for _ in range(2))
        probs = image_text_probs(q, k, where)
        want = torch.stack([probs[r][:, alpha[r] > 0].mean(-1) for r in range(2)])
        got = word_maps(q, k, where, alpha)
        assert got.dtype == torch.float32 and torch.equal(got[2], torch.zeros(48))
        assert ((got[:2] - want).abs() / want.abs()).max() < 1e-6


def test_the_maps_follow_an_edited_attention_definition(monkeypatch):
    """The joint maps are models.attention's one definition: a temperature patched into attention_probs reaches
    both the stored maps and LocalBlend's word maps (the fused kernel then no longer runs), equal to the stock
    maps of queries scaled by 1/T."""
    from models import attention
    stock = attention.attention_probs
    monkeypatch.setattr(attention, "attention_probs", lambda q, k, mask=None: stock(q / 2.0, k, mask))
    where = site(1, "transformer_blocks.1", "joint", text=333)
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 4, 48 + 333, 8, generator=g) for _ in range(2))
    alpha = torch.zeros(2, 333)
    alpha[0, 6], alpha[1, 7:9] = 1, 1
    with pytest.warns(UserWarning, match="no longer matches the fused kernel"):
        got = word_maps(q, k, where, alpha)
    probs = image_text_probs(q, k, where)
    monkeypatch.setattr(attention, "attention_probs", stock)
    want = image_text_probs(q / 2.0, k, where)
    assert torch.allclose(probs, want, rtol=1e-6, atol=0) and not torch.allclose(probs, image_text_probs(q, k, where))
    assert torch.allclose(got, word_maps(q / 2.0, k, where, alpha), rtol=1e-5, atol=0)


def test_maps_are_formed_only_in_the_blend_blocks_and_steps_and_other_steps_are_plain():
    q, k, v = synthetic(4, 48 + 333, seed=6)
    blend = LocalBlend(("cat", "dog"), end_blend=0.4, blocks=(1,))
    ctrl = JointController(["a cat", "a dog"], JointReplace(0.2), 10, layout("sd3"), blend)   # no store
    assert [ctrl.override(i) is None for i in range(10)] == [False] * 4 + [True] * 6
    for i in range(4):
        for s in (site(0, "transformer_blocks.0", "joint"), site(1, "transformer_blocks.1", "joint")):
            out = ctrl.override(i)(s, q, k, v)
            assert all(a is b for a, b in zip(out, (q, k, v))) == (i >= 2)   # replaced in steps 0, 1 only
    assert list(ctrl.blend.entries) == [1] and len(ctrl.blend.entries[1]) == 4


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="method 'vi' is not one of"):
        JointReplace(method="vi")
    with pytest.raises(ValueError, match="replace_steps must satisfy"):
        JointReplace(replace_steps=1.5)
    with pytest.raises(ValueError, match="blocks must be None"):
        JointReplace(blocks="1")
    with pytest.raises(TypeError, match="JointReplace"):
        JointController(["a", "b"], object(), 10)
    with pytest.raises(ValueError, match="3 rows for 2 prompts"):
        JointController(["a", "b"], JointReplace(), 10).override(0)(SD3_SITE, *synthetic(3, 10))
    with pytest.raises(ValueError, match="level: UNet-only"):
        JointController(["a cat", "a dog"], None, 10, layout("flux"), LocalBlend(("cat", "dog"), level=1))
    with pytest.raises(ValueError, match="end_blend=0.1 is before start_blend=0.2"):
        LocalBlend(("a", "b"), start_blend=0.2, end_blend=0.1)


def test_a_unet_localblend_refuses_blocks_and_stops_at_end_blend(tiny_sd):
    with pytest.raises(ValueError, match="blocks=.* MM-DiT"):
        LocalBlend(("squirrel", "lion"), blocks=(1,)).build(tiny_sd.tokenizer, ["a squirrel", "a lion"], 10,
                                                           tiny_sd.unet.sites)
    blender = LocalBlend(("squirrel", "lion"), end_blend=0.5).build(tiny_sd.tokenizer, ["a squirrel", "a lion"], 10,
                                                                   tiny_sd.unet.sites)
    assert isinstance(blender, Blender) and blender.end == 5
    x = torch.randn(2, 4, 8, 8)
    assert blender(5, x, store=None) is x


def test_the_store_pictures_each_word_on_the_token_grid():
    sd3 = layout("sd3")
    prompts = ["a cat", "a dog"]
    q, k, v = synthetic(4, 48 + 333, seed=5)
    store = JointAttentionStore(blocks=(1,))
    ctrl = JointController(prompts, None, 10, sd3, store=store)
    for i in range(2):
        for s in (site(0, "transformer_blocks.0", "joint"), site(1, "transformer_blocks.1", "joint")):
            ctrl.override(i)(s, q, k, v)
    assert list(store.sums) == [1] and store.counts[1] == 2                   # only the kept block, both steps
    words, maps = store.word_maps(sd3, "a cat", 0)
    cols = text_columns(sd3, "a cat", "cat")
    assert words == ["a", "cat"] and maps.shape == (6, 8, 2)
    assert torch.allclose(maps[..., 1].flatten(), store.sums[1][0][:, cols].mean(-1) / 2)
    pics = p2p.viz.joint_attention_pictures(store, np.zeros((2, 96, 128, 3), np.uint8), prompts, sd3)
    assert len(pics["attention"]) == 2 and pics["attention"][0].size[0] > 2 * 256
    with pytest.raises(ValueError, match=r"no stored maps for blocks \[0\]; kept: \[1\]"):
        store.maps(0, blocks=(0,))


def test_a_model_without_its_tokenizers_cannot_find_words():
    class NoText:
        text_positions, tokenizers = {"clip": slice(0, 77), "t5": slice(77, 333)}, {"t5": None}

    with pytest.raises(ValueError, match=r"no tokenizer \['clip'\].*load the folder's text encoders"):
        model_layout(NoText())
