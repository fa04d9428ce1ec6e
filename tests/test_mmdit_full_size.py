"""Full-size SD3 / SD3.5 transformers on the meta device (no memory): our module names and shapes are
diffusers' SD3Transformer2DModel's for SD3-medium, SD3.5-medium and SD3.5-large, and the official single
files' transformer layout (sd3.5_medium.safetensors: `model.diffusion_model.joint_blocks.N.x_block.attn.qkv`,
...), written out here and converted by diffusers' own single-file converter (the test oracle), lands key
for key and shape for shape on our modules."""
from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from models.mmdit import SD3Config, SD3Transformer

SD3_MEDIUM = dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192)
SD35_MEDIUM = dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                   qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
SD35_LARGE = dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                  qk_norm="rms_norm")
CONFIGS = {"sd3-medium": SD3_MEDIUM, "sd3.5-medium": SD35_MEDIUM, "sd3.5-large": SD35_LARGE}


def ours(config: dict) -> dict[str, tuple]:
    with torch.device("meta"):
        model = SD3Transformer(SD3Config(**config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def attention(prefix: str, d: int, head: int, qk_norm: bool, proj: bool = True) -> dict[str, tuple]:
    out = {f"{prefix}.qkv.weight": (3 * d, d), f"{prefix}.qkv.bias": (3 * d,)}
    out |= {f"{prefix}.proj.weight": (d, d), f"{prefix}.proj.bias": (d,)} if proj else {}
    return out | ({f"{prefix}.ln_q.weight": (head,), f"{prefix}.ln_k.weight": (head,)} if qk_norm else {})


def mlp(prefix: str, d: int) -> dict[str, tuple]:
    return {f"{prefix}.fc1.weight": (4 * d, d), f"{prefix}.fc1.bias": (4 * d,), f"{prefix}.fc2.weight": (d, 4 * d),
            f"{prefix}.fc2.bias": (d,)}


def joint_block(i: int, c: SD3Config) -> dict[str, tuple]:
    """One `joint_blocks.i` of the official MM-DiT (sd3 reference code's mmditx.py): x_block and context_block."""
    d, head, norm, last = c.width, c.attention_head_dim, c.qk_norm is not None, i == c.num_layers - 1
    dual = i in c.dual_attention_layers
    x, ctx = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
    out = {f"{x}.adaLN_modulation.1.weight": ((9 if dual else 6) * d, d), f"{x}.adaLN_modulation.1.bias": ((9 if dual else 6) * d,)}
    out |= attention(f"{x}.attn", d, head, norm) | mlp(f"{x}.mlp", d)
    out |= attention(f"{x}.attn2", d, head, norm) if dual else {}
    out |= {f"{ctx}.adaLN_modulation.1.weight": ((2 if last else 6) * d, d),
            f"{ctx}.adaLN_modulation.1.bias": ((2 if last else 6) * d,)}
    return out | attention(f"{ctx}.attn", d, head, norm, proj=not last) | ({} if last else mlp(f"{ctx}.mlp", d))


def single_file_layout(c: SD3Config) -> dict[str, tuple]:
    """The transformer keys of an official SD3 / SD3.5 single file, under `model.diffusion_model.`."""
    d, p = c.width, c.patch_size
    out = {"pos_embed": (1, c.pos_embed_max_size ** 2, d), "x_embedder.proj.weight": (d, c.in_channels, p, p),
           "x_embedder.proj.bias": (d,), "context_embedder.weight": (d, c.joint_attention_dim),
           "context_embedder.bias": (d,), "final_layer.adaLN_modulation.1.weight": (2 * d, d),
           "final_layer.adaLN_modulation.1.bias": (2 * d,), "final_layer.linear.weight": (p * p * c.out_channels, d),
           "final_layer.linear.bias": (p * p * c.out_channels,)}
    for name, d_in in (("t_embedder", 256), ("y_embedder", c.pooled_projection_dim)):
        out |= {f"{name}.mlp.0.weight": (d, d_in), f"{name}.mlp.0.bias": (d,), f"{name}.mlp.2.weight": (d, d),
                f"{name}.mlp.2.bias": (d,)}
    for i in range(c.num_layers):
        out |= joint_block(i, c)
    return {f"model.diffusion_model.{k}": s for k, s in out.items()}


@pytest.mark.parametrize("name", CONFIGS)
def test_names_and_shapes_are_diffusers(name):
    with torch.device("meta"):
        theirs = SD3Transformer2DModel(**CONFIGS[name])
    assert ours(CONFIGS[name]) == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("name", CONFIGS)
def test_single_file_layout_lands_on_our_modules(name):
    layout = single_file_layout(SD3Config(**CONFIGS[name]))
    file = {k: torch.empty(s, device="meta") for k, s in layout.items()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(file)
    assert not file  # the converter took every key
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours(CONFIGS[name])


def test_sd35_medium_site_indices():
    """SD3.5-medium's dual blocks 0-12 count two attention processors each (Quirk 1 of the golden README)."""
    with torch.device("meta"):
        model = SD3Transformer(SD3Config(**SD35_MEDIUM))
    indices = [s.index for s in model.sites(64, 64, 333)]
    assert indices[:3] == [0, 2, 4] and indices[12:15] == [24, 26, 27] and indices[-1] == 36
