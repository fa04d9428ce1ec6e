"""Tiny random weight files of PIE-Bench's four metric networks, each in its real file's layout, so that
`p2p bench eval --dino --clip --lpips-backbone --lpips-linear` runs its real code path in the tests:

* DINO: a `.pth` flat dict with the released backbone's key names (`cls_token`, `pos_embed`,
  `patch_embed.proj.*`, `blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*`, `norm.*`), written
  here key by key (not from the library's module), width 32, 2 blocks, 16 px patches, a 4 x 4 trained grid.
* CLIP: a folder written by transformers' `CLIPModel.save_pretrained` (config.json, model.safetensors) and
  `CLIPTokenizer.save_pretrained` (a byte-level BPE vocabulary of 514 ids without merges), width 32, 32 px.
* LPIPS: torchvision's SqueezeNet 1.1 key layout (`features.N.*`, `classifier.1.*`) and lpips' v0.1 linear
  layout (`linN.model.1.weight`); SqueezeNet's sizes are fixed, the weights random.
"""
import json
import tempfile
from pathlib import Path

import torch

from models.clip import bytes_to_unicode

DINO = dict(width=32, layers=2, mlp=64, patch=16, grid=4)
# SqueezeNet 1.1's Fire blocks: features index -> (in, squeeze, expand)
FIRES = {3: (64, 16, 64), 4: (128, 16, 64), 6: (128, 32, 128), 7: (256, 32, 128), 9: (256, 48, 192),
         10: (384, 48, 192), 11: (384, 64, 256), 12: (512, 64, 256)}
LPIPS_CHANNELS = (64, 128, 256, 384, 384, 512, 512)


def dino_state(g: torch.Generator, width=32, layers=2, mlp=64, patch=16, grid=4) -> dict[str, torch.Tensor]:
    """A DINO backbone state dict of random weights, keyed as dino_vitbase8_pretrain.pth is."""
    def rand(*shape, scale=0.1, mean=0.0):
        return mean + scale * torch.randn(*shape, generator=g)

    state = {"cls_token": rand(1, 1, width), "pos_embed": rand(1, grid * grid + 1, width),
             "patch_embed.proj.weight": rand(width, 3, patch, patch, scale=0.02), "patch_embed.proj.bias": rand(width)}
    for i in range(layers):
        b = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            state[b + norm + ".weight"], state[b + norm + ".bias"] = rand(width, mean=1.0), rand(width)
        for name, (out, inp) in {"attn.qkv": (3 * width, width), "attn.proj": (width, width),
                                 "mlp.fc1": (mlp, width), "mlp.fc2": (width, mlp)}.items():
            state[b + name + ".weight"], state[b + name + ".bias"] = rand(out, inp, scale=inp ** -0.5), rand(out)
    state["norm.weight"], state["norm.bias"] = rand(width, mean=1.0), rand(width)
    return state


def write_dino(path: Path, seed: int = 0) -> Path:
    torch.save(dino_state(torch.Generator().manual_seed(seed), **DINO), path)
    return path


def squeezenet_state(g: torch.Generator) -> dict[str, torch.Tensor]:
    """torchvision's squeezenet1_1 state dict, random (He-scaled so the seven maps do not vanish)."""
    def conv(out, inp, k):
        return torch.randn(out, inp, k, k, generator=g) * (2 / (inp * k * k)) ** 0.5, 0.01 * torch.randn(out, generator=g)

    state = dict(zip(("features.0.weight", "features.0.bias"), conv(64, 3, 3)))
    for i, (inp, squeeze, expand) in FIRES.items():
        for name, (out, c, k) in {"squeeze": (squeeze, inp, 1), "expand1x1": (expand, squeeze, 1),
                                  "expand3x3": (expand, squeeze, 3)}.items():
            state[f"features.{i}.{name}.weight"], state[f"features.{i}.{name}.bias"] = conv(out, c, k)
    state["classifier.1.weight"], state["classifier.1.bias"] = conv(1000, 512, 1)  # in the file, never read
    return state


def write_lpips(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """(squeezenet1_1 backbone file, lpips v0.1 squeeze.pth linear file)."""
    g = torch.Generator().manual_seed(seed)
    backbone, linear = folder / "squeezenet1_1-b8a52dc0.pth", folder / "squeeze.pth"
    torch.save(squeezenet_state(g), backbone)
    torch.save({f"lin{k}.model.1.weight": 0.1 * torch.rand(1, c, 1, 1, generator=g)
                for k, c in enumerate(LPIPS_CHANNELS)}, linear)
    return backbone, linear


def write_clip(folder: Path, transformers, seed: int = 0) -> Path:
    """A tiny random CLIPModel and its byte-level BPE tokenizer, saved by transformers into `folder`."""
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    bos, eos = len(vocab) - 2, len(vocab) - 1
    with tempfile.TemporaryDirectory() as raw:
        (Path(raw) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
        (Path(raw) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tokenizer = transformers.CLIPTokenizer.from_pretrained(raw, local_files_only=True, model_max_length=77)
    tower = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=37,
                 hidden_act="quick_gelu")
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos, **tower),
        vision_config=dict(patch_size=8, image_size=32, **tower), projection_dim=16)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():   # off the initial values, LayerNorms included
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_metric_files(folder: Path, transformers) -> dict[str, Path]:
    """All four, under `folder`: {"dino", "clip", "lpips_backbone", "lpips_linear"} -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    backbone, linear = write_lpips(folder)
    return {"dino": write_dino(folder / "dino_vitbase8_pretrain.pth"),
            "clip": write_clip(folder / "clip-vit-large-patch14", transformers),
            "lpips_backbone": backbone, "lpips_linear": linear}


def metric_flags(files: dict[str, Path], leave_out=()) -> list[str]:
    """The `p2p bench` flags naming the files, but those in `leave_out`."""
    return [a for k, p in files.items() if k not in leave_out for a in (f"--{k.replace('_', '-')}", str(p))]
