"""Named checkpoints and the one way a model is written back to a file.

`load_checkpoint("miniature")` loads the miniature Stable Diffusion that ships in the repository;
any other string is a path. A named entry carries what its users need to know beside the file
(the LocalBlend level its maps are fine enough at). The library finds the file by its place in
the installed tree, so nothing here imports the miniature's package.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models import StableDiffusion, prefixes

from .files import save_safetensors_atomic
from .layout import carried_buffers

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Named:
    path: Path
    description: str
    missing_fix: str                # what to do when the file is not there
    blend_level: int | None = None  # LocalBlend level its users should pass (None: the deepest)


CHECKPOINTS = {
    "miniature": Named(
        ROOT / "p2p" / "miniature" / "miniature.safetensors",
        "the miniature SD that ships with the project: 64x64 pictures of coloured shapes, 16x16 latents",
        "reinstall p2p-torch from a full clone, train one with `python -m p2p.miniature.train`, or give a path",
        # its deepest maps are 8x8 for a 64-px picture, which LocalBlend's 3x3 max-pool spreads over
        # nearly all of it; level 0 (16x16) is as fine, relative to the picture, as SD's default
        blend_level=0),
}
DEFAULT = "miniature"  # the command line's --ckpt when none is given


def named(ckpt) -> Named | None:
    """The registry's entry for a name (None or "": the default's), or None for a path."""
    name = DEFAULT if ckpt in (None, "") else ckpt
    return CHECKPOINTS.get(name) if isinstance(name, str) else None


def resolve_checkpoint(ckpt) -> Path:
    """A checkpoint path, or a name in CHECKPOINTS (None or "": the default) -> its path."""
    entry = named(ckpt)
    if entry is None:
        return Path(ckpt)
    if not entry.path.exists():
        raise FileNotFoundError(f"the named checkpoint {ckpt or DEFAULT!r} ({entry.path}) is missing: "
                                f"{entry.missing_fix}")
    return entry.path


def named_blend_level(ckpt) -> int | None:
    """The LocalBlend level a named checkpoint recommends, by its name or its file's path; None for any other
    path (the deepest level)."""
    entry = named(ckpt)
    if entry is None and isinstance(ckpt, (str, Path)):
        path = Path(ckpt).resolve()
        entry = next((e for e in CHECKPOINTS.values() if e.path.resolve() == path), None)
    return entry.blend_level if entry is not None else None


def checkpoint_state(sd: StableDiffusion, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under their single-file names, on the CPU, floats cast to `dtype`."""
    state = {}
    for part, prefix in prefixes(sd.cfg).items():
        for k, v in getattr(sd, part).state_dict().items():
            v = v.detach().cpu()
            state[prefix + k] = v.to(dtype) if (dtype is not None and v.is_floating_point()) else v
    state |= carried_buffers(sd.cfg)
    return state


def save_checkpoint(sd: StableDiffusion, out, dtype: torch.dtype | None = None) -> Path:
    """Write a model as an original-layout `.safetensors` with its config in the `ldm_config` metadata,
    atomically. One metadata key only: safetensors writes metadata in hash order, so more keys would
    make the bytes differ between runs."""
    return save_safetensors_atomic(checkpoint_state(sd, dtype), out, {"ldm_config": sd.cfg.to_json()})
