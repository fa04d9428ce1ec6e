"""The Flux transformer against FluxPipeline's recorded run on the tiny FLUX.1-dev-like folder (the
`flux_plain` case of the MM-DiT golden data): the same text embeddings, x_T, sigmas and timesteps give the
recorded step-0 output and every step's latents."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.flow import FlowConfig, FlowMatchEuler
from models.flux import FluxConfig, FluxTransformer, pack, unpack

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
