"""OpenCLIP text towers (SD 2.x ViT-H/14, SDXL's bigG/14) on tiny random weights, fp32, against
open_clip's own CLIP (the single files' layout) and transformers' CLIPTextModel(WithProjection)
loaded through diffusers' own converter (the folders' layout); the key maps both ways; OpenCLIP's
"!"-padded tokenisation against transformers' CLIPTokenizer(pad_token="!"); CLIP-L read as SDXL reads it."""
import dataclasses

import pytest
import torch

import oracles as O
import openclip_oracles as OC
from models import CLIPTextConfig, CLIPTextModel, StableDiffusion, prefixes
from models.clip import BANG, BOS, EOS
from models.openclip import OpenCLIPTextConfig, OpenCLIPTextModel, openclip_tokenizer
from weights_tools.layout import CheckpointError
from openclip_layouts import hf_to_openclip, openclip_config_from_keys, openclip_to_hf, single_file_text_state
from weights_tools.openclip_keys import openclip_config_from_hf

TOL = 1e-5
SD2_PREFIX, SDXL_PREFIX = "cond_stage_model.model.", "conditioner.embedders.1.model."
# SD 2.x's shape at a tiny width: 24 layers, so diffusers' converter drops the 24th as it does for SD 2.x
TINY_SD2 = OpenCLIPTextConfig(width=32, layers=24, heads=4, output_layer="penultimate", final_ln=True)
TINY_SDXL = OpenCLIPTextConfig(width=48, layers=3, heads=4, output_layer="penultimate", final_ln=False,
                               projection_dim=40)
PROMPTS = ["a photo of a cat riding a bicycle", "", "an oil painting of a sunflower field by van gogh, 4k"]


def ids():
    return openclip_tokenizer()(PROMPTS)


def assert_close(ours, ref, tol=TOL):
    diff, scale = O.compare(ours, ref)
    assert diff <= tol * scale, f"max |diff| {diff:.3g} > {tol} x {scale:.3g}"
    return diff


def single_file(model, gen_seed=5):
    """The tower's weights as a real single file holds them: plus logit_scale, plus a text_projection
    even where the model pools nothing (SD 2.x files carry an unused one)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["logit_scale"] = torch.tensor(4.6052)
    if "text_projection" not in state:
        state["text_projection"] = O.randn(model.cfg.width, model.cfg.width, seed=gen_seed)
    return state


@pytest.fixture(scope="module")
def sd2():
    return OC.seeded_tower(TINY_SD2)


@pytest.fixture(scope="module")
def sdxl():
    return OC.seeded_tower(TINY_SDXL, seed=O.SEED + 1)


# ------------------------------------------------------------------------------------------ SD 2.x
def test_sd2_context_matches_the_23_layer_hf_tower(sd2):
    """SD 2.x: the penultimate block through ln_final == a diffusers folder's 23-layer last_hidden_state."""
    ref = OC.ref_hf(single_file(sd2), TINY_SD2, SD2_PREFIX, layers=23)
    with torch.no_grad():
        context, pooled = sd2.encode(ids())
        expected = ref(ids()).last_hidden_state
    assert pooled is None and context.shape == (3, 77, 32)
    assert_close(context, expected)


def test_sd2_context_matches_open_clip(sd2):
    ref = OC.ref_open_clip(sd2.state_dict(), TINY_SD2)
    with torch.no_grad():
        out = ref.forward_intermediates(text=ids(), text_indices=2, normalize_intermediates=True,
                                        intermediates_only=True)
        assert_close(sd2(ids()), out["text_intermediates"][0])  # [penultimate, last] blocks, through ln_final
        assert (sd2(ids()) - out["text_intermediates"][1]).abs().max() > 1e-2  # the last block is not it


def test_sd2_single_file_tower_equals_the_folder_tower(sd2):
    """The 24-layer single-file tower read at its penultimate layer == the 23-layer folder tower read
    at its last, loaded through our key map from diffusers' conversion."""
    ref = OC.ref_hf(single_file(sd2), TINY_SD2, SD2_PREFIX, layers=23)
    cfg = openclip_config_from_hf(ref.config.to_dict(), "sd2")
    assert (cfg.layers, cfg.output_layer, cfg.final_ln, cfg.projection_dim) == (23, "last", True, None)
    folder = OpenCLIPTextModel(cfg).eval()
    folder.load_state_dict(hf_to_openclip(ref.state_dict()), strict=True)
    with torch.no_grad():
        assert torch.equal(folder(ids()), sd2(ids()))


def test_sd2_single_file_state_loads_strictly(sd2):
    ckpt = {SD2_PREFIX + k: v for k, v in single_file(sd2).items()}
    ckpt["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # other parts of the file are not the tower's
    state = single_file_text_state(ckpt, SD2_PREFIX, TINY_SD2)
    assert openclip_config_from_keys(state, "sd2", heads=4) == TINY_SD2
    OpenCLIPTextModel(TINY_SD2).load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------ SDXL
@pytest.mark.parametrize("eos_token_id", [49407, 2])  # transformers pools at the first EOS / at the largest id
def test_sdxl_context_and_pooled_match_hf_with_projection(sdxl, eos_token_id):
    """SDXL: hidden_states[-2] (no final norm) and text_embeds of CLIPTextModelWithProjection."""
    ref = OC.ref_hf(single_file(sdxl), TINY_SDXL, SDXL_PREFIX, eos_token_id=eos_token_id)
    with torch.no_grad():
        context, pooled = sdxl.encode(ids())
        out = ref(ids(), output_hidden_states=True)
    assert context.shape == (3, 77, 48) and pooled.shape == (3, 40)
    assert_close(context, out.hidden_states[-2])
    assert_close(pooled, out.text_embeds)


def test_sdxl_context_and_pooled_match_open_clip(sdxl):
    ref = OC.ref_open_clip(sdxl.state_dict(), TINY_SDXL)
    with torch.no_grad():
        context, pooled = sdxl.encode(ids())
        out = ref.forward_intermediates(text=ids(), text_indices=2, normalize=False)
        assert_close(context, out["text_intermediates"][0])
        assert_close(pooled, out["text_features"])
        assert_close(pooled, ref.encode_text(ids()))


def test_sdxl_pooled_reads_the_end_of_text_position(sdxl):
    """The pooled vector depends on the tokens up to end-of-text only: padding after it cannot move it."""
    a = ids()
    b = a.clone()
    b[a == BANG] = 320  # "a" instead of "!" after EOS (still below EOS, so argmax still finds EOS)
    with torch.no_grad():
        assert torch.equal(sdxl.encode(a)[1], sdxl.encode(b)[1])
        assert not torch.equal(sdxl.encode(a)[0], sdxl.encode(b)[0])


def test_sdxl_folder_tower_loads_through_the_key_map(sdxl):
    ref = OC.ref_hf(single_file(sdxl), TINY_SDXL, SDXL_PREFIX)
    cfg = openclip_config_from_hf(ref.config.to_dict() | {"architectures": ["CLIPTextModelWithProjection"]}, "sdxl")
    assert cfg == TINY_SDXL
    folder = OpenCLIPTextModel(cfg).eval()
    folder.load_state_dict(hf_to_openclip(ref.state_dict()), strict=True)
    with torch.no_grad():
        for a, b in zip(folder.encode(ids()), sdxl.encode(ids())):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ key maps
@pytest.mark.parametrize("which", ["sd2", "sdxl"])
def test_openclip_to_hf_is_diffusers_conversion(which, sd2, sdxl):
    model, prefix = (sd2, SD2_PREFIX) if which == "sd2" else (sdxl, SDXL_PREFIX)
    state = single_file(model)
    ref = OC.diffusers_converted(state, prefix, None)
    ours = openclip_to_hf(state)
    if which == "sd2":  # diffusers drops SD 2.x's 24th layer and text_projection: a folder holds neither
        ours = {k: v for k, v in ours.items() if ".layers.23." not in k and k != "text_projection.weight"}
    assert sorted(ours) == sorted(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    back = hf_to_openclip(ref)
    dropped = {"logit_scale"} | ({"text_projection"} | {k for k in state if ".resblocks.23." in k} if which == "sd2" else set())
    assert sorted(back) == sorted(set(state) - dropped)
    assert all(torch.equal(back[k], state[k]) for k in back)


def test_key_map_errors_name_the_key(sdxl):
    hf = openclip_to_hf(sdxl.state_dict())
    with pytest.raises(CheckpointError, match="text_model.encoder.layers.0.self_attn.k_norm.weight"):
        hf_to_openclip(hf | {"text_model.encoder.layers.0.self_attn.k_norm.weight": torch.ones(3)})
    del hf["text_model.encoder.layers.1.self_attn.v_proj.bias"]
    with pytest.raises(CheckpointError, match="layer 1 lacks one of q_proj/k_proj/v_proj.bias"):
        hf_to_openclip(hf)
    with pytest.raises(CheckpointError, match="visual.proj"):
        openclip_to_hf({"visual.proj": torch.ones(2)})
    with pytest.raises(CheckpointError, match="hidden_act 'quick_gelu'"):
        openclip_config_from_hf(OC.hf_config(TINY_SDXL).to_dict() | {"hidden_act": "quick_gelu"}, "sdxl")
    with pytest.raises(ValueError, match="families"):
        openclip_config_from_keys(sdxl.state_dict(), "sd1")


def test_config_errors():
    with pytest.raises(ValueError, match="output_layer"):
        OpenCLIPTextConfig(output_layer="hidden")
    with pytest.raises(ValueError, match="divisible into 4 heads"):
        OpenCLIPTextConfig(width=30, heads=4)


# ------------------------------------------------------------------------------------------ tokenizer
def test_openclip_tokenizer_pads_with_bang():
    row = openclip_tokenizer()(["a photo of a cat riding a bicycle"])[0].tolist()
    assert row[:10] == [BOS, 320, 1125, 539, 320, 2368, 6765, 320, 11652, EOS] and row[10:] == [BANG] * 67
    assert openclip_tokenizer()([""])[0].tolist() == [BOS, EOS] + [BANG] * 75
    tok = openclip_tokenizer()
    assert (tok.bos, tok.eos, tok.pad, tok.length) == (BOS, EOS, BANG, 77)


def test_openclip_tokenizer_matches_hf_with_bang_padding():
    prompts = O.TOKENIZER_PROMPTS + [" ".join(f"word{i % 10} cat" for i in range(50))]  # the last one truncates
    with pytest.warns(UserWarning, match="truncated"):
        ours = openclip_tokenizer()(prompts)
    assert ours.tolist() == OC.hf_ids_bang(prompts).tolist()
    assert ours[-1, -1] == EOS and (ours[:-1] == BANG).any(dim=1).all()


# ------------------------------------------------------------------------------------------ CLIP-L in SDXL
def test_clip_l_penultimate_without_final_norm_matches_hf_hidden_states():
    """SDXL's first tower: CLIP-L's hidden_states[-2], no final_layer_norm; SD v1's default is unchanged."""
    sd = O.ours()
    ref = O.ref_text_encoder()
    tower = CLIPTextModel(dataclasses.replace(sd.cfg.text, output_layer="penultimate", final_ln=False)).eval()
    tower.load_state_dict(sd.text_encoder.state_dict(), strict=True)
    tokens = sd.tokenize(PROMPTS)
    with torch.no_grad():
        out = ref(tokens, output_hidden_states=True)
        assert_close(tower(tokens), out.hidden_states[-2])
        assert torch.equal(sd.text_encoder(tokens), ref(tokens).last_hidden_state)
    with pytest.raises(ValueError, match="output_layer"):
        CLIPTextConfig(output_layer="hidden")


def test_stable_diffusion_builds_the_openclip_tower_and_tokenizer():
    cfg = O.ours().cfg
    cfg = cfg.replace(family="sd2", text=TINY_SDXL, unet=dataclasses.replace(cfg.unet, context_dim=TINY_SDXL.width))
    sd = StableDiffusion(cfg).eval()
    assert isinstance(sd.text_encoder, OpenCLIPTextModel) and sd.tokenizer.pad == BANG
    assert prefixes(cfg)["text_encoder"] == SD2_PREFIX
    sd.text_encoder.load_state_dict(OC.seeded_tower(TINY_SDXL, seed=O.SEED + 1).state_dict())
    with torch.no_grad():
        assert torch.equal(sd.encode_text(PROMPTS), sd.text_encoder(ids()))
