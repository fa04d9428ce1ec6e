"""Captioned pictures of coloured shapes whose every caption fact can be read back from the pixels.

`make_sample(seed)` -> (image uint8 (64, 64, 3), caption, facts). One object (or, with probability
`P_TWO`, two) on a flat or striped background, e.g. "a big red circle on a blue background" or
"a small yellow star at the top on a striped background". Same seed, same sample (numpy's PCG64).

Vocabulary (kept small and well separated, so that measurements are unambiguous and a model trained
for under an hour on a 2-core CPU can learn it):
  shapes      circle square triangle star                    (axis-aligned, drawn in a square box)
  colours     red green blue yellow white                    (object palette, `PALETTE`)
  sizes       small (box side 16-22 px), big (30-40 px); no size word: any side 16-40 px
  positions   "at the left / right / top / bottom" (sometimes; otherwise anywhere that fits)
  backgrounds black gray blue (flat) and striped (two greys in 8-px horizontal bands: two latent
              pixels per band once the VAE has downsampled by 4); named in every caption unless
              `p_bg_word` < 1 (then a prompt without one, such as Refine's source, "a big red
              circle", is one the model has seen)
An object is never the colour of its background. `facts["objects"][i]["mask"]` is the object's
exact bool mask (two objects never overlap), so colour, shape, size and position are recoverable.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SHAPES = ("circle", "square", "triangle", "star")
PALETTE = {"red": (230, 30, 30), "green": (30, 190, 40), "blue": (30, 60, 230),
           "yellow": (240, 230, 30), "white": (250, 250, 250)}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (128, 128, 128), "blue": PALETTE["blue"], "striped": None}
STRIPES = ((70, 70, 70), (170, 170, 170))
SIZES = {"small": (16, 22), "big": (30, 40)}
ANY_SIZE = (16, 40)
STRIPE = 8  # band height, px
POSITIONS = ("left", "right", "top", "bottom")
P_SIZE_WORD, P_POSITION_WORD, P_TWO = 0.75, 0.2, 0.1


def shape_polygon(shape: str, cx: float, cy: float, side: float):
    """Vertices (or, for the circle, the bounding box) of `shape` in a side x side box at (cx, cy)."""
    r = side / 2
    if shape == "circle":
        return [(cx - r, cy - r), (cx + r, cy + r)]
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # pointing up
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":  # five points, inner radius 0.45
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return list(zip(cx + rad * np.cos(a), cy + rad * np.sin(a) + 0.1 * r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def shape_mask(shape: str, cx: float, cy: float, side: float, size: int = SIZE) -> np.ndarray:
    """Bool (size, size) mask of the shape, rasterised by PIL (no antialiasing: exact, deterministic)."""
    im = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(im)
    pts = shape_polygon(shape, cx, cy, side)
    if shape == "circle":
        d.ellipse(pts, fill=255)
    else:
        d.polygon(pts, fill=255)
    return np.asarray(im) > 127


def background(name: str, size: int = SIZE) -> np.ndarray:
    if name == "striped":
        y, _ = np.mgrid[:size, :size]
        band = (y // STRIPE) % 2
        return np.where(band[..., None] == 0, STRIPES[0], STRIPES[1]).astype(np.uint8)
    return np.broadcast_to(np.array(BACKGROUNDS[name], np.uint8), (size, size, 3)).copy()


def background_colours(name: str) -> list:
    return list(STRIPES) if name == "striped" else [BACKGROUNDS[name]]


def _place(rng, side: int, position: str | None, size: int):
    """Centre of a side x side box inside the image, in the named half if a position is given."""
    lo, hi = side / 2 + 1, size - side / 2 - 1
    cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
    m = size / 2
    if position == "left":
        cx = rng.uniform(lo, max(lo, m - side / 4))
    elif position == "right":
        cx = rng.uniform(min(hi, m + side / 4), hi)
    elif position == "top":
        cy = rng.uniform(lo, max(lo, m - side / 4))
    elif position == "bottom":
        cy = rng.uniform(min(hi, m + side / 4), hi)
    return float(cx), float(cy)


def describe(obj: dict) -> str:
    words = [w for w in (obj["size_word"], obj["colour"], obj["shape"]) if w]
    s = " ".join(words)
    return s + (f" at the {obj['position']}" if obj["position"] else "")


def caption_of(objects: list, bg: str | None) -> str:
    """bg None: the background is not named."""
    art = lambda s: ("an " if s[0] in "aeiou" else "a ") + s  # noqa: E731
    return " and ".join(art(describe(o)) for o in objects) + (f" on a {bg} background" if bg else "")


def make_sample(seed_or_rng=0, size: int = SIZE, p_bg_word: float = 1.0):
    """(image uint8 (size, size, 3), caption, facts). The caption names the background with
    probability p_bg_word. facts: background, bg_word (whether the caption names it), objects (each: shape, colour, size_word, position, side, centre (x, y), mask)."""
    rng = seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)
    bg = str(rng.choice(list(BACKGROUNDS)))
    n = 2 if rng.random() < P_TWO else 1
    img = background(bg, size)
    objects, occupied = [], np.zeros((size, size), bool)
    colours = [c for c in PALETTE if c != bg]
    for k in range(n):
        for _ in range(50):  # rejection sampling: the second object must not touch the first
            shape = str(rng.choice(SHAPES))
            colour = str(rng.choice(colours))
            size_word = str(rng.choice(list(SIZES))) if rng.random() < P_SIZE_WORD else None
            if n == 2:  # two objects: no position words, small or unspecified so both fit
                size_word = "small" if size_word else None
            position = str(rng.choice(POSITIONS)) if (n == 1 and rng.random() < P_POSITION_WORD) else None
            lo, hi = SIZES[size_word] if size_word else ((16, 24) if n == 2 else ANY_SIZE)
            side = int(rng.integers(lo, hi + 1))
            cx, cy = _place(rng, side, position, size)
            mask = shape_mask(shape, cx, cy, side, size)
            grown = shape_mask("square", cx, cy, side + 4, size)
            if not (grown & occupied).any():
                break
        occupied |= mask
        img[mask] = PALETTE[colour]
        objects.append(dict(shape=shape, colour=colour, size_word=size_word, position=position, side=side,
                            centre=(cx, cy), mask=mask))
    named = bool(rng.random() < p_bg_word)  # drawn last: the picture of a seed does not depend on it
    return img, caption_of(objects, bg if named else None), dict(background=bg, bg_word=named, objects=objects)


def word_owners(caption: str, objects: list) -> list:
    """For each word of the caption, the index of the object it describes (its size word, colour or
    shape), or -1 (articles, "and", position and background words)."""
    owners, j = [], 0
    for w in caption.split(" "):
        if w == "and":
            j += 1
        if w == "on":  # the background clause: no object words after it
            j = len(objects)
        o = objects[j] if j < len(objects) else None
        owners.append(j if o is not None and w in (o["size_word"], o["colour"], o["shape"]) else -1)
    return owners


def make_dataset(n: int, seed: int = 0, size: int = SIZE, layout: bool = False, p_bg_word: float = 1.0):
    """n samples from seeds seed*10**7 + i: uint8 (n, size, size, 3) and a list of captions; with
    `layout`, also bool (n, 2, size, size) object masks (second all False for one object) and int8
    (n, 77) owners: for token k of the tokenized caption (k = word index + 1: every word of the
    vocabulary is one CLIP token, after the start token), the object it describes or -1."""
    imgs, caps = np.empty((n, size, size, 3), np.uint8), []
    masks, owners = np.zeros((n, 2, size, size), bool), np.full((n, 77), -1, np.int8)
    for i in range(n):
        im, cap, f = make_sample(seed * 10**7 + i, size, p_bg_word)
        imgs[i] = im
        caps.append(cap)
        if layout:
            for j, o in enumerate(f["objects"]):
                masks[i, j] = o["mask"]
            w = word_owners(cap, f["objects"])
            owners[i, 1:1 + len(w)] = w
    return (imgs, caps, masks, owners) if layout else (imgs, caps)
