"""How an edit's source row follows an inversion (p2p.Inversion.source_correction): Direct Inversion's
source row is the inversion latent itself at every step, so in an edit it reproduces `reconstruct` and
the photo's latents whatever the attention path (maps kept for LocalBlend or pictures, batch size);
the reference's additive form stays behind source_row="residual"."""
import pytest
import torch

from p2p import LocalBlend, Replace, edit, invert
from p2p.inversion import reconstruct

PROMPT, EDITED = "a red circle on a gradient", "a blue circle on a gradient"
STEPS = 5

pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_image(side: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    disc = ((x - 0.2) ** 2 + y ** 2 < 0.3).float()
    return torch.stack([x * 0.8, y * 0.8, disc * 1.2 - 0.6])[None].clamp(-1, 1)


@pytest.fixture(scope="module")
def direct(tiny_sd, one_thread):
    return invert(tiny_sd, smooth_image(64), PROMPT, method="direct", num_steps=STEPS, progress=False)


def test_direct_source_row_reproduces_reconstruct_with_the_default_store(tiny_sd, direct):
    rec = reconstruct(tiny_sd, direct, progress=False)
    assert torch.equal(rec, direct.image_latents)
    for blend in (None, LocalBlend(("red", "blue"))):    # the default store forms maps: another rounding
        out = edit(tiny_sd, [PROMPT, EDITED], Replace(), local_blend=blend, inversion=direct, progress=False)
        assert torch.equal(out.latents[:1], rec), blend
        assert not torch.equal(out.latents[1:], rec)


def test_source_row_follows_the_trajectory_at_every_step(tiny_sd, direct):
    seen = []
    sched = tiny_sd.scheduler(STEPS)
    corr = direct.source_correction(tiny_sd, sched)
    x = torch.zeros(2, *direct.x_T.shape[1:])
    for i in range(STEPS):
        seen.append(corr(i, x)[0])
    want = [direct.trajectory[STEPS - 1 - i][0] for i in range(STEPS)]
    assert all(torch.equal(a, b) for a, b in zip(seen, want))
    inputs = direct.source_correction(tiny_sd, sched, "inputs")
    assert inputs(STEPS - 1, x) is x                       # MasaCtrl's: the last step's output is kept
    assert torch.equal(inputs(0, x)[0], direct.trajectory[STEPS - 1][0]) and torch.equal(inputs(0, x)[1], x[1])


def test_the_additive_form_and_the_switch(tiny_sd, direct):
    out = edit(tiny_sd, [PROMPT, EDITED], Replace(), inversion=direct, source_row="residual", progress=False)
    assert not torch.equal(out.latents[:1], direct.image_latents)  # rounding differences, amplified
    assert torch.allclose(reconstruct(tiny_sd, direct, progress=False, source_row="residual"),
                          direct.image_latents, atol=1e-4)
    ddim = invert(tiny_sd, smooth_image(64), PROMPT, method="ddim", num_steps=STEPS, progress=False)
    with pytest.raises(ValueError, match="source_row='residual' adds Direct Inversion's residuals"):
        edit(tiny_sd, [PROMPT, EDITED], Replace(), inversion=ddim, source_row="residual", progress=False)
    out = edit(tiny_sd, [PROMPT, EDITED], Replace(), inversion=ddim, source_row="trajectory", progress=False)
    assert torch.equal(out.latents[:1], ddim.image_latents)
    with pytest.raises(ValueError, match="source_row='trajectory' says how the source row follows an inversion"):
        edit(tiny_sd, [PROMPT, EDITED], Replace(), source_row="trajectory", num_steps=2, progress=False)
    with pytest.raises(ValueError, match="'source_row' must be one of trajectory, inputs, residual, free"):
        edit(tiny_sd, [PROMPT, EDITED], Replace(), inversion=ddim, source_row="exact", progress=False)


def test_an_edit_timestep_outside_the_inversion_is_refused(tiny_sd, direct):
    with pytest.raises(ValueError, match=r"the edit's timesteps \[\d+"):
        direct.latents_at(tiny_sd, [500])
    assert torch.equal(direct.latents_at(tiny_sd, [tiny_sd.scheduler(STEPS).timesteps[0]])[0], direct.x_T)
