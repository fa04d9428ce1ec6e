"""BFL's single-file Flux layout -> diffusers' names, held to diffusers' own converter on the full-size FLUX.1
key layout: 2-D weights on the meta device (names and shapes), every 1-D tensor with distinct values (so each
bias and norm scale must land, split and swapped, exactly where diffusers puts it)."""
import pytest
import torch
from safetensors.torch import save_file

from models.flux import FluxTransformer
from weights_tools import CheckpointError
from weights_tools.flux_keys import SWAPPED, bfl_config, bfl_to_diffusers, is_bfl_flux, load_bfl_transformer, targets

W, HEAD, T5, POOLED, IN = 3072, 128, 4096, 768, 64


def linear(name: str, rows: int, cols: int) -> dict:
    return {f"{name}.weight": (rows, cols), f"{name}.bias": (rows,)}


def bfl_shapes(double: int = 19, single: int = 38, guidance: bool = True, heads: int = 24) -> dict:
    """FLUX.1-dev's transformer keys and shapes as BFL ships them (schnell: no guidance_in); fewer heads of
    the same width make a small file of the same layout."""
    W, MLP = heads * HEAD, 4 * heads * HEAD  # noqa: N806
    s = {**linear("img_in", W, IN), **linear("txt_in", W, T5), **linear("time_in.in_layer", W, 256),
         **linear("time_in.out_layer", W, W), **linear("vector_in.in_layer", W, POOLED),
         **linear("vector_in.out_layer", W, W), **linear("final_layer.linear", IN, W),
         **linear("final_layer.adaLN_modulation.1", 2 * W, W)}
    if guidance:
        s.update({**linear("guidance_in.in_layer", W, 256), **linear("guidance_in.out_layer", W, W)})
    for i in range(double):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}"
            s.update({**linear(f"{p}_mod.lin", 6 * W, W), **linear(f"{p}_attn.qkv", 3 * W, W),
                      **linear(f"{p}_attn.proj", W, W), **linear(f"{p}_mlp.0", MLP, W), **linear(f"{p}_mlp.2", W, MLP),
                      f"{p}_attn.norm.query_norm.scale": (HEAD,), f"{p}_attn.norm.key_norm.scale": (HEAD,)})
    for i in range(single):
        p = f"single_blocks.{i}"
        s.update({**linear(f"{p}.linear1", 3 * W + MLP, W), **linear(f"{p}.linear2", W, W + MLP),
                  **linear(f"{p}.modulation.lin", 3 * W, W),
                  f"{p}.norm.query_norm.scale": (HEAD,), f"{p}.norm.key_norm.scale": (HEAD,)})
    return s


def tensors(shapes: dict, prefix: str = "") -> dict:
    """Weights on the meta device; 1-D tensors hold consecutive numbers, distinct across the whole file."""
    out, start = {}, 0
    for key, shape in shapes.items():
        if len(shape) == 1:
            out[prefix + key] = torch.arange(start, start + shape[0], dtype=torch.float64)
            start += shape[0]
        else:
            out[prefix + key] = torch.empty(shape, device="meta")
    return out


@pytest.mark.slow  # importing diffusers' converter
@pytest.mark.parametrize("guidance, prefix", [(True, ""), (False, ""), (True, "model.diffusion_model.")])
def test_the_map_is_diffusers_converter(guidance, prefix):
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    shapes = bfl_shapes(guidance=guidance)
    ours = bfl_to_diffusers(tensors(shapes, prefix))
    theirs = convert_flux_transformer_checkpoint_to_diffusers(tensors(shapes, prefix))
    assert sorted(ours) == sorted(theirs)
    for key, t in theirs.items():
        assert ours[key].shape == t.shape, key
        if t.ndim == 1:
            assert torch.equal(ours[key], t), key


@pytest.mark.parametrize("guidance", [True, False])
def test_the_config_read_from_the_shapes_builds_a_model_of_those_keys(guidance):
    shapes = bfl_shapes(guidance=guidance)
    assert is_bfl_flux(shapes) and not is_bfl_flux({"transformer_blocks.0.attn.to_q.weight": (W, W)})
    cfg = bfl_config(shapes)
    assert (cfg.num_layers, cfg.num_single_layers, cfg.num_attention_heads, cfg.guidance_embeds) == (19, 38, 24, guidance)
    with torch.device("meta"):
        model = FluxTransformer(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in bfl_to_diffusers(tensors(shapes)).items()} == want


def test_a_key_outside_the_transformer_is_refused_by_name():
    bad = dict(tensors(bfl_shapes(double=1, single=1)), **{"double_blocks.0.img_attn.lora_A.weight": torch.zeros(4, 4)})
    with pytest.raises(CheckpointError, match="lora_A"):
        bfl_to_diffusers(bad)


def as_bfl(model: FluxTransformer, shapes: dict) -> dict:
    """A model's weights written in BFL's layout: each BFL tensor the row-concatenation of its targets."""
    ours = model.state_dict()
    out = {}
    for key in shapes:
        names, module = targets(key)
        parts = [ours[n] for n in names]
        if module == SWAPPED:
            parts = list(reversed(parts[0].chunk(2, dim=0)))
        out[key] = torch.cat(parts, dim=0).contiguous()
    return out


def test_a_small_bfl_file_loads_as_the_model_it_was_written_from(tmp_path):
    shapes = bfl_shapes(double=1, single=1, heads=1)
    torch.manual_seed(0)
    model = FluxTransformer(bfl_config(shapes)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_file(as_bfl(model, shapes), tmp_path / "flux1-tiny.safetensors")
    loaded = load_bfl_transformer(tmp_path / "flux1-tiny.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_a_file_of_another_layout_is_refused_by_name(tmp_path):
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a BFL Flux transformer file"):
        load_bfl_transformer(tmp_path / "other.safetensors")


def test_loading_a_bfl_file_as_a_checkpoint_says_what_else_it_needs(tmp_path):
    from weights_tools import load_checkpoint

    shapes = bfl_shapes(double=1, single=1, heads=1)
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, tmp_path / "flux1-tiny.safetensors")
    with pytest.raises(CheckpointError, match="holds no VAE.*--vae ae.safetensors.*--base a diffusers Flux folder"):
        load_checkpoint(tmp_path / "flux1-tiny.safetensors")
