"""Noise schedules as a diffusers folder's scheduler_config.json names them: `beta_schedule` (scaled_linear,
linear, squaredcos_cap_v2), `trained_betas`, `rescale_betas_zero_snr` and `timestep_spacing` (leading,
trailing, linspace) give the timesteps and alphas of diffusers' DDIMScheduler, and a generation from the
folder matches `StableDiffusionPipeline` with that scheduler; malformed values are refused by name before
any weight file is opened; the inverse DDIM step stays the exact inverse on every spacing."""
import json
import os
import shutil

import pytest
import torch

import oracles as O
from models.config import NoiseSchedule
from models.ddim import DDIM
from p2p import generate
from weights_tools import BadConfig, load_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

STEPS, GUIDANCE, H, W = 4, 7.5, 32, 48
SCHEDULES = [dict(beta_schedule="linear", beta_end=0.02), dict(beta_schedule="squaredcos_cap_v2"),
             dict(timestep_spacing="trailing"), dict(timestep_spacing="linspace", beta_schedule="linear"),
             dict(rescale_betas_zero_snr=True), dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist())]


def ref_ddim(**kw):
    return diffusers.DDIMScheduler(**{**O.DDIM_KW, **kw})


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_and_alphas_are_ddimschedulers(schedule, zero_snr, spacing):
    for n in (1, 3, 7, 50):
        ref = ref_ddim(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr, timestep_spacing=spacing)
        ref.set_timesteps(n)
        ours = DDIM.create(n, 1, prediction_type="v", schedule=NoiseSchedule(schedule, None, zero_snr, spacing))
        assert ours.timesteps.tolist() == ref.timesteps.tolist()
        assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)  # zero-SNR betas: the last is 0, unfloored


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_the_inverse_step_undoes_the_step_on_every_spacing(spacing):
    ddim = DDIM.create(7, 1, schedule=NoiseSchedule(spacing=spacing))
    x, eps = O.randn(1, 4, 8, 8, seed=1).double(), O.randn(1, 4, 8, 8, seed=2).double()
    for call in ddim.calls:
        back = ddim.inverse_step(eps, call.timestep, ddim.step(eps, call.timestep, x))
        assert (back - x).abs().max() <= 1e-9 * x.abs().max(), call


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_an_epsilon_model_is_refused_a_timestep_without_signal(spacing):
    """Zero-SNR betas give alpha_cumprod 0 at t = 999, where eps cannot give x0 (diffusers' DDIM: nan)."""
    with pytest.raises(ValueError, match="timestep 999 .* alpha_cumprod 0 .* epsilon prediction cannot give x0"):
        DDIM.create(7, 1, schedule=NoiseSchedule(spacing=spacing, zero_snr=True))
    v = DDIM.create(7, 1, prediction_type="v", schedule=NoiseSchedule(spacing=spacing, zero_snr=True))
    assert v.timesteps[0] == 999 and v.alpha(999) == 0
    assert DDIM.create(7, 1, schedule=NoiseSchedule(zero_snr=True)).timesteps[0] < 999  # leading: signal left


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("schedules") / "tiny-sd"
    O.ref_pipeline().save_pretrained(path)
    return path


def with_scheduler(folder, **kw):
    """The folder's scheduler_config.json rewritten as DDIMScheduler(SD's settings, then kw) saves it."""
    shutil.rmtree(folder / "scheduler")
    ref_ddim(**kw).save_pretrained(folder / "scheduler")
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())


@pytest.mark.parametrize("kw", SCHEDULES, ids=lambda kw: ",".join(f"{k}" for k in kw))
def test_a_folders_schedule_generates_as_diffusers(folder, kw):
    config = with_scheduler(folder, **kw)
    sd = load_checkpoint(folder).float().eval()
    prompts, x_T = O.tiny_generate_inputs(H, W)
    ours = generate(sd, prompts, latents=x_T, num_steps=STEPS, guidance_scale=GUIDANCE, height=H, width=W,
                    progress=False).latents
    pipe = O.ref_pipeline()
    scheduler, pipe.scheduler = pipe.scheduler, diffusers.DDIMScheduler.from_config(config)
    try:
        ref = pipe(prompts, height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0,
                   latents=x_T.expand(len(prompts), -1, -1, -1).clone(), output_type="latent").images
    finally:
        pipe.scheduler = scheduler
    default = generate(O.ours(), prompts, latents=x_T, num_steps=STEPS, guidance_scale=GUIDANCE, height=H, width=W,
                       progress=False).latents
    diff, scale = O.compare(ours, ref)
    assert diff <= 1e-4 * scale, (kw, diff, scale)
    assert (default - ref).abs().max() > 100 * diff + 1e-3 * scale  # the schedule matters: SD's gives another z0


@pytest.mark.parametrize("key, value, said", [
    ("beta_start", "0.00085", "beta_start"), ("beta_end", 1e9, "beta_end"), ("num_train_timesteps", 1e9, "num_train"),
    ("num_train_timesteps", "1000", "num_train"), ("beta_schedule", "sigmoid", "beta_schedule"),
    ("timestep_spacing", "middle", "timestep_spacing"), ("rescale_betas_zero_snr", "yes", "rescale_betas_zero_snr"),
    ("trained_betas", [-0.1] * 1000, "trained_betas"), ("trained_betas", [float("nan")] * 1000, "trained_betas"),
    ("trained_betas", [0.01] * 10, "one per timestep"), ("beta_start", 0.5, "exceeds")])
def test_malformed_scheduler_values_are_refused_before_any_weight(folder, tmp_path, key, value, said):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "scheduler" / "scheduler_config.json").read_text())
    (bad / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, key: value}))
    for weights in bad.glob("*/*.safetensors"):
        weights.write_bytes(b"not read")  # a weight file opened would fail otherwise
    with pytest.raises(BadConfig) as e:
        load_checkpoint(bad)
    assert "scheduler_config.json" in str(e.value) and said in str(e.value)


def test_a_turbo_folder_runs_its_trailing_timesteps_without_an_offset(folder):
    """SDXL-Turbo's scheduler_config.json (EulerAncestralDiscreteScheduler, trailing): its timesteps with the
    default steps_offset, no hand-computed offset."""
    shutil.rmtree(folder / "scheduler")
    ref = diffusers.EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                    timestep_spacing="trailing", steps_offset=1)
    ref.save_pretrained(folder / "scheduler")
    sd = load_checkpoint(folder)
    for steps in (1, 2, 4):
        ref.set_timesteps(steps)
        assert sd.scheduler(steps).timesteps.tolist() == ref.timesteps.round().long().tolist()


def test_the_single_file_keeps_the_schedule(folder, tmp_path):
    from weights_tools import convert_checkpoint

    with_scheduler(folder, beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    out = convert_checkpoint(folder, tmp_path / "tiny.safetensors")
    a, b = load_checkpoint(folder), load_checkpoint(out)
    assert b.cfg.schedule == a.cfg.schedule == NoiseSchedule("squaredcos_cap_v2", None, True, "trailing")
    assert torch.equal(a.alphas_cumprod, b.alphas_cumprod)
