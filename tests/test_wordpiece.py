"""BERT WordPiece (LDM-400M's tokenisation): ours against transformers' `BertTokenizer` reading the
same made-up vocabulary file, and the layout LDM feeds its text tower ([CLS] ... [SEP] [PAD]...)."""
import json
import warnings

import pytest

import ldm_oracles as L
from models.wordpiece import WordPieceTokenizer, read_vocab, words


@pytest.fixture(scope="module")
def tok() -> WordPieceTokenizer:
    return WordPieceTokenizer(L.vocab_dir() / "vocab.txt")


def test_ids_match_transformers(tok):
    prompts = L.WORDPIECE_PROMPTS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the over-long prompts warn
        ours = tok(prompts)
    ref = L.hf_bert_ids(prompts)
    bad = [(p, ours[i].tolist()[:24], ref[i].tolist()[:24]) for i, p in enumerate(prompts)
           if ours[i].tolist() != ref[i].tolist()]
    print(f"\n  wordpiece: {len(prompts) - len(bad)}/{len(prompts)} prompts give ids identical to BertTokenizer",
          end="")
    assert not bad, bad


@pytest.mark.parametrize("prompt", L.WORDPIECE_PROMPTS)
def test_content_ids_and_decode_match_transformers(tok, prompt):
    hf = L.hf_bert_tokenizer()
    ids = tok.encode(prompt)
    assert ids == hf.encode(prompt, add_special_tokens=False)
    assert tok.decode(ids) == hf.decode(ids)
    for i in ids[:8]:   # one token at a time, as get_word_inds decodes them ("##s" keeps its ##)
        assert tok.decode([i]) == hf.decode([i])


def test_pieces_accents_punctuation(tok):
    assert tok.decode(tok.encode("Cats")) == "cats"
    assert [tok.decoder[i] for i in tok.encode("unhappy squirrels")] == ["un", "##happy", "squirrel", "##s"]
    assert [tok.decoder[i] for i in tok.encode("Crème brûlée!")] == ["creme", "brulee", "!"]
    assert [tok.decoder[i] for i in tok.encode("a 🐱 cat")] == ["a", "[UNK]", "cat"]
    assert words("well-known, 猫猫") == ["well", "-", "known", ",", "猫", "猫"]


def test_layout_and_truncation(tok):
    assert (tok.bos, tok.eos, tok.pad, tok.length) == (2, 3, 0, 77)
    assert tok("")[0].tolist() == [2, 3] + [0] * 75
    prompt = " ".join(["squirrels"] * 50)   # 100 tokens
    with pytest.warns(UserWarning, match="truncated"):
        ids = tok([prompt])[0].tolist()
    assert ids[0] == 2 and ids[76] == 3 and ids[1:76] == tok.encode(prompt)[:75]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(["a photo of a cat"])


def test_bad_vocabulary_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        read_vocab(tmp_path / "missing.txt")
    (tmp_path / "v.txt").write_text("hello\nworld\n")
    with pytest.raises(ValueError, match=r"not a BERT WordPiece vocabulary.*\[PAD\]"):
        read_vocab(tmp_path / "v.txt")


def test_a_token_listed_twice_has_its_last_id_as_in_transformers(tmp_path):
    from transformers import BertTokenizer
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\ncat\ndog\ncat\na\n")
    hf = BertTokenizer.from_pretrained(str(tmp_path), local_files_only=True, do_lower_case=True)
    ours = WordPieceTokenizer(tmp_path / "vocab.txt")
    assert ours.encode("a cat dog") == hf.encode("a cat dog", add_special_tokens=False) == [8, 7, 6]


def test_a_tokenizer_json_with_boolean_ids_is_refused(tmp_path):
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "cat": True}  # bool is an int in Python
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
    with pytest.raises(ValueError, match=r"tokenizer.json: its model.vocab is not a mapping of tokens to \(integer\) ids"):
        read_vocab(tmp_path / "tokenizer.json")
