"""The demo grid: edits on the shipped miniature, one row each.

    p2p demo -o demo

Each row is source | Prompt-to-Prompt edit | the edited prompt generated again from the same seed
(the paper's baseline). The evaluation (`python -m p2p.miniature.evaluate`, docs/miniature.md)
measures over 100 seeds what the rows show on one: Replace keeps the object where it was,
regenerating from the same seed does not; with LocalBlend the colour swap keeps the background.
The seeds here were picked for a clear picture. The first row swaps the background word, not the
shape word: on this checkpoint the shape word barely changes the outline an edit keeps (the
template reads the edited object as a square 7% of the time), and neither Reweight nor Refine
shows on most seeds (docs/miniature.md), so they are left out. LocalBlend's mask comes from the
16x16 maps (`BLEND_LEVEL`).
"""
from __future__ import annotations

from pathlib import Path

from p2p import LocalBlend, Replace, edit, generate
from p2p.viz import image_grid, save_image

from . import BLEND_LEVEL

STEPS, GUIDANCE = 20, 5.0

# (what, source prompt, edited prompt, LocalBlend words (source, edited) or None, seed)
ROWS = (
    ("Replace", "a big red circle on a blue background", "a big red circle on a black background", None, 7),
    ("Replace + LocalBlend", "a big yellow triangle on a gray background", "a big white triangle on a gray background",
     (("yellow", "triangle"), ("white", "triangle")), 3),
)


def demo_rows(sd, steps: int = STEPS, guidance: float = GUIDANCE):
    """[(images (3, H, W, 3) uint8, captions (3))], one per ROWS entry."""
    kw = dict(num_steps=steps, guidance_scale=guidance, progress=False)
    rows = []
    for what, src, dst, blend, seed in ROWS:
        out = edit(sd, [src, dst], Replace(), local_blend=LocalBlend(blend, level=BLEND_LEVEL) if blend else None, seed=seed,
                   **kw).images
        base = generate(sd, [dst], seed=seed, **kw).images
        rows.append(([out[0], out[1], base[0]],
                     [f"{src} (seed {seed})", f"{what}: {dst}", "same seed, edited prompt regenerated"]))
    return rows


def write_demo(sd, out_dir, steps: int = STEPS, guidance: float = GUIDANCE) -> Path:
    """Write out_dir/edits.png (ROWS x 3, captioned) and return its path."""
    rows = demo_rows(sd, steps, guidance)
    images = [im for ims, _ in rows for im in ims]
    captions = [c for _, cs in rows for c in cs]
    path = Path(out_dir) / "edits.png"
    save_image(image_grid(images, captions, rows=len(rows), min_size=192, font_size=12), path)
    return path
