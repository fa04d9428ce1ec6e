"""Real photographs on the tiny SD3 and Flux folders (tests/fixtures/mmdit): the reverse Euler inversion
reconstructs the photo to the sampler's accuracy (closer as the steps grow), the trajectory source row gives
it back exactly, the inversion saves and loads as a UNet's does, and the models' own default steps and
guidance apply when none is given."""
import inspect
from pathlib import Path

import pytest
import torch

import p2p
from models.flux_model import Flux
from p2p.inversion import reconstruct
from p2p.joint_control import joint_edit
from p2p.joint_pipeline import to_uint8_rounded
from p2p.settings import setting
from weights_tools import load_checkpoint

FIX = Path(__file__).parent / "fixtures" / "mmdit"
PROMPT, EDIT = "a cat sitting on a car", "a dog sitting on a car"
SIZE = 64


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def model(request):
    return load_checkpoint(FIX / request.param).requires_grad_(False)


def photo() -> torch.Tensor:
    """A smooth (1, 3, 64, 64) picture in [-1, 1], p2p.invert's tensor convention."""
    g = torch.linspace(-1, 1, SIZE)
    rows, cols = g[:, None].expand(SIZE, SIZE), g[None, :].expand(SIZE, SIZE)
    return 0.8 * torch.stack([rows, cols, rows * cols])[None]


def test_generating_from_the_inverted_latent_gives_the_photo_back_closer_as_the_steps_grow(model):
    errors = []
    for n in (4, 8, 16):
        inv = p2p.invert(model, photo(), PROMPT, num_steps=n, progress=False)
        assert inv.method == "flow" and len(inv.trajectory) == n + 1 and inv.x_T is inv.trajectory[-1]
        out = p2p.generate(model, PROMPT, latents=inv.x_T, num_steps=n, guidance_scale=inv.guidance_scale,
                           height=SIZE, width=SIZE, progress=False)
        torch.testing.assert_close(out.latents, reconstruct(model, inv, progress=False), rtol=0, atol=0)
        z0 = inv.image_latents
        errors.append(((out.latents - z0).norm() / z0.norm()).item())
    # first order: each doubling of the steps about halves the error (measured SD3 0.58, 0.33, 0.15;
    # Flux 1.66, 0.85, 0.45 at 4, 8, 16 steps)
    assert errors[1] < 0.7 * errors[0] and errors[2] < 0.7 * errors[1], errors


def test_the_inversion_walks_the_flow_schedule_back_with_the_guided_velocity(model):
    inv = p2p.invert(model, photo(), PROMPT, num_steps=3, progress=False)
    sampler = model.sampler(3, SIZE, SIZE)
    assert inv.guidance_scale == (1.0 if model.uses_cfg else 3.5)
    z0 = model.encode((photo() + 1) / 2)
    torch.testing.assert_close(inv.trajectory[0], z0, rtol=0, atol=0)
    cond = model.encode_prompts([PROMPT])
    g = None if model.uses_cfg else torch.full((1,), 3.5)
    v = model.velocity(z0, torch.zeros(()), cond, g)  # the first step starts at sigma_N = 0, conditional only
    torch.testing.assert_close(inv.trajectory[1], z0 + sampler.sigmas[2] * v, rtol=1e-6, atol=1e-6)


def test_the_trajectory_source_row_reproduces_the_picture_exactly(model):
    inv = p2p.invert(model, photo(), PROMPT, num_steps=5, progress=False)
    blocks = (0, 1)
    out = p2p.edit(model, [PROMPT, EDIT], p2p.JointReplace(0.4), inversion=inv, source_row="trajectory",
                   local_blend=p2p.LocalBlend(["cat", "dog"], blocks=blocks), progress=False)
    assert torch.equal(out.latents[0], inv.image_latents[0])
    photo_again = to_uint8_rounded(model.decode(inv.image_latents))[0]  # the photo through the VAE
    assert abs(out.images[0].astype(int) - photo_again).max() <= 1  # the VAE decodes a batch of 2 (rounding)
    assert not torch.allclose(out.latents[1], out.latents[0])  # the edited row is its own
    inputs = p2p.edit(model, [PROMPT, EDIT], p2p.JointReplace(0.4), inversion=inv, source_row="inputs", progress=False)
    last = reconstruct(model, inv, source_row="inputs", progress=False)  # one step from trajectory[1]
    torch.testing.assert_close(inputs.latents[:1], last, rtol=1e-5, atol=1e-5)
    free = p2p.edit(model, [PROMPT, EDIT], p2p.JointReplace(0.4), inversion=inv, progress=False)
    torch.testing.assert_close(free.latents[:1], reconstruct(model, inv, progress=False), rtol=1e-5, atol=1e-5)


def test_an_edit_from_an_inversion_may_take_another_guidance(model):
    inv = p2p.invert(model, photo(), PROMPT, num_steps=3, progress=False)
    out = p2p.edit(model, [PROMPT, EDIT], p2p.JointReplace(), inversion=inv, guidance_scale=5.0,
                   source_row="trajectory", progress=False)
    assert torch.equal(out.latents[0], inv.image_latents[0])


def test_save_load_round_trip_and_the_model_check(model, tmp_path):
    inv = p2p.invert(model, photo(), PROMPT, num_steps=3, progress=False)
    back = p2p.Inversion.load(inv.save(tmp_path / "photo.inv"))
    assert (back.method, back.sampler, back.prediction_type, back.num_steps, back.guidance_scale) == \
        ("flow", "flow-euler", "flow", 3, inv.guidance_scale)
    assert back.model.matches(inv.model) and (back.scale_factor, back.shift_factor) == (model.scaling_factor,
                                                                                          model.shift_factor)
    for a, b in zip(inv.trajectory, back.trajectory):
        assert torch.equal(a, b)
    torch.testing.assert_close(reconstruct(model, back, progress=False), reconstruct(model, inv, progress=False))


@pytest.mark.slow  # three models loaded
def test_another_models_inversion_is_refused(tmp_path, tiny_sd):
    sd3, flux = (load_checkpoint(FIX / name) for name in ("tiny-sd3", "tiny-flux"))
    inv = p2p.invert(sd3, photo(), PROMPT, num_steps=2, progress=False)
    with pytest.raises(ValueError, match="made under scale_factor .* another Flux folder: invert the photo again"):
        p2p.edit(flux, [PROMPT, EDIT], inversion=inv, progress=False)
    other = load_checkpoint(FIX / "tiny-sd3")
    with torch.no_grad():
        other.transformer.proj_out.bias.add_(1)
    with pytest.raises(ValueError, match="made with the model .* not with this one"):
        p2p.edit(other, [PROMPT, EDIT], inversion=inv, progress=False)
    with pytest.raises(ValueError, match="does not fit this .* model: its x_T is"):
        p2p.edit(tiny_sd, [PROMPT, EDIT], inversion=inv, progress=False)
    unet = p2p.invert(tiny_sd, photo(), PROMPT, method="ddim", num_steps=2, progress=False)
    with pytest.raises(ValueError, match="made with a UNet model .*invert the photo again with this SD3 model"):
        p2p.edit(sd3, [PROMPT, EDIT], inversion=unet, progress=False)
    with pytest.raises(ValueError, match="method 'flow' inverts an MM-DiT model"):
        p2p.invert(tiny_sd, photo(), PROMPT, method="flow", num_steps=2, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "null-text"}, r"method='null-text': an MM-DiT model .* reverse Euler ODE, method='flow'"),
    ({"sampler": "plms"}, r"sampler='plms': an MM-DiT model"),
    ({"steps_offset": 0}, r"steps_offset=0: an MM-DiT model"),
])
def test_invert_refuses_the_unet_options(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        p2p.invert(model, photo(), PROMPT, num_steps=2, progress=False, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_steps": 3}, r"num_steps=3 conflicts with the inversion's num_steps=2"),
    ({"height": 32}, r"height=32 conflicts"),
    ({"source_row": "residual"}, r"source_row='residual': an MM-DiT inversion's source row is one of"),
    ({"latents": torch.zeros(1, 16, 8, 8)}, r"do not pass latents as well"),
    ({"negative_prompt": "blurry"}, r"negative_prompt='blurry' with an inversion"),
    ({"prompts": [EDIT, PROMPT]}, r"prompts\[0\] must be the inverted prompt"),
])
def test_an_edit_from_an_inversion_refuses_what_conflicts_with_it(model, kwargs, message):
    inv = p2p.invert(model, photo(), PROMPT, num_steps=2, progress=False)
    kwargs = dict(kwargs)
    prompts = kwargs.pop("prompts", [PROMPT, EDIT])
    with pytest.raises(ValueError, match=message):
        p2p.edit(model, prompts, p2p.JointReplace(), inversion=inv, progress=False, **kwargs)


def test_source_row_needs_an_inversion(model):
    with pytest.raises(ValueError, match="source_row='trajectory' says how the source row follows an inversion"):
        p2p.edit(model, [PROMPT, EDIT], source_row="trajectory", num_steps=2, height=32, width=32, progress=False)


def test_the_models_own_steps_and_guidance_when_none_is_given(model):
    steps, guidance = (28, 7.0) if model.uses_cfg else (28, 3.5)
    assert (model.default_steps, model.default_guidance) == (steps, guidance)
    seen = []
    sampler = model.sampler
    model.sampler = lambda n, h, w: seen.append(n) or sampler(n, h, w)
    try:
        plain = p2p.generate(model, PROMPT, height=32, width=32, progress=False)
        given = p2p.generate(model, PROMPT, height=32, width=32, num_steps=steps, guidance_scale=guidance,
                             progress=False)
        p2p.edit(model, [PROMPT, EDIT], p2p.JointReplace(), height=32, width=32, progress=False)
    finally:
        del model.sampler
    assert seen == [steps] * 3 and torch.equal(plain.latents, given.latents)
    inv = p2p.invert(model, photo(), PROMPT, progress=False)
    assert (inv.num_steps, inv.guidance_scale) == (steps, 1.0 if model.uses_cfg else guidance)


def test_schnells_own_defaults_and_the_unet_defaults_are_unchanged():
    schnell = type("Schnell", (), {"guidance_embeds": False})()
    dev = type("Dev", (), {"guidance_embeds": True})()
    assert (Flux.default_steps.fget(schnell), Flux.default_guidance.fget(schnell)) == (4, 0.0)
    assert (Flux.default_steps.fget(dev), Flux.default_guidance.fget(dev)) == (28, 3.5)
    assert (setting("num_steps").default, setting("guidance_scale").default, setting("method").default) == \
        (50, 7.5, "null-text")
    defaults = {k: p.default for k, p in inspect.signature(joint_edit).parameters.items()}
    assert (defaults["seed"], defaults["negative_prompt"]) == (setting("seed").default,
                                                              setting("negative_prompt").default)


def test_sd3_at_guidance_1_runs_the_conditional_rows_alone_as_its_pipeline():
    sd3 = load_checkpoint(FIX / "tiny-sd3")
    rows = []
    velocity = sd3.velocity
    sd3.velocity = lambda x, *a, **k: rows.append(x.shape[0]) or velocity(x, *a, **k)
    try:
        p2p.generate(sd3, PROMPT, num_steps=2, guidance_scale=1.0, height=32, width=32, progress=False)
        p2p.generate(sd3, PROMPT, num_steps=2, guidance_scale=1.5, height=32, width=32, progress=False)
    finally:
        del sd3.velocity
    assert rows == [1, 1, 2, 2]
