"""Loading memory: a full-size checkpoint of each family, loaded by `load_checkpoint`, against its weights.

For each config (configs/NAME.yaml) a fresh process writes a single-file `.safetensors` of the
full-size model (constant values, the dtype asked; the config in the `ldm_config` metadata, as the
files `make_tiny` writes), then another fresh process loads it with `load_checkpoint(path,
dtype=...)` and reports `ru_maxrss` before, after, and after every weight has been read once (a
tensor in the file's dtype may stay mapped from the file until it is used). The claim under test:
the loader builds the model on the meta device and assigns each tensor as it is read, so the
process ends up holding about one copy of the weights, not two.

    python benchmarks/load_memory.py                                # sd-v1, ldm-400m, sd-v2-v, sdxl-base, float16
    python benchmarks/load_memory.py --configs sdxl-base --dtype float32
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from models import SDConfig, load_config  # noqa: E402
from weights_tools.layout import carried_buffers, model_shapes  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GIB = 2 ** 30


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def write_child(config: str, dtype: str, path: str) -> None:
    """The full-size file: every model tensor filled with 0.01 (norm weights too: the values do not matter)."""
    cfg = load_config(config)
    state = {k: torch.full(shape, 0.01, dtype=DTYPES[dtype]) for k, shape in model_shapes(cfg).items()}
    state.update(carried_buffers(cfg))
    save_file(state, path, {"ldm_config": cfg.to_json()})
    print(json.dumps({"params": sum(t.numel() for t in state.values()), "bytes": os.path.getsize(path)}))


def made_up_vocabulary(path: Path, size: int) -> Path:
    """LDM-400M's single file holds no vocabulary: a WordPiece vocab.txt of the embedding's size."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    path.write_text("\n".join(special + [f"w{i}" for i in range(size - len(special))]) + "\n")
    return path


def load_child(dtype: str, path: str) -> None:
    from weights_tools import load_checkpoint
    cfg = SDConfig.from_ldm(json.loads(safe_open(path, "pt").metadata()["ldm_config"]))
    tokenizer = made_up_vocabulary(Path(path).with_suffix(".vocab.txt"), cfg.text.vocab_size) \
        if cfg.family == "ldm" else None
    before = maxrss()
    t = time.perf_counter()
    sd = load_checkpoint(path, dtype=DTYPES[dtype], tokenizer=tokenizer)
    seconds = time.perf_counter() - t
    weights = sum(p.numel() * p.element_size() for p in sd.parameters())
    after = maxrss()
    with torch.no_grad():   # read every weight: tensors safetensors maps from the file count once touched
        for p in sd.parameters():
            p.sum()
    print(json.dumps({"before": before, "after": after, "touched": maxrss(), "weights": weights,
                      "seconds": seconds}))


def child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["sd-v1", "ldm-400m", "sd-v2-v", "sdxl-base"], help="names in configs/")
    ap.add_argument("--dtype", default="float16", choices=list(DTYPES))
    ap.add_argument("--dir", default=None, help="where the temporary checkpoints go (default: the system's)")
    ap.add_argument("--_write", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--_load", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._write:
        return write_child(*args._write)
    if args._load:
        return load_child(*args._load)
    print(f"Command: `python {' '.join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])}`  ")
    print(f"Machine: {platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__}\n")
    print("| config | parameters | file GiB | weights GiB | RSS before load GiB | peak after load GiB "
          "| peak after reading every weight GiB | added (x weights) | load s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.configs:
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            path = str(Path(d) / f"{name}.safetensors")
            w = child("--_write", name, args.dtype, path)
            m = child("--_load", args.dtype, path)
        added = m["touched"] - m["before"]
        print(f"| {name} | {w['params'] / 1e9:.3f}B | {w['bytes'] / GIB:.2f} | {m['weights'] / GIB:.2f} | "
              f"{m['before'] / GIB:.2f} | {m['after'] / GIB:.2f} | {m['touched'] / GIB:.2f} | "
              f"{added / GIB:.2f} ({added / m['weights']:.2f}) | {m['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
