"""A miniature Stable Diffusion trained from scratch on captioned pictures of coloured shapes.

`data` draws the pictures (every caption fact recoverable from the pixels), `train` trains the VAE,
then the UNet and CLIP text encoder, and writes `miniature.safetensors` in SD v1's single-file
layout; `measure` reads facts back from pictures; `evaluate` measures the model and
Prompt-to-Prompt's claims on it; `demo` draws the edit grid of `p2p demo`. The trained checkpoint
ships here (`CHECKPOINT`) and is the command line's default `--ckpt` ("miniature"). Load it like
any checkpoint:

    from weights_tools import load_checkpoint
    sd = load_checkpoint(p2p.miniature.CHECKPOINT)
"""
from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent / "miniature.safetensors"
NAME = "miniature"  # what --ckpt / `ckpt:` accept for CHECKPOINT (the command line's default)
# LocalBlend(level=BLEND_LEVEL) on the miniature: its 16x16 maps. The reference's default, the deepest
# down/up maps, is 16x16 on SD's 64x64 latents (a cell is 1/32 of the picture's side); the miniature's
# deepest are 8x8 (1/8), which the 3x3 max-pool spreads over nearly the whole picture.
BLEND_LEVEL = 0


def resolve_checkpoint(ckpt) -> Path:
    """A checkpoint path, or NAME (or nothing): the shipped CHECKPOINT."""
    if ckpt in (None, "", NAME):
        if not CHECKPOINT.exists():
            raise FileNotFoundError(f"the shipped miniature checkpoint {CHECKPOINT} is missing: reinstall p2p-torch "
                                    "from a full clone, train one with `python -m p2p.miniature.train`, or give --ckpt")
        return CHECKPOINT
    return Path(ckpt)
