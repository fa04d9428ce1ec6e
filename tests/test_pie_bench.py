"""PIE-Bench: the data reader (RLE masks, brackets, blended words, malformed files), every row's protocol on the
tiny model, resuming a killed run with identical bytes, resumable evaluation, and the report; the metric
conventions as flags and config keys, refused when bad, measured again when changed and named by the report."""
import argparse
import csv
import json
import math
import re
import shutil

import numpy as np
import pytest

import p2p.bench.command as bench_command
import p2p.bench.run as bench_run
from p2p.bench import Protocol, decode_mask, evaluate_row, read_mapping, report, run_row
from p2p.bench.conventions import NAMES, OFFICIAL, Conventions, record
from p2p.bench.pie import strip_brackets
from p2p.bench.protocol import INVERSIONS, p2p_edit
from p2p.bench.run import picture_files
from p2p.bench.score import metric_file
from p2p.blend import LocalBlend
from p2p.cli import main
from p2p.control import Refine, Reweight
from p2p.mutual import MutualSelfAttention
from pie_networks import metric_flags, write_metric_files
from pie_tiny import ENTRIES, SIDE, PixelEvaluator, box_mask, encode_rle, make_pie

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(num_steps=2, num_inner_steps=2)
WEIGHTS = {"checkpoint": "tiny-sd-a.safetensors", "checkpoint_sha256": "0" * 64, "dtype": "float32"}
ROWS = [(m, i) for m, inv in INVERSIONS.items() for i in inv]


def quiet(*a):
    pass


def official_decode(rle, height, width):
    """PIE-Bench's mask code read pixel by pixel: each (start, length) sets that many pixels from start, cut at
    the end of the picture; then the border is set to 1."""
    n = height * width
    out = [0] * n
    for k in range(0, len(rle), 2):
        for j in range(min(rle[k + 1], n - rle[k])):
            out[rle[k] + j] = 1
    m = np.array(out, dtype=np.uint8).reshape(height, width)
    m[0, :], m[-1, :], m[:, 0], m[:, -1] = 1, 1, 1, 1
    return m


@pytest.fixture()
def data(tmp_path):
    return make_pie(tmp_path / "data")


@pytest.fixture(scope="module")
def edited(tmp_path_factory, tiny_sd, one_thread):
    """Two rows run whole on the tiny set: (data, out, entries). Tests copy `out` before changing it."""
    root = tmp_path_factory.mktemp("pie")
    data, out = make_pie(root / "data"), root / "out"
    entries = read_mapping(data)
    for p in (Protocol("p2p", "direct", **FAST), Protocol("masactrl", "ddim", **FAST)):
        run_row(tiny_sd, p, entries, out, WEIGHTS, progress=False, log=quiet)
    return data, out, entries


def copied(out, where):
    shutil.copytree(out, where / "out")
    return where / "out"


# ------------------------------------------------------------------------------- the data
@pytest.mark.parametrize("rle", [[10, 5, 40, 3], [0, 64, 4090, 100], [70, 0, 5000, 10], [100, 3, 101, 3], []])
def test_masks_decode_as_the_official_code(rle):
    assert np.array_equal(decode_mask(rle, SIDE, SIDE), official_decode(rle, SIDE, SIDE))


def test_mask_border_is_edited_region_and_runs_follow_rows():
    m = decode_mask([SIDE * 5 + 7, 3], SIDE, SIDE)
    assert m[5, 7:10].tolist() == [1, 1, 1] and m[5, 10] == 0 and m[5, 6] == 0
    assert m[0].all() and m[-1].all() and m[:, 0].all() and m[:, -1].all()
    assert m[1:-1, 1:-1].sum() == 3
    box = box_mask((8, 40, 16, 48))
    assert np.array_equal(decode_mask(encode_rle(box), SIDE, SIDE)[1:-1, 1:-1], box[1:-1, 1:-1])


def test_reader_strips_brackets_and_reads_blended_words(data):
    entries = {e.id: e for e in read_mapping(data)}
    assert list(entries) == list(ENTRIES)
    e = entries["111000000000"]
    assert (e.source_prompt, e.target_prompt) == ("a cat sitting on a chair", "a dog sitting on a chair")
    assert e.blend_words == ("cat", "dog") and e.edit_type == "1"
    assert e.image == data / "annotation_images" / ENTRIES[e.id][1]
    assert entries["900000000000"].blend_words is None
    assert entries["900000000000"].source_prompt == "a photo of a house by a lake"
    assert strip_brackets("[a] b [c d]") == "a b c d"
    assert [e.id for e in read_mapping(data, ["1", "9"])] == ["111000000000", "900000000000"]


def rewrite(data, key, **fields):
    path = data / "mapping_file.json"
    mapping = json.loads(path.read_text())
    for k, v in fields.items():
        if v is None:
            del mapping[key][k]
        else:
            mapping[key][k] = v
    path.write_text(json.dumps(mapping))


@pytest.mark.parametrize("fields, words", [
    ({"editing_type_id": "12"}, "'editing_type_id'"),
    ({"mask": [1, 2, 3]}, "'mask'"),
    ({"mask": [1, -2]}, "'mask'"),
    ({"mask": None}, "'mask' is missing"),
    ({"original_prompt": None}, "'original_prompt' is missing"),
    ({"editing_prompt": 3}, "'editing_prompt' must be a string"),
    ({"blended_word": "cat"}, "'blended_word'"),
    ({"image_path": "../elsewhere.png"}, "'image_path'"),
])
def test_malformed_entries_are_named_by_file_id_and_field(data, fields, words):
    rewrite(data, "111000000000", **fields)
    with pytest.raises(ValueError) as err:
        read_mapping(data)
    assert "mapping_file.json" in str(err.value) and "'111000000000'" in str(err.value) and words in str(err.value)


def test_missing_picture_mapping_file_and_unknown_words_are_clear_errors(data):
    (data / "annotation_images" / ENTRIES["000000000000"][1]).unlink()
    with pytest.raises(FileNotFoundError, match="'000000000000'.*does not exist"):
        read_mapping(data)
    with pytest.raises(FileNotFoundError, match="mapping_file.json does not exist"):
        read_mapping(data / "annotation_images")
    make_pie(data)
    rewrite(data, "111000000000", blended_word="cat horse")
    with pytest.raises(ValueError, match="111000000000 \\('horse'"):
        read_mapping(data)
    assert [e.id for e in read_mapping(data, ["0"])] == ["000000000000"]   # only the types asked for are checked
    (data / "mapping_file.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        read_mapping(data)


# ------------------------------------------------------------------------------- the protocol
def test_p2p_row_is_the_official_runners_edit(data):
    e = {x.id: x for x in read_mapping(data)}
    spec, blend = p2p_edit(Protocol("p2p", "direct"), e["111000000000"])
    refine = Refine(cross_replace_steps=0.4, self_replace_steps=0.6, self_replace_max_res=32)
    assert spec == Reweight(cross_replace_steps=0.4, self_replace_steps=0.6, self_replace_max_res=32,
                            equalizer={"dog": 2.0}, base=refine)
    assert blend == LocalBlend(words=(("cat",), ("dog",)), start_blend=0.2, th=(0.3, 0.3))
    assert p2p_edit(Protocol("p2p", "null-text"), e["900000000000"]) == (refine, None)
    p = Protocol("masactrl", "ddim")
    assert (p.row, p.steps_offset, p.num_steps, p.guidance_scale) == ("ddim+masactrl", 0, 50, 7.5)
    assert Protocol("pnp", "direct").steps_offset == 1


@pytest.mark.parametrize("method, inversion", [("pnp", "ddim"), ("masactrl", "null-text"), ("sdedit", "ddim")])
def test_rows_the_library_lacks_are_refused(method, inversion):
    with pytest.raises(ValueError, match="--method|--inversion"):
        Protocol(method, inversion)


def test_the_source_row_rule_is_a_setting_of_the_row():
    assert Protocol("p2p", "direct", source_row="residual").settings()["source_row"] == "residual"
    for bad in (dict(method="pnp", inversion="direct", source_row="trajectory"),
                dict(method="p2p", inversion="direct", source_row="sideways")):
        with pytest.raises(ValueError, match="--source-row"):
            Protocol(**bad)


@pytest.mark.slow
@pytest.mark.parametrize("method, inversion", ROWS)
def test_every_row_runs_on_the_tiny_set(data, tmp_path, tiny_sd, method, inversion):
    p = Protocol(method, inversion, **FAST)
    entries = read_mapping(data)
    done = run_row(tiny_sd, p, entries, tmp_path / "out", WEIGHTS, progress=False, log=quiet)
    assert done == [e.id for e in entries]
    for e in entries:
        png, record = picture_files(tmp_path / "out", p.row, e.id)
        rec = json.loads(record.read_text())
        assert rec["settings"]["row"] == p.row and rec["entry"]["target_prompt"] == e.target_prompt
        assert rec["inversion_method"] == ("ddim" if method == "pnp" else inversion)
        assert rec["checkpoint_sha256"] == WEIGHTS["checkpoint_sha256"]
        from PIL import Image
        with Image.open(png) as im:
            assert im.size == (SIDE, SIDE) and im.mode == "RGB"
    if method == "masactrl":
        assert "MutualSelfAttention(start_step=4, start_layer=10" in rec["spec"]
    assert repr(MutualSelfAttention(4, 10)).startswith("MutualSelfAttention(start_step=4")


# ------------------------------------------------------------------------------- resuming
def files_of(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_killed_run_resumes_with_identical_pictures_and_nothing_half_written(edited, tmp_path, tiny_sd,
                                                                              monkeypatch):
    p = Protocol("p2p", "direct", **FAST)
    _, out, entries = edited
    whole = out / "direct+p2p"

    killed = tmp_path / "killed"
    assert run_row(tiny_sd, p, entries, killed, WEIGHTS, limit=1, progress=False, log=quiet) == [entries[0].id]
    real, calls = bench_run.run_entry, []

    def dies_on_the_second(*a, **k):       # killed while the second picture is being edited
        calls.append(a[2].id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(bench_run, "run_entry", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_row(tiny_sd, p, entries, killed, WEIGHTS, progress=False, log=quiet)
    assert calls == [entries[1].id, entries[2].id]
    left = files_of(killed)
    assert sorted(left) == sorted(f"direct+p2p/pictures/{e.id}.{x}" for e in entries[:2] for x in ("png", "json"))
    monkeypatch.setattr(bench_run, "run_entry", real)
    assert run_row(tiny_sd, p, entries, killed, WEIGHTS, progress=False, log=quiet) == [entries[2].id]
    assert run_row(tiny_sd, p, entries, killed, WEIGHTS, progress=False, log=quiet) == []   # nothing recomputed
    a, b = files_of(whole), files_of(killed / "direct+p2p")
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a if k.endswith(".png"))
    record = lambda files, k: {x: y for x, y in json.loads(files[k]).items() if x != "seconds"}  # noqa: E731
    assert all(record(a, k) == record(b, k) for k in a if k.endswith(".json"))


def test_a_picture_without_its_record_or_made_otherwise_is_edited_again(edited, tmp_path, tiny_sd):
    p = Protocol("masactrl", "ddim", **FAST)
    data, out, _ = edited
    out = copied(out, tmp_path)
    data = shutil.copytree(data, tmp_path / "moved")                # the data folder may move
    entries = read_mapping(data)[:1]
    assert run_row(tiny_sd, p, entries, out, WEIGHTS, progress=False, log=quiet) == []
    picture_files(out, p.row, entries[0].id)[1].unlink()           # a PNG alone is not a done picture
    assert run_row(tiny_sd, p, entries, out, WEIGHTS, progress=False, log=quiet) == [entries[0].id]
    entries[0].image.write_bytes(entries[0].image.read_bytes() + b"\0")   # other bytes: edited again
    assert run_row(tiny_sd, p, entries, out, WEIGHTS, progress=False, log=quiet) == [entries[0].id]
    other = dict(WEIGHTS, checkpoint_sha256="1" * 64)               # other weights: every picture again
    assert run_row(tiny_sd, p, entries, out, other, progress=False, log=quiet) == [e.id for e in entries]


# ------------------------------------------------------------------------------- evaluation and report
def test_evaluation_is_resumable_and_keeps_nan_as_null(edited, tmp_path):
    _, out, entries = edited
    out = copied(out, tmp_path)
    ev = PixelEvaluator()
    files = {"clip": None}
    assert evaluate_row(out, "direct+p2p", entries, ev, ev.names, files, progress=False, log=quiet) == \
        [e.id for e in entries]
    assert ev.calls[1] == ("a cat sitting on a chair", "a dog sitting on a chair")
    rec = json.loads(metric_file(out, "direct+p2p", "900000000000").read_text())
    assert rec["metrics"] == {"psnr_unedit_part": None, "mse_unedit_part": None}  # the whole frame is edited
    assert rec["skipped"]["structure_distance"]
    before = metric_file(out, "direct+p2p", entries[0].id).read_bytes()
    assert evaluate_row(out, "direct+p2p", entries, ev, ev.names, files, progress=False, log=quiet) == []
    more = PixelEvaluator(("psnr_unedit_part", "mse_unedit_part", "ssim_unedit_part"))  # a metric more: again
    assert len(evaluate_row(out, "direct+p2p", entries, more, more.names, files, progress=False, log=quiet)) == 3
    assert evaluate_row(out, "direct+p2p", entries, ev, ev.names, {"clip": "x"}, progress=False, log=quiet) != []
    after = json.loads(metric_file(out, "direct+p2p", entries[0].id).read_text())
    assert math.isclose(after["metrics"]["mse_unedit_part"], json.loads(before)["metrics"]["mse_unedit_part"])


def test_a_killed_evaluation_resumes_with_identical_metric_files(edited, tmp_path):
    _, out, entries = edited
    whole, killed = copied(out, tmp_path / "a"), copied(out, tmp_path / "b")
    ev = PixelEvaluator()
    evaluate_row(whole, "direct+p2p", entries, ev, ev.names, {}, progress=False, log=quiet)

    class Dies(PixelEvaluator):
        def __call__(self, *a):
            if len(self.calls) == 1:
                raise KeyboardInterrupt
            return super().__call__(*a)
    with pytest.raises(KeyboardInterrupt):
        evaluate_row(killed, "direct+p2p", entries, Dies(), ev.names, {}, progress=False, log=quiet)
    assert sorted(p.name for p in (killed / "direct+p2p" / "metrics").iterdir()) == [f"{entries[0].id}.json"]
    assert evaluate_row(killed, "direct+p2p", entries, ev, ev.names, {}, progress=False, log=quiet) == \
        [e.id for e in entries[1:]]
    a, b = files_of(whole / "direct+p2p" / "metrics"), files_of(killed / "direct+p2p" / "metrics")
    assert a == b and len(a) == 3


def test_report_prints_the_table_per_row_and_edit_type(edited, tmp_path, capsys):
    _, out, entries = edited
    out = copied(out, tmp_path)
    ev = PixelEvaluator()
    for row in ("direct+p2p", "ddim+masactrl"):
        evaluate_row(out, row, entries, ev, ev.names, {}, progress=False, log=quiet)
    summary = report(out)
    text = capsys.readouterr().out
    assert "direct+p2p" in text and "ddim+masactrl" in text and "1 change object" in text and "mean" in text
    assert "PSNR" in text and "MSE x1e4" in text
    assert text.splitlines()[0].startswith("units, as in the paper's Table 1: structure distance x10^3, PSNR in dB")
    p2p_all = summary["direct+p2p"]["all"]
    assert p2p_all["pictures"] == 3 and p2p_all["psnr_unedit_part"]["n"] == 2   # the NaN is left out
    values = [json.loads(metric_file(out, "direct+p2p", e.id).read_text())["metrics"]["mse_unedit_part"]
              for e in entries[:2]]
    assert math.isclose(p2p_all["mse_unedit_part"]["mean"], sum(values) / 2)
    assert summary["direct+p2p"]["9"]["psnr_unedit_part"] == {"mean": None, "n": 0}
    rows = list(csv.reader((out / "pie_bench.csv").open()))
    assert rows[0][:4] == ["row", "edit_type", "pictures", "Structure x1e3"]
    mean = next(r for r in rows if r[0] == "direct+p2p" and r[1] == "mean")
    assert float(mean[rows[0].index("MSE x1e4")]) == pytest.approx(1e4 * sum(values) / 2, abs=0.01)
    assert mean[rows[0].index("Structure x1e3")] == "-"
    assert json.loads((out / "pie_bench.json").read_text())["rows"]["ddim+masactrl"]["all"]["pictures"] == 3


def test_report_leaves_out_metrics_of_a_picture_edited_again(edited, tmp_path):
    _, out, entries = edited
    out = copied(out, tmp_path)
    ev = PixelEvaluator()
    evaluate_row(out, "direct+p2p", entries, ev, ev.names, {}, progress=False, log=quiet)
    record = picture_files(out, "direct+p2p", entries[0].id)[1]
    rec = json.loads(record.read_text())
    record.write_text(json.dumps(rec | {"key": "another"}))
    assert report(out, log=quiet)["direct+p2p"]["all"]["pictures"] == 2
    with pytest.raises(ValueError, match="no measured pictures"):
        report(out / "direct+p2p" / "pictures", log=quiet)


# ------------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def metric_files(tmp_path_factory):
    """Tiny random weight files of the four metric networks in their real layouts (tests/pie_networks.py)."""
    return write_metric_files(tmp_path_factory.mktemp("metric-networks"), pytest.importorskip("transformers"))


def cli(argv, tiny_sd, monkeypatch):
    """`p2p ARGV` with the session's tiny model in place of --ckpt's file (the same weights)."""
    monkeypatch.setattr(bench_command, "load_checkpoint", lambda ckpt, device, dtype, **load: tiny_sd)
    return main(argv)


@pytest.mark.slow
def test_the_command_edits_measures_resumes_and_reports(data, tmp_path, tiny_sd, monkeypatch, capsys, golden_dir,
                                                        metric_files):
    """The real Evaluator with every file but DINO's: the structure distance is skipped, saying so once."""
    out = tmp_path / "results"
    argv = ["bench", "pie", str(data), "--method", "masactrl", "--inversion", "ddim", "-o", str(out), "--ckpt",
            str(golden_dir / "tiny-sd-a.safetensors"), "--steps", "2", "--no-progress",
            *metric_flags(metric_files, ("dino",))]
    assert cli([*argv, "--limit", "2"], tiny_sd, monkeypatch) == 0
    text = capsys.readouterr().out
    assert "3 pictures, 0 done, 2 to run" in text and "2 of 3 pictures edited, 2 to measure" in text
    assert text.count("skipping structure_distance: ") == 1 and "ddim+masactrl" in text and "mean" in text
    assert cli(argv, tiny_sd, monkeypatch) == 0
    text = capsys.readouterr().out
    assert "3 pictures, 2 done, 1 to run" in text and "3 of 3 pictures edited, 1 to measure" in text
    rec = json.loads(picture_files(out, "ddim+masactrl", "111000000000")[1].read_text())
    assert rec["settings"]["num_steps"] == 2 and rec["checkpoint"].endswith("tiny-sd-a.safetensors")
    assert rec["reading"]["dtype"] == "float32" and rec["reading"]["vae"] is None
    assert cli(["bench", "eval", str(out), str(data), "--no-progress", *metric_flags(metric_files, ("dino",))],
               tiny_sd, monkeypatch) == 0
    assert "ddim+masactrl: 3 of 3 pictures edited, 0 to measure" in capsys.readouterr().out
    assert main(["bench", "report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "9 change style" in table and "PSNR" in table
    rows = list(csv.reader((out / "pie_bench.csv").open()))
    assert [r[:3] for r in rows if r[1] == "mean"] == [["ddim+masactrl", "mean", "3"]]
    mean = next(r for r in rows if r[1] == "mean")
    assert mean[3] == "-" and all(x != "-" for x in mean[4:])     # every metric but the structure distance


def test_the_command_refuses_bad_data_before_loading_anything(data, tmp_path, tiny_sd, monkeypatch, capsys):
    assert main(["bench", "eval", str(tmp_path), str(data)]) == 2
    assert "holds no edited pictures" in capsys.readouterr().err
    out = tmp_path / "results"
    assert main(["bench", "pie", str(data), "--method", "p2p", "--inversion", "direct", "-o", str(out)]) == 2
    assert "give --ckpt" in capsys.readouterr().err and not out.exists()
    rewrite(data, "000000000000", mask=[3])
    rc = cli(["bench", "pie", str(data), "--method", "p2p", "--inversion", "direct", "-o", str(out)], tiny_sd,
             monkeypatch)
    err = capsys.readouterr().err
    assert rc == 2 and "entry '000000000000': 'mask'" in err and not out.exists()
    rc = cli(["bench", "pie", str(data), "--method", "pnp", "--inversion", "ddim", "-o", str(out)], tiny_sd,
             monkeypatch)
    assert rc == 2 and "DDIM reconstruction" in capsys.readouterr().err and not out.exists()
    assert main(["bench", "report", str(tmp_path)]) == 2 and "no measured pictures" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the metric conventions
OTHER_FLAGS = ["--average", "region", "--ssim-border", "reflect", "--lpips-norm", "torchmetrics", "--dino-pixel-range",
               "1", "--dino-antialias", "--clip-keep-eos", "--clip-empty-mask", "score"]
OTHER_YAML = ("average: region\nssim_border: reflect\nlpips_norm: torchmetrics\ndino_pixel_range: 1\n"
              "dino_antialias: true\nclip_keep_eos: true\nclip_empty_mask: score\n")


def measured_under(argv) -> Conventions:
    args = bench_command.add_arguments(argparse.ArgumentParser()).parse_args(["eval", "out", "data", *argv])
    return bench_command.measurement(args)[1]


def test_every_switch_is_a_flag_and_a_config_key_and_the_two_agree(tmp_path):
    config = tmp_path / "metrics.yaml"
    config.write_text(OTHER_YAML)
    by_flags, by_file = measured_under(OTHER_FLAGS), measured_under(["--metrics-config", str(config)])
    assert by_flags == by_file != Conventions() and measured_under([]) == Conventions()
    assert set(record(by_flags)) == set(NAMES) and all(record(by_flags)[k] != OFFICIAL[k] for k in NAMES)
    back = measured_under(["--metrics-config", str(config), "--ssim-border", "valid", "--no-dino-antialias"])
    assert (back.ssim_border, back.dino_antialias, back.average) == ("valid", False, "region")   # flags win


@pytest.mark.parametrize("yaml_text, says", [
    ("ssim_boarder: reflect\n", r"metrics.yaml: unknown keys \['ssim_boarder'\].*ssim_border"),
    ("ssim_border: same\n", r"metrics.yaml: ssim_border='same' is not allowed; .* takes one of valid, reflect"),
    ("dino_antialias: 'yes'\n", r"metrics.yaml: dino_antialias='yes' is not allowed; .* takes true or false"),
    ("dino_pixel_range: 0\n", r"metrics.yaml: dino_pixel_range=0 is not allowed; .* a number from 1 to 255")])
def test_a_bad_switch_is_refused_before_anything_runs(data, tmp_path, monkeypatch, capsys, yaml_text, says):
    config, out = tmp_path / "metrics.yaml", tmp_path / "results"
    config.write_text(yaml_text)
    monkeypatch.setattr(bench_command, "read_mapping", lambda *a: pytest.fail("the data was read"))
    monkeypatch.setattr(bench_command, "load_checkpoint", lambda *a, **k: pytest.fail("a model was loaded"))
    for command in (["pie", str(data), "--method", "p2p", "--inversion", "direct", "-o", str(out), "--ckpt", "x"],
                    ["eval", str(out), str(data)]):
        assert main(["bench", *command, "--metrics-config", str(config)]) == 2
        assert re.search(says, capsys.readouterr().err) and not out.exists()
    assert main(["bench", "eval", str(out), str(data), "--dino-pixel-range", "300"]) == 2
    assert "--dino-pixel-range: dino_pixel_range=300.0 is not allowed" in capsys.readouterr().err


def test_a_convention_change_measures_again_and_the_report_names_the_conventions(edited, tmp_path, capsys):
    data, out, _ = edited
    out = copied(out, tmp_path)
    run = ["bench", "eval", str(out), str(data), "--method", "p2p", "--inversion", "direct", "--no-progress"]
    assert main(run) == 0                                          # no metric file: PSNR, MSE, SSIM
    assert "3 to measure" in capsys.readouterr().out
    official = json.loads((out / "pie_bench.json").read_text())
    config = tmp_path / "metrics.yaml"
    config.write_text("average: region\n")
    assert main([*run, "--average", "region"]) == 0
    text = capsys.readouterr().out
    assert "3 to measure" in text and "except in direct+p2p [average=region]" in text
    assert main([*run, "--metrics-config", str(config)]) == 0     # the same conventions as the flag's: nothing to do
    assert "0 to measure" in capsys.readouterr().out
    summary = json.loads((out / "pie_bench.json").read_text())
    assert list(summary["rows"]) == ["direct+p2p [average=region]"]
    assert summary["conventions"]["direct+p2p [average=region]"] == OFFICIAL | {"average": "region"}
    mse = lambda s: next(iter(s["rows"].values()))["all"]["mse_unedit_part"]["mean"]  # noqa: E731
    assert mse(summary) > mse(official)          # over the unedited pixels only: no blacked-out zeros in the mean
    assert official["conventions"] == {"direct+p2p": OFFICIAL}


def test_a_row_measured_under_two_sets_of_conventions_is_tabulated_apart(edited, tmp_path):
    _, out, entries = edited
    out = copied(out, tmp_path)
    ev, region = PixelEvaluator(), record(Conventions(average="region"))
    evaluate_row(out, "direct+p2p", entries, ev, ev.names, {}, region, progress=False, log=quiet)
    assert evaluate_row(out, "direct+p2p", entries, ev, ev.names, {}, region, progress=False, log=quiet) == []
    assert evaluate_row(out, "direct+p2p", entries[:1], ev, ev.names, {}, progress=False, log=quiet) == [entries[0].id]
    said = []
    summary = report(out, log=said.append)
    assert {k: v["all"]["pictures"] for k, v in summary.items()} == {"direct+p2p": 1, "direct+p2p [average=region]": 2}
    assert any(s.startswith("warning: direct+p2p's pictures were measured under 2 sets of conventions") for s in said)
    assert json.loads(metric_file(out, "direct+p2p", entries[1].id).read_text())["conventions"] == region
