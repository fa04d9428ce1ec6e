"""Tokenizers read from tokenizer.json (models/tokenizer_json.py) against transformers' fast tokenizers built
from the same file: the golden tiny-sd3 folders' CLIP BPE (both paddings) and T5 Unigram, and random Unigram
vocabularies (ties included) against the `tokenizers` library itself."""
import json
from pathlib import Path
import random

import pytest
import tokenizers
import torch
import transformers

from models.clip import Tokenizer
from models.tokenizer_json import UnigramTokenizer, read_tokenizer


SD3 = Path(__file__).parent / "fixtures" / "mmdit" / "tiny-sd3"
WORDS = ("a watercolor painting of a cat sitting on a red car. capybara photo fox, inside is smaller bear. "
         "The QUICK brown-fox jumps; over 12 lazy dogs! (sunset) \"quoted\" it's x/y & z: zebra? "
         "squirrel lion riding bicycle astronaut horse moon mountains lake forest oil-painting 1990s").split()


def prompts(n: int = 60, seed: int = 0) -> list[str]:
    """The golden prompts, edge cases and random word salads (mixed case, punctuation, odd spacing)."""
    rng = random.Random(seed)
    fixed = ["a watercolor painting of a cat sitting on a red car.",
             "a watercolor painting of a capybara sitting on a red car.",
             "a photo of a fox, inside is a smaller fox.", "a photo of a bear, inside is a smaller bear.",
             "", " ", "capybara", "  leading and trailing  ", "a\tb\nc", "qqq ~~~ jjj", "x</s>y <pad>",
             "wow!! a cat! ! really?!", "<|startoftext|>a<|endoftext|>b"]
    salad = [(rng.choice(["", " ", "  "])).join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
             for _ in range(n)]
    return fixed + salad


@pytest.fixture(scope="module")
def t5():
    return read_tokenizer(SD3 / "tokenizer_3")


def test_t5_unigram_matches_transformers(t5):
    ref = transformers.T5TokenizerFast(tokenizer_file=str(SD3 / "tokenizer_3" / "tokenizer.json"))
    assert isinstance(t5, UnigramTokenizer) and (t5.bos, t5.eos, t5.pad) == (None, 1, 0)
    for p in prompts():
        ids = t5.encode(p)
        assert ids == ref(p, add_special_tokens=False).input_ids, p
        assert t5.decode(ids) == ref.decode(ids), p
    batch = prompts(20, seed=1)
    want = ref(batch, padding="max_length", max_length=48, truncation=True, return_tensors="pt").input_ids
    with pytest.warns(UserWarning, match="T5 takes 47"):
        assert torch.equal(t5(batch, 48), want)


def test_capybara_is_three_t5_pieces(t5):
    ids = t5.encode("capybara")
    assert [t5.pieces[i] for i in ids] == ["\u2581cap", "y", "bara"]
    assert [t5.decode([i]) for i in t5.encode("a fox,")] == ["a", "fox", ","]  # one token at a time


@pytest.mark.parametrize("sub, pad", [("tokenizer", 49407), ("tokenizer_2", 0)])
def test_clip_bpe_matches_transformers_with_its_padding(sub, pad):
    ours = read_tokenizer(SD3 / sub)
    ref = transformers.CLIPTokenizerFast.from_pretrained(str(SD3 / sub))  # its tokenizer_config.json's padding
    assert isinstance(ours, Tokenizer) and (ours.bos, ours.eos, ours.pad) == (49406, 49407, pad)
    batch = prompts(30, seed=2)
    want = ref(batch, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours(batch, 77), want)
    assert ours.encode("capybara") == Tokenizer().encode("capybara")  # the same BPE as open_clip's vocabulary
    assert ours.encode("wow!!") == [ours.encoder["wow</w>"]] + ([0, 0] if pad == 0 else [ours.encoder["!!</w>"]])


def random_unigram(tmp_path, seed: int, prefix: str = "always", normalizer=None):
    """A random Unigram vocabulary (scores drawn, a few set equal to force ties) saved by `tokenizers`."""
    rng = random.Random(seed)
    letters = "abcde"
    pieces = {"".join(rng.choice(letters) for _ in range(rng.randint(1, 4))) for _ in range(60)}
    pieces |= {"\u2581" + p for p in list(pieces)[:25]} | {"\u2581", "a", "b", "c"}  # "d", "e" may be unknown
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, rng.choice([-2.0, -3.0, round(-rng.uniform(1, 9), 3)])) for p in sorted(pieces)]
    tok = tokenizers.Tokenizer(tokenizers.models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.WhitespaceSplit(), tokenizers.pre_tokenizers.Metaspace(prepend_scheme=prefix)])
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    return tok, read_tokenizer(tmp_path)


@pytest.mark.parametrize("seed", range(4))
def test_unigram_viterbi_matches_tokenizers(tmp_path, seed):
    ref, ours = random_unigram(tmp_path, seed)
    rng = random.Random(100 + seed)
    for _ in range(200):
        text = " ".join("".join(rng.choice("abcdef\u2581") for _ in range(rng.randint(1, 9)))
                        for _ in range(rng.randint(1, 4)))
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False).ids, text


def test_unigram_normalizers_and_first_prefix(tmp_path):
    norm = tokenizers.normalizers.Sequence([tokenizers.normalizers.Strip(left=False, right=True),
                                            tokenizers.normalizers.Replace(tokenizers.Regex(" {2,}"), "\u2581"),
                                            tokenizers.normalizers.Lowercase()])
    ref, ours = random_unigram(tmp_path, 7, prefix="first", normalizer=norm)
    for text in ("Abc  dEa bb", " abc cab", "ab  ", "aa\u2581bb c"):
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False).ids, text


def test_t5_precompiled_normaliser_refuses_non_ascii(tmp_path, t5):
    data = json.loads((SD3 / "tokenizer_3" / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": "AAAA"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    real_like = read_tokenizer(tmp_path)
    assert real_like.encode("a cat, sitting!") == t5.encode("a cat, sitting!")
    with pytest.raises(ValueError, match=r"printable ASCII only.*U\+00E9"):
        real_like.encode("caf\u00e9")


def test_refusals_name_the_fix(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"\x0a")
    with pytest.raises(ValueError, match="spiece.model.*save_pretrained"):
        read_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="'WordPiece' tokenizer model"):
        read_tokenizer(tmp_path)
