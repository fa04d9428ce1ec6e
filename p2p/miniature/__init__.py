"""A miniature Stable Diffusion trained from scratch on captioned pictures of coloured shapes.

`data` draws the pictures (every caption fact recoverable from the pixels), `train` trains the VAE,
then the UNet and CLIP text encoder, and writes `miniature.safetensors` in SD v1's single-file
layout; `measure` reads facts back from pictures; `evaluate` measures the model and
Prompt-to-Prompt's claims on it. No trained checkpoint ships yet: a run within the 2-core CPU
budget learned the backgrounds but not the objects' shapes and colours (README, "Miniature").
Load a trained one like any checkpoint:

    from weights_tools import load_checkpoint
    sd = load_checkpoint(p2p.miniature.CHECKPOINT)
"""
from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent / "miniature.safetensors"
