"""Load the text encoders of a diffusers SD3 / SD3.5 or Flux folder (models/mmdit_text.py).

Each component folder (`text_encoder*/`) holds transformers' config.json and model.safetensors, or its shards
with their `*.index.json` (the real T5 XXL: two files, ~9.5 GB in fp16). The modules are built on the meta
device and every tensor is read from its file, cast, and assigned in place (one copy of the weights, as
`load_checkpoint` loads a UNet). The tokenizers come from `tokenizer*/tokenizer.json` (models/tokenizer_json.py).

In fp16 the T5's feed-forward output projections (`wo`) are kept in fp32, as transformers loads T5
(`_keep_in_fp32_modules`); see models/t5.py.
"""
from __future__ import annotations

from pathlib import Path

import torch

from models.mmdit_text import CLIPTower, FluxText, SD3Text
from models.t5 import T5Config, T5EncoderModel
from models.tokenizer_json import read_tokenizer

from .diffusers_keys import text_config
from .layout import BadConfig, CheckpointError
from .sources import Source, open_weights, read_json, read_tensor

# keys a transformers text-encoder file may hold that the modules do not read (no weight: position indices)
IGNORED = ("text_model.embeddings.position_ids",)
# the T5 embedding's two names (transformers ties them; a file holds one or both)
T5_EMBEDDING = ("shared.weight", "encoder.embed_tokens.weight")


def load_sd3_text(folder, dtype=torch.float32, device="cpu") -> SD3Text:
    """SD3 / SD3.5's text module from a diffusers folder: text_encoder/ (CLIP-L), text_encoder_2/ (CLIP-G),
    text_encoder_3/ (T5) and tokenizer/, tokenizer_2/, tokenizer_3/. Eval mode, no gradients."""
    folder = Path(folder)
    parts = require(folder, ("text_encoder", "text_encoder_2", "text_encoder_3"), "SD3")
    with torch.device("meta"):  # the configs first: a bad one is refused before any large file is read
        towers = clip_tower(parts[0], projection=True), clip_tower(parts[1], projection=True), t5_encoder(parts[2])
    tokenizers = {"clip": read_tokenizer(folder / "tokenizer"), "clip_g": read_tokenizer(folder / "tokenizer_2"),
                  "t5": read_tokenizer(folder / "tokenizer_3")}
    return load_parts(SD3Text(*towers, tokenizers), folder, dtype, device)


def load_flux_text(folder, dtype=torch.float32, device="cpu") -> FluxText:
    """Flux's text module from a diffusers folder: text_encoder/ (CLIP-L, pooled output only), text_encoder_2/
    (T5) and tokenizer/, tokenizer_2/. Eval mode, no gradients."""
    folder = Path(folder)
    parts = require(folder, ("text_encoder", "text_encoder_2"), "Flux")
    with torch.device("meta"):  # the configs first: a bad one is refused before any large file is read
        towers = clip_tower(parts[0], projection=False), t5_encoder(parts[1])
    tokenizers = {"clip": read_tokenizer(folder / "tokenizer"), "t5": read_tokenizer(folder / "tokenizer_2")}
    return load_parts(FluxText(*towers, tokenizers), folder, dtype, device)


def require(folder: Path, parts: tuple[str, ...], family: str) -> list[Path]:
    missing = [p for p in parts if not (folder / p / "config.json").is_file()]
    if missing:
        raise CheckpointError(f"{folder}: a diffusers {family} folder has {', '.join(parts)} (each with config.json "
                              f"and its weights); {', '.join(missing)} missing (an incomplete download?)")
    return [folder / p for p in parts]


def clip_tower(part: Path, projection: bool) -> CLIPTower:
    """A CLIP tower from transformers' config.json; `projection`: SD3's towers project their pooled vector."""
    c = read_json(part / "config.json")
    try:
        return CLIPTower(text_config(c), int(c.get("eos_token_id", 49407)),
                         int(c["projection_dim"]) if projection else None)
    except (KeyError, TypeError, ValueError) as e:
        raise BadConfig(f"{part / 'config.json'}: not a usable CLIP text config ({e!r})") from None


def t5_encoder(part: Path) -> T5EncoderModel:
    config = read_json(part / "config.json")
    try:
        return T5EncoderModel(T5Config.from_hf(config))
    except (TypeError, ValueError) as e:
        raise BadConfig(f"{part / 'config.json'}: {e}") from None


def load_parts(model, folder: Path, dtype, device):
    """Every component's tensors read from its weights and assigned to the meta-built module."""
    for name, module in model.named_children():
        load_part(module, open_weights(folder / name), dtype, device)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise CheckpointError(f"{folder}: internal error, still on the meta device after loading: {on_meta[:5]}")
    return model.requires_grad_(False).eval()


def load_part(module: torch.nn.Module, src: Source, dtype, device) -> None:
    """The module's tensors from `src` under the same names, shapes checked; T5's embedding read once under
    whichever of its two names the file has."""
    names = text_names(module, src)
    read = {n: read_tensor(src, n, src.entries[n][0], device, kept_dtype(n, dtype)) for n in set(names.values())}
    module.load_state_dict({k: read[n] for k, n in names.items()}, strict=True, assign=True)


def text_names(module: torch.nn.Module, src: Source) -> dict[str, str]:
    """The module's key -> the file's name for it, every key and shape checked before any tensor is read."""
    wanted = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    names = {k: source_name(k, src) for k in wanted}
    missing = [k for k, n in names.items() if n is None]
    unexpected = sorted(set(src.entries) - set(names.values()) - set(T5_EMBEDDING) - set(IGNORED))
    wrong = [f"{n} {tuple(src.entries[n][0])} (wants {wanted[k]})" for k, n in names.items()
             if n is not None and tuple(src.entries[n][0]) != wanted[k]]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{src.where}: does not fit its config.json: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}, misshapen {wrong[:5]} (a file of another model?)")
    return names


def kept_dtype(key: str, dtype):
    """fp16 everywhere but T5's feed-forward output projections, which stay fp32 (transformers' T5
    `_keep_in_fp32_modules`: T5's activations overflow fp16 there)."""
    return torch.float32 if dtype == torch.float16 and key.endswith("DenseReluDense.wo.weight") else dtype


def source_name(key: str, src: Source) -> str | None:
    """The file's name for one of the module's keys: itself, for T5's embedding either of its names, and for
    CLIP's `text_model.*` also the name without that prefix (how transformers 5 saves a bare CLIPTextModel)."""
    candidates = T5_EMBEDDING if key in T5_EMBEDDING else (key, key.removeprefix("text_model."))
    return next((n for n in candidates if n in src.entries), None)
