"""LDMBert (LDM-400M's text tower) against diffusers' `LDMBertModel`, same random weights, fp32.

The reference receives our weights through diffusers' own CompVis -> diffusers converter, which
reads the CompVis module tree by attribute, so this also holds our module names to CompVis'.
Run with `pytest -s` to see the max |diff|.
"""
import warnings

import pytest
import torch

import ldm_oracles as L
from models.ldmbert import LDMBertConfig, LDMBertModel
from models.wordpiece import WordPieceTokenizer
from test_parity_models import check  # the same tolerance rule: 1e-5 relative

@pytest.fixture(scope="module")
def pair():
    ours = L.seeded_ldmbert(L.tiny_ldmbert_config())
    return ours, L.ref_ldmbert(ours)


def test_matches_diffusers_ldmbert(pair):
    ours, ref = pair
    ids = L.hf_bert_ids(["a photo of a cat riding a bicycle", "", "café crème, naïve squirrels!",
                         " ".join(["unhappiness"] * 60)])
    check("LDMBert last_hidden_state (4 prompts, 77 ids)", ours(ids), ref(ids).last_hidden_state)


def test_matches_with_our_tokenizer_and_other_lengths(pair):
    ours, ref = pair
    tok = WordPieceTokenizer(L.vocab_dir() / "vocab.txt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tok(L.WORDPIECE_PROMPTS)
    check("LDMBert on our tokenizer's ids (every test prompt)", ours(ids), ref(ids).last_hidden_state)
    short = ids[:3, :9]   # fewer positions than 77: the positions are arange(n), as diffusers'
    check("LDMBert, 9 positions", ours(short), ref(short).last_hidden_state)


def test_padding_changes_the_output(pair):
    """No padding mask (CompVis trained and samples without one): a [PAD] is attended to, so the
    content positions depend on how much padding follows. A mask would make this test fail."""
    ours, _ = pair
    ids = L.hf_bert_ids(["a photo of a cat"])
    assert not torch.allclose(ours(ids)[:, :6], ours(ids[:, :6]), atol=1e-4)


def test_full_size_names_and_shapes():
    """LDM-400M's text tower on the meta device: the CompVis key list, written out from x_transformer.py."""
    with torch.device("meta"):
        model = LDMBertModel(LDMBertConfig())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = {k: v for k, v in L.compvis_bert_shapes().items() if not k.startswith("to_logits.")}
    assert got == want
    assert sum(v.numel() for v in model.parameters()) == sum(
        v.numel() for k, v in L.ref_ldmbert_meta().state_dict().items() if not k.startswith("to_logits"))
