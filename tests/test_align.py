"""p2p.align against the reference's controller tensors (golden, exact) and the paper's examples."""
import json

import pytest
import torch
from safetensors.torch import load_file

from models.clip import default_tokenizer
from p2p.align import (global_alignment, refinement_mapper, replacement_mapper, word_columns,
                       word_token_indices)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def load_case(golden_dir, name):
    spec = json.loads((golden_dir / f"{name}.json").read_text())
    return spec, load_file(str(golden_dir / f"{name}.safetensors"))


SQUIRREL = "a painting of a squirrel eating a burger"
LION = "a painting of a lion eating a burger"


# ----------------------------------------------------------------------------- golden
@pytest.mark.parametrize("name", ["case2_replace_lion", "case3_replace_lion_wordsteps_localblend",
                                  "case3b_replace_lion_wordsteps_localblend_th075"])
def test_replace_mapper_matches_golden(tok, golden_dir, name):
    spec, t = load_case(golden_dir, name)
    src, *targets = spec["prompts"]
    for reference_tail in (False, True):
        M = replacement_mapper(tok, src, targets, reference_tail=reference_tail)
        assert M.dtype == torch.float32
        assert torch.equal(M, t["controller.mapper"])


@pytest.mark.parametrize("name,prefix", [("case4_refine_winter", "controller."),
                                         ("case6_refine_then_reweight_croutons", "controller.prev.")])
def test_refine_mapper_matches_golden(tok, golden_dir, name, prefix):
    spec, t = load_case(golden_dir, name)
    src, *targets = spec["prompts"]
    mapper, alphas = refinement_mapper(tok, src, targets)
    assert mapper.dtype == torch.int64 and alphas.dtype == torch.float32
    assert torch.equal(mapper, t[prefix + "mapper"])
    assert torch.equal(alphas.view(len(targets), 1, 1, 77), t[prefix + "alphas"])


@pytest.mark.parametrize("name", ["case3_replace_lion_wordsteps_localblend",
                                  "case3b_replace_lion_wordsteps_localblend_th075"])
def test_local_blend_words_match_golden(tok, golden_dir, name):
    """alpha_layers[i] is 1 exactly at the columns of words[i] in prompt i."""
    spec, t = load_case(golden_dir, name)
    words = spec["controller_spec"]["local_blend"]["words"]
    alpha = torch.zeros(len(spec["prompts"]), 1, 1, 1, 1, 77)
    for i, (prompt, word) in enumerate(zip(spec["prompts"], words)):
        alpha[i, ..., word_columns(tok, prompt, word)] = 1
    assert torch.equal(alpha, t["controller.local_blend.alpha_layers"])


@pytest.mark.parametrize("name", ["case5_reweight_smiling", "case6_refine_then_reweight_croutons"])
def test_equalizer_columns_match_golden(tok, golden_dir, name):
    """The stable get_equalizer: ones, then the word's columns of the edited prompt set to its value."""
    spec, t = load_case(golden_dir, name)
    eq_spec = spec["controller_spec"]["equalizer"]
    eq = torch.ones(len(eq_spec["values"]), 77)
    for word in eq_spec["words"]:
        eq[:, word_columns(tok, spec["prompts"][1], word)] = torch.tensor(eq_spec["values"])
    assert torch.equal(eq, t["controller.equalizer"])


# ----------------------------------------------------------------------------- words -> tokens
def test_word_token_indices(tok):
    assert word_token_indices(tok, SQUIRREL, "squirrel") == [5]
    assert word_token_indices(tok, SQUIRREL, "a") == [1, 4, 7]          # every equal word
    assert word_token_indices(tok, SQUIRREL, 3) == [4]                  # a word position
    assert word_token_indices(tok, SQUIRREL, -1) == [8]
    assert word_token_indices(tok, "pea soup with croutons", "croutons") == [4, 5, 6]   # cr|out|ons
    assert word_token_indices(tok, "pea soup with croutons", ("pea", "croutons")) == [1, 4, 5, 6]
    assert word_token_indices(tok, "a cat, sleeping", "cat,") == [2, 3]
    assert word_token_indices(tok, "a cat, sleeping", "sleeping") == [4]
    assert torch.equal(word_columns(tok, SQUIRREL, ["painting", "burger"]), torch.tensor([2, 8]))


def test_double_space_does_not_shift_words(tok):
    """An empty word owns no token (the reference gives the next word's first token to it)."""
    assert word_token_indices(tok, "a  red cat", "red") == [2]
    assert word_token_indices(tok, "a  red cat", "cat") == [3]


def test_word_not_in_prompt_is_a_clear_error(tok):
    with pytest.raises(ValueError, match=r"'tiger' is not in prompt .*squirrel.*'painting'"):
        word_token_indices(tok, SQUIRREL, "tiger")
    with pytest.raises(ValueError, match="not in prompt"):
        word_token_indices(tok, SQUIRREL, "Squirrel")                   # exact match, as the reference
    with pytest.raises(ValueError, match="out of range"):
        word_token_indices(tok, SQUIRREL, 8)
    with pytest.raises(TypeError):
        word_token_indices(tok, SQUIRREL, 1.0)


def test_word_past_the_context_window(tok):
    prompt = " ".join(["cat"] * 80) + " dog"
    with pytest.raises(ValueError, match="75-token limit"):
        word_token_indices(tok, prompt, "dog")
    assert word_token_indices(tok, prompt, "cat") == list(range(1, 76))


# ----------------------------------------------------------------------------- Replace
def test_replace_identical_prompts_is_identity(tok):
    assert torch.equal(replacement_mapper(tok, SQUIRREL, [SQUIRREL, SQUIRREL]), torch.eye(77).expand(2, 77, 77))


def test_replace_different_token_counts(tok):
    """cat (1 token) -> croutons (cr|out|ons): 1/3 to each new token, then the tail stays aligned."""
    src, tgt = "a cat eating a burger", "a croutons eating a burger"
    assert word_token_indices(tok, src, "cat") == [2] and word_token_indices(tok, tgt, "croutons") == [2, 3, 4]
    M = replacement_mapper(tok, src, tgt)[0]
    assert torch.allclose(M[2, 2:5], torch.full((3,), 1 / 3))
    assert M[2].sum() == pytest.approx(1.0)
    assert torch.equal(M[:2, :2], torch.eye(2))
    # source position i >= 3 ("eating", "a", "burger", EOS, padding) -> target position i + 2
    for i in range(3, 75):
        assert M[i, i + 2] == 1 and M[i].sum() == 1
    assert M[75:].sum() == 0                                             # pushed past the window
    col = torch.ones(77)
    col[2:5] = 1 / 3
    assert torch.allclose(M.sum(0), col)                                 # every target column fed

    R = replacement_mapper(tok, src, tgt, reference_tail=True)[0]
    assert torch.equal(R[:3], M[:3])                                     # identical up to the swap
    for j in range(5, 77):
        assert R[j, j] == 1                                              # the reference's M[j, j]
    assert R[3:5].sum() == 0                                             # "eating", "a" feed nothing
    assert R[5, 5] == 1 and M[5, 5] == 0                                 # source "burger" -> target "a"


def test_replace_longer_source_word(tok):
    """croutons -> cat: all three old tokens feed the one new token (weight 1/1), tail shifted back."""
    M = replacement_mapper(tok, "a croutons eating a burger", "a cat eating a burger")[0]
    assert torch.equal(M[2:5, 2], torch.ones(3))
    for j in range(3, 75):
        assert M[j + 2, j] == 1
    assert M[:, 75:].sum() == 0                                          # no source padding left for them


def test_replace_tail_variants_agree_on_equal_token_counts(tok):
    targets = [LION, "a painting of a lion eating a pizza", "a photo of a squirrel eating a burger"]
    assert torch.equal(replacement_mapper(tok, SQUIRREL, targets),
                       replacement_mapper(tok, SQUIRREL, targets, reference_tail=True))
    M = replacement_mapper(tok, SQUIRREL, targets)
    assert M.shape == (3, 77, 77)
    assert torch.equal(M, torch.eye(77).expand(3, 77, 77))                # 1-token swaps: identity


def test_replace_pending_swaps_and_multiple(tok):
    """Two swaps, the first changing token count: positions between them follow both pointers."""
    M = replacement_mapper(tok, "a cat eating a burger", "a croutons eating a pizza")[0]
    assert M[3, 5] == 1 and M[4, 6] == 1          # "eating", "a" between the two swaps
    assert M[5, 7] == 1                           # burger -> pizza (1 token each)
    R = replacement_mapper(tok, "a cat eating a burger", "a croutons eating a pizza", reference_tail=True)[0]
    assert torch.equal(R[:6], M[:6])              # pending swaps use M[i, j] in the reference too
    assert R[8, 8] == 1 and M[6, 8] == 1          # after the last swap: EOS (source 6) -> target 8


def test_replace_needs_equal_word_counts(tok):
    with pytest.raises(ValueError, match=r"same number of words.*Refine"):
        replacement_mapper(tok, "a cat", "a fluffy cat")


# ----------------------------------------------------------------------------- Refine
def test_refine_paper_examples(tok):
    mapper, alphas = refinement_mapper(tok, "a photo of a cat", "a photo of a fluffy cat")
    assert mapper[0, :8].tolist() == [0, 1, 2, 3, 4, -1, 5, 6]
    assert alphas[0, :8].tolist() == [1, 1, 1, 1, 1, 0, 1, 1]
    assert mapper[0, 8:].tolist() == list(range(8, 77)) and alphas[0, 8:].eq(1).all()

    mapper, _ = refinement_mapper(tok, "soup", ["pea soup", "pea soup with croutons"])
    assert mapper.shape == (2, 77)
    assert mapper[0, :5].tolist() == [0, -1, 1, 2, 4]                     # |y| = 4, then identity
    assert mapper[1, :9].tolist() == [0, -1, 1, -1, -1, -1, -1, 2, 8]


def test_refine_identical_prompt_is_identity(tok):
    mapper, alphas = refinement_mapper(tok, SQUIRREL, SQUIRREL)
    assert torch.equal(mapper[0], torch.arange(77)) and alphas.eq(1).all()


def test_global_alignment_ties_and_lcs():
    """Gap 0 makes it a longest common subsequence; ties prefer left (the traceback skips target
    tokens from the end first, then source tokens), so of a repeated token the FIRST copy is matched."""
    assert global_alignment([1, 2, 3], [1, 2, 3]) == [0, 1, 2]
    assert global_alignment([1, 9, 3], [1, 2, 3]) == [0, -1, 2]           # mismatches never align
    assert global_alignment([1, 5, 3], [1, 5, 5, 3]) == [0, 1, -1, 2]     # first copy of 5 in P*
    assert global_alignment([1, 5, 5, 3], [1, 5, 3]) == [0, 1, 3]         # first copy of 5 in P
    assert global_alignment([7], [1, 2]) == [-1, -1]
    assert global_alignment([], [1]) == [-1]


def wordpiece():
    import ldm_oracles as L
    from models.wordpiece import WordPieceTokenizer
    return WordPieceTokenizer(L.vocab_dir() / "vocab.txt")


@pytest.mark.parametrize("make", [default_tokenizer, wordpiece], ids=["clip", "wordpiece"])
@pytest.mark.parametrize("gap", ["\u00a0", "\t", "\u3000"])
def test_a_space_the_tokenizer_normalises_does_not_shift_later_words(make, gap):
    # "cat<gap>riding" is one word of the prompt but two tokens: every later word drifted onto its
    # neighbour's tokens ("bicycle" onto nothing, the second "a" onto "riding")
    tokenizer = make()
    plain, odd = "a photo of a cat riding a bicycle", f"a photo of a cat{gap}riding a bicycle"
    assert word_token_indices(tokenizer, odd, "bicycle") == word_token_indices(tokenizer, plain, "bicycle")
    assert word_token_indices(tokenizer, odd, 6) == word_token_indices(tokenizer, plain, 7)   # "a", the 7th word
    assert word_token_indices(tokenizer, odd, f"cat{gap}riding") == word_token_indices(tokenizer, plain, ["cat", "riding"])


def test_byte_level_tokens_and_entities_keep_the_words_in_place(tok):
    for odd in ("a photo of a 🚲 riding a bicycle", "a photo of a &amp; riding a bicycle",
                "a photo of a cafe\u0301 riding a bicycle"):
        assert word_token_indices(tok, odd, "bicycle") == [len(tok.encode(odd))]
        assert word_token_indices(tok, odd, "riding") == [len(tok.encode(odd)) - 2]


def test_a_prompt_whose_tokens_cross_its_spaces_is_refused():
    class Joining:    # a tokenizer whose one token spans the words around a space
        length = 77

        def encode(self, text):
            return [len(text)] if text else []
    with pytest.raises(ValueError, match="not its space-separated words' tokens one after another"):
        word_token_indices(Joining(), "a cat", "cat")
