"""Each setting declared once (p2p.settings.SETTINGS): the configs, the YAML schema, the range checks,
the command line, the sweep's knobs and the API's keywords all follow from the table; the command
line says everything a file can; a researcher's own edit spec works from a file, the command line
and a sweep by its import path."""
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

import p2p
import p2p.cli
import p2p.config
import p2p.settings
import p2p.sweep
from p2p.config import EditConfig, GenerateConfig, InvertConfig, load_edit_config
from p2p.settings import SETTINGS, Setting, check_values, config_settings, setting

from custom_edits import WeightedMix

ROOT = Path(__file__).parent.parent
CKPT = ROOT / "tests" / "fixtures" / "golden" / "tiny-sd-a.safetensors"
CONFIGS = {"GenerateConfig": GenerateConfig, "EditConfig": EditConfig, "InvertConfig": InvertConfig}
COMMANDS = {"generate": ["--prompt", "a"], "edit": ["--prompt", "a", "--edit", "b"],
            "invert": ["--ckpt", "c", "--image", "i", "--prompt", "a"]}


def flags_of(command: str) -> dict:
    """dest -> option strings of a subcommand's flags."""
    sub = next(a for a in p2p.cli.parser()._actions if isinstance(a, p2p.cli.argparse._SubParsersAction))
    return {a.dest: a.option_strings for a in sub.choices[command]._actions}


# ------------------------------------------------------------------------------- one table
@pytest.mark.parametrize("name", CONFIGS)
def test_a_config_is_its_declarations(name):
    fields = dataclasses.fields(CONFIGS[name])
    assert [(f.name, f.default) for f in fields] == [(s.name, s.default) for s in config_settings(name)]


def test_the_schema_ranges_and_sweep_knobs_are_the_declarations():
    edit = config_settings("EditConfig")
    assert p2p.config.EDIT_KEYS == {s.name: s.types for s in edit}
    assert p2p.config.BLEND_KEYS == {s.key: s.types for s in SETTINGS if s.name.startswith("local_blend.")}
    assert {f.name for f in dataclasses.fields(p2p.LocalBlend)} == set(p2p.config.BLEND_KEYS)
    assert p2p.config.RENAMED == {old: s.name for s in SETTINGS for old in s.old}
    assert p2p.config.RANGES == {s.name: s.range for s in SETTINGS if s.range and s.entries is None}
    assert set(p2p.config.SOURCE_KNOBS) == {s.name for s in edit if s.source}
    for s in edit:                                       # every knob a grid may vary, with the declared types
        if s.sweep:
            assert p2p.config.knob_type(s.name, "x") == s.types
        else:
            with pytest.raises(ValueError, match="unknown knob"):
                p2p.config.knob_type(s.name, "x")
        if s.entries:
            assert p2p.config.knob_type(f"{s.name}.key", "x") == s.entries
    for s in SETTINGS:
        if s.name.startswith("local_blend."):
            assert p2p.config.knob_type(s.name, "x") == s.types
    overrides = {a.dest for a in p2p.sweep.add_arguments(p2p.cli.argparse.ArgumentParser())._actions}
    assert {s.name for s in SETTINGS if s.group in ("model", "seed", "sampling")} <= overrides


@pytest.mark.parametrize("command, config", [("generate", "GenerateConfig"), ("edit", "EditConfig"),
                                             ("invert", "InvertConfig")])
def test_every_setting_of_a_command_is_a_flag(command, config):
    flags = flags_of(command)
    for s in config_settings(config) + [s for s in SETTINGS if s.group == "local_blend" and command == "edit"]:
        if s.name == "local_blend":
            continue                                     # a mapping: its fields are flags
        if (command, s.name) == ("invert", "ckpt"):
            continue
        assert flags.get(s.name) == [s.flag] or s.types == (bool,) and s.flag in flags[s.name], (command, s.name)


def test_a_new_declaration_reaches_the_config_the_command_line_and_the_checks(monkeypatch):
    eta = Setting("eta", 0.0, (float, int), "DDIM's eta", "--eta", "sampling", range=(0, 1), old=("ddim_eta",))
    monkeypatch.setattr(p2p.settings, "SETTINGS", SETTINGS + (eta,))
    cls = p2p.config.config_class("EditConfig", "with eta", (p2p.config.EditMethods,))
    assert cls().eta == 0.0 and "eta" in p2p.settings.keywords("EditConfig")
    args = p2p.cli.parser().parse_args(["edit", *COMMANDS["edit"], "--eta", "0.5", "-o", "x.png"])
    assert p2p.cli.given(args, cls)["eta"] == 0.5
    with pytest.raises(ValueError, match=r"here: 'eta' must be a finite number from 0 to 1, got 2"):
        check_values(cls(eta=2), "here")
    with pytest.raises(TypeError, match="'ddim_eta' is now called 'eta'"):
        cls(ddim_eta=0.1)
    assert "| `eta` | `--eta` | `0.0` | float or int, from 0 to 1 |" in p2p.settings.markdown_table()


def test_the_api_keywords_and_the_declarations_agree_both_ways():
    not_settings = {"generate": {"sd", "prompts", "latents", "progress", "low_memory", "offload"},
                    "edit": {"sd", "prompts", "spec", "local_blend", "latents", "store", "fast", "progress",
                             "inversion", "low_memory", "offload", "allow_other_model"},
                    "invert": {"sd", "image", "prompt", "progress", "low_memory"}}
    # None means: edit(), an inversion's sampling settings; every function, an MM-DiT model's own steps and
    # guidance (invert(): its method too); else the declared default (their docstrings)
    from_model = {"generate": {"num_steps", "guidance_scale"}, "invert": {"num_steps", "guidance_scale", "method"},
                  "edit": {"num_steps", "guidance_scale", "steps_offset", "sampler"}}
    for fn, config in ((p2p.generate, "GenerateConfig"), (p2p.edit, "EditConfig"), (p2p.invert, "InvertConfig")):
        params = inspect.signature(fn).parameters
        assert set(params) - not_settings[fn.__name__] == set(p2p.settings.keywords(config)), fn.__name__
        for name in p2p.settings.keywords(config):
            if not (name in from_model[fn.__name__] and params[name].default is None):
                assert params[name].default == setting(name).default, (fn.__name__, name)
    spec_fields = {f.name for cls in (p2p.Replace, p2p.Refine, p2p.Reweight) for f in dataclasses.fields(cls)}
    assert spec_fields - {"base"} == {s.name for s in SETTINGS if s.group == "spec"}
    for cls in (p2p.Replace, p2p.Refine):
        for f in dataclasses.fields(cls):
            assert f.default == setting(f.name).default, f.name


@pytest.mark.parametrize("call, message", [
    (lambda: p2p.generate(None, "a", steps=2), r"generate\(\): keyword 'steps' is now called 'num_steps'"),
    (lambda: p2p.edit(None, ["a", "b"], guidance=5), r"edit\(\): keyword 'guidance' is now called 'guidance_scale'"),
    (lambda: p2p.edit(None, ["a", "b"], cross_steps=0.5), r"'cross_replace_steps'.*give it to the edit spec"),
    (lambda: p2p.edit(None, ["a", "b"], blend_threshold=0.5), r"'local_blend.threshold'.*local_blend=LocalBlend"),
    (lambda: p2p.invert(None, None, "a", steps=2), r"invert\(\): keyword 'steps' is now called 'num_steps'"),
    (lambda: EditConfig(weight={"a": 2}), r"EditConfig\(\): keyword 'weight' is now called 'equalizer'"),
])
def test_an_old_keyword_names_its_new_name(call, message):
    with pytest.raises(TypeError, match=message):
        call()


def test_declared_ranges_and_choices():
    check_values(EditConfig(self_replace_max_res=None), "x")              # None: relative to the model
    with pytest.raises(ValueError, match=r"x: 'self_replace_max_res' must be a finite number at least 1, got 0"):
        check_values(EditConfig(self_replace_max_res=0), "x")
    with pytest.raises(ValueError, match=r"x: 'method' must be one of null-text, ddim"):
        check_values(InvertConfig(method="dmd"), "x")
    with pytest.raises(ValueError, match=r"x: 'num_inner_steps' must be a finite number from 0 to 1000, got -1"):
        check_values(InvertConfig(num_inner_steps=-1), "x")
    with pytest.raises(ValueError, match=r"'sampler' must be one of " + ", ".join(p2p.settings.SAMPLERS)):
        check_values(GenerateConfig(sampler="euler"), "x")


# ------------------------------------------------------------------------------- the command line = a file
EVERYTHING = f"""
num_steps: 3
guidance_scale: 5
steps_offset: 0
height: 64
width: 96
sampler: ddim
seed: 8888
ckpt: {CKPT}
prompt: a cat riding a bicycle
edits: [a cat riding a car, a dog riding a car]
mode: custom_edits:WeightedMix
spec_args: {{weight: 0.25}}
cross_replace_steps: {{default_: 0.8, car: [0.1, 0.4]}}
self_replace_steps: [0.1, 0.5]
self_replace_max_res: 32
equalizer: {{car: [2.0, 1.0], cat: 3}}
reference_tail: false
negative_prompt: ugly, blurry
feature_steps: 0.7
attention_steps: 0.4
source_text: prompt
local_blend: {{words: [bicycle, [car, dog], 5], threshold: 0.4, start_blend: 0.2, substruct_words: [cat, cat, dog],
              th: [0.3, 0.5], level: 1, pool: false, end_blend: 0.9, blocks: [1, 2]}}
show_attention: true
description: everything at once
source_row: inputs
start_step: null
start_layer: null
replace_steps: 0.2
projection: qiki
replace_blocks: null
mask_words: null
mask_threshold: null
"""
EVERYTHING_FLAGS = ["--steps", "3", "--guidance", "5", "--steps-offset", "0", "--height", "64", "--width", "96",
                    "--sampler", "ddim", "--seed", "8888", "--ckpt", str(CKPT), "--prompt", "a cat riding a bicycle",
                    "--edit", "a cat riding a car", "--edit", "a dog riding a car",
                    "--mode", "custom_edits:WeightedMix",
                    "--spec-arg", "weight=0.25", "--cross-steps", "0.8", "car=0.1,0.4", "--self-steps", "0.1", "0.5",
                    "--self-max-res", "32", "--weight", "car=2,1", "--weight", "cat=3", "--no-reference-tail",
                    "--negative-prompt", "ugly, blurry", "--feature-steps", "0.7", "--attention-steps", "0.4",
                    "--source-text", "prompt",
                    "--blend", "bicycle", "car,dog", "5", "--blend-threshold", "0.4", "--blend-start", "0.2",
                    "--blend-substruct", "cat", "cat", "dog", "--blend-th", "0.3", "0.5", "--blend-level", "1",
                    "--blend-end", "0.9", "--blend-blocks", "1", "2",
                    "--no-blend-pool", "--show-attention", "--description", "everything at once",
                    "--source-row", "inputs", "--replace-steps", "0.2", "--projection", "qiki"]


def test_the_command_line_says_everything_a_file_can(tmp_path):
    path = tmp_path / "everything.yaml"
    path.write_text(EVERYTHING)
    data = p2p.config.read_yaml(path)
    leaves = {s.name for s in config_settings("EditConfig") if s.name != "local_blend"} | {
        s.name for s in SETTINGS if s.group == "local_blend"}
    assert set(data) | {f"local_blend.{k}" for k in data["local_blend"]} == leaves | {"local_blend"}  # every key
    from_file = load_edit_config(path)
    from_flags = p2p.cli.edit_config(p2p.cli.parser().parse_args(["edit", *EVERYTHING_FLAGS, "-o", "x.png"]))
    assert from_flags == from_file
    assert from_file.build()[0] == p2p.Reweight(equalizer={"car": [2.0, 1.0], "cat": 3}, base=WeightedMix(
        weight=0.25, cross_replace_steps={"default_": 0.8, "car": (0.1, 0.4)}, self_replace_steps=(0.1, 0.5),
        self_replace_max_res=32), cross_replace_steps={"default_": 0.8, "car": (0.1, 0.4)},
        self_replace_steps=(0.1, 0.5), self_replace_max_res=32)
    # and a flag over the file replaces that key's value alone
    over = p2p.cli.edit_config(p2p.cli.parser().parse_args(["edit", "--config", str(path), "--spec-arg", "weight=1",
                                                            "--blend-pool", "-o", "x.png"]))
    assert over == dataclasses.replace(from_file, spec_args={"weight": 1},
                                       local_blend=dataclasses.replace(from_file.local_blend, pool=True))


# ------------------------------------------------------------------------------- your own spec by import path
def test_your_own_spec_from_a_file_the_command_line_and_the_api(tmp_path, tiny_sd, monkeypatch):
    path = tmp_path / "mix.yaml"
    path.write_text("prompt: a cat riding a bicycle\nedits: [a cat riding a car]\nmode: custom_edits:WeightedMix\n"
                    "spec_args: {weight: 0.3}\ncross_replace_steps: 0.6\nseed: 3\n")
    spec, blend = load_edit_config(path).check(path)
    assert spec == WeightedMix(weight=0.3, cross_replace_steps=0.6) and blend is None
    monkeypatch.setattr(p2p.cli, "load_model", lambda ckpt, dtype="float32", **options: tiny_sd)
    outs, real_edit = [], p2p.edit
    monkeypatch.setattr(p2p, "edit", lambda *a, **k: outs.append(real_edit(*a, **k)) or outs[-1])
    fast = ["--steps", "2", "--height", "32", "--width", "32"]
    assert p2p.cli.main(["edit", "--config", str(path), *fast, "-o", str(tmp_path / "file.png")]) == 0
    assert p2p.cli.main(["edit", "--prompt", "a cat riding a bicycle", "--edit", "a cat riding a car", "--seed", "3",
                         "--mode", "custom_edits:WeightedMix", "--spec-arg", "weight=0.3", "--cross-steps", "0.6",
                         *fast, "-o", str(tmp_path / "flags.png")]) == 0
    api = real_edit(tiny_sd, ["a cat riding a bicycle", "a cat riding a car"], spec, seed=3, num_steps=2, height=32,
                    width=32, progress=False)
    replace = real_edit(tiny_sd, ["a cat riding a bicycle", "a cat riding a car"], p2p.Replace(cross_replace_steps=0.6),
                        seed=3, num_steps=2, height=32, width=32, progress=False)
    assert (outs[0].latents == api.latents).all() and (outs[1].latents == api.latents).all()
    assert not (api.latents[1] == replace.latents[1]).all()             # the spec's own edit ran
    assert "WeightedMix(" in (tmp_path / "flags.png.json").read_text()


def test_your_own_spec_in_a_sweep(tmp_path):
    path = tmp_path / "abl.yaml"
    path.write_text(f"ckpt: {CKPT}\nprompt: a cat riding a bicycle\nedits: [a cat riding a car]\nnum_steps: 2\n"
                    "mode: custom_edits:WeightedMix\ngrid: {spec_args.weight: [0.0, 0.5, 1.0], seed: [1, 2]}\n")
    ab, cells, tok = p2p.sweep.prepare(path)
    assert ab["rows"] == ["seed"] and ab["cols"] == ["spec_args.weight"]
    assert [c.settings["spec_args"] for c in cells[:3]] == [{"weight": w} for w in (0.0, 0.5, 1.0)]
    batches = p2p.sweep.plan_batches(cells, 8)
    assert len(batches) == 6                                            # the weight is not per prompt
    specs = [p2p.sweep.plan.batch_edit(b, tok).spec for b in batches[:3]]
    assert specs == [WeightedMix(weight=w) for w in (0.0, 0.5, 1.0)]
    assert load_edit_config(_cell_yaml(tmp_path, cells[1])).build()[0] == WeightedMix(weight=0.5)  # reruns alone


def _cell_yaml(tmp_path, cell) -> Path:
    p = tmp_path / "cell.yaml"
    p.write_text(__import__("yaml").safe_dump(cell.settings))
    return p


@pytest.mark.parametrize("mode, args, message", [
    ("no_such_package.edits:Mix", None, r"'mode': mode 'no_such_package.edits:Mix': cannot import 'no_such_package."
                                        r"edits' .*put the folder that holds 'no_such_package' on PYTHONPATH"),
    ("custom_edits:Mixx", None, r"module 'custom_edits' has no 'Mixx'; the p2p.Edit subclasses it defines are "
                                r"\['WeightedMix'\]"),
    ("custom_edits:NotAnEdit", None, r"'NotAnEdit' is a class that does not subclass p2p.Edit; an edit spec is a "
                                     r"frozen dataclass subclassing p2p.Edit"),
    ("custom_edits:dataclass", None, r"'dataclass' is a function that does not subclass p2p.Edit"),
    ("custom_edits:WeightedMix", {"wieght": 0.3}, r"'spec_args': spec_args: WeightedMix \(custom_edits:WeightedMix\) "
                                                  r"has no field 'wieght'; did you mean 'weight'\? its own fields are"),
    ("replace", {"weight": 0.3}, r"'spec_args': spec_args are the fields of your own Edit subclass"),
    ("replac", None, r"mode must be replace, refine or reweight, or your own edit spec as module:Class"),
])
def test_a_bad_spec_path_is_named_with_its_fix(tmp_path, capsys, mode, args, message):
    cfg = EditConfig(prompt="a cat", edits=("a dog",), mode=mode, spec_args=args)
    with pytest.raises(ValueError, match=message):
        cfg.check("edit.yaml")
    argv = ["edit", "--prompt", "a cat", "--edit", "a dog", "--mode", mode, "-o", str(tmp_path / "x.png")]
    argv += [f"--spec-arg={k}={v}" for k, v in (args or {}).items()]
    assert p2p.cli.main(argv) == 2 and re.search(message, capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_spec_arg_flag_form():
    with pytest.raises(ValueError, match=r"--spec-arg takes FIELD=VALUE .*got 'weight'"):
        p2p.settings.parse_spec_args(["weight"])
    assert p2p.settings.parse_spec_args(["w=0.5", "heads=[0, 1]", "name=x"]) == {"w": 0.5, "heads": (0, 1),
                                                                                   "name": "x"}


# ------------------------------------------------------------------------------- the documentation
def test_the_settings_page_holds_the_declarations_table():
    text = (ROOT / "docs" / "settings.md").read_text()
    start, end = p2p.settings.TABLE_START, p2p.settings.TABLE_END
    assert start in text and end in text, "docs/settings.md lost its table markers"
    table = text.split(start, 1)[1].split(end, 1)[0]
    stale = "docs/settings.md is stale: rerun `p2p settings --write docs/settings.md`"
    assert table == p2p.settings.markdown_table(), stale


@pytest.mark.parametrize("flags, message", [
    (["--blend-threshold", "nan"], r"threshold'? must be a finite number from 0 to 1, got nan"),
    (["--blend-threshold", "2"], r"threshold'? must be a finite number from 0 to 1, got 2"),
    (["--blend-threshold", "inf"], r"threshold'? must be a finite number from 0 to 1, got inf"),
    (["--blend-th", "0.3", "-1"], r"th(\[1\])?'? must be a finite number from 0 to 1, got .*-1"),
    (["--blend-start", "1.5"], r"start_blend'? must be a finite number from 0 to 1, got 1.5"),
])
def test_a_blend_threshold_outside_0_1_is_refused_before_loading(tmp_path, capsys, flags, message):
    # nan / 2 / inf gave an empty mask: an "edit" equal to its source, exit 0
    rc = p2p.cli.main(["edit", "--ckpt", str(tmp_path / "not-read.safetensors"), "--prompt", "a cat",
                       "--edit", "a dog", "--blend", "cat", "dog", *flags, "-o", str(tmp_path / "x.png")])
    assert rc == 2 and re.search(message, capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fields", [{"threshold": float("nan")}, {"threshold": 2}, {"threshold": float("inf")},
                                    {"threshold": -0.1}, {"start_blend": 1.2}, {"th": (0.3, float("nan"))},
                                    {"threshold": True}])
def test_local_blend_refuses_a_threshold_outside_0_1_in_the_api_and_files(tmp_path, fields):
    key = next(iter(fields))
    with pytest.raises(ValueError, match=rf"LocalBlend {key}.* must be a finite number from 0 to 1"):
        p2p.LocalBlend(("cat", "dog"), **fields)
    path = tmp_path / "e.yaml"
    path.write_text(f"prompt: a cat\nedits: [a dog]\nlocal_blend: {{words: [cat, dog], {key}: {list(fields.values())[0]!r}}}\n"
                    .replace("nan", ".nan").replace("inf", ".inf").replace("(", "[").replace(")", "]"))
    with pytest.raises(ValueError, match=rf"{path}.*(must be a finite number from 0 to 1|has the wrong type)"):
        load_edit_config(path).check(path)
