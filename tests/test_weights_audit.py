"""Gaps a real-file audit found, each with a tiny file of the real structure: leftover keys and
--non-strict, a swapped-in VAE, old diffusers folders' sample_size, the prediction type, other
families named as such, and Lightning's non-tensor entries."""
import collections
import json
import pathlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models import PREFIXES
from weights_tools import CheckpointError, format_inspection, inspect_checkpoint, load_checkpoint

from conftest import GOLDEN_CKPT
from test_weights_ckpt import assert_same


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN_CKPT))


@pytest.fixture(scope="module")
def reference():
    return model_tensors(load_checkpoint(GOLDEN_CKPT))


def model_tensors(sd):
    return {PREFIXES[p] + k: v for p in PREFIXES for k, v in getattr(sd, p).state_dict().items()}


# ------------------------------------------------------------------------ Lightning's non-tensor entries
class AttributeDict(dict):
    """As Lightning's `AttributeDict` (hyper_parameters): a dict subclass, pickled with SETITEMS."""

    def __getattr__(self, key):
        return self[key]


def test_dict_subclasses_and_paths_become_placeholders(tmp_path, golden, reference):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": golden, "global_step": torch.tensor(470000), "epoch": 3,
                "hyper_parameters": AttributeDict(lr=1e-4, ckpt_path=pathlib.Path("/data/ckpts/last.ckpt")),
                "loops": collections.defaultdict(list, fit=[1, 2]), "log_dir": pathlib.PosixPath("/logs/run")},
               path)
    assert_same(load_checkpoint(path, config="tiny"), reference)
    info = inspect_checkpoint(path)
    assert info["metadata"]["global_step"] == "470000" and info["metadata"]["epoch"] == "3"
    assert info["metadata"]["log_dir"] == "<placeholder for pathlib.PosixPath('/', 'logs', 'run')>"
    assert info["metadata"]["hyper_parameters"] == "<placeholder for test_weights_audit.AttributeDict with 2 entries>"
    assert info["metadata"]["loops"] == "<placeholder for collections.defaultdict with 1 entry>"
    assert {"pathlib.PosixPath", "collections.defaultdict", "__builtin__.list"} <= set(info["placeholders"])


def test_flat_ckpt_shows_its_step(tmp_path, golden):
    path = tmp_path / "flat.ckpt"
    torch.save(dict(golden, global_step=1234), path)
    assert inspect_checkpoint(path)["metadata"]["global_step"] == "1234"


# ------------------------------------------------------------------------ families, named as such
def diffusers_folder(root, unet_kw, index_class, text_encoders=("text_encoder",)):
    """A tiny diffusers folder as diffusers writes it (its own classes and save_pretrained)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    base = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    UNet2DConditionModel(**base | unet_kw).save_pretrained(root / "unet")
    AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, down_block_types=("DownEncoderBlock2D",),
                  up_block_types=("UpDecoderBlock2D",)).save_pretrained(root / "vae")
    for name in text_encoders:
        CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                     num_attention_heads=4)).save_pretrained(root / name)
    (root / "model_index.json").write_text(json.dumps({"_class_name": index_class, "_diffusers_version": "0.21.0"}))
    return root


SD2_UNET = dict(cross_attention_dim=1024, attention_head_dim=(2, 4), use_linear_projection=True)
SDXL_UNET = dict(cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
                 transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=8 * 6 + 32)


@pytest.mark.parametrize("unet_kw, index, encoders, variant, family", [
    (SDXL_UNET, "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2"), "SDXL", "sdxl"),
    (dict(in_channels=9), "StableDiffusionInpaintPipeline", ("text_encoder",), "inpainting", None),
])
def test_other_diffusers_families_are_named(tmp_path, unet_kw, index, encoders, variant, family):
    pytest.importorskip("diffusers")
    folder = diffusers_folder(tmp_path / "model", unet_kw, index, encoders)
    with pytest.raises(CheckpointError, match=f"this is a {variant} checkpoint") as e:
        load_checkpoint(folder)
    assert "Stable Diffusion v1.x" in str(e.value) and "heads vary" not in str(e.value)
    info = inspect_checkpoint(folder)
    assert (info["variant"], info["family"], info["loadable"]) == (variant, family, False)
    assert info["parts"]["unet"]["tensors"] > 0 and set(encoders) <= set(info["parts"])
    text = format_inspection(info)
    assert f"variant:  {variant}" in text and "loadable: no: " in text


def test_a_sd2_folder_with_clip_l_text_encoder_is_described_and_refused(tmp_path):
    """An SD 2.x folder (cross_attention_dim 1024) whose text_encoder/ is a quick_gelu CLIP: not OpenCLIP."""
    pytest.importorskip("diffusers")
    folder = diffusers_folder(tmp_path / "model", SD2_UNET, "StableDiffusionPipeline")
    with pytest.raises(CheckpointError, match="OpenCLIP text towers use exact gelu"):
        load_checkpoint(folder)
    info = inspect_checkpoint(folder)
    assert (info["variant"], info["family"], info["loadable"]) == ("SD 2.x", "sd2", False)
    assert info["parts"]["unet"]["tensors"] > 0 and "text_encoder" in info["parts"]


def test_a_sd2_folder_without_model_index_is_named_by_its_unet(tmp_path):
    pytest.importorskip("diffusers")
    folder = diffusers_folder(tmp_path / "model", SD2_UNET, "StableDiffusionPipeline")
    (folder / "model_index.json").unlink()
    evidence = inspect_checkpoint(folder)["variant_evidence"]
    assert evidence == "unet/config.json has cross_attention_dim 1024 (OpenCLIP ViT-H)"


@pytest.mark.parametrize("index, components, variant", [
    ("KandinskyV22Pipeline", ("unet", "movq"), "Kandinsky"),
    (None, ("transformer", "vae"), "DiT"),
])
def test_folders_of_other_models_are_described(tmp_path, index, components, variant):
    folder = tmp_path / "model"
    for c in components:
        (folder / c).mkdir(parents=True)
        (folder / c / "config.json").write_text("{}")
    if index:
        (folder / "model_index.json").write_text(json.dumps({"_class_name": index}))
    with pytest.raises(CheckpointError, match=f"this is a {variant} checkpoint .*Stable Diffusion v1.x"):
        load_checkpoint(folder)
    info = inspect_checkpoint(folder)
    assert info["variant"] == variant and not info["loadable"] and info["tensors"] == 0


@pytest.mark.parametrize("index, texts, variant", [
    ("StableDiffusion3Pipeline", ("text_encoder", "text_encoder_2", "text_encoder_3"), "SD3"),
    ("FluxPipeline", ("text_encoder", "text_encoder_2"), "FLUX.1-schnell"),
])
def test_an_empty_mmdit_folder_is_described_and_refused(tmp_path, index, texts, variant):
    """SD3 and Flux folders load on the MM-DiT path (weights_tools/mmdit.py); one whose configs say nothing is
    refused naming the file, before any tensor is read, and p2p inspect says why."""
    folder = tmp_path / "model"
    for c in ("transformer", "vae", "scheduler", *texts):
        (folder / c).mkdir(parents=True)
        (folder / c / "config.json").write_text("{}")
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": index}))
    with pytest.raises(CheckpointError, match="vae/config.json: scaling_factor is None"):
        load_checkpoint(folder)
    info = inspect_checkpoint(folder)
    assert info["variant"] == variant and not info["loadable"] and "scaling_factor" in info["problem"]


def test_inspect_describes_a_folder_with_a_missing_component(tmp_path, golden):
    folder = tmp_path / "model"
    for c in ("unet", "text_encoder"):
        (folder / c).mkdir(parents=True)
        (folder / c / "config.json").write_text("{}")
    save_file({"conv_in.weight": torch.ones(2, 2)}, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    info = inspect_checkpoint(folder)
    assert not info["loadable"] and "without vae/ (missing component)" in info["problem"]
    assert info["parts"]["unet"]["tensors"] == 1


U = PREFIXES["unet"]


@pytest.mark.parametrize("extra, variant, family", [
    ({U + "joint_blocks.0.x_block.attn.qkv.weight": (12, 4)}, "SD3", None),
    ({"double_blocks.0.img_attn.qkv.weight": (12, 4)}, "Flux", None),
    ({"depth_model.model.pretrained.act_postprocess1.0.weight": (4,)}, "depth", None),
    ({"low_scale_model.betas": (10,)}, "upscaler", None),
    ({"embedder.model.visual.proj": (4, 4), "noise_augmentor.betas": (10,)}, "unCLIP", None),
])
def test_single_files_of_other_models_are_named(tmp_path, golden, extra, variant, family):
    state = dict(golden, **{k: torch.ones(s) for k, s in extra.items()})
    path = tmp_path / "x.safetensors"
    save_file(state, str(path))
    said = ("this is an SD3 / SD3.5 checkpoint .* without model.diffusion_model.context_embedder.weight"
            if variant == "SD3" else f"this is a {variant} checkpoint .*Stable Diffusion v1.x")
    with pytest.raises(CheckpointError, match=said):  # SD3 files load (docs/loading.md): this one lacks keys
        load_checkpoint(path)
    info = inspect_checkpoint(path)
    assert (info["variant"], info["family"], info["loadable"]) == (variant, family, False)


# ------------------------------------------------------------------------ old diffusers folders
@pytest.fixture(scope="module")
def v1_folder(tmp_path_factory, golden):
    """The golden checkpoint as a diffusers folder."""
    pytest.importorskip("diffusers")
    from test_weights_diffusers import build_diffusers_folder
    return build_diffusers_folder(tmp_path_factory.mktemp("diffusers") / "tiny-sd", golden)


@pytest.mark.parametrize("version, size", [("0.6.0", 64), ("0.8.0.dev0", 64), ("0.9.0", 32), ("0.21.4", 32)])
def test_sample_size_32_from_before_diffusers_0_9_means_512_px(tmp_path, v1_folder, version, size):
    import shutil
    folder = tmp_path / "old"
    shutil.copytree(v1_folder, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config |= {"sample_size": 32, "_diffusers_version": version}
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    sd = load_checkpoint(folder)
    assert sd.cfg.image_size == size and sd.cfg.default_height == size * sd.cfg.vae.downsample


# ------------------------------------------------------------------------ a swapped-in VAE
VAE = PREFIXES["vae"]


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A second tiny checkpoint (another seed): its VAE is the one swapped in."""
    from weights_tools.tiny import make_tiny
    return load_file(str(make_tiny(tmp_path_factory.mktemp("other") / "other.safetensors", seed=7, config="tiny")))


def vae_of(state, prefix=""):
    return {prefix + k[len(VAE):]: v for k, v in state.items() if k.startswith(VAE)}


def assert_vae_swapped(sd, golden, other):
    got = model_tensors(sd)
    assert all(torch.equal(got[k], other[k] if k.startswith(VAE) else golden[k]) for k in got)
    assert any(not torch.equal(golden[k], other[k]) for k in vae_of(golden, VAE))


@pytest.mark.parametrize("prefix", ["", VAE])
def test_vae_file_with_or_without_prefix(tmp_path, golden, other, prefix):
    save_file(vae_of(other, prefix), str(tmp_path / "vae-ft-mse.safetensors"))
    assert_vae_swapped(load_checkpoint(GOLDEN_CKPT, vae=tmp_path / "vae-ft-mse.safetensors"), golden, other)


def test_vae_ckpt_and_diffusers_vae_folder(tmp_path, golden, other, v1_folder):
    torch.save({"state_dict": vae_of(other)}, tmp_path / "vae.ckpt")
    assert_vae_swapped(load_checkpoint(GOLDEN_CKPT, vae=tmp_path / "vae.ckpt"), golden, other)
    save_file(other, str(tmp_path / "other.safetensors"))  # the golden's VAE, from the diffusers folder, into it
    assert_vae_swapped(load_checkpoint(tmp_path / "other.safetensors", config="tiny", vae=v1_folder / "vae"),
                       other, golden)
    single = tmp_path / "diffusers_vae.safetensors"  # diffusers' names in one file
    save_file(load_file(str(v1_folder / "vae" / "diffusion_pytorch_model.safetensors")), str(single))
    assert_vae_swapped(load_checkpoint(tmp_path / "other.safetensors", config="tiny", vae=single), other, golden)


def test_checkpoint_without_a_vae_loads_when_one_is_given(tmp_path, golden, other, v1_folder):
    import shutil
    save_file({k: v for k, v in golden.items() if not k.startswith(VAE)}, str(tmp_path / "no-vae.safetensors"))
    save_file(vae_of(other), str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing component\(s\) vae"):
        load_checkpoint(tmp_path / "no-vae.safetensors", config="tiny")
    assert_vae_swapped(load_checkpoint(tmp_path / "no-vae.safetensors", config="tiny",
                                       vae=tmp_path / "vae.safetensors"), golden, other)
    folder = tmp_path / "folder"
    shutil.copytree(v1_folder, folder, ignore=lambda d, names: ["vae"] if d == str(v1_folder) else [])
    with pytest.raises(CheckpointError, match=r"without vae/ \(missing component\)"):
        load_checkpoint(folder)
    sd = load_checkpoint(folder, vae=tmp_path / "vae.safetensors", config="tiny")
    assert_vae_swapped(sd, golden, other)


def test_vae_file_with_leftover_keys_and_non_vae_files(tmp_path, golden, other):
    save_file(vae_of(other) | {"loss.logvar": torch.zeros(1)}, str(tmp_path / "vae-train.safetensors"))
    with pytest.raises(CheckpointError, match=r"--non-strict.*1 unexpected: first_stage_model.loss.logvar"):
        load_checkpoint(GOLDEN_CKPT, vae=tmp_path / "vae-train.safetensors")
    with pytest.warns(UserWarning, match=r"ignored 1 key\(s\) .*: first_stage_model.loss.logvar"):
        sd = load_checkpoint(GOLDEN_CKPT, vae=tmp_path / "vae-train.safetensors", strict=False)
    assert_vae_swapped(sd, golden, other)
    save_file({"lora_unet_down.alpha": torch.ones(1)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match="no VAE keys .* not a VAE file"):
        load_checkpoint(GOLDEN_CKPT, vae=tmp_path / "lora.safetensors")


# ------------------------------------------------------------------------ prediction type
def with_metadata(tmp_path, golden, name="v.safetensors", prediction=None, **metadata):
    from models import load_config
    cfg = load_config("tiny").replace(prediction_type=prediction) if prediction else load_config("tiny")
    path = tmp_path / name
    save_file(golden, str(path), metadata={"ldm_config": cfg.to_json()} | metadata)
    return path


@pytest.mark.parametrize("metadata, source", [
    ({"modelspec.prediction_type": "v"}, "the file's modelspec.prediction_type metadata"),
    ({"ss_v_parameterization": "True"}, "the file's ss_v_parameterization metadata"),
    ({"_prediction": "v"}, "the file's ldm_config metadata (parameterization v)"),
])
def test_v_prediction_said_by_the_file(tmp_path, golden, metadata, source):
    prediction = metadata.pop("_prediction", None)
    path = with_metadata(tmp_path, golden, prediction=prediction, **metadata)
    sd = load_checkpoint(path)
    assert sd.cfg.prediction_type == "v" and not sd.alphas_cumprod.is_meta  # eps() converts with it
    info = inspect_checkpoint(path)
    assert (info["prediction_type"], info["prediction_source"]) == ("v", source)
    assert f"predicts: v ({source})" in format_inspection(info)
    assert load_checkpoint(path, prediction_type="epsilon").cfg.prediction_type == "epsilon"  # the argument wins


def test_v_prediction_from_a_yaml_and_from_a_folder(tmp_path, golden, v1_folder):
    import shutil
    import yaml
    from models.config import CONFIG_DIR
    cfg = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    cfg["model"]["params"]["parameterization"] = "v"
    (tmp_path / "v-inference.yaml").write_text(yaml.safe_dump(cfg))
    save_file(golden, str(tmp_path / "plain.safetensors"))
    sd = load_checkpoint(tmp_path / "plain.safetensors", config=tmp_path / "v-inference.yaml")
    assert sd.cfg.prediction_type == "v"
    folder = tmp_path / "folder"
    shutil.copytree(v1_folder, folder)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    assert load_checkpoint(folder).cfg.prediction_type == "v"
    assert inspect_checkpoint(folder)["prediction_source"] == "the folder's scheduler_config.json"
    from weights_tools import convert_checkpoint
    out = convert_checkpoint(folder, tmp_path / "v.safetensors")  # the prediction type travels in ldm_config
    assert load_checkpoint(out).cfg.prediction_type == "v"


def test_prediction_type_conflicts_and_unknown_names(tmp_path, golden):
    path = with_metadata(tmp_path, golden, prediction="v", **{"modelspec.prediction_type": "epsilon"})
    with pytest.raises(CheckpointError, match=r"modelspec.prediction_type metadata says epsilon but .*says v; "
                                              r"pass prediction_type="):
        load_checkpoint(path)
    assert load_checkpoint(path, prediction_type="v").cfg.prediction_type == "v"
    odd = with_metadata(tmp_path, golden, name="flow.safetensors", **{"modelspec.prediction_type": "flow"})
    with pytest.raises(CheckpointError, match="prediction type 'flow' is not supported"):
        load_checkpoint(odd)
    with pytest.raises(CheckpointError, match="prediction type 'x0' is not supported"):
        load_checkpoint(GOLDEN_CKPT, prediction_type="x0")
    assert load_checkpoint(GOLDEN_CKPT).cfg.prediction_type == "epsilon"


# ------------------------------------------------------------------------ the command line
FAST = ["--steps", "2", "--height", "32", "--width", "32"]


def leftovers(tmp_path, golden):
    """A checkpoint with the leftovers real files carry: textual inversion, VAE loss, LoRA."""
    extra = {"embedding_manager.embedder.transformer.text_model.embeddings.token_embedding.weight": torch.ones(3, 4),
             VAE + "loss.logvar": torch.zeros(1), "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.ones(1)}
    path = tmp_path / "leftovers.safetensors"
    with safe_open(str(GOLDEN_CKPT), "pt") as f:
        metadata = f.metadata()
    save_file(dict(golden, **extra), str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "a cat"],
    ["edit", "--prompt", "a cat", "--edit", "a dog"],
    ["invert", "--prompt", "a cat", "--method", "ddim"],
])
def test_non_strict_on_every_loading_command(tmp_path, golden, capsys, command):
    from p2p.cli import main
    ckpt = leftovers(tmp_path, golden)
    out = tmp_path / ("out.inv" if command[0] == "invert" else "out.png")
    if command[0] == "invert":
        from PIL import Image
        Image.new("RGB", (32, 32), "red").save(tmp_path / "photo.png")
        command = command + ["--image", str(tmp_path / "photo.png")]
    args = [*command, "--ckpt", str(ckpt), *FAST, "-o", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "3 unexpected" in err and "--non-strict" in err and not out.exists()
    assert main([*args, "--non-strict"]) == 0
    err = capsys.readouterr().err
    assert "ignored 3 key(s)" in err and "embedding_manager." in err and "lora_unet_" in err and VAE + "loss" in err
    assert json.loads(out.with_name(out.name + ".json").read_text())["non_strict"] is True


def test_vae_and_prediction_type_flags(tmp_path, golden, other, monkeypatch):
    import p2p
    from p2p.cli import main
    with safe_open(str(GOLDEN_CKPT), "pt") as f:
        metadata = f.metadata()
    save_file({k: v for k, v in golden.items() if not k.startswith(VAE)}, str(tmp_path / "no-vae.safetensors"),
              metadata=metadata)
    save_file(vae_of(other), str(tmp_path / "vae.safetensors"))
    models, real = [], p2p.generate
    monkeypatch.setattr(p2p, "generate", lambda sd, *a, **k: models.append(sd) or real(sd, *a, **k))
    out = tmp_path / "gen.png"
    assert main(["generate", "--ckpt", str(tmp_path / "no-vae.safetensors"), "--prompt", "a cat", *FAST,
                 "--vae", str(tmp_path / "vae.safetensors"), "--prediction-type", "v", "-o", str(out)]) == 0
    (sd,) = models
    assert sd.cfg.prediction_type == "v"
    assert torch.equal(sd.vae.decoder.conv_out.weight, other[VAE + "decoder.conv_out.weight"])
    record = json.loads(out.with_name(out.name + ".json").read_text())
    assert record["vae"] == str(tmp_path / "vae.safetensors") and record["prediction_type"] == "v"
    assert len(record["vae_sha256"]) == 64


def test_inspect_command_on_a_folder(tmp_path, capsys):
    from p2p.cli import main
    folder = tmp_path / "sdxl"
    for c in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (folder / c).mkdir(parents=True)
        (folder / c / "config.json").write_text("{}")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "variant:  SDXL (model_index.json names StableDiffusionXLPipeline); family 'sdxl'" in out
    assert "loadable: no: " in out and "lacks 'vocab_size'" in out


def test_convert_bakes_in_a_vae(tmp_path, golden, other):
    from weights_tools.convert import main as convert_main
    save_file(vae_of(other, VAE), str(tmp_path / "vae.safetensors"))
    out = tmp_path / "baked.safetensors"
    assert convert_main([str(GOLDEN_CKPT), str(out), "--vae", str(tmp_path / "vae.safetensors")]) == 0
    baked = load_file(str(out))
    assert all(torch.equal(baked[k], other[k] if k.startswith(VAE) else golden[k]) for k in golden)
    assert convert_main([str(GOLDEN_CKPT), str(tmp_path / "vae.safetensors"), "--vae",
                         str(tmp_path / "vae.safetensors")]) == 2  # would overwrite its own source
