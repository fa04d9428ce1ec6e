"""docs/write-your-own-edit.md's worked examples, taken from the page and run: each equals the explicit-map
path (fast=False); the linear ones (a weighted mix, a step-dependent mix, one head zeroed) take the fast
path, the others (sharpen, clamp, a self-attention edit) decline to the maps with a warning naming them."""
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from models.clip import default_tokenizer
from p2p import AttentionStore, Edit, Replace, edit, generate
from p2p.control import Controller

DOC = Path(__file__).resolve().parent.parent / "docs" / "write-your-own-edit.md"
KW = dict(seed=3, num_steps=4, height=32, width=32, progress=False)
SRC = "a painting of a squirrel eating a burger"
LION = "a painting of a lion eating a burger"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def doc():
    """The page's ```python blocks, run as one module."""
    code = "\n".join(re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S))
    module = types.ModuleType("write_your_own_edit")
    sys.modules[module.__name__] = module
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    yield module
    del sys.modules[module.__name__]


def close(a, b, rel=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=rel * b.abs().max().item() + 1e-6)


def run(sd, spec, fast):
    """The edit's latents, nothing stored: every edited layer runs on the path the controller chose;
    also how many cross-attention calls ran on the value side."""
    calls = [0]
    real = Controller.cross_on_values

    def counted(self, *a):
        calls[0] += 1
        return real(self, *a)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Controller, "cross_on_values", counted)
        out = edit(sd, [SRC, LION], spec, fast=fast, store=AttentionStore(cross=False), **KW)
    return out.latents, calls[0]


@pytest.mark.parametrize("name, knobs", [("WeightedMix", dict(w=0.7)), ("AnnealedMix", dict(ramp=3)),
                                         ("ZeroHead", dict(head=3))])
def test_linear_examples_take_the_fast_path_and_equal_the_maps(tiny_sd, doc, name, knobs):
    spec = getattr(doc, name)(cross_replace_steps=1.0, self_replace_steps=0.4, **knobs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no decline
        fast, on_values = run(tiny_sd, spec, True)
    plain, _ = run(tiny_sd, spec, False)
    assert on_values > 0
    close(fast, plain)
    assert (plain[1] - edit(tiny_sd, [SRC, LION], Replace(1.0, 0.4), **KW).latents[1]).abs().max() > 1e-3


@pytest.mark.parametrize("name, knobs", [("Sharpen", dict(power=3.0)), ("Clamp", dict(cap=0.1))])
def test_non_linear_examples_decline_to_the_maps(tiny_sd, doc, name, knobs):
    spec = getattr(doc, name)(cross_replace_steps=1.0, **knobs)
    with pytest.warns(UserWarning, match=f"{name}: the cross-attention edit .*write_your_own_edit.{name}.cross_edit"):
        fast, on_values = run(tiny_sd, spec, True)
    plain, _ = run(tiny_sd, spec, False)
    assert on_values == 0
    close(fast, plain)


def test_self_attention_example_runs_on_the_maps(tiny_sd, doc):
    spec = doc.SoftSelfInjection(0.8, 0.6, a=0.5)
    with pytest.warns(UserWarning, match="SoftSelfInjection: the self-attention edit"):
        fast, _ = run(tiny_sd, spec, True)
    plain, _ = run(tiny_sd, spec, False)
    close(fast, plain)
    injected, _ = run(tiny_sd, Replace(0.8, 0.6), False)
    assert (plain[1] - injected[1]).abs().max() > 1e-3


def test_step_dependence_is_derived_per_step(doc):
    """The step-dependent mix gets a linear form per step (not one per alpha row): S_i = w_i * mapper."""
    tok = default_tokenizer()
    ctl = Controller(tok, [SRC, LION], doc.AnnealedMix(1.0, ramp=4), 8, [])
    assert ctl.fast_cross
    for i in range(6):
        S, e = ctl.cross_linear(i, torch.zeros(2, 16, 77))
        w = max(0.0, 1 - i / 4)
        close(torch.diagonal(S, dim1=-2, dim2=-1)[0, 10], torch.tensor(w))
        close(e[0, 10], torch.tensor(1 - w))


def test_head_dependent_edit_gets_a_form_per_head(tiny_sd, doc):
    ctl = Controller(default_tokenizer(), [SRC, LION], doc.ZeroHead(head=3), 4, tiny_sd.unet.sites)
    S, e = ctl.cross_linear(0, torch.zeros(1, 8, 16, 64))
    assert S.shape == (1, 8, 77, 77) and S[0, 3].abs().max() == 0 and S[0, 2].abs().max() == 1


class Stateful(Replace):
    """A step counter inside the function instead of the step argument: not a function of its arguments."""

    def cross_edit(self, tokenizer, prompts):
        swap, calls = super().cross_edit(tokenizer, prompts), [0]

        def f(i, M_src, M_edit):
            calls[0] += 1
            w = 1.0 / calls[0]
            return w * swap(i, M_src, M_edit) + (1 - w) * M_edit
        return f


def test_a_stateful_edit_is_never_linearised():
    with pytest.warns(UserWarning, match="Stateful: the cross-attention edit"):
        ctl = Controller(default_tokenizer(), [SRC, LION], Stateful(1.0), 4, [])
    assert not ctl.fast_cross


class TwoArguments(Edit):
    def cross_edit(self, tokenizer, prompts):
        return lambda M_src, M_edit: M_src


class WrongShape(Edit):
    def cross_edit(self, tokenizer, prompts):
        return lambda i, M_src, M_edit: M_src


@pytest.mark.parametrize("spec, error, message", [
    (TwoArguments(), TypeError, r"TwoArguments.cross_edit must return a function f\(i, M_src, M_edit\)"),
    (WrongShape(), ValueError, r"WrongShape.cross_edit: its function returned maps of shape \(2, 16, 77\)"),
    (Edit(), NotImplementedError, r"Edit must define cross_edit"),
])
def test_clear_errors_for_a_wrong_protocol(spec, error, message):
    with pytest.raises(error, match=message):
        Controller(default_tokenizer(), [SRC, LION], spec, 4, [])


def test_replace_by_itself_still_equals_generate_through_the_protocol(tiny_sd, doc):
    """WeightedMix with w = 1 is Replace: on identical prompts the edit is plain generation."""
    out = edit(tiny_sd, [SRC, SRC], doc.WeightedMix(1.0, 1.0, w=1.0), **KW)
    close(out.latents, generate(tiny_sd, [SRC, SRC], **KW).latents, 1e-4)
