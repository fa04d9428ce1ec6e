"""Words -> token positions, and the two alignments between a source prompt P and edited prompts P*.

Cross-attention maps have one column per token position (77 for SD v1: BOS at 0, the prompt's
tokens from 1, then EOS and EOS padding). Every edit of the paper needs to know which columns of
M_t (source) correspond to which columns of M*_t (edited prompt):

* Word swap (Replace, §3.2): `replacement_mapper` builds M (77, 77) with M*_t <- M_t M, so that the
  swapped word's column in P* receives the old word's attention and every other column its own.
* Adding a phrase (Refine): `refinement_mapper` builds the alignment A(j) (the source position of
  target token j, or -1 for a new token) from a global alignment of the two token sequences.
* Reweighting and LocalBlend need the columns of a word: `word_token_indices` / `word_columns`.

Semantics follow google/prompt-to-prompt's seq_aligner (a word is every space-separated piece
exactly equal to it; the mapper values are the reference's), with three deliberate differences:
a word owns the tokens it has on its own (the reference sums decoded lengths, which drifts when the
tokenizer normalises a no-break space, a tab or an accent; see `_word_of_each_token`),
a word that is not in the prompt is an error rather than an empty list, and the Replace tail
after a swapped word with a different token count stays aligned (`reference_tail=True` restores
the reference's misaligned tail).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch


Word = Union[str, int]
Words = Union[Word, Sequence[Word]]


# ----------------------------------------------------------------------------- words -> tokens
def prompt_words(prompt: str) -> list[str]:
    """The reference's words: the prompt split on single spaces (case and punctuation kept)."""
    return prompt.split(" ")


def _word_of_each_token(tokenizer, prompt: str) -> list[int]:
    """For content token i (position i + 1), the index of the word it belongs to: each space-separated
    word owns the tokens it has on its own, in order.

    The reference walks the tokens summing their decoded lengths against each word's length; the
    tokenizer's normalisation (a no-break space or tab collapsed into a word break, an accent or an
    HTML entity dropped) then shifts every later word onto its neighbour's tokens. Tokenizing each word
    on its own applies the same normalisation to the word as to the prompt; a prompt whose tokens are
    not its words' tokens one after another is refused. Empty words (double spaces) own no token.
    """
    words = prompt_words(prompt)
    per_word = [list(tokenizer.encode(w)) for w in words]
    if [t for ids in per_word for t in ids] != list(tokenizer.encode(prompt)):
        raise ValueError(f"prompt {prompt!r}: its tokens are not its space-separated words' tokens one after "
                         "another (the tokenizer joins or splits text across a space), so words cannot be matched "
                         "to token columns; write the prompt with single plain spaces between words")
    return [i for i, ids in enumerate(per_word) for _ in ids]


def _word_places(prompt: str, word: Word) -> list[int]:
    """Word positions named by `word`: every exactly equal word for a str, that position for an int."""
    words = prompt_words(prompt)
    if isinstance(word, bool) or not isinstance(word, (str, int)):
        raise TypeError(f"a word must be a str or an int position, got {word!r}")
    if isinstance(word, int):
        if not -len(words) <= word < len(words):
            raise ValueError(f"word position {word} is out of range for prompt {prompt!r}, "
                             f"which has {len(words)} words: {words}")
        return [word % len(words)]
    places = [i for i, w in enumerate(words) if w == word]
    if not places:
        raise ValueError(f"word {word!r} is not in prompt {prompt!r}; its words are {words} "
                         f"(words are matched exactly, case and punctuation included)")
    return places


def word_token_indices(tokenizer, prompt: str, word: Words, max_len: int | None = None) -> list[int]:
    """Token positions (BOS = 0, so content starts at 1) of `word` in `prompt`, ascending.

    `word` is a str (every space-separated word exactly equal to it, as the reference's
    get_word_inds), an int (that word position) or a tuple/list of those (the union). Positions
    past the context window (the tokenizer keeps max_len - 2 content tokens; max_len: the tokenizer's
    `length` unless given) are dropped; a word
    left with none raises, as does a str word that is not in the prompt (the reference silently
    returns [], which turns an edit into a no-op).
    """
    if isinstance(word, (list, tuple)):
        if not word:
            raise ValueError("no words given")
        return sorted({i for w in word for i in word_token_indices(tokenizer, prompt, w, max_len)})
    max_len = max_len or tokenizer.length
    places = set(_word_places(prompt, word))
    owner = _word_of_each_token(tokenizer, prompt)
    inds = [i + 1 for i, w in enumerate(owner) if w in places]
    kept = [i for i in inds if i < max_len - 1]
    if not kept:
        why = "has no tokens" if not inds else f"lies past the {max_len - 2}-token limit of the text encoder"
        raise ValueError(f"word {word!r} of prompt {prompt!r} {why}")
    return kept


def word_columns(tokenizer, prompt: str, words: Words, max_len: int | None = None) -> torch.Tensor:
    """`word_token_indices` as a LongTensor, for indexing the key axis of attention maps."""
    return torch.tensor(word_token_indices(tokenizer, prompt, words, max_len), dtype=torch.long)


def _as_list(targets: str | Sequence[str]) -> list[str]:
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("no target prompts given")
    return targets


# ----------------------------------------------------------------------------- Replace: M
def _replacement_mapper_one(tokenizer, source: str, target: str, max_len: int, reference_tail: bool) -> torch.Tensor:
    """M (max_len, max_len) for one pair; see `replacement_mapper`."""
    words_x, words_y = prompt_words(source), prompt_words(target)
    if len(words_x) != len(words_y):
        raise ValueError(
            f"Replace needs prompts with the same number of words (a word swap); the source has "
            f"{len(words_x)} {words_x} and the target has {len(words_y)} {words_y}. "
            f"To add or remove words use Refine (refinement_mapper).")
    swapped = [k for k, (a, b) in enumerate(zip(words_x, words_y)) if a != b]
    src = [word_token_indices(tokenizer, source, k, max_len=10**9) for k in swapped]   # untruncated
    tgt = [word_token_indices(tokenizer, target, k, max_len=10**9) for k in swapped]

    M = torch.zeros(max_len, max_len)
    i = j = k = 0   # source pointer, target pointer, next swap
    while i < max_len and j < max_len:
        if k < len(swapped) and src[k][0] == i:
            if len(src[k]) == len(tgt[k]):           # token by token
                for a, b in zip(src[k], tgt[k]):
                    if a < max_len and b < max_len:
                        M[a, b] = 1.0
            else:                                      # every old token -> every new token, 1/n each
                for a in src[k]:
                    for b in tgt[k]:
                        if a < max_len and b < max_len:
                            M[a, b] = 1.0 / len(tgt[k])
            i, j, k = i + len(src[k]), j + len(tgt[k]), k + 1
        else:
            if k < len(swapped) or not reference_tail:
                M[i, j] = 1.0
            else:
                M[j, j] = 1.0                          # the reference's tail: identity by target index
            i, j = i + 1, j + 1
    return M


def replacement_mapper(tokenizer, source: str, targets: str | Sequence[str], max_len: int | None = None,
                       reference_tail: bool = False) -> torch.Tensor:
    """Word-swap mapper M, (len(targets), max_len, max_len) float32, with M*_t = M_t M (max_len: the
    tokenizer's `length` unless given).

    Row = source token position, column = target token position. The prompts must have the same
    number of words; words that differ are the swaps. Walking both prompts:
      - a swapped word with as many tokens in both prompts: M[s_k, t_k] = 1, token by token;
      - a swapped word with different token counts: every source token -> every target token,
        each with weight 1/n_target (so each source token's attention is spread, not duplicated);
      - any other position: M[i, j] = 1, advancing both pointers.
    After a swap with different token counts the pointers differ by the count difference, so the
    rest of the prompt (and the EOS padding) maps i -> j with i != j. Where the source is longer,
    the last target padding columns have no partner and stay 0.

    reference_tail=True reproduces google/prompt-to-prompt exactly: after the LAST swap it writes
    M[j, j] = 1 (identity by target index), which maps every later target token to the wrong source
    token whenever a swapped word changed token count (e.g. "cat" -> "croutons" shifts the rest of
    the prompt by two). With equal token counts i == j there and the two agree.
    """
    Ms = [_replacement_mapper_one(tokenizer, source, t, max_len or tokenizer.length, reference_tail)
          for t in _as_list(targets)]
    return torch.stack(Ms)


# ----------------------------------------------------------------------------- Refine: A(j)
GAP, MATCH, MISMATCH = 0, 1, -1
_STOP, _LEFT, _UP, _DIAG = 0, 1, 2, 3


def _prompt_ids(tokenizer, prompt: str, max_len: int) -> list[int]:
    """BOS, content (truncated as the tokenizer does), EOS: the sequence the text encoder sees, unpadded."""
    return [tokenizer.bos] + tokenizer.encode(prompt)[:max_len - 2] + [tokenizer.eos]


def global_alignment(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """A(j) for each j of y: the position in x aligned to y[j], or -1 (Needleman-Wunsch).

    Scores: gap 0, match +1, mismatch -1, first row and column 0. Because a gap costs nothing and
    a mismatch costs 1, two different tokens are never aligned: this is a longest common
    subsequence, and the new words of P* get -1. Ties are broken as the reference does, left
    (skip a target token) before up (skip a source token) before diagonal, and the traceback runs
    from the bottom-right corner, so of a repeated token the first copy (in P and in P*) is matched.
    """
    n, m = len(x), len(y)
    S = [[GAP * max(i, j) if i == 0 or j == 0 else 0 for j in range(m + 1)] for i in range(n + 1)]
    T = [[_LEFT] * (m + 1)] + [[_UP] + [_STOP] * m for _ in range(n)]
    T[0][0] = _STOP
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = S[i][j - 1] + GAP, S[i - 1][j] + GAP
            diag = S[i - 1][j - 1] + (MATCH if x[i - 1] == y[j - 1] else MISMATCH)
            S[i][j] = best = max(left, up, diag)
            T[i][j] = _LEFT if best == left else _UP if best == up else _DIAG
    A = [-1] * m
    i, j = n, m
    while T[i][j] != _STOP:
        move = T[i][j]
        if move == _DIAG:
            A[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif move == _LEFT:
            j -= 1                      # y[j - 1] is new: A stays -1
        else:
            i -= 1                      # x[i - 1] was dropped from P*
    return A


def refinement_mapper(tokenizer, source: str, targets: str | Sequence[str],
                      max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine's alignment: mapper (len(targets), max_len) int64 and alphas (len(targets), max_len) float32.

    mapper[j] = A(j), the source column that target column j copies, for the |y| tokens of P*
    (BOS, content, EOS); -1 marks a token with no source (it indexes the last column, but its
    alpha is 0, so M*_t keeps its own attention there). Past |y| the padding maps to itself.
    alphas = (mapper != -1). max_len: the tokenizer's `length` unless given.
    """
    max_len = max_len or tokenizer.length
    x = _prompt_ids(tokenizer, source, max_len)
    mappers = []
    for target in _as_list(targets):
        y = _prompt_ids(tokenizer, target, max_len)
        A = torch.arange(max_len)
        A[:len(y)] = torch.tensor(global_alignment(x, y))
        mappers.append(A)
    mapper = torch.stack(mappers)
    return mapper, (mapper != -1).float()
