"""Open a checkpoint of any supported kind as a `Source`: canonical single-file keys with their
shapes and dtypes (read from headers only), what the file says about its architecture, and a
`fetch(key)` that reads one tensor when the loader wants it.

Formats are recognised by their bytes, not by the file extension: safetensors (8-byte header
length then JSON), torch zip (`.ckpt`, `.pt`, `.bin`), or a diffusers folder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from models import SDConfig
from models.textfile import BadTextFile, parse_json, read_json as read_json_file

from . import diffusers_keys
from .family import folder_family, prediction_name, read_markers, said_in_metadata
from .layout import (SUPPORTED_KINDS, BadConfig, CheckpointError, FolderLayout, canonical_key,
                     check_plausible, detect_variant,
                     family_code, refusal)
from .layouts import LAYOUTS
from .openclip_keys import combine, hf_plan
from .safe_pickle import LazyTensor, Placeholder, TorchZip

SUPPORTED = ("supported: a single-file .safetensors or .ckpt (torch zip, weights flat or under 'state_dict') "
             "of Stable Diffusion v1.x / 2.x, SDXL base or LDM-400M, or a diffusers folder with unet/, vae/ and "
             "text_encoder/ (SDXL: also text_encoder_2/; LDM-400M: bert/, unet/, vqvae/, tokenizer/)")

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The path does not exist."""


@dataclass
class Source:
    where: str
    format: str                                   # "safetensors" | "ckpt" | "diffusers"
    entries: dict[str, tuple[tuple, object]]      # canonical key -> (shape, dtype)
    fetch: Callable[[str], torch.Tensor]
    metadata: dict = field(default_factory=dict)  # safetensors metadata / ckpt top-level items
    config: SDConfig | None = None                # what the file itself says about the architecture
    config_source: str | None = None
    placeholders: list = field(default_factory=list)
    variant: tuple[str, str] | None = None        # (variant, evidence): detected once, when the source is opened
    problem: str | None = None                    # why it cannot load, found while describing it
    prediction: tuple[str, str] | None = None     # (prediction type, where) when the file says it
    zero_snr: str | None = None                   # where a single file says its betas are zero-terminal-SNR

    @property
    def shapes(self) -> dict[str, tuple]:
        return {k: s for k, (s, _) in self.entries.items()}


def open_source(path, vae_given: bool = False) -> Source:
    """`vae_given`: a VAE comes from elsewhere, so a diffusers folder may lack vae/."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFound(f"{path}: no such file or folder; {SUPPORTED}")
    if path.is_dir():
        return open_diffusers(path, vae_given)
    src = with_projection_matrices(open_file(path, path.stat().st_size, sniff(path)))
    src.variant = detect_variant(src.shapes)
    return src


def with_projection_matrices(src: Source) -> Source:
    """OpenCLIP's `text_projection` (a matrix: x @ P) where a saver wrote it as a Linear's weight
    (`...model.text_projection.weight`, P transposed): renamed, its shape and each read transposed."""
    spelled = {k[:-len(".weight")]: k for k, (shape, _) in src.entries.items()
               if k.endswith("model.text_projection.weight") and len(shape) == 2 and k[:-len(".weight")] not in src.entries}
    if not spelled:
        return src
    for key, linear in spelled.items():
        shape, dtype = src.entries.pop(linear)
        src.entries[key] = (tuple(shape)[::-1], dtype)
    fetch = src.fetch
    src.fetch = lambda key: fetch(spelled[key]).t().contiguous() if key in spelled else fetch(key)
    return src


def sniff(path: Path) -> str:
    """"safetensors" or "zip", or a CheckpointError saying what the file looks like instead."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint; {SUPPORTED}")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK"):
        return "zip"
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if len(head) > 8 and head[8:9] == b"{" and 2 <= n < 1 << 32:
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file: its header alone should be {n} bytes "
                                  f"but the file has {size}")
        return "safetensors"
    raise CheckpointError(f"{path}: not a checkpoint ({_looks_like(head)}); {SUPPORTED}")


def _looks_like(head: bytes) -> str:
    magic = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
             b"%PDF": "a PDF document", b"\x1f\x8b": "a gzip archive", b"RIFF": "a RIFF (WebP/WAV) file"}
    for m, what in magic.items():
        if head.startswith(m):
            return f"it looks like {what}"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a bare pickle: torch's legacy (pre-1.6) format or pickle.dump output; re-save it with torch.save"
    try:
        head.decode("utf-8")
        return "it looks like a text file"
    except UnicodeDecodeError:
        return "unrecognised binary data"


def open_file(path: Path, size: int, kind: str) -> Source:
    src = open_safetensors(path, size) if kind == "safetensors" else open_ckpt(path)
    read_markers(src)
    return src


# ------------------------------------------------------------------------------------ safetensors
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def read_safetensors_header(path: Path, size: int) -> tuple[dict, dict]:
    """(entries, metadata) from the JSON header, every entry checked as loading would check it: the
    file holds every byte it names, and the tensors tile the data region without overlap or gap."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER:  # (a header longer than the file is refused when the format is sniffed)
            raise CheckpointError(f"{path}: corrupt safetensors file: its header claims {n} bytes, more than "
                                  f"the {MAX_HEADER} safetensors allows; {SUPPORTED}")
        raw = f.read(n)
    try:
        header = parse_json(raw, f"{path}: its safetensors header", limit=MAX_HEADER)
    except BadTextFile as e:
        raise CheckpointError(f"corrupt safetensors file: {e}; {SUPPORTED}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: a {type(header).__name__}, not a mapping")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map names to strings")
    entries = {k: _header_entry(path, k, v) for k, v in header.items()}
    _check_tiling(path, entries, size - 8 - n)
    return {k: (shape, dtype) for k, (shape, dtype, _) in entries.items()}, metadata


def _header_entry(path: Path, key: str, v) -> tuple[tuple, torch.dtype, tuple[int, int]]:
    """(shape, dtype, (begin, end)) of one tensor's header entry, or a CheckpointError naming it."""
    bad = f"{path}: corrupt safetensors header entry {key!r}"
    if not isinstance(v, dict) or not {"dtype", "shape", "data_offsets"} <= v.keys():
        raise CheckpointError(f"{bad}: it must be a mapping with dtype, shape and data_offsets, got {str(v)[:200]}")
    dtype, shape, offsets = v["dtype"], v["shape"], v["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{bad}: dtype {str(dtype)[:40]!r} is not one of {sorted(SAFETENSORS_DTYPES)}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CheckpointError(f"{bad}: shape must be a list of non-negative integers, got {str(shape)[:200]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{bad}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                              f"got {str(offsets)[:200]}")
    dt = SAFETENSORS_DTYPES[dtype]
    nbytes = math.prod(shape) * dt.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(f"{bad}: shape {shape} of {dtype} is {nbytes} bytes, its data_offsets span "
                              f"{offsets[1] - offsets[0]}")
    return tuple(shape), dt, tuple(offsets)


def _check_tiling(path: Path, entries: dict, data_size: int) -> None:
    """The tensors' byte ranges, in order, start at 0 and follow one another (what safetensors requires)."""
    at = 0
    for key, (_, _, (begin, end)) in sorted(entries.items(), key=lambda kv: kv[1][2]):
        if begin != at:
            what = "overlaps the previous tensor" if begin < at else "leaves a gap after the previous tensor"
            raise CheckpointError(f"{path}: corrupt safetensors file: tensor {key!r} at bytes [{begin}, {end}) {what}")
        at = end
    if at > data_size:
        raise CheckpointError(f"{path}: truncated safetensors file: the header describes {at} bytes of tensors, "
                              f"the file holds {data_size} (an interrupted download or copy?)")


def open_safetensors(path: Path, size: int) -> Source:
    raw, metadata = read_safetensors_header(path, size)
    names = _canonical_names(raw, str(path))

    def fetch(key: str) -> torch.Tensor:
        """One tensor, the file mapped only while it is read: a mapping kept open keeps every page read so far
        resident, and the process would hold the weights twice (the file's pages and the loaded copy)."""
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_tensor(names[key])

    src = Source(str(path), "safetensors", {c: raw[k] for c, k in names.items()}, fetch, dict(metadata),
                 prediction=said_in_metadata(metadata, str(path)))
    if "ldm_config" in metadata:
        try:
            src.config = SDConfig.from_ldm(parse_json(metadata["ldm_config"], "ldm_config"))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: its `ldm_config` metadata is not a usable CompVis config ({e}); "
                                  "pass config= to override it") from e
        src.config_source = "the file's ldm_config metadata"
        check_plausible(src.config, f"{path} (ldm_config metadata)")
    return src


def _canonical_names(keys, where: str) -> dict[str, str]:
    """canonical key -> key in the file; two file keys with one meaning are an error."""
    out: dict[str, str] = {}
    for k in keys:
        c = canonical_key(k)
        if c in out:
            raise CheckpointError(f"{where}: both `{out[c]}` and `{k}` are present (old and new CLIP prefix)")
        out[c] = k
    return out


# ------------------------------------------------------------------------------------------- ckpt
def open_ckpt(path: Path) -> Source:
    tz = TorchZip(path)
    obj = tz.obj
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the pickle holds a {type(obj).__name__}, not a dict of tensors; {SUPPORTED}")
    nested = isinstance(obj.get("state_dict"), dict)
    state = obj["state_dict"] if nested else obj
    tensors = {k: v for k, v in state.items() if isinstance(v, LazyTensor)}
    if not tensors:
        raise CheckpointError(f"{path}: a torch file without tensors (keys: {list(obj)[:6]}), not a model checkpoint")
    names = _canonical_names(tensors, str(path))
    extras = {k: _summary(v, tz.read) for k, v in obj.items()
              if k != "state_dict" and (nested or not isinstance(v, LazyTensor))}
    src = Source(str(path), "ckpt", {c: (tensors[k].shape, tensors[k].dtype) for c, k in names.items()},
                 lambda key: tz.read(tensors[names[key]]), extras, placeholders=tz.placeholders)
    src.format = "ckpt (weights under 'state_dict')" if nested else "ckpt (flat)"
    return src


def _summary(v, read) -> str:
    """A top-level entry in a line: plain values as they are, a one-element tensor (a `global_step`
    saved as a tensor) by its value, anything else by its kind and size."""
    if isinstance(v, (int, float, str, bool)) or v is None:
        return repr(v)
    if isinstance(v, Placeholder):
        return repr(v)
    if isinstance(v, dict):
        return f"dict with {len(v)} entries" + (f" ({', '.join(map(str, list(v)[:3]))})" if v else "")
    if isinstance(v, LazyTensor):
        if math.prod(v.shape) == 1:
            return repr(read(v).item())
        return f"tensor {list(v.shape)} {v.dtype}"
    return type(v).__name__ + (f" of {len(v)}" if hasattr(v, "__len__") else "")


# -------------------------------------------------------------------------------------- diffusers
# in the order taken: as diffusers, the files without a variant first (an fp32 .bin before an .fp16.safetensors,
# which would be upcast); a variant's file only where a part has no other
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
                "diffusion_pytorch_model.fp16.bin", "pytorch_model.fp16.bin")


# a folder's weights split into shards (diffusers' and transformers' `max_shard_size`): the index names the
# shard of every key. Each weights file's index: its name with `.index.json` added, a variant's also with the
# variant after `index` (`model.safetensors.index.fp16.json`, as diffusers and transformers write it)
INDEX_NAMES = {name: (name + ".index.json",) + ((name.replace(".fp16", "") + ".index.fp16.json",) if ".fp16." in name else ())
               for name in WEIGHT_FILES}
INDEX_FILES = tuple(n for names in INDEX_NAMES.values() for n in names)


def weights_file(folder: Path) -> Path:
    """The folder's one weights file, or its shards' index (`*.index.json`)."""
    for name in (n for w in WEIGHT_FILES for n in (w, *INDEX_NAMES[w])):  # each kind whole, then sharded
        if (folder / name).exists():
            return folder / name
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_FILES[:2])}, ..., and the "
                          f"sharded {INDEX_FILES[0]}, ...)")


def open_weights(folder: Path) -> Source:
    """A component folder's weights as one Source: its one file, or its shards opened lazily (headers only;
    each tensor read from its shard when the loader asks, so the whole holds one copy of the weights)."""
    path = weights_file(folder)
    if path.name in INDEX_FILES:
        return open_sharded(path)
    return open_file(path, path.stat().st_size, sniff(path))


def open_sharded(index_path: Path) -> Source:
    """The shards an index names, as one Source; an index that names a missing shard or a key its shard does
    not hold is refused before any tensor is read."""
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: a shard index must map every tensor name to its shard file "
                              "(`weight_map`); this one does not (an incomplete download?)")
    entries, fetchers = {}, {}
    for name in sorted(set(weight_map.values())):
        shard = index_path.parent / name
        if Path(name).name != name or not shard.is_file():
            raise CheckpointError(f"{index_path}: names the shard {name!r}, which is not in {index_path.parent} "
                                  "(an incomplete download? every shard the index names must be there)")
        sub = open_file(shard, shard.stat().st_size, sniff(shard))
        keys = [k for k, v in weight_map.items() if v == name]
        absent = [k for k in keys if k not in sub.entries]
        if absent:
            raise CheckpointError(f"{index_path}: names {absent[:3]} in {name}, which does not hold them")
        entries.update({k: sub.entries[k] for k in keys})
        fetchers.update(dict.fromkeys(keys, sub.fetch))
    fmt = "safetensors" if ".safetensors.index." in index_path.name else "ckpt"
    return Source(str(index_path), f"{fmt} (sharded: {len(set(weight_map.values()))} files)", entries,
                  lambda key: fetchers[key](key))


def read_tensor(src: Source, key: str, want: tuple, device, dtype) -> torch.Tensor:
    """One tensor, shim-reshaped to the model's shape, floats cast to `dtype`, in memory of its own: never
    a view of the file's memory map (a file rewritten in place during a run would crash it or mix two models)."""
    t = src.fetch(key)
    if tuple(t.shape) != tuple(want):
        t = t.reshape(want)  # validated: only the documented [C,C] <-> [C,C,1,1] shims get here
    return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=True)


def read_json(path: Path) -> dict:
    try:
        data = read_json_file(path, "config")
    except BadTextFile as e:
        raise BadConfig(f"unreadable config: {e}") from e
    if not isinstance(data, dict):
        raise BadConfig(f"{path}: a config.json is a mapping of settings, got a {type(data).__name__}")
    return data


def open_diffusers(folder: Path, vae_given: bool = False) -> Source:
    """A diffusers folder as one Source whose keys are the single-file names, through its family's folder
    layout (layouts.py); a folder of another kind, with a component missing or whose config.json files
    disagree is described (its keys as `component/key`) with the reason it cannot load."""
    components = sorted(d.name for d in folder.iterdir() if (d / "config.json").exists())
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").exists() else {}
    if not index and not {"unet", "vae", "text_encoder", "transformer", "bert"} & set(components):
        raise CheckpointError(f"{folder}: a folder, but not a diffusers model folder (no unet/, vae/, "
                              f"text_encoder/ with config.json); {SUPPORTED}")
    unet_json = read_json(folder / "unet" / "config.json") if "unet" in components else {}
    variant = folder_family(folder, index, unet_json)
    scheduler, sched_path = _read_scheduler(folder)
    prediction = _scheduler_prediction(scheduler, sched_path)
    problem = refusal(*variant, str(folder))
    code = family_code(variant[0])
    if problem is not None or code is None:
        return _describe_folder(folder, components, index, variant, problem or f"{folder}: {variant[1]}; {SUPPORTED}",
                                prediction)
    layout = LAYOUTS[code].folder
    missing = [d for p, d in layout.parts.items() if d not in components and not (p == "vae" and vae_given)]
    if missing:  # described for inspect, refused by load
        dirs, needs = ", ".join(d + "/" for d in missing), ", ".join(d + "/" for d in layout.parts.values())
        problem = (f"{folder}: this is a {variant[0]} checkpoint ({variant[1]}), but it lacks {dirs}: a diffusers "
                   f"folder without {dirs} (missing component) does not load; it needs {needs}, each with config.json "
                   f"and weights; {SUPPORTED_KINDS}")
        return _describe_folder(folder, components, index, variant, problem, prediction)
    try:
        parts, configs, cfg = _folder_config(folder, layout, components, index, scheduler)
    except BadConfig as e:  # refused everywhere, before any weight file is opened
        raise BadConfig(f"{folder}: this is a {variant[0]} checkpoint ({variant[1]}), but {e}") from e
    except CheckpointError as e:  # a model this package does not run: described for inspect, refused by load
        problem = f"{folder}: this is a {variant[0]} checkpoint ({variant[1]}), but {e}; {SUPPORTED_KINDS}"
        return _describe_folder(folder, components, index, variant, problem, prediction)
    src = _diffusers_source(folder, {p: d for p, d in parts.items() if d not in layout.openclip_towers}, configs, cfg,
                            layout.key, index, variant, prediction)
    for d, prefix in layout.openclip_towers.items():
        src = _with_openclip_tower(src, folder / d, prefix)
    return src


def _folder_config(folder: Path, layout: FolderLayout, components: list, index: dict, scheduler):
    """(parts present, their config.json files, SDConfig) of a family's folder, or a CheckpointError."""
    parts = {p: d for p, d in layout.parts.items() if d in components}
    configs = {p: read_json(folder / d / "config.json") for p, d in parts.items()}
    configs.setdefault("vae", diffusers_keys.SD_V1_VAE)
    return parts, configs, layout.config(folder, configs, scheduler, index)


def _with_openclip_tower(src: Source, tower: Path, prefix: str) -> Source:
    """`src` plus a folder's transformers CLIPTextModel(WithProjection) in OpenCLIP's keys under `prefix`,
    each fused `in_proj_*` read from its three tensors (and the projection transposed) only when the
    loader asks for it."""
    text = open_weights(tower)
    plan = {prefix + k: hf for k, hf in hf_plan(text.entries, str(tower)).items()}
    for key, hf in plan.items():
        shape, dtype = text.entries[hf[0]]
        shape = (len(hf) * shape[0], *shape[1:]) if len(hf) > 1 else shape[::-1] if key.endswith("projection") else shape
        src.entries[key] = (tuple(shape), dtype)
    fetch_other = src.fetch

    def fetch(key: str) -> torch.Tensor:
        if key in plan:
            return combine(key[len(prefix):], [text.fetch(k) for k in plan[key]])
        return fetch_other(key)

    src.fetch = fetch
    return src


def _read_scheduler(folder: Path) -> tuple[dict | None, Path]:
    path = folder / "scheduler" / "scheduler_config.json"
    return (read_json(path) if path.exists() else None), path


def _diffusers_source(folder: Path, parts: dict, configs: dict, cfg: SDConfig, to_ldm_key, index: dict,
                      variant: tuple, prediction) -> Source:
    """Every part's weights under their single-file names (`to_ldm_key(part, key, config, where)`)."""
    check_plausible(cfg, f"{folder} (config.json files)")
    entries, fetchers = {}, {}
    for part, d in parts.items():
        sub = open_weights(folder / d)
        for key, entry in sub.entries.items():
            ldm = to_ldm_key(part, key, configs[part], str(folder / d))
            entries[ldm] = entry
            fetchers[ldm] = (sub.fetch, key)
    return Source(str(folder), "diffusers", entries, lambda k: fetchers[k][0](fetchers[k][1]),
                  {"model_index": index} if index else {}, cfg, "the diffusers config.json files", variant=variant,
                  prediction=prediction)


def _scheduler_prediction(scheduler: dict | None, path: Path) -> tuple[str, str] | None:
    if scheduler and "prediction_type" in scheduler:
        return prediction_name(scheduler["prediction_type"], str(path)), "the folder's scheduler_config.json"
    return None


def _describe_folder(folder: Path, components: list, index: dict, variant: tuple, problem: str,
                     prediction=None) -> Source:
    """A folder that will not load, for `inspect`: each component's tensors as `component/key`."""
    entries = {}
    for d in components:
        if any((folder / d / name).exists() for name in WEIGHT_FILES + INDEX_FILES):
            entries.update({f"{d}/{k}": e for k, e in open_weights(folder / d).entries.items()})

    def fetch(key: str) -> torch.Tensor:
        raise CheckpointError(problem)

    return Source(str(folder), "diffusers", entries, fetch, {"model_index": index} if index else {},
                  variant=variant, problem=problem, prediction=prediction)
