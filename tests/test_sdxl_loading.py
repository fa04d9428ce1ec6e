"""Loading SDXL: a tiny single file in SDXL's layout (both towers under `conditioner.`, CLIP-L's position_ids
and bigG's logit_scale carried and not read) loads strictly and generates; a missing tower key is refused;
the full-size SDXL base key layout built on the meta device is exactly what diffusers' own single-file
converters turn into the state dicts of `UNet2DConditionModel`, `AutoencoderKL`, `CLIPTextModel` and
`CLIPTextModelWithProjection` (ViT-bigG/14) built from the configs they make."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models import load_config
from p2p import generate
from weights_tools import CheckpointError, load_checkpoint
from weights_tools.layout import model_shapes
from weights_tools.layouts import SDXL_LOGIT_SCALE, SDXL_POSITION_IDS
from weights_tools.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    make_tiny(path, seed=0, config="tiny-sdxl")
    return path


def test_tiny_sdxl_file_loads_strictly_and_generates(tiny_file):
    state = load_file(tiny_file)
    assert SDXL_POSITION_IDS in state and SDXL_LOGIT_SCALE in state
    sd = load_checkpoint(tiny_file)
    assert sd.cfg == load_config("tiny-sdxl") and sd.cfg.family == "sdxl"
    ours = {p + k: v for p, part in (("conditioner.", sd.text_encoder), ("model.diffusion_model.", sd.unet))
            for k, v in part.state_dict().items()}
    assert all(torch.equal(v, state[k]) for k, v in ours.items())
    out = generate(sd, ["a cat", ""], num_steps=2, progress=False)
    assert out.images.shape == (2, 32, 32, 3)


def test_a_missing_tower_key_is_refused(tiny_file, tmp_path):
    state = load_file(tiny_file)
    del state["conditioner.embedders.1.model.text_projection"]
    path = tmp_path / "broken.safetensors"
    with safe_open(str(tiny_file), "pt") as f:  # keep the config metadata
        meta = f.metadata()
    save_file(state, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing: conditioner\.embedders\.1\.model\.text_projection"):
        load_checkpoint(path)


def meta_state(shapes: dict, prefix: str = "") -> dict:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items() if k.startswith(prefix)}


def layout(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def converted(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith("position_ids")}


def test_full_size_layout_is_what_diffusers_converters_give():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = load_config("sdxl-base")
    ckpt = meta_state(model_shapes(cfg))
    ldm = cfg.to_ldm()
    with torch.device("meta"):
        ucfg = sfu.create_unet_diffusers_config_from_ldm(ldm, ckpt)
        assert ucfg["addition_embed_type"] == "text_time" and ucfg["cross_attention_dim"] == 2048
        assert converted(sfu.convert_ldm_unet_checkpoint(ckpt, ucfg)) == layout(UNet2DConditionModel(**ucfg))
        vcfg = sfu.create_vae_diffusers_config_from_ldm(ldm, ckpt)
        assert vcfg["scaling_factor"] == 0.13025
        assert converted(sfu.convert_ldm_vae_checkpoint(ckpt, vcfg)) == layout(AutoencoderKL(**vcfg))
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77))
        got = {k.removeprefix("text_model."): v for k, v in converted(sfu.convert_ldm_clip_checkpoint(ckpt)).items()}
        want = {k.removeprefix("text_model."): v for k, v in layout(clip).items()}
        assert got == want
        big = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            max_position_embeddings=77, projection_dim=1280, hidden_act="gelu"))
        prefix = "conditioner.embedders.1.model."
        assert converted(sfu.convert_open_clip_checkpoint(big, ckpt, prefix=prefix)) == layout(big)


def test_a_file_without_config_is_read_as_sdxl_base(tiny_file, tmp_path):
    """No ldm_config: SDXL keys make configs/sdxl-base.yaml the architecture, then every shape is checked
    (a tiny file does not fit it, and the message says whose config it was checked against)."""
    path = tmp_path / "bare.safetensors"
    save_file(load_file(tiny_file), str(path))
    with pytest.raises(CheckpointError, match=r"configs/sdxl-base\.yaml"):
        load_checkpoint(path)
    assert load_checkpoint(path, config="tiny-sdxl").cfg.family == "sdxl"


def test_cli_edit_with_attention_pictures(tiny_file, tmp_path):
    from p2p.cli import main

    out = tmp_path / "e.png"
    assert main(["edit", "--ckpt", str(tiny_file), "--prompt", "a painting of a squirrel eating a burger",
                 "--edit", "a painting of a lion eating a burger", "--blend", "squirrel", "lion", "--steps", "2",
                 "--show-attention", "--out", str(out)]) == 0
    assert out.exists() and (tmp_path / "e_attention_0.png").exists() and (tmp_path / "e.png.json").exists()
