"""The full-size OpenCLIP towers' key layouts, built on the meta device (no memory, no download):
our ViT-H/14 (SD 2.x) and ViT-bigG/14 (SDXL) presets against open_clip's own architectures of those
names (its model_configs), and the diffusers folders' towers against what diffusers' own converter
makes of open_clip's keys and what transformers builds from the released folders' config.json."""
import dataclasses

import pytest
import torch

import openclip_oracles as OC
from models.openclip import VIT_BIGG_14, VIT_H_14, OpenCLIPTextModel
from openclip_layouts import hf_to_openclip, openclip_config_from_keys, openclip_to_hf, single_file_text_state
from weights_tools.openclip_keys import openclip_config_from_hf

# the fields of text_encoder/config.json (stable-diffusion-2-1) and text_encoder_2/config.json (SDXL base 1.0)
# that decide the layout; both say eos_token_id 2 and pad_token_id 1, as the released files do
FOLDER_CONFIGS = {
    "sd2": dict(architectures=["CLIPTextModel"], hidden_act="gelu", hidden_size=1024, intermediate_size=4096,
                num_attention_heads=16, num_hidden_layers=23, max_position_embeddings=77, vocab_size=49408,
                projection_dim=512, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "sdxl": dict(architectures=["CLIPTextModelWithProjection"], hidden_act="gelu", hidden_size=1280,
                 intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, max_position_embeddings=77,
                 vocab_size=49408, projection_dim=1280, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                 pad_token_id=1)}
CASES = {"sd2": (VIT_H_14, "ViT-H-14", "cond_stage_model.model."),
         "sdxl": (VIT_BIGG_14, "ViT-bigG-14", "conditioner.embedders.1.model.")}


def shapes(state: dict) -> dict:
    """key -> shape, with transformers' `text_model.` level and position_ids buffer left out."""
    return {k.removeprefix("text_model."): tuple(v.shape) for k, v in state.items() if not k.endswith("position_ids")}


def meta_tower(cfg) -> OpenCLIPTextModel:
    with torch.device("meta"):
        return OpenCLIPTextModel(cfg)


def meta_hf(folder_config: dict):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in folder_config["architectures"] else CLIPTextModel
    with torch.device("meta"):
        return cls(CLIPTextConfig(**{k: v for k, v in folder_config.items() if k != "architectures"}))


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_single_file_tower_is_open_clips_text_half(family):
    cfg, name, prefix = CASES[family]
    ref = OC.open_clip_named_text_state(name)  # what the single file holds under `prefix`
    state = single_file_text_state({prefix + k: v for k, v in ref.items()}, prefix, cfg)
    assert shapes(state) == shapes(meta_tower(cfg).state_dict())
    assert openclip_config_from_keys(state, family) == cfg
    assert set(ref) - set(state) == ({"logit_scale", "text_projection"} if family == "sd2" else {"logit_scale"})


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_folder_tower_is_diffusers_conversion(family):
    cfg, name, prefix = CASES[family]
    converted = OC.diffusers_converted(OC.open_clip_named_text_state(name), prefix, None)
    hf = meta_hf(FOLDER_CONFIGS[family])
    assert shapes(converted) == shapes(hf.state_dict())
    folder_cfg = openclip_config_from_hf(FOLDER_CONFIGS[family], family)
    expected = dataclasses.replace(cfg, layers=23, output_layer="last") if family == "sd2" else cfg
    assert folder_cfg == expected
    ours = meta_tower(folder_cfg).state_dict()
    assert shapes(hf_to_openclip(hf.state_dict())) == shapes(ours)
    assert shapes(openclip_to_hf(ours)) == shapes(converted)
