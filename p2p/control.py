"""From an edit spec and a step index to that step's attention override.

The specs (`Replace`, `Refine`, `Reweight`) hold the knobs a researcher sweeps. `Controller`
resolves them once against the prompts (token alignments, the per-word time schedule alpha,
the self-attention window) and then, for step i, returns `override(site, q, k, v)` for the UNet.
Nothing advances as a side effect of a forward pass: the sampling loop passes the step.

Batch layout, as the reference: the guidance batch is [uncond x B, cond x B]; prompts[0] is the
source and prompts[1:] the edited prompts; only the conditional rows are edited or stored. The
low-memory mode runs the two halves as two UNet calls and controls only the conditional one.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Union

import torch
import torch.nn.functional as F

from models.attention import Site, attention_probs

from . import edits
from .align import refinement_mapper, replacement_mapper, word_token_indices
from .store import AttentionStore

Steps = Union[float, tuple, dict]


@dataclass(frozen=True)
class Edit:
    """The base of every edit spec (Replace, Refine, Reweight and a researcher's own). Shared knobs:
    cross_replace_steps: a float f (inject for the first f of the steps), a (start, end) pair, or a dict {"default_": ..., "word": ...} with per-word windows.
    self_replace_steps: a float or a pair. self_replace_max_res: inject self-attention only in
    layers whose latent side is at most this (16 in the stable notebook, 32 in null-text's)."""
    cross_replace_steps: Steps = 0.8
    self_replace_steps: Union[float, tuple] = 0.4
    self_replace_max_res: int = 16

    def cross_edit(self, tokenizer, prompts):
        """This spec's Edit function for these prompts: (M_src (H,N,K), M_edit (B',H,N,K)) -> M_hat (B',H,N,K)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Replace(Edit):
    """Word swap. `reference_tail=True` keeps the reference's misaligned tail after a swapped word
    with a different token count (see `align.replacement_mapper`)."""
    reference_tail: bool = False

    def cross_edit(self, tokenizer, prompts):
        mapper = replacement_mapper(tokenizer, prompts[0], prompts[1:], reference_tail=self.reference_tail)
        return lambda M_src, M_edit: edits.replace(M_src, mapper.to(M_src.device))


@dataclass(frozen=True)
class Refine(Edit):
    """Adding a phrase: source maps through the token alignment A(j); new tokens keep their own."""

    def cross_edit(self, tokenizer, prompts):
        mapper, alphas = refinement_mapper(tokenizer, prompts[0], prompts[1:])
        return lambda M_src, M_edit: edits.refine(M_src, M_edit, mapper.to(M_src.device), alphas.to(M_src.device))


@dataclass(frozen=True)
class Reweight(Edit):
    """Scale the maps of chosen words by c. equalizer: {"word": c} or {"word": [c per edited prompt]}.
    base: None (reweight the source maps), or a Replace / Refine whose Edit runs first (its
    time schedule and self window are not used: Reweight's own apply, as in the reference)."""
    equalizer: dict = field(default_factory=dict)
    base: Union[Replace, Refine, None] = None

    def cross_edit(self, tokenizer, prompts):
        c = equalizer(tokenizer, prompts, self.equalizer)
        base = self.base.cross_edit(tokenizer, prompts) if self.base is not None else (lambda M_src, M_edit: M_src)
        return lambda M_src, M_edit: edits.reweight(base(M_src, M_edit), c.to(M_src.device))


# ----------------------------------------------------------------------------------- schedules
def _bounds(b, what: str) -> tuple[float, float]:
    """A float f means (0, f). (The reference accepts only Python floats; ints work here.)"""
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        b = (0.0, float(b))
    if not (isinstance(b, (tuple, list)) and len(b) == 2 and all(isinstance(x, (int, float)) for x in b)):
        raise ValueError(f"{what} must be a fraction of the steps or a (start, end) pair, got {b!r}")
    if not 0 <= b[0] <= b[1] <= 1:
        raise ValueError(f"{what} must satisfy 0 <= start <= end <= 1, got {tuple(b)}")
    return float(b[0]), float(b[1])


def time_word_alpha(tokenizer, prompts, num_steps: int, cross_replace_steps: Steps) -> torch.Tensor:
    """alpha (T+1, B', K): 1 where token k of edited prompt b takes the edited map at step t.

    Rows [int(start*(T+1)), int(end*(T+1))) are 1, as the reference (which has T+1 rows although
    the loop has T steps). Word keys are looked up in the edited prompts; a word present in some
    of them only affects those, a word in none of them is an error."""
    steps = dict(cross_replace_steps) if isinstance(cross_replace_steps, dict) else {"default_": cross_replace_steps}
    steps.setdefault("default_", (0.0, 1.0))
    alpha = torch.zeros(num_steps + 1, len(prompts) - 1, tokenizer.length)

    def fill(b, cols, bounds, what):
        s, e = _bounds(bounds, what)
        alpha[:, b, cols] = 0
        alpha[int(s * (num_steps + 1)):int(e * (num_steps + 1)), b, cols] = 1

    for b in range(len(prompts) - 1):
        fill(b, slice(None), steps["default_"], "cross_replace_steps")
    for word, bounds in steps.items():
        if word == "default_":
            continue
        found = False
        for b, prompt in enumerate(prompts[1:]):
            if word in prompt.split(" "):
                fill(b, word_token_indices(tokenizer, prompt, word), bounds, f"cross_replace_steps[{word!r}]")
                found = True
        if not found:
            raise ValueError(f"cross_replace_steps names {word!r}, which is in none of the edited prompts "
                             f"{prompts[1:]}: use a word of an edited prompt, or 'default_'")
    return alpha


def equalizer(tokenizer, prompts, values: dict) -> torch.Tensor:
    """c (B', K): 1 everywhere but the token columns of each word, which get its value for that
    edited prompt (one value for all, or a list with one per edited prompt). A word must be in at
    least one edited prompt; edited prompts without it are not reweighted."""
    if not values:
        raise ValueError("Reweight needs equalizer={word: c}, e.g. {'smiling': 5.0}")
    n = len(prompts) - 1
    c = torch.ones(n, tokenizer.length)
    for word, v in values.items():
        v = list(v) if isinstance(v, (list, tuple)) else [v] * n
        if len(v) != n:
            raise ValueError(f"equalizer[{word!r}] has {len(v)} values for {n} edited prompts: give one value, "
                             f"or one per edited prompt")
        having = [b for b in range(n) if word in prompts[b + 1].split(" ")]
        if not having:  # word_token_indices names the word and the prompt's words
            word_token_indices(tokenizer, prompts[1], word)
        for b in having:  # an edited prompt without the word is left as it is
            c[b, word_token_indices(tokenizer, prompts[b + 1], word)] = float(v[b])
    return c


def self_window(num_steps: int, self_replace_steps) -> tuple[int, int]:
    """Steps [int(T*start), int(T*end)) inject self-attention (T rows here, T+1 for cross: as the reference)."""
    s, e = _bounds(self_replace_steps, "self_replace_steps")
    return int(num_steps * s), int(num_steps * e)


def call_rows(calls, num_steps: int) -> tuple[int, ...] | None:
    """The schedule row each UNet call reads, checked to lie in the T + 1 rows; None (no calls given) for
    the reference's counter, call i reading row i."""
    if calls is None:
        return None
    rows = tuple(int(c.row) for c in calls)
    if not rows or any(not 0 <= r <= num_steps for r in rows):
        raise ValueError(f"the sampler's calls read the schedule rows {list(rows)}, but {num_steps} steps have "
                         f"the rows 0..{num_steps}: a sampler's Call.row must lie in [0, num_steps]")
    return rows


# ----------------------------------------------------------------------------------- controller
PROBE_HEADS, PROBE_PIXELS = 2, 16  # random probe maps: the real prompt and token counts, a few heads and pixels


def probe_maps(*shape, seed: int = 0) -> torch.Tensor:
    """Random attention probabilities (rows sum to 1) in float64, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).mul(3).softmax(-1)


class Controller:
    """Resolves a spec against the prompts; `override(i)` gives the attention override of step i.

    The edit is defined on maps (`edit_cross`, `edits.inject_self`). fast=True runs the same edit
    without forming maps: cross-attention as M_hat V = M_t (S V) + M*_t (diag(e) V) with (S, e) read
    off `edit_cross` applied to identity maps, self-attention as softmax(q_src k_src^T) v_edit. Both
    are derived, then checked against the map form on random probe maps when the controller is
    built; a part that fails the check (an edit made non-linear) runs on maps, with a warning. A map
    is formed only where it is stored or an edit needs it; fast=False forms every map an edit touches."""

    def __init__(self, tokenizer, prompts, spec, num_steps, sites, local_blend=None,
                 store: AttentionStore | None = None, fast: bool = True, calls=None):
        """num_steps: the sampler's steps T, which size the (T + 1)-row schedules. calls: the sampler's
        UNet calls (models/sampler.py), each naming the row it reads; None: call i reads row i."""
        self.B = len(prompts)
        self.rows = call_rows(calls, num_steps)
        self.spec = spec
        self.store = store if store is not None else AttentionStore()
        self.blend = local_blend.build(tokenizer, prompts, num_steps, sites) if local_blend is not None else None
        if self.blend is not None:
            self.store.extra |= set(self.blend.layers)
        self.fast_cross = self.fast_self = False
        if spec is not None:
            if self.B < 2:
                raise ValueError(f"{type(spec).__name__} needs a source prompt and at least one edited prompt")
            self.cross = spec.cross_edit(tokenizer, prompts)
            self.alpha = time_word_alpha(tokenizer, prompts, num_steps, spec.cross_replace_steps)
            self.window = self_window(num_steps, spec.self_replace_steps)
            self._linear, self._cast = {}, {}
            self.fast_cross = fast and self._check_cross_linear()
            self.fast_self = fast and self._check_self_injection()

    # ---- the edit at step i, on maps (the definition) and as a linear map (the fast path)
    def edit_cross(self, i, M_src, M_edit):
        """alpha_i * Edit(M_t, M*_t) + (1 - alpha_i) * M*_t."""
        return edits.blend_in_time(self.cross(M_src, M_edit), M_edit, self.alpha[i].to(M_src.device))

    def _derive_linear(self, i) -> tuple[torch.Tensor, torch.Tensor]:
        """(S (B', K, K), E (B', K, K)) in float64 with edit_cross(i, M, M*) = M S + M* E if it is linear."""
        K, n = self.alpha.shape[-1], self.B - 1
        eye = torch.eye(K, dtype=torch.float64)[None]
        zero = torch.zeros(n, 1, K, K, dtype=torch.float64)
        S = self.edit_cross(i, eye, zero)[:, 0]
        E = self.edit_cross(i, torch.zeros_like(eye), eye.expand(n, 1, K, K))[:, 0]
        return S, E

    def _check_cross_linear(self) -> bool:
        """Derive (S, e) for every distinct alpha row and hold M S + M* diag(e) to edit_cross on probe maps."""
        K, n = self.alpha.shape[-1], self.B - 1
        M_src, M_edit = probe_maps(PROBE_HEADS, PROBE_PIXELS, K), probe_maps(n, PROBE_HEADS, PROBE_PIXELS, K, seed=1)
        worst = 0.0
        for i in range(self.alpha.shape[0]):
            key = self.alpha[i].numpy().tobytes()
            if key in self._linear or not self.alpha[i].any():
                continue
            S, E = self._derive_linear(i)
            e = torch.diagonal(E, dim1=-2, dim2=-1)
            lin = torch.einsum("hiw,bwj->bhij", M_src, S) + M_edit * e[:, None, None, :]
            worst = max(worst, float((lin - self.edit_cross(i, M_src, M_edit)).abs().max().nan_to_num(float("inf"))))
            self._linear[key] = (S, e)
        if worst > 1e-9:
            warnings.warn(f"{type(self.spec).__name__}: the cross-attention edit (p2p.edits) is not of the form "
                          f"M_t S + M*_t diag(e) on random maps (max deviation {worst:.2g}); fast=True runs it "
                          f"on the attention maps instead of the value side", stacklevel=3)
            return False
        return True

    def _check_self_injection(self) -> bool:
        """The fast self-attention path assumes edits.inject_self gives every edited prompt M_t itself."""
        M_src = probe_maps(PROBE_HEADS, PROBE_PIXELS, PROBE_PIXELS)
        injected = edits.inject_self(M_src, self.B - 1)
        if tuple(injected.shape) == (self.B - 1, *M_src.shape) and bool((injected == M_src).all()):
            return True
        warnings.warn(f"{type(self.spec).__name__}: edits.inject_self no longer gives every edited prompt the "
                      f"source's self-attention map; fast=True runs self-attention injection on the maps",
                      stacklevel=3)
        return False

    def cross_linear(self, i, like: torch.Tensor):
        """(S (B', K, K), e (B', K)) with edit_cross(i, M, M*) = M S + M* diag(e), as `like`'s dtype and device."""
        key = self.alpha[i].numpy().tobytes()
        if key not in self._linear:
            S, E = self._derive_linear(i)
            self._linear[key] = (S, torch.diagonal(E, dim1=-2, dim2=-1))
        cast = (key, like.dtype, like.device)
        if cast not in self._cast:
            self._cast[cast] = tuple(t.to(like.device, like.dtype) for t in self._linear[key])
        return self._cast[cast]

    def cross_active(self, i) -> bool:
        return self.spec is not None and bool(self.alpha[i].any())

    def self_active(self, i, site: Site) -> bool:
        return (self.spec is not None and self.window[0] <= i < self.window[1]
                and site.pixels <= self.spec.self_replace_max_res ** 2)

    # ---- step i's override: three paths, each a short function
    def row(self, i: int) -> int:
        """The schedule row UNet call i reads (the step the edit, the self window and LocalBlend see)."""
        if self.rows is None:
            return i
        if not 0 <= i < len(self.rows):
            raise ValueError(f"UNet call {i}, but the sampler this controller was built for makes "
                             f"{len(self.rows)} calls: build the controller with the calls of the sampler that runs")
        return self.rows[i]

    def override(self, i: int, cond_only: bool = False):
        """UNet call i's override for a call on [uncond x B, cond x B], or, cond_only, on the conditional
        rows alone (the low-memory mode's second call; its unconditional call runs with no override,
        as the reference's LOW_RESOURCE, whose controller never sees the unconditional pass). The
        override sees the call's schedule row as its step."""
        return partial(self.attend_cond if cond_only else self.attend, self.row(i))

    def attend(self, i: int, site: Site, q, k, v):
        """Attention of one layer at step i, or None for plain fused attention. Rows: [uncond x B, cond x B];
        the unconditional half is never edited or stored."""
        B = self.B
        out_c = self.attend_cond(i, site, q[B:], k[B:], v[B:])
        if out_c is None:
            return None
        return torch.cat([F.scaled_dot_product_attention(q[:B], k[:B], v[:B]), out_c])

    def attend_cond(self, i: int, site: Site, qc, kc, vc):
        """The conditional rows (source, then edits) of one layer at step i, or None for plain fused attention."""
        active = self.cross_active(i) if site.is_cross else self.self_active(i, site)
        keep = self.store.wants(site)
        if not (active or keep):
            return None
        fast = self.fast_cross if site.is_cross else self.fast_self
        if keep or not fast:
            return self.on_maps(i, site, active, keep, qc, kc, vc)
        if site.is_cross:
            return self.cross_on_values(i, qc, kc, vc)
        B = self.B                                          # self-attention: softmax(q_t k_t^T) v*
        return F.scaled_dot_product_attention(qc[:1].expand(B, -1, -1, -1), kc[:1].expand(B, -1, -1, -1), vc)

    def on_maps(self, i, site, active, keep, qc, kc, vc):
        """The definition: form M, edit it (edit_cross / inject_self), store it if kept, return M V."""
        M = attention_probs(qc, kc)                         # (B, H, N, K)
        if active:
            M_new = self.edit_cross(i, M[0], M[1:]) if site.is_cross else edits.inject_self(M[0], self.B - 1)
            M = torch.cat([M[:1], M_new])
        if keep:
            self.store.add(site, M)
        return M @ vc

    def cross_on_values(self, i, qc, kc, vc):
        """M_t (S V*) + M*_t (diag(e) V*) with fused attention: the edit without forming M."""
        S, e = self.cross_linear(i, vc)
        n = self.B - 1
        src = (qc[:1].expand(n, -1, -1, -1), kc[:1].expand(n, -1, -1, -1))
        out_e = F.scaled_dot_product_attention(*src, torch.einsum("bwn,bhnd->bhwd", S, vc[1:]))
        if e.any():
            out_e = out_e + F.scaled_dot_product_attention(qc[1:], kc[1:], e[:, None, :, None] * vc[1:])
        return torch.cat([F.scaled_dot_product_attention(qc[:1], kc[:1], vc[:1]), out_e])

    def step_callback(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """After UNet call i: close the store's step and apply LocalBlend at the call's schedule row."""
        self.store.end_step()
        return self.blend(self.row(i), x, self.store) if self.blend is not None else x
