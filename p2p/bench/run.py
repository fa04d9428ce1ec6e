"""One row of PIE-Bench run over the pictures, resumable and sharded.

OUT/ROW/pictures/ID.png is the edited picture (a plain PNG at the model's size) and ID.json its record (every
setting, the entry, the checkpoint's SHA-256, the versions, the seconds it took). Both are written together
once the picture is edited, each into a temporary beside it then renamed, the record last
(weights_tools.files.write_files_atomic): a picture is done when its record exists, names the same settings,
entry and weights (its `key`), and its PNG exists. A killed run loses at most the picture in flight, and
a rerun recomputes nothing that is done.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from models.textfile import read_json
from weights_tools.files import file_sha256, json_bytes, write_files_atomic

from .. import __version__
from ..viz import image_bytes
from .pie import Entry
from .protocol import Protocol, run_entry


def picture_files(out_dir, row: str, entry_id: str) -> tuple[Path, Path]:
    """(OUT/ROW/pictures/ID.png, its record ID.json)."""
    folder = Path(out_dir) / row / "pictures"
    return folder / f"{entry_id}.png", folder / f"{entry_id}.json"


def entry_fields(entry: Entry) -> dict:
    """What a picture depends on of its entry: a changed prompt, word or picture (its bytes) makes it stale; the
    data folder may move."""
    return {"id": entry.id, "image_path": entry.image_path, "image_sha256": file_sha256(entry.image),
            "source_prompt": entry.source_prompt, "target_prompt": entry.target_prompt, "edit_type": entry.edit_type,
            "blend_words": list(entry.blend_words) if entry.blend_words else None}


def run_key(protocol: Protocol, entry: Entry, weights: dict) -> str:
    """A digest of everything a picture depends on: the row's settings, the entry, the weights and how they
    are read (`weights`: checkpoint_sha256, dtype, ...)."""
    blob = json.dumps([protocol.settings(), entry_fields(entry), weights], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def read_done(out_dir, row: str, entry_id: str, key: str | None = None) -> dict | None:
    """The picture's record when it is done (with this `key`, when given), else None."""
    png, record = picture_files(out_dir, row, entry_id)
    try:
        rec = read_json(record, "picture record")
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or not png.is_file() or (key is not None and rec.get("key") != key):
        return None
    return rec


def shard(items: list, rank: int, world: int) -> list:
    """This rank's items: every world-th one from its rank on (the sweep's rule)."""
    return items[rank::world]


def run_row(sd, protocol: Protocol, entries: list[Entry], out_dir, weights: dict, *, limit: int | None = None,
            rank: int = 0, world: int = 1, barrier=None, progress: bool = True, log=print) -> list[str]:
    """Edit every pending picture of this rank (the first `limit` pending ones of the whole run, when given);
    the ids edited. `weights`: what the records keep of the checkpoint (its path, checkpoint_sha256, dtype and how
    it is read); all but the path enter each picture's key. Under several ranks `barrier` holds each one until all have listed the pending pictures: a rank
    that wrote one before another listed them would deal the pictures out differently."""
    identity = {k: v for k, v in weights.items() if k != "checkpoint"}
    keys = {e.id: run_key(protocol, e, identity) for e in entries}
    pending = [e for e in entries if read_done(out_dir, protocol.row, e.id, keys[e.id]) is None]
    todo = pending[:limit] if limit is not None else pending
    log(f"{protocol.row}: {len(entries)} pictures, {len(entries) - len(pending)} done, {len(todo)} to run"
        + (f" on {world} ranks" if world > 1 else ""))
    if barrier is not None:
        barrier()
    mine = shard(todo, rank, world)
    done = []
    for entry in tqdm(mine, desc=f"{protocol.row} (rank {rank})" if world > 1 else protocol.row,
                      disable=not progress, position=rank, unit="picture"):
        save_picture(sd, protocol, entry, out_dir, keys[entry.id], weights)
        done.append(entry.id)
    return done


def save_picture(sd, protocol: Protocol, entry: Entry, out_dir, key: str, weights: dict) -> None:
    """Invert, edit, and write the PNG and its record together (the record last)."""
    t0 = time.perf_counter()
    image, details = run_entry(sd, protocol, entry)
    seconds = time.perf_counter() - t0
    png, record = picture_files(out_dir, protocol.row, entry.id)
    rec = {"key": key, "entry": entry_fields(entry) | {"image": str(entry.image)}, "settings": protocol.settings(),
           **details, **weights,
           "seconds": seconds, "device": str(sd.device), "p2p_version": __version__, "torch": torch.__version__}
    write_files_atomic({png: image_bytes(image, png), record: json_bytes(rec)})
