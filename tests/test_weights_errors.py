"""Every refusal of weights_tools comes as one clear CheckpointError naming what was found."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from models import PREFIXES, load_config
from weights_tools import CheckpointError, CheckpointNotFound, convert_checkpoint, inspect_checkpoint, load_checkpoint

from conftest import GOLDEN_CKPT

U = PREFIXES["unet"]


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN_CKPT))


def save(tmp_path, state, name="x.safetensors", metadata=None):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def refused(path, pattern, **kw):
    with pytest.raises(CheckpointError, match=pattern) as e:
        load_checkpoint(path, **kw)
    return str(e.value)


def test_sd2_wide_cross_attention(tmp_path, golden):
    """Read as SD 2.x (a 1024-wide context), checked against SD 2.x's own config, which it does not fit."""
    state = dict(golden)
    key = U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    state[key] = torch.randn(64, 1024)
    msg = refused(save(tmp_path, state), r"do not fit the model built from SD 2\.x's own config")
    assert "mismatched" in msg and "missing" in msg
    assert inspect_checkpoint(tmp_path / "x.safetensors")["variant"] == "SD 2.x"


def test_sd2_openclip_keys(tmp_path, golden):
    state = {k: v for k, v in golden.items() if not k.startswith("cond_stage_model.")}
    state["cond_stage_model.model.token_embedding.weight"] = torch.randn(10, 4)
    msg = refused(save(tmp_path, state), r"do not fit the model built from SD 2\.x's own config")
    assert "cond_stage_model.model." in msg
    assert inspect_checkpoint(tmp_path / "x.safetensors")["variant_evidence"].startswith("found OpenCLIP")


def test_sd2_file_with_sd1_config_is_refused(tmp_path, golden):
    state = {k: v for k, v in golden.items() if not k.startswith("cond_stage_model.")}
    state["cond_stage_model.model.token_embedding.weight"] = torch.randn(10, 4)
    msg = refused(save(tmp_path, state), r"SD 2\.x checkpoint .* describes the 'sd1' family", config="tiny")
    assert "configs/sd-v2-base.yaml or sd-v2-v.yaml" in msg


@pytest.mark.parametrize("key", ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                                 U + "label_emb.0.0.weight"])
def test_sdxl(tmp_path, golden, key):
    # SDXL single files load: SD v1 tensors with an SDXL key are read as SDXL base and refused for their shapes
    state = dict(golden, **{key: torch.ones(4)})
    assert "configs/sdxl-base.yaml" in refused(save(tmp_path, state), r"an SDXL checkpoint by its keys")


@pytest.mark.parametrize("channels,variant", [(9, "inpainting"), (8, "pix2pix")])
def test_inpainting_and_pix2pix(tmp_path, golden, channels, variant):
    state = dict(golden)
    state[U + "input_blocks.0.0.weight"] = torch.randn(64, channels, 3, 3)
    msg = refused(save(tmp_path, state), rf"this is a {variant} checkpoint")
    assert f"{channels} input channels" in msg
    assert inspect_checkpoint(tmp_path / "x.safetensors")["variant"] == variant


def test_truncated_safetensors(tmp_path):
    data = GOLDEN_CKPT.read_bytes()
    for cut in (len(data) // 2, 100):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        refused(path, r"truncated safetensors file")
        with pytest.raises(CheckpointError, match="truncated"):
            inspect_checkpoint(path)


def test_truncated_ckpt(tmp_path, golden):
    torch.save({"state_dict": golden}, tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) * 2 // 3])
    refused(tmp_path / "cut.ckpt", r"truncated or corrupt")


@pytest.mark.parametrize("content,what", [
    (b"model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n", "text file"),
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "PNG image"),
    (b"\xff\xd8\xff\xe0" + bytes(200), "JPEG image"),
    (bytes([7, 200, 13, 255, 0, 1, 99, 180]) * 64, "unrecognised binary data"),
])
def test_not_a_checkpoint(tmp_path, content, what):
    path = tmp_path / "model.safetensors"  # the extension must not fool the sniffing
    path.write_bytes(content)
    msg = refused(path, r"not a checkpoint")
    assert what in msg and "supported:" in msg


def test_bare_pickle(tmp_path):
    import pickle
    (tmp_path / "old.ckpt").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    refused(tmp_path / "old.ckpt", r"bare pickle")


def test_empty_file(tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    refused(tmp_path / "empty.ckpt", r"empty file \(0 bytes\)")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFound, match="no such file or folder"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):  # also catchable as what it is
        inspect_checkpoint(tmp_path / "nope.safetensors")


def test_missing_component(tmp_path, golden):
    state = {k: v for k, v in golden.items() if not k.startswith(PREFIXES["vae"])}
    msg = refused(save(tmp_path, state), r"missing component\(s\) vae \(`first_stage_model\.\*`\)")
    assert "found unet, text_encoder" in msg


def test_missing_single_key(tmp_path, golden):
    key = U + "out.2.bias"
    state = {k: v for k, v in golden.items() if k != key}
    assert key in refused(save(tmp_path, state), r"1 missing", config="tiny")


def test_unknown_keys_strict_and_not(tmp_path, golden):
    state = dict(golden, **{"lora_te_text_model_encoder.alpha": torch.ones(1), U + "extra.weight": torch.ones(2)})
    path = save(tmp_path, state)
    msg = refused(path, r"2 unexpected", config="tiny")
    assert "lora_te_text_model_encoder.alpha" in msg and U + "extra.weight" in msg and "strict=False" in msg
    with pytest.warns(UserWarning, match=r"ignored 2 key\(s\) .*: lora_te_text_model_encoder.alpha, " + U + "extra"):
        sd = load_checkpoint(path, config="tiny", strict=False)
    assert torch.equal(sd.unet.out[2].bias, golden[U + "out.2.bias"])
    info = inspect_checkpoint(path)
    assert info["unknown_keys"] == ["lora_te_text_model_encoder.alpha"] and not info["loadable"]


def test_shape_mismatch_without_config(tmp_path, golden):
    """Without ldm_config the architecture defaults to SD v1, checked key by key; never guessed."""
    path = save(tmp_path, golden)  # no metadata
    msg = refused(path, r"do not fit the model built from SD v1's own config")
    assert "pass config=" in msg and "mismatched" in msg and "missing" in msg
    assert "(and " in msg  # a few listed, the rest counted
    sd = load_checkpoint(path, config=load_config("tiny"))
    assert torch.equal(sd.unet.out[2].weight, golden[U + "out.2.weight"])
    assert inspect_checkpoint(path)["config_source"] == "SD v1 default (no config in the file)"


def test_bad_config_argument(tmp_path):
    (tmp_path / "c.yaml").write_text("just: text\n")
    with pytest.raises(CheckpointError, match="not a usable CompVis v1-inference.yaml"):
        load_checkpoint(GOLDEN_CKPT, config=tmp_path / "c.yaml")


def test_convert_failure_leaves_nothing(tmp_path, golden):
    state = dict(golden)
    state[U + "input_blocks.0.0.weight"] = torch.randn(64, 9, 3, 3)
    with pytest.raises(CheckpointError, match="inpainting"):
        convert_checkpoint(save(tmp_path, state), tmp_path / "out" / "o.safetensors")
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True
