"""An inversion records the weights it was made with (p2p.fingerprint) and refuses to edit with others.

The same file in fp32, fp16 and bf16 is one model; another draw of the same shapes, or one changed
tensor, is another; the fingerprint is cached and taken again after an in-place change; editing or
reconstructing from another model's inversion is an error naming both, or with allow_other_model a
warning; an .inv saved before fingerprints existed loads and warns; the CLI has --allow-other-model."""
import dataclasses
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from p2p import Inversion, Replace, edit, invert
from p2p.cli import main
from p2p.fingerprint import SAMPLES, fingerprint, sample_positions
from p2p.inversion import reconstruct
from weights_tools import load_checkpoint
from weights_tools.tiny import make_tiny

from conftest import GOLDEN_CKPT

PROMPT, EDITED = "a red circle on a gradient", "a blue circle on a gradient"
FAST = ["--steps", "2", "--height", "32", "--width", "32"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory, tiny_sd):
    """Another checkpoint of exactly the golden one's shapes: another seed's draw."""
    return make_tiny(tmp_path_factory.mktemp("other") / "other.safetensors", seed=1, config=tiny_sd.cfg)


@pytest.fixture(scope="module")
def inv(tiny_sd):
    return invert(tiny_sd, torch.zeros(1, 3, 32, 32), PROMPT, method="ddim", num_steps=2, progress=False)


def test_one_file_in_every_precision_is_one_model():
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    fps = {d: fingerprint(load_checkpoint(GOLDEN_CKPT, dtype=d)) for d in dtypes}
    assert all(a.matches(b) for a in fps.values() for b in fps.values())
    assert fps[torch.float32].digest == fps[torch.float16].digest  # rounding to fp16 twice changes nothing
    assert fps[torch.float32].sample.numel() > 600 * SAMPLES // 2   # every tensor sampled


def test_other_weights_of_the_same_shapes_are_another_model(tiny_sd, other_ckpt):
    mine, other = fingerprint(tiny_sd), fingerprint(load_checkpoint(other_ckpt))
    assert mine.layout == other.layout and not mine.matches(other) and mine.digest != other.digest


def test_cached_and_taken_again_after_an_in_place_change():
    sd = load_checkpoint(GOLDEN_CKPT)
    before = fingerprint(sd)
    assert fingerprint(sd) is before
    with torch.no_grad():
        sd.unet.out[2].bias.mul_(1.01)  # one tensor of 653, by one percent
    after = fingerprint(sd)
    assert after is not before and not after.matches(before)
    # nor does the fp16 rounding allowance (~1e-3 relative) hide it
    assert not after.matches(fingerprint(load_checkpoint(GOLDEN_CKPT, dtype=torch.float16)))


def test_editing_with_another_model_is_refused_naming_both(tiny_sd, inv, other_ckpt):
    other = load_checkpoint(other_ckpt)
    for run in (lambda **k: edit(other, [PROMPT, EDITED], Replace(), inversion=inv, progress=False, **k),
                lambda **k: reconstruct(other, inv, progress=False, **k)):
        with pytest.raises(ValueError) as e:
            run()
        for name in (str(fingerprint(tiny_sd)), str(fingerprint(other)), "allow_other_model=True",
                     "--allow-other-model"):
            assert name in str(e.value)
        with pytest.warns(UserWarning, match="editing anyway"):
            run(allow_other_model=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        edit(tiny_sd, [PROMPT, EDITED], Replace(), inversion=inv, progress=False)  # its own model: silent


def test_the_fingerprint_survives_saving(inv, tmp_path):
    back = Inversion.load(inv.save(tmp_path / "x.inv"))
    assert back.model.digest == inv.model.digest and back.model.matches(inv.model)


def without_fingerprint(src, dst):
    """What p2p saved before inversions recorded their model."""
    with safe_open(str(src), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if k != "model_sample"}
    meta = json.loads(metadata["inversion"])
    del meta["model"]
    save_file(tensors, str(dst), metadata={"format": metadata["format"], "inversion": json.dumps(meta)})
    return dst


def test_an_old_inversion_without_a_fingerprint_loads_and_warns(tiny_sd, inv, tmp_path):
    old = Inversion.load(without_fingerprint(inv.save(tmp_path / "new.inv"), tmp_path / "old.inv"))
    assert old.model is None
    with pytest.warns(UserWarning, match="without the fingerprint of the model"):
        edit(tiny_sd, [PROMPT, EDITED], Replace(), inversion=old, progress=False)


def test_the_cli_refuses_another_models_inversion_unless_allowed(tmp_path, inv, other_ckpt, capsys):
    path = inv.save(tmp_path / "x.inv")
    argv = ["edit", "--ckpt", str(other_ckpt), "--inversion", str(path), "--prompt", PROMPT, "--edit", EDITED]
    assert main([*argv, "-o", str(tmp_path / "refused.png")]) == 2
    assert "--allow-other-model" in capsys.readouterr().err and not (tmp_path / "refused.png").exists()
    with pytest.warns(UserWarning, match="editing anyway"):
        assert main([*argv, "--allow-other-model", "-o", str(tmp_path / "allowed.png")]) == 0
    record = json.loads((tmp_path / "allowed.png.json").read_text())
    assert record["settings"]["inversion_model"] == str(inv.model)


@pytest.mark.parametrize("n", [1, 2, SAMPLES, SAMPLES + 1, 320 * 320 * 288])  # the last: SD v1's largest tensor
def test_sample_positions_span_the_tensor(n):
    pos = sample_positions(n)
    assert pos[0] == 0 and pos[-1] == n - 1 and len(pos) == min(n, SAMPLES) and bool((pos.diff() > 0).all())


def test_an_inversion_records_how_the_model_was_read_and_refuses_another_prediction_type(tiny_sd, inv, tmp_path,
                                                                                           capsys):
    # the same weights read as v passed the fingerprint check and reconstructed ~11x worse
    back = Inversion.load(inv.save(tmp_path / "x.inv"))
    assert (back.prediction_type, back.scale_factor, back.shift_factor) == (
        "epsilon", tiny_sd.cfg.scale_factor, tiny_sd.cfg.shift_factor)
    as_v = load_checkpoint(GOLDEN_CKPT, prediction_type="v")
    for use in (lambda: edit(as_v, [PROMPT, EDITED], Replace(), inversion=back, progress=False),
                lambda: reconstruct(as_v, back, progress=False, allow_other_model=True)):
        with pytest.raises(ValueError, match=r"made under prediction_type 'epsilon' \(this model: 'v'\).*"
                                             r"--prediction-type epsilon"):
            use()
    argv = ["edit", "--ckpt", str(GOLDEN_CKPT), "--prediction-type", "v", "--inversion", str(tmp_path / "x.inv"),
            "--prompt", PROMPT, "--edit", EDITED, "-o", str(tmp_path / "v.png")]
    assert main(argv) == 2 and "prediction_type 'epsilon'" in capsys.readouterr().err
    assert not (tmp_path / "v.png").exists()


def test_an_inversion_made_under_another_vae_scale_is_refused(tiny_sd, inv):
    other = load_checkpoint(GOLDEN_CKPT, config=dataclasses.replace(tiny_sd.cfg, scale_factor=tiny_sd.cfg.scale_factor * 2))
    with pytest.raises(ValueError, match=r"made under scale_factor"):
        edit(other, [PROMPT, EDITED], Replace(), inversion=inv, progress=False)


def test_an_old_inversion_without_its_prediction_type_loads_and_warns(tiny_sd, inv, tmp_path):
    path = inv.save(tmp_path / "new.inv")
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = {k: v for k, v in json.loads(metadata["inversion"]).items()
            if k not in ("prediction_type", "scale_factor", "shift_factor")}
    save_file(tensors, str(tmp_path / "old.inv"), metadata={"format": metadata["format"], "inversion": json.dumps(meta)})
    old = Inversion.load(tmp_path / "old.inv")
    assert old.prediction_type is None
    with pytest.warns(UserWarning, match="without the prediction type"):
        edit(tiny_sd, [PROMPT, EDITED], Replace(), inversion=old, progress=False)
