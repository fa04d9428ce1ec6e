"""PIE-Bench's structure distance (Ju et al. 2023, after Tumanyan et al.'s "Splicing ViT Features"): the mean
squared difference of two pictures' DINO ViT-B/8 key self-similarities.

For each picture: resize (shorter side 224, longer side at most 480; bilinear), normalise with ImageNet's mean
and std, run DINO to its last block (block 11 of ViT-B/8's 12, the official `layer=11`), take that block's
attention keys of every token (class token included) with the heads side by side, and form the cosine
similarity of every token pair (N x N; each product of norms clamped at 1e-8). The distance is the mean over the N x N entries of the squared difference.

The official code's quirks, each a keyword with the official behaviour as default (docs/pie-bench-metrics-networks.md):
* `pixel_range=255.0`: the pictures reach the ImageNet normalisation as floats in 0..255, not 0..1, so the
  normalised values reach about +-1100; 1.0 divides by 255 first (DINO's training range).
* `antialias=False`: torchvision 0.13's `Resize` on a tensor (the version the official environment pins) does
  not antialias; torchvision >= 0.17 does by default.
* `size=224`, `max_size=480`: the official resize. `layer=None` reads the file's last block, which is the
  official `layer=11` for ViT-B/8's 12 blocks; the file's own width, depth, patch and grid set the network
  (`models.vit.vit_config`), so a smaller DINO file (tests write tiny random ones) measures the same way.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.vit import VisionTransformer, vit_config

from .inputs import load_weights, open_weights_file, rgb_picture

DINO_FILE = ("DINO's ViT backbone weights, e.g. dino_vitbase8_pretrain.pth (facebookresearch/dino's release, "
             "what torch.hub's dino_vitb8 loads)")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DINO_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")


def load_dino(path, device="cpu") -> VisionTransformer:
    """DINO's released backbone file (keys `cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.*`,
    `norm.*`), fp32 in eval mode; its architecture read from the shapes (heads: width / 64)."""
    src = open_weights_file(path, DINO_FILE)
    absent = [k for k in DINO_KEYS if k not in src.entries]
    if absent:
        raise ValueError(f"{src.where}: not a DINO ViT backbone: lacks {absent} (it holds {list(src.entries)[:4]}...); "
                         f"expected {DINO_FILE}, not a full training checkpoint nor a transformers ViTModel folder")
    with torch.device("meta"):
        model = VisionTransformer(vit_config(src.shapes))
    return load_weights(model, src, {k: k for k in model.state_dict()}, DINO_FILE, device)


def resized_size(height: int, width: int, size: int = 224, max_size: int | None = 480) -> tuple[int, int]:
    """torchvision `Resize(size, max_size)`'s output: the shorter side `size`, the longer in proportion
    (truncated), both shrunk so the longer is at most `max_size`."""
    short, long = sorted((height, width))
    new_short, new_long = size, int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if height <= width else (new_long, new_short)


def dino_input(image: np.ndarray, size: int = 224, max_size: int | None = 480, pixel_range: float = 255.0,
               antialias: bool = False, device="cpu") -> torch.Tensor:
    """uint8 (H, W, 3) -> the normalised (1, 3, h, w) float32 DINO reads."""
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device, torch.float32).permute(2, 0, 1)[None]
    x = x * (pixel_range / 255.0)  # exact for the official 255
    out = resized_size(*x.shape[-2:], size, max_size)
    if out != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=antialias)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (x - mean) / std


def key_self_similarity(keys: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(N, C) keys -> (N, N) cosine similarities, each product of norms clamped at eps."""
    norms = keys.norm(dim=-1, keepdim=True)
    return (keys @ keys.T) / torch.clamp(norms @ norms.T, min=eps)


@torch.no_grad()
def structure_distance(model: VisionTransformer, source: np.ndarray, edited: np.ndarray, layer: int | None = None,
                       size: int = 224, max_size: int | None = 480, pixel_range: float = 255.0,
                       antialias: bool = False) -> float:
    """PIE-Bench's structure distance of two uint8 (H, W, 3) pictures of one size (the paper's tables show
    it x 10^3). `layer`: the block whose keys are compared, None for the last (the official 11 of ViT-B/8).
    The keyword switches are the official quirks (module docstring)."""
    source, edited = rgb_picture(source, "source"), rgb_picture(edited, "edited")
    if source.shape != edited.shape:
        raise ValueError(f"source {source.shape} and edited {edited.shape} differ in size; the official code "
                         "compares pictures of one size (crop or resize the edit first)")
    device = next(model.parameters()).device
    layer = model.cfg.layers - 1 if layer is None else layer
    sims = [key_self_similarity(model.keys(dino_input(p, size, max_size, pixel_range, antialias, device), layer)[0])
            for p in (source, edited)]
    return F.mse_loss(sims[1], sims[0]).item()
