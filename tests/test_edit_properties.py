"""Properties the method must have, checked end to end on the tiny golden checkpoint (small sizes, few steps)."""
import pytest
import torch

from p2p import AttentionStore, LocalBlend, Refine, Replace, Reweight, edit, generate
from p2p import edits
from p2p.control import Controller
from models.clip import default_tokenizer

KW = dict(seed=3, num_steps=4, height=32, width=32, progress=False)
SRC = "a painting of a squirrel eating a burger"
LION = "a painting of a lion eating a burger"


def close(a, b, rel=1e-4):
    torch.testing.assert_close(a, b, rtol=0, atol=rel * b.abs().max().item() + 1e-6)


def test_replace_prompt_by_itself_equals_generate(tiny_sd):
    out = edit(tiny_sd, [SRC, SRC], Replace(1.0, 1.0), **KW)
    ref = generate(tiny_sd, [SRC, SRC], **KW)
    close(out.latents, ref.latents)


def test_reweight_with_c_one_changes_nothing(tiny_sd):
    base = Replace(0.8, 0.4)
    out = edit(tiny_sd, [SRC, LION], Reweight(0.8, 0.4, equalizer={"lion": 1.0}, base=base), **KW)
    ref = edit(tiny_sd, [SRC, LION], base, **KW)
    close(out.latents, ref.latents)
    same = edit(tiny_sd, [SRC, SRC], Reweight(1.0, 1.0, equalizer={"squirrel": 1.0}), **KW)
    close(same.latents, generate(tiny_sd, [SRC, SRC], **KW).latents)


def test_zero_steps_give_independent_generations(tiny_sd):
    out = edit(tiny_sd, [SRC, LION], Replace(0.0, 0.0), **KW)
    for i, p in enumerate([SRC, LION]):
        close(out.latents[i:i + 1], generate(tiny_sd, [p], **KW).latents)


def test_edit_changes_the_edited_prompt_only(tiny_sd):
    out = edit(tiny_sd, [SRC, LION], Replace(0.8, 0.4), **KW)
    free = generate(tiny_sd, [SRC, LION], **KW)
    close(out.latents[:1], free.latents[:1])                      # the source is never edited
    assert (out.latents[1] - free.latents[1]).abs().max() > 1e-2  # the edit is


@pytest.mark.parametrize("spec", [
    Replace({"default_": 1.0, "lion": 0.5}, 0.5, self_replace_max_res=32),
    Refine(0.7, (0.2, 0.6)),
    Reweight(0.8, 0.4, equalizer={"lion": -1.5}, base=Replace(0.8, 0.4)),
    Reweight(0.8, 0.4, equalizer={"lion": 2.0}, base=Refine()),
])
def test_fast_path_equals_plain_map_path(tiny_sd, spec):
    prompts = [SRC, LION] if not isinstance(getattr(spec, "base", spec), Refine) else [SRC, SRC.replace("burger", "big lion")]
    if isinstance(spec, Reweight) and isinstance(spec.base, Refine):
        spec = Reweight(0.8, 0.4, equalizer={"big": 2.0}, base=Refine())
    if isinstance(spec, Refine):
        prompts = [SRC, SRC + " at night"]
    fast = edit(tiny_sd, prompts, spec, fast=True, **KW)
    plain = edit(tiny_sd, prompts, spec, fast=False, **KW)
    close(fast.latents, plain.latents, 1e-5)
    # nothing stored: every edited cross-attention layer runs on the value side (stored ones form maps)
    fast = edit(tiny_sd, prompts, spec, fast=True, store=AttentionStore(cross=False), **KW)
    close(fast.latents, plain.latents, 1e-5)


def test_value_side_linear_form_equals_map_edit():
    """edit_cross(M, M*) == M S + M* diag(e) on random maps, for every edit type."""
    tok = default_tokenizer()
    torch.manual_seed(0)
    prompts = [SRC, LION, "a painting of a cat eating a burger"]
    for spec in [Replace(0.5), Reweight(equalizer={"eating": [3.0, -1.0]}, base=Replace()),
                 Reweight(equalizer={"burger": 0.5})]:
        ctl = Controller(tok, prompts, spec, 10, [], None)
        M_src = torch.rand(8, 64, 77).softmax(-1)
        M_edit = torch.rand(2, 8, 64, 77).softmax(-1)
        for i in (0, 3, 9):
            S, e = ctl.cross_linear(i, M_src)
            lin = torch.einsum("hiw,bwj->bhij", M_src, S) + M_edit * e[:, None, None, :]
            close(lin, ctl.edit_cross(i, M_src, M_edit), 1e-6)


def test_three_prompt_batch_equals_each_edit_alone(tiny_sd):
    cat = "a painting of a cat eating a burger"
    spec = Replace({"default_": 1.0, "lion": 0.5, "cat": 0.5}, 0.4)
    blend3 = LocalBlend(("squirrel", "lion", "cat"), threshold=0.6)
    both = edit(tiny_sd, [SRC, LION, cat], spec, local_blend=blend3, **KW)
    for row, (p, w) in enumerate([(LION, "lion"), (cat, "cat")], start=1):
        alone = edit(tiny_sd, [SRC, p], Replace({"default_": 1.0, w: 0.5}, 0.4),
                     local_blend=LocalBlend(("squirrel", w), threshold=0.6), **KW)
        close(both.latents[[0, row]], alone.latents)


def test_local_blend_keeps_source_outside_mask(tiny_sd):
    out = edit(tiny_sd, [SRC, LION], Replace(0.8, 0.4), local_blend=LocalBlend(("squirrel", "lion"), threshold=0.9),
               **KW)
    same = (out.latents[0] - out.latents[1]).abs().amax(0) < 1e-6
    assert 0 < same.float().mean() < 1   # some pixels copied from the source, some edited


def test_local_blend_level_picks_the_maps_of_that_level(tiny_sd):
    """level=None: the deepest down/up cross-attention level (as the reference); level=0: the
    finest maps, a different mask and so different latents; still the source outside the mask."""
    sites = tiny_sd.unet.sites
    tok = default_tokenizer()
    words = ("squirrel", "lion")
    deep, fine = (LocalBlend(words, level=lv).build(tok, [SRC, LION], 4, sites) for lv in (None, 0))
    cross = [s for s in sites if s.is_cross and s.place in ("down", "up")]
    assert deep.layers == {s.index for s in cross if s.level == max(c.level for c in cross)}
    assert fine.layers == {s.index for s in cross if s.level == 0} and fine.layers != deep.layers
    a, b = (edit(tiny_sd, [SRC, LION], Replace(0.8, 0.4), local_blend=LocalBlend(words, threshold=0.9, level=lv),
                 **KW).latents for lv in (None, 0))
    assert not torch.allclose(a[1], b[1])
    same = (b[0] - b[1]).abs().amax(0) < 1e-6
    assert 0 < same.float().mean() < 1


def test_reweight_scales_columns():
    M = torch.rand(2, 4, 16, 77)
    c = torch.ones(2, 77)
    c[:, 5] = -2.0
    out = edits.reweight(M, c)
    assert torch.equal(out[..., 5], -2.0 * M[..., 5]) and torch.equal(out[..., 6], M[..., 6])


@pytest.mark.parametrize("call, message", [
    (lambda sd: edit(sd, [SRC, "a painting of a big lion eating a burger"], Replace(), **KW), "same number of words"),
    (lambda sd: edit(sd, [SRC, LION], Reweight(equalizer={"tiger": 2.0}), **KW), "'tiger' is not in prompt"),
    (lambda sd: edit(sd, [SRC, LION], Replace(), local_blend=LocalBlend(("squirrel", "tiger")), **KW),
     "'tiger' is not in prompt"),
    (lambda sd: edit(sd, [SRC, LION], Replace(), local_blend=LocalBlend(("lion",)), **KW), "one word"),
    (lambda sd: edit(sd, [SRC, LION], Replace(), local_blend=LocalBlend(("squirrel", "lion"), level=5), **KW),
     "levels \\[0, 1\\] only"),
    (lambda sd: edit(sd, [SRC, LION], Replace({"default_": 1.0, "tiger": 0.3}), **KW), "in none of the edited"),
    (lambda sd: edit(sd, [SRC, LION], Replace(1.5), **KW), "0 <= start <= end <= 1"),
    (lambda sd: edit(sd, [SRC], Replace(), **KW), "at least one edited prompt"),
    (lambda sd: edit(sd, [SRC, LION], Replace(), **(KW | {"height": 36})), "multiples of 8"),
])
def test_clear_errors(tiny_sd, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_sd)


def renormalised_reweight(M, c):
    """Reweight followed by row renormalisation: not linear in the maps."""
    M = M[None] if M.dim() == 3 else M
    M = M * c.to(M.dtype)[:, None, None, :]
    return M / M.sum(-1, keepdim=True).clamp_min(1e-12)


def squared_self_injection(M_src, n_edits):
    """A self-attention injection that is not 'every edited prompt takes M_t'."""
    M = M_src ** 2
    return (M / M.sum(-1, keepdim=True)).unsqueeze(0).expand(n_edits, *M.shape)


def test_shipped_edits_take_the_fast_path(tiny_sd):
    tok = default_tokenizer()
    night = SRC + " at night"
    for prompts, spec in [([SRC, LION], Replace({"default_": 1.0, "lion": 0.5})), ([SRC, night], Refine()),
                          ([SRC, LION], Reweight(equalizer={"lion": -2.0})),
                          ([SRC, night], Reweight(equalizer={"night": 2.0}, base=Refine()))]:
        ctl = Controller(tok, prompts, spec, 10, tiny_sd.unet.sites)
        assert ctl.fast_cross and ctl.fast_self, spec
    assert not Controller(tok, [SRC, LION], Replace(), 10, tiny_sd.unet.sites, fast=False).fast_cross


def test_a_non_linear_edit_runs_on_the_maps(tiny_sd, monkeypatch):
    """An edit made non-linear (row renormalisation after reweighting) is not linearised: the fast
    path warns and gives what the map path gives; linearised it would not."""
    spec = Reweight(0.8, 0.4, equalizer={"lion": 3.0}, base=Replace(0.8, 0.4))
    monkeypatch.setattr(edits, "reweight", renormalised_reweight)
    kw = dict(KW, store=AttentionStore(cross=False))  # no stored layer: the fast path would run everywhere
    with pytest.warns(UserWarning, match="Reweight: the cross-attention edit"):
        fast = edit(tiny_sd, [SRC, LION], spec, fast=True, **kw)
    plain = edit(tiny_sd, [SRC, LION], spec, fast=False, **KW)
    close(fast.latents, plain.latents, 1e-5)
    monkeypatch.setattr(Controller, "_check_cross_linear", lambda self: True)  # what skipping the check gives
    linearised = edit(tiny_sd, [SRC, LION], spec, fast=True, **dict(KW, store=AttentionStore(cross=False)))
    assert (linearised.latents - plain.latents).abs().max() > 1e-3 * plain.latents.abs().max()


def test_a_changed_self_injection_runs_on_the_maps(tiny_sd, monkeypatch):
    spec = Replace(0.8, 0.6, self_replace_max_res=32)
    monkeypatch.setattr(edits, "inject_self", squared_self_injection)
    with pytest.warns(UserWarning, match="inject_self"):
        fast = edit(tiny_sd, [SRC, LION], spec, fast=True, **dict(KW, store=AttentionStore(cross=False)))
    plain = edit(tiny_sd, [SRC, LION], spec, fast=False, **KW)
    close(fast.latents, plain.latents, 1e-5)
    monkeypatch.setattr(Controller, "_check_self_injection", lambda self: True)
    unchecked = edit(tiny_sd, [SRC, LION], spec, fast=True, **dict(KW, store=AttentionStore(cross=False)))
    assert (unchecked.latents - plain.latents).abs().max() > 1e-3 * plain.latents.abs().max()
