"""Plug-and-Play held to the authors' code (pnp-diffusers) on tiny-sd-d (tests/fixtures/golden/pnp, made by
their preprocess.py and pnp.py; the cases and tolerances are described in that folder's README): every
inversion step, PnP step and the decode fed the golden inputs of that step within 1e-5, and the whole run
(inversion, then edit) within the tolerances legitimate fp32 variants of their code reach. Also: the
injection sites follow the model's levels and PnP runs on the tiny SD 2.x and SDXL; the ResBlock override
is plumbed through every block in call order."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import p2p.sweep
from models import load_config
from p2p import AttentionStore, edit, generate, invert
from p2p.cli import main
from p2p.control import Controller
from p2p.pipeline import edit_texts, guided_step, step_overrides
from p2p.pnp import PlugAndPlay
from weights_tools import load_checkpoint

import oracles as O

pytestmark = pytest.mark.usefixtures("one_thread")

PNP = Path(__file__).parent / "fixtures" / "golden" / "pnp"
CASES = ("d1", "d1c")


def rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture(scope="module")
def sd_d():
    return load_checkpoint(PNP / "tiny-sd-d.safetensors", device="cpu", dtype=torch.float32).eval().requires_grad_(False)


def golden(case):
    meta = json.loads((PNP / f"{case}.json").read_text())
    return load_file(str(PNP / f"{case}.safetensors")), meta["pnp"], meta["preprocess"]["inversion_prompt"]


def spec_of(p) -> PlugAndPlay:
    return PlugAndPlay(feature_steps=p["pnp_f_t"], attention_steps=p["pnp_attn_t"])


@pytest.mark.parametrize("case", CASES)
def test_every_step_fed_the_golden_inputs(sd_d, case):
    g, p, source = golden(case)
    prompts = [source, p["prompt"]]
    cond = sd_d.encode_text([source])
    for i, t in enumerate(g["pre.inversion_timesteps"].tolist()):    # the inversion
        z = g["pre.z0"] if i == 0 else g["pre.inversion_latents"][i - 1]
        inv = sd_d.scheduler(50, 1)
        assert rel(inv.inverse_step(sd_d.predict(z, t, cond), t, z), g["pre.inversion_latents"][i]) <= 1e-5, (case, i, t)
    spec, n = spec_of(p), len(g["pnp.timesteps"])
    scheduler = sd_d.scheduler(n, 1)
    assert [c.timestep for c in scheduler.calls] == g["pnp.timesteps"].tolist()
    ctl = Controller(sd_d.tokenizer, prompts, spec, n, sd_d.unet.sites, calls=scheduler.calls,
                     feature_sites=sd_d.unet.feature_sites)
    assert [ctl.injection.feature_steps > i for i in range(n)] == g["pnp.conv_injected"].tolist()
    assert [ctl.injection.attention_steps > i for i in range(n)] == g["pnp.qk_injected"].tolist()
    cond, uncond, _ = edit_texts(sd_d, prompts, spec, p["negative_prompt"], inverted=True)
    assert rel(torch.cat([uncond, cond])[[0, 1, 3]], g["pnp.unet_context"]) <= 1e-5
    for i, t in enumerate(g["pnp.timesteps"].tolist()):
        x = torch.cat([g["pnp.source_latents"][i], g["pnp.x_T"] if i == 0 else g["pnp.latents"][i - 1]])
        eps = sd_d.eps(torch.cat([x, x]), t, torch.cat([uncond, cond]), **step_overrides(ctl, i, False))
        assert rel(eps[[0, 1, 3]], g["pnp.noise_pred"][i]) <= 1e-5, (case, i, t)
        step = guided_step(sd_d, x, t, uncond, cond, p["guidance_scale"], scheduler, **step_overrides(ctl, i, False))
        assert rel(step[1:], g["pnp.latents"][i]) <= 1e-5, (case, i, t)
    image = (sd_d.decode(g["pnp.z0"]) / 2 + 0.5).clamp(0, 1)
    assert float((image - g["pnp.image"]).abs().max()) <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_whole_run_matches_their_code(sd_d, case):
    g, p, source = golden(case)
    inv = invert(sd_d, g["pre.image"] * 2 - 1, source, method="ddim", num_steps=50, guidance_scale=1.0, progress=False)
    assert rel(inv.trajectory[0], g["pre.z0"]) <= 1e-5
    assert rel(torch.stack(inv.trajectory[1:]), g["pre.inversion_latents"]) <= 5e-4
    n = len(g["pnp.timesteps"])
    out = edit(sd_d, [source, p["prompt"]], spec_of(p), inversion=inv, num_steps=n,
               negative_prompt=p["negative_prompt"], progress=False)
    t0 = g["pre.inversion_timesteps"].tolist().index(int(g["pnp.timesteps"][0]))
    assert torch.equal(out.x_T, inv.trajectory[t0 + 1])             # x_T: the inversion's latent at t_0, not its end
    assert rel(out.latents[1:], g["pnp.z0"]) <= 5e-3
    assert torch.equal(out.latents[:1], inv.trajectory[0])          # the source row ends on the image's latents
    diff = np.abs(out.images[1].astype(int) - g["pnp.image_uint8"].numpy().astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.15


def test_latents_of_every_step_follow_their_run(sd_d):
    """Each step's latents of the whole run (not only z0), through the loop's correction hook: the source row is
    the stored inversion latent at every step, the edited row within the end-to-end tolerance."""
    g, p, source = golden("d1")
    inv = invert(sd_d, g["pre.image"] * 2 - 1, source, method="ddim", num_steps=50, guidance_scale=1.0, progress=False)
    spec, n = spec_of(p), len(g["pnp.timesteps"])
    _, correction = inv.source_path(sd_d, sd_d.scheduler(n, 1))
    at = dict(zip(g["pre.inversion_timesteps"].tolist(), inv.trajectory[1:]))
    for i, t in enumerate(g["pnp.timesteps"].tolist()):
        assert torch.equal(correction(i, torch.zeros(2, 4, 32, 32))[0:1],
                           at[t - 100] if i + 1 < n else inv.trajectory[0])
        assert rel(at[t], g["pnp.source_latents"][i]) <= 5e-4


def test_edit_timesteps_must_be_among_the_inversions(sd_d):
    g, p, source = golden("d1")
    inv = invert(sd_d, g["pre.image"] * 2 - 1, source, method="ddim", num_steps=10, guidance_scale=1.0,
                 progress=False)
    with pytest.raises(ValueError, match=r"not among the 10-step inversion's.*num_steps one of \[1, 2, 5, 10\]"):
        edit(sd_d, [source, p["prompt"]], PlugAndPlay(), inversion=inv, num_steps=4, progress=False)
    with pytest.raises(ValueError, match="height"):
        edit(sd_d, [source, p["prompt"]], PlugAndPlay(), inversion=inv, num_steps=5, height=64, progress=False)


def test_injection_sites_are_sd_v1s_hard_coded_ones(sd_d):
    """up_blocks[1].resnets[1] = output_blocks[4]'s ResBlock; the self-attention of output_blocks 4-11."""
    unet = sd_d.unet
    inj = PlugAndPlay().injection(10, unet.sites, unet.feature_sites)
    assert unet.output_blocks[4][0].site.index == inj.feature_index
    want = {b[1].transformer_blocks[0].attn1.site.index for b in list(unet.output_blocks)[4:]}
    assert inj.attention_sites == want and len(want) == 8
    assert (inj.feature_steps, inj.attention_steps) == (8, 5)
    assert PlugAndPlay(feature_steps=0.29).injection(100, unet.sites, unet.feature_sites).feature_steps == 28


@pytest.mark.parametrize("bad", [dict(feature_steps=1.5), dict(attention_steps=-0.1), dict(source_text="cat")])
def test_bad_knobs_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        PlugAndPlay(**bad)


def test_feature_override_sees_every_resblock_in_call_order(sd_d):
    x, ctx = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)), sd_d.encode_text([""])
    seen = []

    def record(site, h):
        seen.append(site.index)
        assert (site.h, site.w) == tuple(h.shape[-2:])
        return h if site.index % 2 else None

    plain = sd_d.unet(x, 501, ctx)
    assert torch.equal(sd_d.unet(x, 501, ctx, feature_override=record), plain)
    assert seen == list(range(len(sd_d.unet.feature_sites))) == list(range(22))
    zeroed = sd_d.unet(x, 501, ctx, feature_override=lambda s, h: torch.zeros_like(h) if s.index == 14 else None)
    assert rel(zeroed, plain) > 1e-3


@pytest.mark.parametrize("name", ["tiny-sd2", "tiny-sdxl"])
def test_pnp_runs_on_other_families(name):
    sd, gen = O.seeded_model(load_config(name), seed=3)
    O.seeded_init_(sd.text_encoder, gen)
    sd = sd.eval().requires_grad_(False)
    side = 2 * sd.cfg.size_multiple
    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1
    inv = invert(sd, image, "a red house", method="ddim", num_steps=4, guidance_scale=1.0, progress=False)
    inj = PlugAndPlay().injection(2, sd.unet.sites, sd.unet.feature_sites)
    assert inj.attention_sites and sd.unet.feature_sites[inj.feature_index].place == "up"
    runs = [edit(sd, ["a red house", "a stone castle"], spec, inversion=inv, num_steps=2, negative_prompt="ugly",
                 progress=False) for spec in (PlugAndPlay(), PlugAndPlay(feature_steps=0.0, attention_steps=0.0))]
    assert all(torch.isfinite(r.latents).all() for r in runs)
    assert rel(runs[0].latents[1:], runs[1].latents[1:]) > 1e-4     # the injection acts
    assert torch.equal(runs[0].latents[:1], inv.trajectory[0])


def test_without_an_inversion_the_source_row_is_the_plain_generation(tiny_sd):
    """A generated source: the source row samples prompts[0] as generate() does, and the edited rows take its
    features; with no injection steps the edited row is generate() with the negative prompt."""
    prompts, kw = ["a cat riding a bicycle", "a dog riding a bicycle"], dict(num_steps=3, seed=4, progress=False)
    out = edit(tiny_sd, prompts, PlugAndPlay(), negative_prompt="blurry", **kw)
    plain = generate(tiny_sd, prompts[:1], **kw)
    assert rel(out.latents[:1], plain.latents) <= 1e-5
    off = edit(tiny_sd, prompts, PlugAndPlay(feature_steps=0, attention_steps=0), negative_prompt="blurry", **kw)
    assert rel(out.latents[1:], off.latents[1:]) > 1e-3
    assert rel(off.latents[1:], edit(tiny_sd, prompts, None, negative_prompt="blurry", **kw).latents[1:]) <= 1e-5


def test_low_memory_halves_inject_as_one_batch(tiny_sd):
    prompts, kw = ["a cat riding a bicycle", "a dog riding a bicycle"], dict(num_steps=3, seed=4, progress=False)
    full = edit(tiny_sd, prompts, PlugAndPlay(), negative_prompt="blurry", **kw)
    halves = edit(tiny_sd, prompts, PlugAndPlay(), negative_prompt="blurry", low_memory=True, **kw)
    assert rel(halves.latents, full.latents) <= 1e-5


def test_command_line_config_and_sweep(tmp_path, golden_dir, tiny_sd, monkeypatch):
    ckpt = str(golden_dir / "tiny-sd-a.safetensors")
    photo = tmp_path / "photo.png"
    Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(photo)
    config = Path(__file__).parent.parent / "configs" / "edits" / "house_castle_pnp.yaml"
    assert main(["edit", "--config", str(config), "--ckpt", ckpt, "--image", str(photo), "--method", "ddim",
                 "--steps", "4", "--height", "32", "--width", "32", "--feature-steps", "0.5", "-o",
                 str(tmp_path / "pnp.png")]) == 0
    record = json.loads((tmp_path / "pnp.png.json").read_text())
    assert "PlugAndPlay(" in record["spec"] and "feature_steps=0.5" in record["spec"]
    assert record["settings"]["negative_prompt"] == "ugly, blurry, black, low res, unrealistic"
    assert (record["settings"]["num_steps"], record["settings"]["guidance_scale"]) == (4, 7.5)
    inv = tmp_path / "photo.inv"                       # a saved inversion: the edit keeps its own steps and guidance
    assert main(["invert", "--ckpt", ckpt, "--image", str(photo), "--prompt", "a photo of a red house", "--method",
                 "ddim", "--steps", "4", "--guidance", "1", "--height", "32", "--width", "32", "-o", str(inv)]) == 0
    assert main(["edit", "--config", str(config), "--ckpt", ckpt, "--inversion", str(inv), "--steps", "2", "-o",
                 str(tmp_path / "pnp2.png")]) == 0
    record = json.loads((tmp_path / "pnp2.png.json").read_text())
    assert (record["settings"]["num_steps"], record["settings"]["guidance_scale"]) == (2, 7.5)
    sweep = tmp_path / "pnp_sweep.yaml"
    sweep.write_text(f"ckpt: {ckpt}\nprompt: a cat riding a bicycle\nedits: [a dog riding a bicycle]\nmode: pnp\n"
                     f"negative_prompt: blurry\nnum_steps: 2\nheight: 32\nwidth: 32\n"
                     f"grid:\n  feature_steps: [0.0, 1.0]\n  attention_steps: [0.0, 0.5]\n")
    monkeypatch.setattr(p2p.sweep.command, "load_checkpoint", lambda ckpt, device, dtype, **load: tiny_sd)
    assert main(["sweep", str(sweep), "-o", str(tmp_path / "runs"), "--no-progress"]) == 0
    cells = sorted((tmp_path / "runs" / "cells").glob("*.json"))
    assert len(cells) == 4
    assert len({json.loads(c.read_text())["metrics"]["latent_l2"] for c in cells}) == 4   # every knob acts


def test_kept_self_attention_maps_are_the_injected_ones(tiny_sd):
    """With a store that keeps self-attention (--show-attention), an injected layer's kept map of the edited
    row is the source's (the same q and k), at every step it injects, and its own after."""
    prompts, kw = ["a cat riding a bicycle", "a dog riding a bicycle"], dict(num_steps=2, seed=4, progress=False)
    runs = {a: edit(tiny_sd, prompts, PlugAndPlay(attention_steps=a), store=AttentionStore(self_attention=True),
                    negative_prompt="blurry", **kw).attention for a in (1.0, 0.0)}
    inj = PlugAndPlay().injection(2, tiny_sd.unet.sites, tiny_sd.unet.feature_sites)
    kept = [i for i in inj.attention_sites if i in runs[1.0].sums]
    assert kept and runs[1.0].num_steps == 2
    for i in kept:
        assert torch.allclose(runs[1.0].sums[i][1], runs[1.0].sums[i][0], atol=1e-6)
        assert not torch.allclose(runs[0.0].sums[i][1], runs[0.0].sums[i][0], atol=1e-4)
