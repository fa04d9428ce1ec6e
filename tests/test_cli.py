"""The command line, run in-process on the golden tiny checkpoint with few steps."""
import json
from pathlib import Path

import pytest
from PIL import Image

from models.clip import default_tokenizer
from p2p.cli import main
from p2p.config import load_edit_config
from p2p.control import Controller

CONFIGS = sorted((Path(__file__).parent.parent / "configs" / "edits").glob("*.yaml"))
FAST = ["--steps", "2", "--height", "32", "--width", "32"]


def test_generate_writes_picture_and_sidecar(tmp_path, golden_dir):
    out = tmp_path / "gen.png"
    assert main(["generate", "--ckpt", str(golden_dir / "tiny-sd-a.safetensors"), "--prompt", "a cat", "--prompt",
                 "a dog", *FAST, "-o", str(out)]) == 0
    assert Image.open(out).size[0] >= 64
    record = json.loads(out.with_name(out.name + ".json").read_text())
    assert record["checkpoint_sha256"] == json.loads((golden_dir / "tiny-sd-a.json").read_text())["checkpoint_sha256"]
    assert record["settings"]["prompts"] == ["a cat", "a dog"] and record["p2p_version"]


def test_edit_with_flags_and_attention(tmp_path, golden_dir):
    out = tmp_path / "edit.png"
    rc = main(["edit", "--ckpt", str(golden_dir / "tiny-sd-a.safetensors"), "--prompt", "a cat riding a bicycle",
               "--edit", "a cat riding a car", "--edit", "a cat riding a horse", "--mode", "replace",
               "--cross-steps", "0.8", "--self-steps", "0.4", "--blend", "bicycle", "car", "horse",
               "--weight", "car=2,1", "--seed", "8888", "--show-attention", *FAST, "-o", str(out)])
    assert rc == 0
    assert {p.name for p in tmp_path.iterdir()} == {"edit.png", "edit.png.json"} | {
        f"edit_{kind}_{i}.png" for kind in ("attention", "self_attention") for i in range(3)}
    record = json.loads(out.with_name(out.name + ".json").read_text())
    assert record["settings"]["edits"] == ["a cat riding a car", "a cat riding a horse"]
    assert "Reweight" in record["spec"] and "Replace" in record["spec"]


def test_edit_from_config_file(tmp_path, golden_dir):
    out = tmp_path / "cfg.png"
    cfg = Path(__file__).parent.parent / "configs" / "edits" / "squirrel_lion_wordsteps_blend.yaml"
    assert main(["edit", "--config", str(cfg), "--ckpt", str(golden_dir / "tiny-sd-a.safetensors"), *FAST,
                 "-o", str(out)]) == 0
    record = json.loads(out.with_name(out.name + ".json").read_text())
    assert record["settings"]["cross_replace_steps"] == {"default_": 1.0, "lion": 0.4}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_edit_config_resolves(path, tiny_sd):
    cfg = load_edit_config(path)
    spec, blend = cfg.build()
    Controller(default_tokenizer(), cfg.prompts, spec, 50, tiny_sd.unet.sites, blend)


@pytest.mark.parametrize("args, message", [
    (["--edit", "a cat riding a car", "--blend", "bicycle", "tiger"], "'tiger' is not in prompt"),
    (["--edit", "a big cat riding a car"], "same number of words"),
    (["--edit", "a cat riding a car", "--mode", "reweight"], "needs an equalizer"),
    (["--edit", "a cat riding a car", "--weight", "car"], "WORD=C"),
])
def test_edit_errors_leave_no_output(tmp_path, golden_dir, capsys, args, message):
    rc = main(["edit", "--ckpt", str(golden_dir / "tiny-sd-a.safetensors"), "--prompt", "a cat riding a bicycle",
               *args, *FAST, "-o", str(tmp_path / "x.png")])
    assert rc == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_config_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompt: a cat\nedits: [a dog]\ncross_step: 0.5\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key 'cross_step'"):
        load_edit_config(bad)


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    rc = main(["generate", "--ckpt", str(tmp_path / "nope.safetensors"), "--prompt", "a cat", *FAST,
               "-o", str(tmp_path / "x.png")])
    assert rc == 2 and "nope.safetensors" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_inspect(golden_dir, capsys):
    assert main(["inspect", str(golden_dir / "tiny-sd-a.safetensors")]) == 0
    assert "unet" in capsys.readouterr().out.lower()
