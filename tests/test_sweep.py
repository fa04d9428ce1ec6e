"""`p2p sweep`: the grid runs on the tiny checkpoint, writes figure / CSV / JSON / cell configs, resumes."""
import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

import p2p
import p2p.cli
import p2p.sweep
from p2p.sweep.report import METRIC_COLUMNS, caption, csv_bytes
from p2p.cli import main
from weights_tools import load_checkpoint

# 4 cells in 2 batches (tau differs across batches; the edited prompt within one), with LocalBlend on
# word position 4 (squirrel / its swap) so the mask metrics are exercised.
ABLATION = """description: test sweep
ckpt: {ckpt}
prompt: A painting of a squirrel eating a burger
edits: [A painting of a lion eating a burger]
mode: replace
local_blend:
  words: [4, 4]
  threshold: 0.8            # random weights spread attention: a partial mask needs a high threshold
seed: 8888
num_steps: 2
height: 64
width: 64
grid:
  cross_replace_steps: [0.4, 0.8]
  edit: ["A painting of a lion eating a burger", "A painting of a cat eating a burger"]
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, golden_dir, tiny_sd):
    d = tmp_path_factory.mktemp("sweep")
    cfg = d / "abl.yaml"
    cfg.write_text(ABLATION.format(ckpt=golden_dir / "tiny-sd-a.safetensors"))
    out = d / "runs" / "abl"
    with pytest.MonkeyPatch.context() as mp:     # the CLI, with the session's model (loading it again is slow)
        mp.setattr(p2p.sweep.command, "load_checkpoint", lambda ckpt, device, dtype, **load: tiny_sd)
        assert main(["sweep", str(cfg), "-o", str(out), "--no-progress"]) == 0
    return cfg, out


def counting(monkeypatch):
    done = []
    real = p2p.sweep.run.run_batch

    def wrapped(sd, cells, *a, **k):
        done.extend(c.name for c in cells)
        return real(sd, cells, *a, **k)
    monkeypatch.setattr(p2p.sweep.run, "run_batch", wrapped)
    return done


def test_outputs(run):
    cfg, out = run
    names = sorted(p.stem for p in (out / "cells").glob("*.yaml"))
    assert names == ["000_cross_replace_steps-0.4_edit-lion", "001_cross_replace_steps-0.4_edit-cat",
                     "002_cross_replace_steps-0.8_edit-lion", "003_cross_replace_steps-0.8_edit-cat"]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["cell"] for r in rows] == names and rows[0]["cross_replace_steps"] == "0.4"
    record = json.loads((out / "metrics.json").read_text())
    assert record["rows"] == ["cross_replace_steps"] and record["cols"] == ["edit"] and len(record["cells"]) == 4
    for r in record["cells"]:
        m = r["metrics"]
        assert m["batch_cells"] == 2                           # the two edited prompts of a tau shared a batch
        assert 0 < m["mask_fraction"] < 1 and 0 <= m["change_in_mask"] <= 1
        assert -1 <= m["ssim_bg"] <= 1 and (m["psnr_bg"] == "inf" or m["psnr_bg"] > 0)
        assert 0 <= m["attention_iou"] <= 1 and m["iou_words"] == [4, 4]
        assert m["latent_l2"] > 0 and m["seconds"] > 0 and m["maxrss_mib"] > 0
    fig = Image.open(out / "figure.png")
    assert fig.size[0] > 3 * 128 and fig.size[1] > 2 * 128   # 2 rows x (source + 2 columns) of 128 px tiles


def test_a_cell_config_reruns_alone(run, tiny_sd, tmp_path, monkeypatch):
    _, out = run
    cell = out / "cells" / "001_cross_replace_steps-0.4_edit-cat.yaml"
    monkeypatch.setattr(p2p.cli, "load_model", lambda ckpt, dtype="float32", **options: tiny_sd)
    outs, real_edit = [], p2p.edit
    monkeypatch.setattr(p2p, "edit", lambda *a, **k: outs.append(real_edit(*a, **k)) or outs[-1])
    assert main(["edit", "--config", str(cell), "-o", str(tmp_path / "cell.png")]) == 0
    assert json.loads((tmp_path / "cell.png.json").read_text())["settings"]["edits"] == ["A painting of a cat eating a burger"]
    alone = outs[0].images[1]
    swept = np.asarray(Image.open(out / "cells" / f"{cell.stem}.png"))
    assert np.abs(alone.astype(int) - swept).max() <= 1          # batch of 2 vs alone: float noise at most


def test_rerun_skips_and_resumes_one_cell(run, tiny_sd, monkeypatch):
    cfg, out = run
    before = json.loads((out / "metrics.json").read_text())["cells"]
    done = counting(monkeypatch)
    p2p.sweep.run_sweep(cfg, out, sd=tiny_sd, progress=False, log=lambda *a: None)
    assert done == []                                            # everything finished: nothing recomputed
    (out / "cells" / "002_cross_replace_steps-0.8_edit-lion.json").unlink()   # as if killed while it ran
    (out / "metrics.csv").unlink()
    p2p.sweep.run_sweep(cfg, out, sd=tiny_sd, progress=False, log=lambda *a: None)
    assert done == ["002_cross_replace_steps-0.8_edit-lion"]
    after = json.loads((out / "metrics.json").read_text())["cells"]
    assert (out / "metrics.csv").exists() and [r["cell"] for r in after] == [r["cell"] for r in before]
    for a, b in zip(before, after):
        for k in ("psnr_bg", "ssim_bg", "change_in_mask", "latent_l2", "attention_iou"):
            assert math.isclose(a["metrics"][k], b["metrics"][k], rel_tol=1e-3, abs_tol=1e-3), (a["cell"], k)


def test_changed_settings_are_not_done(run):
    cfg, out = run
    _, cells, _ = p2p.sweep.prepare(cfg)
    assert all(p2p.sweep.is_done(out, c) for c in cells)
    _, cells, _ = p2p.sweep.prepare(cfg, {"seed": 1})      # same names, other settings
    assert not any(p2p.sweep.is_done(out, c) for c in cells)


def test_figure_captions_and_csv_rows():
    """What the figure writes under a cell, and a CSV row: knob values that are not plain go as JSON,
    metrics JSON holds as null as empty."""
    m = {"psnr_bg": "inf", "ssim_bg": 0.5, "attention_iou": None, "latent_l2": 2.04}
    assert caption(m) == ["PSNR inf  SSIM 0.50", "IoU -  dz 2.0"]
    assert caption(m | {"mask_fraction": 0.254, "change_in_mask": 0.1234})[2] == "mask 25%  in 0.123"
    rows = list(csv.reader(csv_bytes(["seed", "weight.smiling"], [
        {"cell": "000_x", "knobs": {"seed": 1, "weight.smiling": [1.0, 2.0]}, "metrics": m}]).decode().splitlines()))
    assert rows[0] == ["cell", "seed", "weight.smiling", *METRIC_COLUMNS]
    assert rows[1][:5] == ["000_x", "1", "[1.0, 2.0]", "inf", "0.5"]
    assert rows[1][3 + METRIC_COLUMNS.index("attention_iou")] == ""


def test_a_changed_checkpoint_file_is_recomputed(tmp_path, golden_dir, tiny_sd, monkeypatch):
    """The resume is keyed on the checkpoint's bytes, not its path: new weights at the same path rerun
    every cell, and the log says why."""
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes((golden_dir / "tiny-sd-a.safetensors").read_bytes())
    cfg = tmp_path / "abl.yaml"
    cfg.write_text(ABLATION.format(ckpt=ckpt))
    out, logs = tmp_path / "runs", []
    p2p.sweep.run_sweep(cfg, out, sd=tiny_sd, progress=False, log=logs.append)
    done = counting(monkeypatch)
    p2p.sweep.run_sweep(cfg, out, sd=tiny_sd, progress=False, log=logs.append)
    assert done == []
    ckpt.write_bytes(ckpt.read_bytes()[:-4] + b"\0\0\0\0")      # other weights, same path and size
    p2p.sweep.run_sweep(cfg, out, sd=tiny_sd, progress=False, log=logs.append)
    assert len(done) == 4 and "4 to run (4 of them again: their checkpoint file changed" in logs[-2]


def test_a_second_sweep_in_the_same_folder_is_refused(run, tiny_sd):
    """Two sweeps writing one folder at once would each compute every cell: the second is refused."""
    import fcntl

    cfg, out = run
    with open(out / ".lock", "a+") as held:                     # as a running sweep holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="another sweep is writing .* give another -o"):
            p2p.sweep.run_sweep(cfg, out, sd=tiny_sd, progress=False, log=lambda *a: None)
    p2p.sweep.run_sweep(cfg, out, sd=tiny_sd, progress=False, log=lambda *a: None)   # released: runs


def test_cells_made_reading_the_checkpoint_otherwise_are_not_done(tmp_path, golden_dir, tiny_sd, monkeypatch):
    """Another --prediction-type, --dtype, --vae (or the same VAE path with other bytes) or --non-strict
    reruns every cell: they reported everything done and kept the old pictures."""
    cfg = tmp_path / "abl.yaml"
    cfg.write_text(ABLATION.format(ckpt=golden_dir / "tiny-sd-a.safetensors"))
    out = tmp_path / "runs"
    monkeypatch.setattr(p2p.sweep.command, "load_checkpoint", lambda ckpt, device, dtype, **load: tiny_sd)
    done = counting(monkeypatch)
    vae = tmp_path / "vae.safetensors"
    vae.write_bytes(b"one vae")
    base = ["sweep", str(cfg), "-o", str(out), "--no-progress"]
    for extra, runs in (([], 4), ([], 0), (["--prediction-type", "v"], 4), (["--prediction-type", "v"], 0),
                        (["--dtype", "bfloat16"], 4), (["--vae", str(vae)], 4), (["--vae", str(vae)], 0),
                        (["--non-strict"], 4), (["--non-strict"], 0)):
        done.clear()
        assert main(base + extra) == 0 and len(done) == runs, extra
    vae.write_bytes(b"another vae")
    done.clear()
    assert main(base + ["--vae", str(vae)]) == 0 and len(done) == 4
    record = json.loads(next((out / "cells").glob("*.json")).read_text())
    assert record["reading"]["vae"] == str(vae) and record["reading"]["dtype"] == "float32"


def test_a_given_model_read_otherwise_reruns_its_cells(tmp_path, golden_dir, tiny_sd, monkeypatch):
    cfg = tmp_path / "abl.yaml"
    cfg.write_text(ABLATION.format(ckpt=golden_dir / "tiny-sd-a.safetensors"))
    p2p.sweep.run_sweep(cfg, tmp_path / "runs", sd=tiny_sd, progress=False, log=lambda *a: None)
    done = counting(monkeypatch)
    as_v = load_checkpoint(golden_dir / "tiny-sd-a.safetensors", prediction_type="v")
    p2p.sweep.run_sweep(cfg, tmp_path / "runs", sd=as_v, progress=False, log=lambda *a: None)
    assert len(done) == 4
