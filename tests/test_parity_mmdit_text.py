"""SD3's and Flux's text conditioning (models/mmdit_text.py, loaded by weights_tools.mmdit_text) against the
golden tensors diffusers' pipelines produced on the tiny folders (`prompt_embeds`, `pooled_prompt_embeds`, and
SD3's `negative_prompt_embeds` for the prompt ""), and each CLIP tower against transformers' own."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from weights_tools.mmdit_text import load_flux_text, load_sd3_text

FIXTURES = Path(__file__).parent / "fixtures" / "mmdit"
TOL = 1e-5


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def golden(case: str):
    return load_file(FIXTURES / f"{case}.safetensors"), json.loads((FIXTURES / f"{case}.json").read_text())["prompts"]


@pytest.fixture(scope="module")
def sd3():
    return load_sd3_text(FIXTURES / "tiny-sd3")


@pytest.fixture(scope="module")
def flux():
    return load_flux_text(FIXTURES / "tiny-flux")


def test_sd3_text_matches_the_pipeline(sd3):
    want, prompts = golden("sd3_plain")
    with torch.no_grad():
        cond, uncond = sd3.encode(prompts), sd3.encode(["", ""])
    assert cond.context.shape == (2, 77 + 256, 96) and cond.pooled.shape == (2, 32 + 48)
    for name, got, ref in (("prompt_embeds", cond.context, want["prompt_embeds"]),
                           ("pooled_prompt_embeds", cond.pooled, want["pooled_prompt_embeds"]),
                           ("negative_prompt_embeds", uncond.context, want["negative_prompt_embeds"]),
                           ("negative_pooled_prompt_embeds", uncond.pooled, want["negative_pooled_prompt_embeds"])):
        print(f"\n  SD3 {name}: max rel diff {rel(got, ref):.2e}", end="")
        assert rel(got, ref) <= TOL, name
    assert torch.equal(cond.context[:, :77, 80:], torch.zeros(2, 77, 16))  # CLIP's 80 channels zero-padded to 96


def test_flux_text_matches_the_pipeline(flux):
    want, prompts = golden("flux_plain")
    with torch.no_grad():
        cond = flux.encode(prompts)
    assert cond.context.shape == (2, 512, 96) and cond.pooled.shape == (2, 32)
    for name, got, ref in (("prompt_embeds", cond.context, want["prompt_embeds"]),
                           ("pooled_prompt_embeds", cond.pooled, want["pooled_prompt_embeds"])):
        print(f"\n  Flux {name}: max rel diff {rel(got, ref):.2e}", end="")
        assert rel(got, ref) <= TOL, name


@pytest.mark.parametrize("folder, part, cls", [("tiny-sd3", "text_encoder", "CLIPTextModelWithProjection"),
                                              ("tiny-sd3", "text_encoder_2", "CLIPTextModelWithProjection"),
                                              ("tiny-flux", "text_encoder", "CLIPTextModel")])
def test_clip_towers_match_transformers(sd3, flux, folder, part, cls):
    """quick_gelu (CLIP-L) and gelu (CLIP-G) towers: hidden_states[-2] and the pooled vector, on random ids
    with an end-of-text and padding after it."""
    ours = getattr(sd3 if folder == "tiny-sd3" else flux, part)
    ref = getattr(transformers, cls).from_pretrained(FIXTURES / folder / part).eval()
    ids = torch.randint(0, 49406, (3, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[0, 5:], ids[1, 40], ids[2, 76] = 49406, 49407, 49407, 49407
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
        hidden, pooled = ours(ids)
    want = out.text_embeds if cls.endswith("Projection") else out.pooler_output
    assert rel(hidden, out.hidden_states[-2]) <= TOL and rel(pooled, want) <= TOL


def test_legacy_eos_token_id_pools_at_the_largest_id(tmp_path):
    """A config with the old eos_token_id 2 (openai/clip-vit-large-patch14's) pools at argmax(ids), as
    transformers does; rows here hold no end-of-text at all, so the two rules disagree."""
    src = FIXTURES / "tiny-sd3"
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.copytree(src / part, tmp_path / part)
    config = json.loads((src / "text_encoder" / "config.json").read_text())
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps({**config, "eos_token_id": 2}))
    ours = load_sd3_text(tmp_path).text_encoder
    ref = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "text_encoder").eval()
    ids = torch.randint(0, 49000, (3, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel(ours(ids)[1], ref(input_ids=ids).text_embeds) <= TOL


def test_fp16_t5_loads_as_transformers_does():
    """In fp16, T5's `wo` stays fp32 (transformers' _keep_in_fp32_modules) and the encoding stays close to
    transformers' fp16 T5 and to fp32."""
    half = load_sd3_text(FIXTURES / "tiny-sd3", dtype=torch.float16)
    t5 = half.text_encoder_3
    assert t5.encoder.block[1].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert t5.encoder.block[1].layer[1].DenseReluDense.wi_0.weight.dtype == torch.float16
    ref = transformers.T5EncoderModel.from_pretrained(FIXTURES / "tiny-sd3" / "text_encoder_3",
                                                      dtype=torch.float16).eval()
    assert ref.encoder.block[1].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    ids = half.tokenizers["t5"](["a watercolor painting of a capybara sitting on a red car."], 256)
    with torch.no_grad():
        got, want = t5(ids), ref(input_ids=ids).last_hidden_state
        exact = load_sd3_text(FIXTURES / "tiny-sd3").text_encoder_3(ids)
    assert got.dtype == torch.float16 and rel(got, want) <= 2e-3 and rel(got, exact) <= 1e-2
