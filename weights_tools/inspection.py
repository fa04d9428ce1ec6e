"""`inspect_checkpoint`: what a checkpoint holds, from headers only (no tensor data is read).

For `p2p inspect PATH`. It reports instead of raising wherever it can: a file we would refuse to
load (SD 2.x, SDXL, inpainting, ...) is still described, with the reason it would be refused.
"""
from __future__ import annotations

import math
from collections import Counter

from .layout import CheckpointError, detect_variant, split_parts, validate_shapes
from .load import SD_V1_SOURCE, resolve_config
from .sources import open_source

REPORTED_PARTS = ("unet", "vae", "text_encoder", "ema", "schedule", "position_ids", "unused", "other")


def inspect_checkpoint(path) -> dict:
    """A plain dict: path, format, variant (+ evidence), per-part tensor/parameter counts and
    dtypes, unknown keys, config source, whether it would load, metadata."""
    src = open_source(path)
    shapes = src.shapes
    variant, evidence = detect_variant(shapes)
    parts = split_parts(src.entries)
    info = {
        "path": src.where, "format": src.format, "variant": variant, "variant_evidence": evidence,
        "tensors": len(shapes),
        "parts": {p: _part_summary(parts[p]) for p in REPORTED_PARTS if parts[p]},
        "unknown_keys": sorted(parts["other"])[:10], "unknown_count": len(parts["other"]),
        "metadata": {k: (v if len(v) <= 200 else v[:200] + f"... ({len(v)} chars)") for k, v in
                     (src.metadata or {}).items() if isinstance(v, str)} | _non_str(src.metadata),
        "placeholders": src.placeholders,
    }
    cfg, cfg_source = resolve_config(src)
    info["config_source"] = cfg_source if cfg_source != SD_V1_SOURCE else "SD v1 default (no config in the file)"
    try:
        validate_shapes(shapes, cfg, src.where, strict=True, config_source=cfg_source)
        info["loadable"], info["problem"] = True, None
    except CheckpointError as e:
        info["loadable"], info["problem"] = False, str(e)
    return info


def _non_str(meta: dict | None) -> dict:
    return {k: str(v) for k, v in (meta or {}).items() if not isinstance(v, str)}


def _part_summary(entries: dict) -> dict:
    dtypes = Counter(str(d).replace("torch.", "") for _, d in entries.values())
    return {"tensors": len(entries), "parameters": sum(math.prod(s) for s, _ in entries.values()),
            "dtypes": dict(sorted(dtypes.items()))}


def format_inspection(info: dict) -> str:
    """A short human-readable report of `inspect_checkpoint`'s dict."""
    lines = [f"{info['path']}",
             f"  format:   {info['format']}",
             f"  variant:  {info['variant']} ({info['variant_evidence']})",
             f"  config:   {info['config_source']}",
             f"  loadable: {'yes' if info['loadable'] else 'no: ' + info['problem']}",
             f"  tensors:  {info['tensors']}"]
    for part, s in info["parts"].items():
        dt = ", ".join(f"{d} x{n}" for d, n in s["dtypes"].items())
        lines.append(f"    {part:<13} {s['tensors']:>5} tensors {s['parameters']:>13,} params  [{dt}]")
    if info["unknown_count"]:
        more = f" ... ({info['unknown_count']} in all)" if info["unknown_count"] > len(info["unknown_keys"]) else ""
        lines.append(f"  unknown keys: {', '.join(info['unknown_keys'])}{more}")
    if info["placeholders"]:
        lines.append(f"  inert objects in the pickle: {', '.join(info['placeholders'])}")
    for k, v in info["metadata"].items():
        lines.append(f"  metadata {k}: {v}")
    return "\n".join(lines)
