"""Reading the caption's facts back from a picture (generated or drawn by `data.make_sample`).

object_mask: every pixel is given the nearest of the object palette (minus the background's colour)
  and the background's colour(s); object pixels are those nearest an object colour and within
  `MAX_DIST` of it. The largest 4-connected component is kept (specks from the decoder drop out).
colour: the palette colour most object pixels are nearest to.
shape: template matching. Each shape of `data.SHAPES` is drawn into the mask's bounding box (the
  shapes are axis-aligned and drawn in a square box, so the box fixes the template); the shape whose
  template has the highest IoU with the mask wins. On the generator's own pictures colour is exact
  and shape is right for ~98% (the misses are small stars, which rasterise close to a diamond; see
  tests/test_miniature.py).
"""
from __future__ import annotations

import numpy as np

from .data import BACKGROUNDS, PALETTE, SHAPES, background_colours, shape_mask

MAX_DIST = 90.0  # RGB distance: about half the gap between the closest two palette colours


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component (plain BFS: 64x64 images need no scipy)."""
    H, W = mask.shape
    labels = np.zeros((H, W), np.int32)
    best, best_n, cur = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        cur += 1
        stack, n = [(y0, x0)], 0
        labels[y0, x0] = cur
        while stack:
            y, x = stack.pop()
            n += 1
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < H and 0 <= xx < W and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = cur
                    stack.append((yy, xx))
        if n > best_n:
            best, best_n = cur, n
    return labels == best if best else np.zeros_like(mask)


def pixel_classes(img: np.ndarray, bg: str):
    """Per pixel: index into `names` of the nearest candidate colour, and the distance to it."""
    names = [c for c in PALETTE if c != bg]
    cols = [PALETTE[c] for c in names] + background_colours(bg)
    names = names + ["background"] * len(background_colours(bg))
    d = np.linalg.norm(img[..., None, :].astype(np.float32) - np.array(cols, np.float32), axis=-1)
    return names, d.argmin(-1), d.min(-1)


def object_mask(img: np.ndarray, bg: str, largest: bool = True) -> np.ndarray:
    names, idx, dist = pixel_classes(img, bg)
    is_obj = np.array([n != "background" for n in names])[idx] & (dist < MAX_DIST)
    return _largest_component(is_obj) if largest else is_obj


def object_colour(img: np.ndarray, bg: str, mask: np.ndarray | None = None) -> str | None:
    names, idx, _ = pixel_classes(img, bg)
    mask = object_mask(img, bg) if mask is None else mask
    if not mask.any():
        return None
    votes = np.bincount(idx[mask], minlength=len(names))
    return names[int(votes.argmax())]


def bbox(mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def shape_scores(mask: np.ndarray) -> dict:
    """IoU of the mask with each shape's template drawn in the mask's bounding box."""
    if mask.sum() < 4:
        return {s: 0.0 for s in SHAPES}
    x0, y0, x1, y1 = bbox(mask)
    cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)
    out = {}
    for s in SHAPES:
        t = shape_mask(s, cx - 0.5, cy - 0.5, side - 1, mask.shape[0])
        if s == "star":  # the star's box is not its bounding box: fit its height
            t = shape_mask(s, cx - 0.5, cy - 0.5 - 0.05 * side, (side - 1) / 0.95 * 1.0, mask.shape[0])
        out[s] = float((t & mask).sum() / max((t | mask).sum(), 1))
    return out


def object_shape(mask: np.ndarray) -> str | None:
    if mask.sum() < 4:
        return None
    sc = shape_scores(mask)
    return max(sc, key=sc.get)


def centre_and_area(mask: np.ndarray):
    """((x, y) centroid, area in pixels); (None, 0) for an empty mask."""
    if not mask.any():
        return None, 0
    ys, xs = np.nonzero(mask)
    return (float(xs.mean()), float(ys.mean())), int(mask.sum())


def read_facts(img: np.ndarray, bg: str) -> dict:
    """The single object's facts as seen in the pixels (background name is given, not measured)."""
    m = object_mask(img, bg)
    c, a = centre_and_area(m)
    return dict(mask=m, colour=object_colour(img, bg, m), shape=object_shape(m), centre=c, area=a)


__all__ = ["BACKGROUNDS", "object_mask", "object_colour", "object_shape", "shape_scores", "centre_and_area",
           "read_facts"]
