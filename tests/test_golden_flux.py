"""Flux against FluxPipeline's recorded run on the tiny FLUX.1-dev-like folder (the `flux_plain` case of the
MM-DiT golden data, tests/fixtures/mmdit): the transformer alone with the case's text embeddings, x_T, sigmas
and timesteps gives the recorded step-0 output and every step's latents; the folder loaded as a model and
run through p2p.generate gives the case's z0 and pictures."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.flow import FlowConfig, FlowMatchEuler
from models.flux import FluxConfig, FluxTransformer, pack, unpack
from models.flux_model import Flux
from models.mmdit_text import TextCond
from p2p import generate
from weights_tools.mmdit import load_mmdit
from weights_tools.mmdit_text import load_flux_text

MMDIT = Path(__file__).parent / "fixtures" / "mmdit"


@pytest.fixture(scope="module")
def case():
    return load_file(MMDIT / "flux_plain.safetensors"), json.loads((MMDIT / "flux_plain.json").read_text())


@pytest.fixture(scope="module")
def transformer():
    folder = MMDIT / "tiny-flux" / "transformer"
    cfg = FluxConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    model = FluxTransformer(cfg).eval()
    model.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), strict=True)
    return model


def flow_config() -> FlowConfig:
    path = MMDIT / "tiny-flux" / "scheduler" / "scheduler_config.json"
    return FlowConfig.from_scheduler_config(json.loads(path.read_text()))


def relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_packing_is_the_pipelines(case):
    g, _ = case
    assert torch.equal(pack(g["x_T"]), g["x_T_packed"])
    assert torch.equal(unpack(g["z0"], 12, 16), g["z0_unpacked"])


def test_the_schedule_is_the_pipelines(case):
    """The folder's dynamic shift at 48 image tokens gives the recorded sigmas and timesteps."""
    g, meta = case
    sampler = FlowMatchEuler.create(meta["num_inference_steps"], flow_config(), 48)
    assert torch.equal(sampler.sigmas, g["sigmas"]) and torch.equal(sampler.timesteps, g["timesteps"])


def test_denoising_reproduces_the_pipelines_latents(case, transformer, one_thread):
    """Euler steps on the packed latent, the transformer at t = timestep / 1000 (as FluxPipeline passes it)
    with the case's distilled guidance: the step-0 output and all ten steps' latents as recorded."""
    g, meta = case
    sampler = FlowMatchEuler.create(meta["num_inference_steps"], flow_config(), 48)
    guidance = torch.full((2,), meta["guidance_scale"])
    grid = (meta["height"] // 16, meta["width"] // 16)
    x = pack(g["x_T"].expand(2, -1, -1, -1))
    with torch.no_grad():
        for i, t in enumerate(sampler.timesteps):
            v = transformer(x, t.expand(2) / 1000, g["prompt_embeds"], g["pooled_prompt_embeds"], grid, guidance)
            if i == 0:
                assert relative(v, g["model_out_step0"]) <= 1e-5
            x = sampler.step(v, i, x)
            assert relative(x, g["latents_steps"][i]) <= 1e-5, f"step {i}"
    assert relative(x, g["z0"]) <= 1e-4


# ------------------------------------------------------------------------------------- the whole model
@pytest.fixture(scope="module")
def flux(one_thread):
    """The tiny folder through the library's loader, with its text encoders."""
    folder = MMDIT / "tiny-flux"
    return load_mmdit(folder, text=load_flux_text(folder))


def generated(flux, meta, g, prompts):
    return generate(flux, prompts, latents=g["x_T"], num_steps=meta["num_inference_steps"],
                    guidance_scale=meta["guidance_scale"], height=meta["height"], width=meta["width"], progress=False)


def test_the_folder_loads_as_flux_dev(flux):
    assert isinstance(flux, Flux) and flux.variant == "FLUX.1-dev"
    assert flux.guidance_embeds and not flux.uses_cfg and flux.text_positions == {"t5": slice(0, 512)}
    assert [s.index for s in flux.joint_sites(96, 128)] == [0, 1, 2, 3]


def test_velocity_takes_the_unpacked_latent_and_the_samplers_timestep(case, flux):
    """velocity(x (B, 16, h, w), t = sigma * 1000) is the pipeline's packed step-0 output, unpacked."""
    g, meta = case
    cond = TextCond(g["prompt_embeds"], g["pooled_prompt_embeds"])
    t = flux.sampler(meta["num_inference_steps"], meta["height"], meta["width"]).timesteps[0]
    with torch.no_grad():
        v = flux.velocity(g["x_T"].expand(2, -1, -1, -1), t, cond, torch.full((2,), meta["guidance_scale"]))
    assert torch.equal(v, unpack(g["model_out_step0"], 12, 16))


def test_generation_from_the_cases_embeddings_gives_its_z0(case, flux):
    g, meta = case
    out = generated(flux, meta, g, TextCond(g["prompt_embeds"], g["pooled_prompt_embeds"]))
    assert relative(out.latents, g["z0_unpacked"]) <= 1e-6


def test_generation_from_the_prompts_gives_the_cases_z0_and_pictures(case, flux):
    """The prompts through the library's CLIP-L and T5, x_T, ten steps, the VAE: z0 within 1e-4 relative
    (measured 1.6e-7), the pictures within one level of 255."""
    g, meta = case
    cond = flux.encode_prompts(meta["prompts"])
    assert relative(cond.context, g["prompt_embeds"]) <= 1e-5
    assert relative(cond.pooled, g["pooled_prompt_embeds"]) <= 1e-5
    out = generated(flux, meta, g, meta["prompts"])
    assert relative(out.latents, g["z0_unpacked"]) <= 1e-4
    want = np.round(g["images"].numpy() * 255).astype(np.int16)
    assert out.images.shape == (2, 96, 128, 3)
    assert np.abs(out.images.astype(np.int16) - want).max() <= 1
