"""SD3 / SD3.5 single files and BFL's Flux files (weights_tools/mmdit_files.py): the official key layouts mapped as
diffusers' own converters map them (full size on the meta device, values at tiny size), tiny files in the released
layouts (written from the tiny folders' own weights) generating exactly as the folders, `p2p inspect` naming
each file, and the refusals (a part missing, a wrong or truncated file) before any tensor is read."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from mmdit_single_files import (TINY_FLUX, TINY_SD3, ldm_vae, sd3_official, tokenizer_folder, weights, write_flux,
                                write_sd3)
from models.flux import FluxTransformer
from models.mmdit import SD3Config
from models.mmdit_text import TextCond
from p2p.cli import main
from p2p.joint_pipeline import joint_generate
from test_flux_keys import bfl_shapes
from test_mmdit_full_size import CONFIGS, ours, single_file_layout
from test_mmdit_loading import sd35_folder
from weights_tools import CheckpointError, inspect_checkpoint, load_checkpoint
from weights_tools.mmdit import load_mmdit
from weights_tools.flux_keys import bfl_config
from weights_tools.mmdit_files import SD3_TEXT, bfl_plan, load_mmdit_file
from weights_tools.mmdit_parts import mapped, prefixed, tower
from weights_tools.mmdit_text import text_names
from weights_tools.sd3_keys import sd3_file_config, sd3_model_name, sd3_plan
from weights_tools.sources import Source

SMALL_SD35 = dict(num_layers=3, num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16,
                  joint_attention_dim=24, pooled_projection_dim=12, pos_embed_max_size=8, qk_norm="rms_norm",
                  dual_attention_layers=(0, 1))


def random_layout(cfg: SD3Config) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in single_file_layout(cfg).items()}


@pytest.mark.parametrize("name", CONFIGS)
def test_full_size_plan_is_diffusers_converter(name):
    """Names and shapes of every released layout, on the meta device, and the config read from the shapes."""
    cfg = SD3Config(**CONFIGS[name])
    layout = single_file_layout(cfg)
    plan = sd3_plan(layout)
    theirs = convert_sd3_transformer_checkpoint_to_diffusers({k: torch.empty(s, device="meta") for k, s in layout.items()})
    shapes = {k: (p.stop - p.start, *layout[p.key][1:]) if p.start is not None else layout[p.key] for k, p in plan.items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.items()} == ours(CONFIGS[name])
    assert sd3_file_config(layout) == SD3Config(**CONFIGS[name])
    assert sd3_model_name(sd3_file_config(layout))[0].startswith({"sd3-medium": "SD3-medium", "sd3.5-medium":
                                                                  "SD3.5-medium", "sd3.5-large": "SD3.5-large or"}[name])


def test_values_are_diffusers_converter():
    """Each tensor, split and swapped, holds what diffusers' converter puts there (SD3.5: qk-norm, attn2)."""
    state = random_layout(SD3Config(**SMALL_SD35))
    src = open_dict(state)
    ours_ = mapped(src, sd3_plan(src.shapes), "file")
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(dict(state))
    assert set(ours_.entries) == set(theirs)
    for key, want in theirs.items():
        assert torch.equal(ours_.fetch(key), want), key


def open_dict(state):
    return Source("file", "dict", {k: (tuple(v.shape), v.dtype) for k, v in state.items()}, state.__getitem__)


def test_full_size_flux_plan_fits_the_model():
    shapes = bfl_shapes()
    plan = bfl_plan(shapes)
    with torch.device("meta"):
        model = FluxTransformer(bfl_config(shapes))
    got = {k: (p.stop - p.start, *shapes[p.key][1:]) if p.start is not None else shapes[p.key] for k, p in plan.items()}
    assert got == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    return {"sd3": write_sd3(tmp / "sd3_medium_incl_clips.safetensors"),
            "sd3_bare": write_sd3(tmp / "sd3_medium.safetensors", text=False),
            "tokenizers_sd3": tokenizer_folder(TINY_SD3, tmp / "sd3-tokenizers"),
            "tokenizers_flux": tokenizer_folder(TINY_FLUX, tmp / "flux-tokenizers"),
            **{f"flux_{k}": v for k, v in write_flux(TINY_FLUX, tmp).items()}, "tmp": tmp}


def same_output(a, b, prompts=("a cat", "a dog on a hill")):
    with torch.no_grad():
        x, y = joint_generate(a, list(prompts), seed=3, num_steps=2, height=64, width=64, progress=False), \
            joint_generate(b, list(prompts), seed=3, num_steps=2, height=64, width=64, progress=False)
    assert torch.equal(x.latents, y.latents) and (x.images == y.images).all()


def test_sd3_file_with_text_generates_as_the_folder(files):
    """Every weight from the single file: the base folder gives only tokenizers and config.json files."""
    folder = load_mmdit(TINY_SD3)
    single = load_checkpoint(files["sd3"], base=files["tokenizers_sd3"])
    assert type(single) is type(folder) and single.family == "SD3"
    same_output(single, folder)


def test_sd3_file_without_text(files):
    with pytest.raises(CheckpointError, match="holds no clip_l, clip_g, t5 text encoder.*clip_l.safetensors.*--base"):
        load_mmdit_file(files["sd3_bare"], base=files["tokenizers_sd3"])
    folder = load_mmdit(TINY_SD3)
    same_output(load_mmdit_file(files["sd3_bare"], base=TINY_SD3), folder)  # the text encoders from the folder
    parts = files["tmp"] / "sd3-parts"
    parts.mkdir(exist_ok=True)
    given = {}
    for kind, part in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5", "text_encoder_3")):
        given[kind] = parts / f"{kind}.safetensors"
        save_file(weights(TINY_SD3 / part), str(given[kind]))
    same_output(load_checkpoint(files["sd3_bare"], base=files["tokenizers_sd3"], **given), folder)
    bare = load_mmdit_file(files["sd3_bare"], text=False)  # the released schedule and factors: SD3's
    assert (bare.scaling_factor, bare.shift_factor, bare.flow.shift) == (1.5305, 0.0609, 3.0) and bare.text is None


def test_sd3_clip_l_without_projection_gets_the_identity(files, tmp_path):
    clip_l = {k: v for k, v in weights(TINY_SD3 / "text_encoder").items() if k != "text_projection.weight"}
    save_file(clip_l, str(tmp_path / "clip_l.safetensors"))
    m = load_mmdit_file(files["sd3"], clip_l=tmp_path / "clip_l.safetensors", base=files["tokenizers_sd3"])
    clip = m.text.text_encoder
    assert torch.equal(clip.text_projection.weight, torch.eye(32))
    assert torch.equal(clip.text_model.final_layer_norm.weight, clip_l["text_model.final_layer_norm.weight"])


def test_sd35_file_reads_its_config_from_shapes(tmp_path):
    """A tiny SD3.5-like transformer (diffusers' SD3Transformer2DModel with qk RMS-norm, dual attention in blocks 0
    and 1) written in the official layout without config metadata: the config comes from the shapes, velocities
    equal diffusers', and with the folder's text encoders it generates as the folder."""
    folder = sd35_folder(tmp_path)
    theirs = SD3Transformer2DModel.from_pretrained(folder / "transformer").eval()
    state = sd3_official(theirs.state_dict()) | {"first_stage_model." + k: v for k, v in ldm_vae(folder / "vae").items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "sd3.5.safetensors"))
    m = load_mmdit_file(tmp_path / "sd3.5.safetensors", text=False)
    assert m.family == "SD3.5" and m.transformer.cfg.dual_attention_layers == (0, 1)
    assert m.transformer.cfg.num_attention_heads == 4 and m.transformer.cfg.attention_head_dim == 8
    g = torch.Generator().manual_seed(2)
    x, ctx, pooled = torch.randn(2, 16, 12, 16, generator=g), torch.randn(2, 9, 96, generator=g), torch.randn(2, 80, generator=g)
    t = torch.tensor([1000.0, 250.0])
    with torch.no_grad():
        assert torch.allclose(m.velocity(x, t, TextCond(ctx, pooled)), theirs(x, ctx, pooled, t).sample, atol=1e-5)
    same_output(load_mmdit_file(tmp_path / "sd3.5.safetensors", base=folder), load_mmdit(folder))
    info = inspect_checkpoint(tmp_path / "sd3.5.safetensors")
    assert info["variant"] == "SD3.5" and "qk RMS-norm" in info["variant_evidence"] and info["loadable"]
    assert any("clip_l.safetensors (--clip-l)" in n for n in info["needs"])


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_flux_files_generate_as_the_folder(files, prefix, tmp_path):
    transformer = files["flux_transformer"]
    if prefix:
        transformer = tmp_path / "flux1-dev.safetensors"
        save_file({prefix + k: v for k, v in load_file(files["flux_transformer"]).items()}, str(transformer))
    single = load_checkpoint(transformer, vae=files["flux_vae"], clip_l=files["flux_clip_l"], t5=files["flux_t5"],
                             base=files["tokenizers_flux"])
    assert single.variant == "FLUX.1-dev" and single.flow.use_dynamic_shifting
    same_output(single, load_mmdit(TINY_FLUX))


def test_flux_file_with_a_folder_for_the_rest(files):
    same_output(load_mmdit_file(files["flux_transformer"], base=TINY_FLUX), load_mmdit(TINY_FLUX))
    with pytest.raises(CheckpointError, match="holds no VAE.*--vae ae.safetensors"):
        load_mmdit_file(files["flux_transformer"], base=files["tokenizers_flux"], text=False)
    with pytest.raises(CheckpointError, match="rotary axes.*give --base"):  # tiny heads: not FLUX.1's 128
        load_mmdit_file(files["flux_transformer"], vae=files["flux_vae"], text=False)
    configs_only = shutil.copytree(files["tokenizers_flux"], files["tmp"] / "no-tokenizers", dirs_exist_ok=True)
    shutil.rmtree(configs_only / "tokenizer_2")
    with pytest.raises(CheckpointError, match="no tokenizers.*tokenizer/, tokenizer_2/"):
        load_mmdit_file(files["flux_transformer"], vae=files["flux_vae"], clip_l=files["flux_clip_l"],
                        t5=files["flux_t5"], base=configs_only)


def no_reads(monkeypatch):
    """Any tensor read fails the test: refusals must come from the headers."""
    def fail(*a, **k):
        raise AssertionError("a tensor was read")
    monkeypatch.setattr("weights_tools.sources.safe_open", fail)


def test_wrong_and_truncated_files_are_refused_unread(files, tmp_path, monkeypatch):
    cut = tmp_path / "flux1-dev.safetensors"
    data = files["flux_transformer"].read_bytes()
    cut.write_bytes(data[:len(data) - 100])
    no_reads(monkeypatch)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(cut, vae=files["flux_vae"], base=files["tokenizers_flux"])
    with pytest.raises(CheckpointError, match="the t5 text encoder: .*clip_l.safetensors: does not fit.*missing "
                                              r"\['shared.weight'"):  # CLIP-L given as T5
        load_mmdit_file(files["flux_transformer"], vae=files["flux_vae"], clip_l=files["flux_clip_l"],
                        t5=files["flux_clip_l"], base=files["tokenizers_flux"])
    with pytest.raises(CheckpointError, match="not a whole VAE in the LDM names"):
        load_mmdit_file(files["flux_transformer"], vae=files["flux_t5"], base=files["tokenizers_flux"], text=False)
    with pytest.raises(CheckpointError, match="Flux reads no clip_g text encoder.*leave --clip-g out"):
        load_mmdit_file(files["flux_transformer"], clip_g=files["flux_clip_l"], base=files["tokenizers_flux"])
    with pytest.raises(CheckpointError, match="--base must be a diffusers Flux folder"):
        load_mmdit_file(files["flux_transformer"], base=TINY_SD3)
    with pytest.raises(CheckpointError, match="prediction_type cannot be given for an SD3 / Flux single file"):
        load_checkpoint(files["sd3"], prediction_type="v")


def test_inspect_names_each_file(files):
    sd3 = inspect_checkpoint(files["sd3"])
    assert sd3["holds"] == ["MM-DiT transformer", "VAE", "CLIP-L", "CLIP-G", "T5 XXL"]
    assert set(sd3["parts"]) == {"transformer", "vae", "clip_l", "clip_g", "t5"} and sd3["unknown_count"] == 0
    bare = inspect_checkpoint(files["sd3_bare"])
    assert bare["loadable"] and bare["holds"] == ["MM-DiT transformer", "VAE"]
    assert any("t5xxl_fp16.safetensors (--t5)" in n for n in bare["needs"])
    flux = inspect_checkpoint(files["flux_transformer"])
    assert flux["model"] == "FLUX.1-dev" and "guidance_in" in flux["variant_evidence"]
    assert any("--vae ae.safetensors" in n for n in flux["needs"])
    for key, flag in (("flux_vae", "--vae"), ("flux_clip_l", "--clip-l"), ("flux_t5", "--t5")):
        info = inspect_checkpoint(files[key])
        assert not info["loadable"] and flag in info["problem"], info["problem"]


def test_cli_generates_from_the_flux_files(files, tmp_path, capsys):
    """`p2p generate --ckpt flux1-dev.safetensors --vae ae.safetensors --clip-l ... --t5 ... --base FOLDER`; the
    sidecar names each part file by its SHA-256."""
    out = tmp_path / "fox.png"
    assert main(["generate", "--ckpt", str(files["flux_transformer"]), "--vae", str(files["flux_vae"]), "--clip-l",
                 str(files["flux_clip_l"]), "--t5", str(files["flux_t5"]), "--base", str(files["tokenizers_flux"]),
                 "--prompt", "a fox", "--steps", "2", "--height", "64", "--width", "64", "-o", str(out)]) == 0
    record = json.loads(out.with_name(out.name + ".json").read_text())
    assert record["clip_l"] == str(files["flux_clip_l"]) and len(record["t5_sha256"]) == 64
    assert main(["inspect", str(files["flux_transformer"])]) == 0
    assert "variant:  FLUX.1-dev" in capsys.readouterr().out


RELEASED_TEXT = {"clip_l": (CLIPTextModelWithProjection, CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                                        num_hidden_layers=12, num_attention_heads=12,
                                                                        projection_dim=768, hidden_act="quick_gelu")),
                 "clip_g": (CLIPTextModelWithProjection, CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                                        num_hidden_layers=32, num_attention_heads=20,
                                                                        projection_dim=1280, hidden_act="gelu")),
                 "t5": (T5EncoderModel, T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
                                                 feed_forward_proj="gated-gelu", vocab_size=32128))}


@pytest.mark.parametrize("kind", RELEASED_TEXT)
def test_released_text_towers_from_full_size_shapes(kind):
    """SD3's CLIP-L, CLIP-G and T5 XXL in a single file (`text_encoders.*.transformer.*`, transformers' names, on
    the meta device): the towers read from their shapes take every key, and have the released heads and widths."""
    cls, config = RELEASED_TEXT[kind]
    with torch.device("meta"):
        theirs = cls(config)
    prefix = SD3_TEXT[kind]
    state = {prefix + k: v for k, v in theirs.state_dict().items()}
    file = prefixed(open_dict(state), prefix)
    module = tower(kind, file, None, projection=True)
    assert set(text_names(module, file).values()) <= set(file.entries)
    if kind == "t5":
        assert module.cfg.num_heads == 64 and module.cfg.d_kv == 64
    else:
        cfg = module.text_model.cfg
        assert (cfg.heads, cfg.hidden_act) == (config.num_attention_heads, config.hidden_act)
