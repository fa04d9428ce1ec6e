"""Real-image editing on the golden tiny checkpoint (64 px, fp32 CPU), with few steps.

Null-text inversion reconstructs closer than DDIM inversion under guidance 7.5; Direct Inversion
reconstructs exactly; negative-prompt inversion samples with the source prompt as its own negative;
an Inversion saves and loads; editing P into P reproduces the reconstruction; the CLI runs and a
failing run writes nothing."""
import json

import pytest
import torch
from safetensors import safe_open

from p2p import Inversion, Replace, edit, invert
from p2p.cli import main
from p2p.inversion import reconstruct
from p2p.pipeline import denoise

PROMPT = "a red circle on a gradient"
EDITED = "a blue circle on a gradient"
STEPS, INNER = 5, 5


def smooth_image(side: int) -> torch.Tensor:
    """Gradients and a disc, (1, 3, side, side) in [-1, 1]: smooth, not noise."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    disc = ((x - 0.2) ** 2 + y ** 2 < 0.3).float()
    return torch.stack([x * 0.8, y * 0.8, disc * 1.2 - 0.6])[None].clamp(-1, 1)


def mse(a, b) -> float:
    return torch.mean((a - b) ** 2).item()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inversions(tiny_sd, one_thread):
    img = smooth_image(64)
    return {m: invert(tiny_sd, img, PROMPT, method=m, num_steps=STEPS, num_inner_steps=INNER, progress=False)
            for m in ("ddim", "null-text", "direct")}


def test_null_text_reconstructs_closer_than_ddim(tiny_sd, inversions):
    ddim, null = inversions["ddim"], inversions["null-text"]
    assert torch.equal(ddim.image_latents, null.image_latents) and torch.equal(ddim.x_T, null.x_T)
    e_ddim = mse(reconstruct(tiny_sd, ddim, progress=False), ddim.image_latents)
    e_null = mse(reconstruct(tiny_sd, null, progress=False), null.image_latents)
    print(f"\nreconstruction MSE vs input latents (guidance 7.5, {STEPS} steps): DDIM {e_ddim:.4g}, "
          f"null-text {e_null:.4g}, ratio {e_null / e_ddim:.3f}; inner iterations {null.info['inner_iterations']}")
    assert e_null / e_ddim < 1
    assert len(null.uncond_embeddings) == STEPS
    assert null.uncond_embeddings[0].shape == (77, tiny_sd.cfg.unet.context_dim)
    assert not torch.equal(null.uncond_embeddings[0], null.uncond_embeddings[-1])  # optimised per step


def test_direct_inversion_reconstructs_exactly(tiny_sd, inversions):
    inv = inversions["direct"]
    z = reconstruct(tiny_sd, inv, progress=False)
    assert (z - inv.image_latents).abs().max() <= 1e-5 * inv.image_latents.abs().max()
    # in an edit only the source row is corrected: the edited row goes its own way. (The source row
    # is exact only up to the UNet's batch-size rounding, ~1e-6 here, which 5 guided steps of a
    # random model amplify: hence a relative bound, not 1e-5.)
    out = edit(tiny_sd, [PROMPT, EDITED], Replace(), inversion=inv, progress=False)
    e_src, e_edit = mse(out.latents[0], inv.image_latents[0]), mse(out.latents[1], inv.image_latents[0])
    print(f"\ndirect inversion in an edit: source row MSE {e_src:.3g}, edited row MSE {e_edit:.3g}")
    assert e_src < 1e-2 * e_edit


def test_unet_grad_flags_restored_and_no_weight_grads(tiny_sd):
    first = next(tiny_sd.unet.parameters())
    tiny_sd.unet.requires_grad_(True)
    try:
        invert(tiny_sd, smooth_image(32), PROMPT, num_steps=2, num_inner_steps=2, progress=False)
        assert all(p.requires_grad for p in tiny_sd.unet.parameters())
        assert all(p.grad is None for p in tiny_sd.unet.parameters())  # frozen during the optimisation
    finally:
        tiny_sd.unet.requires_grad_(False)
    assert not first.requires_grad


def test_negative_prompt_uses_the_source_prompt_as_uncond(tiny_sd):
    inv = invert(tiny_sd, smooth_image(32), PROMPT, method="negative-prompt", num_steps=3, progress=False)
    assert inv.uncond_embeddings is None and inv.residuals is None
    cond = tiny_sd.encode_text([PROMPT])
    # uncond = cond: guidance drops out, the source samples with eps(z, t, C) alone
    with torch.no_grad():
        expected = denoise(tiny_sd, cond, cond, inv.x_T, tiny_sd.scheduler(3), 1.0, progress=False)
    assert torch.allclose(reconstruct(tiny_sd, inv, progress=False), expected, atol=1e-5)


def test_save_load_round_trip_and_identity_edit(tiny_sd, inversions, tmp_path):
    for method, inv in inversions.items():
        path = inv.save(tmp_path / f"{method}.inv")
        back = Inversion.load(path)
        for key in ("method", "prompt", "num_steps", "guidance_scale", "steps_offset", "height", "width", "info"):
            assert getattr(back, key) == getattr(inv, key), key
        assert torch.equal(back.x_T, inv.x_T)
        assert all(torch.equal(a, b) for a, b in zip(back.trajectory, inv.trajectory, strict=True))
        for key in ("uncond_embeddings", "residuals"):
            mine, theirs = getattr(inv, key), getattr(back, key)
            assert (mine is None) == (theirs is None), key
            assert mine is None or all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddim.inv", "direct.inv", "null-text.inv"]  # no temp files

    inv = Inversion.load(tmp_path / "null-text.inv")
    rec = reconstruct(tiny_sd, inv, progress=False)
    out = edit(tiny_sd, [PROMPT, PROMPT], Replace(), inversion=inv, progress=False)
    # equal up to float rounding (the edit's UNet batch is 4 rows, the reconstruction's 2: ~1e-6
    # apart per call, amplified over the guided steps of a random model)
    assert (out.latents - rec).abs().max() <= 1e-4 * rec.abs().max()
    assert torch.equal(out.x_T, inv.x_T)


def test_edit_from_inversion_errors(tiny_sd, inversions, tmp_path):
    inv = inversions["ddim"]
    with pytest.raises(ValueError, match="inverted prompt"):
        edit(tiny_sd, ["a dog", "a cat"], Replace(), inversion=inv, progress=False)
    with pytest.raises(ValueError, match="num_steps=50 conflicts"):
        edit(tiny_sd, [PROMPT, EDITED], Replace(), inversion=inv, num_steps=50, progress=False)
    with pytest.raises(ValueError, match="latents"):
        edit(tiny_sd, [PROMPT, EDITED], Replace(), inversion=inv, latents=inv.x_T, progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        invert(tiny_sd, smooth_image(32), PROMPT, method="dmd", progress=False)
    bad = tmp_path / "x.inv"
    bad.write_text("not a safetensors file")
    with pytest.raises(ValueError, match="x.inv"):
        Inversion.load(bad)
    with pytest.raises(FileNotFoundError, match="nothing.inv"):
        Inversion.load(tmp_path / "nothing.inv")


# ------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("photo") / "photo.png"
    x = ((smooth_image(48)[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    Image.fromarray(x).save(path)
    return path


FAST = ["--steps", "2", "--height", "32", "--width", "32"]


def test_cli_invert_then_edit(tmp_path, golden_dir, photo):
    ckpt = str(golden_dir / "tiny-sd-a.safetensors")
    out = tmp_path / "cat.inv"
    assert main(["invert", "--ckpt", ckpt, "--image", str(photo), "--prompt", PROMPT, "--inner-steps", "2",
                 "--offsets", "0", "0", "8", "0", "--reconstruction", str(tmp_path / "rec.png"), *FAST,
                 "-o", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.inv", "cat.inv.json", "rec.png"]
    inv = Inversion.load(out)
    assert (inv.method, inv.num_steps, inv.height, len(inv.uncond_embeddings)) == ("null-text", 2, 32, 2)
    assert json.loads((tmp_path / "cat.inv.json").read_text())["settings"]["offsets"] == [0, 0, 8, 0]

    assert main(["edit", "--ckpt", ckpt, "--inversion", str(out), "--prompt", PROMPT, "--edit", EDITED,
                 "-o", str(tmp_path / "edit.png")]) == 0
    record = json.loads((tmp_path / "edit.png.json").read_text())
    assert record["settings"]["num_steps"] == 2 and record["settings"]["method"] == "null-text"

    assert main(["edit", "--ckpt", ckpt, "--image", str(photo), "--method", "direct", "--prompt", PROMPT,
                 "--edit", EDITED, *FAST, "-o", str(tmp_path / "direct.png")]) == 0
    assert (tmp_path / "direct.png").exists() and (tmp_path / "direct.png.json").exists()


def test_cli_failures_write_nothing(tmp_path, golden_dir, photo, capsys):
    ckpt = str(golden_dir / "tiny-sd-a.safetensors")
    fake = tmp_path / "fake.jpg"
    fake.write_text("hello")
    out = tmp_path / "out"
    out.mkdir()
    assert main(["invert", "--ckpt", ckpt, "--image", str(fake), "--prompt", PROMPT, *FAST,
                 "-o", str(out / "x.inv")]) == 2
    assert "fake.jpg" in capsys.readouterr().err
    inv = invert_small(golden_dir, tmp_path / "ok.inv", photo)
    assert main(["edit", "--ckpt", ckpt, "--inversion", str(inv), "--prompt", "a dog on a gradient",
                 "--edit", "a cat on a gradient", "-o", str(out / "e.png")]) == 2
    assert "inverted prompt" in capsys.readouterr().err
    assert main(["edit", "--ckpt", ckpt, "--inversion", str(inv), "--prompt", PROMPT, "--edit", EDITED,
                 "--steps", "7", "-o", str(out / "e.png")]) == 2
    assert "conflicts" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def invert_small(golden_dir, path, photo):
    from weights_tools import load_checkpoint

    sd = load_checkpoint(golden_dir / "tiny-sd-a.safetensors")
    return invert(sd, photo, PROMPT, method="ddim", num_steps=2, height=32, width=32, progress=False).save(path)


def tampered(src, dst, edit_meta=None, edit_tensors=None):
    """A copy of a saved Inversion with its metadata and / or tensors changed."""
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(metadata["inversion"])
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst), metadata={"format": metadata["format"], "inversion": json.dumps(meta)})
    return dst


@pytest.mark.parametrize("edit_meta, edit_tensors, pattern", [
    (lambda m: m.update(extra=1), None, "its metadata must have the keys"),
    (lambda m: m.pop("steps_offset"), None, "its metadata must have the keys"),
    (lambda m: m.update(num_steps="3"), None, "'num_steps' is '3', not a int"),
    (lambda m: m.update(guidance_scale=float("nan")), None, "'guidance_scale' is 'nan'"),
    (lambda m: m.update(method="magic"), None, "method 'magic'"),
    (None, lambda t: t.pop("x_T"), "x_T must be a"),
    (None, lambda t: t.update(trajectory=t["trajectory"][:2]), "trajectory must have shape"),
    (None, lambda t: t.update(uncond_embeddings=t["uncond_embeddings"][:1]), "uncond_embeddings must have shape"),
    (None, lambda t: t.pop("uncond_embeddings"), "uncond_embeddings must have shape"),
    (lambda m: m.update(model="abc"), None, "'model' is 'abc', not a dict"),
    (lambda m: m["model"].update(digest="0" * 16), None, "the model's digest '0000000000000000' is not the one"),
    (lambda m: m["model"].update(dtype="int8"), None, "'model' has dtype 'int8'"),
    (lambda m: m["model"].pop("layout"), None, "'model' must map layout, dtype and digest"),
    (None, lambda t: t.update(model_sample=t["model_sample"] * 1.01), "the model's digest .* is not the one"),
    (None, lambda t: t.update(model_sample=t["model_sample"][:, None]), "model_sample must be a finite 1-D"),
    (None, lambda t: t.pop("model_sample"), "model_sample must be a finite 1-D"),
    (lambda m: m.pop("model"), None, "it holds model_sample but no 'model' entry"),
])
def test_tampered_inversion_files_are_refused(inversions, tmp_path, edit_meta, edit_tensors, pattern):
    """Every tampering of a saved .inv gets one ValueError naming the file and the fix, never a traceback."""
    src = inversions["null-text"].save(tmp_path / "ok.inv")
    bad = tampered(src, tmp_path / "bad.inv", edit_meta, edit_tensors)
    with pytest.raises(ValueError, match=f"bad.inv: not a usable saved Inversion: {pattern}"):
        Inversion.load(bad)
