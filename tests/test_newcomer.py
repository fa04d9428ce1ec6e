"""What a newcomer meets first: one rule for which attention maps a mask and its pictures read, defaults
that follow the named checkpoint, files and messages that behave like the rest of the tools."""
import argparse
import json
import os
import subprocess
import sys
import stat
from pathlib import Path

import pytest
import torch

import p2p
from p2p import LocalBlend, Replace
from p2p.miniature.demo import ROWS
from weights_tools import load_checkpoint

SRC, DST, WORDS, SEED = ROWS[1][1:]
KW = dict(num_steps=4, guidance_scale=5.0, progress=False, seed=SEED)


def test_named_checkpoint_recommends_its_blend_level_to_the_api(tmp_path):
    """load_checkpoint("miniature") carries its recommended level; LocalBlend without a level reads it in
    edit(), so the API, the command line and a sweep (all through edit()) make one mask."""
    sd = load_checkpoint("miniature")
    assert sd.blend_level == 0
    blend = lambda lv: LocalBlend(WORDS, threshold=0.5, level=lv)  # noqa: E731
    default, zero, deep = (p2p.edit(sd, [SRC, DST], Replace(), local_blend=blend(lv), **KW).latents
                           for lv in (None, 0, 1))
    assert torch.equal(default, zero) and not torch.equal(default, deep)


def test_loaded_parameters_need_no_grad(golden_dir):
    """The weights come back frozen: sd.decode() outside torch.no_grad() gives a picture to_uint8 takes."""
    sd = load_checkpoint(golden_dir / "tiny-sd-a.safetensors")
    assert sd.blend_level is None  # a path: the deepest level
    assert not any(p.requires_grad for p in sd.parameters())
    z = torch.zeros(1, 4, sd.cfg.image_size, sd.cfg.image_size)
    assert p2p.pipeline.to_uint8(sd.decode(z)).dtype == "uint8"


def test_a_config_s_checkpoint_path_is_relative_to_the_config(tmp_path, monkeypatch, golden_dir, capsys):
    """`ckpt:` in an edit or ablation file means the file beside it from any working directory (not a
    same-named file in the working directory); a missing one is an error naming the config file."""
    from p2p.cli import main
    from p2p.config import load_ablation, load_edit_config

    folder, elsewhere = tmp_path / "configs", tmp_path / "work"
    folder.mkdir(), elsewhere.mkdir()
    (folder / "m.safetensors").symlink_to(golden_dir / "tiny-sd-a.safetensors")
    (elsewhere / "m.safetensors").write_bytes(b"not this one")
    edit = folder / "e.yaml"
    edit.write_text("ckpt: m.safetensors\nprompt: a cat riding a bicycle\nedits: [a cat riding a car]\n")
    abl = folder / "a.yaml"
    abl.write_text("base: e.yaml\ngrid: {cross_replace_steps: [0.2, 0.8]}\n")
    monkeypatch.chdir(elsewhere)
    assert load_edit_config(edit).ckpt == str(folder / "m.safetensors")
    assert load_ablation(abl)["base"]["ckpt"] == str(folder / "m.safetensors")
    assert load_ablation(abl, {"ckpt": "m.safetensors"})["base"]["ckpt"] == str(elsewhere / "m.safetensors")
    edit.write_text("ckpt: gone.safetensors\nprompt: a cat riding a bicycle\nedits: [a cat riding a car]\n")
    assert main(["edit", "--config", str(edit), "-o", "x.png"]) == 2
    err = capsys.readouterr().err
    assert str(edit) in err and "relative to the file's folder" in err and str(folder / "gone.safetensors") in err
    with pytest.raises(FileNotFoundError, match=r"a\.yaml.*relative to the file's folder"):
        abl.write_text("ckpt: gone.safetensors\nbase: e.yaml\ngrid: {cross_replace_steps: [0.2, 0.8]}\n")
        load_ablation(abl)


def test_shipped_pictures_come_from_a_trained_model():
    """The shipped ablations and the notebooks draw with the miniature (a trained model: pictures of its
    prompts), not the random tiny checkpoint whose pictures are noise."""
    import json

    from p2p.config import load_ablation
    from weights_tools.registry import CHECKPOINTS

    root = Path(__file__).parent.parent
    for path in sorted((root / "configs" / "ablations").glob("*.yaml")):
        assert load_ablation(path)["base"]["ckpt"] in CHECKPOINTS, path.name
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        if any("display(" in "".join(c["source"]) and "image" in "".join(c["source"]) for c in cells):
            params = "".join(next(c for c in cells if "parameters" in c["metadata"].get("tags", []))["source"])
            assert 'os.environ.get("P2P_CKPT", "miniature")' in params, path.name


def test_make_tiny_ships_a_tiny_ldm_and_refuses_a_full_size_model(tmp_path, monkeypatch, capsys):
    """`--config tiny-ldm` writes a small LDM-400M-shaped file that loads with a BERT-sized vocabulary;
    `--config ldm-400m` is refused from its shapes, before anything is allocated; a path from another
    folder is not turned into configs/configs/X.yaml.yaml but answered with the shipped name."""
    import ldm_oracles as L
    from weights_tools.make_tiny import main

    monkeypatch.chdir(tmp_path)
    assert main(["t.safetensors", "--config", "tiny-ldm"]) == 0
    vocab = tmp_path / "vocab.txt"  # 30522 ids, as BERT's uncased vocabulary
    vocab.write_text("\n".join(L.VOCAB + [f"[unused{i}]" for i in range(30522 - len(L.VOCAB))]) + "\n")
    sd = load_checkpoint(tmp_path / "t.safetensors", tokenizer=vocab)
    assert sd.cfg.family == "ldm" and sum(p.numel() for p in sd.parameters()) < 10_000_000
    monkeypatch.setattr("weights_tools.tiny.tiny_state_dict", lambda *a: pytest.fail("allocated a full-size model"))
    assert main(["big.safetensors", "--config", "ldm-400m"]) == 2
    err = capsys.readouterr().err
    assert "full-size model" in err and "billion parameters" in err and "--full-size" in err
    assert main(["x.safetensors", "--config", "configs/tiny.yaml"]) == 2
    err = capsys.readouterr().err
    assert "configs/configs" not in err and "did you mean the shipped 'tiny'" in err
    assert not list(tmp_path.glob("big*")) and not list(tmp_path.glob("x.*"))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoints_get_the_mode_pictures_get(tmp_path, umask):
    """A written checkpoint's permissions are a picture's: 0666 less the umask (0644 under 022), not 0600."""
    from weights_tools.files import write_bytes_atomic
    from weights_tools.tiny import make_tiny

    old = os.umask(umask)
    try:
        ckpt = make_tiny(tmp_path / "t.safetensors")
        picture = write_bytes_atomic(tmp_path / "p.png", b"png")
    finally:
        os.umask(old)
    assert stat.S_IMODE(ckpt.stat().st_mode) == stat.S_IMODE(picture.stat().st_mode) == 0o666 & ~umask


def test_the_commands_take_the_miniature_by_name(tmp_path, capsys):
    """`p2p inspect miniature` describes it; `p2p invert` without --ckpt inverts with it, as generate and
    edit do; `p2p edit --inversion F` without --prompt edits from the prompt F holds."""
    from PIL import Image

    from p2p.cli import main

    assert main(["inspect", "miniature"]) == 0
    assert "miniature.safetensors" in capsys.readouterr().out
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (30, 60, 230)).save(photo)
    inv = tmp_path / "c.inv"
    assert main(["invert", "--image", str(photo), "--prompt", SRC, "--method", "ddim", "--steps", "2",
                 "-o", str(inv)]) == 0
    assert p2p.Inversion.load(inv).prompt == SRC
    assert main(["edit", "--inversion", str(inv), "--edit", DST, "-o", str(tmp_path / "e.png")]) == 0
    record = json.loads((tmp_path / "e.png.json").read_text())
    assert record["settings"]["prompt"] == SRC and record["settings"]["edits"] == [DST]


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`p2p inspect X | head -1`: one line, no "Broken pipe" and no traceback on stderr."""
    cmd = f"{sys.executable} -m p2p.cli inspect miniature | head -1"
    run = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300,
                         env=os.environ | {"PYTHONPATH": str(Path(__file__).parent.parent)})
    assert len(run.stdout.splitlines()) == 1 and run.stderr == "", run.stderr


def test_out_of_memory_is_a_message_not_a_traceback(monkeypatch, capsys, tmp_path):
    """The CPU allocator's RuntimeError reaches the command line as one line with what to try; any other
    RuntimeError stays an exception (a bug is not hidden)."""
    from p2p.cli import main

    def alloc(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 171798691840 bytes.")
    monkeypatch.setattr(p2p, "generate", alloc)
    argv = ["generate", "--prompt", SRC, "--steps", "1", "-o", str(tmp_path / "g.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "--low-memory" in err and "Traceback" not in err
    def bug(*a, **k):
        raise RuntimeError("bug")
    monkeypatch.setattr(p2p, "generate", bug)
    with pytest.raises(RuntimeError, match="bug"):
        main(argv)
    assert not list(tmp_path.iterdir())


@pytest.fixture
def threads_kept():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_every_command_takes_threads(threads_kept, monkeypatch, capsys):
    """--threads N on every command sets torch's CPU threads; auto (the default) is torch's count where the
    cores are idle and one thread where other processes keep them busy; a bad value is a clear error."""
    from p2p import settings
    from p2p.cli import main, parser
    from p2p.sweep.command import add_arguments

    sub = next(a for a in parser()._actions if a.dest == "command")
    for name, q in sub.choices.items():
        nested = next((a for a in q._actions if isinstance(a, argparse._SubParsersAction)), None)
        for leaf, r in (nested.choices.items() if nested else [(name, q)]):  # p2p bench pie | eval | report
            assert "--threads" in r.format_help() or leaf == "report", leaf  # bench report reads JSON only
    assert "--threads" in add_arguments(argparse.ArgumentParser()).format_help()
    assert main(["inspect", "miniature", "--threads", "1"]) == 0 and torch.get_num_threads() == 1
    monkeypatch.setattr(settings.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(settings, "TORCH_THREADS", settings.cpu_cores())  # as without OMP_NUM_THREADS
    assert settings.auto_threads() == settings.cpu_cores()
    assert main(["inspect", "miniature"]) == 0 and torch.get_num_threads() == settings.cpu_cores()
    monkeypatch.setattr(settings.os, "getloadavg", lambda: (8.0, 8.0, 8.0))  # every core busy
    assert settings.auto_threads() == 1 and main(["inspect", "miniature", "--threads", "auto"]) == 0
    assert torch.get_num_threads() == 1
    capsys.readouterr()
    for bad in ("0", "two", "1.5"):
        assert main(["inspect", "miniature", "--threads", bad]) == 2
        assert "threads" in capsys.readouterr().err


def test_the_shipped_sidecar_holds_only_current_keys():
    """docs/edit.png.json, the example of a run's record, uses the names a config file takes today (an old
    name there is one the README calls an error)."""
    from p2p.config import EDIT_KEYS
    from p2p.settings import renamed

    record = json.loads((Path(__file__).parent.parent / "docs" / "edit.png.json").read_text())
    keys = set(record["settings"])
    assert keys <= set(EDIT_KEYS) and not keys & set(renamed()), keys - set(EDIT_KEYS)


def test_the_quick_subset_leaves_the_slow_modules_out():
    """`-m "not slow"`: the marker is registered (no warning), and every parity, golden, notebook and
    precision module carries it."""
    import configparser

    from conftest import is_slow

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).parent.parent / "setup.cfg")
    assert cfg["tool:pytest"]["markers"].strip().startswith("slow:")
    tests = sorted(Path(__file__).parent.glob("test_*.py"))
    slow = {p.name for p in tests if is_slow(p)}
    wanted = {p.name for p in tests if p.name.startswith(("test_parity_", "test_golden", "test_notebooks",
                                                            "test_precision"))}
    assert len(wanted) >= 10 and wanted <= slow and len(slow) < len(tests) / 2
