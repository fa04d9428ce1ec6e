"""Opening FLUX.1 diffusers folders (weights_tools/mmdit.py, the FluxPipeline row): `p2p inspect` names
FLUX.1-dev or FLUX.1-schnell by the transformer's guidance embedding and says whether the folder loads,
from its headers alone; a folder whose tensors do not fit its config, or that lacks a text encoder, is
refused by name."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from weights_tools import CheckpointError, format_inspection, inspect_checkpoint, load_checkpoint

FLUX_FOLDER = Path(__file__).parent / "fixtures" / "mmdit" / "tiny-flux"


def test_inspect_names_flux_dev_and_says_it_loads():
    info = inspect_checkpoint(FLUX_FOLDER)
    assert (info["variant"], info["model"], info["loadable"]) == ("FLUX.1-dev", "FLUX.1-dev", True)
    assert "guidance_embeds true" in info["variant_evidence"]
    assert "FLUX.1-dev" in format_inspection(info)


def test_a_config_without_guidance_over_weights_with_it_is_schnell_and_refused(tmp_path):
    """guidance_embeds false names the folder FLUX.1-schnell; the dev weights' guidance embedder then has no
    place in the model, which inspect and loading both say before reading a tensor."""
    folder = tmp_path / "flux"
    shutil.copytree(FLUX_FOLDER, folder)
    config = folder / "transformer" / "config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), guidance_embeds=False)))
    info = inspect_checkpoint(folder)
    assert info["variant"] == "FLUX.1-schnell" and not info["loadable"]
    assert "time_text_embed.guidance_embedder" in info["problem"]
    with pytest.raises(CheckpointError, match="do not fit its config.json.*guidance_embedder"):
        load_checkpoint(folder)


def test_a_flux_folder_without_its_t5_is_refused_by_name(tmp_path):
    folder = tmp_path / "flux"
    shutil.copytree(FLUX_FOLDER, folder)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(CheckpointError, match="text_encoder_2 missing"):
        load_checkpoint(folder)
