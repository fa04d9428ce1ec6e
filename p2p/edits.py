"""The edit functions of the paper (section 3.2), as plain functions on attention maps.

Symbols: M_t is the source prompt's map, M*_t the edited prompt's map, both softmax
probabilities of shape (..., N pixels, K tokens). Every edit is linear in the columns of the
maps: Edit(M_t, M*_t) = M_t S + M*_t diag(e). `p2p.control` uses that to run the same edit on the
value side ((M S) V = M (S V)) without forming M; these functions stay the readable definition.
The specs in `p2p.control` call them from their functions of the step and the maps, f(i, M_src, M_edit),
as a researcher's own spec calls its own (docs/write-your-own-edit.md).
"""
from __future__ import annotations

import torch


def replace(M_src: torch.Tensor, mapper: torch.Tensor) -> torch.Tensor:
    """Word swap:  M_hat = M_t through the replacement mapper.

        M_hat[b, h, i, j] = sum_w M_t[h, i, w] * mapper[b, w, j]

    M_src (H, N, K), mapper (B', K, K) from `align.replacement_mapper` -> (B', H, N, K).
    With equal token counts the mapper is a permutation: column j of the edited prompt takes the
    source column it replaced (the paper's M_hat = M_t before tau)."""
    return torch.einsum("hiw,bwj->bhij", M_src, mapper.to(M_src.dtype))


def refine(M_src: torch.Tensor, M_edit: torch.Tensor, mapper: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Adding a phrase:  M_hat[:, j] = M_t[:, A(j)] where A(j) exists, else M*_t[:, j].

    M_src (H, N, K), M_edit (B', H, N, K), mapper (B', K) = A(j) (-1 where A(j) is None),
    alphas (B', K) = [A(j) exists]. No renormalisation. A(j) = -1 gathers the last column, which
    alphas then zeroes, as the reference does."""
    gathered = M_src[:, :, mapper].permute(2, 0, 1, 3)  # (B', H, N, K): column j is M_t[:, A(j)]
    a = alphas.to(M_src.dtype)[:, None, None, :]
    return gathered * a + M_edit * (1 - a)


def reweight(M: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Attention re-weighting:  M_hat[:, j] = c_j * M[:, j]  (c_j = 1 for untouched tokens).

    M (B', H, N, K) or (H, N, K), c (B', K) with one row per edited prompt. No renormalisation;
    negative c is allowed (it pushes the concept away). Composition: M is the output of
    `replace` or `refine` when Reweight is applied on top of them, else the source map M_t."""
    if M.dim() == 3:
        M = M[None]
    return M * c.to(M.dtype)[:, None, None, :]


def blend_in_time(M_hat: torch.Tensor, M_edit: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Soft attention constraint in time: alpha * M_hat + (1 - alpha) * M*_t.

    alpha (B', K) is 1 for the tokens whose maps are injected at this step (t < tau for that
    word), 0 otherwise: the paper's Edit(M_t, M*_t, t) switches from M_hat to M*_t at tau."""
    a = alpha.to(M_hat.dtype)[:, None, None, :]
    return M_hat * a + M_edit * (1 - a)


def inject_self(M_src: torch.Tensor, n_edits: int) -> torch.Tensor:
    """Self-attention injection: every edited prompt takes the source's self-attention map (`Edit.self_edit`'s
    default). M_src (H, N, N) -> (n_edits, H, N, N)."""
    return M_src.unsqueeze(0).expand(n_edits, *M_src.shape)
