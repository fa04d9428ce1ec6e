"""Convert a checkpoint to one original-layout `.safetensors` (see `weights_tools.conversion`).

    python -m weights_tools.convert SRC OUT.safetensors [--fp16] [--config v1-inference.yaml] [--vae VAE]
                                                        [--non-strict] [--prediction-type epsilon|v]
"""
from __future__ import annotations

import argparse
import sys

from .conversion import convert_checkpoint
from .layout import CheckpointError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m weights_tools.convert", description=__doc__.split("\n")[0])
    ap.add_argument("src", help="diffusers folder, .ckpt or .safetensors")
    ap.add_argument("out", help="output .safetensors")
    ap.add_argument("--fp16", action="store_true", help="cast floating tensors to float16")
    ap.add_argument("--config", help="CompVis v1-inference.yaml (or a configs/ name) describing the architecture")
    ap.add_argument("--non-strict", action="store_true", help="drop unknown extra keys instead of refusing")
    ap.add_argument("--vae", help="a standalone VAE (.safetensors / .ckpt / diffusers vae/ folder) to write "
                    "in place of the checkpoint's own")
    ap.add_argument("--prediction-type", choices=["epsilon", "v"], help="what the UNet predicts, when the file "
                    "does not say it or says it wrong (written into the output's ldm_config)")
    a = ap.parse_args(argv)
    try:
        out = convert_checkpoint(a.src, a.out, a.fp16, a.config, strict=not a.non_strict, vae=a.vae,
                                 prediction_type=a.prediction_type)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
