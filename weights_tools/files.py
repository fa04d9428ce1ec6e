"""Writing files so that a failure never leaves a partial one: the project's one atomic-write helper."""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it over `path` when the block succeeds, remove it
    when the block fails. The same folder keeps the rename atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(obj, path) -> Path:
    """Indented, key-sorted JSON; values JSON cannot hold are written as their str()."""
    return write_bytes_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], out, metadata: dict[str, str]) -> Path:
    """`safetensors.torch.save_file` into a temporary file beside `out`, then the atomic rename."""
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    return Path(out)


def file_sha256(path) -> str:
    """SHA-256 of a checkpoint file, or of the sorted (name, hash) list of a diffusers folder."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    outer = hashlib.sha256()
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if not path.is_dir():
            return h.hexdigest()
        outer.update(f"{f.relative_to(path)}:{h.hexdigest()}\n".encode())
    return outer.hexdigest()
