"""Our T5 v1.1 encoder (models/t5.py) against transformers' T5EncoderModel: the same random weights loaded
under transformers' key names, fp32, no attention mask. Also the fp16 path: transformers keeps `wo` in fp32
and clamps fp16 hidden states; ours does the same, so the two agree in fp16 too."""
import pytest
import torch
import transformers

from models.t5 import T5Config, T5EncoderModel, relative_position_bucket

TOL = 1e-5

# the golden tiny config (tiny-sd3's text_encoder_3, tiny-flux's text_encoder_2), a wider one whose
# sequences reach past max_distance (the logarithmic buckets and their cap), another gated activation and
# the ungated relu
CONFIGS = {
    "tiny-golden": dict(vocab_size=288, d_model=96, d_kv=8, d_ff=128, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128),
    "wider": dict(vocab_size=300, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_heads=6,
                  relative_attention_num_buckets=16, relative_attention_max_distance=20, layer_norm_epsilon=1e-5),
    "gated-silu": dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                       feed_forward_proj="gated-silu"),
    # the original T5's ungated feed-forward, in hf-internal-testing/tiny-random-t5's sizes (diffusers' test
    # pipelines' T5)
    "relu": dict(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=5, num_heads=4,
                 relative_attention_num_buckets=8, feed_forward_proj="relu"),
}


def reference(sizes: dict, seed: int = 0) -> transformers.T5EncoderModel:
    cfg = transformers.T5Config(**{"feed_forward_proj": "gated-gelu", **sizes}, dropout_rate=0.0,
                                is_encoder_decoder=False, use_cache=False)
    model = transformers.T5EncoderModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 10.0)
                    + (1.0 if "norm" in name else 0.0))
    return model


def ours_from(ref: transformers.T5EncoderModel) -> T5EncoderModel:
    model = T5EncoderModel(T5Config.from_hf(ref.config.to_dict())).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_t5_encoder_matches_transformers(name):
    ref = reference(CONFIGS[name])
    ours = ours_from(ref)
    ids = torch.randint(0, CONFIGS[name]["vocab_size"], (3, 160), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(input_ids=ids).last_hidden_state, ours(ids)
    print(f"\n  T5 {name}: max rel diff {rel(got, want):.2e}", end="")
    assert rel(got, want) <= TOL


def test_relative_buckets_match_transformers():
    d = torch.arange(-300, 301)[None]
    for buckets, distance in ((32, 128), (16, 20), (8, 8)):
        want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            d, bidirectional=True, num_buckets=buckets, max_distance=distance)
        assert torch.equal(relative_position_bucket(d, buckets, distance), want)


def test_t5_fp16_follows_transformers():
    """In fp16 transformers keeps each `wo` in fp32 (its residual stream turns fp32) and clamps fp16 states;
    ours loaded the same way gives the same numbers (within fp16 rounding)."""
    ref32 = reference(CONFIGS["tiny-golden"], seed=3)
    ref = reference(CONFIGS["tiny-golden"], seed=3).half()
    for block in ref.encoder.block:
        block.layer[1].DenseReluDense.wo.float()
    ours = ours_from(ref32).half().keep_wo_in_fp32()
    ids = torch.randint(0, 288, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got, exact = ref(input_ids=ids).last_hidden_state, ours(ids), ref32(input_ids=ids).last_hidden_state
    assert got.dtype == want.dtype == torch.float16
    assert rel(got, want) <= 2e-3 and rel(got, exact) <= 1e-2
