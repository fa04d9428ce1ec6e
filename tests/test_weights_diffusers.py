"""diffusers folders: built by diffusers' own LDM->diffusers converters (an independent oracle),
loaded back through weights_tools' reverse key map, and converted back to a single file."""
import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models import PREFIXES
from weights_tools import CheckpointError, convert_checkpoint, inspect_checkpoint, load_checkpoint
from weights_tools.layouts import POSITION_IDS

from conftest import GOLDEN_CKPT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN_CKPT))


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory, golden):
    return build_diffusers_folder(tmp_path_factory.mktemp("diffusers") / "tiny-sd", golden)


def build_diffusers_folder(folder, golden):
    """The golden checkpoint converted by diffusers' own converters and written by save_pretrained."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with safe_open(str(GOLDEN_CKPT), "pt") as f:
        original = json.loads(f.metadata()["ldm_config"])
    ucfg = sfu.create_unet_diffusers_config_from_ldm(original, golden)
    unet = UNet2DConditionModel(**ucfg)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(golden, ucfg), strict=True)
    vcfg = sfu.create_vae_diffusers_config_from_ldm(original, golden)
    vae = AutoencoderKL(**vcfg)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(golden, vcfg), strict=True)
    t = original["model"]["params"]["cond_stage_config"]["params"]["tiny_clip_text"]
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=t["vocab_size"], hidden_size=t["width"], intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["layers"], num_attention_heads=t["heads"], hidden_act=t["hidden_act"],
        max_position_embeddings=t["max_position_embeddings"], layer_norm_eps=t["layer_norm_eps"]))
    clip = sfu.convert_ldm_clip_checkpoint(golden)
    text_sd = {k.removeprefix("text_model."): v for k, v in clip.items() if not k.endswith("position_ids")}
    text.load_state_dict(text_sd, strict=True)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    return folder


def model_tensors(sd):
    return {PREFIXES[p] + k: v for p in PREFIXES for k, v in getattr(sd, p).state_dict().items()}


def test_load_diffusers_folder(diffusers_folder, golden):
    sd = load_checkpoint(diffusers_folder)
    ref = load_checkpoint(GOLDEN_CKPT)
    # architecture from config.json, heads included (diffusers' attention_head_dim means heads in SD v1)
    assert (sd.cfg.unet, sd.cfg.text) == (ref.cfg.unet, ref.cfg.text)
    assert dataclasses.replace(sd.cfg.vae, resolution=ref.cfg.vae.resolution) == ref.cfg.vae  # resolution: no weights
    got = model_tensors(sd)
    assert got.keys() == set(golden) - {POSITION_IDS}
    assert all(torch.equal(got[k], golden[k]) for k in got)


def test_convert_diffusers_folder_to_single_file(diffusers_folder, golden, tmp_path):
    out = convert_checkpoint(diffusers_folder, tmp_path / "back.safetensors")
    back = load_file(str(out))
    assert back.keys() == golden.keys()
    assert all(torch.equal(back[k], golden[k]) for k in back)
    assert back[POSITION_IDS].dtype == torch.int64
    info = inspect_checkpoint(out)
    assert info["loadable"] and info["config_source"] == "the file's ldm_config metadata"


def test_inspect_diffusers_folder(diffusers_folder):
    info = inspect_checkpoint(diffusers_folder)
    assert info["format"] == "diffusers" and info["variant"] == "SD v1" and info["loadable"]
    assert info["parts"]["unet"]["tensors"] == 492 and info["parts"]["vae"]["tensors"] == 124
    assert info["config_source"] == "the diffusers config.json files"


def test_diffusers_folder_with_bin_weights(diffusers_folder, golden, tmp_path):
    """Older folders hold `pytorch_model.bin` pickles: read through the restricted unpickler."""
    import shutil
    folder = tmp_path / "bin"
    shutil.copytree(diffusers_folder, folder)
    te = folder / "text_encoder"
    torch.save(load_file(str(te / "model.safetensors")), te / "pytorch_model.bin")
    (te / "model.safetensors").unlink()
    got = model_tensors(load_checkpoint(folder))
    assert all(torch.equal(got[k], golden[k]) for k in got)


def test_diffusers_folder_missing_part(diffusers_folder, tmp_path):
    import shutil
    partial = tmp_path / "partial"
    shutil.copytree(diffusers_folder / "unet", partial / "unet")
    shutil.copytree(diffusers_folder / "text_encoder", partial / "text_encoder")
    from weights_tools import CheckpointError
    with pytest.raises(CheckpointError, match=r"diffusers folder without vae/ \(missing component\)"):
        load_checkpoint(partial)


def config_only_copy(folder, tmp_path):
    """The folder's config.json files alone: a refusal from them comes before any weight is read."""
    copy = tmp_path / folder.name
    for cfg in folder.glob("*/config.json"):
        (copy / cfg.parent.name).mkdir(parents=True, exist_ok=True)
        (copy / cfg.parent.name / "config.json").write_text(cfg.read_text())
    for part in ("unet", "vae", "text_encoder"):   # weights that cannot be read, should anything try
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        (copy / part / name).write_bytes(b"not read")
    return copy


@pytest.mark.parametrize("key, value", [("scaling_factor", -0.18215), ("scaling_factor", 1e30),
                                        ("scaling_factor", 0), ("scaling_factor", 1e-30), ("scaling_factor", "nan"),
                                        ("scaling_factor", "0.18215"), ("shift_factor", 1e9)])
def test_an_implausible_vae_scaling_factor_is_refused_before_any_weight(diffusers_folder, tmp_path, key, value):
    # -0.18215 and 1e30 gave a picture and exit 0; nan, 0 and 1e-30 were found after the whole sampling loop
    folder = config_only_copy(diffusers_folder, tmp_path)
    path = folder / "vae" / "config.json"
    cfg = json.loads(path.read_text())
    cfg[key] = float(value) if value == "nan" else value
    path.write_text(json.dumps(cfg))
    for read in (load_checkpoint, inspect_checkpoint):
        with pytest.raises(CheckpointError, match=rf"vae/config.json: {key} is .*not a finite number from"):
            read(folder)


def with_text_act(folder, tmp_path, act):
    copy = tmp_path / f"act-{act}"
    shutil.copytree(folder, copy)
    path = copy / "text_encoder" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "hidden_act": act}))
    return copy


@pytest.mark.parametrize("act", ["relu", "gelu", "quick_gelu"])
def test_text_encoder_hidden_act_is_the_one_transformers_runs(diffusers_folder, tmp_path, act):
    # relu ran as GELU: the folder's own config names the activation
    from transformers import CLIPTextModel
    folder = with_text_act(diffusers_folder, tmp_path, act)
    ours = load_checkpoint(folder)
    theirs = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    ids = ours.tokenize(["a cat riding a bicycle"])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_text(["a cat riding a bicycle"]),
                                   theirs(ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_every_activation_of_ours_is_transformers_own():
    from transformers.activations import ACT2FN
    from models.clip import ACTIVATIONS
    from models.config import CLIP_ACTIVATIONS
    assert tuple(ACTIVATIONS) == CLIP_ACTIVATIONS
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    for name, fn in ACTIVATIONS.items():
        torch.testing.assert_close(fn(x), ACT2FN[name](x), rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("act", ["foo", "tanh", 3])
def test_an_unknown_hidden_act_is_refused_by_name_before_any_weight(diffusers_folder, tmp_path, act):
    folder = config_only_copy(with_text_act(diffusers_folder, tmp_path, act), tmp_path / "configs")
    for read in (load_checkpoint, inspect_checkpoint):
        with pytest.raises(CheckpointError, match=rf"hidden_act '?{act}'? is not one this CLIP implements"):
            read(folder)


def test_the_file_without_a_variant_is_taken_before_an_fp16_variant(diffusers_folder, golden, tmp_path):
    # an fp32 .bin beside an .fp16.safetensors: the fp16 file was loaded and upcast, as diffusers does not
    folder = tmp_path / "variant"
    shutil.copytree(diffusers_folder, folder)
    for part, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        weights = load_file(str(folder / part / f"{name}.safetensors"))
        torch.save(weights, folder / part / ("diffusion_pytorch_model.bin" if part == "unet" else "pytorch_model.bin"))
        save_file({k: v.half() for k, v in weights.items()}, str(folder / part / f"{name}.fp16.safetensors"))
        (folder / part / f"{name}.safetensors").unlink()
    got = model_tensors(load_checkpoint(folder))
    assert all(torch.equal(got[k], golden[k]) for k in got)      # fp32, not fp16 upcast
    only_variant = tmp_path / "only-variant"
    shutil.copytree(folder, only_variant)
    (only_variant / "unet" / "diffusion_pytorch_model.bin").unlink()
    got = model_tensors(load_checkpoint(only_variant))             # a part with the variant alone still loads
    unet = [k for k in got if k.startswith(PREFIXES["unet"])]
    assert all(torch.equal(got[k], golden[k].half().float()) for k in unet)
