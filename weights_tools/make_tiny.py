"""Write a tiny random SD-v1-layout checkpoint (see `weights_tools.tiny`).

    python -m weights_tools.make_tiny OUT.safetensors --seed N [--config configs/tiny.yaml]
"""
from __future__ import annotations

import argparse
import sys

from .tiny import make_tiny


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m weights_tools.make_tiny", description=__doc__.split("\n")[0])
    ap.add_argument("out", help="output .safetensors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="tiny", help="CompVis-style YAML, or a name in configs/ (default: tiny)")
    a = ap.parse_args(argv)
    print(f"wrote {make_tiny(a.out, a.seed, a.config)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
