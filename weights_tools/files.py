"""Writing files so that a failure never leaves a partial one: the project's one atomic-write helper."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from safetensors.torch import save_file


def temporary_beside(path: Path) -> Path:
    """A fresh hidden name in `path`'s own folder: the rename that follows stays within one file system."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def make_parents(paths) -> list[Path]:
    """Create the missing parent folders of `paths`; the ones created, deepest first (to remove on failure)."""
    made = []
    for p in paths:
        for folder in reversed([a for a in [p.parent, *p.parent.parents] if not a.exists()]):
            try:
                folder.mkdir()
            except FileExistsError:  # made meanwhile by another process (a torchrun rank): not ours to remove
                continue
            made.insert(0, folder)
    return made


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it over `path` when the block succeeds, remove it
    when the block fails. The same folder keeps the rename atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def group_lock(paths):
    """Exclusive locks on a hidden `.NAME.lock` beside each path, taken in sorted order (two groups sharing
    paths cannot deadlock) and removed on release: two runs writing one output group rename their files
    one run after the other, never `out.png` from one and `out.png.json` from the other."""
    held = []
    try:
        for path in sorted(set(paths)):
            held.append(_lock(path.with_name(f".{path.name}.lock")))
        yield
    finally:
        for lock, fd in reversed(held):
            lock.unlink(missing_ok=True)  # still held: a waiter then finds its file gone and takes a new one
            os.close(fd)


def _lock(lock: Path) -> tuple[Path, int]:
    """(lock, fd) with an exclusive flock on the file now at `lock` (retried while a holder removed it)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return lock, fd
        os.close(fd)


def write_files_atomic(files: dict) -> list[Path]:
    """Write every {path: bytes} or none: each into a temporary beside its path, then all renamed.

    A failure while writing the temporaries, or a path that is a folder, leaves every path as it was.
    A failure in the renames themselves (the last step, within one folder each) removes the files
    renamed so far, so a run never leaves part of its outputs (a file one of them replaced is then
    gone, not restored); folders it created are removed too. The renames of one group hold its paths'
    locks (`group_lock`): another run writing the same paths writes before or after, not between."""
    paths = [Path(p) for p in files]
    if len(set(paths)) != len(paths):
        raise ValueError(f"two outputs share a path: {sorted(map(str, paths))}")
    made, tmps, renamed = make_parents(paths), {}, []
    try:
        with group_lock(paths):
            try:
                for path, data in zip(paths, files.values()):
                    tmps[path] = temporary_beside(path)
                    tmps[path].write_bytes(data)
                clash = next((p for p in paths if p.is_dir()), None)  # the likeliest failure of a rename, before any
                if clash is not None:
                    raise IsADirectoryError(f"output {clash} is a folder: give a file name")
                for path, tmp in tmps.items():
                    os.replace(tmp, path)
                    renamed.append(path)
            except BaseException:  # undone under the lock: another run's files are never the ones removed
                for path in [*tmps.values(), *renamed]:
                    path.unlink(missing_ok=True)
                raise
    except BaseException:
        for folder in made:
            with suppress(OSError):  # a folder something else wrote into meanwhile stays
                folder.rmdir()
        raise
    return paths


def write_bytes_atomic(path, data: bytes) -> Path:
    return write_files_atomic({path: data})[0]


def json_bytes(obj) -> bytes:
    """Indented, key-sorted JSON; values JSON cannot hold are written as their str()."""
    return json.dumps(obj, indent=1, sort_keys=True, default=str).encode()


def write_json_atomic(obj, path) -> Path:
    return write_bytes_atomic(path, json_bytes(obj))


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], out, metadata: dict[str, str]) -> Path:
    """`safetensors.torch.save_file` into a temporary file beside `out`, then the atomic rename."""
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, file_mode())  # safetensors creates its file 0600: give it a picture's mode
    return Path(out)


def file_signature(path) -> tuple:
    """(name, size, mtime, inode) of a file, or of every file of a folder: what a rewrite, a replacement
    or a move changes; None for a path that is gone."""
    path = Path(path)
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        return tuple((str(f), s.st_size, s.st_mtime_ns, s.st_ino) for f, s in ((f, f.stat()) for f in files))
    except FileNotFoundError:
        return None


def hashed_read(path, read):
    """(read(), the SHA-256 of the file or folder at `path` as read): hashed just before reading, and an
    error if the file changed (rewritten, replaced, moved) meanwhile, so the hash names the bytes read."""
    before = file_signature(path)
    sha = file_sha256(path)
    out = read()
    if file_signature(path) != before:
        raise OSError(f"{path} changed while it was being read (rewritten, replaced or moved); run again once "
                      "it is complete")
    return out, sha


def file_mode() -> int:
    """The mode a new file gets from open(): 0666 less the process's umask (0644 under the usual 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


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
