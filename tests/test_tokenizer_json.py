"""Tokenizers read from tokenizer.json (models/tokenizer_json.py) against transformers' fast tokenizers built
from the same file: the golden tiny-sd3 folders' CLIP BPE (both paddings) and T5 Unigram, and random Unigram
vocabularies (ties included) against the `tokenizers` library itself; T5's precompiled nmt_nfkc normaliser
(a tokenizer.json converted by transformers from a SentencePiece model trained with it) on Unicode text."""
import base64
import json
import random
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers

from models.clip import Tokenizer
from models.spm_charsmap import PrecompiledCharsmap
from models.tokenizer_json import CLIPFileTokenizer, UnigramTokenizer, read_tokenizer

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
    assert isinstance(ours, CLIPFileTokenizer) and (ours.bos, ours.eos, ours.pad) == (49406, 49407, pad)
    batch = prompts(30, seed=2) + UNICODE  # Unicode and HTML entities: the file's normaliser, not ftfy + ["a &amp; b", "mojibake \u00c3\u00a9", "\u00c0\u00c9\u00ce CAF\u00c9"]
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


NFKC = Path(__file__).parent / "fixtures" / "t5-nfkc"  # a T5 tokenizer.json with SentencePiece's nmt_nfkc table
UNICODE = ["na\u00efve caf\u00e9 r\u00e9sum\u00e9", "cafe\u0301 (combining accent)", "\uff21\uff42\uff43\uff11\uff12 fullwidth",
           "\ufb01ne \ufb02ower ligatures", "\u201cquoted\u201d \u2018x\u2019 \u2014 \u2026", "tab\tnew\nline\r end",
           "\u00a0nbsp\u3000ideographic", "\u2460 \u00bd \u338f \u2122 \u2103", "\uff76\uff80\uff76\uff85",
           "\ud55c\uad6d\uc5b4", "\U0001f44d\U0001f3fd emoji", "x\u200by\u200dz\ufeff", "\u00c5ngstr\u00f6m stra\u00dfe \u2126"]


def random_text(rng: random.Random) -> str:
    """Printable ASCII, Latin-1 and beyond, CJK, fullwidth forms and combining marks, mixed."""
    ranges = [(0x20, 0x7E), (0xA0, 0x2FFF), (0x3000, 0xD7FF), (0xE000, 0xFFEF), (0x300, 0x36F)]  # no surrogates
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 10)))


def test_precompiled_charsmap_matches_tokenizers():
    data = json.loads((NFKC / "tokenizer.json").read_text())["normalizer"]["precompiled_charsmap"]
    ours, ref = PrecompiledCharsmap(data), tokenizers.normalizers.Precompiled(base64.b64decode(data))
    rng = random.Random(0)
    for text in UNICODE + [random_text(rng) for _ in range(2000)]:
        assert ours(text) == ref.normalize_str(text), text
    assert ours("\ufb01ne \uff21") == "fine A"


def test_t5_with_nfkc_matches_transformers():
    ours = read_tokenizer(NFKC)
    ref = transformers.T5TokenizerFast(tokenizer_file=str(NFKC / "tokenizer.json"))
    for text in UNICODE + prompts(20):
        assert ours.encode(text) == ref(text, add_special_tokens=False).input_ids, text


def test_t5_layout_of_older_conversions(tmp_path):
    """Precompiled then Replace(" {2,}", "\u2581") and Metaspace alone, as older converters wrote T5's file:
    the same ids as `tokenizers` reading that file."""
    data = json.loads((NFKC / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        data["normalizer"], {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "\u2581"}]}
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    ours, ref = read_tokenizer(tmp_path), tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in UNICODE + prompts(20):
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False).ids, text


def test_refusals_name_the_fix(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"\x0a")
    with pytest.raises(ValueError, match="spiece.model.*save_pretrained"):
        read_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="'WordPiece' tokenizer model"):
        read_tokenizer(tmp_path)
