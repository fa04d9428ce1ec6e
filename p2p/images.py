"""Real photographs in: any file or PIL image -> (1, 3, H, W) in [-1, 1] at the model's size.

What the null-text notebook's `load_512` does, with its bug fixed and the cases it never met:
- Modes. Everything becomes RGB. Transparency (RGBA, LA, PA, P with a transparent colour) is
  composited on WHITE, the usual background of a cut-out photo; the reference dropped alpha and
  kept whatever colour the transparent pixels happened to store. 16-bit ('I;16*') is scaled by
  65535; 32-bit 'I' by 255 when its values fit in 0..255, else by 65535 (Pillow opens 16-bit PNGs
  as 'I' or 'I;16' depending on version); 'F' is taken as [0, 1] when it fits, else as 0..255.
  Both are clipped. CMYK, '1', L and the rest go through Pillow's own conversion.
- EXIF orientation is honoured (`ImageOps.exif_transpose`): a phone photo stands upright.
- Crop offsets (left, right, top, bottom) in pixels are cut first. The reference clamps `top`
  with `left` (`top = min(left, h - left - 1)`), so its own example, offsets (0, 0, 200, 0),
  crops nothing from the top; here `top = min(top, h - 1)`.
- Then a centre crop to the target's aspect ratio (a square for the usual H == W, as the
  reference) and a bicubic resize (Pillow's default for `resize`, which the reference relied on).
  An image already at the size asked for is not resampled.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from models.config import check_size

ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white


def open_image(path_or_pil) -> Image.Image:
    """A PIL image from a path or a PIL image; a clear error naming the file otherwise."""
    if isinstance(path_or_pil, Image.Image):
        return finite(path_or_pil, "the image given")
    path = Path(path_or_pil)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        img = Image.open(path)
        img.load()
    except Image.DecompressionBombError as err:
        raise ValueError(f"{path} is too large to open safely ({err}); downscale it first, or raise Pillow's limit "
                         f"(now {Image.MAX_IMAGE_PIXELS} pixels, refused above twice that) in Python with "
                         "`PIL.Image.MAX_IMAGE_PIXELS = N` before editing it") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{path} is not an image Pillow can read ({err})") from None
    return finite(img, str(path))


def finite(img: Image.Image, name: str) -> Image.Image:
    """img, unless it is a float image holding nan or inf (no colour: a float TIFF of NaN is no photo)."""
    if img.mode == "F":
        a = np.asarray(img)
        bad = int(a.size - np.isfinite(a).sum())
        if bad:
            raise ValueError(f"{name} holds {bad} non-finite pixel value(s) (nan or inf) of {a.size}: it is no "
                             "photo; write it again with finite values (a float image is read as 0..1 or 0..255)")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB (uint8); alpha composited on white, high bit depths scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            scale = 65535.0
        elif img.mode == "F":
            scale = 1.0 if a.size and a.min() >= 0 and a.max() <= 1 else 255.0
        else:  # 'I'
            scale = 255.0 if a.size and a.min() >= 0 and a.max() <= 255 else 65535.0
        grey = (np.clip(a / scale, 0, 1) * 255 + 0.5).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("LA", "La", "PA", "RGBa") or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def crop(img: Image.Image, offsets=(0, 0, 0, 0)) -> Image.Image:
    """Cut (left, right, top, bottom) pixels, clamped so at least one pixel is left (the reference's
    clamps, with its top-uses-left bug fixed)."""
    if len(offsets) != 4 or any(int(o) != o or o < 0 for o in offsets):
        raise ValueError(f"offsets are four non-negative integers (left, right, top, bottom), got {offsets}")
    w, h = img.size
    left, right, top, bottom = map(int, offsets)
    left = min(left, w - 1)
    right = min(right, w - left - 1)
    top = min(top, h - 1)
    bottom = min(bottom, h - top - 1)
    return img.crop((left, top, w - right, h - bottom))


def center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """The largest centred box with the aspect ratio width:height (the reference: a square)."""
    w, h = img.size
    if w * height > h * width:  # too wide
        cw, ch = max(1, round(h * width / height)), h
    else:
        cw, ch = w, max(1, round(w * height / width))
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return img if (cw, ch) == (w, h) else img.crop((x0, y0, x0 + cw, y0 + ch))


def load_image(path_or_pil, height: int, width: int, offsets=(0, 0, 0, 0), multiple: int = 1) -> torch.Tensor:
    """A photo as the model's input: (1, 3, height, width) float32 in [-1, 1].

    `multiple`: height and width must be multiples of it (a model's is `sd.cfg.size_multiple`: its
    VAE's downsampling factor times its UNet's)."""
    check_size(height, width, multiple)
    img = open_image(path_or_pil)
    img = ImageOps.exif_transpose(img)
    img = to_rgb(img)
    img = center_crop(crop(img, offsets), height, width)
    if img.size != (width, height):
        img = img.resize((width, height), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()) / 127.5 - 1  # (H, W, 3)
    return x.permute(2, 0, 1)[None].contiguous()
