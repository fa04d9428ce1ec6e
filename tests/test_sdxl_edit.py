"""Prompt-to-Prompt on the tiny SDXL (configs/tiny-sdxl.yaml, seeded weights): the method's properties hold
with SDXL's two towers, its pooled row and its levels (attention at levels 1 and 2 only), and every
inversion method runs on it (null-text optimises the whole unconditional tensor: both towers' token rows
and the pooled vector)."""
import pytest
import torch

import sdxl_oracles as X
from p2p import LocalBlend, Refine, Replace, Reweight, edit, generate, invert
from p2p.align import word_token_indices
from p2p.inversion import reconstruct

KW = dict(seed=3, num_steps=4, height=32, width=32, progress=False)
SRC = "a painting of a squirrel eating a burger"
LION = "a painting of a lion eating a burger"
CAT = "a painting of a cat eating a burger"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl():
    return X.ours()


def close(a, b, rel=1e-4):
    torch.testing.assert_close(a, b, rtol=0, atol=rel * b.abs().max().item() + 1e-6)


def test_replace_prompt_by_itself_equals_generate(sdxl):
    out = edit(sdxl, [SRC, SRC], Replace(1.0, 1.0, self_replace_max_res=32), **KW)
    close(out.latents, generate(sdxl, [SRC, SRC], **KW).latents)


def test_edit_changes_the_edited_prompt_only_and_self_injection_acts(sdxl):
    free = generate(sdxl, [SRC, LION], **KW)
    cross = edit(sdxl, [SRC, LION], Replace(0.8, 0.0), **KW)
    both = edit(sdxl, [SRC, LION], Replace(0.8, 0.6, self_replace_max_res=32), **KW)
    close(cross.latents[:1], free.latents[:1])
    assert (cross.latents[1] - free.latents[1]).abs().max() > 1e-2
    # self-attention exists at levels 1 and 2 only (none at level 0): injecting it still changes the edit
    assert (both.latents[1] - cross.latents[1]).abs().max() > 1e-2


def test_three_prompt_batch_equals_each_edit_alone(sdxl):
    spec = Replace({"default_": 1.0, "lion": 0.5, "cat": 0.5}, 0.4)
    both = edit(sdxl, [SRC, LION, CAT], spec, local_blend=LocalBlend(("squirrel", "lion", "cat"), threshold=0.6), **KW)
    for row, (p, w) in enumerate([(LION, "lion"), (CAT, "cat")], start=1):
        alone = edit(sdxl, [SRC, p], Replace({"default_": 1.0, w: 0.5}, 0.4),
                     local_blend=LocalBlend(("squirrel", w), threshold=0.6), **KW)
        close(both.latents[[0, row]], alone.latents)


def test_local_blend_keeps_source_outside_mask_on_sdxl_levels(sdxl):
    """The default level is the deepest with cross-attention: level 2 (32x32 at 1024 px); level 1 works too."""
    sites = sdxl.unet.sites
    cross = [s for s in sites if s.is_cross and s.place in ("down", "up")]
    assert {s.level for s in cross} == {1, 2}
    deep = LocalBlend(("squirrel", "lion")).build(sdxl.tokenizer, [SRC, LION], 4, sites)
    assert deep.layers == {s.index for s in cross if s.level == 2}
    for level in (None, 1):
        out = edit(sdxl, [SRC, LION], Replace(0.8, 0.4), local_blend=LocalBlend(("squirrel", "lion"), threshold=0.9,
                                                                                 level=level), **KW)
        same = (out.latents[0] - out.latents[1]).abs().amax(0) < 1e-6
        assert 0 < same.float().mean() < 1, level


@pytest.mark.parametrize("spec, prompts", [
    (Refine(0.7, (0.2, 0.6)), [SRC, SRC + " at night"]),
    (Reweight(0.8, 0.4, equalizer={"lion": 2.0}, base=Replace(0.8, 0.4)), [SRC, LION]),
])
def test_fast_path_equals_plain_map_path(sdxl, spec, prompts):
    fast = edit(sdxl, prompts, spec, fast=True, **KW)
    plain = edit(sdxl, prompts, spec, fast=False, **KW)
    close(fast.latents, plain.latents, 1e-5)
    assert (fast.latents[1] - generate(sdxl, prompts, **KW).latents[1]).abs().max() > 1e-3


def test_word_positions_are_shared_by_both_paddings(sdxl):
    ids = sdxl.tokenizer([LION], 77)[0]
    pos = word_token_indices(sdxl.tokenizer, LION, "lion")
    assert pos and all(ids[0, i] == ids[1, i] for i in pos)
    assert ids[0, -1] == sdxl.tokenizer.eos and ids[1, -1] == 0


@pytest.fixture(scope="module")
def inversions(sdxl, one_thread):
    y, x = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    img = torch.stack([x * 0.8, y * 0.8, ((x - 0.2) ** 2 + y ** 2 < 0.3).float() * 1.2 - 0.6])[None]
    return {m: invert(sdxl, img, SRC, method=m, num_steps=4, num_inner_steps=4, progress=False)
            for m in ("ddim", "null-text", "negative-prompt", "direct")}


def test_every_inversion_method_on_sdxl(sdxl, inversions):
    def err(inv):
        return torch.mean((reconstruct(sdxl, inv, progress=False) - inv.image_latents) ** 2).item()

    null = inversions["null-text"]
    assert null.uncond_embeddings[0].shape == (78, 80)      # both towers' 77 rows and the pooled row
    assert null.uncond_embeddings[0][-1, 40:].abs().max() == 0  # past the pooled vector: never read, never moved
    assert null.uncond_embeddings[0][-1, :40].abs().max() > 0   # the pooled vector is optimised (from zeros)
    assert err(null) < err(inversions["ddim"])
    assert err(inversions["direct"]) <= 1e-10 + 1e-10 * inversions["direct"].image_latents.abs().max().item()
    for inv in inversions.values():
        out = edit(sdxl, [SRC, LION], Replace(0.8, 0.4), inversion=inv, progress=False)
        assert torch.isfinite(out.latents).all()
