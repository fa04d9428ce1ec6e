"""SD v1 tokenisation: our CLIP BPE tokenizer against transformers' CLIPTokenizer (built offline from
open_clip's vocabulary file), plus the known ids of SD v1's padding and truncation."""
import warnings

import pytest

import oracles as O
from models.clip import BOS, EOS, Tokenizer, default_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return default_tokenizer()


def test_known_ids(tok):
    ids = tok(["a photo of a cat riding a bicycle"])
    assert ids.shape == (1, 77)
    expected = [49406, 320, 1125, 539, 320, 2368, 6765, 320, 11652, 49407]
    assert ids[0, :10].tolist() == expected
    assert ids[0, 10:].tolist() == [49407] * 67  # padded with EOS, not 0 (open_clip pads with 0)
    assert tok.encode("a photo of a cat riding a bicycle") == expected[1:-1]


def test_empty_prompt(tok):
    assert tok([""])[0].tolist() == [BOS] + [EOS] * 76


def test_long_prompt_is_truncated_with_eos_last(tok):
    prompt = " ".join(f"word{i % 10} cat" for i in range(50))  # 100 words, > 75 tokens
    with pytest.warns(UserWarning, match="truncated"):
        ids = tok([prompt])
    assert ids.shape == (1, 77) and ids[0, 0] == BOS and ids[0, 76] == EOS
    assert EOS not in ids[0, :76].tolist()
    assert ids[0, 1:76].tolist() == tok.encode(prompt)[:75]
    assert ids.tolist() == O.hf_ids([prompt]).tolist()


def test_short_prompt_does_not_warn(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(["a photo of a cat"])


def test_ids_match_hf_clip_tokenizer(tok):
    prompts = O.TOKENIZER_PROMPTS
    ours, ref = tok(prompts), O.hf_ids(prompts)
    bad = [(p, ours[i].tolist()[:20], ref[i].tolist()[:20]) for i, p in enumerate(prompts)
           if ours[i].tolist() != ref[i].tolist()]
    print(f"\n  tokenizer: {len(prompts) - len(bad)}/{len(prompts)} prompts give ids identical to HF CLIPTokenizer",
          end="")
    assert not bad, bad


def test_sd_tokenize_is_the_tokenizer():
    sd = O.ours()
    assert sd.tokenize(O.TOKENIZER_PROMPTS[:5]).tolist() == O.hf_ids(O.TOKENIZER_PROMPTS[:5]).tolist()


@pytest.mark.parametrize("prompt", O.TOKENIZER_PROMPTS)
def test_decode_round_trips(tok, prompt):
    ids = tok.encode(prompt)
    assert tok.encode(tok.decode(ids)) == ids
    hf = O.hf_tokenizer()
    assert tok.decode(ids).replace(" ", "") == hf.decode(ids).replace(" ", "")


@pytest.mark.parametrize("prompt", ["a photo of a cat riding a bicycle", "a squirrel eating a burger", "ok"])
def test_decode_simple_prompt_exactly(tok, prompt):
    assert tok.decode(tok.encode(prompt)).strip() == prompt
