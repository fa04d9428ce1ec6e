"""Reading `.ckpt` / `.bin` files (torch's zip format) without running the pickle's code.

A pickle can call any importable function while it loads. This unpickler resolves only an
allow-list of names (torch's tensor rebuild functions, storage types, dtypes, OrderedDict and a few
builtins), and even those are replaced by our own functions that only record what was asked for:
tensors come back as `LazyTensor` descriptions whose bytes are read from the zip on demand. Names
that can run code (os.system, builtins.exec, subprocess, ...) are refused; any other unknown class
(a Lightning `ModelCheckpoint` in `callbacks`, a numpy scalar in the metadata) becomes an inert
`Placeholder` which is never called. `torch.load(weights_only=True)` would refuse those files.
"""
from __future__ import annotations

import collections
import io
import pickle
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

SAFE_BUILTINS = {"set": set, "frozenset": frozenset, "dict": dict, "list": list, "tuple": tuple, "int": int,
                 "float": float, "str": str, "bytes": bytes, "bytearray": bytearray, "bool": bool,
                 "complex": complex, "slice": slice}


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
    """Stands in for a class the allow-list does not know. Holds its state; never runs anything."""
    qualname = "?"

    def __init__(self, *args, **kwargs):  # only reached via NEWOBJ/REDUCE on this class itself
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<placeholder for {self.qualname}>"


def placeholder_class(module: str, name: str) -> type:
    return type(name, (Placeholder,), {"qualname": f"{module}.{name}", "__module__": "weights_tools.placeholder"})


# --- our stand-ins for the torch functions a checkpoint pickle names
def _rebuild_tensor(storage, offset, size, stride, *rest):
    if not isinstance(storage, LazyStorage):
        raise CheckpointError(f"tensor rebuilt from a {type(storage).__name__}, not a storage record")
    return LazyTensor(storage, int(offset), tuple(size), tuple(stride))


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
    **{("builtins", n): f for n, f in SAFE_BUILTINS.items()},
    **{("__builtin__", n): f for n, f in SAFE_BUILTINS.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed names; storages become `LazyStorage` records."""

    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where
        self.placeholders: set[str] = set()

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        root = module.split(".")[0]
        if root in DANGEROUS_MODULES or root == "torch" and not name[:1].isupper():
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
        unpickler = RestrictedUnpickler(io.BytesIO(self._read_record(pkl[0])), where)
        try:
            self.obj = unpickler.load()
        except CheckpointError:
            raise
        except Exception as e:  # a corrupt pickle: EOFError, UnpicklingError, ...
            raise CheckpointError(f"{where}: the checkpoint's pickle is corrupt ({type(e).__name__}: {e})") from e
        self.placeholders = sorted(unpickler.placeholders)

    def _read_record(self, name: str) -> bytes:
        try:
            return self.zip.read(name)
        except (zipfile.BadZipFile, OSError, EOFError, KeyError, zlib.error) as e:
            raise CheckpointError(f"{self.path}: cannot read `{name}` from the checkpoint (truncated or "
                                  f"corrupt: {e})") from e

    def read(self, t: LazyTensor) -> torch.Tensor:
        """The tensor's values, read from its storage record (one storage at a time)."""
        name = f"{self.root}data/{t.storage.key}"
        try:
            with self.zip.open(name) as f:
                buf = bytearray(self.zip.getinfo(name).file_size)
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
