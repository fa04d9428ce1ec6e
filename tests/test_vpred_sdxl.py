"""v-prediction SDXL fine-tunes as ComfyUI saves them (NoobAI-style single files): empty `v_pred` and `ztsnr`
marker keys, `modelspec.predict_key` metadata. They load as v-prediction models on zero-terminal-SNR betas
and generate as diffusers' StableDiffusionXLPipeline with a DDIMScheduler set the same way; `p2p inspect`
says what it predicts and why; a marker that contradicts the metadata is refused."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import oracles as O
import sdxl_oracles as X
from p2p import generate
from weights_tools import CheckpointError, format_inspection, inspect_checkpoint, load_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

STEPS, GUIDANCE, H, W = 6, 5.0, 32, 48
PROMPTS = ["a photo of a cat riding a bicycle", "a lion eating a burger"]


def save(path, markers=("v_pred", "ztsnr"), **metadata):
    sd = X.ours()
    state = X.single_file_state(sd) | {k: torch.tensor([]) for k in markers}
    save_file(state, str(path), metadata={"ldm_config": json.dumps(sd.cfg.to_ldm()), **metadata})
    return path


def reference(x_T, **scheduler):
    pipe = X.ref_pipeline()
    kept, pipe.scheduler = pipe.scheduler, diffusers.DDIMScheduler(**{**O.DDIM_KW, **scheduler})
    try:
        return pipe(PROMPTS, height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0,
                    latents=x_T.expand(len(PROMPTS), -1, -1, -1).clone(), output_type="latent").images
    finally:
        pipe.scheduler = kept


@pytest.mark.parametrize("markers, metadata, zero_snr", [
    (("v_pred", "ztsnr"), {"modelspec.predict_key": "v"}, True), (("v_pred",), {}, False),
    (("ztsnr",), {"modelspec.predict_key": "v"}, True)])
def test_a_v_prediction_file_generates_as_diffusers(tmp_path, markers, metadata, zero_snr):
    sd = load_checkpoint(save(tmp_path / "noob.safetensors", markers, **metadata)).float().eval()
    assert sd.cfg.prediction_type == "v" and sd.cfg.schedule.zero_snr == zero_snr
    x_T = O.randn(1, 4, H // sd.latent_downsample, W // sd.latent_downsample, seed=7)
    ours = generate(sd, PROMPTS, latents=x_T, num_steps=STEPS, guidance_scale=GUIDANCE, height=H, width=W,
                    progress=False).latents
    ref = reference(x_T, prediction_type="v_prediction", rescale_betas_zero_snr=zero_snr)
    diff, scale = O.compare(ours, ref)
    assert diff <= 1e-4 * scale, (diff, scale)
    eps = reference(x_T)  # the same weights read as an epsilon model: far off
    assert (eps - ref).abs().max() > 1e-2 * scale


def test_inspect_says_v_and_zero_snr_and_why(tmp_path, capsys):
    info = inspect_checkpoint(save(tmp_path / "noob.safetensors"))
    assert info["loadable"] and info["prediction_type"] == "v" and "v_pred" in info["prediction_source"]
    assert "zero terminal SNR" in info["schedule"] and "ztsnr" in info["schedule"] and not info["unknown_count"]
    text = format_inspection(info)
    assert "predicts: v (the file's `v_pred` marker key" in text and "schedule:" in text


def test_predict_key_alone_says_v(tmp_path):
    info = inspect_checkpoint(save(tmp_path / "v.safetensors", (), **{"modelspec.predict_key": "v"}))
    assert info["prediction_type"] == "v" and "modelspec.predict_key" in info["prediction_source"]


def test_a_marker_against_the_metadata_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="v_pred.*says v but.*predict_key metadata says epsilon"):
        load_checkpoint(save(tmp_path / "both.safetensors", ("v_pred",), **{"modelspec.predict_key": "epsilon"}))


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_zero_snr_timesteps_from_zero_signal_generate_as_diffusers(tmp_path, spacing):
    """Trailing and linspace spacing start at t = 999, where zero-SNR betas give alpha_cumprod 0: eps (= x there)
    carries nothing of x0, but the model's v does (x0 = -v). The sampler is given v and reads x0 and eps from it
    as diffusers' DDIMScheduler.step does, so the whole run matches diffusers, that first step included."""
    from models.config import NoiseSchedule
    from models.ddim import alphas_cumprod

    sd = load_checkpoint(save(tmp_path / "noob.safetensors"), config=None).float().eval()
    sd.cfg = sd.cfg.replace(schedule=NoiseSchedule(zero_snr=True, spacing=spacing))
    assert sd.scheduler(STEPS).timesteps[0] == 999 and alphas_cumprod(schedule=sd.cfg.schedule)[999] == 0
    x_T = O.randn(1, 4, H // sd.latent_downsample, W // sd.latent_downsample, seed=7)
    ours = generate(sd, PROMPTS, latents=x_T, num_steps=STEPS, guidance_scale=GUIDANCE, height=H, width=W,
                    progress=False).latents
    ref = reference(x_T, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing=spacing)
    diff, scale = O.compare(ours, ref)
    print(f"\n  zero SNR, {spacing}: max|diff| / scale = {diff / scale:.2e}", end="")
    assert diff <= 1e-4 * scale, (diff, scale)


def test_the_step_from_zero_signal_is_diffusers_step():
    """One DDIM step at t = 999 (alpha_cumprod 0) given v: x0 = -v, eps = x, exactly as DDIMScheduler.step."""
    from models.config import NoiseSchedule
    from models.ddim import DDIM

    ours = DDIM.create(STEPS, prediction_type="v", schedule=NoiseSchedule(zero_snr=True, spacing="trailing"))
    ref = diffusers.DDIMScheduler(**{**O.DDIM_KW, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                                     "timestep_spacing": "trailing"})
    ref.set_timesteps(STEPS)
    x, v = O.randn(2, 4, 8, 6, seed=1), O.randn(2, 4, 8, 6, seed=2)
    got, want = ours.step(v, 999, x), ref.step(v, 999, x, eta=0.0).prev_sample
    a = ours.alpha(999 - 1000 // STEPS)
    torch.testing.assert_close(got, a.sqrt() * -v + (1 - a).sqrt() * x, rtol=0, atol=0)
    diff, scale = O.compare(got, want)
    assert diff <= 1e-6 * scale, (diff, scale)
