""".ckpt files: layouts real checkpoints use, and the restricted unpickler (weights_tools)."""
import collections
import os

import pytest
import torch
from safetensors.torch import load_file

from models import PREFIXES
from weights_tools import CheckpointError, inspect_checkpoint, load_checkpoint
from weights_tools.layout import OLD_CLIP_PREFIX, SCHEDULE_KEYS
from weights_tools.layouts import POSITION_IDS

from conftest import GOLDEN_CKPT


class ModelCheckpointLike:
    """Stands in for pytorch_lightning's ModelCheckpoint object in `callbacks` (weights_only refuses it)."""

    def __init__(self):
        self.monitor, self.best_model_score = "val/loss", torch.tensor(0.5)


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN_CKPT))


@pytest.fixture(scope="module")
def reference():
    sd = load_checkpoint(GOLDEN_CKPT)
    return {PREFIXES[p] + k: v for p in PREFIXES for k, v in getattr(sd, p).state_dict().items()}


def lightning_like(golden):
    """A training checkpoint: EMA copies, schedule buffers, float position_ids, old CLIP prefix,
    Lightning metadata with a callback object, all under `state_dict`."""
    state = collections.OrderedDict()
    for k, v in golden.items():
        if k == POSITION_IDS:
            v = v.float() + 0.9999  # merge tools' broken float position_ids: must never be read
        state[k.replace(PREFIXES["text_encoder"], OLD_CLIP_PREFIX)] = v
        if k.startswith(PREFIXES["unet"]):
            state["model_ema." + k[len("model."):].replace(".", "")] = torch.zeros_like(v)
    state["model_ema.decay"], state["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(10)
    for k in SCHEDULE_KEYS:
        state[k] = torch.linspace(0, 1, 1000)
    return {"epoch": 3, "global_step": 470000, "pytorch-lightning_version": "1.4.2", "state_dict": state,
            "callbacks": {"ModelCheckpoint": ModelCheckpointLike()}, "optimizer_states": [{"lr": 1e-4}]}


def assert_same(sd, reference):
    got = {PREFIXES[p] + k: v for p in PREFIXES for k, v in getattr(sd, p).state_dict().items()}
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in got)


def test_ckpt_nested_state_dict(tmp_path, golden, reference):
    torch.save({"state_dict": golden, "global_step": 1}, tmp_path / "a.ckpt")
    assert_same(load_checkpoint(tmp_path / "a.ckpt", config="tiny"), reference)


def test_ckpt_flat_fp16(tmp_path, golden, reference):
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in golden.items()}, tmp_path / "b.ckpt")
    sd = load_checkpoint(tmp_path / "b.ckpt", config="tiny", dtype=torch.float32)
    assert sd.dtype == torch.float32
    half = {k: v.half().float() for k, v in reference.items()}
    assert_same(sd, half)


def test_ckpt_lightning_training_layout(tmp_path, golden, reference):
    path = tmp_path / "train.ckpt"
    torch.save(lightning_like(golden), path)
    with pytest.raises(Exception):  # what users hit with torch's own safe mode
        torch.load(path, weights_only=True)
    assert_same(load_checkpoint(path, config="tiny"), reference)
    info = inspect_checkpoint(path)
    assert info["variant"] == "SD v1" and info["format"] == "ckpt (weights under 'state_dict')"
    assert info["parts"]["ema"]["tensors"] == 492 + 2 and info["parts"]["schedule"]["tensors"] == len(SCHEDULE_KEYS)
    assert any("ModelCheckpointLike" in p for p in info["placeholders"])
    assert info["metadata"]["global_step"] == "470000"


def test_ckpt_views_and_shared_storage(tmp_path, golden, reference):
    """torch.save keeps views of one storage as offsets into it; they must come back right."""
    key = PREFIXES["unet"] + "out.2.weight"
    big = torch.cat([torch.randn(5), golden[key].flatten()])
    state = dict(golden)
    state[key] = big[5:].view_as(golden[key])
    torch.save(state, tmp_path / "v.ckpt")
    assert_same(load_checkpoint(tmp_path / "v.ckpt", config="tiny"), reference)


class Exploit:
    def __init__(self, marker, how):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch {self.marker}",)
        if self.how == "exec":
            return exec, (f"open({self.marker!r}, 'w').close()",)
        if self.how == "eval":
            return eval, (f"open({self.marker!r}, 'w')",)
        if self.how == "open":
            return open, (self.marker, "w")
        import subprocess
        return subprocess.call, (["touch", self.marker],)


@pytest.mark.parametrize("how", ["system", "exec", "eval", "open", "subprocess"])
def test_malicious_pickle_refused(tmp_path, golden, how):
    marker = tmp_path / f"pwned-{how}"
    state = {k: v for k, v in list(golden.items())[:3]}
    torch.save({"state_dict": state, "callbacks": Exploit(marker, how)}, tmp_path / "evil.ckpt")
    for call in (load_checkpoint, inspect_checkpoint):
        with pytest.raises(CheckpointError, match=r"refused to load: the pickle asks for `.*`, which could run code"):
            call(tmp_path / "evil.ckpt")
    assert not marker.exists()


def touch(path):
    open(path, "w").close()


class CallsTouch:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return touch, (self.marker,)


def test_unknown_callable_never_called(tmp_path, golden):
    """A global outside both the allow-list and the deny-list (here this module's `touch`) becomes an
    inert placeholder: the file still loads, and the function is never called."""
    marker = tmp_path / "called"
    torch.save({"state_dict": golden, "hparams": CallsTouch(marker)}, tmp_path / "odd.ckpt")
    load_checkpoint(tmp_path / "odd.ckpt", config="tiny")
    info = inspect_checkpoint(tmp_path / "odd.ckpt")
    assert info["placeholders"] == ["test_weights_ckpt.touch"]
    assert "placeholder for test_weights_ckpt.touch" in info["metadata"]["hparams"]
    assert not marker.exists()


def test_convert_ckpt_fp16_pruned(tmp_path, golden, reference):
    from weights_tools.convert import main as convert_main

    torch.save(lightning_like(golden), tmp_path / "train.ckpt")
    out = tmp_path / "pruned.safetensors"
    assert convert_main([str(tmp_path / "train.ckpt"), str(out), "--fp16", "--config", "tiny"]) == 0
    pruned = load_file(str(out))
    assert pruned.keys() == golden.keys()  # EMA, schedule, Lightning metadata dropped; new CLIP prefix
    assert pruned[POSITION_IDS].dtype == torch.int64 and torch.equal(pruned[POSITION_IDS], golden[POSITION_IDS])
    assert {v.dtype for k, v in pruned.items() if k != POSITION_IDS} == {torch.float16}
    info = inspect_checkpoint(out)
    assert info["loadable"] and info["config_source"] == "the file's ldm_config metadata"
    sd = load_checkpoint(out)  # config now travels in the file
    assert_same(sd, {k: v.half().float() for k, v in reference.items()})
    assert list(tmp_path.glob(".*tmp")) == []


def test_convert_cli_error(tmp_path, capsys):
    from weights_tools.convert import main as convert_main

    (tmp_path / "junk.ckpt").write_text("hello")
    assert convert_main([str(tmp_path / "junk.ckpt"), str(tmp_path / "o.safetensors")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err and not (tmp_path / "o.safetensors").exists()
