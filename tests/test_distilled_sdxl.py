"""Distilled SDXL (SSD-1B, Segmind-Vega): an SDXL folder whose UNet has a transformer depth per up block
(`reverse_transformer_layers_per_block`) and a middle block of one resnet (`mid_block_type: UNetMidBlock2D`)
loads and generates as diffusers' StableDiffusionXLPipeline does with the same weights; the single file our
conversion writes (its ldm_config names the per-block depths) is the same model; and a single file that names
no config, as Segmind ships SSD-1B and Segmind-Vega, loads with the depths its keys say, on top of the family's
default config: a tiny one generates as diffusers does, and the full-size key layouts of SSD-1B and Vega (built
on the meta device from diffusers' configs of segmind/SSD-1B and segmind/Segmind-Vega) are named with their
depths from a header alone."""
import dataclasses
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import oracles as O
import sdxl_oracles as X
from models import PREFIXES, load_config
from weights_tools import convert_checkpoint, inspect_checkpoint, load_checkpoint, model_shapes, validate_shapes
from weights_tools import diffusers_keys as dk
from weights_tools.layout import detect_variant, distilled_name
from weights_tools.layouts import LAYOUTS

pytest.importorskip("diffusers")
STEPS, GUIDANCE, H, W = 3, 5.0, 32, 32
PROMPTS = ["a photo of a cat riding a bicycle", "a lion eating a burger"]
DISTILLED = {"reverse_transformer_layers_per_block": [[2, 1, 1], [1, 0, 1], [0, 0, 0]], "mid_block_type": "UNetMidBlock2D"}
# fewer blocks on the way down too, one level's transformer emptied (norm and projections kept)
THINNER = {"transformer_layers_per_block": [1, 0, 1], "reverse_transformer_layers_per_block": [[1, 0, 2], [0, 1, 1], 1],
           "mid_block_type": "UNetMidBlock2D"}

# SDXL base's UNet config (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), and what diffusers'
# configs of segmind/SSD-1B and segmind/Segmind-Vega change in it
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SEGMIND = {"SSD-1B": {"transformer_layers_per_block": [1, 2, 4], "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], 1],
                      "mid_block_type": "UNetMidBlock2D"},
           "Segmind-Vega": {"transformer_layers_per_block": [1, 1, 2],
                            "reverse_transformer_layers_per_block": [[2, 2, 2], [1, 1, 1], 1], "mid_block_type": "UNetMidBlock2D"}}
DEPTHS = {"SSD-1B": ((0, 2, 4), (4, 4, 10, 2, 1, 1, 0, 0, 0)), "Segmind-Vega": ((0, 1, 2), (2, 2, 2, 1, 1, 1, 0, 0, 0))}


def distilled_pipe(folder, fields: dict):
    """A tiny SDXL pipeline whose UNet has `fields` (distilled), seeded non-trivial weights, saved to `folder`."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    sd = X.ours()
    config = X.unet_config(sd, X.single_file_state(sd)) | fields
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**config)
    with torch.no_grad():  # non-trivial weights everywhere, zero-initialised outputs included
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pipe = StableDiffusionXLPipeline(**(X.ref_pipeline().components | {"unet": unet.eval()}))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def pipe_and_folder(tmp_path_factory):
    return distilled_pipe(tmp_path_factory.mktemp("ssd") / "model", DISTILLED)


@pytest.fixture(scope="module")
def thinner(tmp_path_factory):
    return distilled_pipe(tmp_path_factory.mktemp("thin") / "model", THINNER)


def test_distilled_folder_generates_as_diffusers(pipe_and_folder):
    pipe, folder = pipe_and_folder
    sd, info = load_checkpoint(folder), inspect_checkpoint(folder)
    u = sd.cfg.unet
    assert sd.cfg.family == "sdxl" and u.middle == "resnet" and u.transformer_depth_output == (2, 1, 1, 1, 0, 1, 0, 0, 0)
    assert info["loadable"] and info["model"] == ("distilled SDXL (transformer depths down [0, 1, 2], up "
                                                  "[2, 1, 1, 1, 0, 1, 0, 0, 0], middle block of one resnet)")
    diff, scale = O.z0_against_pipeline(sd, pipe, PROMPTS, STEPS, GUIDANCE, H, W)
    assert diff <= 1e-4 * scale, (diff, scale)


def test_converted_single_file_is_the_same_model(pipe_and_folder, tmp_path):
    _, folder = pipe_and_folder
    path = convert_checkpoint(folder, tmp_path / "ssd.safetensors")
    a, b = load_checkpoint(folder), load_checkpoint(path)
    assert a.cfg.unet == b.cfg.unet
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def no_config_file(folder, out, monkeypatch):
    """The folder converted to one SGM single file by our converter, its ldm_config stripped (as Segmind ships
    SSD-1B.safetensors), and the family's default config made the tiny SDXL's (depths 0 / 1 / 2 by level, a
    middle transformer), which the file's keys then fit; the folder's own config, for comparison."""
    state = load_file(convert_checkpoint(folder, out.with_name("with-config.safetensors")))
    save_file(state, str(out))
    own = load_checkpoint(folder).cfg
    base = own.replace(unet=dataclasses.replace(own.unet, transformer_depth=X.ours().cfg.unet.transformer_depth,
                                                transformer_depth_output=None, middle="attention"))
    monkeypatch.setitem(LAYOUTS, "sdxl", dataclasses.replace(LAYOUTS["sdxl"], default_config=lambda prediction: base))
    return own


@pytest.mark.parametrize("which", ["pipe_and_folder", "thinner"])
def test_a_file_that_names_no_config_generates_as_diffusers(which, request, tmp_path, monkeypatch):
    pipe, folder = request.getfixturevalue(which)
    path = tmp_path / "distilled.safetensors"
    own = no_config_file(folder, path, monkeypatch)
    info = inspect_checkpoint(path)
    assert "ldm_config" not in info["metadata"] and info["config_source"] == "SDXL default (no config in the file)"
    assert info["loadable"] and info["variant"] == "SDXL" and info["model"].startswith("distilled SDXL (transformer depths")
    sd = load_checkpoint(path)
    assert sd.cfg.unet == own.unet  # the depths read from the keys are the folder's config's
    diff, scale = O.z0_against_pipeline(sd, pipe, PROMPTS, STEPS, GUIDANCE, H, W)
    assert diff <= 1e-4 * scale, (diff, scale)


def segmind_shapes(name: str) -> dict:
    """The canonical {key: shape} of a full-size single file of `name` (no tensor exists): its UNet built from
    diffusers' config on the meta device, mapped to SGM's keys by our folder key map; the VAE and text towers
    are SDXL base's (model_shapes of configs/sdxl-base.yaml)."""
    from diffusers import UNet2DConditionModel

    config = SDXL_UNET | SEGMIND[name]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    shapes = {dk.sdxl_key("unet", k, config, name): tuple(v.shape) for k, v in unet.state_dict().items()}
    return shapes | {k: s for k, s in model_shapes(load_config("sdxl-base")).items() if not k.startswith(PREFIXES["unet"])}


def header_only_file(shapes: dict, path):
    """A safetensors file of `shapes` (fp16) whose data is a hole: its header is all that is written."""
    entries, offset = {}, 0
    for k, s in shapes.items():
        n = 2 * int(torch.tensor(s).prod()) if s else 2
        entries[k] = {"dtype": "F16", "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    header = json.dumps(entries).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + offset)
    return path


@pytest.mark.parametrize("name", list(SEGMIND))
def test_full_size_segmind_layouts_are_named_with_their_depths(name, tmp_path):
    shapes = segmind_shapes(name)
    variant, evidence = detect_variant(shapes)
    assert variant == "SDXL" and "distilled SDXL: no transformer in the middle block" in evidence
    cfg = LAYOUTS["sdxl"].fitted(shapes, load_config("sdxl-base"))
    down, up = DEPTHS[name]
    u = cfg.unet
    assert (u.transformer_depth, tuple(u.output_depth(n, 2 - n // 3) for n in range(9)), u.middle) == (down, up, "resnet")
    assert distilled_name(cfg.unet) == name
    validate_shapes(shapes, cfg, name, strict=True)  # every key and shape of the file fits the fitted config
    assert set(model_shapes(cfg)) == set(shapes)
    info = inspect_checkpoint(header_only_file(shapes, tmp_path / f"{name}.safetensors"))
    assert info["loadable"] and info["model"] == name and info["variant"] == "SDXL", info["problem"]
