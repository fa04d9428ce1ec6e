"""`p2p generate | edit | inspect | demo`: the command line.

Every picture comes with a JSON sidecar holding every setting, the checkpoint's SHA-256 and the
library version, so any figure can be regenerated. Outputs are written only once everything has
run, each atomically: a failure leaves no partial file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

EDIT_KEYS = {  # the keys of an edit config file (configs/edits/*.yaml), with their types
    "ckpt": str, "prompt": str, "edits": list, "mode": str, "cross_steps": (float, int, list, dict),
    "self_steps": (float, int, list), "self_max_res": int, "blend": list, "blend_threshold": (float, int),
    "weight": dict, "seed": int, "steps": int, "guidance": (float, int), "height": int, "width": int,
    "steps_offset": int, "show_attention": bool, "description": str,
}
DEFAULTS = dict(mode="replace", cross_steps=0.8, self_steps=0.4, self_max_res=16, blend=None, blend_threshold=0.3,
                weight=None, seed=8888, steps=50, guidance=7.5, height=None, width=None, steps_offset=1,
                show_attention=False)


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def parse_cross_steps(values):
    """["0.8"] -> 0.8; ["0.2", "0.8"] -> (0.2, 0.8); ["1.0", "lion=0.4"] -> {"default_": 1.0, "lion": 0.4}."""
    if values is None or isinstance(values, (int, float, dict)):
        return values
    plain = [v for v in values if "=" not in str(v)]
    words = {v.split("=")[0]: float(v.split("=")[1]) for v in values if "=" in str(v)}
    base = float(plain[0]) if len(plain) == 1 else tuple(map(float, plain)) if plain else (0.0, 1.0)
    return {"default_": base, **words} if words else base


def parse_weights(items) -> dict | None:
    if not items or isinstance(items, dict):
        return items or None
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--weight takes WORD=C (e.g. car=2), got {item!r}")
        word, c = item.split("=", 1)
        out[word] = [float(x) for x in c.split(",")] if "," in c else float(c)
    return out


def build_spec(s: dict):
    """An edit spec and a LocalBlend from resolved settings (CLI flags or a config file)."""
    from p2p import LocalBlend, Refine, Replace, Reweight

    cross = parse_cross_steps(s["cross_steps"])
    self_steps = tuple(s["self_steps"]) if isinstance(s["self_steps"], (list, tuple)) else s["self_steps"]
    if isinstance(self_steps, tuple) and len(self_steps) == 1:
        self_steps = self_steps[0]
    common = dict(cross_replace_steps=cross, self_replace_steps=self_steps, self_replace_max_res=s["self_max_res"])
    modes = {"replace": Replace, "refine": Refine}
    weights = parse_weights(s["weight"])
    if s["mode"] == "reweight":
        if not weights:
            raise ValueError("--mode reweight needs --weight WORD=C")
        spec = Reweight(equalizer=weights, **common)
    elif s["mode"] in modes:
        spec = modes[s["mode"]](**common)
        if weights:
            spec = Reweight(equalizer=weights, base=spec, **common)
    else:
        raise ValueError(f"--mode must be replace, refine or reweight, got {s['mode']!r}")
    blend = None
    if s["blend"]:
        words = [tuple(w.split(",")) if "," in w else w for w in s["blend"]]
        blend = LocalBlend(tuple(words), threshold=s["blend_threshold"])
    return spec, blend


def load_edit_config(path) -> dict:
    """Settings from configs/edits/NAME.yaml; unknown keys and wrong types fail before any computation."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: an edit config is a mapping of settings, got {type(data).__name__}")
    for key, value in data.items():
        if key not in EDIT_KEYS:
            raise ValueError(f"{path}: unknown key {key!r}; the keys are {sorted(EDIT_KEYS)}")
        if value is not None and not isinstance(value, EDIT_KEYS[key]):
            raise ValueError(f"{path}: {key!r} has the wrong type ({type(value).__name__}: {value!r})")
    return data


def resolve_edit_settings(args) -> dict:
    s = dict(DEFAULTS)
    if args.config:
        s.update(load_edit_config(args.config))
    for key in DEFAULTS.keys() | {"ckpt", "prompt", "edits"}:
        v = getattr(args, key, None)
        if v is not None and v is not False:
            s[key] = v
    for key in ("ckpt", "prompt", "edits"):
        if not s.get(key):
            raise ValueError(f"missing {key}: give --{key.rstrip('s') if key == 'edits' else key} or set it in --config")
    return s


def load_model(ckpt):
    import torch

    from weights_tools import load_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_checkpoint(ckpt, device=device, dtype=torch.float32)


def settings_record(s: dict, ckpt) -> dict:
    import p2p
    import torch

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
    save_image(image_grid(out.images, args.prompt), args.output)
    write_json_atomic(record, Path(args.output).with_suffix(".json"))
    print(f"wrote {args.output} and {Path(args.output).with_suffix('.json')}")
    return 0


def cmd_edit(args) -> int:
    from p2p import edit
    from p2p.viz import image_grid, save_image

    s = resolve_edit_settings(args)
    prompts = [s["prompt"], *s["edits"]]
    spec, blend = build_spec(s)
    sd = load_model(s["ckpt"])
    out = edit(sd, prompts, spec, local_blend=blend, seed=s["seed"], num_steps=s["steps"],
               guidance_scale=s["guidance"], height=s["height"], width=s["width"], steps_offset=s["steps_offset"])
    outputs = {Path(args.output): image_grid(out.images, prompts)}
    if s["show_attention"]:
        outputs.update(attention_pictures(out, prompts, Path(args.output)))
    for path, img in outputs.items():
        save_image(img, path)
    record = settings_record(s, s["ckpt"]) | {"spec": repr(spec), "local_blend": repr(blend)}
    write_json_atomic(record, Path(args.output).with_suffix(".json"))
    print("wrote " + ", ".join(map(str, [*outputs, Path(args.output).with_suffix(".json")])))
    return 0


def attention_pictures(out, prompts, output: Path) -> dict:
    """Per-token cross-attention heatmaps (res 16, up and down, as the reference) for every prompt."""
    from models.clip import default_tokenizer
    from p2p.viz import cross_attention_grid, image_grid, prompt_tokens

    store = out.attention
    sides = sorted({s.h for s in store.layers(("up", "down"), True)})
    res = 16 if 16 in sides else sides[-1] if len(sides) < 2 else sides[-2]
    pics = {}
    for i, p in enumerate(prompts):
        tokens = prompt_tokens(default_tokenizer(), p)
        pics[output.with_name(f"{output.stem}_attention_{i}{output.suffix}")] = cross_attention_grid(
            store.aggregate(res, ("up", "down"), True, i), tokens, image=out.images[i])
    return pics


def cmd_inspect(args) -> int:
    from weights_tools import format_inspection, inspect_checkpoint

    print(format_inspection(inspect_checkpoint(args.path)))
    return 0


def cmd_demo(args) -> int:
    """Make a tiny random checkpoint, then generate and edit on it (random weights give noise)."""
    from weights_tools import make_tiny

    out = Path(args.output)
    ckpt = out / "tiny.safetensors"
    if not ckpt.exists():
        make_tiny(ckpt, seed=0)
    common = ["--ckpt", str(ckpt), "--steps", str(args.steps)]
    rc = main(["generate", *common, "--prompt", "a painting of a squirrel eating a burger",
               "-o", str(out / "generate.png")])
    rc = rc or main(["edit", *common, "--prompt", "a painting of a squirrel eating a burger",
          "--edit", "a painting of a lion eating a burger", "--cross-steps", "1.0", "lion=0.4",
          "--blend", "squirrel", "lion", "--show-attention", "-o", str(out / "edit.png")])
    print("random weights give noise: the pictures show the plumbing, not a model")
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
    g.add_argument("--ckpt", required=True)
    g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    sampling(g)
    g.set_defaults(func=cmd_generate, seed=0, steps=50, guidance=7.5, steps_offset=1)

    e = sub.add_parser("edit", help="Prompt-to-Prompt: source prompt and edited prompts in one batch")
    e.add_argument("--ckpt")
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
    e.add_argument("--weight", action="append", help="WORD=C reweights WORD by C (C1,C2 for one per edit)")
    e.add_argument("--show-attention", dest="show_attention", action="store_true",
                   help="also write per-token cross-attention maps of every prompt")
    sampling(e)
    e.set_defaults(func=cmd_edit)

    i = sub.add_parser("inspect", help="what a checkpoint holds")
    i.add_argument("path")
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("demo", help="tiny random checkpoint, then generate and edit on it")
    d.add_argument("-o", "--output", default="demo")
    d.add_argument("--steps", type=int, default=10)
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
