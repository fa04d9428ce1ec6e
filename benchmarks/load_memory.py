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
    python benchmarks/load_memory.py --sharded --dtype float32      # an SD v1 diffusers folder, every part sharded

`--sharded` writes, with diffusers and transformers, a full-size SD v1 diffusers folder whose UNet, VAE and
text encoder are each saved in shards of at most `--shard-size` (`*.safetensors.index.json` beside them), and
loads the folder the same way: the loader reads each tensor from its shard when it assigns it.
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


# SD v1's parts as diffusers and transformers describe them (the full-size v1-5 folder's config.json files)
SD_V1_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                  block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
SD_V1_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD_V1_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")


def write_sharded_child(dtype: str, folder: str, shard_size: str) -> None:
    """A full-size SD v1 diffusers folder, each part sharded: built on the meta device, filled with 0.01."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    parts = {"unet": lambda: UNet2DConditionModel(**SD_V1_UNET), "vae": lambda: AutoencoderKL(**SD_V1_VAE),
             "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**SD_V1_TEXT))}
    params = 0
    for name, build in parts.items():
        with torch.device("meta"):
            model = build()
        model = model.to_empty(device="cpu").to(DTYPES[dtype])
        with torch.no_grad():
            for t in model.state_dict().values():
                t.fill_(0.01)
        params += sum(t.numel() for t in model.state_dict().values())
        model.save_pretrained(Path(folder) / name, max_shard_size=shard_size)
        del model
    (Path(folder) / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    shards = len([f for f in Path(folder).rglob("*-of-*") if f.is_file()])
    print(json.dumps({"params": params, "bytes": size, "shards": shards}))


def made_up_vocabulary(path: Path, size: int) -> Path:
    """LDM-400M's single file holds no vocabulary: a WordPiece vocab.txt of the embedding's size."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    path.write_text("\n".join(special + [f"w{i}" for i in range(size - len(special))]) + "\n")
    return path


def load_child(dtype: str, path: str) -> None:
    from weights_tools import load_checkpoint
    tokenizer = None
    if not Path(path).is_dir():
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
    ap.add_argument("--sharded", action="store_true", help="a full-size SD v1 diffusers folder, every part sharded")
    ap.add_argument("--shard-size", default="1GB", help="with --sharded: the largest shard (default 1GB)")
    ap.add_argument("--_write", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--_write_sharded", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--_load", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._write:
        return write_child(*args._write)
    if args._write_sharded:
        return write_sharded_child(*args._write_sharded)
    if args._load:
        return load_child(*args._load)
    print(f"Command: `python {' '.join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])}`  ")
    print(f"Machine: {platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__}\n")
    print("| config | parameters | file GiB | weights GiB | RSS before load GiB | peak after load GiB "
          "| peak after reading every weight GiB | added (x weights) | load s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ["sd-v1 (diffusers folder, sharded)"] if args.sharded else args.configs:
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            path = str(Path(d) / ("model" if args.sharded else f"{name}.safetensors"))
            w = child("--_write_sharded", args.dtype, path, args.shard_size) if args.sharded else \
                child("--_write", name, args.dtype, path)
            m = child("--_load", args.dtype, path)
        added = m["touched"] - m["before"]
        if args.sharded:
            name += f": {w['shards']} shards of at most {args.shard_size}"
        print(f"| {name} | {w['params'] / 1e9:.3f}B | {w['bytes'] / GIB:.2f} | {m['weights'] / GIB:.2f} | "
              f"{m['before'] / GIB:.2f} | {m['after'] / GIB:.2f} | {m['touched'] / GIB:.2f} | "
              f"{added / GIB:.2f} ({added / m['weights']:.2f}) | {m['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
