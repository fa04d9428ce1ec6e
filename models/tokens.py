"""The token-id layout every text tower reads: BOS, the prompt's content ids (cut to fit, with a
warning that shows what is kept), EOS, then padding to a fixed length. Tokenizers differ in their
vocabulary and their three special ids, not in this; a tokenizer whose `bos` is None (T5's) starts
with the content."""
from __future__ import annotations

import warnings

import torch


def token_rows(tokenizer, prompts: list[str] | str, length: int, encoder: str) -> torch.Tensor:
    """(N, length) int64 from `tokenizer.encode` / `.decode` and its ids `bos` (or None), `eos`, `pad`;
    `encoder` names the text encoder in the truncation warning."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    start = [] if tokenizer.bos is None else [tokenizer.bos]
    room = length - len(start) - 1  # content tokens that fit beside BOS and EOS
    rows = []
    for p in prompts:
        ids = tokenizer.encode(p)
        if len(ids) > room:
            warnings.warn(f"prompt has {len(ids)} tokens; {encoder} takes {room}: truncated to "
                          f"{tokenizer.decode(ids[:room]).strip()!r}", stacklevel=3)
            ids = ids[:room]
        rows.append(start + ids + [tokenizer.eos] + [tokenizer.pad] * (room - len(ids)))
    return torch.tensor(rows, dtype=torch.long)
