"""The Flux transformer against FluxPipeline's recorded run on the tiny FLUX.1-dev-like folder (the
`flux_plain` case of the MM-DiT golden data): the same text embeddings, x_T, sigmas and timesteps give the
recorded step-0 output and every step's latents."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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


def relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_packing_is_the_pipelines(case):
    g, _ = case
    assert torch.equal(pack(g["x_T"]), g["x_T_packed"])
    assert torch.equal(unpack(g["z0"], 12, 16), g["z0_unpacked"])


def test_denoising_reproduces_the_pipelines_latents(case, transformer, one_thread):
    """Euler steps x <- x + (sigma_next - sigma) v, v at t = timestep / 1000 (as FluxPipeline passes it) and the
    case's distilled guidance: the step-0 output and all ten steps' latents as recorded."""
    g, meta = case
    sigmas, timesteps = g["sigmas"], g["timesteps"]
    guidance = torch.full((2,), meta["guidance_scale"])
    grid = (meta["height"] // 16, meta["width"] // 16)
    x = pack(g["x_T"].expand(2, -1, -1, -1))
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            v = transformer(x, t.expand(2) / 1000, g["prompt_embeds"], g["pooled_prompt_embeds"], grid, guidance)
            if i == 0:
                assert relative(v, g["model_out_step0"]) <= 1e-5
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            assert relative(x, g["latents_steps"][i]) <= 1e-5, f"step {i}"
    assert relative(x, g["z0"]) <= 1e-4
