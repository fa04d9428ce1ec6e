"""A tiny PIE-Bench-format data folder made on the spot: three 64x64 pictures, bracketed prompts, RLE masks,
laid out as the real one (DATA/mapping_file.json, DATA/annotation_images/<type folder>/<id>.png)."""
import json
from pathlib import Path

import numpy as np
from PIL import Image

from p2p.bench.metrics import METRICS

SIDE = 64

# id -> (editing_type_id, image_path, original_prompt, editing_prompt, blended_word, mask box (top, bottom, left, right))
ENTRIES = {
    "000000000000": ("0", "0_random_140/000000000000.png", "a cat sitting on a [wooden] chair",
                     "a cat sitting on a [metal] chair", "chair chair", (30, 60, 10, 50)),
    "111000000000": ("1", "1_change_object_80/1_artificial/1_animal/111000000000.png",
                     "a [cat] sitting on a chair", "a [dog] sitting on a chair", "cat dog", (8, 40, 16, 48)),
    "900000000000": ("9", "9_change_style_80/1_artificial/1_animal/900000000000.png",
                     "[a photo of] a house by a lake", "[a watercolor painting of] a house by a lake", "",
                     (0, SIDE, 0, SIDE)),
}


def encode_rle(mask: np.ndarray) -> list[int]:
    """(start, length) pairs of the runs of 1 in row-major order: PIE-Bench's mask code."""
    flat = np.concatenate([[0], mask.reshape(-1).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


def box_mask(box) -> np.ndarray:
    top, bottom, left, right = box
    m = np.zeros((SIDE, SIDE), dtype=np.uint8)
    m[top:bottom, left:right] = 1
    return m


def picture(seed: int) -> np.ndarray:
    """Smooth colour gradients and a disc: a picture, not noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIDE, 0:SIDE] / (SIDE - 1)
    a, b, c = rng.uniform(0.2, 0.8, 3)
    disc = ((x - a) ** 2 + (y - b) ** 2 < 0.08).astype(float)
    rgb = np.stack([x * c + disc * 0.5, y * (1 - c) + disc * 0.2, (1 - x) * 0.6 + disc * 0.3], -1)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def entry_json(item) -> dict:
    type_id, path, src, tgt, blend, box = item
    return {"image_path": path, "original_prompt": src, "editing_prompt": tgt,
            "editing_instruction": f"edit it ({type_id})", "editing_type_id": type_id, "blended_word": blend,
            "mask": encode_rle(box_mask(box))}


def make_pie(root: Path, entries: dict = ENTRIES) -> Path:
    """Write the folder; its path."""
    root = Path(root)
    for i, (key, item) in enumerate(entries.items()):
        path = root / "annotation_images" / item[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture(i)).save(path)
    mapping = {key: entry_json(item) for key, item in entries.items()}
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root


class PixelEvaluator:
    """A stand-in with metrics.Evaluator's interface, measuring the unedited region with numpy alone (MSE and
    PSNR over the frame with the edited region blacked out in both, as the official masking): it lets the
    run / eval / report plumbing be tested without the metric networks. NaN where no pixel is unedited."""
    def __init__(self, names=("psnr_unedit_part", "mse_unedit_part")):
        self.names = names
        self.skipped = {m: "not computed by this stand-in" for m in METRICS if m not in names}
        self.calls = []

    def __call__(self, source, edited, mask, source_prompt, target_prompt):
        self.calls.append((source_prompt, target_prompt))
        keep = (1 - mask)[..., None]
        if keep.sum() == 0:
            return {m: float("nan") for m in self.names}
        mse = float(np.mean(((source / 255.0 - edited / 255.0) * keep) ** 2))
        values = {"mse_unedit_part": mse, "psnr_unedit_part": 10 * np.log10(1 / max(mse, 1e-12)),
                  "ssim_unedit_part": 1 - mse}
        return {m: float(values[m]) for m in self.names}
