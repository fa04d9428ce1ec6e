"""Sharded diffusers folders: a component saved by diffusers / transformers with a small `max_shard_size`
(`diffusion_pytorch_model.safetensors.index.json` and its shards; `.bin` shards; fp16-variant shards) loads,
shard by shard, to the same weights as the unsharded folder (which matches diffusers' pipeline,
tests/test_sdxl_folders.py), and `p2p inspect` describes it; an index naming a missing shard is refused."""
import json
import shutil

import pytest
import torch

import sdxl_oracles as X
from weights_tools import CheckpointError, inspect_checkpoint, load_checkpoint

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(plain folder, the same with every component sharded: UNet as safetensors shards, VAE as .bin shards,
    the text towers as fp16-variant safetensors shards)."""
    root = tmp_path_factory.mktemp("sharded")
    pipe = X.ref_pipeline()
    pipe.save_pretrained(root / "plain")
    sharded = root / "sharded"
    shutil.copytree(root / "plain", sharded)
    for part, kw in (("unet", {}), ("vae", {"safe_serialization": False}),
                     ("text_encoder", {"variant": "fp16"}), ("text_encoder_2", {"variant": "fp16"})):
        for f in (sharded / part).glob("*.safetensors"):
            f.unlink()
        getattr(pipe, part).save_pretrained(sharded / part, max_shard_size="1MB", **kw)
    return root / "plain", sharded


def test_every_component_is_sharded(folders):
    _, sharded = folders
    names = {p.name for p in sharded.glob("*/*.index*.json")}
    assert names == {"diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json",
                     "model.safetensors.index.fp16.json"}
    assert len(list((sharded / "unet").glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1


def test_a_sharded_folder_loads_the_same_weights(folders):
    plain, sharded = folders
    a, b = load_checkpoint(plain), load_checkpoint(sharded)
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part


def test_inspect_describes_a_sharded_folder(folders, capsys):
    from p2p.cli import main

    info = inspect_checkpoint(folders[1])
    assert (info["variant"], info["loadable"]) == ("SDXL", True)
    assert info["parts"]["unet"]["tensors"] == inspect_checkpoint(folders[0])["parts"]["unet"]["tensors"]
    assert main(["inspect", str(folders[1])]) == 0
    assert "loadable: yes" in capsys.readouterr().out


def test_an_index_naming_a_missing_shard_is_refused(folders, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(folders[1], copy)
    index = json.loads((copy / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (copy / "unet" / shard).unlink()
    with pytest.raises(CheckpointError, match=f"names the shard '{shard}'.*every shard the index names"):
        load_checkpoint(copy)
