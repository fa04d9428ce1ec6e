"""The token-id layout every text tower reads: BOS, the prompt's content ids (cut to fit, with a
warning that shows what is kept), EOS, then padding to a fixed length. Tokenizers differ in their
vocabulary and their three special ids, not in this."""
from __future__ import annotations

import warnings

import torch


def token_rows(tokenizer, prompts: list[str] | str, length: int, encoder: str) -> torch.Tensor:
    """(N, length) int64 from `tokenizer.encode` / `.decode` and its ids `bos`, `eos`, `pad`;
    `encoder` names the text encoder in the truncation warning."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    rows = []
    for p in prompts:
        ids = tokenizer.encode(p)
        if len(ids) > length - 2:
            warnings.warn(f"prompt has {len(ids)} tokens; {encoder} takes {length - 2}: truncated to "
                          f"{tokenizer.decode(ids[:length - 2]).strip()!r}", stacklevel=3)
            ids = ids[:length - 2]
        rows.append([tokenizer.bos] + ids + [tokenizer.eos] + [tokenizer.pad] * (length - 2 - len(ids)))
    return torch.tensor(rows, dtype=torch.long)
