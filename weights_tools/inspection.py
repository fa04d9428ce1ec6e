"""`inspect_checkpoint`: what a checkpoint holds, from headers only (no tensor data is read).

For `p2p inspect PATH`. It reports instead of raising wherever it can: a file we would refuse to
load (SD 2.x, SDXL, inpainting, ...) is still described, with the reason it would be refused.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from models import FAMILIES
from models.config import NoiseSchedule

from .family import resolve_prediction
from .layout import CheckpointError, distilled_name, family_code, split_parts, validate_shapes
from .layouts import LAYOUTS
from .load import resolve_config, said_schedule
from .mmdit import mmdit_pipeline
from .mmdit_inspect import describe_mmdit_file
from .sources import open_source

REPORTED_PARTS = ("unet", "vae", "text_encoder", "ema", "schedule", "position_ids", "unused", "other")


def inspect_checkpoint(path) -> dict:
    """A plain dict: path, format, variant (+ evidence) and family, per-part tensor/parameter counts
    and dtypes, unknown keys, config source, whether it would load, metadata."""
    src = open_source(path)
    shapes = src.shapes
    variant, evidence = src.variant
    parts = _parts(src)
    info = {
        "path": src.where, "format": src.format, "variant": variant, "variant_evidence": evidence,
        "family": family_code(variant), "tensors": len(shapes),
        "parts": {p: _part_summary(entries) for p, entries in parts.items() if entries and p != "other"},
        "unknown_keys": sorted(parts.get("other", ()))[:10], "unknown_count": len(parts.get("other", ())),
        "metadata": {k: (v if len(v) <= 200 else v[:200] + f"... ({len(v)} chars)") for k, v in
                     (src.metadata or {}).items() if isinstance(v, str)} | _non_str(src.metadata),
        "placeholders": src.placeholders,
    }
    row = mmdit_pipeline(path)
    if row is not None:  # an MM-DiT folder: its own path (weights_tools/mmdit.py), not the UNet families' tables
        return info | mmdit_loadability(row, path)
    single = describe_mmdit_file(path)  # an SD3 / Flux single file or a part file kept beside one
    if single is not None:
        grouped = single.pop("groups")
        other = sorted(grouped.pop("other", ()))
        parts = {name: _part_summary(entries) for name, entries in grouped.items()}
        return info | single | {"parts": parts, "unknown_keys": other[:10], "unknown_count": len(other)}
    info.update(_loadability(src, variant))
    info["model"] = model_name(variant, info["prediction_type"])
    cfg = resolve_config(src).config if not src.problem else None  # the file's own config, or its family's fitted
    if cfg is not None and (cfg.unet.transformer_depth_output is not None or cfg.unet.middle != "attention"):
        info["model"] = distilled_name(cfg.unet) if cfg.family == "sdxl" else f"{info['model']} (distilled UNet)"
    return info


def mmdit_loadability(row, path) -> dict:
    """What an MM-DiT folder is (SD3 or SD3.5, by its transformer's config) and whether it loads (its
    headers checked against its configs, no tensor read)."""
    variant, evidence = row.variant(Path(path))
    try:
        row.check(Path(path))
        problem = None
    except CheckpointError as e:
        problem = str(e)
    return {"variant": variant, "variant_evidence": evidence, "model": variant, "family": None,
            "config_source": "the folder's transformer/, vae/ and scheduler/ config.json files",
            "prediction_type": "flow", "prediction_source": "velocity of flow matching (FlowMatchEulerDiscreteScheduler)",
            "loadable": problem is None, "problem": problem}


def model_name(variant: str, prediction: str | None) -> str:
    """The variant, told apart by what it predicts where its family's Layout names its models (SD 2.x:
    the 512-px base, epsilon, or the 768-px v model)."""
    code = family_code(variant)
    return LAYOUTS[code].models.get(prediction, variant) if code is not None else variant


def _parts(src) -> dict[str, dict]:
    """Entries by part: the model's parts (and EMA, schedule, ...) in the single-file layout, or a
    folder's components when it is described rather than mapped."""
    if src.problem and src.format == "diffusers":
        out: dict[str, dict] = {}
        for k, v in src.entries.items():
            out.setdefault(k.split("/")[0], {})[k] = v
        return out
    parts = split_parts(src.entries)
    return {p: parts[p] for p in REPORTED_PARTS}


def _loadability(src, variant: str) -> dict:
    """config source, prediction type (and where it came from), whether it loads and why not."""
    if src.problem:
        said = src.prediction or (None, "not read (the file is not loaded)")
        return {"config_source": "none (the file is not loaded)", "prediction_type": said[0],
                "prediction_source": said[1], "loadable": False, "problem": src.problem}
    cfg, cfg_source, default = resolve_config(src)
    out = {"config_source": cfg_source if default is None else f"{FAMILIES[default].name} default (no config in the file)",
           "prediction_type": None, "prediction_source": None,
           "schedule": schedule_words(said_schedule(src, cfg), src)}
    try:
        out["prediction_type"], out["prediction_source"] = resolve_prediction(src, cfg, cfg_source, variant)
        validate_shapes(src.shapes, cfg, src.where, strict=True, config_source=cfg_source, variant=src.variant,
                        guessed=default is not None)
        return out | {"loadable": True, "problem": None}
    except CheckpointError as e:
        return out | {"loadable": False, "problem": str(e)}


def schedule_words(cfg, src) -> str | None:
    """The noise schedule in words where it differs from SD's (None where it does not), and where a marker
    key said it."""
    s = cfg.schedule
    if s == NoiseSchedule():
        return None
    parts = [f"{s.beta_schedule} betas" if s.trained_betas is None else "trained_betas given"]
    parts += ["zero terminal SNR" + (f" ({src.zero_snr})" if src.zero_snr else "")] if s.zero_snr else []
    return ", ".join(parts + [f"{s.spacing} timesteps"])


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
             f"  variant:  {info['model']} ({info['variant_evidence']})"
             + (f"; family {info['family']!r}" if info["family"] else ""),
             f"  config:   {info['config_source']}",
             f"  predicts: {info['prediction_type'] or '?'} ({info['prediction_source']})",
             *([f"  schedule: {info['schedule']}"] if info.get("schedule") else []),
             f"  loadable: {'yes' if info['loadable'] else 'no: ' + info['problem']}",
             *([f"  holds:    {', '.join(info['holds'])}"] if info.get("holds") else []),
             *(f"  needs:    {need}" for need in info.get("needs", ())),
             f"  tensors:  {info['tensors']}"]
    for part, s in info["parts"].items():
        dt = ", ".join(f"{d} x{n}" for d, n in s["dtypes"].items())
        lines.append(f"    {part:<13} {s['tensors']:>5} tensors {s['parameters']:>13,} params  [{dt}]")
    if info["unknown_count"]:
        more = f" ... ({info['unknown_count']} in all)" if info["unknown_count"] > len(info["unknown_keys"]) else ""
        lines.append(f"  unknown keys: {', '.join(info['unknown_keys'])}{more}")
    if info["placeholders"]:
        lines.append(f"  inert objects in the pickle: {', '.join(info['placeholders'])}")
    unused = info["parts"].get("unused")
    if unused:
        lines.append(f"  unused:   {unused['tensors']} tensor(s) the model never reads (SD 2.x: OpenCLIP's logit_scale "
                     "and text_projection; LDM-400M: the language-model head), not loaded")
    for k, v in info["metadata"].items():
        lines.append(f"  metadata {k}: {v}")
    return "\n".join(lines)
