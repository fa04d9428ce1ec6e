"""--model-config: every command that loads a model takes the model's YAML (a single file that carries no config,
as a .ckpt with its v2-inference YAML); an SD 2.x file that names no prediction type is warned about, and
`p2p inspect` says, which type was assumed and how to change it."""
import dataclasses
import json

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from models import load_config
from p2p.cli import main, parser
from weights_tools import inspect_checkpoint, load_checkpoint
from weights_tools.layout import LAYOUTS
from weights_tools.load import AssumedPrediction
from weights_tools.tiny import make_tiny

FAST = ["--steps", "2", "--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def bare_sd2(tmp_path_factory):
    """A tiny SD 2.x single file without its config (no ldm_config metadata), as a converted .ckpt is."""
    d = tmp_path_factory.mktemp("sd2")
    make_tiny(d / "with-config.safetensors", seed=0, config="tiny-sd2")
    save_file(load_file(d / "with-config.safetensors"), str(d / "bare.safetensors"))
    return d / "bare.safetensors"


def test_every_loading_command_has_the_flag():
    for command in (["generate", "--ckpt", "x", "--prompt", "p", "-o", "o.png"],
                    ["edit", "--ckpt", "x", "--prompt", "p", "--edit", "q", "-o", "o.png"],
                    ["invert", "--ckpt", "x", "--image", "i.png", "--prompt", "p", "-o", "o.inv"],
                    ["sweep", "configs/ablations/blend_threshold.yaml", "--ckpt", "x", "--out", "d"]):
        assert parser().parse_args(command + ["--model-config", "configs/tiny-sd2.yaml"]).model_config == \
            "configs/tiny-sd2.yaml", command[0]


def test_generate_reads_the_model_yaml(bare_sd2, tmp_path, capsys):
    out = tmp_path / "gen.png"
    assert main(["generate", "--ckpt", str(bare_sd2), "--prompt", "a cat", *FAST, "-o", str(out)]) == 2
    assert "tensors do not fit" in capsys.readouterr().err  # SD 2.x's full-size default does not fit a tiny file
    assert main(["generate", "--ckpt", str(bare_sd2), "--model-config", "configs/tiny-sd2.yaml", "--prompt", "a cat",
                 *FAST, "-o", str(out)]) == 0
    assert Image.open(out).size[0] >= 32
    assert json.loads(out.with_name(out.name + ".json").read_text())["model_config"] == "configs/tiny-sd2.yaml"
    expected = load_checkpoint(bare_sd2, config="configs/tiny-sd2.yaml")
    assert expected.cfg.prediction_type == "v"


def test_the_assumed_prediction_type_is_said(bare_sd2, monkeypatch):
    info = inspect_checkpoint(bare_sd2)
    assert info["prediction_type"] == "v" and "SD 2.x's rule" in info["prediction_source"]
    assert "--prediction-type epsilon or --model-config configs/sd-v2-base.yaml" in info["prediction_source"]
    tiny_eps = load_config("tiny-sd2").replace(prediction_type="epsilon")  # the family's default, at tiny size
    monkeypatch.setitem(LAYOUTS, "sd2", dataclasses.replace(LAYOUTS["sd2"], default_config=lambda p: tiny_eps))
    with pytest.warns(AssumedPrediction, match=r"does not say what its UNet predicts; assumed v, the SD 2.x v "
                      r"\(768-px v-prediction model\) .*--prediction-type epsilon or --model-config "):
        sd = load_checkpoint(bare_sd2)
    assert sd.cfg.prediction_type == "v"
