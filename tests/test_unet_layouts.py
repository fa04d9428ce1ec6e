"""Full-size SD 2.1 and SDXL base UNets on the meta device (no memory).

Our `UNetConfig` read from the real CompVis / SGM configs (the UNet parts of `v2-inference-v.yaml` and
`sd_xl_base.yaml`, written out here) builds a module tree whose single-file keys and shapes are what
diffusers' own converter turns into exactly the state dict of `UNet2DConditionModel` built from the
published diffusers configs (stabilityai/stable-diffusion-2-1, stable-diffusion-xl-base-1.0), a list
derived independently of our code; and its attention sites carry the right heads per level.
"""
import os

import pytest
import torch
import yaml

from models.config import UNetConfig
from models.sdxl import vector_conditioning
from models.unet import UNetModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

PREFIX = "model.diffusion_model."

# the `unet_config` / `network_config` sections of the real files, as they are written there
SD21_YAML = """
model:
  params:
    parameterization: "v"
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        use_fp16: True
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_head_channels: 64 # need to fix for flash-attn
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False
    first_stage_config:
      params:
        ddconfig: {ch_mult: [1, 2, 4, 4]}
"""
SDXL_YAML = """
model:
  params:
    scale_factor: 0.13025
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: 2816
        num_classes: sequential
        use_checkpoint: True
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 4]
        num_head_channels: 64
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: [1, 2, 10]
        context_dim: 2048
        spatial_transformer_attn_type: softmax-xformers
        legacy: False
    first_stage_config:
      params:
        ddconfig: {ch_mult: [1, 2, 4, 4]}
"""
# the published diffusers unet/config.json of each model (the fields that shape the module tree)
SD21_DIFFUSERS = dict(
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, upcast_attention=True)
SDXL_DIFFUSERS = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
FAMILIES = {"sd21": (SD21_YAML, "unet_config", SD21_DIFFUSERS), "sdxl": (SDXL_YAML, "network_config", SDXL_DIFFUSERS)}
EXPECTED = {
    "sd21": UNetConfig(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
    "sdxl": UNetConfig(channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_heads=-1, num_head_channels=64,
                       transformer_depth=(1, 2, 10), context_dim=2048, use_linear_in_transformer=True,
                       adm_in_channels=2816),
}


def real(family):
    text, section, diffusers_cfg = FAMILIES[family]
    ldm = yaml.safe_load(text)
    return ldm, ldm["model"]["params"][section]["params"], diffusers_cfg


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.fixture(scope="module", params=["sd21", "sdxl"])
def family(request):
    """(name, our meta UNet built from the real config, its single-file state dict)."""
    _, params, _ = real(request.param)
    with torch.device("meta"):
        unet = UNetModel(UNetConfig.from_ldm(params))
    return request.param, unet, {PREFIX + k: v for k, v in unet.state_dict().items()}


@pytest.mark.parametrize("name", ["sd21", "sdxl"])
def test_config_read_from_the_real_files(name):
    _, params, _ = real(name)
    cfg = UNetConfig.from_ldm(params)
    assert cfg == EXPECTED[name]
    assert UNetConfig.from_ldm(cfg.to_ldm(image_size=64)) == cfg  # written back and read again


def test_keys_and_shapes_equal_diffusers_converter_and_model(family):
    from diffusers import UNet2DConditionModel

    name, _, ours = family
    ldm, _, published = real(name)
    built = sfu.create_unet_diffusers_config_from_ldm(ldm, ours)  # diffusers' reading of the real file
    for field, value in published.items():
        if field not in ("sample_size", "upcast_attention"):  # not in the LDM file
            got = built[field]
            assert (tuple(got) if isinstance(got, list) else got) == value, field
    converted = sfu.convert_ldm_unet_checkpoint(ours, built)
    assert len(converted) == len(ours)  # every key of ours lands somewhere
    with torch.device("meta"):
        ref = UNet2DConditionModel(**published)
    assert shapes(converted) == shapes(ref.state_dict())


def test_sdxl_keys_of_its_own(family):
    name, unet, ours = family
    has_label_emb = {PREFIX + f"label_emb.0.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")} <= set(ours)
    assert has_label_emb == (name == "sdxl")
    if name == "sdxl":
        assert tuple(ours[PREFIX + "label_emb.0.0.weight"].shape) == (1280, 2816)
        assert not any(k.startswith(PREFIX + f"input_blocks.{i}.1.") for k in ours for i in (1, 2))  # level 0
        assert len(unet.middle_block[1].transformer_blocks) == 10


def test_sites_carry_the_heads_of_their_level(family):
    name, unet, _ = family
    cfg = unet.cfg
    calls = []
    with torch.device("meta"):
        x, ctx = torch.empty(2, 4, 32, 24), torch.empty(2, 77, cfg.context_dim)
        y = vector_conditioning(torch.empty(2, 1280), 256, 192) if cfg.adm_in_channels else None
    out = unet(x, torch.tensor([981, 1], device="meta"), ctx, y=y,
               attn_override=lambda site, q, k, v: calls.append((site, q.shape, k.shape)))
    assert out.shape == x.shape and out.is_meta
    assert [(s.place, s.level, s.index, s.is_cross) for s, _, _ in calls] == \
        [(s.place, s.level, s.index, s.is_cross) for s in unet.sites]
    assert [s.index for s, _, _ in calls] == list(range(len(calls)))
    for site, qs, ks in calls:
        heads = 320 * cfg.channel_mult[site.level] // 64  # 5 / 10 / 20 heads of 64 channels
        assert (qs[1], qs[3]) == (heads, 64) and (site.h, site.w) == (32 >> site.level, 24 >> site.level)
        assert ks[2] == (77 if site.is_cross else site.h * site.w)
    per_place = {p: sum(s.place == p for s, _, _ in calls) for p in ("down", "mid", "up")}
    if name == "sd21":  # the SD v1 layout: 32 sites at levels 0..3
        assert per_place == {"down": 12, "mid": 2, "up": 18}
    else:  # levels 1 and 2 only: 2 x (2 + 10) down, 10 mid, 3 x (10 + 2) up transformer blocks
        assert {s.level for s, _, _ in calls} == {1, 2}
        assert per_place == {"down": 48, "mid": 20, "up": 72}


@pytest.mark.parametrize("edit, pattern", [
    (dict(num_classes=1000), r"num_classes=1000 \(a class-conditional UNet\)"),
    (dict(adm_in_channels=None), r"num_classes='sequential' without adm_in_channels"),
    (dict(num_head_channels=-1), r"neither num_heads .* nor num_head_channels"),
    (dict(transformer_depth=[1, 10]), r"transformer_depth \[1, 10\] for 3 levels"),
    (dict(transformer_depth_middle=1), r"transformer_depth_middle=1; .* the last level's depth"),
])
def test_config_errors_name_the_field(edit, pattern):
    _, params, _ = real("sdxl")
    with pytest.raises(ValueError, match=pattern):
        UNetConfig.from_ldm({**params, **edit})
    assert UNetConfig.from_ldm({**params, "transformer_depth_middle": 10}) == EXPECTED["sdxl"]  # SGM's default
