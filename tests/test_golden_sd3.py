"""SD3 generation (p2p/joint_pipeline.py, models/mmdit_model.py, models/flow.py) against the golden `sd3_plain`
case: diffusers' StableDiffusion3Pipeline on the tiny SD3 folder, fp32 on the CPU (tests/fixtures/mmdit,
README there). The text encoders are not this test's subject: the case's own prompt embeddings stand in
for them (a text module that returns them), so the transformer, the schedule, guidance and the VAE are
held to the case: the same x_T gives z0 within 1e-4 relative, the pictures within one level."""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from p2p import generate
from p2p.joint_pipeline import joined, joint_generate
from weights_tools import load_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "mmdit"
CASE = json.loads((FIXTURES / "sd3_plain.json").read_text())
T = load_file(FIXTURES / "sd3_plain.safetensors")


class Cond(NamedTuple):
    context: torch.Tensor
    pooled: torch.Tensor


class CaseText(nn.Module):
    """The case's prompt embeddings by prompt ("" -> its negative embedding), as a text module's encode."""

    def __init__(self):
        super().__init__()
        rows = {p: (T["prompt_embeds"][i], T["pooled_prompt_embeds"][i]) for i, p in enumerate(CASE["prompts"])}
        self.rows = rows | {"": (T["negative_prompt_embeds"][0], T["negative_pooled_prompt_embeds"][0])}

    def encode(self, prompts):
        return Cond(torch.stack([self.rows[p][0] for p in prompts]), torch.stack([self.rows[p][1] for p in prompts]))


@pytest.fixture(scope="module")
def sd3(one_thread):
    m = load_checkpoint(FIXTURES / "tiny-sd3")
    m.text = CaseText()
    return m


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def run(sd3, **kw):
    return generate(sd3, CASE["prompts"], latents=T["x_T"], num_steps=CASE["num_inference_steps"],
                    guidance_scale=CASE["guidance_scale"], height=CASE["height"], width=CASE["width"], progress=False,
                    **kw)


def test_z0_and_images_equal_the_case(sd3):
    out = run(sd3)
    assert rel(out.latents, T["z0"]) <= 1e-4
    want = np.round(T["images"].numpy() * 255).astype(np.int16)
    assert out.images.shape == (2, 96, 128, 3)
    assert np.abs(out.images.astype(np.int16) - want).max() <= 1


def test_model_out_step0(sd3):
    """The transformer's output at step 0 on the guidance batch [uncond src, uncond tgt, cond src, cond tgt]."""
    cond = sd3.encode_prompts(CASE["prompts"])
    batch = joined(sd3.encode_prompts(["", ""]), cond)
    x = T["latents_in"]
    with torch.no_grad():
        v = sd3.velocity(torch.cat([x, x]), sd3.sampler(10, 96, 128).timesteps[0], batch)
    assert rel(v, T["model_out_step0"]) <= 1e-5


def test_text_cond_given_directly(sd3):
    """prompts and the negative prompt as TextCond, without a text module: the same z0."""
    text = CaseText()
    cond, negative = text.encode(CASE["prompts"]), text.encode([""])
    sd3.text, kept = None, sd3.text
    try:
        out = joint_generate(sd3, cond, latents=T["x_T"], num_steps=10, guidance_scale=7.0, height=96, width=128,
                             negative_prompt=negative, progress=False)
        with pytest.raises(ValueError, match="without its text encoders"):
            sd3.encode_prompts(["a cat"])
    finally:
        sd3.text = kept
    assert rel(out.latents, T["z0"]) <= 1e-4


def test_controller_hooks_are_called_per_step(sd3):
    """override(i) before each step's call sees the full guidance batch; after_step(i, x) may change x."""
    calls = []

    class Recorder:
        def override(self, i):
            def see(site, q, k, v):
                calls.append(("attn", i, site.index, q.shape[0]))
                return q, k, v
            return see

        def after_step(self, i, x):
            calls.append(("after", i))
            return x

    out = joint_generate(sd3, CASE["prompts"], latents=T["x_T"], num_steps=2, height=96, width=128,
                         controller=Recorder(), progress=False)
    assert calls == [("attn", 0, b, 4) for b in range(3)] + [("after", 0)] + \
        [("attn", 1, b, 4) for b in range(3)] + [("after", 1)]
    assert out.latents.shape == (2, 16, 12, 16)
