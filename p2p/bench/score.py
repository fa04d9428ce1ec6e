"""Each edited picture measured against its source with PIE-Bench's metrics, resumable.

OUT/ROW/metrics/ID.json holds the metrics the evaluator computed for the picture (`p2p.bench.metrics.Evaluator`:
called with the source picture as stored, the edited PNG, the entry's decoded mask and the two prompts without
brackets, as the official evaluation.py does), the metrics it skipped and why, the key of the picture's record,
the identity of the metric files and the conventions measured under (every switch of
`p2p.bench.conventions.Conventions`). A metric undefined for a picture (the official "nan": an empty region to
measure) is stored as null. A picture is measured again only when its edit changed, when the metric files or the
conventions changed, or when the evaluator now computes a metric its file lacks; each file is written atomically.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from models.textfile import read_json
from weights_tools.files import json_bytes, write_bytes_atomic

from .conventions import OFFICIAL
from .pie import Entry
from .run import picture_files, read_done, shard


def metric_file(out_dir, row: str, entry_id: str) -> Path:
    return Path(out_dir) / row / "metrics" / f"{entry_id}.json"


def to_json(value: float):
    """A metric as JSON holds it: NaN (undefined for the picture) as null."""
    return None if value is None or math.isnan(value) else float(value)


def from_json(value) -> float:
    return math.nan if value is None else float(value)


def read_measured(out_dir, row: str, entry_id: str, picture_key: str, files: dict,
                  conventions: dict = OFFICIAL) -> dict | None:
    """The picture's metric record when it measures this edit (`picture_key`) with these metric files under these
    conventions (`conventions.record`), else None."""
    try:
        rec = read_json(metric_file(out_dir, row, entry_id), "metric record")
    except (OSError, ValueError):
        return None
    ok = isinstance(rec, dict) and rec.get("picture_key") == picture_key and rec.get("files") == files \
        and rec.get("conventions") == conventions
    return rec if ok and isinstance(rec.get("metrics"), dict) else None


def pictures(entry: Entry, png: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, edited) uint8 (H, W, 3) and the mask (H, W) in {0, 1} at the source picture's size."""
    with Image.open(entry.image) as im:
        source = np.array(im.convert("RGB"))
    with Image.open(png) as im:
        edited = np.array(im.convert("RGB"))
    if source.shape != edited.shape:
        raise ValueError(f"entry {entry.id!r}: the edited picture {png} is {edited.shape[1]}x{edited.shape[0]}, its "
                         f"source {entry.image} {source.shape[1]}x{source.shape[0]}: PIE-Bench compares them pixel by "
                         f"pixel; edit at the pictures' size (512 for PIE-Bench, SD v1's own)")
    return source, edited, entry.mask(*source.shape[:2])


def pending(out_dir, row: str, entries: list[Entry], computed, files: dict,
            conventions: dict = OFFICIAL) -> list[tuple[Entry, str]]:
    """(entry, picture key) of the edited pictures whose metrics are missing, stale or lack a metric in `computed`."""
    todo = []
    for e in entries:
        rec = read_done(out_dir, row, e.id)
        if rec is None:
            continue
        have = read_measured(out_dir, row, e.id, rec.get("key"), files, conventions)
        if have is None or not set(computed) <= set(have["metrics"]):
            todo.append((e, rec.get("key")))
    return todo


def evaluate_row(out_dir, row: str, entries: list[Entry], evaluator, computed, files: dict,
                 conventions: dict = OFFICIAL, *, rank: int = 0, world: int = 1, barrier=None, progress: bool = True,
                 log=print) -> list[str]:
    """Measure this rank's share of the pictures that need it (`pending`); the ids measured. `computed`: the
    metric names the evaluator returns; `files`: what the records keep of the metric files; `conventions`: the
    record of the evaluator's conventions (`conventions.record`); `barrier`: as run.run_row's, all ranks list the
    pictures before any measures one."""
    todo = pending(out_dir, row, entries, computed, files, conventions)
    edited = sum(read_done(out_dir, row, e.id) is not None for e in entries)
    log(f"{row}: {edited} of {len(entries)} pictures edited, {len(todo)} to measure")
    if barrier is not None:
        barrier()
    done = []
    for entry, key in tqdm(shard(todo, rank, world), desc=f"{row} metrics", disable=not progress, position=rank,
                           unit="picture"):
        png, _ = picture_files(out_dir, row, entry.id)
        values = evaluator(*pictures(entry, png), entry.source_prompt, entry.target_prompt)
        rec = {"id": entry.id, "edit_type": entry.edit_type, "picture_key": key, "files": files,
               "conventions": conventions, "metrics": {k: to_json(v) for k, v in values.items()},
               "skipped": dict(evaluator.skipped)}
        write_bytes_atomic(metric_file(out_dir, row, entry.id), json_bytes(rec))
        done.append(entry.id)
    return done
