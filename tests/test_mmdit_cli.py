"""`p2p generate | edit | invert` on the tiny SD3 and Flux folders (tests/fixtures/mmdit): the model's own
steps and guidance when none is given, mode joint-replace and its knobs, LocalBlend's MM-DiT flags, and
editing a photo through an inversion, as the API runs them."""
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import p2p
from p2p.cli import main

pytestmark = pytest.mark.slow  # each loads a folder and runs it: 5 to 15 s on a loaded 2-core machine
FIX = Path(__file__).parent / "fixtures" / "mmdit"
SD3, FLUX = str(FIX / "tiny-sd3"), str(FIX / "tiny-flux")
SRC, DST = "a cat sitting on a car", "a dog sitting on a car"


def sidecar(path) -> dict:
    return json.loads(Path(f"{path}.json").read_text())


@pytest.fixture
def calls(monkeypatch):
    """Every p2p.edit call of the command, its arguments and Output."""
    seen, edit = [], p2p.edit

    def record(sd, prompts, spec=None, **kwargs):
        out = edit(sd, prompts, spec, **kwargs)
        seen.append({"sd": sd, "prompts": prompts, "spec": spec, **kwargs, "out": out})
        return out
    monkeypatch.setattr(p2p, "edit", record)
    return seen


def docs_commands() -> list:
    """The commands of docs/mmdit-p2p.md's "The command line" block, continuation lines joined."""
    text = (Path(__file__).parent.parent / "docs" / "mmdit-p2p.md").read_text()
    block = text.split("## The command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


@pytest.fixture
def photo(tmp_path) -> str:
    a = np.zeros((64, 64, 3), np.uint8)
    a[..., 0], a[..., 1] = np.arange(64)[:, None] * 4, np.arange(64)[None] * 4
    a[16:48, 16:48, 2] = 200
    Image.fromarray(a).save(tmp_path / "photo.png")
    return str(tmp_path / "photo.png")


def test_generate_takes_the_models_own_steps_and_guidance(tmp_path):
    out = tmp_path / "g.png"
    assert main(["generate", "--ckpt", SD3, "--prompt", SRC, "--height", "32", "--width", "32", "-o", str(out)]) == 0
    s = sidecar(out)["settings"]
    assert (s["num_steps"], s["guidance_scale"], s["sampler"], s["steps_offset"]) == (28, 7.0, None, None)
    assert main(["generate", "--ckpt", FLUX, "--prompt", SRC, "--height", "32", "--width", "32", "--steps", "3",
                 "-o", str(out)]) == 0
    s = sidecar(out)["settings"]
    assert (s["num_steps"], s["guidance_scale"]) == (3, 3.5)


def test_edit_with_joint_replace_and_localblend_flags(tmp_path, calls):
    out = tmp_path / "e.png"
    assert main(["edit", "--ckpt", SD3, "--prompt", SRC, "--edit", DST, "--height", "32", "--width", "32",
                 "--steps", "4", "--replace-steps", "0.25", "0.75", "--projection", "qi", "--replace-blocks", "1",
                 "--blend", "cat", "dog", "--blend-end", "0.5", "--blend-blocks", "0", "2", "--show-attention",
                 "-o", str(out)]) == 0
    call = calls[0]
    assert call["spec"] == p2p.JointReplace(replace_steps=(0.25, 0.75), method="qi", blocks=(1,))
    blend = call["local_blend"]
    assert (blend.words, blend.end_blend, blend.blocks) == (("cat", "dog"), 0.5, (0, 2))
    assert (call["num_steps"], call["guidance_scale"], call["sampler"], call["steps_offset"]) == (4, 7.0, None, None)
    assert sorted(call["out"].attention.sums) == [0, 1, 2]
    assert sidecar(out)["settings"]["mode"] == "joint-replace"
    assert all((tmp_path / f"e_attention_{i}.png").is_file() for i in (0, 1))


def test_invert_then_edit_from_the_inversion(tmp_path, photo, calls):
    inv = tmp_path / "photo.inv"
    assert main(["invert", "--ckpt", FLUX, "--image", photo, "--prompt", SRC, "--height", "64", "--width", "64",
                 "--steps", "4", "--reconstruction", str(tmp_path / "rec.png"), "-o", str(inv)]) == 0
    s = sidecar(inv)["settings"]
    assert (s["method"], s["num_steps"], s["guidance_scale"]) == ("flow", 4, 3.5)
    saved = p2p.Inversion.load(inv)
    assert Image.open(tmp_path / "rec.png").size == (64, 64)
    out = tmp_path / "e.png"
    assert main(["edit", "--ckpt", FLUX, "--inversion", str(inv), "--edit", DST, "--source-row", "trajectory",
                 "--blend", "cat", "dog", "-o", str(out)]) == 0
    call = calls[0]
    assert call["prompts"] == [SRC, DST] and call["source_row"] == "trajectory"
    assert torch.equal(call["out"].latents[0], saved.trajectory[0][0])  # the photo's latents, exactly
    s = sidecar(out)["settings"]
    assert (s["num_steps"], s["guidance_scale"], s["height"]) == (4, 3.5, 64)


def test_edit_a_photo_inverts_it_first(tmp_path, photo, calls):
    out = tmp_path / "e.png"
    assert main(["edit", "--ckpt", SD3, "--image", photo, "--prompt", SRC, "--edit", DST, "--height", "32",
                 "--width", "32", "--steps", "3", "-o", str(out)]) == 0
    inv = calls[0]["inversion"]
    assert (inv.method, inv.num_steps, inv.guidance_scale, inv.height) == ("flow", 3, 1.0, 32)
    assert sidecar(out)["settings"]["method"] == "flow"


@pytest.mark.parametrize("args, message", [
    (["edit", "--ckpt", SD3, "--prompt", SRC, "--edit", DST, "--mode", "replace"],
     "an SD3 / Flux model is edited with mode joint-replace"),
    (["edit", "--prompt", SRC, "--edit", DST, "--mode", "joint-replace"],
     "joint-replace edits an SD3 / Flux model's joint attention; this checkpoint is a UNet model's"),
    (["edit", "--prompt", SRC, "--edit", DST, "--projection", "qi"],
     "projection: JointReplace's knobs apply to mode: joint-replace"),
    (["invert", "--ckpt", SD3, "--image", "PHOTO", "--prompt", SRC, "--method", "ddim"],
     "method='ddim': an MM-DiT model .* is inverted by the reverse Euler ODE"),
])
def test_errors_name_the_fix(tmp_path, photo, capsys, args, message):
    args = [photo if a == "PHOTO" else a for a in args]
    assert main([*args, "--height", "32", "--width", "32", "-o", str(tmp_path / "x.png")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()


def test_the_docs_commands_run(tmp_path, photo, monkeypatch):
    monkeypatch.chdir(tmp_path)  # photo.png is there; the outputs go there
    commands = docs_commands()
    assert [c.split()[1] for c in commands] == ["generate", "edit", "invert", "edit"]
    for cmd in commands:
        words = [w.replace("tests/fixtures/", f"{FIX.parent}/") for w in shlex.split(cmd)]
        assert main(words[1:]) == 0, cmd
    assert all(Path(f).is_file() for f in ("cat.png", "cat-dog.png", "photo-again.png", "photo.inv", "photo-dog.png"))
