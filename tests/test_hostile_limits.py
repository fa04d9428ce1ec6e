"""Inputs that cost a traceback, gigabytes or hours before: each is refused (or made cheap) with a message
naming the file or setting, the problem and the fix. Every bad file is built here, a few bytes."""
import pytest

from conftest import GOLDEN_CKPT


# ------------------------------------------------------------------------------------ iteration counts
@pytest.mark.parametrize("flags, pattern", [
    (["--inner-steps", "1000000000"], r"'num_inner_steps' must be a finite number from 0 to 1000"),
    (["--steps", "1000000000"], r"'num_steps' must be a finite number from 1 to 1000"),
])
def test_absurd_iteration_counts_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, flags, pattern):
    import p2p.cli

    monkeypatch.setattr(p2p.cli, "load_model", lambda *a: pytest.fail("the model was loaded"))
    from PIL import Image
    Image.new("RGB", (32, 32)).save(tmp_path / "photo.png")
    argv = ["invert", "--ckpt", str(GOLDEN_CKPT), "--image", str(tmp_path / "photo.png"), "--prompt", "a cat",
            *flags, "-o", str(tmp_path / "x.inv")]
    assert p2p.cli.main(argv) == 2
    assert __import__("re").search(pattern, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]


def test_the_api_refuses_absurd_inner_steps(tiny_sd):
    from p2p import invert

    with pytest.raises(ValueError, match="'num_inner_steps'"):
        invert(tiny_sd, __import__("torch").zeros(1, 3, 32, 32), "a cat", num_inner_steps=10 ** 9, progress=False)


# ------------------------------------------------------------------------------------ caption wrap
class CountingDraw:
    """An ImageDraw that counts the characters it is asked to measure (the wrap's cost)."""

    def __init__(self):
        from PIL import Image, ImageDraw
        self.draw, self.calls, self.chars = ImageDraw.Draw(Image.new("RGB", (1, 1))), 0, 0

    def textlength(self, text, font=None):
        self.calls, self.chars = self.calls + 1, self.chars + len(text)
        return self.draw.textlength(text, font=font)


@pytest.mark.parametrize("text", ["x" * 3000, "ab" * 1500, "a cat " + "W" * 3000 + " sat"])
def test_a_long_word_wraps_in_linear_work(text):
    from p2p.viz import _font, _wrap

    draw, font, width = CountingDraw(), _font(), 62
    lines = _wrap(draw, text, font, width)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")
    fits = lambda t: draw.draw.textlength(t, font=font) <= width  # noqa: E731
    assert all(fits(line) for line in lines)
    if " " not in text:                                             # each line the longest that fits
        assert not any(fits(line + nxt[0]) for line, nxt in zip(lines, lines[1:]))
    # a few measurements per line, of strings at most about twice a line: work linear in the length
    # (cutting by trying every prefix measured ~10**6 strings of ~10**9 characters here)
    assert draw.calls <= 16 * len(lines) and draw.chars <= 40 * len(text)


# ------------------------------------------------------------------------------------ attention memory
def spy_sdpa(monkeypatch, module):
    """Record whether q, k, v reach `module`'s F.scaled_dot_product_attention contiguous: strided views
    send the CPU kernel to its N x N fallback (benchmarks/vae_attention_memory.py: 750 MiB against 74 at
    a 96x96 latent; 16 GiB at 256x256)."""
    import torch.nn.functional as F
    seen, real = [], F.scaled_dot_product_attention

    class Spy:
        def __getattr__(self, name):
            return getattr(F, name)

        @staticmethod
        def scaled_dot_product_attention(q, k, v, *a, **kw):
            seen.append(all(t.is_contiguous() for t in (q, k, v)))
            return real(q, k, v, *a, **kw)

    monkeypatch.setattr(module, "F", Spy())
    return seen


def test_the_vae_attention_gets_contiguous_inputs(monkeypatch):
    import torch
    import models.vae
    from models.vae import AttnBlock

    seen = spy_sdpa(monkeypatch, models.vae)
    block, x = AttnBlock(32), torch.randn(1, 32, 6, 5)
    with torch.no_grad():
        block(x)
    assert seen == [True]


def test_the_unet_attention_gets_contiguous_inputs(monkeypatch):
    import torch
    import models.attention
    from einops import rearrange

    q, k, v = (rearrange(torch.randn(2, n, 16), "b n (h d) -> b h n d", h=2) for n in (12, 7, 7))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # on the views: the same numbers
    seen = spy_sdpa(monkeypatch, models.attention)
    assert torch.equal(models.attention.attend(q, k, v), expected) and seen and all(seen)  # (and the probes)
