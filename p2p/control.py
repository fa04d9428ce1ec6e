"""From an edit spec and a step index to that step's attention override.

The specs (`Replace`, `Refine`, `Reweight`, and a researcher's own subclass of `Edit`) hold the knobs a
researcher sweeps and say what the edit does to the attention maps. `Controller` resolves them once
against the prompts (token alignments, the per-word time schedule alpha, the self-attention window)
and then, for step i, returns `override(site, q, k, v)` for the UNet. Nothing advances as a side
effect of a forward pass: the sampling loop passes the step.

Batch layout, as the reference: the guidance batch is [uncond x B, cond x B]; prompts[0] is the
source and prompts[1:] the edited prompts; only the conditional rows are edited or stored. The
low-memory mode runs the two halves as two UNet calls and controls only the conditional one.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, ClassVar, Union

import torch

from models import attention
from models.attention import Site, relative_side

from . import edits
from .align import refinement_mapper, replacement_mapper, word_token_indices
from .store import SELF_SIDE, AttentionStore

Steps = Union[float, tuple, dict]
EditFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # f(i, M_src, M_edit) -> M_hat


class Spec:
    """The base of every spec: `Edit` (Prompt-to-Prompt's, on the maps) and the specs that act on q, k, v
    (p2p.mutual.MutualSelfAttention); an Edit may also inject q, k and ResBlock features (`Edit.injection`,
    p2p.pnp.PlugAndPlay). A spec gives the controller two parts, either of which may be None:
    `map_edit()`, the Edit whose functions of the step and the maps run (docs/write-your-own-edit.md), and
    `attention(tokenizer, prompts)`, an AttentionRule on q, k, v, asked first at every attention call."""

    follows_inversion: ClassVar[bool] = False  # True: from an inversion, its source row is the stored latent
    #                                            at each of the edit's timesteps (Inversion.source_path)

    def row_prompts(self, prompts, negative_prompt: str, inverted: bool = False) -> tuple[list, list]:
        """(conditional, unconditional) prompts of the batch rows: the prompts, and the negative prompt for all.
        inverted: the source row follows an inversion (follows_inversion)."""
        return list(prompts), [negative_prompt]

    def attention(self, tokenizer, prompts) -> "AttentionRule | None":
        """This spec's edit on q, k, v rather than on the maps (an `AttentionRule`), or None."""
        return None

    def map_edit(self) -> "Edit | None":
        """The part of this spec edited on the maps, or None."""
        return None


@dataclass(frozen=True)
class Edit(Spec):
    """The base of every edit spec: Replace, Refine, Reweight and a researcher's own (docs/write-your-own-edit.md).

    A spec is a frozen dataclass of its knobs. Two methods resolve it against the prompts, once, into
    plain functions of the step i and the maps (probabilities; H heads, N pixels, K tokens, B' = edited
    prompts), which must not modify their inputs:

        cross_edit(tokenizer, prompts) -> f(i, M_src (H, N, K), M_edit (B', H, N, K)) -> M_hat (B', H, N, K)
        self_edit(tokenizer, prompts)  -> f(i, M_src (H, N, N), M_edit (B', H, N, N)) -> M_hat (B', H, N, N)

    The controller applies the cross edit where the time schedule says (alpha_i M_hat + (1 - alpha_i) M*_t,
    per token) and the self edit in the self window, at the layers self_replace_max_res allows.

    Shared knobs:
    cross_replace_steps: a float f (inject for the first f of the steps), a (start, end) pair, or a dict
    {"default_": ..., "word": ...} with per-word windows. self_replace_steps: a float or a pair.
    self_replace_max_res: edit self-attention only in layers whose latent side is at most this; None (the
    default): the reference's 16 (SD v1 at 512 px: the 16x16 and 8x8 layers), scaled with the model's
    default latent side where it is larger than SD v1's (SDXL at 1024: 32; `models.attention.relative_side`)."""
    cross_replace_steps: Steps = 0.8
    self_replace_steps: Union[float, tuple] = 0.4
    self_replace_max_res: Union[int, None] = None

    def injection(self, num_steps: int, sites, feature_sites):
        """What the spec injects beyond the maps' edit, or None: an object with qk(B, i, site, q, k) -> (q, k),
        attention(B, i, site, q, k, v) -> out and feature(B, i, feature_site, h) -> h, each None where it does
        not act, on calls whose rows come in groups of B prompts, the source first (p2p.pnp.Injection)."""
        return None

    def cross_edit(self, tokenizer, prompts) -> EditFn:
        """This spec's cross-attention edit for these prompts: f(i, M_src (H, N, K), M_edit (B', H, N, K)) -> M_hat."""
        raise NotImplementedError(f"{type(self).__name__} must define cross_edit(self, tokenizer, prompts), returning "
                                  f"f(i, M_src, M_edit) -> M_hat (see docs/write-your-own-edit.md)")

    def self_edit(self, tokenizer, prompts) -> EditFn:
        """This spec's self-attention edit; by default every edited prompt takes the source's map (inject_self)."""
        return lambda i, M_src, M_edit: edits.inject_self(M_src, M_edit.shape[0])

    def map_edit(self) -> "Edit | None":
        """The part of this spec edited on the maps (cross_edit / self_edit and the shared knobs): itself."""
        return self


@dataclass(frozen=True)
class AttentionCall:
    """What an attention-level edit (`AttentionRule`) is told about one attention call, as explicit data.

    The batch is `halves` guidance halves of `prompts` rows each, in order (("uncond", "cond"): the rows
    [uncond x B, cond x B]; the low-memory mode's conditional call: ("cond",)); in each half row 0 is the
    source and rows 1..B-1 the targets. `step` is the sampler's UNet call index (0 first), `row` the
    schedule row it reads, `timestep` its timestep (None if the controller was built without the
    sampler's calls). `site.block` is the transformer block's position in call order (SD v1: 0-5 down,
    6 mid, 7-15 up) of the `blocks` the model has. `maps`: the head-averaged cross-attention maps
    (site, (rows, N, K)) of the sites the rule `keeps`, formed earlier in this same UNet call."""
    step: int
    row: int
    timestep: Union[int, None]
    site: Site
    blocks: int
    prompts: int
    halves: tuple = ("uncond", "cond")
    maps: tuple = ()
    default_side: Union[int, None] = None  # the model's default latent side (models.attention.relative_side)

    def rows(self, half: str) -> slice:
        """The rows of one guidance half in the call's batch: [source, targets...]."""
        h = self.halves.index(half)
        return slice(h * self.prompts, (h + 1) * self.prompts)


@dataclass(frozen=True)
class AttentionRule:
    """An edit on q, k, v: attend(call, q, k, v) -> the attention output of every row (rows of q, (rows, heads,
    N, d), through models.attention.attend), or None for this layer's ordinary path (the Prompt-to-Prompt
    edit, if any, else plain attention). keeps(call) -> whether the rule reads this cross-attention call's
    maps later in the same UNet call (`AttentionCall.maps`). check(sites) raises a ValueError where the rule
    cannot run on a UNet with these sites (a block it names that the model does not have)."""
    attend: Callable
    keeps: Callable = field(default=lambda call: False)
    check: Callable = field(default=lambda sites: None)


@dataclass(frozen=True)
class Replace(Edit):
    """Word swap. `reference_tail=True` keeps the reference's misaligned tail after a swapped word
    with a different token count (see `align.replacement_mapper`)."""
    reference_tail: bool = False

    def cross_edit(self, tokenizer, prompts):
        mapper = replacement_mapper(tokenizer, prompts[0], prompts[1:], reference_tail=self.reference_tail)
        return lambda i, M_src, M_edit: edits.replace(M_src, mapper.to(M_src.device))


@dataclass(frozen=True)
class Refine(Edit):
    """Adding a phrase: source maps through the token alignment A(j); new tokens keep their own."""

    def cross_edit(self, tokenizer, prompts):
        mapper, alphas = refinement_mapper(tokenizer, prompts[0], prompts[1:])
        return lambda i, M_src, M_edit: edits.refine(M_src, M_edit, mapper.to(M_src.device), alphas.to(M_src.device))


@dataclass(frozen=True)
class Reweight(Edit):
    """Scale the maps of chosen words by c. equalizer: {"word": c} or {"word": [c per edited prompt]}.
    base: None (reweight the source maps), or a Replace / Refine whose Edit runs first (its
    time schedule and self window are not used: Reweight's own apply, as in the reference)."""
    equalizer: dict = field(default_factory=dict)
    base: Union[Replace, Refine, None] = None

    def cross_edit(self, tokenizer, prompts):
        c = equalizer(tokenizer, prompts, self.equalizer)
        base = self.base.cross_edit(tokenizer, prompts) if self.base is not None else (lambda i, M_src, M_edit: M_src)
        return lambda i, M_src, M_edit: edits.reweight(base(i, M_src, M_edit), c.to(M_src.device))


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
PROBE_HEADS, PROBE_PIXELS = 2, 16  # random probe maps: the real prompt and token counts, a few pixels


def probe_maps(*shape, seed: int = 0) -> torch.Tensor:
    """Random attention probabilities (rows sum to 1) in float64, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).mul(3).softmax(-1)


def edit_function(spec, method: str, fn) -> EditFn:
    """fn = spec.<method>(tokenizer, prompts), refused with a clear message unless it takes (i, M_src, M_edit)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (a builtin): calling it will tell
        return fn
    try:
        signature.bind(0, None, None)
    except TypeError:
        raise TypeError(f"{type(spec).__name__}.{method} must return a function f(i, M_src, M_edit) of the step and "
                        f"the maps, got {fn!r} (see docs/write-your-own-edit.md)") from None
    return fn


class Controller:
    """Resolves a spec against the prompts; `override(i)` gives the attention override of step i.

    The edit is defined on maps (`edit_cross`, `edit_self`: the spec's functions of the step and the
    maps). fast=True runs the same edit without forming maps: cross-attention as
    M_hat V = M_t (S V) + M*_t (diag(e) V) with (S, e) read off `edit_cross` applied to identity maps, for
    every step and head count (a step- or head-dependent edit gets its own S and e), self-attention as
    softmax(q_src k_src^T) v_edit. Both are derived, then checked against the map form on random probe
    maps with the model's head counts when the controller is built; a part that fails the check (an edit
    that is not linear in the maps, a self edit that is not the source's map) runs on maps, with a
    warning naming the spec. A map is formed only where it is stored or an edit needs it; fast=False
    forms every map an edit touches. default_side: the model's default latent side, which the relative
    defaults (self_replace_max_res=None, the store's limits) scale with."""

    def __init__(self, tokenizer, prompts, spec, num_steps, sites, local_blend=None,
                 store: AttentionStore | None = None, fast: bool = True, calls=None,
                 default_side: int | None = None, feature_sites=None):
        """num_steps: the sampler's steps T, which size the (T + 1)-row schedules. calls: the sampler's
        UNet calls (models/sampler.py), each naming the row it reads; None: call i reads row i.
        feature_sites: the UNet's ResBlock sites (None: those the sites carry, models.unet.Sites.features)."""
        self.B = len(prompts)
        self.rows = call_rows(calls, num_steps)
        self.timesteps = None if calls is None else tuple(int(c.timestep) for c in calls)
        self.blocks = len({s.block for s in sites})
        self.default_side = default_side
        self.rule = spec.attention(tokenizer, prompts) if spec is not None else None
        self._maps = (None, [])  # (UNet call, the maps the rule keeps in it)
        if self.rule is not None:
            if self.B < 2:
                raise ValueError(f"{type(spec).__name__} needs a source prompt and at least one edited prompt")
            self.rule.check(sites)
        spec = spec.map_edit() if spec is not None else None
        self.spec = spec
        self.store = store if store is not None else AttentionStore()
        if default_side is not None:
            self.store.default_side = default_side
        self.blend = local_blend.build(tokenizer, prompts, num_steps, sites) if local_blend is not None else None
        if self.blend is not None:
            self.store.extra |= set(self.blend.layers)
        self.fast_cross = self.fast_self = False
        feature_sites = getattr(sites, "features", ()) if feature_sites is None else feature_sites
        self.injection = None if spec is None else spec.injection(num_steps, sites, feature_sites)
        if spec is not None:
            if self.B < 2:
                raise ValueError(f"{type(spec).__name__} needs a source prompt and at least one edited prompt")
            self.cross = edit_function(spec, "cross_edit", spec.cross_edit(tokenizer, prompts))
            self.self_fn = edit_function(spec, "self_edit", spec.self_edit(tokenizer, prompts))
            self.alpha = time_word_alpha(tokenizer, prompts, num_steps, spec.cross_replace_steps)
            self.window = self_window(num_steps, spec.self_replace_steps)
            self.self_side = (spec.self_replace_max_res if spec.self_replace_max_res is not None
                              else relative_side(SELF_SIDE, default_side))
            self.heads = sorted({s.heads for s in sites if s.heads}) or [PROBE_HEADS]
            self._linear, self._cast = {}, {}
            self._check_shapes()
            self.fast_cross = fast and self._check_cross_linear()
            self.fast_self = fast and self._check_self_injection()

    # ---- the edit at step i, on maps (the definition) and as a linear map (the fast path)
    def edit_cross(self, i, M_src, M_edit):
        """alpha_i * Edit(i, M_t, M*_t) + (1 - alpha_i) * M*_t."""
        return edits.blend_in_time(self.cross(i, M_src, M_edit), M_edit, self.alpha[i].to(M_src.device))

    def edit_self(self, i, M_src, M_edit):
        """The spec's self-attention edit at step i (a step of the self window)."""
        return self.self_fn(i, M_src, M_edit)

    def _probes(self, H: int, K: int):
        return probe_maps(H, PROBE_PIXELS, K), probe_maps(self.B - 1, H, PROBE_PIXELS, K, seed=1)

    def _check_shapes(self) -> None:
        """Each edit function, on probe maps, returns one map per edited prompt: (B', H, N, K)."""
        K, H, name = self.alpha.shape[-1], self.heads[0], type(self.spec).__name__
        for method, fn, k in (("cross_edit", self.cross, K), ("self_edit", self.self_fn, PROBE_PIXELS)):
            M_src, M_edit = self._probes(H, k)
            got = tuple(fn(0, M_src, M_edit).shape)
            if got != tuple(M_edit.shape):
                raise ValueError(f"{name}.{method}: its function returned maps of shape {got} for M_src "
                                 f"{tuple(M_src.shape)} and M_edit {tuple(M_edit.shape)}; it must return one map per "
                                 f"edited prompt, of M_edit's shape (B', H, N, K)")

    def _derive_linear(self, i, H) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, e) in float64 with edit_cross(i, M, M*) = M S + M* diag(e) if it is linear in the maps, for H
        heads: S (B', H, K, K), e (B', H, K), or (B', K, K), (B', K) when every head's are the same."""
        K, n = self.alpha.shape[-1], self.B - 1
        eye = torch.eye(K, dtype=torch.float64).repeat(H, 1, 1)
        S = self.edit_cross(i, eye, torch.zeros(n, H, K, K, dtype=torch.float64))
        E = self.edit_cross(i, torch.zeros_like(eye), eye.repeat(n, 1, 1, 1))
        e = torch.diagonal(E, dim1=-2, dim2=-1)
        if bool((S == S[:, :1]).all()) and bool((e == e[:, :1]).all()):
            return S[:, 0], e[:, 0]
        return S, e

    @staticmethod
    def apply_linear(M_src, M_edit, S, e):
        """M_t S + M*_t diag(e) for maps M_src (H, N, K), M_edit (B', H, N, K) and a form from _derive_linear."""
        if S.dim() == 3:
            return torch.einsum("hiw,bwj->bhij", M_src, S) + M_edit * e[:, None, None, :]
        return torch.einsum("hiw,bhwj->bhij", M_src, S) + M_edit * e[:, :, None, :]

    def _check_cross_linear(self) -> bool:
        """Derive (S, e) for every step the edit acts at and every head count of the model, and hold
        M S + M* diag(e) to edit_cross on probe maps. Steps whose edit gives the same probe output share one
        derivation (the shipped edits: one per distinct alpha row)."""
        K, worst = self.alpha.shape[-1], 0.0
        for H in self.heads:
            M_src, M_edit = self._probes(H, K)
            forms = {}
            for i in range(self.alpha.shape[0]):
                if not self.alpha[i].any():
                    continue
                want = self.edit_cross(i, M_src, M_edit)
                key = want.numpy().tobytes()
                if key not in forms:
                    forms[key] = self._derive_linear(i, H)
                    lin = self.apply_linear(M_src, M_edit, *forms[key])
                    worst = max(worst, float((lin - want).abs().max().nan_to_num(float("inf"))))
                self._linear[(i, H)] = forms[key]
        if worst > 1e-9:
            cls = type(self.spec)
            warnings.warn(f"{cls.__name__}: the cross-attention edit ({cls.__module__}.{cls.__qualname__}.cross_edit) "
                          f"is not of the form M_t S + M*_t diag(e) on random maps (max deviation {worst:.2g}); "
                          f"fast=True runs it on the attention maps instead of the value side", stacklevel=3)
            return False
        return True

    def _check_self_injection(self) -> bool:
        """The fast self-attention path assumes edit_self gives every edited prompt M_t itself, at every step
        of the self window."""
        for H in self.heads:
            M_src, M_edit = self._probes(H, PROBE_PIXELS)
            for i in range(*self.window):
                if not bool((self.edit_self(i, M_src, M_edit) == M_src).all()):
                    cls = type(self.spec)
                    warnings.warn(f"{cls.__name__}: the self-attention edit ({cls.__module__}.{cls.__qualname__}"
                                  f".self_edit, by default p2p.edits.inject_self) does not give every edited prompt "
                                  f"the source's map at step {i}; fast=True runs self-attention edits on the maps",
                                  stacklevel=3)
                    return False
        return True

    def cross_linear(self, i, like: torch.Tensor):
        """(S, e) with edit_cross(i, M, M*) = M S + M* diag(e) for like's heads (like.shape[-3]), as like's
        dtype and device: S (B', K, K) and e (B', K), or with a head axis for a head-dependent edit."""
        return self._value_form(i, like)[:2]

    def _value_form(self, i, like: torch.Tensor):
        H = like.shape[-3]
        cast = (i, H, like.dtype, like.device)
        if cast not in self._cast:
            if (i, H) not in self._linear:
                self._linear[(i, H)] = self._derive_linear(i, H)
            S, e = (t.to(like.device, like.dtype) for t in self._linear[(i, H)])
            self._cast[cast] = (S, e, bool(e.any()))
        return self._cast[cast]

    def cross_active(self, i) -> bool:
        return self.spec is not None and bool(self.alpha[i].any())

    def self_active(self, i, site: Site) -> bool:
        return (self.spec is not None and self.window[0] <= i < self.window[1]
                and site.pixels <= self.self_side ** 2)

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
        if self.injection is not None:
            return partial(self.attend_injected, self.row(i), cond_only)
        fn = self.attend_cond if cond_only else self.attend
        # the call index too where an attention rule reads it (a subclass's attend(i, site, q, k, v) keeps working)
        return partial(fn, self.row(i), call=i) if self.rule is not None else partial(fn, self.row(i))

    def override_uncond(self, i: int):
        """The low-memory mode's unconditional call's override: the attention rule's alone (halves
        ("uncond",)) or the spec's injection alone, or None without either (Prompt-to-Prompt never edits
        that half)."""
        if self.injection is not None:
            return partial(self.injection.attention, self.B, self.row(i))
        if self.rule is None:
            return None
        return lambda site, q, k, v: self.by_rule(self.row(i), i, site, q, k, v, ("uncond",))

    def feature_override(self, i: int):
        """UNet call i's ResBlock override (models/unet.py), or None: the spec's injection, if it has one."""
        if self.injection is None:
            return None
        return partial(self.injection.feature, self.B, self.row(i))

    def attend_injected(self, i: int, cond_only: bool, site: Site, q, k, v):
        """The spec's injected q, k where it acts (on every group of B rows; the map of the conditional rows
        kept if the store wants it), else the edit's attention."""
        qk = self.injection.qk(self.B, i, site, q, k)
        if qk is None:
            return self.attend_cond(i, site, q, k, v) if cond_only else self.attend(i, site, q, k, v)
        if not self.store.wants(site):
            return attention.attend(*qk, v)
        M = attention.attention_probs(*qk)
        self.store.add(site, M[-self.B:])
        return M @ v

    def attend(self, i: int, site: Site, q, k, v, call: int | None = None):
        """Attention of one layer at step (schedule row) i of UNet call `call` (None: i), or None for plain
        attention. Rows: [uncond x B, cond x B]; the unconditional half is edited by an attention rule only,
        and never stored."""
        out = self.by_rule(i, i if call is None else call, site, q, k, v, ("uncond", "cond"))
        if out is not None:
            return out
        B = self.B
        out_c = self.map_edit_cond(i, site, q[B:], k[B:], v[B:])
        if out_c is None:
            return None
        return torch.cat([attention.attend(q[:B], k[:B], v[:B]), out_c])

    def attend_cond(self, i: int, site: Site, qc, kc, vc, call: int | None = None):
        """The conditional rows alone (the low-memory mode's conditional call) of one layer at step i."""
        out = self.by_rule(i, i if call is None else call, site, qc, kc, vc, ("cond",))
        return out if out is not None else self.map_edit_cond(i, site, qc, kc, vc)

    def by_rule(self, row: int, i: int, site: Site, q, k, v, halves):
        """The attention rule's output for this layer of UNet call i (None: it leaves it to the map edit),
        after keeping the maps it reads later in this UNet call."""
        if self.rule is None:
            return None
        if self._maps[0] != (i, halves) or site.index == 0:
            self._maps = ((i, halves), [])
        call = AttentionCall(i, row, None if self.timesteps is None else self.timesteps[i], site,
                             self.blocks, self.B, halves, tuple(self._maps[1]), self.default_side)
        if site.is_cross and self.rule.keeps(call):
            self._maps[1].append((site, attention.attention_probs(q, k).float().mean(1)))
        return self.rule.attend(call, q, k, v)

    def map_edit_cond(self, i: int, site: Site, qc, kc, vc):
        """The conditional rows (source, then edits) of one layer at step i under the map edit, or None for
        plain attention."""
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
        return attention.attend(qc[:1].expand(B, -1, -1, -1), kc[:1].expand(B, -1, -1, -1), vc)

    def on_maps(self, i, site, active, keep, qc, kc, vc):
        """The definition: form M, edit it (edit_cross / edit_self), store it if kept, return M V."""
        M = attention.attention_probs(qc, kc)               # (B, H, N, K)
        if active:
            M_new = self.edit_cross(i, M[0], M[1:]) if site.is_cross else self.edit_self(i, M[0], M[1:])
            M = torch.cat([M[:1], M_new.to(M.dtype)])
        if keep:
            self.store.add(site, M)
        return M @ vc

    def cross_on_values(self, i, qc, kc, vc):
        """M_t (S V*) + M*_t (diag(e) V*), each through attention.attend: the edit without forming M."""
        S, e, has_e = self._value_form(i, vc)
        n = self.B - 1
        src = (qc[:1].expand(n, -1, -1, -1), kc[:1].expand(n, -1, -1, -1))
        out_e = attention.attend(*src, torch.einsum("bwn,bhnd->bhwd" if S.dim() == 3 else "bhwn,bhnd->bhwd", S, vc[1:]))
        if has_e:
            ev = (e[:, None, :, None] if e.dim() == 2 else e[..., None]) * vc[1:]
            out_e = out_e + attention.attend(qc[1:], kc[1:], ev)
        return torch.cat([attention.attend(qc[:1], kc[:1], vc[:1]), out_e])

    def step_callback(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """After UNet call i: close the store's step and apply LocalBlend at the call's schedule row."""
        self.store.end_step()
        return self.blend(self.row(i), x, self.store) if self.blend is not None else x
