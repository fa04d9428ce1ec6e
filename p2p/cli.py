"""`p2p generate | edit | inspect | demo`: the command line.

Every picture comes with a JSON sidecar holding every setting, the checkpoint's SHA-256 and the
library version, so any figure can be regenerated. Outputs are written only once everything has
run, each atomically: a failure leaves no partial file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from weights_tools.files import atomic_path
from weights_tools.registry import DEFAULT as DEFAULT_CKPT, resolve_checkpoint

# the edit-config schema and its loading live in p2p.config (shared with `p2p sweep`); re-exported here
from .config import (DEFAULTS, EDIT_KEYS, build_spec, check_settings, load_edit_config,  # noqa: F401
                     parse_cross_steps, parse_weights)

CKPT_HELP = ("an SD v1.x .safetensors / .ckpt / diffusers folder, or 'miniature' (the default): "
             "the miniature SD that ships with the project")


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


def write_json_atomic(obj, path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    return Path(path)


def resolve_edit_settings(args) -> dict:
    s = dict(DEFAULTS)
    if args.config:
        s.update(load_edit_config(args.config))
    for key in DEFAULTS.keys() | {"ckpt", "prompt", "edits"}:
        v = getattr(args, key, None)
        if v is not None and v is not False:
            s[key] = v
    s.setdefault("ckpt", DEFAULT_CKPT)
    for key in ("prompt", "edits"):
        if not s.get(key):
            raise ValueError(f"missing {key}: give --{key.rstrip('s') if key == 'edits' else key} or set it in --config")
    return s


def load_model(ckpt):
    import torch

    from weights_tools import load_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_checkpoint(resolve_checkpoint(ckpt), device=device, dtype=torch.float32)


def settings_record(s: dict, ckpt) -> dict:
    import p2p
    import torch

    ckpt = resolve_checkpoint(ckpt)
    return {"settings": s, "checkpoint": str(ckpt), "checkpoint_sha256": file_sha256(ckpt),
            "p2p_version": p2p.__version__, "torch": torch.__version__, "argv": sys.argv[1:]}


def cmd_generate(args) -> int:
    from p2p import generate
    from p2p.viz import image_grid, save_image

    sd = load_model(args.ckpt)
    out = generate(sd, args.prompt, seed=args.seed, num_steps=args.steps, guidance_scale=args.guidance,
                   height=args.height, width=args.width, steps_offset=args.steps_offset)
    record = settings_record({k: getattr(args, k) for k in ("prompt", "seed", "steps", "guidance", "height", "width",
                                                            "steps_offset")}, args.ckpt)
    save_image(image_grid(out.images, args.prompt, min_size=256), args.output)
    write_json_atomic(record, Path(args.output).with_suffix(".json"))
    print(f"wrote {args.output} and {Path(args.output).with_suffix('.json')}")
    return 0


def cmd_edit(args) -> int:
    from p2p import AttentionStore, edit
    from p2p.viz import image_grid, save_image

    s = resolve_edit_settings(args)
    prompts = [s["prompt"], *s["edits"]]
    spec, blend = check_settings(s, args.config or "the command line")  # words too, before loading
    sd = load_model(s["ckpt"])
    inv = prepare_inversion(args, s, sd)  # --image / --inversion: edit a real photo (None otherwise)
    store = AttentionStore(self_attention=True) if s["show_attention"] else None
    out = edit(sd, prompts, spec, local_blend=blend, seed=s["seed"], num_steps=s["steps"], store=store,
               guidance_scale=s["guidance"], height=s["height"], width=s["width"], steps_offset=s["steps_offset"],
               inversion=inv)
    outputs = {Path(args.output): image_grid(out.images, prompts, min_size=256)}
    if s["show_attention"]:
        outputs.update(attention_pictures(out, prompts, Path(args.output)))
    for path, img in outputs.items():
        save_image(img, path)
    record = settings_record(s, s["ckpt"]) | {"spec": repr(spec), "local_blend": repr(blend)}
    write_json_atomic(record, Path(args.output).with_suffix(".json"))
    print("wrote " + ", ".join(map(str, [*outputs, Path(args.output).with_suffix(".json")])))
    return 0


def attention_pictures(out, prompts, output: Path) -> dict:
    """For every prompt: per-token cross-attention heatmaps and the top self-attention components,
    from the up and down layers at 16x16 (the reference's show_cross_attention and
    show_self_attention_comp), or at the smallest kept side when there is no 16x16 layer."""
    from models.clip import default_tokenizer
    from p2p.viz import cross_attention_grid, prompt_tokens, self_attention_components

    store = out.attention
    pics = {}
    for is_cross, name in ((True, "attention"), (False, "self_attention")):
        sides = {s.h for s in store.layers(("up", "down"), is_cross) if s.h == s.w}
        if not sides:
            continue
        res = 16 if 16 in sides else min(sides)
        for i, p in enumerate(prompts):
            maps = store.aggregate(res, ("up", "down"), is_cross, i)
            pic = (cross_attention_grid(maps, prompt_tokens(default_tokenizer(), p), image=out.images[i]) if is_cross
                   else self_attention_components(maps.reshape(res * res, -1), res))
            pics[output.with_name(f"{output.stem}_{name}_{i}{output.suffix}")] = pic
    return pics


def run_inversion(sd, args, prompt, steps, guidance, steps_offset, height, width):
    from p2p import invert

    return invert(sd, args.image, prompt, method=args.method, num_steps=steps, guidance_scale=guidance,
                  num_inner_steps=args.inner_steps, early_stop_epsilon=args.early_stop, steps_offset=steps_offset,
                  height=height, width=width, offsets=tuple(args.offsets))


def prepare_inversion(args, s: dict, sd):
    """For `p2p edit --image` (invert now) or `--inversion` (a saved one): the Inversion, with the
    settings it fixes written into `s` (an explicit conflicting --steps etc. is an error in edit())."""
    from p2p import Inversion

    if not getattr(args, "image", None) and not getattr(args, "inversion", None):
        return None
    if args.inversion:
        inv = Inversion.load(args.inversion)
        explicit = {k: getattr(args, k) for k in ("steps", "guidance", "steps_offset", "height", "width")}
        for key, value in explicit.items():  # values from --config or the defaults give way to the file's
            if value is None:
                s[key] = None
    else:
        inv = run_inversion(sd, args, s["prompt"], s["steps"], s["guidance"], s["steps_offset"], s["height"],
                            s["width"])
    mine = dict(steps=inv.num_steps, guidance=inv.guidance_scale, steps_offset=inv.steps_offset, height=inv.height,
                width=inv.width)
    s.update({k: v if s[k] is None else s[k] for k, v in mine.items()})
    s.update(image=args.image, inversion=args.inversion, method=inv.method, inversion_info=inv.info)
    return inv


def cmd_invert(args) -> int:
    """Invert a photo and save the Inversion (safetensors) with a JSON sidecar; --reconstruction also
    writes the picture the inverted prompt gives back from it."""
    from p2p.images import open_image
    from p2p.inversion import reconstruct
    from p2p.pipeline import to_uint8
    from p2p.viz import save_image

    open_image(args.image)  # a missing or unreadable picture fails before the model loads
    sd = load_model(args.ckpt)
    inv = run_inversion(sd, args, args.prompt, args.steps, args.guidance, args.steps_offset, args.height, args.width)
    rec = None
    if args.reconstruction:
        import torch

        with torch.no_grad():
            rec = to_uint8(sd.decode(reconstruct(sd, inv)))[0]
    keys = ("image", "prompt", "method", "steps", "guidance", "inner_steps", "early_stop", "steps_offset", "height",
            "width", "offsets")
    record = settings_record({k: getattr(args, k) for k in keys}, args.ckpt) | {"inversion": inv.info}
    written = [inv.save(args.output)]
    if rec is not None:
        written.append(save_image(rec, args.reconstruction))
    written.append(write_json_atomic(record, Path(args.output).with_suffix(".json")))
    print("wrote " + ", ".join(map(str, written)))
    return 0


def cmd_inspect(args) -> int:
    from weights_tools import format_inspection, inspect_checkpoint

    print(format_inspection(inspect_checkpoint(args.path)))
    return 0


def cmd_demo(args) -> int:
    """Edits on the shipped miniature (p2p.miniature.demo), and one edit's attention pictures."""
    from p2p.miniature.demo import ROWS, write_demo

    out = Path(args.output)
    sd = load_model(DEFAULT_CKPT)
    grid = write_demo(sd, out, args.steps)
    _, src, dst, _, seed = ROWS[0]
    rc = main(["edit", "--prompt", src, "--edit", dst, "--seed", str(seed), "--steps", str(args.steps),
               "--guidance", "5", "--show-attention", "-o", str(out / "replace.png")])
    print(f"wrote {grid}: each row is source | Prompt-to-Prompt edit | same seed regenerated")
    return rc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="p2p", description="Prompt-to-Prompt image editing on Stable Diffusion v1.x")
    sub = p.add_subparsers(dest="command", required=True)

    def sampling(q):
        q.add_argument("--seed", type=int)
        q.add_argument("--steps", type=int, help="DDIM steps (default 50)")
        q.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 7.5)")
        q.add_argument("--height", type=int)
        q.add_argument("--width", type=int)
        q.add_argument("--steps-offset", type=int, dest="steps_offset")
        q.add_argument("-o", "--output", required=True, help="output picture (.png / .jpg)")

    g = sub.add_parser("generate", help="plain text-to-image")
    g.add_argument("--ckpt", default=DEFAULT_CKPT, help=CKPT_HELP)
    g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    sampling(g)
    g.set_defaults(func=cmd_generate, seed=0, steps=50, guidance=7.5, steps_offset=1)

    e = sub.add_parser("edit", help="Prompt-to-Prompt: source prompt and edited prompts in one batch")
    e.add_argument("--ckpt", help=CKPT_HELP)
    e.add_argument("--config", help="configs/edits/NAME.yaml; flags override its values")
    e.add_argument("--prompt", help="the source prompt")
    e.add_argument("--edit", dest="edits", action="append", help="an edited prompt; repeat for several")
    e.add_argument("--mode", choices=["replace", "refine", "reweight"])
    e.add_argument("--cross-steps", dest="cross_steps", nargs="+",
                   help="fraction of steps with injected cross-attention: F, START END, or F WORD=F ...")
    e.add_argument("--self-steps", dest="self_steps", nargs="+", type=float, help="F or START END")
    e.add_argument("--self-max-res", dest="self_max_res", type=int, help="inject self-attention up to this side")
    e.add_argument("--blend", nargs="+", help="LocalBlend words, one per prompt, source first (a,b for several)")
    e.add_argument("--blend-threshold", dest="blend_threshold", type=float)
    e.add_argument("--blend-level", dest="blend_level", type=int,
                   help="resolution level of the maps the blend mask is made from (default: the deepest; "
                        "0 for the miniature's 16x16 maps)")
    e.add_argument("--weight", action="append", help="WORD=C reweights WORD by C (C1,C2 for one per edit)")
    e.add_argument("--show-attention", dest="show_attention", action="store_true",
                   help="also write per-token cross-attention maps of every prompt")
    sampling(e)
    e.set_defaults(func=cmd_edit)

    def inversion_options(q):
        q.add_argument("--method", choices=["null-text", "ddim", "negative-prompt", "direct"], default="null-text",
                       help="how to invert the photo (default null-text)")
        q.add_argument("--inner-steps", dest="inner_steps", type=int, default=10,
                       help="null-text: Adam iterations per step at most (default 10)")
        q.add_argument("--early-stop", dest="early_stop", type=float, default=1e-5,
                       help="null-text: stop a step's iterations when the loss < this + 2e-5 i")
        q.add_argument("--offsets", nargs=4, type=int, default=[0, 0, 0, 0], metavar=("L", "R", "T", "B"),
                       help="pixels cut from the left, right, top and bottom before the centre crop")

    photo = e.add_mutually_exclusive_group()
    photo.add_argument("--image", help="edit this photo: invert it with the source prompt, then edit")
    photo.add_argument("--inversion", help="edit from a saved inversion (`p2p invert -o FILE`)")
    inversion_options(e)

    v = sub.add_parser("invert", help="invert a photo for editing (DDIM, null-text, negative-prompt, direct)")
    v.add_argument("--ckpt", required=True)
    v.add_argument("--image", required=True, help="the photo (any format Pillow reads)")
    v.add_argument("--prompt", required=True, help="a caption of the photo: the source prompt of later edits")
    inversion_options(v)
    v.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    v.add_argument("--guidance", type=float, default=7.5, help="guidance the edits will use (default 7.5)")
    v.add_argument("--steps-offset", dest="steps_offset", type=int, default=1,
                   help="1 (default): timesteps 981..1; 0: 980..0 as the null-text notebook")
    v.add_argument("--height", type=int)
    v.add_argument("--width", type=int)
    v.add_argument("--reconstruction", help="also write the picture reconstructed from the inversion")
    v.add_argument("-o", "--output", required=True, help="the inversion file (safetensors), e.g. cat.inv")
    v.set_defaults(func=cmd_invert)

    i = sub.add_parser("inspect", help="what a checkpoint holds")
    i.add_argument("path")
    i.set_defaults(func=cmd_inspect)

    from .sweep import add_arguments as sweep_arguments, run_from_args as run_sweep
    w = sweep_arguments(sub.add_parser("sweep", help="an ablation grid (configs/ablations/NAME.yaml): "
                                     "figure, metrics CSV/JSON, per-cell configs; resumable"))
    w.set_defaults(func=run_sweep)

    d = sub.add_parser("demo", help="Replace, with and without LocalBlend, on the shipped miniature: "
                       "an edit grid and one edit's attention pictures")
    d.add_argument("-o", "--output", default="demo")
    d.add_argument("--steps", type=int, default=20)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"p2p {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
