"""p2p.viz: grid geometry, captions, heatmaps, self-attention components, atomic saving."""
import numpy as np
import pytest
import torch
from PIL import Image

from models.clip import default_tokenizer
from p2p.viz import (cross_attention_grid, heatmap, image_grid, prompt_tokens, save_image,
                     self_attention_components, self_attention_svd, sweep_figure)


def solid(n, h=32, w=40, value=0):
    return np.full((n, h, w, 3), value, dtype=np.uint8)


# ----------------------------------------------------------------------------- grids
@pytest.mark.parametrize("n,rows,cols", [(1, 1, 1), (4, 1, 4), (4, 2, 2), (5, 2, 3)])
def test_grid_size_without_captions(n, rows, cols):
    pad = 3
    g = image_grid(solid(n), rows=rows, pad=pad)
    assert g.size == (cols * 40 + (cols + 1) * pad, rows * 32 + (rows + 1) * pad)


def test_grid_places_images_and_leaves_padding_white():
    imgs = np.stack([solid(1, value=v)[0] for v in (10, 20, 30, 40)])
    a = np.asarray(image_grid(imgs, rows=2, pad=2))
    assert (a[2:34, 2:42] == 10).all() and (a[2:34, 44:84] == 20).all()
    assert (a[36:68, 2:42] == 30).all() and (a[36:68, 44:84] == 40).all()
    assert (a[:2] == 255).all() and (a[:, 42:44] == 255).all()


def test_grid_accepts_lists_and_pil_images():
    imgs = [Image.new("RGB", (40, 32)), np.zeros((32, 40, 3), np.uint8), np.zeros((32, 40), np.uint8)]
    assert image_grid(imgs).size == image_grid(solid(3)).size


def test_captions_are_drawn_under_each_image():
    g = np.asarray(image_grid(solid(3, value=0), ["a lion", "", "a painting of a squirrel eating a burger"], pad=4))
    assert g.shape[0] > 32 + 8                                   # a caption band was added
    below = g[4 + 32 + 1:]                                       # the band under the images
    ink = (below < 128).all(-1)                                  # dark text on white
    cell = lambda k: ink[:, 4 + k * 44: 4 + k * 44 + 40]
    assert cell(0).any() and cell(2).any() and not cell(1).any()
    assert cell(2).any(1).sum() > cell(0).any(1).sum()           # the long caption wrapped to more lines


def test_long_caption_is_wrapped_to_the_image_width():
    g = np.asarray(image_grid(solid(2, value=0), ["x" * 60, "y"], pad=4))
    ink = (g[4 + 32 + 1:] < 128).all(-1)
    # no ink in the gap between the two cells: the long caption stayed within its own image
    assert not ink[:, 44:48].any()


def test_grid_errors():
    with pytest.raises(ValueError, match="same size"):
        image_grid([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)])
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        image_grid(solid(3), ["a", "b"])
    with pytest.raises(TypeError, match="uint8"):
        image_grid(np.zeros((1, 8, 8, 3), np.float32))


def test_sweep_figure_places_sources_tiles_and_cells_not_run():
    """2 x 2 swept cells of 16 px drawn at 64 px (nearest), the source column first, one cell not run."""
    red, blue, green = (Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0)))
    fig = sweep_figure("title", [[red, None], [blue, blue]], [[["PSNR 1.0"], []], [["a"], ["b"]]],
                       [green, None], [["row=0"], ["row=1"]], [["col=0"], ["col=1"]], min_size=64)
    # the row-label column is 60 + 2 * 6 px wide (short labels); bands: title 24, one header line 24,
    # one caption line 17; each tile 64 px and a pad of 6
    n, label_w, top = 64, 72, 48
    row_h, col_w = n + 17 + 6, n + 6
    assert fig.size == (label_w + 3 * col_w + 6, top + 2 * row_h + 6)
    a = np.asarray(fig)
    at = lambda r, c: a[top + r * row_h: top + r * row_h + n, label_w + c * col_w: label_w + c * col_w + n]
    assert (at(0, 0) == (0, 255, 0)).all()                      # the first row's source
    assert (at(1, 0) == 255).all()                              # no source for the second row: white
    assert (at(0, 1) == (255, 0, 0)).all() and (at(1, 1) == (0, 0, 255)).all() and (at(1, 2) == (0, 0, 255)).all()
    empty = at(0, 2)
    assert (empty[0] == 200).all() and (empty[-1] == 200).all()   # a grey frame saying "not run" in grey
    assert ((empty == 255).all(-1) | (empty[..., 0] == empty[..., 2])).all() and (empty[1:-1, 1:-1] < 200).any()
    under = lambda c: (a[top + n: top + n + 17, label_w + c * col_w: label_w + c * col_w + n] < 128).all(-1)
    assert under(1).any() and not under(2).any()               # a caption under the red tile, none under "not run"


# ----------------------------------------------------------------------------- cross-attention
def test_prompt_tokens():
    tok = default_tokenizer()
    assert prompt_tokens(tok, "pea soup with croutons") == [
        "<|startoftext|>", "pea", "soup", "with", "cr", "out", "ons", "<|endoftext|>"]


def test_heatmap_of_one_hot_is_bright_exactly_there():
    m = torch.zeros(4, 4)
    m[1, 2] = 0.25                                               # exact in fp32: 255 * m / max == 255
    h = heatmap(m, size=4)                                       # no resampling at the map's own size
    assert h.shape == (4, 4, 3) and h.dtype == np.uint8
    assert (h[1, 2] == 255).all()
    h[1, 2] = 0
    assert (h == 0).all()
    big = heatmap(m, size=64)                                    # 16x upscaling: the bright block moves with it
    peak = np.unravel_index(big[..., 0].argmax(), big.shape[:2])
    assert 16 <= peak[0] < 32 and 32 <= peak[1] < 48
    assert big[:8, :8].max() == 0 and big[-8:, -8:].max() == 0


def test_heatmap_scales_like_the_reference():
    """255 * m / max, truncated to uint8; negative values (a negative Reweight) clip to black."""
    m = np.array([[0.0, 0.1], [0.2, -0.4]], np.float32)
    assert heatmap(m, size=2)[..., 0].tolist() == [[0, 127], [255, 0]]
    assert (heatmap(np.zeros((2, 2)), size=2) == 0).all()       # no division by zero


def test_heatmap_overlay_on_image():
    m = np.zeros((4, 4), np.float32)
    m[0, 0] = 1
    img = np.full((8, 8, 3), 200, np.uint8)
    h = heatmap(m, size=4, image=img, alpha=0.5, resample=Image.NEAREST)
    assert h.shape == (4, 4, 3)
    assert tuple(h[0, 0]) != tuple(h[3, 3])                      # the hot pixel is coloured differently
    assert h[0, 0, 0] > h[0, 0, 2] and h[3, 3, 2] > h[3, 3, 0]   # red where hot, blue where cold


def test_cross_attention_grid_takes_the_first_columns():
    res, K = 8, 77
    maps = torch.rand(res, res, K) * 0.01
    for k in range(3):
        maps[k, k, k] = 1.0                                      # token k peaks at pixel (k, k)
    g = np.asarray(cross_attention_grid(maps, ["<|startoftext|>", "a", "cat"], size=res))
    assert g.shape[1] == 3 * res + 4 * 4                         # three tiles, default pad 4
    for k in range(3):
        tile = g[4:4 + res, 4 + k * (res + 4): 4 + k * (res + 4) + res, 0]
        assert np.unravel_index(tile.argmax(), tile.shape) == (k, k) and tile.max() == 255
    with pytest.raises(ValueError, match="only 77 columns"):
        cross_attention_grid(maps, ["x"] * 78)


# ----------------------------------------------------------------------------- self-attention
def test_self_attention_components_match_numpy_svd_up_to_sign():
    res, top = 6, 5
    g = torch.Generator().manual_seed(0)
    A = torch.softmax(torch.randn(res * res, res * res, generator=g) * 3, -1)
    comps = self_attention_svd(A, res, top)
    a = A.numpy().astype(np.float64)
    _, _, vh = np.linalg.svd(a - a.mean(axis=1, keepdims=True))           # row means, as the reference
    for k in range(top):
        v, ref = comps[k].ravel(), vh[k]
        assert min(np.abs(v - ref).max(), np.abs(v + ref).max()) < 1e-4
    # and not the column means: that gives different components
    _, _, vh_col = np.linalg.svd(a - a.mean(axis=0, keepdims=True))
    assert min(np.abs(comps[0].ravel() - vh_col[0]).max(), np.abs(comps[0].ravel() + vh_col[0]).max()) > 1e-3


def test_self_attention_components_picture():
    res, top = 4, 3
    A = torch.softmax(torch.randn(res * res, res * res), -1)
    comps = self_attention_svd(A, res, top)
    img = np.asarray(self_attention_components(A, res, top=top, size=res))   # no resampling
    assert img.shape == (res, top * res, 3)
    for k, v in enumerate(comps):                                # each tile min-max scaled to 0..255
        expect = (255 * (v - v.min()) / (v.max() - v.min())).astype(np.uint8)
        assert np.array_equal(img[:, k * res:(k + 1) * res, 0], expect)
    assert np.asarray(self_attention_components(A, res, top=top, size=32)).shape == (32, top * 32, 3)
    with pytest.raises(ValueError, match=r"\(16, 16\) for res=4"):
        self_attention_svd(torch.zeros(15, 15), 4)


# ----------------------------------------------------------------------------- saving
def test_save_image_roundtrip(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    p = save_image(a, tmp_path / "sub" / "x.png")
    assert np.array_equal(np.asarray(Image.open(p)), a)
    save_image(Image.fromarray(a).convert("RGBA"), tmp_path / "x.jpg")       # RGBA -> RGB for JPEG
    assert Image.open(tmp_path / "x.jpg").format == "JPEG"
    assert sorted(f.name for f in tmp_path.rglob("*") if f.is_file()) == ["x.jpg", "x.png"]


def test_save_image_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match=r"'\.pngx'.*\.png"):
        save_image(np.zeros((4, 4, 3), np.uint8), tmp_path / "x.pngx")
    with pytest.raises(ValueError, match="'\\(none\\)'"):
        save_image(np.zeros((4, 4, 3), np.uint8), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_save_image_failure_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "out.png"

    def half_then_fail(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_image(np.zeros((4, 4, 3), np.uint8), target)
    assert list(tmp_path.iterdir()) == []                         # no partial file, no temp file


def test_save_image_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    save_image(np.full((4, 4, 3), 7, np.uint8), target)
    before = target.read_bytes()
    monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        save_image(np.zeros((4, 4, 3), np.uint8), target)
    assert target.read_bytes() == before and [f.name for f in tmp_path.iterdir()] == ["out.png"]


def test_sweep_figure_has_a_legend_under_the_table():
    """The captions' abbreviations (IoU, dz, mask, in) are explained in lines under the table."""
    from p2p.sweep.report import caption, legend

    red = Image.new("RGB", (16, 16), (255, 0, 0))
    args = ("title", [[red]], [[["PSNR 1.0"]]], [red], [["row=0"]], [["col=0"]])
    plain = sweep_figure(*args, min_size=64)
    lines = legend({"metrics": {"iou_threshold": 0.3}})
    fig = sweep_figure(*args, min_size=64, legend=lines)
    assert fig.size[1] == plain.size[1] + 13 * len(lines) + 6 and fig.size[0] >= plain.size[0]
    below = np.asarray(fig)[plain.size[1]:]
    assert (below < 128).any()                                   # the legend's text is drawn there
    words = {w for line in caption({"psnr_bg": 1.0, "mask_fraction": 0.5}) for w in line.split() if w.isalpha()}
    assert all(any(line.startswith(w) or f" {w}:" in line or f"{w} (" in line for line in lines) for w in words)
