"""Pictures: image grids with captions, the sweep's labelled table, cross-attention heatmaps per token,
self-attention components.

PIL and numpy only. The heatmaps follow the reference's show_cross_attention (map * 255 / max,
truncated to uint8, grey, resized to 256) and show_self_attention_comp (SVD of the self-attention
map minus its row means, top rows of V^T), so pictures can be compared with the paper's figures.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from weights_tools.files import write_bytes_atomic

WHITE, BLACK = 255, (0, 0, 0)


def _to_numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _to_uint8_rgb(image) -> np.ndarray:
    """A PIL image, or an (H, W) / (H, W, 1|3|4) array, as uint8 (H, W, 3)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    a = _to_numpy(image)
    if a.dtype != np.uint8:
        raise TypeError(f"images must be uint8 (0..255), got {a.dtype}; see p2p.pipeline.to_uint8")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {a.shape}")
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a[..., :3]


# ----------------------------------------------------------------------------- grids
def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)   # Pillow >= 10.1: a scalable bundled font
    except TypeError:
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a single word wider than that is cut by characters (each
    line the longest prefix that fits, found in O(log) measurements of at most twice its length)."""
    fits = lambda t: draw.textlength(t, font=font) <= width
    lines: list[str] = []
    for word in text.split():
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] += f" {word}"
            continue
        while word:
            cut = _longest_prefix(word, fits)
            lines.append(word[:cut])
            word = word[cut:]
    return lines or [""]


def _longest_prefix(word: str, fits) -> int:
    """The largest k with fits(word[:k]) (1 where no prefix fits): doubling k while it fits, then a
    binary search between the last k that fit and the first that did not."""
    lo = 1
    while lo < len(word) and fits(word[:min(2 * lo, len(word))]):
        lo = min(2 * lo, len(word))
    hi = min(2 * lo, len(word))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(word[:mid]):
            lo = mid
        else:
            hi = mid
    return lo


def image_grid(images, captions: Sequence[str] | None = None, rows: int = 1, pad: int = 4,
               font_size: int = 14, min_size: int = 0) -> Image.Image:
    """Images side by side in `rows` rows on white, each with its caption (wrapped) under it.

    images: uint8 (N, H, W, 3) or a list of same-sized uint8 arrays / PIL images. Empty cells of the
    last row stay white. The caption band is as tall as the longest wrapped caption. Images smaller
    than `min_size` are enlarged by an integer factor (nearest neighbour: pixels stay pixels).
    """
    images = [_to_uint8_rgb(im) for im in images]
    if images and min_size and images[0].shape[0] < min_size:
        k = -(-min_size // images[0].shape[0])
        images = [im.repeat(k, axis=0).repeat(k, axis=1) for im in images]
    if not images:
        raise ValueError("no images to put in a grid")
    H, W = images[0].shape[:2]
    if any(im.shape[:2] != (H, W) for im in images):
        raise ValueError(f"all images must have the same size, got {sorted({im.shape[:2] for im in images})}")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    cols = -(-len(images) // rows)

    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(probe, str(c), font, W - 2) for c in captions] if captions is not None else []
    line_h = int(font_size * 1.25) + 1
    cap_h = max((len(lines) for lines in wrapped), default=0) * line_h + (pad if wrapped else 0)

    cell_h = H + cap_h
    grid = Image.new("RGB", (cols * W + (cols + 1) * pad, rows * cell_h + (rows + 1) * pad), (WHITE,) * 3)
    draw = ImageDraw.Draw(grid)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        x, y = pad + c * (W + pad), pad + r * (cell_h + pad)
        grid.paste(Image.fromarray(im), (x, y))
        for n, line in enumerate(wrapped[k] if wrapped else []):
            w = draw.textlength(line, font=font)
            draw.text((x + (W - w) / 2, y + H + pad // 2 + n * line_h), line, fill=BLACK, font=font)
    return grid


# ----------------------------------------------------------------------------- labelled tables
def _table_layout(probe, font, size: int, captions, row_labels, col_labels) -> dict:
    """Where sweep_figure puts things: the row-label column's width and the band heights."""
    pad = 6
    n_head = max([len([ln for t in ts for ln in _wrap(probe, t, font, size)]) for ts in col_labels] + [1])
    return dict(pad=pad, size=size, title_h=24, head_h=18 * n_head + 6,
                cap_h=4 + 13 * max((len(c) for row in captions for c in row if c), default=2),
                label_w=max([int(probe.textlength(t, font=font)) for ts in row_labels for t in ts] + [60]) + 2 * pad)


def _draw_tile(fig, d, x: int, y: int, tile, caption: list[str], L: dict, font, small) -> None:
    """One tile resized (nearest) with its caption lines under it, or an empty frame saying "not run"."""
    size = L["size"]
    if tile is None:
        d.rectangle([x, y, x + size - 1, y + size - 1], outline=(200, 200, 200))
        d.text((x + 8, y + size // 2 - 7), "not run", fill=(150, 150, 150), font=font)
        return
    fig.paste(tile.resize((size, size), Image.NEAREST), (x, y))
    for n, line in enumerate(caption):
        d.text((x, y + size + 2 + 13 * n), line, fill="black", font=small)


def sweep_figure(title: str, tiles, captions, sources, row_labels, col_labels, min_size: int = 128,
                 legend: Sequence[str] = ()) -> Image.Image:
    """A labelled table of pictures: `title` on top, a "source" column, then one column per swept value.

    tiles: rows of PIL images, None where a cell did not run (drawn as an empty frame); captions: the
    same rows of caption lines (small type); sources: one image (or None) per row, for the left
    column; row_labels / col_labels: lines of text per row / per column (column labels wrap to the
    tile width); legend: lines under the table saying what the captions' numbers are. Tiles are
    resized (nearest) to the widest tile, at least `min_size`.
    """
    images = [t for row in tiles for t in row if t is not None]
    font, small = _font(13), _font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    L = _table_layout(probe, font, max(min_size, max((t.size[0] for t in images), default=min_size)),
                      captions, row_labels, col_labels)
    pad, size, top = L["pad"], L["size"], L["title_h"] + L["head_h"]
    table_h = top + len(row_labels) * (size + L["cap_h"] + pad)
    width = max([L["label_w"] + (len(col_labels) + 1) * (size + pad) + pad]
                + [int(probe.textlength(t, font=small)) + 2 * pad for t in legend])
    fig = Image.new("RGB", (width, table_h + pad + 13 * len(legend) + (pad if legend else 0)), "white")
    d = ImageDraw.Draw(fig)
    for n, line in enumerate(legend):
        d.text((pad, table_h + pad + 13 * n), line, fill=(60, 60, 60), font=small)
    d.text((pad, 4), title, fill="black", font=font)
    d.text((L["label_w"] + 2, top - 18), "source", fill="black", font=font)
    for c, texts in enumerate(col_labels):
        lines = [ln for t in texts for ln in _wrap(probe, t, font, size)]
        for n, line in enumerate(lines):
            d.text((L["label_w"] + (c + 1) * (size + pad) + 2, L["title_h"] + n * 18), line, fill="black", font=font)
    for r, texts in enumerate(row_labels):
        y = top + r * (size + L["cap_h"] + pad)
        for n, t in enumerate(texts):
            d.text((pad, y + size // 2 - 9 * len(texts) + 18 * n), t, fill="black", font=font)
        if sources[r] is not None:
            fig.paste(sources[r].resize((size, size), Image.NEAREST), (L["label_w"], y))
        for c, tile in enumerate(tiles[r]):
            _draw_tile(fig, d, L["label_w"] + (c + 1) * (size + pad), y, tile, captions[r][c], L, font, small)
    return fig


# ----------------------------------------------------------------------------- cross-attention
def prompt_tokens(tokenizer, prompt: str) -> list[str]:
    """The text of each token the text encoder sees: ["<|startoftext|>", "a", ..., "<|endoftext|>"].

    Column k of a cross-attention map belongs to entry k. Tokens are decoded one at a time (a
    word of several tokens shows as its pieces, e.g. "cr", "out", "ons").
    """
    ids = [tokenizer.bos] + tokenizer.encode(prompt)[:tokenizer.length - 2] + [tokenizer.eos]
    return [tokenizer.decode([i]).strip() for i in ids]


def jet(x: np.ndarray) -> np.ndarray:
    """The 'jet' colormap: values in [0, 1] -> uint8 RGB (blue, cyan, yellow, red)."""
    x = np.clip(x, 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * x - np.array([3, 2, 1])), 0, 1)
    return (rgb * 255).astype(np.uint8)


def heatmap(m, size: int = 256, image=None, alpha: float = 0.5, resample=Image.BICUBIC) -> np.ndarray:
    """One map (res, res) -> uint8 (size, size, 3).

    Without `image`: the reference's picture, 255 * m / max(m) truncated to uint8, grey, resized.
    (Values below 0, which a negative Reweight can leave, show as black; an all-zero map is black.)
    With `image`: the normalised map through `jet`, blended with the image resized to `size`.
    """
    m = _to_numpy(m).astype(np.float32)
    peak = m.max()
    grey = np.clip(255 * m / peak, 0, 255) if peak > 0 else np.zeros_like(m)
    grey = grey.astype(np.uint8)
    if image is None:
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        return np.array(Image.fromarray(rgb).resize((size, size), resample))
    big = np.asarray(Image.fromarray(grey).resize((size, size), resample)).astype(np.float32) / 255
    base = np.asarray(Image.fromarray(_to_uint8_rgb(image)).resize((size, size), Image.BICUBIC), np.float32)
    return ((1 - alpha) * base + alpha * jet(big)).astype(np.uint8)


def cross_attention_grid(maps, tokens: Sequence[str], size: int = 256, image=None, alpha: float = 0.5,
                         rows: int = 1) -> Image.Image:
    """One heatmap per token, with the token's text under it (the reference's show_cross_attention).

    maps: (res, res, K) averaged cross-attention (e.g. the stored maps for one prompt); the first
    len(tokens) columns are drawn, so pass `prompt_tokens(tokenizer, prompt)` for BOS, the prompt's
    tokens and EOS. `image` (optional) draws each map as a colour overlay on that image.
    """
    maps = _to_numpy(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (res, res, K), got shape {maps.shape}")
    if len(tokens) > maps.shape[-1]:
        raise ValueError(f"{len(tokens)} tokens but the maps have only {maps.shape[-1]} columns")
    tiles = [heatmap(maps[..., k], size, image, alpha) for k in range(len(tokens))]
    return image_grid(tiles, list(tokens), rows=rows)


# ----------------------------------------------------------------------------- self-attention
def self_attention_svd(self_map, res: int, top: int = 10) -> np.ndarray:
    """The top `top` right singular vectors of the centred self-attention map, as (top, res, res).

    Each row (query pixel) has its mean over the keys removed, as the reference's
    `maps - mean(maps, axis=1, keepdims=True)`; the components are then patterns over key pixels.
    Signs are whatever the SVD returns (as in the reference), so a component may come out inverted.
    """
    A = _to_numpy(self_map)
    if A.shape != (res * res, res * res):
        raise ValueError(f"self_map must be ({res * res}, {res * res}) for res={res}, got {A.shape}")
    if not 1 <= top <= res * res:
        raise ValueError(f"top must be in 1..{res * res}, got {top}")
    _, _, Vh = np.linalg.svd(A - A.mean(axis=1, keepdims=True))
    return Vh[:top].reshape(top, res, res)


def self_attention_components(self_map, res: int, top: int = 10, size: int = 256) -> Image.Image:
    """The reference's show_self_attention_comp: each component min-max scaled to 0..255, grey,
    resized to `size`, all side by side in one row."""
    tiles = []
    for v in self_attention_svd(self_map, res, top):
        span = v.max() - v.min()
        grey = (255 * (v - v.min()) / span if span > 0 else np.zeros_like(v)).astype(np.uint8)
        tiles.append(np.asarray(Image.fromarray(grey).convert("RGB").resize((size, size), Image.BICUBIC)))
    return Image.fromarray(np.concatenate(tiles, axis=1))


def attention_pictures(store, images, prompts, tokenizer, level: int | None = None) -> dict:
    """What `p2p edit --show-attention` draws for every prompt: {"attention": [per-token cross-attention
    heatmaps over its image], "self_attention": [top self-attention components]}, as the reference's
    show_cross_attention / show_self_attention_comp. The maps are the down/up layers at `level`
    (store.read_level's rule: None is the deepest, 16x16 for SD v1 at 512 px); self-attention at the
    same side, when those layers were kept (AttentionStore(self_attention=True))."""
    pics = {"attention": [cross_attention_grid(store.level_maps(level, i), prompt_tokens(tokenizer, p), image=images[i])
                          for i, p in enumerate(prompts)]}
    h, w = store.level_maps(level).shape[:2]
    if h == w and store.layers(("up", "down"), False, res=h):
        pics["self_attention"] = [self_attention_components(store.aggregate(h, ("up", "down"), False, i)
                                                            .reshape(h * h, -1), h) for i in range(len(prompts))]
    return pics


def joint_attention_pictures(store, images, prompts, layout, blocks=None) -> dict:
    """The MM-DiT form of `attention_pictures`: for every prompt, one heatmap per whitespace word over its
    image, of the image-to-word block of the joint softmax (p2p.joint_control.JointAttentionStore.word_maps:
    averaged over the steps and `blocks`, None: every kept block) on the (H/16, W/16) token grid. layout:
    p2p.joint_control.model_layout(model)."""
    pics = []
    for i, prompt in enumerate(prompts):
        words, maps = store.word_maps(layout, prompt, i, blocks)
        pics.append(cross_attention_grid(maps, words, image=images[i]))
    return {"attention": pics}


# ----------------------------------------------------------------------------- files
def image_format(path: Path) -> str:
    """Pillow's format name for a picture path, from its extension; an error naming the usable ones."""
    ext = path.suffix.lower()
    formats = Image.registered_extensions()
    if ext not in formats:
        common = ", ".join(e for e in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".gif") if e in formats)
        raise ValueError(f"cannot tell the image format of {str(path)!r} from its extension "
                         f"{ext or '(none)'!r}; use one of {common}")
    return formats[ext]


def image_bytes(img, path: str | os.PathLike, **save_kwargs) -> bytes:
    """A PIL image or uint8 array encoded in the format of `path`'s extension (an unknown one is an error)."""
    fmt = image_format(Path(path))
    if not isinstance(img, Image.Image):
        img = Image.fromarray(_to_uint8_rgb(img))
    if fmt == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def save_image(img, path: str | os.PathLike, **save_kwargs) -> Path:
    """Write a PIL image or uint8 array to `path` atomically: a failure leaves no (partial) file.

    The format comes from the extension; the picture is encoded in memory, written to a temporary
    file in the same folder and renamed over `path`.
    """
    return write_bytes_atomic(path, image_bytes(img, path, **save_kwargs))
