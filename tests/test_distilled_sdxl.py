"""Distilled SDXL (SSD-1B, Segmind-Vega): an SDXL folder whose UNet has a transformer depth per up block
(`reverse_transformer_layers_per_block`) and a middle block of one resnet (`mid_block_type: UNetMidBlock2D`)
loads and generates as diffusers' StableDiffusionXLPipeline does with the same weights; the single file our
conversion writes (its ldm_config names the per-block depths) is the same model; a single file with no config
is named and refused (tests/test_named_refusals.py)."""
import pytest
import torch

import oracles as O
import sdxl_oracles as X
from weights_tools import convert_checkpoint, inspect_checkpoint, load_checkpoint

pytest.importorskip("diffusers")
STEPS, GUIDANCE, H, W = 3, 5.0, 32, 32
PROMPTS = ["a photo of a cat riding a bicycle", "a lion eating a burger"]
DISTILLED = {"reverse_transformer_layers_per_block": [[2, 1, 1], [1, 0, 1], [0, 0, 0]], "mid_block_type": "UNetMidBlock2D"}


@pytest.fixture(scope="module")
def pipe_and_folder(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    sd = X.ours()
    config = X.unet_config(sd, X.single_file_state(sd)) | DISTILLED
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**config)
    with torch.no_grad():  # non-trivial weights everywhere, zero-initialised outputs included
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pipe = StableDiffusionXLPipeline(**(X.ref_pipeline().components | {"unet": unet.eval()}))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder := tmp_path_factory.mktemp("ssd") / "model")
    return pipe, folder


def test_distilled_folder_generates_as_diffusers(pipe_and_folder):
    pipe, folder = pipe_and_folder
    sd, info = load_checkpoint(folder), inspect_checkpoint(folder)
    u = sd.cfg.unet
    assert sd.cfg.family == "sdxl" and u.middle == "resnet" and u.transformer_depth_output == (2, 1, 1, 1, 0, 1, 0, 0, 0)
    assert info["loadable"] and info["model"] == "distilled SDXL (SSD-1B / Segmind-Vega)"
    diff, scale = O.z0_against_pipeline(sd, pipe, PROMPTS, STEPS, GUIDANCE, H, W)
    assert diff <= 1e-4 * scale, (diff, scale)


def test_converted_single_file_is_the_same_model(pipe_and_folder, tmp_path):
    _, folder = pipe_and_folder
    path = convert_checkpoint(folder, tmp_path / "ssd.safetensors")
    a, b = load_checkpoint(folder), load_checkpoint(path)
    assert a.cfg.unet == b.cfg.unet
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
