"""Experiment configs: the schema rejects bad keys, types and words before any model is loaded."""
from pathlib import Path

import pytest

import p2p.cli
import p2p.config
import p2p.sweep
from p2p.config import load_ablation, load_edit_config
from weights_tools.registry import resolve_checkpoint

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
num_steps: 2
"""


@pytest.mark.parametrize("path", ABLATIONS, ids=[p.stem for p in ABLATIONS])
def test_every_ablation_config_expands(path):
    ab, cells, _ = p2p.sweep.prepare(path)
    assert len(cells) == len({c.name for c in cells}) > 1
    assert resolve_checkpoint(ab["base"]["ckpt"]).exists()
    assert set(ab["rows"]) | set(ab["cols"]) == set(ab["grid"])


@pytest.mark.parametrize("text, message", [
    (BASE + "grid: {cross_step: [0.2, 0.8]}\n", r"abl.yaml: grid: unknown knob 'cross_step'; did you mean 'cross_replace_steps'"),
    (BASE + "grid: {cross_replace_steps: [0.2]}\nthreshold: 0.3\n", r"abl.yaml: unknown key 'threshold'"),
    (BASE + "grid: {num_steps: [2, ten]}\n", r"abl.yaml: grid: 'num_steps' value 'ten' has the wrong type \(str\); it takes int"),
    (BASE + "seed: '8888'\ngrid: {num_steps: [2]}\n", r"abl.yaml: 'seed' has the wrong type \(str: '8888'\); it takes int"),
    (BASE + "grid: {cross_replace_steps: 0.5}\n", r"'cross_replace_steps' must be a non-empty list"),
    (BASE, r"'grid' is missing or empty"),
    (BASE + "grid: {edit: [a cat riding a car, a cat riding a horse]}\nlocal_blend: {words: [bicycle, car]}\n",
     r"abl.yaml \(cell 001_edit-horse: edit='a cat riding a horse'\): 'local_blend.words': word 'car' is not in prompt 'a cat riding a horse'"),
    (BASE + "grid: {edit: [a cat riding a car, a small cat riding a car]}\n", r"'edits':.*same number of words"),
    (BASE + "mode: reweight\ngrid: {equalizer.smiling: [1.0, 2.0]}\n", r"'equalizer': .*'smiling' is not in prompt"),
    (BASE + "grid: {cross_replace_steps.lion: [0.2]}\n", r"'cross_replace_steps': .*'lion'.*in none of the edited prompts"),
    (BASE + "grid: {self_replace_steps: [1.5]}\n", r"'self_replace_steps': .*0 <= start <= end <= 1"),
    (BASE + "grid: {num_steps: [2]}\nrows: [seed]\n", r"'rows' names 'seed', which is not a grid knob"),
    (BASE + "metrics: {iou_treshold: 0.5}\ngrid: {num_steps: [2]}\n", r"metrics: unknown key 'iou_treshold'"),
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
    cfg = write(tmp_path, BASE + "local_blend: {words: [bicycle, tiger]}\n", "edit.yaml")
    assert p2p.cli.main(["edit", "--config", str(cfg), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "edit.yaml: 'local_blend.words': word 'tiger' is not in prompt" in err and "source first" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit.yaml"]


def test_unknown_edit_key_suggests_the_fix(tmp_path):
    cfg = write(tmp_path, BASE + "guidence: 5\n", "edit.yaml")
    with pytest.raises(ValueError, match=r"edit.yaml: unknown key 'guidence'; did you mean 'guidance_scale'"):
        load_edit_config(cfg)


def test_missing_checkpoint_named(tmp_path, no_model):
    cfg = write(tmp_path, BASE.split("\n", 1)[1] + "grid: {num_steps: [2]}\n")
    with pytest.raises(ValueError, match="missing 'ckpt'"):
        p2p.sweep.prepare(cfg)


def test_base_file_and_overrides(tmp_path):
    cfg = write(tmp_path, f"base: {ROOT / 'configs/edits/smiling_bunny_reweight.yaml'}\nckpt: {CKPT}\n"
                          "grid: {seed: [1, 2], equalizer.smiling: [1.0, 3.0]}\n")
    ab = load_ablation(cfg, {"num_steps": 3})
    assert ab["base"]["mode"] == "reweight" and ab["base"]["num_steps"] == 3
    assert ab["rows"] == ["seed"] and ab["cols"] == ["equalizer.smiling"]  # the source knob goes on the rows
    _, cells, _ = p2p.sweep.prepare(cfg, {"num_steps": 3})
    assert [c.settings["equalizer"] for c in cells] == [{"smiling": 1.0}, {"smiling": 3.0}] * 2
    batches = p2p.sweep.plan_batches(cells, 8)
    assert [len(b) for b in batches] == [2, 2]                          # c is per prompt: one batch per seed
    assert p2p.sweep.batch_settings(batches[0])["equalizer"] == {"smiling": [1.0, 3.0]}


def test_every_spec_knob_is_a_config_key(tmp_path):
    cfg = write(tmp_path, BASE + "local_blend: {words: [bicycle, car], start_blend: 0.2, th: [0.3, 0.5],\n"
                                 "  substruct_words: [cat, cat], level: 0}\nreference_tail: true\n", "edit.yaml")
    s = p2p.config.to_dict(load_edit_config(cfg))
    spec, blend = p2p.config.check_settings(s, cfg)
    assert spec.reference_tail and blend.start_blend == 0.2 and blend.th == (0.3, 0.5) and blend.level == 0
    assert blend.substruct_words == ("cat", "cat")
    s["local_blend"]["substruct_words"] = ["cat", "dog"]
    with pytest.raises(ValueError, match=r"edit.yaml: 'local_blend.substruct_words': word 'dog' is not in prompt"):
        p2p.config.check_settings(s, cfg)


EDITS = sorted((ROOT / "configs" / "edits").glob("*.yaml"))


@pytest.mark.parametrize("path", EDITS, ids=[p.stem for p in EDITS])
def test_every_edit_config_loads_and_round_trips(path):
    cfg = load_edit_config(path)
    assert isinstance(cfg, p2p.config.EditConfig) and cfg.seed == 8888   # their pictures keep their seed
    assert p2p.config.edit_config(p2p.config.to_dict(cfg)) == cfg
    cfg.check(path)


@pytest.mark.parametrize("key, new", [("steps", "num_steps"), ("guidance", "guidance_scale"),
                                      ("cross_steps", "cross_replace_steps"), ("self_steps", "self_replace_steps"),
                                      ("self_max_res", "self_replace_max_res"), ("weight", "equalizer"),
                                      ("blend", "local_blend.words"), ("blend_threshold", "local_blend.threshold"),
                                      ("blend_level", "local_blend.level")])
def test_an_old_key_names_its_new_name(tmp_path, key, new):
    cfg = write(tmp_path, f"prompt: a cat\nedits: [a dog]\n{key}: 1\n", "edit.yaml")
    with pytest.raises(ValueError, match=rf"edit.yaml: key '{key}' is now called '{new}'"):
        load_edit_config(cfg)


@pytest.mark.parametrize("knob, new", [("weight.smiling", "equalizer.smiling"), ("cross_steps", "cross_replace_steps"),
                                       ("blend_threshold", "local_blend.threshold"), ("steps", "num_steps")])
def test_an_old_grid_knob_names_its_new_name(tmp_path, knob, new):
    cfg = write(tmp_path, BASE + f"grid: {{{knob}: [1.0]}}\n")
    with pytest.raises(ValueError, match=rf"abl.yaml: grid: knob '{knob}' is now called '{new}'.*rename it"):
        load_ablation(cfg)


def test_one_set_of_defaults_for_the_api_the_files_and_the_command_line():
    import inspect

    from p2p import edit, generate, invert
    from p2p.config import EditConfig, GenerateConfig, InvertConfig

    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}
    g, e, v = defaults(generate), defaults(edit), defaults(invert)
    # None: the model's own (a UNet model's: the config's; an MM-DiT model's: docs/mmdit-p2p.md)
    own = {"num_steps", "guidance_scale", "method"}
    for k in ("seed", "num_steps", "guidance_scale", "steps_offset", "height", "width"):
        assert g[k] == getattr(GenerateConfig(), k) or (k in own and g[k] is None), k
    assert e["seed"] == EditConfig().seed == GenerateConfig().seed == 0
    for k in ("method", "num_steps", "guidance_scale", "num_inner_steps", "early_stop_epsilon", "steps_offset",
              "offsets", "height", "width"):
        assert v[k] == getattr(InvertConfig(), k) or (k in own and v[k] is None), k
    cfg = EditConfig()
    spec, _ = EditConfig(prompt="a", edits=("b",)).build()
    assert (cfg.cross_replace_steps, cfg.self_replace_steps, cfg.self_replace_max_res) == (
        spec.cross_replace_steps, spec.self_replace_steps, spec.self_replace_max_res)
    assert p2p.config.DEFAULTS == p2p.config.to_dict(cfg)
    assert set(p2p.config.EDIT_KEYS) == {f.name for f in __import__("dataclasses").fields(EditConfig)}
    # the command line: a flag left out is None, so the dataclass default applies
    args = p2p.cli.parser().parse_args(["edit", "--prompt", "a", "--edit", "b", "-o", "x.png"])
    assert p2p.cli.edit_config(args) == EditConfig(prompt="a", edits=("b",))
    args = p2p.cli.parser().parse_args(["generate", "--prompt", "a", "-o", "x.png"])
    assert p2p.cli.given(args, GenerateConfig) == {"prompts": ("a",)}
    args = p2p.cli.parser().parse_args(["invert", "--ckpt", "c", "--image", "i", "--prompt", "a", "-o", "x"])
    assert p2p.cli.given(args, InvertConfig) == {}


def test_flags_override_the_file_and_parse_into_the_config(tmp_path):
    cfg = ROOT / "configs" / "edits" / "squirrel_lion_wordsteps_blend.yaml"
    args = p2p.cli.parser().parse_args(["edit", "--config", str(cfg), "--steps", "3", "--guidance", "5",
                                        "--cross-steps", "1.0", "lion=0.2", "--self-steps", "0.1", "0.5",
                                        "--weight", "lion=2,1", "--blend-threshold", "0.6", "-o", "x.png"])
    c = p2p.cli.edit_config(args)
    assert (c.num_steps, c.guidance_scale, c.seed) == (3, 5.0, 8888)
    assert c.cross_replace_steps == {"default_": 1.0, "lion": 0.2} and c.self_replace_steps == (0.1, 0.5)
    assert c.equalizer == {"lion": [2.0, 1.0]}
    assert c.local_blend.words == ("squirrel", "lion") and c.local_blend.threshold == 0.6
    args = p2p.cli.parser().parse_args(["edit", "--prompt", "a", "--edit", "b", "--blend-level", "0", "-o", "x"])
    with pytest.raises(ValueError, match="need --blend"):
        p2p.cli.edit_config(args)
