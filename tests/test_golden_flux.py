"""Flux against FluxPipeline's recorded run on the tiny FLUX.1-dev-like folder (the `flux_plain` case of the
MM-DiT golden data, tests/fixtures/mmdit): the transformer alone with the case's text embeddings, x_T, sigmas
and timesteps gives the recorded step-0 output and every step's latents; the folder loaded as a model and
run through p2p.generate gives the case's z0 and pictures."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models.flow import FlowConfig, FlowMatchEuler
from models.flux import FluxConfig, FluxTransformer, pack, unpack
from models.flux_model import Flux
from models.mmdit_text import TextCond
from p2p import generate
from weights_tools import load_checkpoint

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
    """The tiny folder through the library's loader (load_checkpoint), with its text encoders."""
    return load_checkpoint(MMDIT / "tiny-flux")


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


PROMPTS = ["a red house by the sea.", "a photo of a dog."]


def pipeline_latents(folder, steps, size, guidance, x_T):
    """FluxPipeline (the test oracle) from the folder: its z0, packed."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
    return pipe(prompt=PROMPTS, height=size[0], width=size[1], num_inference_steps=steps, guidance_scale=guidance,
                latents=pack(x_T.expand(2, -1, -1, -1)), output_type="latent").images


@pytest.mark.parametrize("steps, size, guidance", [(4, (64, 96), 5.0), (7, (128, 64), 2.0)])
def test_equals_flux_pipeline(flux, steps, size, guidance):
    """Other prompts, sizes (so other dynamic shifts and RoPE grids), steps and guidance."""
    x_T = torch.randn((1, 16, size[0] // 8, size[1] // 8), generator=torch.Generator().manual_seed(5))
    ours = generate(flux, PROMPTS, latents=x_T, num_steps=steps, guidance_scale=guidance, height=size[0],
                    width=size[1], progress=False)
    assert relative(pack(ours.latents), pipeline_latents(MMDIT / "tiny-flux", steps, size, guidance, x_T)) <= 1e-4


@pytest.fixture(scope="module")
def schnell_folder(tmp_path_factory):
    """The tiny folder made schnell-like: its transformer without the guidance embedding."""
    folder = tmp_path_factory.mktemp("flux") / "tiny-schnell"
    shutil.copytree(MMDIT / "tiny-flux", folder)
    config_path = folder / "transformer" / "config.json"
    config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()), guidance_embeds=False)))
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if ".guidance_embedder." not in k}, weights)
    return folder


def test_a_schnell_folder_loads_as_schnell_and_equals_flux_pipeline(schnell_folder, one_thread):
    """No guidance embedding: the guidance scale changes nothing, as in FluxPipeline."""
    schnell = load_checkpoint(schnell_folder)
    assert isinstance(schnell, Flux) and schnell.variant == "FLUX.1-schnell" and not schnell.guidance_embeds
    x_T = torch.randn((1, 16, 8, 12), generator=torch.Generator().manual_seed(6))
    runs = [generate(schnell, PROMPTS, latents=x_T, num_steps=4, guidance_scale=g, height=64, width=96,
                     progress=False).latents for g in (0.0, 3.5)]
    assert torch.equal(runs[0], runs[1])
    assert relative(pack(runs[0]), pipeline_latents(schnell_folder, 4, (64, 96), 0.0, x_T)) <= 1e-4
