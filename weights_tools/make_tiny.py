"""Write a tiny random SD-v1-layout checkpoint (see `weights_tools.tiny`).

    python -m weights_tools.make_tiny OUT.safetensors --seed N [--config tiny | tiny-ldm | PATH.yaml]
"""
from __future__ import annotations

import argparse
import sys

from .tiny import make_tiny


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m weights_tools.make_tiny", description=__doc__.split("\n")[0])
    ap.add_argument("out", help="output .safetensors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="tiny", help="CompVis-style YAML, or a name in configs/: tiny (default), "
                    "tiny-ldm, tiny-sd2, tiny-sdxl, ...")
    ap.add_argument("--full-size", dest="full_size", action="store_true",
                    help="write a config of more than 100 million parameters too (a full-size model: gigabytes)")
    a = ap.parse_args(argv)
    try:
        print(f"wrote {make_tiny(a.out, a.seed, a.config, a.full_size)}")
    except (ValueError, OSError) as err:  # FileNotFoundError included: a config that is not there
        print(f"make_tiny: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
