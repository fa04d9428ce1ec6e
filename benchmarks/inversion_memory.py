"""Peak memory (and time) of null-text inversion: ours (UNet frozen) against the reference's
behaviour (the UNet's parameters left requiring grad, so every backward also computes and
accumulates a .grad for every weight).

Each measurement runs in a fresh subprocess and reads its peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`), so runs do not share an allocator. Two models:
  tiny   the golden tiny checkpoint, 64x64 px
  sd15   the SD v1.5 architecture (1.07 B parameters) with random weights, built on the meta device
         and materialised with a cheap seeded init, at --size (default 256) px
It also reports the resident size right after loading the model, so the loop's own cost is
peak - loaded. Examples:
  python benchmarks/inversion_memory.py --model tiny                      # 50 steps x 10 inner
  python benchmarks/inversion_memory.py --model sd15 --steps 2 --inner 2  # what a CPU affords
  python benchmarks/inversion_memory.py --model tiny --methods ddim negative-prompt direct null-text
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "golden" / "tiny-sd-a.safetensors"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build(model: str, seed: int = 0):
    import torch

    if model == "tiny":
        from weights_tools import load_checkpoint

        return load_checkpoint(TINY, device="cpu", dtype=torch.float32)
    from models import SDConfig, StableDiffusion

    with torch.device("meta"):
        sd = StableDiffusion(SDConfig())
    sd = sd.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sd.named_parameters():  # fan-in scaled normal weights, unit norms, zero biases
            if p.dim() > 1:
                p.normal_(0, p[0].numel() ** -0.5, generator=g)
            else:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    return sd


def child(args) -> dict:
    import torch

    import p2p.inversion as inversion

    torch.set_num_threads(args.threads)
    sd = build(args.model).eval()
    sd.requires_grad_(False)
    if args.unet_grad:  # the reference: UNet parameters require grad throughout the optimisation
        sd.unet.requires_grad_(True)
        inversion.frozen = lambda module: contextlib.nullcontext(module)
    loaded = rss_mb()
    size = args.size or sd.cfg.default_height
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    image = torch.stack([x * 0.8, y * 0.8, ((x ** 2 + y ** 2) < 0.3).float() - 0.5])[None]
    t0 = time.perf_counter()
    inv = inversion.invert(sd, image, "a red circle on a gradient", method=args.method, num_steps=args.steps,
                           num_inner_steps=args.inner, early_stop_epsilon=args.early_stop, progress=False)
    seconds = time.perf_counter() - t0
    grads = sum(p.grad.numel() * 4 for p in sd.unet.parameters() if p.grad is not None) / 2 ** 20
    return dict(model=args.model, size=size, method=args.method, steps=args.steps, inner=args.inner,
                unet_requires_grad=bool(args.unet_grad), loaded_mb=round(loaded), peak_mb=round(rss_mb()),
                loop_mb=round(rss_mb() - loaded), unet_grad_buffers_mb=round(grads), seconds=round(seconds, 1),
                inner_iterations=sum(inv.info.get("inner_iterations", [])), threads=args.threads)


def run(model, method, steps, inner, unet_grad, size, threads, early_stop, timeout) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--methods", method, "--steps", str(steps),
           "--inner", str(inner), "--threads", str(threads), "--early-stop", str(early_stop)]
    cmd += ["--size", str(size)] if size else []
    cmd += ["--unet-grad"] if unet_grad else []
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=True)
    except subprocess.TimeoutExpired:
        return dict(model=model, method=method, steps=steps, inner=inner, unet_requires_grad=unet_grad,
                    error=f"timed out after {timeout}s")
    except subprocess.CalledProcessError as err:
        return dict(model=model, method=method, unet_requires_grad=unet_grad, error=err.stderr.strip()[-500:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    p.add_argument("--size", type=int, help="image side in px (default: tiny 64, sd15 256)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--inner", type=int, default=10, help="null-text inner iterations per step at most")
    p.add_argument("--early-stop", dest="early_stop", type=float, default=0.0,
                   help="null-text early-stop epsilon (default 0: always run --inner iterations, a fixed workload)")
    p.add_argument("--methods", nargs="+", default=["null-text"],
                   choices=["null-text", "ddim", "negative-prompt", "direct"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=int, default=600, help="seconds per run")
    p.add_argument("--no-reference", action="store_true", help="skip the UNet-requires-grad comparison run")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--unet-grad", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.size is None and args.model == "sd15":
        args.size = 256
    if args.child:
        args.method = args.methods[0]
        print(json.dumps(child(args)))
        return 0
    results = []
    for method in args.methods:
        modes = [False] + ([True] if method == "null-text" and not args.no_reference else [])
        for unet_grad in modes:
            r = run(args.model, method, args.steps, args.inner, unet_grad, args.size, args.threads, args.early_stop,
                    args.timeout)
            results.append(r)
            print(json.dumps(r), flush=True)
    ours = [r for r in results if r.get("method") == "null-text" and "error" not in r]
    if len(ours) == 2:
        a, b = ours
        print(f"null-text, {args.model}: peak {a['peak_mb']} MB (UNet frozen) vs {b['peak_mb']} MB (UNet requires "
              f"grad, the reference): {b['peak_mb'] - a['peak_mb']} MB saved; loop {a['loop_mb']} vs "
              f"{b['loop_mb']} MB; {a['seconds']} s vs {b['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
