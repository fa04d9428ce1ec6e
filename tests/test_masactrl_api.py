"""MutualSelfAttention beyond the golden cases: composed with Prompt-to-Prompt in one run (equal to the two
applied by hand, each on its own attention type), any number of targets, the low-memory halves, SD 2.x and
SDXL (the block count is the model's), the command line with its attention pictures, and a sweep."""
import dataclasses
import json

import pytest
import torch

import oracles as O
import p2p
import p2p.sweep
from models import load_config
from models.attention import attend
from p2p import MutualSelfAttention, Replace, edit, generate
from p2p.cli import main
from p2p.control import Controller
from p2p.mutual import mutual_attention
from p2p.pipeline import denoise

SRC, DST, DST2 = "a painting of a squirrel eating a burger", "a painting of a lion eating a burger", \
    "a painting of a cat eating a burger"
KW = dict(seed=3, num_steps=4, height=64, width=64, progress=False)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sites_count_transformer_blocks(tiny_sd):
    blocks = [s.block for s in tiny_sd.unet.sites]
    assert blocks == [i // 2 for i in range(len(blocks))]  # self then cross in each block, in call order


def test_mutual_attention_is_the_source_keys_and_values_per_half():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, 5, 4, generator=g) for _ in range(3))   # 2 halves x 3 prompts
    out = mutual_attention(q, k, v, 3)
    for r in range(6):
        src = 3 * (r // 3)
        torch.testing.assert_close(out[r:r + 1], attend(q[r:r + 1], k[src:src + 1], v[src:src + 1]))


class ByHand:
    """Two controllers, each on its own attention type: Prompt-to-Prompt's on cross-attention, MasaCtrl's on
    self-attention."""

    def __init__(self, cross, mutual):
        self.cross, self.mutual = cross, mutual

    def override(self, i):
        a, b = self.cross.override(i), self.mutual.override(i)
        return lambda site, q, k, v: (a if site.is_cross else b)(site, q, k, v)

    def step_callback(self, i, x):
        self.mutual.step_callback(i, x)
        return self.cross.step_callback(i, x)


def test_prompt_to_prompt_and_masactrl_in_one_run_equal_the_two_by_hand(tiny_sd):
    prompts, replace = [SRC, DST], Replace(0.6, 0.4)
    out = edit(tiny_sd, prompts, MutualSelfAttention(1, 5, cross=replace), **KW)
    sched = tiny_sd.scheduler(4)
    make = lambda spec: Controller(tiny_sd.tokenizer, prompts, spec, 4, tiny_sd.unet.sites,  # noqa: E731
                                   calls=sched.calls, default_side=tiny_sd.cfg.image_size)
    hand = ByHand(make(dataclasses.replace(replace, self_replace_steps=(0.0, 0.0))), make(MutualSelfAttention(1, 5)))
    with torch.no_grad():
        z = denoise(tiny_sd, tiny_sd.encode_text(prompts), tiny_sd.encode_text([""]), out.x_T, sched, 7.5, hand,
                    progress=False)
    assert torch.equal(out.latents, z)
    alone = [edit(tiny_sd, prompts, s, **KW).latents for s in (MutualSelfAttention(1, 5), replace)]
    assert all(not torch.allclose(out.latents[1], a[1], atol=1e-3) for a in alone)


@pytest.mark.parametrize("words", [None, ("painting", "painting")])
def test_any_number_of_targets_and_the_low_memory_halves(tiny_sd, words):
    spec = MutualSelfAttention(1, 5, mask_words=words)
    three = edit(tiny_sd, [SRC, DST, DST2], spec, **KW).latents
    pairs = [edit(tiny_sd, [SRC, d], spec, **KW).latents[1] for d in (DST, DST2)]
    for got, want in zip(three[1:], pairs):     # each target sees only its own queries and the source
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    plain = generate(tiny_sd, [SRC, DST], **KW).latents
    assert (three[0] - plain[0]).abs().max() <= 1e-4 * plain.abs().max()   # the source attends to itself
    assert not torch.allclose(three[1], plain[1], atol=1e-3)
    if words is None:                       # each half's own call sees its own source: the same edit
        low = edit(tiny_sd, [SRC, DST], spec, low_memory=True, **KW).latents
        assert (low[1] - pairs[0]).abs().max() <= 1e-4 * pairs[0].abs().max()


def test_clear_errors(tiny_sd):
    with pytest.raises(ValueError, match="needs a source prompt and at least one edited prompt"):
        edit(tiny_sd, [SRC], MutualSelfAttention(), **KW)
    with pytest.raises(ValueError, match="'dog' is not in|dog"):
        edit(tiny_sd, [SRC, DST], MutualSelfAttention(mask_words=("dog", "lion")), **KW)
    with pytest.raises(ValueError, match="start_layer 11 is past the model's 11 transformer blocks"):
        edit(tiny_sd, [SRC, DST], MutualSelfAttention(1, 11), **KW)
    with pytest.raises(ValueError, match="integers >= 0"):
        edit(tiny_sd, [SRC, DST], MutualSelfAttention(-1, 2), **KW)


@pytest.mark.parametrize("config", ["tiny-sd2", "tiny-sdxl"])
def test_other_families(config):
    sd, gen = O.seeded_model(load_config(config), seed=5)
    O.seeded_init_(sd.text_encoder, gen)
    sd = sd.eval().requires_grad_(False)
    blocks = len({s.block for s in sd.unet.sites})
    assert blocks == sum(1 for s in sd.unet.sites if not s.is_cross)
    side = 2 * sd.cfg.size_multiple
    kw = dict(seed=1, num_steps=3, height=side, width=side, progress=False)
    spec = MutualSelfAttention(1, blocks // 2, mask_words=("squirrel", "lion"), mask_side=side // sd.latent_downsample // 2)
    out = edit(sd, [SRC, DST], spec, **kw)
    plain = generate(sd, [SRC, DST], **kw)
    assert (out.latents[0] - plain.latents[0]).abs().max() <= 1e-4 * plain.latents.abs().max()
    assert not torch.allclose(out.latents[1], plain.latents[1], atol=1e-4)


def test_command_line_with_attention_pictures(tmp_path, golden_dir):
    out = tmp_path / "m.png"
    rc = main(["edit", "--ckpt", str(golden_dir / "tiny-sd-a.safetensors"), "--prompt", SRC, "--edit", DST,
               "--mode", "masactrl", "--start-step", "1", "--start-layer", "5", "--mask-words", "squirrel", "lion",
               "--steps", "3", "--height", "64", "--width", "64", "--show-attention", "-o", str(out)])
    assert rc == 0 and out.exists()
    assert (tmp_path / "m_attention_1.png").exists() and (tmp_path / "m_self_attention_1.png").exists()
    record = json.loads((tmp_path / "m.png.json").read_text())
    assert record["settings"]["start_step"] == 1 and "MutualSelfAttention(start_step=1" in record["spec"]
    assert main(["edit", "--ckpt", str(golden_dir / "tiny-sd-a.safetensors"), "--prompt", SRC, "--edit", DST,
                 "--start-step", "1", "-o", str(tmp_path / "x.png")]) == 2


ABLATION = """ckpt: {ckpt}
prompt: {src}
edits: [{dst}]
mode: masactrl
seed: 8888
num_steps: 3
height: 64
width: 64
grid:
  start_step: [0, 2]
  start_layer: [3, 7]
"""


def test_sweep(tmp_path, golden_dir, tiny_sd, monkeypatch):
    cfg = tmp_path / "abl.yaml"
    cfg.write_text(ABLATION.format(ckpt=golden_dir / "tiny-sd-a.safetensors", src=SRC, dst=DST))
    monkeypatch.setattr(p2p.sweep.command, "load_checkpoint", lambda ckpt, device, dtype, **load: tiny_sd)
    assert main(["sweep", str(cfg), "-o", str(tmp_path / "runs"), "--no-progress"]) == 0
    record = json.loads((tmp_path / "runs" / "metrics.json").read_text())
    assert len(record["cells"]) == 4
