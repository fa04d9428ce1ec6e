"""Gaps a real-file audit found, each with a tiny file of the real structure: leftover keys and
--non-strict, a swapped-in VAE, old diffusers folders' sample_size, the prediction type, other
families named as such, and Lightning's non-tensor entries."""
import collections
import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from models import PREFIXES
from weights_tools import inspect_checkpoint, load_checkpoint

from conftest import GOLDEN_CKPT


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN_CKPT))


@pytest.fixture(scope="module")
def reference():
    sd = load_checkpoint(GOLDEN_CKPT)
    return {PREFIXES[p] + k: v for p in PREFIXES for k, v in getattr(sd, p).state_dict().items()}


def model_tensors(sd):
    return {PREFIXES[p] + k: v for p in PREFIXES for k, v in getattr(sd, p).state_dict().items()}


def assert_same(sd, reference):
    got = model_tensors(sd)
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in got)


# ------------------------------------------------------------------------ Lightning's non-tensor entries
class AttributeDict(dict):
    """As Lightning's `AttributeDict` (hyper_parameters): a dict subclass, pickled with SETITEMS."""

    def __getattr__(self, key):
        return self[key]


def test_dict_subclasses_and_paths_become_placeholders(tmp_path, golden, reference):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": golden, "global_step": torch.tensor(470000), "epoch": 3,
                "hyper_parameters": AttributeDict(lr=1e-4, ckpt_path=pathlib.Path("/data/ckpts/last.ckpt")),
                "loops": collections.defaultdict(list, fit=[1, 2]), "log_dir": pathlib.PosixPath("/logs/run")},
               path)
    assert_same(load_checkpoint(path, config="tiny"), reference)
    info = inspect_checkpoint(path)
    assert info["metadata"]["global_step"] == "470000" and info["metadata"]["epoch"] == "3"
    assert info["metadata"]["log_dir"] == "<placeholder for pathlib.PosixPath('/', 'logs', 'run')>"
    assert info["metadata"]["hyper_parameters"] == "<placeholder for test_weights_audit.AttributeDict with 2 entries>"
    assert info["metadata"]["loops"] == "<placeholder for collections.defaultdict with 1 entry>"
    assert {"pathlib.PosixPath", "collections.defaultdict", "__builtin__.list"} <= set(info["placeholders"])


def test_flat_ckpt_shows_its_step(tmp_path, golden):
    path = tmp_path / "flat.ckpt"
    torch.save(dict(golden, global_step=1234), path)
    assert inspect_checkpoint(path)["metadata"]["global_step"] == "1234"
