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


# ------------------------------------------------------------------------------------ JSON and small files
DEEP = "[" * 100_000 + "]" * 100_000           # a RecursionError in json.loads and in anything that walks it


def deep_folder(tmp_path, where):
    """A diffusers-like folder whose `where` JSON file is nested 100 000 levels."""
    folder = tmp_path / "model"
    for part in ("unet", "vae", "text_encoder"):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text("{}")
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (folder / where).write_text(DEEP)
    return folder


@pytest.mark.parametrize("where", ["unet/config.json", "model_index.json", "text_encoder/config.json"])
def test_deep_json_in_a_folder_is_refused(tmp_path, where):
    from weights_tools import CheckpointError, inspect_checkpoint, load_checkpoint

    folder = deep_folder(tmp_path, where)
    for read in (load_checkpoint, inspect_checkpoint):
        with pytest.raises(CheckpointError, match=rf"{where}: JSON nested too deeply"):
            read(folder)


def test_deep_json_in_a_safetensors_header_or_its_ldm_config_is_refused(tmp_path):
    import struct
    from safetensors.torch import save_file
    import torch
    from weights_tools import CheckpointError, load_checkpoint

    text = ('{"a": ' + DEEP + "}").encode()
    (tmp_path / "h.safetensors").write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(CheckpointError, match=r"h.safetensors: its safetensors header: JSON nested too deeply"):
        load_checkpoint(tmp_path / "h.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "m.safetensors"), metadata={"ldm_config": DEEP})
    with pytest.raises(CheckpointError, match=r"m.safetensors: its `ldm_config` metadata .*JSON nested too deeply"):
        load_checkpoint(tmp_path / "m.safetensors")


def test_deep_json_in_an_inversion_or_a_tokenizer_json_is_refused(tmp_path):
    from safetensors.torch import save_file
    import torch
    from models.wordpiece import read_vocab
    from p2p.inversion import FORMAT, Inversion

    save_file({"x_T": torch.zeros(1)}, str(tmp_path / "a.inv"), metadata={"format": FORMAT, "inversion": DEEP})
    with pytest.raises(ValueError, match=r"a.inv: not a usable saved Inversion: .*JSON nested too deeply"):
        Inversion.load(tmp_path / "a.inv")
    (tmp_path / "tokenizer.json").write_text('{"model": {"vocab": ' + DEEP + "}}")
    with pytest.raises(ValueError, match=r"tokenizer.json: JSON nested too deeply"):
        read_vocab(tmp_path / "tokenizer.json")


def test_json_just_deep_is_refused_after_parsing():
    from models.textfile import MAX_DEPTH, BadTextFile, parse_json

    assert parse_json("[" * MAX_DEPTH + "]" * MAX_DEPTH, "x") is not None
    with pytest.raises(BadTextFile, match=f"x: JSON nested over {MAX_DEPTH} levels"):
        parse_json("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "x")


@pytest.mark.parametrize("name", ["unet/config.json", "model_index.json"])
def test_a_config_linked_to_a_device_is_not_read(tmp_path, name):
    from weights_tools import CheckpointError, load_checkpoint

    folder = deep_folder(tmp_path, name)
    (folder / name).unlink()
    (folder / name).symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match=rf"{name}: this config is a device, FIFO or socket"):
        load_checkpoint(folder)


def test_a_fifo_or_an_oversized_file_is_refused_before_reading(tmp_path):
    import os
    from models.textfile import MAX_TEXT
    from models.wordpiece import read_vocab
    from p2p.config import read_yaml

    os.mkfifo(tmp_path / "vocab.txt")                 # reading it would block forever
    with pytest.raises(ValueError, match=r"vocab.txt: this vocabulary is a device, FIFO or socket"):
        read_vocab(tmp_path / "vocab.txt")
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:                        # sparse: no disk used
        f.truncate(MAX_TEXT + 1)
    pattern = rf"big.txt: this (vocabulary|config) is {MAX_TEXT + 1} bytes, over the {MAX_TEXT}"
    with pytest.raises(ValueError, match=pattern):
        read_vocab(big)
    with pytest.raises(ValueError, match=pattern):
        read_yaml(big)


# ------------------------------------------------------------------------------------ config numbers
def test_an_absurd_trained_size_in_a_files_config_is_refused(tmp_path):
    import json
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from weights_tools import CheckpointError, load_checkpoint

    with safe_open(str(GOLDEN_CKPT), "pt") as f:
        meta = f.metadata()
    ldm = json.loads(meta["ldm_config"])
    ldm["model"]["params"]["image_size"] = 100000
    save_file(load_file(str(GOLDEN_CKPT)), str(tmp_path / "big.safetensors"), metadata=meta | {"ldm_config": json.dumps(ldm)})
    with pytest.raises(CheckpointError, match=r"big.safetensors \(ldm_config metadata\): its architecture has image_size "
                                              r"\(the latent side; diffusers: unet/config.json sample_size\) = 100000, "
                                              r"outside 1..512; .*pass config="):
        load_checkpoint(tmp_path / "big.safetensors")


@pytest.mark.parametrize("config, change, pattern", [
    ("tiny-sdxl", lambda c, r: r(c, unet=r(c.unet, transformer_depth=(1, 1))),
     r"unet.transformer_depth \(diffusers: transformer_layers_per_block\) = \[1, 1\], not one number per level \(3"),
    ("ldm-400m", lambda c, r: r(c, text=r(c.text, head_dim=-16)), r"text.head_dim = -16, outside 1..1024"),
    ("tiny", lambda c, r: r(c, image_size=0), r"image_size .* = 0, outside 1..512"),
])
def test_config_numbers_that_would_crash_or_allocate_are_refused(config, change, pattern):
    import dataclasses
    from models import load_config
    from weights_tools import CheckpointError
    from weights_tools.layout import check_plausible

    cfg = change(load_config(config), dataclasses.replace)
    with pytest.raises(CheckpointError, match="where: its architecture has " + pattern):
        check_plausible(cfg, "where")


def test_a_tokenizer_json_id_outside_the_vocabulary_is_refused(tmp_path):
    import json
    from models.wordpiece import SPECIALS, read_vocab

    vocab = {t: i for i, t in enumerate(SPECIALS)} | {"cat": -1}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
    with pytest.raises(ValueError, match=r"tokenizer.json: its model.vocab gives 'cat' the id -1, outside 0..\d+"):
        read_vocab(tmp_path / "tokenizer.json")


# ------------------------------------------------------------------------------------ inversions on other models
@pytest.mark.parametrize("method", ["null-text", "ddim"])
def test_an_inversion_of_another_kind_of_model_is_refused_before_the_loop(tiny_sd, method):
    import dataclasses
    import torch
    from p2p import edit, invert
    from sdxl_oracles import ours

    inv = invert(tiny_sd, torch.zeros(1, 3, 32, 32), "a cat", method=method, num_steps=2, num_inner_steps=1,
                 progress=False)
    if method == "ddim":  # the latent of a model with other channels
        inv = dataclasses.replace(inv, x_T=torch.zeros(1, 8, *inv.x_T.shape[2:]))
    sdxl = ours()
    pattern = (r"null-text embeddings are \(77, \d+\), where this model's text context is \(78, \d+\)"
               if method == "null-text" else r"its x_T is \(1, 8, \d+, \d+\), where this model samples \(1, 4,")
    hook = sdxl.unet.register_forward_pre_hook(lambda *a: pytest.fail("the loop ran"))  # (a shared model)
    try:
        with pytest.raises(ValueError, match=r"this inversion does not fit this SDXL model: .*" + pattern
                           + r".*allow_other_model waives other weights, not other shapes"):
            edit(sdxl, ["a cat", "a dog"], None, inversion=inv, allow_other_model=True, progress=False)
    finally:
        hook.remove()


# ------------------------------------------------------------------------------------ false refusals
def test_an_ldm_prompt_long_only_in_clips_tokens_is_not_refused(tmp_path):
    """Words are checked with the checkpoint's own tokenizer: 30 x 猫 are 30 WordPiece tokens (one each in
    this vocabulary) but 90 CLIP tokens, so under CLIP's count the blend word would lie past the limit."""
    from safetensors.torch import save_file
    import ldm_oracles as L
    from models.clip import default_tokenizer
    from p2p.cli import main

    sd = L.tiny_ldm()
    ckpt = tmp_path / "tiny-ldm.safetensors"
    save_file(L.single_file_state(sd), str(ckpt), {"ldm_config": sd.cfg.to_json()})
    filler = " ".join(["猫"] * 30)
    prompt, edited = f"a {filler} squirrel", f"a {filler} lion"
    assert len(default_tokenizer().encode(prompt)) > 75
    out = tmp_path / "edit.png"
    assert main(["edit", "--ckpt", str(ckpt), "--tokenizer", str(L.vocab_dir() / "vocab.txt"), "--prompt", prompt,
                 "--edit", edited, "--blend", "squirrel", "lion", "--steps", "2", "--height", "64", "--width", "64",
                 "-o", str(out)]) == 0
    assert out.exists()


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    from safetensors.torch import load_file
    from test_weights_diffusers import build_diffusers_folder

    return build_diffusers_folder(tmp_path_factory.mktemp("sd1") / "tiny-sd", load_file(str(GOLDEN_CKPT)))


@pytest.mark.parametrize("index", [False, True])
def test_an_sd1_folder_with_a_stray_empty_text_encoder_2_is_sd1(sd1_folder, index, tmp_path):
    import json
    import shutil
    from weights_tools import load_checkpoint
    from weights_tools.family import folder_family

    folder = shutil.copytree(sd1_folder, tmp_path / "tiny-sd")
    (folder / "text_encoder_2").mkdir()
    if index:
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert folder_family(folder, {}, unet)[0] == "SD v1"
    assert load_checkpoint(folder).cfg.family == "sd1"
