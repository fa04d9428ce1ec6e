"""A miniature Stable Diffusion trained from scratch on captioned pictures of coloured shapes.

`data` draws the pictures (every caption fact recoverable from the pixels), `train` trains the VAE,
then the UNet and CLIP text encoder, and writes `miniature.safetensors` in SD v1's single-file
layout; `measure` reads facts back from pictures; `evaluate` measures the model and
Prompt-to-Prompt's claims on it; `demo` draws the edit grid of `p2p demo`. The trained checkpoint
ships here (`CHECKPOINT`), is named "miniature" in `weights_tools.registry` and is the command
line's default `--ckpt`. Load it like any checkpoint:

    from weights_tools import load_checkpoint
    sd = load_checkpoint("miniature")
"""
from weights_tools.registry import CHECKPOINTS

NAME = "miniature"  # its name in weights_tools' registry: `load_checkpoint("miniature")`, --ckpt miniature
CHECKPOINT = CHECKPOINTS[NAME].path
BLEND_LEVEL = CHECKPOINTS[NAME].blend_level  # LocalBlend(level=BLEND_LEVEL): its 16x16 maps (see the registry)
