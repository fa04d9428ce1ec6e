"""PIE-Bench's CLIP similarity (Ju et al. 2023): torchmetrics' `CLIPScore` with openai/clip-vit-large-patch14,
100 * max(cos(image embedding, text embedding), 0), of the whole picture or of its edited part.

The picture goes through CLIP's image processor: resized with PIL so its shorter side is 224 (bicubic, the
result rounded to uint8 as PIL returns it), center-cropped to 224 x 224, divided by 255 and normalised with
CLIP's mean and std. The prompt becomes BOS, its BPE tokens, EOS, unpadded; the text embedding is read at the
largest id (EOS).

The official code's quirks, each a keyword with the official behaviour as default (docs/pie-bench-metrics-networks.md):
* the edited part is the full-size picture multiplied by the mask before any resizing, cast back to uint8 by
  truncation (`np.uint8(img * mask)`): the rest of the picture is black, not cut away.
* `empty_mask="nan"`: a mask without a pixel gives nan, as the official evaluate script reports it; "score"
  scores the black picture instead.
* `keep_eos=False`: a prompt longer than 77 ids is cut to its first 77 (torchmetrics), EOS and all, and its
  embedding read at its largest id; True keeps BOS, the first 75 tokens and EOS.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.clip import Tokenizer, default_tokenizer, folder_tokenizer
from models.clip_vision import CLIPPair, CLIPVisionConfig
from models.config import CLIPTextConfig
from models.textfile import read_json

from .inputs import load_weights, open_weights_file, rgb_picture

CLIP_FILE = ("CLIP's weights as transformers saves CLIPModel, e.g. the openai/clip-vit-large-patch14 folder "
             "(config.json, model.safetensors or pytorch_model.bin, vocab.json and merges.txt)")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CLIP_KEYS = ("text_model.embeddings.token_embedding.weight", "text_model.encoder.layers.0.mlp.fc1.weight",
             "vision_model.embeddings.patch_embedding.weight", "vision_model.encoder.layers.0.mlp.fc1.weight",
             "text_projection.weight", "visual_projection.weight")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
EMPTY_MASKS = ("nan", "score")  # the edit part of an empty mask: nan (the official report) or the black picture's score


@dataclass
class ClipScorer:
    """CLIP's two towers and the tokenizer of its vocabulary."""
    model: CLIPPair
    tokenizer: Tokenizer

    @property
    def image_size(self) -> int:
        return self.model.vision_model.cfg.image_size

    @property
    def length(self) -> int:
        return self.model.text_model.cfg.max_position_embeddings


def load_clip(path, device="cpu", tokenizer=None) -> ClipScorer:
    """A transformers CLIPModel folder (config.json, weights, tokenizer files) or one weights file of it.
    Sizes come from the weights' shapes; heads, activation and LayerNorm eps from the config.json beside
    them (CLIP's 64-wide heads and quick_gelu without one). `tokenizer`: a folder with vocab.json and
    merges.txt (or tokenizer.json); by default the weights' folder's, else CLIP's own vocabulary."""
    path = Path(path)
    src = open_weights_file(path, CLIP_FILE)
    absent = [k for k in CLIP_KEYS if k not in src.entries]
    if absent:
        raise ValueError(f"{src.where}: not a CLIP model with both towers: lacks {absent[:3]} (it holds "
                         f"{list(src.entries)[:4]}...); expected {CLIP_FILE}")
    folder = path if path.is_dir() else path.parent
    config = read_json(folder / "config.json", "config") if (folder / "config.json").is_file() else {}
    text, vision = clip_configs(src.shapes, config if isinstance(config, dict) else {})
    with torch.device("meta"):
        model = CLIPPair(text, vision, src.shapes["visual_projection.weight"][0])
    load_weights(model, src, {k: k for k in model.state_dict()}, CLIP_FILE, device)
    return ClipScorer(model, clip_tokenizer(tokenizer, folder, text.vocab_size))


def clip_configs(shapes: dict, config: dict) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """Both towers' configs: sizes from the shapes, the rest from config.json's text_config / vision_config."""
    def count(prefix):
        return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})

    def extra(part, width):
        c = config.get(part) or {}
        return dict(heads=c.get("num_attention_heads", max(width // 64, 1)),
                    hidden_act=c.get("hidden_act", "quick_gelu"), layer_norm_eps=c.get("layer_norm_eps", 1e-5))

    vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
    text = CLIPTextConfig(vocab_size=vocab, width=width, layers=count("text_model.encoder.layers."),
                          max_position_embeddings=shapes["text_model.embeddings.position_embedding.weight"][0],
                          intermediate_size=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
                          **extra("text_config", width))
    vwidth, _, patch, _ = shapes["vision_model.embeddings.patch_embedding.weight"]
    grid = math.isqrt(shapes["vision_model.embeddings.position_embedding.weight"][0] - 1)
    vision = CLIPVisionConfig(width=vwidth, layers=count("vision_model.encoder.layers."), patch_size=patch,
                              image_size=grid * patch,
                              intermediate_size=shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0],
                              **extra("vision_config", vwidth))
    return text, vision


def clip_tokenizer(tokenizer, folder: Path, vocab_size: int) -> Tokenizer:
    """The given tokenizer folder, else the weights' folder's tokenizer files, else CLIP's own vocabulary
    (the one open_clip ships, 49408 ids) where the weights have that many."""
    if tokenizer is not None:
        return folder_tokenizer(str(tokenizer))
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        return folder_tokenizer(str(folder))
    if vocab_size != 49408:
        raise ValueError(f"{folder}: no tokenizer files (vocab.json and merges.txt, or tokenizer.json) beside "
                         f"weights of {vocab_size} token ids (CLIP's own vocabulary has 49408); pass tokenizer= "
                         "the folder that holds them")
    return default_tokenizer()


def clip_pixels(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """CLIP's image processor: uint8 (H, W, 3) -> (1, 3, size, size) float32: PIL bicubic resize of the shorter
    side to `size` (uint8 out), center crop, / 255, CLIP's mean and std."""
    height, width = image.shape[:2]
    short, long = sorted((height, width))
    new_short, new_long = size, int(size * long / short)
    new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = resized[top:top + size, left:left + size].astype(np.float32) * np.float32(1 / 255)
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()


def text_ids(scorer: ClipScorer, text: str, keep_eos: bool = False) -> torch.Tensor:
    """(1, L) ids: BOS, the prompt's tokens, EOS; cut to the tower's 77 positions as `keep_eos` says."""
    tok, length = scorer.tokenizer, scorer.length
    ids = [tok.bos, *tok.encode(text), tok.eos]
    if len(ids) > length:
        ids = ids[:length - 1] + [tok.eos] if keep_eos else ids[:length]
    return torch.tensor([ids])


def masked_picture(image: np.ndarray, mask) -> np.ndarray:
    """image * mask cast to uint8 by truncation, as the official code; mask (H, W), (H, W, 1) or (H, W, 3)
    with values in [0, 1]."""
    m = np.asarray(mask, dtype=np.float64)
    m = m[..., None] if m.ndim == 2 else m
    if m.ndim != 3 or m.shape[:2] != image.shape[:2] or m.shape[2] not in (1, 3):
        raise ValueError(f"mask {np.shape(mask)} does not fit the picture {image.shape}: (H, W), (H, W, 1) or "
                         "(H, W, 3) of the picture's size is expected")
    if not np.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise ValueError("mask values must lie in [0, 1] (1: the edited part); divide a 0/255 mask by 255")
    return (image * m).astype(np.uint8)


@torch.no_grad()
def clip_similarity(scorer: ClipScorer, image: np.ndarray, text: str, mask: np.ndarray | None = None,
                    empty_mask: str = "nan", keep_eos: bool = False) -> float:
    """100 * max(cos, 0) of CLIP's embeddings of a uint8 (H, W, 3) picture (times `mask` where given) and
    `text`. The keyword switches are the official quirks (module docstring)."""
    image = rgb_picture(image, "image")
    if empty_mask not in EMPTY_MASKS:
        raise ValueError(f"empty_mask must be 'nan' (the official report) or 'score', got {empty_mask!r}")
    if mask is not None:
        image = masked_picture(image, mask)
        if empty_mask == "nan" and not np.any(mask):
            return float("nan")
    device = next(scorer.model.parameters()).device
    img = scorer.model.image_features(clip_pixels(image, scorer.image_size).to(device))
    txt = scorer.model.text_features(text_ids(scorer, text, keep_eos).to(device))
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return max(100 * (img * txt).sum().item(), 0.0)
