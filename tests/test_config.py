"""Experiment configs: the schema rejects bad keys, types and words before any model is loaded."""
from pathlib import Path

import pytest

import p2p.cli
import p2p.config
import p2p.sweep
from p2p.config import load_ablation, load_edit_config

ROOT = Path(__file__).parent.parent
ABLATIONS = sorted((ROOT / "configs" / "ablations").glob("*.yaml"))
CKPT = ROOT / "tests" / "fixtures" / "golden" / "tiny-sd-a.safetensors"


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: configs must be rejected before that."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded for a bad config")
    monkeypatch.setattr(p2p.sweep.command, "load_checkpoint", boom)
    monkeypatch.setattr(p2p.cli, "load_model", boom)


def write(tmp_path, text, name="abl.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = f"""ckpt: {CKPT}
prompt: a cat riding a bicycle
edits: [a cat riding a car]
steps: 2
"""


def test_cli_reexports_the_schema():
    assert p2p.cli.load_edit_config is p2p.config.load_edit_config
    assert p2p.cli.build_spec is p2p.config.build_spec and p2p.cli.EDIT_KEYS is p2p.config.EDIT_KEYS


@pytest.mark.parametrize("path", ABLATIONS, ids=[p.stem for p in ABLATIONS])
def test_every_ablation_config_expands(path):
    ab, cells, _ = p2p.sweep.prepare(path)
    assert len(cells) == len({c.name for c in cells}) > 1
    assert Path(ab["base"]["ckpt"]).exists()
    assert set(ab["rows"]) | set(ab["cols"]) == set(ab["grid"])


@pytest.mark.parametrize("text, message", [
    (BASE + "grid: {cross_step: [0.2, 0.8]}\n", r"abl.yaml: grid: unknown knob 'cross_step'; did you mean 'cross_steps'"),
    (BASE + "grid: {cross_steps: [0.2]}\nthreshold: 0.3\n", r"abl.yaml: unknown key 'threshold'"),
    (BASE + "grid: {steps: [2, ten]}\n", r"abl.yaml: grid: 'steps' value 'ten' has the wrong type \(str\); it takes int"),
    (BASE + "seed: '8888'\ngrid: {steps: [2]}\n", r"abl.yaml: 'seed' has the wrong type \(str: '8888'\); it takes int"),
    (BASE + "grid: {cross_steps: 0.5}\n", r"'cross_steps' must be a non-empty list"),
    (BASE, r"'grid' is missing or empty"),
    (BASE + "grid: {edit: [a cat riding a car, a cat riding a horse]}\nblend: [bicycle, car]\n",
     r"abl.yaml \(cell 001_edit-horse: edit='a cat riding a horse'\): 'blend': word 'car' is not in prompt 'a cat riding a horse'"),
    (BASE + "grid: {edit: [a cat riding a car, a small cat riding a car]}\n", r"'edits':.*same number of words"),
    (BASE + "mode: reweight\ngrid: {weight.smiling: [1.0, 2.0]}\n", r"'weight': .*'smiling' is not in prompt"),
    (BASE + "grid: {cross_steps.lion: [0.2]}\n", r"'cross_steps': .*'lion'.*in none of the edited prompts"),
    (BASE + "grid: {self_steps: [1.5]}\n", r"'self_steps': .*0 <= start <= end <= 1"),
    (BASE + "grid: {steps: [2]}\nrows: [seed]\n", r"'rows' names 'seed', which is not a grid knob"),
    (BASE + "metrics: {iou_treshold: 0.5}\ngrid: {steps: [2]}\n", r"metrics: unknown key 'iou_treshold'"),
])
def test_bad_ablation_fails_before_any_model(tmp_path, capsys, no_model, text, message):
    cfg = write(tmp_path, text)
    out = tmp_path / "run"
    assert p2p.cli.main(["sweep", str(cfg), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "abl.yaml" in err
    import re
    assert re.search(message, err), err
    assert not out.exists()


def test_bad_edit_config_fails_before_the_model(tmp_path, capsys, no_model):
    cfg = write(tmp_path, BASE + "blend: [bicycle, tiger]\n", "edit.yaml")
    assert p2p.cli.main(["edit", "--config", str(cfg), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "edit.yaml: 'blend': word 'tiger' is not in prompt" in err and "source first" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit.yaml"]


def test_unknown_edit_key_suggests_the_fix(tmp_path):
    cfg = write(tmp_path, BASE + "guidence: 5\n", "edit.yaml")
    with pytest.raises(ValueError, match=r"edit.yaml: unknown key 'guidence'; did you mean 'guidance'"):
        load_edit_config(cfg)


def test_missing_checkpoint_named(tmp_path, no_model):
    cfg = write(tmp_path, BASE.split("\n", 1)[1] + "grid: {steps: [2]}\n")
    with pytest.raises(ValueError, match="missing 'ckpt'"):
        p2p.sweep.prepare(cfg)


def test_base_file_and_overrides(tmp_path):
    cfg = write(tmp_path, f"base: {ROOT / 'configs/edits/smiling_bunny_reweight.yaml'}\nckpt: {CKPT}\n"
                          "grid: {seed: [1, 2], weight.smiling: [1.0, 3.0]}\n")
    ab = load_ablation(cfg, {"steps": 3})
    assert ab["base"]["mode"] == "reweight" and ab["base"]["steps"] == 3
    assert ab["rows"] == ["seed"] and ab["cols"] == ["weight.smiling"]  # the source knob goes on the rows
    _, cells, _ = p2p.sweep.prepare(cfg, {"steps": 3})
    assert [c.settings["weight"] for c in cells] == [{"smiling": 1.0}, {"smiling": 3.0}] * 2
    batches = p2p.sweep.plan_batches(cells, 8)
    assert [len(b) for b in batches] == [2, 2]                          # c is per prompt: one batch per seed
    assert p2p.sweep.batch_settings(batches[0])["weight"] == {"smiling": [1.0, 3.0]}


def test_every_spec_knob_is_a_config_key(tmp_path):
    cfg = write(tmp_path, BASE + "blend: [bicycle, car]\nblend_start: 0.2\nblend_th: [0.3, 0.5]\n"
                                 "blend_substruct: [cat, cat]\nreference_tail: true\nblend_level: 0\n", "edit.yaml")
    s = dict(p2p.config.DEFAULTS) | load_edit_config(cfg)
    spec, blend = p2p.config.check_settings(s, cfg)
    assert spec.reference_tail and blend.start_blend == 0.2 and blend.th == (0.3, 0.5) and blend.level == 0
    assert blend.substruct_words == ("cat", "cat")
    s["blend_substruct"] = ["cat", "dog"]
    with pytest.raises(ValueError, match=r"edit.yaml: 'blend_substruct': word 'dog' is not in prompt"):
        p2p.config.check_settings(s, cfg)
