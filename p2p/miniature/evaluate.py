"""Measure the miniature model and Prompt-to-Prompt's claims on it, from the pixels.

    python -m p2p.miniature.evaluate --seeds 100 [--checkpoint PATH|NAME] [--steps 20] [--guidance 5]

For seed s an evaluation prompt is drawn (`eval_case(s)`: a big object, a colour, a flat background)
and the initial noise is manual_seed(s), as `p2p.generate` draws it. Measured (see measure.py):
  fidelity   the generated object's colour and shape against the caption
  replace    "<shape>" -> "square" (the source shape is never square): the edited object's centre
             shift (px) and |log area ratio| against the source's, with Prompt-to-Prompt (Replace)
             and with the fixed-seed baseline (generate the edited prompt from the same seed); and
             (with replace or blend) how much of the source's colour and shape words' 16x16
             cross-attention falls on the object, against the share of the picture it covers
  blend      colour word swapped (Replace + LocalBlend on the colour and shape words, its mask from
             the 16x16 maps, BLEND_LEVEL): PSNR of the background (outside both objects' masks,
             dilated 2 px) against the source's; also with the mask from the deepest (8x8) maps, the
             reference's choice for SD, without LocalBlend and for the baseline (a seed whose objects
             leave no background in one of these is left out of all four: n counts the rest); and
             how often the new colour is the object's
  reweight   Reweight of "big" with c in -2..2 (P2P): object area / source area
  refine     "a big red circle" -> "... on a striped background" (Refine): object mask IoU with the
             source's, P2P and baseline; how often the background came out striped
  decoder    (opt-in, `--parts decoder`) how far the VAE decoder carries a latent change: the pixel
             change in the picture's outer 8-px frame when only the central 8x8 latents are swapped
             for the colour-swapped prompt's (a floor under what LocalBlend can keep)
Prints a markdown table; `--json` also writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from models.clip import default_tokenizer
from p2p import LocalBlend, Refine, Replace, Reweight, edit, generate
from p2p.align import word_token_indices
from p2p.metrics import iou, psnr
from p2p.pipeline import initial_latent, to_uint8
from weights_tools import load_checkpoint
from weights_tools.files import write_bytes_atomic

from . import BLEND_LEVEL, NAME, measure as M
from .data import BACKGROUNDS, PALETTE, SHAPES, STRIPES, background_colours

FLAT = tuple(b for b in BACKGROUNDS if b != "striped")
C_VALUES = (-2.0, -1.0, 0.0, 1.0, 2.0)
STRIPE_DIST = 45.0  # RGB distance to a stripe grey
PARTS = ("fidelity", "replace", "blend", "reweight", "refine")  # the default
ALL_PARTS = PARTS + ("decoder",)  # the decoder's spread is opt-in


def eval_case(seed: int) -> dict:
    """A single big object on a flat background, and a second colour for the colour swap."""
    rng = np.random.default_rng(10**6 + seed)
    bg = str(rng.choice(FLAT))
    colours = [c for c in PALETTE if c != bg]
    colour, colour2 = (str(c) for c in rng.choice(colours, 2, replace=False))
    shape = str(rng.choice([s for s in SHAPES if s != "square"]))
    return dict(seed=seed, bg=bg, colour=colour, colour2=colour2, shape=shape,
                prompt=f"a big {colour} {shape} on a {bg} background")


def x_T(sd, seed: int) -> torch.Tensor:
    h = sd.cfg.default_height
    return initial_latent(sd, seed, h, h)


def generate_many(sd, prompts, seeds, steps, guidance, chunk=16) -> np.ndarray:
    """generate() for (prompt, seed) pairs, batched: each row starts from its own seed's x_T."""
    out = []
    for i in range(0, len(prompts), chunk):
        lat = torch.cat([x_T(sd, s) for s in seeds[i:i + chunk]])
        out.append(generate(sd, prompts[i:i + chunk], latents=lat, num_steps=steps, guidance_scale=guidance,
                            progress=False).images)
    return np.concatenate(out)


def dilate(mask: np.ndarray, r: int = 2) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def colour_mask(img, colour: str, bg: str | None) -> np.ndarray:
    """Pixels nearest to `colour` among the palette and the background colour(s) (all backgrounds
    when `bg` is None), within MAX_DIST; largest component."""
    cols = dict(PALETTE)
    bgs = [*STRIPES, BACKGROUNDS["black"], BACKGROUNDS["gray"]] if bg is None else background_colours(bg)
    cols.update({f"bg{i}": c for i, c in enumerate(bgs) if c not in PALETTE.values()})
    names = list(cols)
    d = np.linalg.norm(img[..., None, :].astype(np.float32) - np.array([cols[n] for n in names], np.float32), axis=-1)
    m = (d.argmin(-1) == names.index(colour)) & (d.min(-1) < M.MAX_DIST)
    return M._largest_component(m)


def is_striped(img, mask) -> bool:
    """The background (outside the object, dilated 2 px) reads as the training stripes: at least 80%
    of its pixels lie within STRIPE_DIST of one of the two stripe greys, and each grey covers at
    least a quarter of it (a flat gray, 128, is 73 away from both)."""
    bgpix = ~dilate(mask)
    if not bgpix.any():
        return False
    d = np.linalg.norm(img[bgpix][:, None, :].astype(np.float32) - np.array(STRIPES, np.float32), axis=-1)
    near = d.min(-1) < STRIPE_DIST
    which = d.argmin(-1)[near]
    return bool(near.mean() >= 0.8 and min((which == 0).mean(), (which == 1).mean()) >= 0.25)


@torch.no_grad()
def decoder_spread(sd, z_a, z_b, block: int = 8) -> float:
    """Mean |pixel change| (0-255) in the outer 8-px frame of the picture when only the central
    block x block latents of z_a are replaced by z_b's: what LocalBlend cannot keep, since a blend
    mask acts on latents and the decoder carries a latent change this far."""
    z = z_a.clone()
    h, w = z.shape[-2:]
    y0, x0 = (h - block) // 2, (w - block) // 2
    z[..., y0:y0 + block, x0:x0 + block] = z_b[..., y0:y0 + block, x0:x0 + block]
    a, b = (to_uint8(sd.decode(v))[0].astype(np.float32) for v in (z_a, z))
    frame = np.ones(a.shape[:2], bool)
    frame[8:-8, 8:-8] = False
    return float(np.abs(a - b)[frame].mean())


def attention_on_object(store, prompt, words, mask) -> tuple[float, float]:
    """How localised the source's cross-attention is: the share of the words' maps (head, layer and
    step mean at the finest stored side, up and down; mean over the words) that falls on the
    object's cells (a cell is on it if any of its pixels is, as `train.layout_loss` counts), and
    the share of cells on the object (what a map spread evenly would score)."""
    side = max(s.h for s in store.sites.values() if s.is_cross)
    maps = store.aggregate(side, ("up", "down"), True, select=0)  # (side, side, 77)
    f = mask.shape[0] // side
    on = torch.from_numpy(mask.reshape(side, f, side, f).any((1, 3)))
    cols = [k for w in words for k in word_token_indices(default_tokenizer(), prompt, w)]
    m = maps[..., cols]
    return float((m[on].sum(0) / m.sum((0, 1)).clamp_min(1e-12)).mean()), float(on.float().mean())


def background_psnrs(src, src_mask, images, bg) -> list | None:
    """PSNR (dB, capped at 60) of each picture against the source over the background: outside the
    source's object and the picture's, both dilated 2 px. None when the objects leave no background
    in one of them, so that every picture is compared on a seed or none is."""
    keeps = [~dilate(src_mask | M.object_mask(im, bg)) for im in images]
    if not all(k.any() for k in keeps):
        return None
    return [min(psnr(src, im, k), 60.0) for im, k in zip(images, keeps)]


def shift_and_scale(src_mask, mask):
    (cs, a_s), (c, a) = M.centre_and_area(src_mask), M.centre_and_area(mask)
    if cs is None or c is None:
        return None, None
    return math.dist(cs, c), abs(math.log(a / a_s))


def colour_swap(case: dict) -> str:
    return case["prompt"].replace(case["colour"], case["colour2"])


def run(sd, seeds, steps=20, guidance=5.0, parts=PARTS, progress=True) -> dict:
    """Every measurement of `parts` (fidelity always) on `seeds`: {name: [one number per seed]}."""
    cases = [eval_case(s) for s in seeds]
    kw = dict(num_steps=steps, guidance_scale=guidance, progress=False)
    R = {k: [] for k in ("colour_ok", "shape_ok", "found", "rep_shift_p2p", "rep_scale_p2p", "rep_shift_base",
                         "rep_scale_base", "rep_target_p2p", "rep_target_base", "psnr_blend", "psnr_blend_deep", "psnr_p2p",
                         "psnr_base", "blend_colour_ok", "refine_iou_p2p", "refine_iou_base", "refine_striped_p2p",
                         "refine_striped_base", "decoder_spread", "maps_inside", "maps_area")}
    R.update({f"area_c{c:g}": [] for c in C_VALUES})
    src = generate_many(sd, [c["prompt"] for c in cases], seeds, steps, guidance)
    src_masks = [M.object_mask(im, c["bg"]) for im, c in zip(src, cases)]
    for im, c, m in zip(src, cases, src_masks):
        R["found"].append(bool(m.sum() >= 8))
        R["colour_ok"].append(M.object_colour(im, c["bg"], m) == c["colour"])
        R["shape_ok"].append(M.object_shape(m) == c["shape"])
    if "replace" in parts or "blend" in parts:
        replace_and_blend(sd, R, cases, src, src_masks, parts, kw, progress)
    if "decoder" in parts:  # opt-in: how far the VAE decoder spreads a latent change
        for c in cases:
            lat = [generate(sd, [p], seed=c["seed"], **kw).latents for p in (c["prompt"], colour_swap(c))]
            R["decoder_spread"].append(decoder_spread(sd, *lat))
    if "reweight" in parts:
        reweight_areas(sd, R, cases, src_masks, kw, progress)
    if "refine" in parts:
        refine_overlaps(sd, R, cases, kw, progress)
    return R


def replace_and_blend(sd, R, cases, src, src_masks, parts, kw, progress) -> None:
    """The "replace" and "blend" parts, and where the source's attention falls (`attention_on_object`)."""
    steps, guidance = kw["num_steps"], kw["guidance_scale"]
    seeds = [c["seed"] for c in cases]
    rep_dst = [c["prompt"].replace(c["shape"], "square") for c in cases]
    col_dst = [colour_swap(c) for c in cases]
    base_rep = generate_many(sd, rep_dst, seeds, steps, guidance) if "replace" in parts else None
    base_col = generate_many(sd, col_dst, seeds, steps, guidance) if "blend" in parts else None
    for i, c in enumerate(tqdm(cases, desc="replace, blend", disable=not progress)):
        # both Replace edits share the source: one batch [source, shape edit, colour edit]
        # (a batch of edits equals each edit alone: tests/test_edit_properties.py)
        P = [c["prompt"]] + [rep_dst[i]] * ("replace" in parts) + [col_dst[i]] * ("blend" in parts)
        res = edit(sd, P, Replace(), seed=c["seed"], **kw)
        out = dict(zip(P[1:], res.images[1:]))
        inside, area = attention_on_object(res.attention, c["prompt"], (c["colour"], c["shape"]), src_masks[i])
        R["maps_inside"].append(inside)
        R["maps_area"].append(area)
        if "replace" in parts:
            for name, im in (("p2p", out[rep_dst[i]]), ("base", base_rep[i])):
                m = M.object_mask(im, c["bg"])
                s, a = shift_and_scale(src_masks[i], m)
                if s is not None:
                    R[f"rep_shift_{name}"].append(s)
                    R[f"rep_scale_{name}"].append(a)
                R[f"rep_target_{name}"].append(M.object_shape(m) == "square")
        if "blend" in parts:
            blend_backgrounds(sd, R, c, src[i], src_masks[i], out[col_dst[i]], base_col[i], kw)


def blend_backgrounds(sd, R, c, src, src_mask, p2p_image, base_image, kw) -> None:
    """The colour swap's background PSNRs: with LocalBlend (its mask from the BLEND_LEVEL maps, and
    from the deepest), without it (`p2p_image`) and the baseline's; and the blended object's colour."""
    words = ((c["colour"], c["shape"]), (c["colour2"], c["shape"]))
    blended, deep = (edit(sd, [c["prompt"], colour_swap(c)], Replace(), local_blend=LocalBlend(words, level=lv),
                          seed=c["seed"], **kw).images[1] for lv in (BLEND_LEVEL, None))
    named = (("blend", blended), ("blend_deep", deep), ("p2p", p2p_image), ("base", base_image))
    db = background_psnrs(src, src_mask, [im for _, im in named], c["bg"])
    for (name, _), v in zip(named, db or ()):
        R[f"psnr_{name}"].append(v)
    R["blend_colour_ok"].append(M.object_colour(blended, c["bg"]) == c["colour2"])


def reweight_areas(sd, R, cases, src_masks, kw, progress) -> None:
    """Reweight of "big" with each c of C_VALUES: the object's area over the source's."""
    for i, c in enumerate(tqdm(cases, desc="reweight", disable=not progress)):
        P = [c["prompt"]] * (1 + len(C_VALUES))
        out = edit(sd, P, Reweight(equalizer={"big": list(C_VALUES)}), seed=c["seed"], **kw).images
        a0 = max(int(src_masks[i].sum()), 1)
        for cv, im in zip(C_VALUES, out[1:]):
            R[f"area_c{cv:g}"].append(M.object_mask(im, c["bg"]).sum() / a0)


def refine_overlaps(sd, R, cases, kw, progress) -> None:
    """Refine "a big <colour> <shape>" -> "... on a striped background": the object's IoU with the
    source's (0.0 when neither has one) and whether the background came out striped, P2P and baseline."""
    P0 = [f"a big {c['colour']} {c['shape']}" for c in cases]
    P1 = [p + " on a striped background" for p in P0]
    base = generate_many(sd, P1, [c["seed"] for c in cases], kw["num_steps"], kw["guidance_scale"])
    for i, c in enumerate(tqdm(cases, desc="refine", disable=not progress)):
        out = edit(sd, [P0[i], P1[i]], Refine(), seed=c["seed"], **kw).images
        m0 = colour_mask(out[0], c["colour"], None)
        for name, im in (("p2p", out[1]), ("base", base[i])):
            m = colour_mask(im, c["colour"], "striped")
            overlap = iou(m0, m)
            R[f"refine_iou_{name}"].append(0.0 if math.isnan(overlap) else overlap)
            R[f"refine_striped_{name}"].append(is_striped(im, m))


def mean(x):
    return float(np.mean(x)) if len(x) else float("nan")


def table(R: dict, n: int) -> str:
    f = lambda k, d=2: f"{mean(R[k]):.{d}f}" if R.get(k) else "-"  # noqa: E731
    rows = [
        ("fidelity: object found (>= 8 px of a palette colour)", f("found"), "", n),
        ("fidelity: colour matches caption", f("colour_ok"), "", n),
        ("fidelity: shape matches caption (template IoU)", f("shape_ok"), "", n),
        ("source: share of the colour and shape words' cross-attention on the object", f("maps_inside"),
         "", len(R["maps_inside"])),
        ("source: share of the picture's latent cells on the object (an even map's share)", f("maps_area"),
         "", len(R["maps_area"])),
        ("replace shape->square: centre shift px (lower = layout kept)", f("rep_shift_p2p", 1), f("rep_shift_base", 1),
         len(R["rep_shift_p2p"])),
        ("replace shape->square: abs log area ratio (lower = size kept)", f("rep_scale_p2p"), f("rep_scale_base"),
         len(R["rep_scale_p2p"])),
        ("replace shape->square: edited object reads as square", f("rep_target_p2p"), f("rep_target_base"),
         len(R["rep_target_p2p"])),
        ("colour swap: background PSNR dB vs source, with LocalBlend (16x16 maps)", f("psnr_blend", 1), "",
         len(R["psnr_blend"])),
        ("colour swap: background PSNR dB vs source, with LocalBlend (8x8 maps, the deepest)", f("psnr_blend_deep", 1),
         "", len(R["psnr_blend_deep"])),
        ("colour swap: background PSNR dB vs source, no LocalBlend", f("psnr_p2p", 1), f("psnr_base", 1),
         len(R["psnr_p2p"])),
        ("colour swap with LocalBlend: object has the new colour", f("blend_colour_ok"), "", len(R["blend_colour_ok"])),
    ]
    rows += [(f"reweight 'big' c={c:g}: area / source area", f(f"area_c{c:g}"), "", len(R[f"area_c{c:g}"]))
             for c in C_VALUES]
    rows += [
        ("decoder: pixel change in the outer 8-px frame, only the central 8x8 latents changed",
         f("decoder_spread", 1), "", len(R["decoder_spread"])),
        ("refine +'on a striped background': object IoU with source", f("refine_iou_p2p"), f("refine_iou_base"),
         len(R["refine_iou_p2p"])),
        ("refine: background came out striped", f("refine_striped_p2p"), f("refine_striped_base"),
         len(R["refine_striped_p2p"])),
    ]
    lines = ["| measurement | Prompt-to-Prompt / model | fixed-seed baseline | n |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows if d]
    return "\n".join(lines)


# per-seed differences the claims test bounds (tests/test_miniature_claims.py): (name, minuend, subtrahend)
PAIRED = (("rep_shift_base-p2p", "rep_shift_base", "rep_shift_p2p"),
          ("rep_scale_base-p2p", "rep_scale_base", "rep_scale_p2p"),
          ("maps_inside-area", "maps_inside", "maps_area"),
          ("psnr_blend-p2p", "psnr_blend", "psnr_p2p"))


def subset_bounds(R: dict, k: int = 12, q: float = 0.001, draws: int = 100_000, seed: int = 0) -> dict:
    """{measurement: (mean, low, high)}: the mean over every seed, and the q and 1 - q quantiles of
    the mean over k seeds drawn without replacement (`draws` draws), the margins a k-seed test of
    the same measurement can assert. Also the per-seed differences in PAIRED. Measurements with
    fewer than 2k seeds are left out."""
    R = dict(R)
    for name, a, b in PAIRED:
        if len(R.get(a, ())) and len(R[a]) == len(R.get(b, ())):
            R[name] = np.asarray(R[a], float) - np.asarray(R[b], float)
    rng = np.random.default_rng(seed)
    out = {}
    for key, v in R.items():
        v = np.asarray(v, float)
        if len(v) < 2 * k:
            continue
        idx = np.argpartition(rng.random((draws, len(v))), k, axis=1)[:, :k]  # k distinct seeds per draw
        means = v[idx].mean(1)
        out[key] = (float(v.mean()), float(np.quantile(means, q)), float(np.quantile(means, 1 - q)))
    return out


GRID_PROMPTS = ("a big red circle on a blue background", "a big yellow square on a black background",
                "a big white triangle on a gray background", "a big green star on a black background",
                "a small red square at the left on a gray background", "a big blue circle on a striped background")


def save_grid(sd, path, seeds=(0, 1, 2, 3), steps=20, guidance=5.0) -> np.ndarray:
    """Rows: GRID_PROMPTS; columns: seeds. Then two rows (seeds[0], seeds[1]) of Replace
    circle -> square on the first prompt: source | P2P | fixed-seed baseline. Upscaled 4x, nearest."""
    rows = [np.concatenate(list(generate_many(sd, [p] * len(seeds), list(seeds), steps, guidance)), 1)
            for p in GRID_PROMPTS]
    P = [GRID_PROMPTS[0], GRID_PROMPTS[0].replace("circle", "square")]
    base = generate_many(sd, [P[1]] * len(seeds), list(seeds), steps, guidance)
    for s, b in zip(seeds[:2], base):  # source | P2P square | fixed-seed square | (blank)
        pair = edit(sd, P, Replace(), seed=s, num_steps=steps, guidance_scale=guidance, progress=False).images
        cells = [pair[0], pair[1], b] + [np.zeros_like(b)] * (len(seeds) - 3)
        rows.append(np.concatenate(cells[:len(seeds)], 1))
    img = np.concatenate(rows, 0)
    Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST).save(path)
    return img


def print_bounds(path) -> None:
    """`--bounds-from`: subset_bounds of a --json file, as a markdown table."""
    R = json.loads(Path(path).read_text())
    print(f"{path}: mean over every seed, and the 0.1% / 99.9% quantiles of the mean of 12 of them\n")
    print("| measurement | mean | 0.1% | 99.9% |\n|---|---|---|---|")
    for key, (m, lo, hi) in subset_bounds(R).items():
        print(f"| {key} | {m:.3f} | {lo:.3f} | {hi:.3f} |")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m p2p.miniature.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=NAME, help="a checkpoint file, or a name in weights_tools.registry "
                    f"(default {NAME!r}: the shipped one)")
    ap.add_argument("--seeds", type=int, default=100, help="evaluate seeds 0..N-1")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(ALL_PARTS)}")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the per-seed numbers here")
    ap.add_argument("--grid", default=None, help="also write a picture grid (GRID_PROMPTS x 4 seeds, and a Replace row)")
    ap.add_argument("--bounds-from", default=None, metavar="JSON",
                    help="evaluate nothing: from a --json file, print each measurement's mean and the 0.1%% and 99.9%% "
                         "quantiles of its mean over 12 seeds (the margins the claims test may assert)")
    return ap


def main(argv=None) -> int:
    ap = parser()
    a = ap.parse_args(argv)
    parts = tuple(a.parts.split(","))
    unknown = [p for p in parts if p not in ALL_PARTS]
    if unknown:
        ap.error(f"--parts: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(ALL_PARTS)}")
    if a.bounds_from:
        print_bounds(a.bounds_from)
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    sd = load_checkpoint(a.checkpoint)
    if a.grid:
        save_grid(sd, a.grid, steps=a.steps, guidance=a.guidance)
        print(f"wrote {a.grid}")
    if a.seeds <= 0:
        return 0
    R = run(sd, list(range(a.seeds)), a.steps, a.guidance, parts)
    print(f"checkpoint {a.checkpoint}, seeds 0..{a.seeds - 1}, DDIM {a.steps} steps, guidance {a.guidance}\n")
    print(table(R, a.seeds))
    if a.json:
        write_bytes_atomic(a.json, json.dumps({k: [float(x) for x in v] for k, v in R.items()}).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
