"""models/flux.py without an oracle: packing is invertible and refuses odd latents, the config refuses what
the transformer does not run, the sites follow the official counting at FLUX.1's full size, the position
ids are FluxPipeline's, and FLUX.1-dev refuses to run without its guidance scale."""
import pytest
import torch

from models.flux import FluxConfig, FluxTransformer, pack, position_ids, unpack

TINY = dict(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=[4, 6, 6])


def test_pack_and_unpack_are_inverse_and_take_each_2x2_patch_channel_major():
    x = torch.randn(2, 16, 6, 8)
    tokens = pack(x)
    assert tokens.shape == (2, 12, 64) and torch.equal(unpack(tokens, 6, 8), x)
    assert torch.equal(tokens[0, 1, :4], x[0, 0, 0:2, 2:4].flatten())  # token (0, 1): channel 0's patch first


def test_an_odd_latent_is_refused():
    with pytest.raises(ValueError, match="both sides must be even"):
        pack(torch.zeros(1, 16, 5, 8))


@pytest.mark.parametrize("change, message", [({"patch_size": 2}, "patch_size 1 only"),
                                             ({"axes_dims_rope": [4, 6, 8]}, "sum to attention_head_dim")])
def test_a_config_this_transformer_does_not_run_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        FluxConfig.from_diffusers({**TINY, **change})


def test_full_size_sites_count_double_blocks_then_single_blocks():
    with torch.device("meta"):
        model = FluxTransformer(FluxConfig())
    sites = model.joint_sites(512, (64, 64))
    assert [s.index for s in sites] == list(range(57))
    assert sites[18].name == "transformer_blocks.18" and sites[19].name == "single_transformer_blocks.0"
    assert {s.kind for s in sites[:19]} == {"double"} and {s.kind for s in sites[19:]} == {"single"}
    assert sites[0].text == slice(0, 512) and sites[0].image == slice(512, 512 + 4096) and sites[0].heads == 24


def test_position_ids_are_zero_for_text_and_row_col_for_the_image():
    ids = position_ids(2, (2, 3))
    assert ids.tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]


def test_flux_dev_without_a_guidance_scale_is_refused():
    model = FluxTransformer(FluxConfig.from_diffusers(TINY))
    with pytest.raises(ValueError, match="pass guidance"):
        model(torch.zeros(1, 4, 64), torch.tensor([0.5]), torch.zeros(1, 3, 32), torch.zeros(1, 8), (2, 2))
