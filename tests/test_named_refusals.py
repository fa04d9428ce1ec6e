"""A UNet saved alone loads into its base model (`base=`, `--base`); files refused by name with what they need,
before any tensor is read: a UNet saved alone (SDXL-Lightning / Hyper-SD: diffusers' layout; or the single-file
layout), a file without its VAE (names its family and --vae),
SDXL inpainting / instruct-pix2pix single files and folders (9 / 8 input channels), an unCLIP folder without
model_index.json, SDXL keys that fit no distilled SDXL UNet."""
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdxl_oracles as X
from weights_tools import CheckpointError, inspect_checkpoint, load_checkpoint
from models import load_config
from weights_tools.layouts import LAYOUTS
from weights_tools.tiny import make_tiny
from weights_tools.sources import open_source

UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def tiny_file(tiny_sdxl_file):
    return tiny_sdxl_file


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl-folder") / "model"
    X.ref_pipeline().save_pretrained(path)
    return path


def refused_unread(path, monkeypatch, match, **kw) -> str:
    """The refusal's message; no tensor is read on the way (every fetch fails the test)."""
    opened = open_source

    def no_fetch(*a, **k):
        src = opened(*a, **k)
        src.fetch = lambda key: pytest.fail(f"read {key} before refusing")
        return src

    monkeypatch.setattr("weights_tools.load.open_source", no_fetch)
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(path, **kw)
    return str(e.value)


def test_a_diffusers_unet_alone_is_named_with_what_it_needs(folder, tmp_path, monkeypatch):
    path = tmp_path / "sdxl_lightning_4step_unet.safetensors"
    shutil.copy(folder / "unet" / "diffusion_pytorch_model.safetensors", path)
    msg = refused_unread(path, monkeypatch, r"this is an SDXL UNet alone file \(diffusers UNet keys")
    assert "SDXL-Lightning and Hyper-SD" in msg and "--base BASE (base= in the API)" in msg
    assert "Stable Diffusion v1" not in msg
    assert inspect_checkpoint(path)["variant"] == "SDXL UNet alone"


@pytest.fixture(scope="module")
def other_folder(tmp_path_factory):
    """The same architecture with other weights: its UNet is the one shipped alone."""
    path = tmp_path_factory.mktemp("sdxl-other") / "model"
    X.ref_pipeline(seed=11).save_pretrained(path)
    return path


@pytest.mark.parametrize("base", ["folder", "single file"])
def test_a_unet_alone_loads_into_its_base(folder, other_folder, tiny_file, tmp_path, base):
    """SDXL-Lightning style: the UNet file in diffusers' names, the VAE and text towers from the base: the model
    is the base folder's with the other folder's UNet (each folder loads as diffusers does: test_sdxl_folders)."""
    unet = tmp_path / "lightning_unet.safetensors"
    shutil.copy(other_folder / "unet" / "diffusion_pytorch_model.safetensors", unet)
    base_path = folder if base == "folder" else tiny_file
    sd, whole, other = load_checkpoint(unet, base=base_path), load_checkpoint(base_path), load_checkpoint(other_folder)
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(sd.unet.state_dict(), other.unet.state_dict())
    assert not same(sd.unet.state_dict(), whole.unet.state_dict())
    for part in ("vae", "text_encoder"):
        assert same(getattr(sd, part).state_dict(), getattr(whole, part).state_dict()), part


def test_the_cli_takes_base(folder, other_folder, tmp_path):
    from p2p.cli import main

    unet = tmp_path / "lightning_unet.safetensors"
    shutil.copy(other_folder / "unet" / "diffusion_pytorch_model.safetensors", unet)
    out = tmp_path / "x.png"
    assert main(["generate", "--ckpt", str(unet), "--base", str(folder), "--prompt", "a cat", "--steps", "2",
                 "--height", "32", "--width", "32", "-o", str(out)]) == 0
    assert json.loads(out.with_name(out.name + ".json").read_text())["base"] == str(folder)


def test_a_single_file_unet_alone_is_named(tiny_file, tmp_path, monkeypatch):
    path = tmp_path / "unet.safetensors"
    save_file({k: v for k, v in load_file(tiny_file).items() if k.startswith(UNET)}, str(path))
    msg = refused_unread(path, monkeypatch, r"missing component\(s\) vae .* text_encoder \(`conditioner\.\*`\)")
    assert "An SDXL checkpoint must hold" in msg and "this is an SDXL UNet alone" in msg


@pytest.mark.parametrize("config", ["tiny-sdxl", "tiny-sd2"])
def test_a_file_without_vae_names_its_family_and_vae(config, tmp_path, monkeypatch):
    whole = tmp_path / "whole.safetensors"
    make_tiny(whole, seed=0, config=config)
    path = tmp_path / "no-vae.safetensors"
    save_file({k: v for k, v in load_file(whole).items() if not k.startswith("first_stage_model.")}, str(path))
    msg = refused_unread(path, monkeypatch, r"missing component\(s\) vae")
    name = "SDXL" if config == "tiny-sdxl" else "SD 2.x"
    assert f"An {name} checkpoint must hold" in msg and "--vae PATH" in msg


@pytest.mark.parametrize("channels,kind", [(9, "SDXL inpainting"), (8, "SDXL pix2pix")])
def test_sdxl_inpainting_and_pix2pix_single_files(tiny_file, tmp_path, monkeypatch, channels, kind):
    state = load_file(tiny_file)
    w = state[UNET + "input_blocks.0.0.weight"]
    state[UNET + "input_blocks.0.0.weight"] = torch.zeros(w.shape[0], channels, *w.shape[2:])
    path = tmp_path / "x.safetensors"
    save_file(state, str(path))
    msg = refused_unread(path, monkeypatch, rf"this is a {kind} checkpoint .*{channels} input channels")
    assert "SDXL base text-to-image files read 4" in msg
    assert inspect_checkpoint(path)["variant"] == kind


@pytest.mark.parametrize("channels,kind", [(9, "SDXL inpainting"), (8, "SDXL pix2pix")])
def test_sdxl_inpainting_and_pix2pix_folders(folder, tmp_path, monkeypatch, channels, kind):
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    (copy / "model_index.json").unlink()
    config = json.loads((copy / "unet" / "config.json").read_text())
    (copy / "unet" / "config.json").write_text(json.dumps(config | {"in_channels": channels}))
    refused_unread(copy, monkeypatch, rf"this is a {kind} checkpoint \(unet/config.json has in_channels {channels}")


def test_an_unclip_folder_without_model_index_is_named(folder, tmp_path, monkeypatch):
    copy = tmp_path / "model"
    shutil.copytree(folder, copy, ignore=lambda d, names: [n for n in names if n in ("text_encoder_2", "model_index.json")])
    config = json.loads((copy / "unet" / "config.json").read_text())
    config.update(addition_embed_type=None, class_embed_type="projection", projection_class_embeddings_input_dim=64)
    (copy / "unet" / "config.json").write_text(json.dumps(config))
    msg = refused_unread(copy, monkeypatch, r"this is an? unCLIP checkpoint \(unet/config.json has class_embed_type")
    assert "v1.x is supported" not in msg


def tiny_default(monkeypatch):
    """The SDXL family's default config made the tiny SDXL's, which the tiny file's keys fit."""
    monkeypatch.setitem(LAYOUTS, "sdxl", dataclasses.replace(LAYOUTS["sdxl"], default_config=lambda p: load_config("tiny-sdxl")))


def test_sdxl_keys_that_fit_no_distilled_unet_are_refused(tiny_file, tmp_path, monkeypatch):
    """A distilled SDXL file that names no config loads with the depths its keys say (tests/test_distilled_sdxl.py);
    keys that fit no UNet (the middle transformer gone, both middle resnets kept) are refused unread, naming them."""
    tiny_default(monkeypatch)
    path = tmp_path / "ssd.safetensors"
    save_file({k: v for k, v in load_file(tiny_file).items() if not k.startswith(UNET + "middle_block.1.")}, str(path))
    msg = refused_unread(path, monkeypatch, r"tensors do not fit the model built from SDXL base's config, "
                         r"configs/sdxl-base.yaml, its transformer depths as the file's keys say")
    assert "unexpected: model.diffusion_model.middle_block.2." in msg


def test_an_output_block_with_fewer_transformer_blocks_is_a_distilled_sdxl(tiny_file, tmp_path, monkeypatch):
    tiny_default(monkeypatch)
    state = load_file(tiny_file)
    first_up = next(k for k in sorted(state) if k.startswith(UNET + "output_blocks.") and ".transformer_blocks.1." in k)
    block = first_up[:first_up.index(".transformer_blocks.")]
    path = tmp_path / "ssd.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith(block + ".transformer_blocks.1.")}, str(path))
    info = inspect_checkpoint(path)
    assert info["loadable"] and info["variant"] == "SDXL", info["problem"]
    assert f"distilled SDXL: `{block[len(UNET):block.rindex('.')]}` has 1 transformer blocks" in info["variant_evidence"]
    assert info["model"] == ("distilled SDXL (transformer depths down [0, 1, 2], up [1, 2, 2, 1, 1, 1, 0, 0, 0], "
                             "middle block with a transformer)")
