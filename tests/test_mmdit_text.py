"""Loading the MM-DiT text encoders from diffusers folders (weights_tools.mmdit_text): a sharded T5 (as the
real FLUX / SD3 folders ship it) and a file holding both names of T5's embedding load the same weights;
`t5_length` sets T5's positions; folders and files that do not fit are refused by name."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from weights_tools import BadConfig, CheckpointError
from weights_tools.mmdit_text import load_flux_text, load_sd3_text

FLUX = Path(__file__).parent / "fixtures" / "mmdit" / "tiny-flux"


def flux_copy(tmp_path: Path) -> Path:
    for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(FLUX / part, tmp_path / part)
    return tmp_path


@pytest.fixture(scope="module")
def plain():
    return load_flux_text(FLUX)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_sharded_t5_loads_the_same_weights(tmp_path, plain):
    folder = flux_copy(tmp_path)
    (folder / "text_encoder_2" / "model.safetensors").unlink()
    transformers.T5EncoderModel.from_pretrained(FLUX / "text_encoder_2").save_pretrained(
        folder / "text_encoder_2", max_shard_size="100KB")
    assert len(list((folder / "text_encoder_2").glob("model-*-of-*.safetensors"))) > 1
    assert same_weights(load_flux_text(folder), plain)


def test_both_names_of_the_t5_embedding_are_one_table(tmp_path, plain):
    folder = flux_copy(tmp_path)
    path = folder / "text_encoder_2" / "model.safetensors"
    tensors = load_file(path)
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    save_file(tensors, path)  # only the alias: read as `shared`
    model = load_flux_text(folder)
    assert model.text_encoder_2.shared is model.text_encoder_2.encoder.embed_tokens
    assert same_weights(model, plain)


def test_t5_length_sets_the_sequence(plain):
    assert plain.t5_length == 512
    plain.t5_length = 77
    try:
        with torch.no_grad():
            cond = plain.encode(["a photo of a fox, inside is a smaller fox.", ""])
    finally:
        plain.t5_length = 512
    assert cond.context.shape == (2, 77, 96) and cond.pooled.shape == (2, 32)
    assert sorted(plain.tokenizers) == ["clip", "t5"]


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="text_encoder_3 missing"):
        load_sd3_text(flux_copy(tmp_path / "a"))
    folder = flux_copy(tmp_path / "b")
    config = json.loads((folder / "text_encoder_2" / "config.json").read_text())
    (folder / "text_encoder_2" / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "relu"}))
    with pytest.raises(CheckpointError, match=r"missing \['encoder.block.0.layer.1.DenseReluDense.wi.weight'.*"
                                              r"unexpected \['encoder.block.0.layer.1.DenseReluDense.wi_0.weight"):
        load_flux_text(folder)  # the original T5's ungated feed-forward, but the file holds T5 v1.1's gate
    (folder / "text_encoder_2" / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "gated-tanh"}))
    with pytest.raises(BadConfig, match="dense_act_fn 'tanh' is not one this encoder implements"):
        load_flux_text(folder)
    (folder / "text_encoder_2" / "config.json").write_text(json.dumps({**config, "d_ff": 64}))
    with pytest.raises(CheckpointError, match=r"misshapen \['encoder.block.0.layer.1.DenseReluDense.wi_0.weight"):
        load_flux_text(folder)
