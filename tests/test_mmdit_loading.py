"""Opening MM-DiT diffusers folders (weights_tools/mmdit.py): the 16-channel VAE (no quant convs, scaling and
shift factors) against diffusers' AutoencoderKL, SD3 and SD3.5 told apart by the transformer's config
(`p2p inspect`), an SD3.5 folder's transformer against diffusers', and the refusals: a folder whose tensors
do not fit its config, the UNet families' options."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from safetensors.torch import load_file, save_file

from models.mmdit_text import TextCond
from p2p import generate
from weights_tools import CheckpointError, inspect_checkpoint, load_checkpoint
from weights_tools.mmdit import load_mmdit

FIXTURES = Path(__file__).parent / "fixtures" / "mmdit"
SD3_FOLDER = FIXTURES / "tiny-sd3"


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def sd3():
    return load_mmdit(SD3_FOLDER, text=False)


def test_vae_equals_diffusers(sd3):
    theirs = AutoencoderKL.from_pretrained(SD3_FOLDER / "vae").eval()
    assert not theirs.config.use_quant_conv and not any("quant_conv" in k for k in sd3.vae.state_dict())
    g = torch.Generator().manual_seed(0)
    z, images = torch.randn(2, 16, 12, 16, generator=g), torch.rand(1, 3, 96, 128, generator=g)
    with torch.no_grad():
        want = (theirs.decode(z / 1.5305 + 0.0609).sample / 2 + 0.5).clamp(0, 1)
        assert rel(sd3.decode(z), want) <= 1e-5
        mean = theirs.encode(images * 2 - 1).latent_dist.mean
        assert rel(sd3.encode(images), (mean - 0.0609) * 1.5305) <= 1e-5
    assert (sd3.scaling_factor, sd3.shift_factor) == (1.5305, 0.0609)


def sd35_folder(tmp: Path) -> Path:
    """tiny-sd3 with an SD3.5-shaped transformer (qk RMS-norm, dual attention in blocks 0 and 1)."""
    folder = tmp / "tiny-sd35"
    shutil.copytree(SD3_FOLDER, folder)
    config = dict(SD3Transformer2DModel.load_config(SD3_FOLDER / "transformer"))
    config = {k: v for k, v in config.items() if not k.startswith("_")} | dict(
        qk_norm="rms_norm", dual_attention_layers=(0, 1))
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    shutil.rmtree(folder / "transformer")
    model.save_pretrained(folder / "transformer")
    return folder


def test_sd35_folder(tmp_path):
    folder = sd35_folder(tmp_path)
    info = inspect_checkpoint(folder)
    assert info["variant"] == "SD3.5" and info["loadable"] and "qk_norm 'rms_norm'" in info["variant_evidence"]
    assert inspect_checkpoint(SD3_FOLDER)["variant"] == "SD3"
    m = load_checkpoint(folder)
    assert m.family == "SD3.5" and [s.index for s in m.joint_sites(96, 128)] == [0, 2, 4]
    theirs = SD3Transformer2DModel.from_pretrained(folder / "transformer").eval()
    g = torch.Generator().manual_seed(2)
    x, ctx, pooled = torch.randn(2, 16, 12, 16, generator=g), torch.randn(2, 9, 96, generator=g), torch.randn(2, 80, generator=g)
    t = torch.tensor([1000.0, 250.0])
    cond = TextCond(ctx, pooled)
    with torch.no_grad():
        assert rel(m.velocity(x, t, cond), theirs(x, ctx, pooled, t).sample) <= 1e-5


def test_tensors_must_fit_the_config(tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(SD3_FOLDER, folder)
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state["transformer_blocks.1.attn.to_q.weight"]
    save_file(state, path)
    with pytest.raises(CheckpointError, match="missing.*transformer_blocks.1.attn.to_q.weight"):
        load_mmdit(folder, text=False)


def test_unet_options_are_refused(sd3):
    with pytest.raises(CheckpointError, match="vae cannot be given for an MM-DiT folder"):
        load_checkpoint(SD3_FOLDER, vae=SD3_FOLDER / "vae")
    with pytest.raises(ValueError, match="sampler='pndm'.*MM-DiT"):
        generate(sd3, ["a"], sampler="pndm", num_steps=1, height=96, width=128, progress=False)
    with pytest.raises(ValueError, match="multiples of 16"):
        sd3.sampler(4, 96, 120)
