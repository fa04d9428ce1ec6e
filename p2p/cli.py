"""`p2p generate | edit | invert | inspect | sweep | bench | demo`: the command line.

Every flag's string is parsed here into the typed configs of p2p.config (GenerateConfig, EditConfig,
InvertConfig); a flag left out takes the config file's value, else the dataclass default.

Every output comes with a JSON sidecar named after it (x.png -> x.png.json) holding every setting,
the checkpoint's SHA-256 and the library version, so any figure can be regenerated. Every path is
checked before the model loads; a run's files are written only once everything has run, and all
of them or none (weights_tools.files.write_files_atomic): a failure leaves no file of it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from pathlib import Path

import torch

import p2p  # p2p.edit etc. looked up at call time: tests swap them for wrappers
from weights_tools import format_inspection, inspect_checkpoint, load_checkpoint, tokenizer_for
from weights_tools.load import AssumedPrediction, IgnoredKeys
from weights_tools.files import file_sha256, hashed_read, json_bytes, write_files_atomic
from weights_tools.mmdit import mmdit_pipeline
from weights_tools.registry import DEFAULT as DEFAULT_CKPT, resolve_checkpoint

from .bench.command import add_arguments as bench_arguments
from .blend import model_level
from .config import (JOINT_MODE, EditConfig, GenerateConfig, InvertConfig, check_config_ckpt, check_values,
                     load_edit_config, read_yaml, to_dict)
from .images import open_image
from .inversion import reconstruct, require_inverse_step
from .joint_control import model_layout
from .joint_inversion import inversion_defaults
from .joint_pipeline import is_mmdit, model_defaults, to_uint8_rounded
from .pipeline import to_uint8
from .settings import (add_flags, flag_values, keywords, markdown_table, setting, settings_of, use_threads,
                       write_table)
from .sweep import add_arguments as sweep_arguments, run_from_args as run_sweep
from .sweep.command import DTYPES, dtype_option, model_option_flags
from .viz import attention_pictures, image_bytes, image_format, image_grid, joint_attention_pictures

SAMPLING = [s.name for s in settings_of("sampling")]
INVERTED = ("num_steps", "guidance_scale", "height", "width")  # what an MM-DiT edit takes from its inversion
ATTENTION_KINDS = ("attention", "self_attention")  # the pictures --show-attention writes, per prompt


# ------------------------------------------------------------------------------- flags -> configs
def given(args, cls) -> dict:
    """The fields of `cls` given as flags, as config values (a flag left out is None: the file's or the
    default value)."""
    return flag_values(args, [f.name for f in dataclasses.fields(cls)])


def explicit(args, cls) -> set:
    """The settings of `cls` a run was given: its flags, and the keys of its --config file (edit)."""
    keys = set(given(args, cls))
    return keys | set(read_yaml(args.config)) if getattr(args, "config", None) else keys


def is_mmdit_ckpt(ckpt) -> bool:
    """Whether the checkpoint is a diffusers SD3 / Flux folder (its model_index.json; no tensor read)."""
    return mmdit_pipeline(resolve_checkpoint(ckpt)) is not None


def model_settings(sd, cfg, given_keys):
    """The settings of a run on this model: an MM-DiT model's own steps and guidance (invert: its method and
    inversion guidance, p2p.joint_inversion.inversion_defaults) where `given_keys` has none, and the UNet's
    steps_offset and sampler left out (None) unless given, which the API then refuses by name. A UNet model's
    settings as they are."""
    if not is_mmdit(sd):
        return cfg
    steps, guidance = model_defaults(sd, None, None)
    own = {"num_steps": steps, "guidance_scale": guidance, "steps_offset": None, "sampler": None}
    if isinstance(cfg, InvertConfig):
        own |= inversion_defaults(sd)
    return dataclasses.replace(cfg, **{k: v for k, v in own.items() if k not in given_keys})


def local_blend_flags(args, base):
    """The LocalBlend flags (--blend WORD ..., --blend-threshold, ...) over the config file's LocalBlend `base`."""
    flags = {name.partition(".")[2]: v
             for name, v in flag_values(args, [s.name for s in settings_of("local_blend")]).items()}
    if not flags:
        return base
    if base is None and "words" not in flags:
        named = ", ".join(setting(f"local_blend.{k}").flag for k in flags)
        raise ValueError(f"{named}: LocalBlend's flags need --blend WORD WORD ... (source word first)")
    return dataclasses.replace(base, **flags) if base is not None else p2p.LocalBlend(**flags)


def edit_config(args) -> EditConfig:
    """The edit's settings: the defaults, then --config FILE, then the flags given (a flag replaces its key's
    value)."""
    cfg = load_edit_config(args.config) if args.config else EditConfig()
    if args.config and args.ckpt is None:  # the file's checkpoint, relative to the file
        check_config_ckpt(cfg.ckpt, args.config)
    cfg = dataclasses.replace(cfg, **given(args, EditConfig), local_blend=local_blend_flags(args, cfg.local_blend))
    if not cfg.prompt and args.inversion:  # the prompt the photo was inverted with, as the .inv holds it
        cfg = dataclasses.replace(cfg, prompt=p2p.Inversion.load(args.inversion).prompt)
    for key, flag in (("prompt", "--prompt"), ("edits", "--edit")):
        if not getattr(cfg, key):
            raise ValueError(f"missing {key}: give {flag} or set it in --config")
    return cfg


def memory_options(args) -> dict:
    """--low-memory: the guidance batch in two halves, the VAE one image at a time (tiled above 512 px),
    the text encoder and VAE offloaded to the CPU between uses; the same pictures (see p2p.pipeline)."""
    low = bool(getattr(args, "low_memory", False))
    return {"low_memory": low, "offload": low}


def check_outputs(pictures=(), files=()) -> None:
    """Every output path usable, checked before a model loads: no two alike, a picture's format from its
    extension, no path that is a folder, a parent folder that is a folder and writable."""
    paths = [Path(p).resolve() for p in [*pictures, *files]]
    if len(set(paths)) != len(paths):
        twice = sorted({str(p) for p in paths if paths.count(p) > 1})
        raise ValueError(f"two outputs of one run share a path: {twice}")
    for p in map(Path, pictures):
        image_format(p)
    for p in map(Path, [*pictures, *files]):
        if p.is_dir():
            raise ValueError(f"output {p} is a folder: give a file name")
        near = next(a for a in [p.parent, *p.parent.parents] if a.exists())  # the folder it will be written in
        if not near.is_dir() or not os.access(near, os.W_OK):
            why = "a file" if not near.is_dir() else "not writable"
            raise ValueError(f"output {p}: cannot write in {near} ({why})")


def sidecar(output) -> Path:
    """An output's JSON record: its whole name plus .json, so x.png and x.jpg keep one each."""
    return Path(output).with_name(Path(output).name + ".json")


def attention_path(output: Path, kind: str, i: int) -> Path:
    """--show-attention's picture `kind` of prompt i, beside the grid: edit.png -> edit_attention_0.png."""
    return output.with_name(f"{output.stem}_{kind}_{i}{output.suffix}")


def write_outputs(files: dict) -> None:
    """A run's {path: bytes}, all or none, each picture and file followed by its sidecar."""
    print("wrote " + ", ".join(map(str, write_files_atomic(files))))


# a checkpoint's path -> the SHA-256 of the bytes load_model read from it: the sidecar's, taken as it was read
# (a file replaced or moved during the run is recorded as the one that made the picture)
READ_SHA256: dict = {}


def load_model(ckpt, dtype: str = "float32", non_strict: bool = False, vae=None, prediction_type=None,
               tokenizer=None, model_config=None, base=None, **text_files):
    """The checkpoint on the GPU if there is one, in `dtype` (a --dtype name); --non-strict's ignored
    keys listed on stderr; `tokenizer`: --tokenizer (LDM's vocabulary); `model_config`: --model-config;
    `text_files`: --clip-l, --clip-g, --t5 (SD3 / Flux single files' text encoders)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IgnoredKeys)
        warnings.simplefilter("always", AssumedPrediction)
        path = resolve_checkpoint(ckpt)
        # hashed before reading too: the record names the files the model was read from
        for extra in (vae, base, *text_files.values()):
            if extra is not None:
                READ_SHA256[Path(extra)] = file_sha256(extra)
        sd, READ_SHA256[path] = hashed_read(path, lambda: load_checkpoint(
            ckpt, device="cuda" if torch.cuda.is_available() else "cpu", dtype=DTYPES[dtype], strict=not non_strict,
            vae=vae, prediction_type=prediction_type, tokenizer=tokenizer, config=model_config, base=base,
            **text_files))
    for w in caught:
        if issubclass(w.category, (IgnoredKeys, AssumedPrediction)):
            print(f"p2p: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return sd


def model_options(args) -> dict:
    """--model-config, --base, --non-strict, --vae, --prediction-type, --tokenizer, --clip-l, --clip-g, --t5: how
    the checkpoint is read (load_model's keywords)."""
    return {"model_config": args.model_config, "base": args.base, "non_strict": args.non_strict, "vae": args.vae,
            "prediction_type": args.prediction_type, "tokenizer": args.tokenizer, "clip_l": args.clip_l,
            "clip_g": args.clip_g, "t5": args.t5}


def settings_record(settings: dict, ckpt, args) -> dict:
    """What a sidecar holds: the settings, the checkpoint and its SHA-256, how it was read (a swapped-in
    VAE and a --base model by their SHA-256 too), versions, and the command's own words."""
    path = resolve_checkpoint(ckpt)
    vae = {f"{flag}_sha256": READ_SHA256.get(Path(getattr(args, flag))) or file_sha256(getattr(args, flag))
           for flag in ("vae", "base", "clip_l", "clip_g", "t5") if getattr(args, flag)}
    sha = READ_SHA256.get(path) or file_sha256(path)
    return {"settings": settings, "checkpoint": str(path), "checkpoint_sha256": sha, "dtype": args.dtype,
            "p2p_version": p2p.__version__, "torch": torch.__version__, "argv": args.argv} | model_options(args) | vae


# ------------------------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    cfg = GenerateConfig(**given(args, GenerateConfig))
    check_values(cfg, "the command line")
    output = Path(args.output)
    check_outputs([output], [sidecar(output)])
    sd = load_model(cfg.ckpt, args.dtype, **model_options(args))
    cfg = model_settings(sd, cfg, set(given(args, GenerateConfig)))
    out = p2p.generate(sd, list(cfg.prompts), **api_keywords(cfg, "GenerateConfig"), **memory_options(args))
    record = settings_record(to_dict(cfg), cfg.ckpt, args) | memory_options(args)
    write_outputs({output: image_bytes(image_grid(out.images, list(cfg.prompts), min_size=256), output),
                   sidecar(output): json_bytes(record)})
    return 0


def cmd_edit(args) -> int:
    cfg = edit_config(args)
    said, joint = explicit(args, EditConfig), is_mmdit_ckpt(cfg.ckpt)
    if joint:  # words are checked against the model's tokenizers when the edit starts
        cfg = cfg if "mode" in said else dataclasses.replace(cfg, mode=JOINT_MODE)
        spec, blend = cfg.check_joint(args.config or "the command line")
    else:  # words too, before loading, with the checkpoint's own tokenizer
        spec, blend = cfg.check(args.config or "the command line", tokenizer_for(cfg.ckpt, args.tokenizer))
    if not joint and (args.image or (args.inversion and args.sampler)):  # a photo needs a sampler with an inverse step
        require_inverse_step(cfg.sampler, "the command line")
    output = Path(args.output)
    kinds = ATTENTION_KINDS[:1] if joint else ATTENTION_KINDS
    shown = [attention_path(output, k, i) for k in kinds for i in range(len(cfg.prompts))]
    check_outputs([output, *(shown if cfg.show_attention else [])], [sidecar(output)])
    sd = load_model(cfg.ckpt, args.dtype, **model_options(args))
    cfg, inv, photo = prepare_inversion(args, cfg, sd, spec, said)  # --image / --inversion: edit a real photo
    cfg = model_settings(sd, cfg, said | (set(INVERTED) if inv is not None else set()))
    store = ((p2p.JointAttentionStore() if joint else p2p.AttentionStore(self_attention=True))
             if cfg.show_attention else None)
    out = p2p.edit(sd, cfg.prompts, spec, local_blend=blend, store=store, **api_keywords(cfg, "EditConfig"),
                   inversion=inv, allow_other_model=args.allow_other_model, **memory_options(args))
    outputs = {output: image_grid(out.images, cfg.prompts, min_size=256)}
    if cfg.show_attention:
        outputs |= {attention_path(output, kind, i): pic for kind, row in shown_attention(sd, out, cfg, blend).items()
                    for i, pic in enumerate(row)}
    record = (settings_record(to_dict(cfg) | photo, cfg.ckpt, args) | memory_options(args)
              | {"spec": repr(spec), "local_blend": repr(blend)})
    files = {path: image_bytes(img, path) for path, img in outputs.items()}
    write_outputs(files | {sidecar(output): json_bytes(record)})
    return 0


def shown_attention(sd, out, cfg, blend) -> dict:
    """--show-attention's pictures, kind -> one per prompt. A UNet model's: at the level LocalBlend reads, else
    the model's recommended one, else the deepest; an MM-DiT model's: each word's joint map over every block."""
    if is_mmdit(sd):
        return joint_attention_pictures(out.attention, out.images, cfg.prompts, model_layout(sd))
    level = blend.level if blend is not None and blend.level is not None else model_level(sd)
    return attention_pictures(out.attention, out.images, cfg.prompts, sd.tokenizer, level)


def api_keywords(cfg, config: str) -> dict:
    """The settings of `cfg` that its API function (p2p.generate / edit / invert) takes as keywords."""
    return {k: getattr(cfg, k) for k in keywords(config)}


def run_inversion(sd, image, prompt, cfg: InvertConfig, args):
    low = memory_options(args)["low_memory"]
    return p2p.invert(sd, image, prompt, **api_keywords(cfg, "InvertConfig"), low_memory=low)


def prepare_inversion(args, cfg: EditConfig, sd, spec=None, said=frozenset()) -> tuple:
    """For `p2p edit --image` (invert now) or `--inversion` (a saved one): (cfg with the sampling settings
    the inversion fixes, the Inversion, what the sidecar records of it); (cfg, None, {}) otherwise.
    A sampling flag given explicitly stays (edit() says if it conflicts); file or default values give way.
    A spec that follows the inversion (PlugAndPlay) keeps its own steps and guidance. said: the settings the
    run was given (`explicit`), the rest of an MM-DiT model's inversion its own (model_settings)."""
    if not args.image and not args.inversion:
        return cfg, None, {}
    if args.inversion:
        inv = p2p.Inversion.load(args.inversion)
    else:
        sampling = {k: getattr(cfg, k) for k in SAMPLING}
        inv_cfg = InvertConfig(**given(args, InvertConfig) | sampling)
        inv_cfg = model_settings(sd, inv_cfg, set(given(args, InvertConfig)) | (set(said) & set(SAMPLING)))
        inv = run_inversion(sd, args.image, cfg.prompt, inv_cfg, args)
    explicit = flag_values(args, SAMPLING)
    if getattr(spec, "follows_inversion", False):
        explicit = {**explicit, "num_steps": cfg.num_steps, "guidance_scale": cfg.guidance_scale}
    cfg = dataclasses.replace(cfg, **{k: getattr(inv, k) for k in SAMPLING if k not in explicit})
    return cfg, inv, dict(image=args.image, inversion=args.inversion, method=inv.method, inversion_info=inv.info,
                          inversion_model=None if inv.model is None else str(inv.model))


def cmd_invert(args) -> int:
    """Invert a photo and save the Inversion (safetensors) with its JSON sidecar; --reconstruction also
    writes the picture the inverted prompt gives back from it."""
    cfg = InvertConfig(**given(args, InvertConfig))
    check_values(cfg, "the command line")
    require_inverse_step(cfg.sampler, "the command line")
    open_image(args.image)  # a missing or unreadable picture fails before the model loads
    output = Path(args.output)
    check_outputs([args.reconstruction] if args.reconstruction else [], [output, sidecar(output)])
    ckpt = args.ckpt or DEFAULT_CKPT
    sd = load_model(ckpt, args.dtype, **model_options(args))
    cfg = model_settings(sd, cfg, set(given(args, InvertConfig)))
    inv = run_inversion(sd, args.image, args.prompt, cfg, args)
    rec = reconstruction(sd, inv, memory_options(args)["low_memory"]) if args.reconstruction else None
    settings = {"image": args.image, "prompt": args.prompt} | to_dict(cfg)
    record = (settings_record(settings, ckpt, args) | memory_options(args)
              | {"inversion": inv.info, "model": str(inv.model)})
    files = {output: inv.to_bytes()} | ({args.reconstruction: image_bytes(rec, args.reconstruction)} if rec is not None
                                        else {})
    write_outputs(files | {sidecar(output): json_bytes(record)})
    return 0


@torch.no_grad()
def reconstruction(sd, inv, low_memory: bool):
    """The picture (H, W, 3) uint8 the inverted prompt gives back from the inversion."""
    z0 = reconstruct(sd, inv, low_memory=low_memory)
    if is_mmdit(sd):
        return to_uint8_rounded(sd.decode(z0))[0]
    return to_uint8(sd.decode(z0, low_memory=low_memory))[0]


def cmd_inspect(args) -> int:
    print(format_inspection(inspect_checkpoint(resolve_checkpoint(args.path))))  # a path, or a name: miniature
    return 0


def cmd_settings(args) -> int:
    """Every setting: its YAML key, flag, default and what it takes (the table of docs/settings.md)."""
    if args.write:
        write_table(args.write)
        print(f"wrote the settings table of {args.write}")
    else:
        print(markdown_table(), end="")
    return 0


def cmd_demo(args) -> int:
    """Edits on the shipped miniature (p2p.miniature.demo), and one edit's attention pictures."""
    # imported here, not above: the miniature is a user of the library, which does not depend on it
    from p2p.miniature.demo import ROWS, write_demo

    out = Path(args.output)
    sd = load_model(DEFAULT_CKPT, args.dtype)
    grid = write_demo(sd, out, args.steps)
    _, src, dst, _, seed = ROWS[0]
    rc = main(["edit", "--prompt", src, "--edit", dst, "--seed", str(seed), "--steps", str(args.steps),
               "--guidance", "5", "--show-attention", "--dtype", args.dtype, "-o", str(out / "replace.png")])
    print(f"wrote {grid}: each row is source | Prompt-to-Prompt edit | same seed regenerated")
    return rc


# ------------------------------------------------------------------------------- the parser
def sampling_options(q, seed: bool = True):
    """Flags of the sampling settings (and the seed); left out, they are None: the config's defaults."""
    add_flags(q, settings_of("sampling", *(("seed",) if seed else ())))


def low_memory_option(q):
    q.add_argument("--low-memory", dest="low_memory", action="store_true",
                   help="for small GPUs: the guidance batch in two halves, the VAE one image at a time (tiled "
                        "above 512 px), text encoder and VAE on the CPU between uses; the same pictures")


def inversion_options(q):
    add_flags(q, settings_of("invert"))


def edit_parser(e) -> None:
    e.add_argument("--config", help="configs/edits/NAME.yaml; flags override its values")
    add_flags(e, settings_of("model", "edit", "guidance", "spec", "joint", "mutual", "pnp", "local_blend", "photo"))
    model_option_flags(e)
    sampling_options(e)
    low_memory_option(e)
    dtype_option(e)
    e.add_argument("-o", "--output", required=True, help="output picture (.png / .jpg)")
    photo = e.add_mutually_exclusive_group()
    photo.add_argument("--image", help="edit this photo: invert it with the source prompt, then edit")
    photo.add_argument("--inversion", help="edit from a saved inversion (`p2p invert -o FILE`)")
    e.add_argument("--allow-other-model", dest="allow_other_model", action="store_true",
                   help="edit from an --inversion made with other weights than --ckpt's: a warning, not an error")
    inversion_options(e)
    e.set_defaults(func=cmd_edit)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="p2p", description="Prompt-to-Prompt image editing (SD 1.x / 2.x, SDXL, "
                                "LDM-400M, SD3 / SD3.5, Flux)")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="plain text-to-image")
    add_flags(g, settings_of("model", "generate"))
    model_option_flags(g)
    sampling_options(g)
    low_memory_option(g)
    dtype_option(g)
    g.add_argument("-o", "--output", required=True, help="output picture (.png / .jpg)")
    g.set_defaults(func=cmd_generate)
    edit_parser(sub.add_parser("edit", help="Prompt-to-Prompt: source prompt and edited prompts in one batch"))
    v = sub.add_parser("invert", help="invert a photo for editing (DDIM, null-text, negative-prompt, direct)")
    add_flags(v, [setting("ckpt")])
    model_option_flags(v)
    v.add_argument("--image", required=True, help="the photo (any format Pillow reads)")
    v.add_argument("--prompt", required=True, help="a caption of the photo: the source prompt of later edits")
    inversion_options(v)
    sampling_options(v, seed=False)
    low_memory_option(v)
    dtype_option(v)
    v.add_argument("--reconstruction", help="also write the picture reconstructed from the inversion")
    v.add_argument("-o", "--output", required=True, help="the inversion file (safetensors), e.g. cat.inv")
    v.set_defaults(func=cmd_invert)
    i = sub.add_parser("inspect", help="what a checkpoint holds")
    i.add_argument("path", help="a checkpoint file or folder, or a name (miniature)")
    i.set_defaults(func=cmd_inspect)
    w = sweep_arguments(sub.add_parser("sweep", help="an ablation grid (configs/ablations/NAME.yaml): "
                                       "figure, metrics CSV/JSON, per-cell configs; resumable"))
    w.set_defaults(func=run_sweep)
    bench_arguments(sub.add_parser("bench", help="PIE-Bench: edit its pictures with one row's published protocol, "
                                   "measure and tabulate them (pie | eval | report); resumable"))
    t = sub.add_parser("settings", help="every setting: its YAML key, flag, default and what it takes")
    t.add_argument("--write", metavar="FILE", help="rewrite the table of FILE (docs/settings.md), not print it")
    t.set_defaults(func=cmd_settings)
    d = sub.add_parser("demo", help="Replace, with and without LocalBlend, on the shipped miniature: "
                       "an edit grid and one edit's attention pictures")
    d.add_argument("-o", "--output", default="demo")
    d.add_argument("--steps", type=int, default=20)
    dtype_option(d)
    d.set_defaults(func=cmd_demo)
    for name, q in sub.choices.items():
        if name not in ("sweep", "bench"):  # their parsers have it (p2p.sweep / p2p.bench add_arguments)
            add_flags(q, settings_of("run"))
    return p


def out_of_memory(err: BaseException) -> bool:
    """An allocation that failed: MemoryError, torch's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    text = str(err).lower()
    return isinstance(err, MemoryError) or isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv  # the sidecar's record of the command (main() runs in-process too: `p2p demo`, tests)
    try:
        use_threads(flag_values(args, ["threads"]).get("threads"))
        rc = args.func(args)
        sys.stdout.flush()  # a closed pipe (`p2p inspect X | head`) shows here, inside the handler
        return rc
    except BrokenPipeError:  # the reader went away: stop quietly, as a command killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"p2p {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as err:
        if not out_of_memory(err):
            raise
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        print(f"p2p {args.command}: error: out of memory ({first}); try --low-memory, a smaller --height / "
              f"--width, fewer prompts, or --dtype float16 on a GPU", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
