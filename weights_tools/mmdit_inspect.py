"""`p2p inspect` of the MM-DiT single files and the part files kept beside them: which model or part a file is
(with the keys that tell it), what of it loads, and what else is needed (each with the flag that gives it).
Headers only: no tensor is read."""
from __future__ import annotations

from pathlib import Path

from .flux_keys import COMFY_PREFIX, is_bfl_flux
from .layout import CheckpointError
from .mmdit_files import SD3_FAMILY, SD3_TEXT, open_single, prepare
from .mmdit_parts import OPTIONAL_TEXT, prefixed, tower, with_identity_projection
from .mmdit_text import text_names
from .sd3_keys import PREFIX, is_sd3_file, sd3_file_config, sd3_model_name
from .vae_swap import VAE

FLOW = {"prediction_type": "flow", "prediction_source": "velocity of flow matching (FlowMatchEulerDiscreteScheduler)"}
TOWER_NAMES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5 XXL"}


def describe_mmdit_file(path) -> dict | None:
    """inspect_checkpoint's fields for an SD3 / SD3.5 single file, BFL's Flux transformer or a part file (a
    16-channel VAE, CLIP-L / CLIP-G, T5), with `holds` and `needs`; None for any other file."""
    path = Path(path)
    if not path.is_file():
        return None
    src = open_single(path)
    if is_sd3_file(src.entries):
        return describe_sd3(src)
    if is_bfl_flux(src.entries):
        return describe_flux(src)
    return describe_part(src)


def groups(src, prefixes: dict[str, str]) -> dict[str, dict]:
    """The file's entries by part (name -> prefix, first match; "" takes the rest), for the tensor counts."""
    out: dict[str, dict] = {}
    for key, entry in src.entries.items():
        name = next(n for n, p in prefixes.items() if key.startswith(p))
        out.setdefault(name, {})[key] = entry
    return out


def problem_of(check) -> str | None:
    try:
        check()
        return None
    except CheckpointError as e:
        return str(e)


def text_held(src) -> list[str]:
    return [k for k, p in SD3_TEXT.items() if any(e.startswith(p) for e in src.entries)]


def check_towers(src, kinds) -> None:
    """The file's own text towers against the released towers' shapes."""
    for kind in kinds:
        s = prefixed(src, SD3_TEXT[kind], f"{src.where} ({SD3_TEXT[kind]}*)", drop=OPTIONAL_TEXT[1:])
        s = with_identity_projection(s) if kind == "clip_l" else s
        text_names(tower(kind, s, None, projection=True), s)


def describe_sd3(src) -> dict:
    try:
        cfg = sd3_file_config(src.shapes, src.metadata, src.where)
    except CheckpointError as e:  # keys missing or of another model: named, not loadable
        return {"variant": "SD3", "model": "SD3 / SD3.5 (unreadable)", "family": None, "loadable": False,
                "variant_evidence": f"found `{PREFIX}joint_blocks.*`", "config_source": "none: the keys it needs are missing", "problem": str(e),
                **FLOW,
                "holds": [], "needs": [], "groups": groups(src, {"transformer": PREFIX, "other": ""})}
    model, evidence = sd3_model_name(cfg)
    held = text_held(src)
    has_vae = any(k.startswith(VAE) for k in src.entries)
    needs = [] if has_vae else ["a VAE: --vae FILE (SD3's VAE), or --base a diffusers SD3 folder holding vae/"]
    missing = [k for k in SD3_FAMILY.towers if k not in held]
    if missing:
        needs.append(f"text encoders {', '.join(TOWER_NAMES[k] for k in missing)}: "
                     f"{', '.join(SD3_FAMILY.flat_files[k] for k in missing)}, or --base a diffusers SD3 folder "
                     "holding text_encoder/, text_encoder_2/, text_encoder_3/")
    needs.append("tokenizers (no single file carries them): --base a diffusers SD3 folder holding tokenizer/, "
                 "tokenizer_2/, tokenizer_3/ (their tokenizer.json files are enough)")
    holds = ["MM-DiT transformer"] + ["VAE"] * has_vae + [TOWER_NAMES[k] for k in held]
    problem = problem_of(lambda: (prepare(src.where, text=False), check_towers(src, held)))
    return {"variant": "SD3.5" if cfg.qk_norm or cfg.dual_attention_layers else "SD3", "model": model,
            "variant_evidence": f"found `{PREFIX}joint_blocks.*`: {evidence}", "family": None,
            "config_source": "the file's shapes" + (" (its mmdit_config metadata)" if "mmdit_config" in src.metadata
                                                    else ""),
            **FLOW, "loadable": problem is None, "problem": problem, "holds": holds, "needs": needs,
            "groups": groups(src, {"transformer": PREFIX, "vae": VAE, **SD3_TEXT, "other": ""})}


def describe_flux(src) -> dict:
    keys = {k.removeprefix(COMFY_PREFIX) for k in src.entries}
    dev = "guidance_in.in_layer.weight" in keys
    model = "FLUX.1-dev" if dev else "FLUX.1-schnell"
    evidence = ("found BFL's `double_blocks.*` and `img_in.weight`" + (", ComfyUI's `model.diffusion_model.` prefix"
                if any(k.startswith(COMFY_PREFIX) for k in src.entries) else "")
                + ("; `guidance_in.*`: the guidance embedding of dev (and its fine-tunes)" if dev
                   else "; no `guidance_in.*`: schnell (no guidance embedding)"))
    needs = ["the VAE: --vae ae.safetensors", "text encoders: clip_l.safetensors (--clip-l), t5xxl_fp16.safetensors "
             "(--t5)", "tokenizers (no single file carries them): --base a diffusers FLUX.1 folder holding "
             "tokenizer/, tokenizer_2/ (a diffusers FLUX.1 folder given as --base also gives the VAE and text "
             "encoders it holds)"]
    problem = problem_of(lambda: prepare(src.where, text=False))
    return {"variant": "Flux", "model": model, "variant_evidence": evidence, "family": None,
            "config_source": "the file's shapes (rotary axes: FLUX.1's (16, 56, 56))", **FLOW,
            "loadable": problem is None, "problem": problem, "holds": ["Flux transformer"], "needs": needs,
            "groups": groups(src, {"transformer": ""})}


def part_kind(src) -> tuple[str, str, str] | None:
    """(what part a file is, the evidence, the flag that gives it) for a part file, else None."""
    s = src.shapes
    conv_out = s.get("encoder.conv_out.weight")
    if conv_out is not None and "decoder.conv_out.weight" in s and conv_out[0] == 32:
        return ("16-channel VAE of SD3 / Flux in LDM names (BFL's ae.safetensors)",
                "found `encoder.down.*` / `decoder.up.*` with 16 latent channels (`encoder.conv_out`)", "--vae")
    emb = s.get("text_model.embeddings.token_embedding.weight")
    if emb is not None:
        name = {768: ("CLIP-L", "--clip-l"), 1280: ("CLIP-G", "--clip-g")}.get(emb[1], (f"CLIP of width {emb[1]}",
                                                                                     "--clip-l / --clip-g"))
        return (f"{name[0]} text encoder (transformers' names)", f"found `text_model.*`, width {emb[1]}", name[1])
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in s:
        width = (s.get("shared.weight") or s.get("encoder.embed_tokens.weight") or (0, "?"))[1]
        return (f"T5 encoder (transformers' names, d_model {width}" + (": T5 v1.1 XXL)" if width == 4096 else ")"),
                "found `encoder.block.*`", "--t5")
    return None


def describe_part(src) -> dict | None:
    kind = part_kind(src)
    if kind is None:
        return None
    what, evidence, flag = kind
    problem = (f"{src.where}: a {what}, one part of a model, not a model: give it with {flag} beside an SD3 / "
               "SD3.5 single file or BFL's flux1-dev / flux1-schnell.safetensors")
    return {"variant": what, "model": what, "variant_evidence": evidence, "family": None,
            "config_source": "none (a part file)", "prediction_type": None, "prediction_source": "not a whole model",
            "loadable": False, "problem": problem, "holds": [what], "needs": [f"{flag} beside a transformer file"],
            "groups": groups(src, {flag.split()[0].lstrip("-"): ""})}
