"""Prompt-to-Prompt on the joint attention of multimodal diffusion transformers (SD3 / SD3.5 MM-DiT blocks,
Flux double- and single-stream blocks), as the official MM-DiT editing code does it (Shin et al., ICCV 2025,
"Exploring Multimodal Diffusion Transformers for Enhanced Prompt-based Image Editing"; docs/mmdit-p2p.md).

In these models there is no cross-attention map to inject: text and image tokens attend in one softmax. The
edit instead hands the edited prompt's row some of the source row's projections before the softmax: by
default ("qiki") the target's IMAGE-token queries and keys become the source's, so its image-to-image logits
are the source's (the layout is kept) while its image queries still meet its own text keys (the content
changes). Only the conditional rows are edited: under classifier-free guidance the batch is
[uncond rows..., cond rows...] and the unconditional target keeps its own projections.

LocalBlend here reads, in chosen blocks and steps, the head-averaged joint softmax of each conditional row
(over all keys, stored before the replacement), averaged over that row's own word columns on the image
rows: one (H/16, W/16) map per row. Every (block, step) entry so far weighs the same; the mean is smoothed
(7x7 Gaussian, sigma 1, zero padding), max-normalised, thresholded with a strict `>` and the rows' masks are
OR-ed; the edited rows keep their latents inside and take the source's outside: x0 + mask (x - x0).

Word columns follow the official code: a word is a whitespace piece of the prompt matched exactly
(punctuation included), and the prompt's tokens, decoded one at a time, are counted in characters against
each piece's length. The text sequence is laid out as the model says (`model_layout`): SD3's 77 CLIP
positions (BOS at 0, so content from 1) then T5's (no BOS; the final </s> is not a word's), Flux's T5 alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models import attention
from models.joint import JointSite

from . import joint_inversion
from .joint_pipeline import joint_generate, model_defaults
from .outputs import Output

# what the target row takes from the source row in each official projection-replacement method
# (SNU-VGILab/exploring-mmdit, utils/dit_utils.py PROJECTION_METHODS): (tensor, tokens) pairs
METHODS = {
    "qiki": (("q", "image"), ("k", "image")),   # the paper's method: image queries and keys
    "qi": (("q", "image"),),                    # image queries only
    "ki": (("k", "image"),),                    # image keys only
    "qk": (("q", "all"), ("k", "all")),         # all queries and keys, text ones included
    "qikt": (("q", "image"), ("k", "text")),    # image queries, text keys
    "qtki": (("q", "text"), ("k", "image")),    # text queries, image keys
    "qtkt": (("q", "text"), ("k", "text")),     # text queries and keys
    "kivi": (("k", "image"), ("v", "image")),   # image keys and values
}

# the official LocalBlend max-pools the map 3x3 on SD3's patch grid before resizing it to the latent grid;
# on Flux's packed tokens it thresholds each token's value as it is (site.kind says which model's block)
POOLED_KINDS = frozenset({"joint"})


def steps_range(fraction, num_steps: int, what: str) -> range:
    """[int(T * start), int(T * end)) for a fraction `end` (start 0) or a (start, end) pair: the official
    floors both (28 steps x 0.2 -> steps 0..4)."""
    pair = (0.0, fraction) if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) else fraction
    try:
        start, end = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a fraction of the steps from 0 to 1 or a (start, end) pair of them, "
                         f"got {fraction!r}") from None
    if not (math.isfinite(start) and math.isfinite(end) and 0 <= start <= end <= 1):
        raise ValueError(f"{what} must satisfy 0 <= start <= end <= 1, got {fraction!r}")
    return range(int(num_steps * start), int(num_steps * end))


def check_blocks(blocks, what: str):
    """None (every block) or a tuple of block indices (official counting, models.joint.JointSite.index)."""
    if blocks is None:
        return None
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        blocks = (blocks,)
    if isinstance(blocks, str) or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks):
        raise ValueError(f"{what} must be None (all blocks) or block indices (ints), got {blocks!r}")
    return tuple(blocks)


@dataclass(frozen=True)
class JointReplace:
    """Projection replacement on joint attention: in steps [int(T start), int(T end)) of `replace_steps`
    (a fraction, start 0, or a (start, end) pair) and in `blocks` (indices in the official counting,
    None: all), each edited conditional row takes the source row's projections that `method` names
    (METHODS; "qiki", the official default: the image tokens' q and k, all heads)."""
    replace_steps: float | tuple = 0.2
    method: str = "qiki"
    blocks: tuple | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"JointReplace method {self.method!r} is not one of {sorted(METHODS)} (the attention-"
                             f"region methods I2I / T2I / I2T / T2T edit the logits, which this hook does not see)")
        steps_range(self.replace_steps, 1, "JointReplace replace_steps")
        object.__setattr__(self, "blocks", check_blocks(self.blocks, "JointReplace blocks"))

    def steps(self, num_steps: int) -> range:
        return steps_range(self.replace_steps, num_steps, "JointReplace replace_steps")

    def applies(self, site: JointSite) -> bool:
        return self.blocks is None or site.index in self.blocks


def token_slice(site: JointSite, tokens: str) -> slice:
    return {"image": site.image, "text": site.text, "all": slice(None)}[tokens]


def replace_projections(method: str, site: JointSite, q, k, v, source: int, targets: range):
    """New (q, k, v) (B, heads, S, d) in which rows `targets` hold the source row's projections that `method`
    names; every other row and entry is the caller's, which are left untouched."""
    out = {"q": q, "k": k, "v": v}
    for name, tokens in METHODS[method]:
        t = out[name].clone()
        s = token_slice(site, tokens)
        t[targets.start:targets.stop, :, s] = t[source:source + 1, :, s]
        out[name] = t
    return out["q"], out["k"], out["v"]


def image_text_probs(q: torch.Tensor, k: torch.Tensor, site: JointSite) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) over the whole joint sequence, averaged over heads, on the image rows and the
    text columns: (B, S_img, S_txt) in fp32. The map is models.attention.attention_probs, the one definition
    (looked up at call time, so an edited one counts here too), one head at a time, so that the (S_img, S)
    logits are never formed for all heads at once."""
    total = 0
    for h in range(q.shape[1]):
        probs = attention.attention_probs(q[:, h:h + 1, site.image].float(), k[:, h:h + 1].float())
        total = total + probs[:, 0, :, site.text]
    return total / q.shape[1]


def word_maps(q: torch.Tensor, k: torch.Tensor, site: JointSite, alpha: torch.Tensor) -> torch.Tensor:
    """(B, S_img) fp32: row i's mean over its word columns (alpha[i] > 0, alpha (B, S_txt)) of softmax(q k^T /
    sqrt(d)) on the image rows, averaged over heads; zeros for a row with no word columns. That mean is the
    attention output for a value column holding 1/n on the word columns, so models.attention.attend forms it
    (the fused kernel while it equals the definition) without the (S_img, S) probabilities: the same maps as
    image_text_probs's column mean to fp32 rounding. The value is padded with zero columns to the head dim d:
    the CPU kernel is several times slower on narrower values."""
    words = (alpha > 0).float()
    w = q.new_zeros(q.shape[0], 1, q.shape[2], q.shape[-1], dtype=torch.float32)
    w[:, 0, site.text, 0] = words / words.sum(-1, keepdim=True).clamp(min=1)
    out = attention.attend(q[:, :, site.image].float(), k.float(), w.expand(-1, q.shape[1], -1, -1))
    return out[..., 0].mean(1)


# ----------------------------------------------------------------------------- word -> text columns
def piece_places(pieces: list[str], word, prompt: str) -> list[int]:
    """Which whitespace pieces `word` names: every piece equal to it (a str of several words: each of them),
    or the piece at an int position."""
    if isinstance(word, int) and not isinstance(word, bool):
        if not -len(pieces) <= word < len(pieces):
            raise ValueError(f"word position {word} is out of range for prompt {prompt!r} ({len(pieces)} words)")
        return [word % len(pieces)]
    if not isinstance(word, str) or not word.split():
        raise ValueError(f"a blend word must be a non-empty str or an int position, got {word!r}")
    places = [i for w in word.split() for i, p in enumerate(pieces) if p == w]
    missing = [w for w in word.split() if w not in pieces]
    if missing:
        raise ValueError(f"word(s) {missing} not in prompt {prompt!r}; its words are {pieces} (matched exactly, "
                         f"punctuation included: write 'fox,' for the piece 'fox,')")
    return places


def word_positions(tokenizer, prompt: str, word, first: int) -> list[int]:
    """Positions of `word`'s tokens in one encoder's segment, as the official get_word_inds: the prompt's
    content tokens decoded one at a time, their characters counted against each whitespace piece's length
    (so "fox," covers "fox" and ","). first: the position of the first content token (1 after CLIP's BOS,
    0 for T5)."""
    pieces = prompt.strip().split()
    places = set(piece_places(pieces, word, prompt))
    out, piece, count = [], 0, 0
    for i, t in enumerate(tokenizer.encode(prompt)):
        if piece >= len(pieces):
            break
        count += len(tokenizer.decode([t]).strip().strip("#"))
        if piece in places:
            out.append(first + i)
        if count >= len(pieces[piece]):
            piece, count = piece + 1, 0
    return out


def model_layout(m) -> list:
    """An MM-DiT model's text layout, (tokenizer, slice of the text sequence) in sequence order, from its
    `text_positions` (tokenizer key -> slice: SD3 {"clip": 0:77, "t5": 77:333}; Flux {"t5": 0:512}) and
    `tokenizers`. SD3's CLIP positions are CLIP-L's tokens (CLIP-G's share the positions)."""
    missing = [key for key in m.text_positions if key not in m.tokenizers]
    if missing:
        raise ValueError(f"the model's text module has no tokenizer {missing} for its text positions "
                         f"{sorted(m.text_positions)}: words cannot be found (load the folder's text encoders)")
    return [(m.tokenizers[key], where) for key, where in sorted(m.text_positions.items(), key=lambda kv: kv[1].start)]


def text_columns(layout, prompt: str, words) -> list[int]:
    """Columns of the joint text sequence holding `words` (a word or a tuple of words) of `prompt`.
    layout: (tokenizer, slice) segments; a tokenizer with a `bos` has its content from position 1."""
    words = (words,) if isinstance(words, (str, int)) else tuple(words)
    cols = []
    for tokenizer, where in layout:
        first = 0 if getattr(tokenizer, "bos", None) is None else 1
        for w in words:
            pos = word_positions(tokenizer, prompt, w, first)
            if any(p >= where.stop - where.start for p in pos):
                raise ValueError(f"word {w!r} of prompt {prompt!r} lies past the {where.stop - where.start} text "
                                 f"positions of its encoder")
            cols += [where.start + p for p in pos]
    return sorted(set(cols))


def blend_alpha(layout, prompts, words) -> torch.Tensor:
    """(P, S_txt): 1 at the text columns of words[i] in prompts[i] (the official alpha_layers)."""
    if isinstance(words, str) or len(words) != len(prompts):
        raise ValueError(f"LocalBlend words must give one word (or tuple of words) per prompt, source first: "
                         f"{len(prompts)} prompts, got {words!r}")
    alpha = torch.zeros(len(prompts), max(where.stop for _, where in layout))
    for i, (prompt, ws) in enumerate(zip(prompts, words)):
        alpha[i, text_columns(layout, prompt, ws)] = 1
    return alpha


# ----------------------------------------------------------------------------- the LocalBlend map
def gaussian_kernel(size: int = 7, sigma: float = 1.0) -> torch.Tensor:
    """(size, size) Gaussian of `sigma` on integer offsets, normalised to sum 1."""
    r = (torch.arange(size) - size // 2).float()
    kernel = torch.exp(-(r[None, :] ** 2 + r[:, None] ** 2) / (2 * sigma ** 2))
    return kernel / kernel.sum()


def smooth(maps: torch.Tensor, grid: tuple[int, int], size: int = 7, sigma: float = 1.0) -> torch.Tensor:
    """(P, S_img) maps smoothed on their (rows, cols) grid with zero padding, which dims the borders."""
    kernel = gaussian_kernel(size, sigma).to(maps)[None, None]
    out = F.conv2d(maps.reshape(maps.shape[0], 1, *grid), kernel, padding=size // 2)
    return out.reshape(maps.shape)


def blend_mask(maps: torch.Tensor, grid: tuple[int, int], latent: tuple[int, int], threshold: float,
               pool: bool) -> torch.Tensor:
    """Smoothed (P, S_img) maps -> bool mask (P - 1, 1, *latent): each edited row's OR the source's.
    pool: 3x3 max-pool on the grid first (SD3). Resizing the grid to the latent by nearest neighbour gives
    each token its 2x2 latent block (SD3's patch, Flux's packed token)."""
    m = maps.reshape(maps.shape[0], 1, *grid)
    if pool:
        m = F.max_pool2d(m, 3, stride=1, padding=1)
    m = F.interpolate(m, size=latent)
    m = m / m.amax(dim=(2, 3), keepdim=True)
    m = m > threshold
    return m[:1] | m[1:]


def apply_blend(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x0 + mask (x - x0) for the edited rows (not a where(): where the mask is 1 the row still moves at the
    rounding level, as the official); the source row is x0."""
    x0 = x[:1]
    return torch.cat([x0, x0 + mask.to(x.dtype) * (x[1:] - x0)])


@dataclass
class JointBlender:
    """The joint LocalBlend of one run: alpha (P, S_txt) word columns, the blocks it reads (None: all),
    the steps it stores and blends in, and the per-(block, step) word maps stored so far."""
    alpha: torch.Tensor
    blocks: tuple | None
    steps: range
    threshold: float
    entries: dict = field(default_factory=dict)   # block index -> list of (P, S_img), one per stored step
    grid: tuple | None = None
    pool: bool = True

    def reads(self, site: JointSite, step: int) -> bool:
        return step in self.steps and (self.blocks is None or site.index in self.blocks)

    def read(self, site: JointSite, q: torch.Tensor, k: torch.Tensor) -> None:
        """Store the word maps of the conditional rows' projections q, k (P, heads, S, d)."""
        self.add(site, word_maps(q, k, site, self.alpha.to(q.device)))

    def add(self, site: JointSite, maps: torch.Tensor) -> None:
        """maps (P, S_img): row i's mean over its own word columns of the head-averaged joint softmax."""
        self.entries.setdefault(site.index, []).append(maps)
        self.grid, self.pool = site.grid, site.kind in POOLED_KINDS

    def aggregate(self) -> torch.Tensor:
        """(P, S_img): the mean of every stored (block, step) entry, blocks in the order first stored, one row at
        a time (each row's entries contiguous, so that the sum runs in the official order: bit-equal maps)."""
        stacked = [torch.stack(e) for e in self.entries.values()]    # per block: (steps, P, S_img)
        return torch.stack([torch.cat([e[:, r] for e in stacked]).mean(0) for r in range(stacked[0].shape[1])])

    def __call__(self, step: int, x: torch.Tensor) -> torch.Tensor:
        if step not in self.steps or not self.entries:
            return x
        mask = blend_mask(smooth(self.aggregate(), self.grid), self.grid, tuple(x.shape[2:]), self.threshold,
                          self.pool)
        return apply_blend(x, mask)


# the official MM-DiT LocalBlend's fraction of the steps it blends in (eta in their Algorithm 1)
END_BLEND = 0.5


def joint_blender(blend, layout, prompts, num_steps: int) -> JointBlender:
    """The JointBlender of a p2p.LocalBlend on an MM-DiT model: its words' columns over the model's text
    layout, its blocks, and the steps [int(T start_blend), int(T end_blend)) (end_blend None: 0.5, the
    official default). The UNet-only fields are refused by name."""
    unet_only = {"substruct_words": blend.substruct_words, "th": blend.th, "level": blend.level}
    given = [k for k, v in unet_only.items() if v is not None] + ([] if blend.pool else ["pool"])
    if given:
        raise ValueError(f"LocalBlend {', '.join(given)}: UNet-only field(s), with no meaning on an MM-DiT model's "
                         f"joint attention; leave them out (blocks= picks the joint blocks the mask reads)")
    end = END_BLEND if blend.end_blend is None else blend.end_blend
    steps = steps_range((blend.start_blend, end), num_steps, "LocalBlend (start_blend, end_blend)")
    return JointBlender(blend_alpha(layout, prompts, blend.words), check_blocks(blend.blocks, "LocalBlend blocks"),
                        steps, blend.threshold)


# ----------------------------------------------------------------------------- maps kept for pictures
@dataclass
class JointAttentionStore:
    """Sums over steps of the image-to-text block of each kept block's joint softmax: (P, S_img, S_txt) per
    block index, head-averaged, for the conditional rows, from the projections before any replacement.

    blocks: the block indices kept (None: all). Pictures read `maps()` / `word_maps()` on the
    (H/16, W/16) token grid."""
    blocks: tuple | None = None
    sums: dict = field(default_factory=dict)     # block index -> (P, S_img, S_txt) sum over the steps kept
    counts: dict = field(default_factory=dict)   # block index -> steps kept
    sites: dict = field(default_factory=dict)    # block index -> JointSite

    def __post_init__(self):
        self.blocks = check_blocks(self.blocks, "JointAttentionStore blocks")

    def wants(self, site: JointSite) -> bool:
        return self.blocks is None or site.index in self.blocks

    def add(self, site: JointSite, probs: torch.Tensor) -> None:
        prev = self.sums.get(site.index)
        self.sums[site.index] = probs if prev is None else prev + probs
        self.counts[site.index] = self.counts.get(site.index, 0) + 1
        self.sites[site.index] = site

    def maps(self, select: int = 0, blocks=None) -> torch.Tensor:
        """Row `select`'s step-averaged maps, averaged over `blocks` (None: all kept): (rows, cols, S_txt)."""
        blocks = sorted(self.sums) if blocks is None else list(check_blocks(blocks, "blocks"))
        missing = [b for b in blocks if b not in self.sums]
        if not blocks or missing:
            raise ValueError(f"no stored maps for blocks {missing or blocks}; kept: {sorted(self.sums)} "
                             f"(keep them with JointAttentionStore(blocks=...))")
        m = torch.stack([self.sums[b][select] / self.counts[b] for b in blocks]).mean(0)
        return m.reshape(*self.sites[blocks[0]].grid, m.shape[-1])

    def word_maps(self, layout, prompt: str, select: int = 0, blocks=None) -> tuple[list[str], torch.Tensor]:
        """(the prompt's whitespace pieces, (rows, cols, pieces)): each piece's mean over its text columns."""
        maps = self.maps(select, blocks)
        pieces = prompt.strip().split()
        cols = [text_columns(layout, prompt, i) for i in range(len(pieces))]
        out = [maps[..., c].mean(-1) if c else maps.new_zeros(maps.shape[:2]) for c in cols]
        return pieces, torch.stack(out, -1)


# ----------------------------------------------------------------------------- the controller
class JointController:
    """What the MM-DiT sampling loop asks at each step i: `override(i)` (the joint attention override for that
    step's transformer call, or None for the plain model) and `after_step(i, x)` (LocalBlend on the latents
    the sampler step returned). prompts[0] is the source, the rest are edited from it.

    The override receives the full transformer batch: P rows, or 2P under classifier-free guidance
    ([uncond..., cond...]); only the last P (conditional) rows are read or edited."""

    def __init__(self, prompts, spec: JointReplace | None, num_steps: int, layout=(), local_blend=None,
                 store: JointAttentionStore | None = None):
        if len(prompts) < 2 and (spec is not None or local_blend is not None):
            raise ValueError(f"an edit needs a source prompt and at least one edited prompt, got {list(prompts)}")
        if spec is not None and not isinstance(spec, JointReplace):
            raise TypeError(f"an MM-DiT model is edited with JointReplace(...), got {type(spec).__name__}")
        self.prompts, self.spec, self.store = list(prompts), spec, store
        self.replace_steps = spec.steps(num_steps) if spec is not None else range(0)
        self.blend = joint_blender(local_blend, layout, self.prompts, num_steps) if local_blend is not None else None

    def override(self, i: int):
        """The attention override of step i, or None where nothing is read or replaced."""
        reads = self.store is not None or (self.blend is not None and i in self.blend.steps)
        if not reads and i not in self.replace_steps:
            return None
        return lambda site, q, k, v: self.attend(i, site, q, k, v)

    def attend(self, i: int, site: JointSite, q, k, v):
        P, B = len(self.prompts), q.shape[0]
        if B not in (P, 2 * P):
            raise ValueError(f"the joint attention batch has {B} rows for {P} prompts: expected {P} (no guidance "
                             f"batch) or {2 * P} ([uncond..., cond...])")
        store = self.store is not None and self.store.wants(site)
        blend = self.blend is not None and self.blend.reads(site, i)
        if store:
            self.store.add(site, image_text_probs(q[B - P:], k[B - P:], site))
        if blend:
            self.blend.read(site, q[B - P:], k[B - P:])
        if i in self.replace_steps and self.spec.applies(site):
            q, k, v = replace_projections(self.spec.method, site, q, k, v, B - P, range(B - P + 1, B))
        return q, k, v

    def check_blocks(self, sites) -> None:
        """Refuse block indices that name no joint attention call of the model (`sites`: its JointSites)."""
        known = sorted(s.index for s in sites)
        for what, blocks in (("JointReplace", self.spec and self.spec.blocks), ("LocalBlend", self.blend and
                             self.blend.blocks), ("JointAttentionStore", self.store and self.store.blocks)):
            unknown = sorted(set(blocks or ()) - set(known))
            if unknown:
                raise ValueError(f"{what} blocks {unknown} name no joint block of this model; its blocks are {known} "
                                 f"(official counting: image-only attn2 layers take an index but are never edited)")

    def after_step(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.blend(i, x) if self.blend is not None else x


# the picture's pixels per image token side that the official MM-DiT LocalBlend builds its mask grid with
# (height // 16 x width // 16): SD3's and Flux's 8x VAE and 2 x 2 patches
OFFICIAL_TOKEN_SIDE = 16


def check_blend_grid(m) -> None:
    """Refuse LocalBlend on a model whose image tokens are not 16 x 16 pixels (diffusers' test pipelines: a 1x
    VAE, 1 x 1 or packed 2 x 2 patches): the official LocalBlend reshapes the maps to (H/16, W/16), which does
    not describe such a model's token grid, so it has no mask to follow there."""
    if m.token_side != OFFICIAL_TOKEN_SIDE:
        raise ValueError(f"LocalBlend needs image tokens of 16 x 16 pixels (the official MM-DiT LocalBlend's "
                         f"H/16 x W/16 mask grid); this {m.family} model's are {m.token_side} x {m.token_side} "
                         f"(a {m.latent_downsample}x VAE, {m.latent_patch} x {m.latent_patch} patches): "
                         "edit without local_blend")


# ----------------------------------------------------------------------------- p2p.edit on an MM-DiT model
# p2p.edit's options that only a UNet takes, with their defaults (an MM-DiT edit refuses any other value)
UNET_ONLY = {"steps_offset": None, "sampler": None, "low_memory": False, "offload": False, "fast": True}


def joint_edit(m, prompts, spec: JointReplace | None = None, *, local_blend=None, store=None, seed: int = 0,
               latents=None, num_steps: int | None = None, guidance_scale: float | None = None,
               height: int | None = None, width: int | None = None, negative_prompt: str = "", progress: bool = True,
               inversion=None, source_row: str | None = None, allow_other_model: bool = False, **unet_only) -> Output:
    """Prompt-to-Prompt on an MM-DiT model (what p2p.edit runs for one): all prompts from the same x_T,
    `spec` (JointReplace) replacing the edited rows' projections, `local_blend` (p2p.LocalBlend) blending
    their latents, `store` (a JointAttentionStore, e.g. JointAttentionStore() for every block) keeping the
    image-to-text maps for pictures (`out.attention`); None keeps none, so that a step neither replacing nor
    blending runs the plain model's fused attention. num_steps / guidance_scale None: the model's own
    (joint_pipeline.model_defaults). `inversion` (p2p.invert's of a photo) edits the photo: x_T, steps and size
    are its own, guidance too unless given, and `source_row` says how the source row follows it
    (p2p.joint_inversion). unet_only: p2p.edit's options that only a UNet takes (UNET_ONLY), refused unless left
    at their defaults."""
    unknown = sorted(set(unet_only) - set(UNET_ONLY))
    if unknown:
        raise TypeError(f"joint_edit() got unexpected keyword arguments {unknown}")
    said = sorted(k for k, v in unet_only.items() if v is not UNET_ONLY[k] and v != UNET_ONLY[k])
    if said:
        raise ValueError(f"{', '.join(said)}: UNet-only option(s) of p2p.edit; an MM-DiT model samples with flow "
                         f"matching on its folder's schedule (leave them out)")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    correction = None
    if inversion is not None:
        num_steps, guidance_scale, height, width, latents = joint_inversion.edit_settings(
            m, inversion, prompts, num_steps, guidance_scale, height, width, latents, negative_prompt,
            allow_other_model)
        correction = joint_inversion.source_correction(inversion, source_row)
    elif source_row is not None:
        raise ValueError(f"source_row={source_row!r} says how the source row follows an inversion: pass inversion=")
    num_steps, guidance_scale = model_defaults(m, num_steps, guidance_scale)
    if local_blend is not None:
        check_blend_grid(m)
    layout = model_layout(m) if local_blend is not None else ()
    controller = JointController(prompts, spec, num_steps, layout, local_blend, store)
    controller.check_blocks(m.joint_sites(height or m.default_size, width or m.default_size))
    return joint_generate(m, prompts, seed=seed, latents=latents, num_steps=num_steps, guidance_scale=guidance_scale,
                          height=height, width=width, negative_prompt=negative_prompt, controller=controller,
                          progress=progress, correction=correction)
