"""Playground v2.5 has SDXL's layout but an EDM schedule and per-channel latent statistics: its diffusers
folder (StableDiffusionXLPipeline with EDMDPMSolverMultistepScheduler, VAE latents_mean / latents_std) and
its single file (`edm_mean` / `edm_std` keys) are refused by name, saying why, from the config files and the headers alone;
so is an EDM v-prediction file (ComfyUI's `edm_vpred.sigma_max`)."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import sdxl_oracles as X
from weights_tools import CheckpointError, inspect_checkpoint, load_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("playground") / "sdxl"
    X.ref_pipeline().save_pretrained(path)
    return path


def refused(path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "Playground v2.5" in str(e.value) and "EDM" in str(e.value) and "StableDiffusionXLPipeline" in str(e.value)
    return str(e.value)


def test_the_folder_is_refused_by_its_scheduler(sdxl_folder, tmp_path):
    folder = tmp_path / "pg"
    shutil.copytree(sdxl_folder, folder)
    shutil.rmtree(folder / "scheduler")
    diffusers.EDMDPMSolverMultistepScheduler().save_pretrained(folder / "scheduler")
    assert "EDMDPMSolverMultistepScheduler" in refused(folder)


def test_the_folder_is_refused_by_its_vae_statistics(sdxl_folder, tmp_path):
    folder = tmp_path / "pg"
    shutil.copytree(sdxl_folder, folder)
    vae = json.loads((folder / "vae" / "config.json").read_text())
    vae.update(latents_mean=[-1.6574, 1.886, -1.383, 2.5155], latents_std=[8.4927, 5.9022, 6.5498, 5.2299])
    (folder / "vae" / "config.json").write_text(json.dumps(vae))
    assert "latents_mean" in refused(folder)
    assert inspect_checkpoint(folder)["variant"] == "Playground v2.5"


@pytest.mark.parametrize("keys, kind", [(("edm_mean", "edm_std"), "Playground v2.5"),
                                        (("edm_vpred.sigma_max", "edm_vpred.sigma_min"),
                                         "CosXL-style EDM v-prediction")])
def test_single_files_are_refused_by_their_keys(tmp_path, keys, kind):
    sd = X.ours()
    path = tmp_path / "pg.safetensors"
    state = X.single_file_state(sd) | {k: torch.ones(1, 4, 1, 1) for k in keys}
    save_file(state, str(path), metadata={"ldm_config": json.dumps(sd.cfg.to_ldm())})
    with pytest.raises(CheckpointError, match=f"this is a {kind} checkpoint.*{keys[0]}.*EDM"):
        load_checkpoint(path)
    info = inspect_checkpoint(path)
    assert info["variant"] == kind and not info["loadable"]
