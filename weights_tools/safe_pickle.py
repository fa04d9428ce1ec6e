"""Reading `.ckpt` / `.bin` files (torch's zip format) without running the pickle's code.

A pickle can call any importable function while it loads. This unpickler resolves only an
allow-list of names (torch's tensor rebuild functions, storage types, dtypes, OrderedDict and a few
builtins), and even those are replaced by our own functions that only record what was asked for:
tensors come back as `LazyTensor` descriptions whose bytes are read from the zip on demand. Names
that can run code (os.system, builtins.exec, subprocess, ...) are refused; any other unknown class
(a Lightning `ModelCheckpoint` in `callbacks`, its `AttributeDict` of hyper-parameters, a
`defaultdict`, a `pathlib` path, a numpy scalar in the metadata) becomes an inert `Placeholder`
which is never called. `torch.load(weights_only=True)` would refuse those files.
"""
from __future__ import annotations

import collections
import io
import pickle
import pickletools
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .layout import CheckpointError

# modules whose names mean "run code": refused outright, so the user hears why
DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "shutil", "importlib", "runpy", "pty",
    "socket", "code", "codeop", "ctypes", "pickle", "_pickle", "marshal", "types", "functools", "operator",
    "io", "pathlib", "webbrowser", "multiprocessing", "threading", "asyncio", "signal", "tempfile", "commands",
    "platform", "pdb", "timeit", "inspect", "gc", "weakref", "_io", "posixpath", "ntpath", "zipimport",
    "pip", "setuptools", "distutils", "urllib", "http", "ftplib", "smtplib", "telnetlib", "requests"})

# what pickles of plain values name by GLOBAL (strings, numbers, lists, dicts and tuples are opcodes);
# `str` and friends are left out on purpose: str() of a memo-shared nested list grows without bound
SAFE_BUILTINS = {"set": set, "frozenset": frozenset, "complex": complex, "slice": slice}
# harmless names that appear as arguments (a defaultdict's factory, a path's class): inert placeholders,
# never the real thing; pathlib as a module stays refused
INERT = {("builtins", n) for n in ("list", "dict", "tuple", "int", "float", "bool")} | {
    ("__builtin__", n) for n in ("list", "dict", "tuple", "int", "float", "bool")} | {
    ("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")}
MAX_PICKLE = 256 << 20    # data.pkl of a real SD checkpoint is a few MB at most
MAX_DEFLATE_RATIO = 1032  # the most deflate can expand a record: a larger claim is a lie


@dataclass(frozen=True)
class LazyStorage:
    key: str            # record name under <archive>/data/
    dtype: torch.dtype


@dataclass(frozen=True)
class LazyTensor:
    """A tensor in a `.ckpt`, described but not read: shape, dtype and where its bytes are."""
    storage: LazyStorage
    offset: int
    shape: tuple
    stride: tuple

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype


class Placeholder:
    """Stands in for a class the allow-list does not know. Holds its arguments, its state and the
    items a dict or list subclass is pickled with (SETITEMS / APPENDS); never runs anything."""
    qualname = "?"
    args: tuple = ()  # NEWOBJ builds with __new__ alone: class-level defaults, no __init__

    def __init__(self, *args, **kwargs):  # only reached via REDUCE on this class itself
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # a dict subclass: Lightning's AttributeDict, defaultdict
        self.__dict__.setdefault("entries", {})[key] = value

    def append(self, value):  # a list subclass
        self.__dict__.setdefault("entries", {})[len(self.__dict__.get("entries", ()))] = value

    def extend(self, values):
        for v in values:
            self.append(v)

    def __repr__(self):
        # string arguments only (a pathlib path's parts): repr of memo-shared nested lists grows without bound
        args = f"({', '.join(map(repr, self.args))})"[:120] if self.args and all(
            isinstance(a, str) for a in self.args) else ""
        n = len(self.__dict__.get("entries", ()))
        entries = f" with {n} entr{'y' if n == 1 else 'ies'}" if n else ""
        return f"<placeholder for {self.qualname}{args}{entries}>"


def placeholder_class(module: str, name: str) -> type:
    return type(name, (Placeholder,), {"qualname": f"{module}.{name}", "__module__": "weights_tools.placeholder"})


# --- our stand-ins for the torch functions a checkpoint pickle names
def _rebuild_tensor(storage, offset, size, stride, *rest):
    if not isinstance(storage, LazyStorage):
        raise CheckpointError(f"tensor rebuilt from a {type(storage).__name__}, not a storage record")
    if not all(type(x) is int for x in (offset, *size, *stride)):
        raise CheckpointError(f"tensor rebuilt with a non-integer offset, size or stride: {str((offset, size))[:80]}")
    return LazyTensor(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


def _rebuild_from_type(func, new_type, args, state):
    return func(*args)  # func comes from find_class, so it is one of our stand-ins


def _storage_type(dtype):
    return ("storage_type", dtype)


STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                  "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}

ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): tuple,
    ("torch", "device"): lambda *a: str(a[0]) if a else "cpu",
    ("_codecs", "encode"): lambda s, enc="utf-8", *a: s.encode(enc),  # how protocol 2 pickles bytes
    **{("torch", n): _storage_type(d) for n, d in STORAGE_DTYPES.items()},
    **{("torch", str(d).split(".")[1]): d for d in STORAGE_DTYPES.values()},
    **{("builtins", n): f for n, f in SAFE_BUILTINS.items()},  # bytearray: RestrictedUnpickler.bytearray
    **{("__builtin__", n): f for n, f in SAFE_BUILTINS.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed names; storages become `LazyStorage` records."""

    def __init__(self, file, where: str, max_bytes: int):
        super().__init__(file)
        self.where, self.max_bytes = where, max_bytes
        self.placeholders: set[str] = set()

    def bytearray(self, *args):
        """bytearray(n) allocates n bytes: no more than the file itself holds."""
        if args and isinstance(args[0], int) and not 0 <= args[0] <= self.max_bytes:
            raise CheckpointError(f"{self.where}: the pickle asks for a bytearray of {args[0]} bytes, more than "
                                  f"the file's {self.max_bytes}: a corrupt or hostile file")
        return bytearray(*args)

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name == "bytearray":
            return self.bytearray
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        root = module.split(".")[0]
        if (module, name) not in INERT and (root in DANGEROUS_MODULES or root == "torch" and not name[:1].isupper()):
            raise CheckpointError(
                f"{self.where}: refused to load: the pickle asks for `{module}.{name}`, which could run code. "
                "Only tensors, storages, OrderedDict and plain Python values are loaded from .ckpt files "
                "(nothing in the file was executed). If you trust the file, convert it elsewhere to .safetensors")
        self.placeholders.add(f"{module}.{name}")
        return placeholder_class(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
                and isinstance(pid[1], tuple) and pid[1][0] == "storage_type"):
            raise CheckpointError(f"{self.where}: unsupported persistent id in the pickle: {pid!r:.80}")
        return LazyStorage(str(pid[2]), pid[1][1])


MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


def check_memo(data: bytes, where: str) -> None:
    """A memo index names one of the pickle's own values, so it is below the number of opcodes; the C
    unpickler would otherwise size its memo to whatever index the file claims (2**28: 2 GB)."""
    try:
        ops = list(pickletools.genops(data))
    except Exception as e:  # a corrupt pickle: ValueError, EOFError, ...
        raise CheckpointError(f"{where}: the checkpoint's pickle is corrupt ({type(e).__name__}: {e})") from e
    for op, arg, pos in ops:
        if op.name in MEMO_OPS and isinstance(arg, int) and not 0 <= arg <= len(ops):
            raise CheckpointError(f"{where}: the checkpoint's pickle names memo entry {arg} at byte {pos}, beyond "
                                  f"its {len(ops)} opcodes: a corrupt or hostile file")


def check_extent(t: LazyTensor, size: int, where: str) -> None:
    """The storage record holds whole elements and every one the tensor's shape and strides reach."""
    item = t.dtype.itemsize
    last = t.offset + sum((n - 1) * st for n, st in zip(t.shape, t.stride)) if all(t.shape) else -1
    if size % item or t.offset < 0 or any(st < 0 for st in t.stride) or (last + 1) * item > size:
        raise CheckpointError(f"{where} has {size} bytes, which is not the whole {t.dtype} elements a tensor of "
                              f"shape {t.shape} at offset {t.offset} needs: a truncated or corrupt checkpoint")


class TorchZip:
    """A torch zip-format file (`torch.save` since 1.6): the unpickled object with `LazyTensor`s in
    it, and `read(lazy)` to fetch one tensor's bytes."""

    def __init__(self, path: Path):
        self.path, where = Path(path), str(path)
        try:
            self.zip = zipfile.ZipFile(self.path)
            names = self.zip.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{where}: not a readable torch zip checkpoint (truncated or corrupt: {e}); "
                                  "supported: .ckpt/.pt/.bin written by torch.save (zip format), .safetensors") from e
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointError(f"{where}: a zip file but not a torch checkpoint (no data.pkl among {names[:5]})")
        self.root = pkl[0][: -len("data.pkl")]
        if f"{self.root}byteorder" in names and self.zip.read(f"{self.root}byteorder").strip() != b"little":
            raise CheckpointError(f"{where}: big-endian torch checkpoint; only little-endian files are supported")
        data = self._read_record(pkl[0], MAX_PICKLE)
        check_memo(data, where)
        unpickler = RestrictedUnpickler(io.BytesIO(data), where, self.path.stat().st_size)
        try:
            self.obj = unpickler.load()
        except CheckpointError:
            raise
        except Exception as e:  # a corrupt pickle: EOFError, UnpicklingError, ...
            raise CheckpointError(f"{where}: the checkpoint's pickle is corrupt ({type(e).__name__}: {e})") from e
        self.placeholders = sorted(unpickler.placeholders)

    def _read_record(self, name: str, limit: int | None = None) -> bytes:
        self.record_size(name, limit)
        try:
            return self.zip.read(name)
        except (zipfile.BadZipFile, OSError, EOFError, KeyError, zlib.error) as e:
            raise CheckpointError(f"{self.path}: cannot read `{name}` from the checkpoint (truncated or "
                                  f"corrupt: {e})") from e

    def record_size(self, name: str, limit: int | None = None) -> int:
        """A record's size as its zip entry claims it, checked against the bytes the file holds before
        anything that size is allocated: stored records as they are, deflated ones at deflate's ratio."""
        try:
            info = self.zip.getinfo(name)
        except KeyError as e:
            raise CheckpointError(f"{self.path}: the checkpoint has no record `{name}` (truncated or corrupt)") from e
        stored = info.compress_type == zipfile.ZIP_STORED
        bound = info.compress_size if stored else info.compress_size * MAX_DEFLATE_RATIO
        if info.file_size > bound or info.header_offset + info.compress_size > self.path.stat().st_size or (
                limit is not None and info.file_size > limit):
            raise CheckpointError(f"{self.path}: record `{name}` claims {info.file_size} bytes, more than the file "
                                  f"holds for it ({info.compress_size} stored): a corrupt or hostile checkpoint")
        return info.file_size

    def read(self, t: LazyTensor) -> torch.Tensor:
        """The tensor's values, read from its storage record (one storage at a time)."""
        name = f"{self.root}data/{t.storage.key}"
        size = self.record_size(name)
        check_extent(t, size, f"{self.path}: tensor storage `{name}`")
        try:
            with self.zip.open(name) as f:
                buf = bytearray(size)
                if f.readinto(buf) != len(buf):
                    raise EOFError("short read")
        except (zipfile.BadZipFile, OSError, EOFError, KeyError, zlib.error) as e:
            raise CheckpointError(f"{self.path}: cannot read tensor storage `{name}` (truncated or corrupt: {e})") from e
        flat = torch.frombuffer(buf, dtype=torch.uint8).view(t.dtype) if buf else torch.empty(0, dtype=t.dtype)
        out = flat.as_strided(t.shape, t.stride, t.offset)
        # a view into a larger shared storage would keep all of it alive per tensor: copy out
        return out.clone() if out.numel() != flat.numel() else out

    def close(self):
        self.zip.close()
