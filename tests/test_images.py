"""Photos in: every Pillow mode, EXIF orientation, the crop offsets (the reference's bug fixed),
no resampling at the right size, and clear errors for files that are not pictures."""
import numpy as np
import pytest
import torch
from PIL import Image

from p2p.images import load_image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def smooth(w=48, h=40) -> np.ndarray:
    """A uint8 (h, w, 3) picture of gradients: smooth, not noise."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1).astype(np.uint8)


def make(mode: str) -> Image.Image:
    rgb = Image.fromarray(smooth())
    grey = np.asarray(rgb.convert("L"), dtype=np.float64)
    if mode == "I;16":
        return Image.fromarray((grey * 257).astype("<u2"))
    if mode == "I":
        return Image.fromarray((grey * 257).astype(np.int32))
    if mode == "F":
        return Image.fromarray((grey / 255).astype(np.float32))
    if mode == "P":
        return rgb.convert("P", palette=Image.ADAPTIVE)
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "L", "I;16", "CMYK", "I", "F", "1"])
def test_every_mode_loads(mode, tmp_path):
    img = make(mode)
    assert img.mode == mode
    for src in (img, None):
        if src is None:  # also through a file where a format keeps the mode
            ext = {"CMYK": "tif", "I;16": "tif", "I": "tif", "F": "tif", "LA": "png"}.get(mode, "png")
            src = tmp_path / f"img.{ext}"
            img.save(src)
        x = load_image(src, 32, 32)
        assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
        assert -1 <= x.min() and x.max() <= 1 and x.std() > 0.05  # a picture, not a flat field
    if mode in ("L", "I;16", "I", "F"):  # high bit depths are scaled to the same grey, not clipped to white
        ref = load_image(make("L"), 32, 32)
        assert (x - ref).abs().max() <= 2 / 127.5


def test_alpha_composited_on_white():
    a = np.zeros((32, 32, 4), np.uint8)
    a[:, :16] = (255, 0, 0, 255)          # opaque red on the left, fully transparent black on the right
    x = load_image(Image.fromarray(a), 32, 32)
    assert torch.allclose(x[0, :, :, :16], torch.tensor([1.0, -1, -1])[:, None, None])
    assert torch.all(x[0, :, :, 16:] == 1)  # white


def test_palette_with_transparency_and_la():
    p = Image.new("P", (32, 32), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.info["transparency"] = 0
    assert torch.all(load_image(p, 32, 32) == 1)
    la = Image.new("LA", (32, 32), (0, 0))  # black, fully transparent
    assert torch.all(load_image(la, 32, 32) == 1)


def test_exif_orientation_is_honoured(tmp_path):
    a = np.zeros((32, 48, 3), np.uint8)    # wide: red on the left, blue on the right
    a[:, :24], a[:, 24:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6                       # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(a).save(path, exif=exif, quality=95)
    x = load_image(path, 32, 32)
    top, bottom = x[0, :, :12].mean((1, 2)), x[0, :, 20:].mean((1, 2))
    assert top[0] > 0.5 and top[2] < -0.5       # upright: the left (red) edge is now on top
    assert bottom[2] > 0.5 and bottom[0] < -0.5
    plain = tmp_path / "plain.jpg"
    Image.fromarray(a).save(plain, quality=95)
    assert load_image(plain, 32, 32)[0, 0, :, :12].mean() > 0.5  # without the tag: red on the left


def test_offsets_top_is_not_clamped_with_left():
    """The reference's `top = min(left, ...)` ignores `top` when left = 0; here the top band is cut."""
    a = np.zeros((42, 32, 3), np.uint8)
    a[:10], a[10:] = RED, BLUE
    x = load_image(Image.fromarray(a), 32, 32, offsets=(0, 0, 10, 0))
    assert torch.all(x[0, 2] == 1) and torch.all(x[0, 0] == -1)  # only blue left; 32x32 exactly
    x = load_image(Image.fromarray(a), 32, 32, offsets=(5, 0, 500, 0))  # clamped: one row left, no crash
    assert x.shape == (1, 3, 32, 32)


def test_right_size_is_not_resampled_and_crop_is_centred():
    a = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = load_image(Image.fromarray(a), 32, 32)
    assert torch.equal(x[0].permute(1, 2, 0), torch.from_numpy(a.astype(np.float32)) / 127.5 - 1)
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, 16:48] = a
    assert torch.equal(load_image(Image.fromarray(wide), 32, 32), x)    # the centre square, untouched
    assert load_image(Image.fromarray(wide), 32, 64).shape == (1, 3, 32, 64)  # aspect kept when H != W


def test_bad_files_name_the_file(tmp_path):
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is not a picture")
    with pytest.raises(ValueError, match="notes.jpg.*not an image"):
        load_image(fake, 32, 32)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png", 32, 32)
    with pytest.raises(ValueError, match="multiples of 16"):
        load_image(Image.new("RGB", (32, 32)), 40, 40, multiple=16)
    with pytest.raises(ValueError, match="offsets"):
        load_image(Image.new("RGB", (32, 32)), 32, 32, offsets=(0, 0, -1, 0))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_float_tiff_with_non_finite_pixels_is_refused_naming_the_file(tmp_path, value):
    a = np.full((32, 32), 0.5, np.float32)
    a[3:5, 7] = value                        # a few bad pixels are as wrong as a file full of them
    path = tmp_path / "nan.tiff"
    Image.fromarray(a, "F").save(path)
    with pytest.raises(ValueError, match=r"nan\.tiff holds 2 non-finite pixel value"):
        load_image(path, 32, 32)
    with pytest.raises(ValueError, match="the image given holds 2 non-finite"):
        load_image(Image.fromarray(a, "F"), 32, 32)
    a[3:5, 7] = 0.25
    Image.fromarray(a, "F").save(path)
    assert load_image(path, 32, 32).isfinite().all()     # finite float pictures still load
