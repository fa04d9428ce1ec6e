"""`p2p bench pie` -> `p2p bench eval` -> `p2p bench report` through the command line on the tiny set, measured
by the real `Evaluator` with tiny random weight files of the four metric networks in their real layouts
(tests/pie_networks.py): the report holds all eight metrics, a run killed while measuring resumes into the same
files, and a metric file not given or missing is named."""
import csv
import json
import math
import shutil

import pytest

import p2p.bench.command as bench_command
from p2p.bench import read_mapping
from p2p.bench.metrics import METRICS, Evaluator, MetricFiles
from p2p.bench.report import COLUMNS
from p2p.bench.run import picture_files
from p2p.bench.score import metric_file, pictures
from p2p.cli import main
from pie_networks import metric_flags, write_metric_files
from pie_tiny import make_pie

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROW = "direct+p2p"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_metric_files(tmp_path_factory.mktemp("metric-networks"), transformers)


def bench(argv, tiny_sd, monkeypatch) -> int:
    """`p2p bench ARGV` with the session's tiny model in place of --ckpt's file (the same weights)."""
    monkeypatch.setattr(bench_command, "load_checkpoint", lambda ckpt, device, dtype, **load: tiny_sd)
    return main(["bench", *argv])


def edit_argv(data, out, golden_dir, *more):
    return ["pie", str(data), "--method", "p2p", "--inversion", "direct", "-o", str(out), "--ckpt",
            str(golden_dir / "tiny-sd-a.safetensors"), "--steps", "2", "--no-progress", *more]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, tiny_sd, golden_dir, files):
    """pie (edit only), then eval with every metric file, then report, each through the command line."""
    root = tmp_path_factory.mktemp("pie-e2e")
    data, out = make_pie(root / "data"), root / "out"
    with pytest.MonkeyPatch.context() as mp:
        assert bench(edit_argv(data, out, golden_dir, "--no-eval"), tiny_sd, mp) == 0
        assert bench(["eval", str(out), str(data), "--no-progress", *metric_flags(files)], tiny_sd, mp) == 0
        assert bench(["report", str(out)], tiny_sd, mp) == 0
    return data, out


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_report_holds_all_eight_metrics_in_the_papers_units(whole, files):
    data, out = whole
    summary = json.loads((out / "pie_bench.json").read_text())
    overall = summary["rows"][ROW]["all"]
    assert overall["pictures"] == 3
    for metric in METRICS:      # the fully edited picture has no unedited region: the official "nan", left out
        n = 2 if metric.endswith("_unedit_part") else 3
        assert overall[metric]["n"] == n and math.isfinite(overall[metric]["mean"]), metric
    assert summary["table_scale"] == {"structure_distance": 1e3, "psnr_unedit_part": 1.0, "lpips_unedit_part": 1e3,
                                      "mse_unedit_part": 1e4, "ssim_unedit_part": 1e2,
                                      "clip_similarity_source_image": 1.0, "clip_similarity_target_image": 1.0,
                                      "clip_similarity_target_image_edit_part": 1.0}
    rows = list(csv.reader((out / "pie_bench.csv").open()))
    mean = next(r for r in rows if r[:2] == [ROW, "mean"])
    for metric, column, scale in COLUMNS:
        assert float(mean[rows[0].index(column)]) == pytest.approx(overall[metric]["mean"] * scale, abs=0.006)

    # each stored record is what the evaluator gives for the picture, its mask and its prompts without brackets
    ev = Evaluator(MetricFiles(**{k: str(v) for k, v in files.items()}))
    entry = read_mapping(data)[1]
    want = ev(*pictures(entry, picture_files(out, ROW, entry.id)[0]), entry.source_prompt, entry.target_prompt)
    rec = json.loads(metric_file(out, ROW, entry.id).read_text())
    assert rec["skipped"] == {} and rec["metrics"] == pytest.approx(want, rel=1e-6)


def test_the_printed_table_says_its_units(whole, tiny_sd, monkeypatch, capsys):
    _, out = whole
    assert bench(["report", str(out)], tiny_sd, monkeypatch) == 0
    text = capsys.readouterr().out
    assert "structure distance x10^3" in text and "LPIPS x10^3" in text and "MSE x10^4" in text
    assert "SSIM x10^2" in text and "PSNR in dB" in text
    mean = next(line for line in text.splitlines() if line.startswith(ROW) and " mean " in line)
    assert "-" not in mean.split()[2:]       # a number in every column


def test_a_run_killed_while_measuring_resumes_into_the_same_files(whole, tmp_path, tiny_sd, golden_dir, files,
                                                                  monkeypatch):
    data, out = whole
    killed = tmp_path / "killed"
    flags = metric_flags(files)
    assert bench(edit_argv(data, killed, golden_dir, "--limit", "1", *flags), tiny_sd, monkeypatch) == 0
    real, calls = Evaluator.__call__, []

    def dies_on_the_second(self, *a):
        calls.append(a[3])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a)
    monkeypatch.setattr(Evaluator, "__call__", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        bench(edit_argv(data, killed, golden_dir, *flags), tiny_sd, monkeypatch)
    assert len(list((killed / ROW / "metrics").iterdir())) == 2 and len(list((killed / ROW / "pictures").iterdir())) == 6
    monkeypatch.setattr(Evaluator, "__call__", real)
    assert bench(edit_argv(data, killed, golden_dir, *flags), tiny_sd, monkeypatch) == 0
    a, b = files_of(out / ROW), files_of(killed / ROW)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a if k.startswith("metrics/") or k.endswith(".png"))
    assert (out / "pie_bench.csv").read_bytes() == (killed / "pie_bench.csv").read_bytes()


def test_a_metric_file_not_given_is_skipped_naming_the_file_and_a_missing_one_is_an_error(whole, tmp_path, tiny_sd,
                                                                                          files, monkeypatch, capsys):
    data, out = whole
    out = shutil.copytree(out, tmp_path / "out")
    rc = bench(["eval", str(out), str(data), "--no-progress", *metric_flags(files, ("dino", "lpips_linear"))],
               tiny_sd, monkeypatch)
    text = capsys.readouterr().out
    assert rc == 0
    assert "skipping structure_distance: no --dino: get DINO's ViT backbone weights, e.g. dino_vitbase8_pretrain.pth" in text
    assert "skipping lpips_unedit_part: no --lpips-linear: get LPIPS v0.1's SqueezeNet linear layers, squeeze.pth" in text
    rec = json.loads(metric_file(out, ROW, "111000000000").read_text())
    assert set(rec["metrics"]) == set(METRICS) - {"structure_distance", "lpips_unedit_part"}
    assert "dino_vitbase8_pretrain.pth" in rec["skipped"]["structure_distance"]

    gone = tmp_path / "nowhere" / "dino_vitbase8_pretrain.pth"
    rc = bench(["eval", str(out), str(data), "--no-progress", *metric_flags(files, ("dino",)), "--dino", str(gone)],
               tiny_sd, monkeypatch)
    err = capsys.readouterr().err
    assert rc == 2 and str(gone) in err and "no such file" in err and "facebookresearch/dino" in err
