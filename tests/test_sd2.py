"""SD 2.x end to end on a tiny v-prediction model (configs/tiny-sd2.yaml, seeded random weights, fp32):
10-step generation against diffusers' StableDiffusionPipeline loaded from an SD 2.x-style folder that
diffusers' own converters made from our weights (DDIMScheduler with prediction_type v_prediction), the
single file and the folder giving one model, full-size SD 2.1 layouts on the meta device against
diffusers' converters, edits, pictures and the command line. Run with `pytest -s` to see the figures."""
import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

import oracles as O
import sd2_oracles as S
import test_sweep
from models import SDConfig, StableDiffusion, load_config, prefixes
from p2p import LocalBlend, Refine, Replace, Reweight, edit, generate
from p2p.cli import main
from p2p.store import AttentionStore
from p2p.viz import attention_pictures, prompt_tokens
from weights_tools import CheckpointError, load_checkpoint, model_shapes, validate_shapes
from weights_tools import diffusers_keys
from weights_tools.inspection import inspect_checkpoint
from weights_tools.layout import fits
from weights_tools.openclip_keys import hf_plan, openclip_config_from_hf

sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

STEPS, GUIDANCE, H, W = 10, 7.5, 64, 48
PROMPTS = ["a photo of a cat riding a bicycle", "a lion eating a burger"]
SRC, LION = "a painting of a squirrel eating a burger", "a painting of a lion eating a burger"
KW = dict(num_steps=3, seed=5, progress=False)


@pytest.fixture(scope="module")
def folder_model():
    return load_checkpoint(S.folder())


@pytest.fixture(scope="module")
def file_path(tmp_path_factory):
    return S.write_single_file(tmp_path_factory.mktemp("sd2") / "tiny-sd2.safetensors")


@pytest.fixture(scope="module")
def runs(folder_model):
    pipe = S.pipeline()
    x_T = O.randn(1, 4, H // 2, W // 2, seed=7)
    ours = generate(folder_model, PROMPTS, latents=x_T, num_steps=STEPS, guidance_scale=GUIDANCE, height=H, width=W,
                    progress=False)
    ref_z0 = pipe(PROMPTS, height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0,
                  latents=x_T.expand(2, -1, -1, -1).clone(), output_type="latent").images
    with torch.no_grad():
        ref_img = pipe.vae.decode(ref_z0 / pipe.vae.config.scaling_factor).sample
    return ours, ref_z0, ref_img, x_T


def report(name, diff, scale, tol):
    msg = f"{name}: max|diff| = {diff:.3e}, ref scale = {scale:.3f}, tol = {tol * scale:.1e}"
    print("\n  " + msg, end="")
    assert diff <= tol * scale, msg


def test_folder_is_sd2_v(folder_model):
    cfg = folder_model.cfg
    assert (cfg.family, cfg.prediction_type, cfg.text.layers, cfg.text.output_layer) == ("sd2", "v", 23, "last")
    assert cfg.unet.num_head_channels == 32 and cfg.unet.use_linear_in_transformer
    assert folder_model.tokenizer.pad == 0  # "!" padding, as the folder's tokenizer
    assert folder_model.cfg.default_height == 64  # the folder's unet sample_size 32 through the tiny VAE


def test_generate_latents_match_pipeline(runs):
    ours, ref_z0, _, _ = runs
    report(f"SD 2.x v generate z0 vs StableDiffusionPipeline ({STEPS} steps)", *O.compare(ours.latents, ref_z0), 1e-4)
    assert (ours.latents[0] - ours.latents[1]).abs().max() > 1e-2, "the two prompts gave the same latents"


def test_generate_images_match_pipeline(runs, folder_model):
    ours, _, ref_img, _ = runs
    with torch.no_grad():
        report("SD 2.x decoded images", *O.compare(folder_model.decode(ours.latents), ref_img), 1e-4)
    ref_u8 = ((ref_img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    d8 = np.abs(ours.images.astype(int) - ref_u8.astype(int))
    print(f"\n  SD 2.x uint8 images: max|diff| = {d8.max()} LSB, {int((d8 > 0).sum())} of {d8.size} differ", end="")
    assert ours.images.shape == (2, H, W, 3) and d8.max() <= 1


def test_generate_pndm_matches_pipeline(folder_model, runs):
    """PLMS on a v model: a 10-step generate(sampler="pndm") against the same pipeline with diffusers'
    PNDMScheduler(prediction_type="v_prediction"), same x_T."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    base = S.pipeline()
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(**{**base.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    x_T = runs[3]
    ours = generate(folder_model, PROMPTS, latents=x_T, num_steps=STEPS, guidance_scale=GUIDANCE, height=H,
                    width=W, sampler="pndm", progress=False)
    ref_z0 = pipe(PROMPTS, height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  latents=x_T.expand(2, -1, -1, -1).clone(), output_type="latent").images
    diff, scale = O.compare(ours.latents, ref_z0)
    report(f"SD 2.x v: generate(sampler='pndm') z0 vs pipeline + PNDMScheduler ({STEPS} steps)", diff, scale, 1e-4)
    gap, _ = O.compare(runs[0].latents, ref_z0)  # DDIM's z0: the comparison tells the samplers apart
    assert gap > 100 * max(diff, 1e-6), (gap, diff)


def test_epsilon_reading_differs(runs, folder_model):
    """The v conversion matters: the same weights read as epsilon give another picture."""
    ours, _, _, x_T = runs
    eps = StableDiffusion(folder_model.cfg.replace(prediction_type="epsilon"))
    eps.load_state_dict(folder_model.state_dict())
    other = generate(eps.eval(), PROMPTS, latents=x_T, num_steps=STEPS, guidance_scale=GUIDANCE, height=H, width=W,
                     progress=False)
    assert (other.latents - ours.latents).abs().max() > 1e-2


def test_single_file_and_folder_are_one_model(file_path, folder_model, runs):
    sd = load_checkpoint(file_path)
    assert (sd.cfg.family, sd.cfg.prediction_type, sd.cfg.text.layers) == ("sd2", "v", 24)
    ours, _, _, x_T = runs
    again = generate(sd, PROMPTS, latents=x_T, num_steps=STEPS, guidance_scale=GUIDANCE, height=H, width=W,
                     progress=False)
    report("single file vs folder, z0", *O.compare(again.latents, ours.latents), 1e-5)
    for part in ("unet", "vae"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(sd, part).state_dict().values(),
                                                      getattr(folder_model, part).state_dict().values()))


def test_single_file_unused_keys_reported(file_path):
    info = inspect_checkpoint(file_path)
    assert info["loadable"] and info["family"] == "sd2" and info["parts"]["unused"]["tensors"] == 2
    assert info["model"] == "SD 2.x v (768-px v-prediction model)" and info["prediction_type"] == "v"


def test_single_file_without_config_follows_sd2_rule(tmp_path):
    """No config in the file: SD 2.x's own config; v at 768 px unless the file says base (global_step 875000)."""
    cfg = load_config("sd-v2-v")
    header = {k: tuple(v) for k, v in model_shapes(cfg).items()}
    validate_shapes(header, cfg, "v2-1_768-ema-pruned.safetensors")
    from weights_tools.family import resolve_prediction
    from weights_tools.load import SD2_SOURCE, sd2_default
    from weights_tools.sources import Source

    for meta, want in (({}, "v"), ({"global_step": "875000"}, "epsilon")):
        src = Source("x", "ckpt", {}, None, meta)
        got, why = resolve_prediction(src, sd2_default(None), SD2_SOURCE, "SD 2.x")
        assert got == want, why
        assert sd2_default(got).default_height == {"v": 768, "epsilon": 512}[want]


def test_config_round_trips_and_reads_768():
    for name in ("sd-v2-base", "sd-v2-v", "tiny-sd2"):
        cfg = load_config(name)
        assert SDConfig.from_ldm(json.loads(cfg.to_json())) == cfg and cfg.family == "sd2"
    assert load_config("sd-v2-v").default_height == 768 and load_config("sd-v2-base").default_height == 512
    assert load_config("sd-v2-v").prediction_type == "v" and load_config("sd-v2-base").prediction_type == "epsilon"


# ------------------------------------------------------------------------------ full-size SD 2.1
SD21_UNET = dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                 use_linear_projection=True, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD21_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=768,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
SD21_TEXT = dict(architectures=["CLIPTextModel"], vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                 num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                 projection_dim=512)


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.fixture(scope="module")
def full():
    """(our full-size SD 2.1 v state dict under the single-file prefixes, meta tensors; diffusers' models)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = load_config("sd-v2-v")
    with torch.device("meta"):
        sd = StableDiffusion(cfg)
        refs = UNet2DConditionModel(**SD21_UNET), AutoencoderKL(**SD21_VAE), CLIPTextModel(CLIPTextConfig(**SD21_TEXT))
    ours = {prefix + k: v for part, prefix in prefixes(cfg).items() for k, v in getattr(sd, part).state_dict().items()}
    return cfg, ours, refs


def test_full_size_single_file_matches_diffusers_converters(full):
    cfg, ours, (unet, vae, text) = full
    assert shapes(sfu.convert_ldm_unet_checkpoint(ours, dict(SD21_UNET))) == shapes(unet.state_dict())
    assert shapes(sfu.convert_ldm_vae_checkpoint(ours, dict(SD21_VAE))) == shapes(vae.state_dict())
    with_unused = ours | {"cond_stage_model.model.text_projection": torch.empty(1024, 1024, device="meta"),
                          "cond_stage_model.model.logit_scale": torch.empty((), device="meta")}
    converted = {k.removeprefix("text_model."): v for k, v in sfu.convert_open_clip_checkpoint(text, with_unused).items()
                 if k != "text_projection.weight"}
    want = {k.removeprefix("text_model."): v for k, v in shapes(text.state_dict()).items() if "position_ids" not in k}
    assert shapes(converted) == want
    validate_shapes(shapes(with_unused), cfg, "v2-1_768-ema-pruned.safetensors")  # the unused pair is allowed


def test_full_size_diffusers_layout_maps_to_ours(full):
    """A full-size SD 2.1 folder's keys, through our folder key maps, are exactly our model's keys and shapes."""
    cfg, ours, (unet, vae, text) = full
    folder_cfg = diffusers_keys.sd_config(SD21_UNET, SD21_VAE, SD21_TEXT, None, "sd21", family="sd2",
                                          text_cfg=lambda c: openclip_config_from_hf(c, "sd2"))
    same_levels = dataclasses.replace(folder_cfg.unet, attention_resolutions=cfg.unet.attention_resolutions)
    assert same_levels == cfg.unet and set(folder_cfg.unet.attention_resolutions) == {1, 2, 4}
    assert folder_cfg.image_size == 96
    mapped = {diffusers_keys.to_ldm_key(p, k, c, p): tuple(v.shape) for p, m, c in
              (("unet", unet, SD21_UNET), ("vae", vae, SD21_VAE)) for k, v in m.state_dict().items()}
    text_shapes = shapes(text.state_dict())
    for key, hf in hf_plan(text_shapes).items():
        first = text_shapes[hf[0]]
        mapped["cond_stage_model.model." + key] = (len(hf) * first[0], *first[1:]) if len(hf) > 1 else first
    want = model_shapes(folder_cfg)  # shapes equal, or the documented [C, C] <-> [C, C, 1, 1] VAE shims
    assert set(mapped) == set(want) and all(fits(k, mapped[k], want[k]) for k in want)
    # the folder's 23-layer tower is the single file's without its 24th layer
    assert set(model_shapes(cfg)) - set(mapped) == {k for k in ours if ".resblocks.23." in k}


def test_loader_builds_on_meta_device():
    """One copy of the weights: the loader builds the model on the meta device and assigns each tensor
    as it is read (a 5 GB SD 2.1 file needs no second copy); here, the full-size model costs no memory."""
    with torch.device("meta"):
        sd = StableDiffusion(load_config("sd-v2-v"))
    assert all(p.is_meta for p in sd.parameters())
    assert sum(p.numel() for p in sd.parameters()) > 1.2e9


def test_family_mismatch_is_refused(file_path):
    with pytest.raises(CheckpointError, match="SD 2.x checkpoint.*'sd1' family"):
        load_checkpoint(file_path, config="tiny")


# ------------------------------------------------------------------------------ editing
def test_replace_with_itself_is_generate(folder_model):
    """Up to float rounding: the edit computes attention through the controller, generate without it."""
    same = edit(folder_model, [SRC, SRC], Replace(1.0, 1.0), **KW)
    plain = generate(folder_model, [SRC, SRC], **KW)
    report("Replace(P, P) vs generate, z0", *O.compare(same.latents, plain.latents), 1e-4)


@pytest.mark.parametrize("spec,prompts", [(Replace(0.8, 0.4), [SRC, LION]),
                                          (Refine(0.8, 0.4), [SRC, "a painting of a squirrel eating a big burger"]),
                                          (Reweight(0.8, 0.4, equalizer={"burger": 3.0}), [SRC, SRC])])
def test_edits_run(folder_model, spec, prompts):
    blend = LocalBlend(("squirrel", "lion")) if isinstance(spec, Replace) else None
    store = AttentionStore()
    out = edit(folder_model, prompts, spec, local_blend=blend, store=store, **KW)
    assert out.images.shape == (2, 64, 64, 3) and torch.isfinite(out.latents).all()
    assert (out.latents[0] - out.latents[1]).abs().max() > 1e-4, spec
    pictures = attention_pictures(store, out.images, prompts, folder_model.tokenizer)
    grids = [np.asarray(g) for g in pictures["attention"]]
    assert len(grids) == 2 and all(g.ndim == 3 and g.shape[2] == 3 and g.std() > 0 for g in grids)
    assert "squirrel" in prompt_tokens(folder_model.tokenizer, prompts[0])


# ------------------------------------------------------------------------------ command line
def test_cli_generate_edit_invert_inspect(file_path, tmp_path, capsys):
    fast = ["--steps", "2", "--height", "64", "--width", "64"]
    gen = tmp_path / "g.png"
    assert main(["generate", "--ckpt", str(file_path), "--prompt", SRC, *fast, "-o", str(gen)]) == 0
    out = tmp_path / "e.png"
    assert main(["edit", "--ckpt", str(file_path), "--prompt", SRC, "--edit", LION, "--blend", "squirrel", "lion",
                 *fast, "-o", str(out)]) == 0
    inv = tmp_path / "cat.inv"
    assert main(["invert", "--ckpt", str(file_path), "--image", str(gen), "--prompt", SRC, "--method", "ddim",
                 *fast, "-o", str(inv)]) == 0
    assert gen.exists() and out.exists() and inv.exists()
    capsys.readouterr()
    assert main(["inspect", str(file_path)]) == 0
    text = capsys.readouterr().out
    assert "SD 2.x" in text and "predicts: v" in text and "unused" in text


def test_sweep_runs_on_sd2(file_path, tmp_path):
    """`p2p sweep` on the SD 2.x file: test_sweep's ablation (4 cells in 2 batches), metrics and figure written."""
    cfg = tmp_path / "abl.yaml"
    cfg.write_text(test_sweep.ABLATION.format(ckpt=file_path))
    out = tmp_path / "runs"
    assert main(["sweep", str(cfg), "-o", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["cross_replace_steps"] for r in rows] == ["0.4", "0.4", "0.8", "0.8"] and (out / "figure.png").exists()
