"""A run writes all its files or none; every output has its own sidecar; the same command twice
gives the same bytes. The CLI runs in-process on the golden tiny checkpoint with few steps."""
import json
import os
import struct
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

import p2p
import p2p.cli
from weights_tools.files import file_sha256, hashed_read, write_files_atomic

from conftest import GOLDEN_CKPT

FAST = ["--steps", "2", "--height", "32", "--width", "32"]
EDIT = ["edit", "--ckpt", str(GOLDEN_CKPT), "--prompt", "a cat riding a bicycle", "--edit", "a cat riding a car",
        "--seed", "8888", *FAST]


def everything(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


# ------------------------------------------------------------------------------- the writer
def test_a_folder_among_the_paths_leaves_every_path_as_it_was(tmp_path):
    (tmp_path / "old.png").write_bytes(b"old")
    (tmp_path / "c.png").mkdir()
    files = {tmp_path / "old.png": b"new", tmp_path / "sub" / "b.json": b"{}", tmp_path / "c.png": b"c"}
    with pytest.raises(IsADirectoryError, match="c.png is a folder"):
        write_files_atomic(files)
    assert everything(tmp_path) == {"old.png": b"old", "c.png": None}  # no temporaries, no new folder


def test_a_failing_rename_removes_what_was_renamed(tmp_path, monkeypatch):
    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise PermissionError(f"cannot rename onto {dst}")
        real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(PermissionError):
        write_files_atomic({tmp_path / "a.png": b"a", tmp_path / "b.png": b"b", tmp_path / "c.png": b"c"})
    assert everything(tmp_path) == {}


def test_a_failing_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_files_atomic({tmp_path / "new" / "a.png": b"a", tmp_path / "new" / "b.png": "not bytes"})
    assert everything(tmp_path) == {}


def test_two_outputs_of_one_path_are_refused(tmp_path):
    with pytest.raises(ValueError, match="two outputs share a path"):
        write_files_atomic({tmp_path / "a.png": b"a", str(tmp_path / "a.png"): b"b"})


def test_two_runs_writing_one_output_group_do_not_mix(tmp_path, monkeypatch):
    # run A is slow between its two renames; run B, started meanwhile, used to land between them:
    # out.png from B, out.png.json from A
    real = os.replace

    def slow_for_a(src, dst):
        if str(dst).endswith(".json") and Path(src).read_bytes().startswith(b"A"):
            time.sleep(0.3)
        real(src, dst)

    monkeypatch.setattr(os, "replace", slow_for_a)
    out = tmp_path / "out.png"

    def write(tag):
        write_files_atomic({out: tag + b" picture", Path(f"{out}.json"): tag + b" record"})

    a = threading.Thread(target=write, args=(b"A",))
    a.start()
    time.sleep(0.1)
    write(b"B")
    a.join()
    assert out.read_bytes()[:1] == Path(f"{out}.json").read_bytes()[:1]      # one run's group, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "out.png.json"]   # no lock or temporary left


# ------------------------------------------------------------------------------- the CLI
def test_an_unwritable_attention_picture_stops_the_run_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """--show-attention writes the grid, the sidecar and 2 pictures per prompt: one of them a folder
    stops the run before anything is computed or written."""
    monkeypatch.setattr(p2p.cli, "load_model", lambda *a: pytest.fail("the model was loaded"))
    (tmp_path / "edit_self_attention_1.png").mkdir()
    assert p2p.cli.main([*EDIT, "--show-attention", "-o", str(tmp_path / "edit.png")]) == 2
    assert "edit_self_attention_1.png is a folder" in capsys.readouterr().err
    assert everything(tmp_path) == {"edit_self_attention_1.png": None}


def test_a_reconstruction_that_cannot_be_written_leaves_no_inversion(tmp_path, capsys, monkeypatch):
    """The reconstruction's path turns into a folder while the inversion runs (checking paths first
    cannot see that): the .inv and its sidecar are not left behind either."""
    photo = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(photo)
    real = p2p.cli.run_inversion

    def meanwhile(*args):
        (tmp_path / "rec.png").mkdir()
        return real(*args)

    monkeypatch.setattr(p2p.cli, "run_inversion", meanwhile)
    argv = ["invert", "--ckpt", str(GOLDEN_CKPT), "--image", str(photo), "--prompt", "a red square", "--method",
            "ddim", "--reconstruction", str(tmp_path / "rec.png"), *FAST, "-o", str(tmp_path / "cat.inv")]
    assert p2p.cli.main(argv) == 2
    assert sorted(everything(tmp_path)) == ["photo.png", "rec.png"]
    assert "rec.png is a folder" in capsys.readouterr().err


def test_outputs_differing_in_extension_keep_one_record_each(tmp_path):
    for ext in ("png", "jpg"):
        assert p2p.cli.main(["generate", "--ckpt", str(GOLDEN_CKPT), "--prompt", "a cat", *FAST,
                             "-o", str(tmp_path / f"x.{ext}")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jpg", "x.jpg.json", "x.png", "x.png.json"]
    for ext in ("png", "jpg"):
        assert json.loads((tmp_path / f"x.{ext}.json").read_text())["argv"][-1] == str(tmp_path / f"x.{ext}")


@pytest.mark.parametrize("argv", [["generate", "--ckpt", str(GOLDEN_CKPT), "--prompt", "a cat", "--prompt", "a dog",
                                   *FAST], [*EDIT, "--show-attention"]], ids=["generate", "edit"])
def test_the_same_command_twice_gives_the_same_bytes(tmp_path, argv):
    runs = []
    for _ in range(2):
        assert p2p.cli.main([*argv, "-o", str(tmp_path / "out.png")]) == 0
        runs.append(everything(tmp_path))
    assert runs[0] == runs[1] and len(runs[0]) >= 2


def test_a_checkpoint_rewritten_or_moved_after_loading_changes_neither_picture_nor_record(tmp_path, monkeypatch):
    # the weights were views of the file's memory map: rewritten in place (same size) the run mixed two
    # models or died of SIGBUS; the sidecar's SHA-256 was taken after sampling (the new file's, or, the
    # file moved, an error that threw the finished run away)
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(GOLDEN_CKPT.read_bytes())
    original = file_sha256(ckpt)

    def argv(out):
        return ["generate", "--ckpt", str(ckpt), "--prompt", "a cat", "--steps", "2", "--height", "32",
                "--width", "32", "-o", str(out)]

    assert p2p.cli.main(argv(tmp_path / "clean.png")) == 0
    real = p2p.generate

    def rewritten(*a, **k):
        start = 8 + struct.unpack("<Q", ckpt.read_bytes()[:8])[0]
        with open(ckpt, "r+b") as f:                      # other weights, in place, the same size
            f.seek(start)
            f.write(bytes(ckpt.stat().st_size - start))
        return real(*a, **k)

    def moved(*a, **k):
        ckpt.rename(tmp_path / "elsewhere.safetensors")
        return real(*a, **k)

    for name, during in (("rewritten", rewritten), ("moved", moved)):
        ckpt.write_bytes(GOLDEN_CKPT.read_bytes())
        monkeypatch.setattr(p2p, "generate", during)
        assert p2p.cli.main(argv(tmp_path / f"{name}.png")) == 0, name
        assert (tmp_path / f"{name}.png").read_bytes() == (tmp_path / "clean.png").read_bytes(), name
        assert json.loads((tmp_path / f"{name}.png.json").read_text())["checkpoint_sha256"] == original, name


def test_a_checkpoint_changed_while_it_is_read_is_an_error(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(GOLDEN_CKPT.read_bytes())

    def read():
        ckpt.write_bytes(ckpt.read_bytes()[:-4] + b"\0\0\0\0")
        return "read"
    with pytest.raises(OSError, match="changed while it was being read"):
        hashed_read(ckpt, read)
    assert hashed_read(ckpt, lambda: "read") == ("read", file_sha256(ckpt))


def test_a_vae_moved_during_a_run_is_recorded_as_the_one_read(tmp_path, monkeypatch, tiny_sd):
    """--vae's SHA-256 is taken when the VAE is read, as the checkpoint's: a file moved or replaced during the
    run neither throws the finished run away nor names other bytes in the record."""
    from safetensors.torch import save_file

    vae = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_sd.vae.state_dict().items()}, str(vae))
    original = file_sha256(vae)
    real = p2p.generate

    def replaced(*a, **k):
        vae.rename(tmp_path / "elsewhere.safetensors")
        vae.write_bytes(b"another file")
        return real(*a, **k)

    monkeypatch.setattr(p2p, "generate", replaced)
    out = tmp_path / "out.png"
    assert p2p.cli.main(["generate", "--ckpt", str(GOLDEN_CKPT), "--vae", str(vae), "--prompt", "a cat", "--steps",
                         "2", "--height", "32", "--width", "32", "-o", str(out)]) == 0
    assert json.loads((tmp_path / "out.png.json").read_text())["vae_sha256"] == original
