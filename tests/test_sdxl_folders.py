"""SDXL diffusers folders: a tiny SDXL folder written by diffusers' own `StableDiffusionXLPipeline.save_pretrained`
(its parts converted by diffusers' single-file converters from our seeded weights, tests/sdxl_oracles.py)
loads to the same model as the single file holding those weights; model_index.json's
force_zeros_for_empty_prompt decides how "" encodes; full-size config.json files read as configs/sdxl-base.yaml;
a broken folder is described and refused. SDXL-Turbo: `guidance 1` is the conditional prediction alone, and
DDIM with steps_offset 1000/N - 1 runs Turbo's trailing timesteps."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import sdxl_oracles as X
from models import load_config
from p2p import generate
from p2p.pipeline import initial_latent
from weights_tools import CheckpointError, inspect_checkpoint, load_checkpoint
from weights_tools.diffusers_keys import sdxl_unet_config, vae_config

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl-folder") / "model"
    X.ref_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    sd = X.ours()
    path = tmp_path_factory.mktemp("sdxl-file") / "tiny-sdxl.safetensors"
    save_file(X.single_file_state(sd), str(path), metadata={"ldm_config": json.dumps(sd.cfg.to_ldm())})
    return path


def test_folder_loads_to_the_single_files_model(folder, single_file):
    a, b = load_checkpoint(folder), load_checkpoint(single_file)
    assert a.cfg.family == "sdxl" and a.cfg.text == b.cfg.text and a.cfg.unet.adm_in_channels == 1576
    assert a.cfg.scale_factor == 0.13025 and a.cfg.text.zeros_for_empty
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part
    kw = dict(seed=3, num_steps=2, height=32, width=48, progress=False)
    out_a, out_b = generate(a, ["a cat on a wall", ""], **kw), generate(b, ["a cat on a wall", ""], **kw)
    assert torch.equal(out_a.latents, out_b.latents) and (out_a.images == out_b.images).all()


def test_inspect_describes_the_folder(folder, capsys):
    from p2p.cli import main

    info = inspect_checkpoint(folder)
    assert (info["variant"], info["family"], info["loadable"]) == ("SDXL", "sdxl", True)
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "variant:  SDXL (model_index.json names StableDiffusionXLPipeline); family 'sdxl'" in out
    assert "loadable: yes" in out and "predicts: epsilon (the folder's scheduler_config.json)" in out
    assert info["parts"]["text_encoder"]["tensors"] == 93  # both towers (CLIP-L 48 keys, bigG 45)


def test_force_zeros_false_encodes_the_empty_prompt(folder, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps(index | {"force_zeros_for_empty_prompt": False}))
    zeros, encoded = load_checkpoint(folder), load_checkpoint(copy)
    assert not encoded.cfg.text.zeros_for_empty
    with torch.no_grad():
        assert not zeros.encode_text([""]).any()
        e = encoded.encode_text([""])
        context, pooled = X.ref_pipeline(force_zeros=False).encode_prompt("", do_classifier_free_guidance=False)[::2]
    assert torch.allclose(e[:, :-1], context, atol=1e-5) and torch.allclose(e[0, -1, :pooled.shape[1]], pooled[0], atol=1e-5)


def test_a_folder_without_text_encoder_2_is_described_and_refused(folder, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(folder, copy, ignore=lambda d, names: [n for n in names if n == "text_encoder_2"])
    shutil.copytree(folder / "text_encoder_2", copy / "text_encoder_2", ignore=lambda d, names: ["config.json"])
    with pytest.raises(CheckpointError, match=r"this is a SDXL checkpoint .* lacks text_encoder_2/"):
        load_checkpoint(copy)
    info = inspect_checkpoint(copy)
    assert info["variant"] == "SDXL" and not info["loadable"] and "unet" in info["parts"]


def test_full_size_config_json_reads_as_sdxl_base():
    """The UNet and VAE config.json diffusers' converters make from SDXL base read back as configs/sdxl-base.yaml."""
    from diffusers.loaders import single_file_utils as sfu
    from weights_tools.layout import model_shapes

    cfg = load_config("sdxl-base")
    ckpt = {k: torch.empty(s, device="meta") for k, s in model_shapes(cfg).items()}
    unet, sample = sdxl_unet_config(sfu.create_unet_diffusers_config_from_ldm(cfg.to_ldm(), ckpt), "unet")
    assert unet == cfg.unet
    vae = sfu.create_vae_diffusers_config_from_ldm(cfg.to_ldm(), ckpt)
    assert vae_config(vae).ch_mult == cfg.vae.ch_mult and vae["scaling_factor"] == cfg.scale_factor


def test_turbo_guidance_one_is_the_conditional_prediction():
    """eps_u + 1 (eps_c - eps_u) = eps_c: `--guidance 1` runs SDXL-Turbo without guidance (diffusers' 0.0)."""
    sd = X.ours()
    got = generate(sd, ["a cat"], seed=1, num_steps=2, guidance_scale=1.0, steps_offset=499, progress=False).latents
    x = initial_latent(sd, 1, 32, 32)
    sched = sd.scheduler(2, 499)
    with torch.no_grad():
        cond = sd.encode_text(["a cat"])
        for t in sched.timesteps.tolist():
            x = sched.step(sd.predict(x, t, cond), t, x)
    assert (got - x).abs().max() <= 1e-5 * x.abs().max()
    unguided = generate(sd, ["a cat"], seed=1, num_steps=2, guidance_scale=0.0, steps_offset=499, progress=False)
    assert (unguided.latents - x).abs().max() > 1e-3 * x.abs().max()  # w = 0 is the unconditional prediction


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_steps_offset_gives_turbos_trailing_timesteps(steps):
    from diffusers import EulerAncestralDiscreteScheduler

    ref = EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          timestep_spacing="trailing")
    ref.set_timesteps(steps)
    ours = X.ours().scheduler(steps, 1000 // steps - 1).timesteps
    assert ours.tolist() == ref.timesteps.round().long().tolist()


def test_the_refiner_is_named_as_an_img2img_model_with_one_tower(folder, tmp_path):
    from weights_tools.layout import detect_variant, refusal

    keys = {"conditioner.embedders.0.model.token_embedding.weight": (10, 4),
            "model.diffusion_model.label_emb.0.0.weight": (8, 8)}
    msg = refusal(*detect_variant(keys), "refiner.safetensors")
    assert "SDXL refiner" in msg and "img2img" in msg and "one text tower" in msg
    copy = tmp_path / "refiner"
    shutil.copytree(folder, copy, ignore=lambda d, names: [n for n in names if n == "text_encoder" or n == "tokenizer"])
    with pytest.raises(CheckpointError, match=r"SDXL refiner checkpoint .* img2img model .* one text tower"):
        load_checkpoint(copy)
