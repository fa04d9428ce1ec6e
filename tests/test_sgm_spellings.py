"""Spellings of SDXL single files that other savers write: SGM's `denoiser.sigmas` schedule buffer is ignored
as the CompVis schedule buffers are (strict loading, no --non-strict), and bigG's `text_projection` saved as a
Linear's weight (`conditioner.embedders.1.model.text_projection.weight`, the matrix transposed) is read, the
same model as the usual spelling."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from weights_tools import inspect_checkpoint, load_checkpoint

PROJECTION = "conditioner.embedders.1.model.text_projection"


@pytest.fixture(scope="module")
def tiny_file(tiny_sdxl_file):
    return tiny_sdxl_file


def resaved(tiny_file, path, change) -> str:
    state = load_file(tiny_file)
    with safe_open(str(tiny_file), "pt") as f:
        meta = f.metadata()
    change(state)
    save_file(state, str(path), metadata=meta)
    return str(path)


def same_model(a, b) -> bool:
    return all(torch.equal(x, y) for part in ("unet", "vae", "text_encoder")
               for x, y in zip(getattr(a, part).state_dict().values(), getattr(b, part).state_dict().values()))


def test_sgm_sigmas_are_ignored_as_a_schedule_buffer(tiny_file, tmp_path):
    sigmas = torch.linspace(0.03, 14.6, 1000)
    path = resaved(tiny_file, tmp_path / "sgm.safetensors", lambda s: s.update({"denoiser.sigmas": sigmas}))
    assert same_model(load_checkpoint(path), load_checkpoint(tiny_file))
    info = inspect_checkpoint(path)
    assert info["loadable"] and info["parts"]["schedule"]["tensors"] == 1 and info["unknown_count"] == 0


def test_text_projection_as_a_linear_weight_is_read_transposed(tiny_file, tmp_path):
    def as_linear(state):
        state[PROJECTION + ".weight"] = state.pop(PROJECTION).t().contiguous()

    path = resaved(tiny_file, tmp_path / "linear.safetensors", as_linear)
    a, b = load_checkpoint(path), load_checkpoint(tiny_file)
    assert not torch.equal(load_file(tiny_file)[PROJECTION], load_file(path)[PROJECTION + ".weight"])
    assert same_model(a, b)
    assert inspect_checkpoint(path)["loadable"]
