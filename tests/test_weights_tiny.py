"""make_tiny, the golden tiny checkpoint, and inspection of both (weights_tools)."""
import json

import torch
from safetensors import safe_open

from models import PREFIXES, SDConfig, StableDiffusion, load_config
from weights_tools import format_inspection, inspect_checkpoint, load_checkpoint, make_tiny
from weights_tools.layouts import POSITION_IDS
from weights_tools.make_tiny import main as make_tiny_main

from conftest import GOLDEN_CKPT


def file_tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def model_tensors(sd: StableDiffusion):
    return {PREFIXES[p] + k: v for p in PREFIXES for k, v in getattr(sd, p).state_dict().items()}


def test_make_tiny_layout_and_nonzero(tmp_path):
    out = make_tiny(tmp_path / "t.safetensors", seed=1)
    tensors, meta = file_tensors(out)
    assert SDConfig.from_ldm(json.loads(meta["ldm_config"])) == load_config("tiny")
    assert tensors[POSITION_IDS].dtype == torch.int64 and tensors[POSITION_IDS].shape == (1, 77)
    assert torch.equal(tensors[POSITION_IDS][0], torch.arange(77))
    for prefix in PREFIXES.values():
        assert any(k.startswith(prefix) for k in tensors)
    for k, v in tensors.items():
        assert (v != 0).all() if k != POSITION_IDS else True, k
    norms = [v for k, v in tensors.items() if v.ndim == 1 and k.endswith(".weight")]
    assert norms and all((v > 0).all() for v in norms)  # GroupNorm / LayerNorm weights stay positive


def test_make_tiny_deterministic(tmp_path):
    a = make_tiny(tmp_path / "a.safetensors", seed=7)
    assert make_tiny_main([str(tmp_path / "b.safetensors"), "--seed", "7"]) == 0
    c = make_tiny(tmp_path / "c.safetensors", seed=8)
    assert a.read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_make_tiny_round_trip(tmp_path):
    out = make_tiny(tmp_path / "t.safetensors", seed=3)
    sd = load_checkpoint(out)
    assert isinstance(sd, StableDiffusion) and sd.cfg == load_config("tiny") and not sd.training
    tensors, _ = file_tensors(out)
    loaded = model_tensors(sd)
    assert set(loaded) == set(tensors) - {POSITION_IDS}
    assert all(torch.equal(loaded[k], tensors[k]) for k in loaded)


def test_load_golden():
    tensors, meta = file_tensors(GOLDEN_CKPT)
    sd = load_checkpoint(GOLDEN_CKPT)
    assert sd.cfg == SDConfig.from_ldm(json.loads(meta["ldm_config"]))
    assert not any(p.is_meta for p in sd.parameters()) and sd.dtype == torch.float32
    loaded = model_tensors(sd)
    assert len(loaded) == len(tensors) - 1 == 652
    assert all(torch.equal(v, tensors[k]) for k, v in loaded.items())


def test_load_dtype_casts_floats_only():
    sd = load_checkpoint(GOLDEN_CKPT, dtype=torch.float16)
    assert {p.dtype for p in sd.parameters()} == {torch.float16}


def test_inspect_golden():
    info = inspect_checkpoint(GOLDEN_CKPT)
    assert info["variant"] == "SD v1" and info["format"] == "safetensors" and info["loadable"]
    assert {p: s["tensors"] for p, s in info["parts"].items()} == \
        {"unet": 492, "vae": 124, "text_encoder": 36, "position_ids": 1}
    assert info["parts"]["position_ids"]["dtypes"] == {"int64": 1}
    assert info["config_source"] == "the file's ldm_config metadata" and info["unknown_count"] == 0
    text = format_inspection(info)
    assert "SD v1" in text and "unet" in text and "ldm_config" in text
