"""Prompt-to-Prompt on joint attention, end to end, against the official MM-DiT editing code's runs on the tiny SD3
and Flux folders (tests/fixtures/mmdit: sd3_qiki, sd3_qiki_localblend_th, flux_qiki_full, flux_qiki_localblend_th).
The whole edit runs through p2p.edit with the folders' own text encoders: z0 within 1e-4 relative, the same
masks at every blend step, the pictures within one level, and the source row equal to a plain run's."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import p2p
import p2p.viz
from p2p.joint_control import JointController, JointReplace, blend_mask, model_layout, smooth
from p2p.joint_pipeline import joint_generate
from weights_tools import load_checkpoint
from weights_tools.mmdit_text import load_flux_text, load_sd3_text

FIX = Path(__file__).parent / "fixtures" / "mmdit"
CASES = ["sd3_qiki", "sd3_qiki_localblend_th", "flux_qiki_full", "flux_qiki_localblend_th"]
TEXT = {"sd3": load_sd3_text, "flux": load_flux_text}


@pytest.fixture(scope="module")
def models(one_thread):
    out = {}
    for family in TEXT:
        m = load_checkpoint(FIX / f"tiny-{family}")
        if m.text is None:
            m.text = TEXT[family](FIX / f"tiny-{family}")
        out[family] = m
    return out


def case(name):
    t, meta = load_file(FIX / f"{name}.safetensors"), json.loads((FIX / f"{name}.json").read_text())
    c = meta["controller"]
    blend = None if c["local_blend_words"] is None else p2p.LocalBlend(
        c["local_blend_words"], threshold=c["local_blend_threshold"],
        end_blend=c["local_blend_steps"], blocks=tuple(c["aggregate_blocks"]))
    return t, meta, JointReplace(c["replace_steps"], c["method"], c["replace_blocks"]), blend


def settings(t, meta):
    return dict(latents=t["x_T"], num_steps=meta["num_inference_steps"], guidance_scale=meta["guidance_scale"],
                height=meta["height"], width=meta["width"], progress=False)


def unpacked(t, key):
    return t[f"{key}_unpacked"] if f"{key}_unpacked" in t else t[key]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", CASES)
def test_an_edit_reproduces_the_official_code(models, name):
    t, meta, spec, blend = case(name)
    m = models[meta["family"]]
    out = p2p.edit(m, meta["prompts"], spec, local_blend=blend, store=p2p.JointAttentionStore(), **settings(t, meta))
    assert rel(out.latents, unpacked(t, "z0")) < 1e-4
    assert np.abs(out.images.astype(int) - np.round(t["images"].numpy() * 255).astype(int)).max() <= 1
    plain = p2p.generate(m, meta["prompts"], **settings(t, meta))
    assert torch.equal(out.latents[0], plain.latents[0])                  # the source row is the plain run's
    assert rel(out.latents[1], plain.latents[1]) > 1e-3                   # and the target row is edited
    assert set(out.attention.sums) == {s.index for s in m.joint_sites(meta["height"], meta["width"])}


@pytest.mark.parametrize("name", [n for n in CASES if "localblend" in n])
def test_the_blend_maps_and_masks_of_every_step_are_theirs(models, name):
    t, meta, spec, blend = case(name)
    m = models[meta["family"]]
    ctrl = JointController(meta["prompts"], spec, meta["num_inference_steps"], model_layout(m), blend)
    joint_generate(m, meta["prompts"], controller=ctrl, **settings(t, meta))
    stored = {k: torch.stack(v) for k, v in ctrl.blend.entries.items()}
    sites = {s.index: s.name for s in m.joint_sites(meta["height"], meta["width"])}
    assert sorted(sites[i] for i in stored) == sorted(meta["stored_blocks"])
    for i, maps in stored.items():
        assert rel(maps, t[f"store.{sites[i]}"]) < 1e-4
    for s in range(meta["blend_steps"]):
        ctrl.blend.entries = {i: list(v[:s + 1]) for i, v in stored.items()}
        mask = blend_mask(smooth(ctrl.blend.aggregate(), ctrl.blend.grid), ctrl.blend.grid, (12, 16),
                          meta["threshold"], ctrl.blend.pool).float()
        want = t["mask_steps"][s]
        got = mask if want.dim() == 4 else mask[:, 0, ::2, ::2].reshape(1, -1, 1)  # Flux: one value a token
        assert torch.equal(got, want), s


def test_no_replaced_step_is_the_plain_run(models):
    t, meta, _, _ = case("sd3_qiki")
    m = models["sd3"]
    out = p2p.edit(m, meta["prompts"], JointReplace(0.0), **settings(t, meta))
    assert torch.equal(out.latents, p2p.generate(m, meta["prompts"], **settings(t, meta)).latents)
    assert out.attention is None                                          # no maps kept unless a store is given
    kept = p2p.edit(m, meta["prompts"], JointReplace(0.0), store=p2p.JointAttentionStore(), **settings(t, meta))
    assert torch.equal(kept.latents, out.latents) and sorted(kept.attention.sums) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"JointReplace blocks \[3\] name no joint block of this model; its blocks "
                                         r"are \[0, 1, 2\]"):
        p2p.edit(m, meta["prompts"], JointReplace(blocks=(2, 3)), **settings(t, meta))
    with pytest.raises(ValueError, match="sampler, steps_offset: UNet-only"):
        p2p.edit(m, meta["prompts"], JointReplace(), sampler="ddim", steps_offset=1, **settings(t, meta))


def test_the_runs_maps_picture_each_word(models):
    t, meta, spec, _ = case("flux_qiki_localblend_th")
    m = models["flux"]
    out = p2p.edit(m, meta["prompts"], spec, store=p2p.JointAttentionStore(blocks=(1, 2)), **settings(t, meta))
    assert sorted(out.attention.sums) == [1, 2] and out.attention.counts == {1: 10, 2: 10}
    words, maps = out.attention.word_maps(model_layout(m), meta["prompts"][1], 1)
    assert words == meta["prompts"][1].split() and maps.shape == (6, 8, len(words))
    pics = p2p.viz.joint_attention_pictures(out.attention, out.images, meta["prompts"], model_layout(m))
    assert len(pics["attention"]) == 2 and pics["attention"][0].size == pics["attention"][1].size
