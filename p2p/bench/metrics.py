"""PIE-Bench's eight default metrics of one edited picture, computed as the benchmark's evaluate.py does.

| metric | of | by |
|---|---|---|
| structure_distance | the source and edited pictures, whole | `structure.structure_distance` (DINO ViT-B/8) |
| psnr / lpips / mse / ssim_unedit_part | both pictures times 1 - mask, whole frames | `pixels`, `lpips` |
| clip_similarity_source_image | the source picture and the source prompt | `clipscore.clip_similarity` |
| clip_similarity_target_image | the edited picture and the target prompt | `clipscore.clip_similarity` |
| clip_similarity_target_image_edit_part | the edited picture times the mask, the target prompt | `clipscore.clip_similarity` |

The mask is 1 on the edited region (the benchmark's decoded mask, its one-pixel frame of ones included: the
caller decodes it). Prompts lose their `[` `]` edit markers, as evaluate.py strips them. A metric of an empty
region (no unedited pixel; no edited pixel for the edit part) is nan, where evaluate.py writes "nan".
A metric whose weight file is not given is skipped, `Evaluator.skipped` saying which file to get.
The official code's quirks are `Conventions` (p2p.bench.conventions), each defaulting to the official behaviour
(docs/pie-bench-metrics.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .clipscore import CLIP_FILE, clip_similarity, load_clip
from .inputs import rgb_picture
from .conventions import Conventions
from .lpips import BACKBONE_FILE, LINEAR_FILE, load_lpips, lpips_unedited
from .pixels import edit_mask, mean_squared_error, peak_signal_noise_ratio, structural_similarity
from .structure import DINO_FILE, load_dino, structure_distance

METRICS = ("structure_distance", "psnr_unedit_part", "lpips_unedit_part", "mse_unedit_part", "ssim_unedit_part",
           "clip_similarity_source_image", "clip_similarity_target_image", "clip_similarity_target_image_edit_part")
CLIP_METRICS = METRICS[5:]


@dataclass(frozen=True)
class MetricFiles:
    """The metric networks' weight files; None skips the metrics that need it."""
    dino: str | None = None               # structure_distance
    clip: str | None = None               # the three CLIP similarities
    lpips_backbone: str | None = None     # lpips_unedit_part, with lpips_linear
    lpips_linear: str | None = None


def skip_reasons(files: MetricFiles) -> dict[str, str]:
    """metric -> why it is skipped: which flag was not given and which file to get."""
    out = {}
    if files.dino is None:
        out["structure_distance"] = f"no --dino: get {DINO_FILE}"
    if files.clip is None:
        out.update({m: f"no --clip: get {CLIP_FILE}" for m in CLIP_METRICS})
    lacking = [f"no --lpips-backbone: get {BACKBONE_FILE}"] * (files.lpips_backbone is None) + [
        f"no --lpips-linear: get {LINEAR_FILE}"] * (files.lpips_linear is None)
    if lacking:
        out["lpips_unedit_part"] = "; ".join(lacking)
    return out


def unmarked(prompt: str) -> str:
    """A PIE-Bench prompt without its edit markers: "a [rusty] bicycle" -> "a rusty bicycle"."""
    return prompt.replace("[", "").replace("]", "")


@dataclass(frozen=True)
class Given:
    """One picture's inputs, checked: uint8 (H, W, 3) pictures, a float (H, W) mask of 0 and 1, bare prompts."""
    source: np.ndarray = field(repr=False)
    edited: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    source_prompt: str = ""
    target_prompt: str = ""


class Evaluator:
    """Loads the networks whose files are given (a given file that is missing or wrong is an error at once),
    then measures (source, edited, mask, source prompt, target prompt) -> {metric: value}."""

    def __init__(self, files: MetricFiles, device="cpu", conventions: Conventions = Conventions()):
        self.files, self.device, self.conventions = files, device, conventions
        self.skipped: dict[str, str] = skip_reasons(files)
        self.dino = load_dino(files.dino, device) if files.dino is not None else None
        self.clip = load_clip(files.clip, device) if files.clip is not None else None
        has_lpips = "lpips_unedit_part" not in self.skipped
        self.lpips = load_lpips(files.lpips_backbone, files.lpips_linear, device) if has_lpips else None

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics this evaluator computes, in METRICS' order."""
        return tuple(m for m in METRICS if m not in self.skipped)

    def __call__(self, source, edited, mask, source_prompt: str, target_prompt: str) -> dict[str, float]:
        source, edited = rgb_picture(source, "source"), rgb_picture(edited, "edited")
        if source.shape != edited.shape:
            raise ValueError(f"source {source.shape} and edited {edited.shape} differ in size; the benchmark "
                             "compares pictures of one size (it crops a wider edited picture to its last 512x512)")
        mask = edit_mask(mask, source.shape)
        given = Given(source, edited, mask, unmarked(source_prompt), unmarked(target_prompt))
        return {m: float(getattr(self, m)(given)) for m in self.metrics}

    # one method per metric, named as the metric
    def structure_distance(self, g: Given) -> float:
        c = self.conventions
        return structure_distance(self.dino, g.source, g.edited, pixel_range=c.dino_pixel_range,
                                  antialias=c.dino_antialias)

    def psnr_unedit_part(self, g: Given) -> float:
        return peak_signal_noise_ratio(g.source, g.edited, g.mask, self.conventions.average)

    def lpips_unedit_part(self, g: Given) -> float:
        return lpips_unedited(self.lpips, g.source, g.edited, g.mask, self.conventions.lpips_norm)

    def mse_unedit_part(self, g: Given) -> float:
        return mean_squared_error(g.source, g.edited, g.mask, self.conventions.average)

    def ssim_unedit_part(self, g: Given) -> float:
        return structural_similarity(g.source, g.edited, g.mask, self.conventions.ssim_border,
                                     self.conventions.average)

    def clip_similarity_source_image(self, g: Given) -> float:
        return clip_similarity(self.clip, g.source, g.source_prompt, keep_eos=self.conventions.clip_keep_eos)

    def clip_similarity_target_image(self, g: Given) -> float:
        return clip_similarity(self.clip, g.edited, g.target_prompt, keep_eos=self.conventions.clip_keep_eos)

    def clip_similarity_target_image_edit_part(self, g: Given) -> float:
        return clip_similarity(self.clip, g.edited, g.target_prompt, mask=g.mask,
                               empty_mask=self.conventions.clip_empty_mask, keep_eos=self.conventions.clip_keep_eos)
