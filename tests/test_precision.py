"""fp16 and bf16 end to end on the golden tiny checkpoint (64 px, CPU, a few steps).

Each half-precision model generates, edits (Replace + LocalBlend, Refine, Reweight) and inverts
(null-text and direct, then reconstructs and edits from the inversion) with finite outputs, and its
pictures stay near fp32's: the mean absolute uint8 difference to the fp32 run, measured here
(torch 2.13 CPU, one thread; bf16 / fp16):

    generate 2.05 / 0.28   replace+blend 2.10 / 0.27   refine 2.11 / 0.28   reweight 2.03 / 0.27
    null-text reconstruction 23.35 / 2.36   direct reconstruction 1.74 / 0.12

is asserted below BOUND, about twice that. bf16 keeps 8 mantissa bits, fp16 11: bf16 drifts more
(fp16 would overflow first). Null-text drifts most: its optimisation of the embedding through the
half UNet, with an early stop on the loss, amplifies the rounding; on this random tiny model its
reconstruction is still 9% of the range from fp32's in bf16.

Upcasts: on this CPU every op the model uses has fp16 and bf16 kernels, so nothing is upcast for
want of one. What runs in fp32 on purpose, and only that: GroupNorm32 (its weight and bias too, as
CompVis), the q k^T and softmax of every explicit map (`attention_probs`), the stored map sums and
LocalBlend's mask, null-text's embedding and its Adam state, and the VAE of an fp16 model.
"""
import json

import numpy as np
import pytest
import torch

import p2p.sweep.command
from models.attention import Site, attention_probs
from p2p import AttentionStore, LocalBlend, Refine, Replace, Reweight, edit, generate, invert
from p2p.cli import main
from p2p.inversion import reconstruct
from p2p.pipeline import to_uint8
from weights_tools import load_checkpoint

from test_inversion import smooth_image  # the same photo the inversion tests use
from test_sweep import ABLATION

STEPS, INNER = 5, 3
PROMPTS = ["a cat riding a bicycle", "a cat riding a car"]
PHOTO = ["a red circle on a gradient", "a blue circle on a gradient"]
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
BOUND = {"bf16": {"null-text": 47.0, "direct": 3.5, "sampling": 4.3},   # mean |uint8 - fp32|, ~2x measured
         "fp16": {"null-text": 4.8, "direct": 0.3, "sampling": 0.6}}
EDITS = {"replace+blend": (PROMPTS, Replace(0.8, 0.4), LocalBlend(("bicycle", "car"))),
         "refine": (["a cat riding a bicycle", "a black cat riding a bicycle"], Refine(0.8, 0.4), None),
         "reweight": (PROMPTS[:1] * 2, Reweight(0.8, 0.4, equalizer={"cat": 3.0}), None)}

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cases(sd) -> dict:
    """name -> (uint8 pictures, latents or None, stored attention or None), every case on `sd`."""
    out = {"generate": generate(sd, PROMPTS[:1], num_steps=STEPS, progress=False)}
    for name, (prompts, spec, blend) in EDITS.items():
        out[name] = edit(sd, prompts, spec, local_blend=blend, num_steps=STEPS, progress=False)
    out = {k: (o.images, o.latents, o.attention) for k, o in out.items()}
    for method in ("null-text", "direct"):
        inv = invert(sd, smooth_image(64), PHOTO[0], method=method, num_steps=STEPS, num_inner_steps=INNER,
                     progress=False)
        z = reconstruct(sd, inv, progress=False)
        out[method] = (to_uint8(sd.decode(z)), z, None)
        out[f"{method} inversion"] = inv
    return out


@pytest.fixture(scope="module")
def fp32(tiny_sd, one_thread):
    return run_cases(tiny_sd)


@pytest.fixture(scope="module", params=list(HALF))
def half(request, golden_dir, one_thread):
    sd = load_checkpoint(golden_dir / "tiny-sd-a.safetensors", dtype=HALF[request.param])
    sd.requires_grad_(False)
    return request.param, sd, run_cases(sd.eval())


def mean_abs_uint8(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_half_runs_are_finite_and_near_fp32(fp32, half):
    name, sd, runs = half
    measured = {}
    for case, run in runs.items():
        if case.endswith("inversion"):
            continue
        images, z, store = run
        assert z.dtype == sd.dtype and torch.isfinite(z).all(), case          # latents stay in the model's dtype
        if store is not None:
            assert store.sums and all(s.dtype == torch.float32 and torch.isfinite(s).all()
                                      for s in store.sums.values()), case     # stored maps: fp32 sums, finite
        measured[case] = mean_abs_uint8(images, fp32[case][0])
    print(f"\n{name}: mean |uint8 - fp32| " + ", ".join(f"{k} {v:.2f}" for k, v in measured.items()))
    assert all(v <= BOUND[name].get(case, BOUND[name]["sampling"]) for case, v in measured.items()), measured
    assert max(measured.values()) > 0  # the half model really ran in half


def test_half_inversions_keep_fp32_where_it_matters(half):
    _, sd, runs = half
    null, direct = runs["null-text inversion"], runs["direct inversion"]
    assert all(e.dtype == torch.float32 and torch.isfinite(e).all() for e in null.uncond_embeddings)
    assert not torch.equal(null.uncond_embeddings[0], null.uncond_embeddings[-1])  # it did optimise
    assert all(z.dtype == sd.dtype and torch.isfinite(z).all() for z in null.trajectory)
    assert all(torch.isfinite(r).all() for r in direct.residuals)


def test_null_text_adam_state_is_fp32(golden_dir, monkeypatch):
    sd = load_checkpoint(golden_dir / "tiny-sd-a.safetensors", dtype=torch.float16).eval()
    seen = []
    real_step = torch.optim.Adam.step

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        seen.extend((p.dtype, *(v.dtype for v in self.state[p].values() if torch.is_tensor(v) and v.dim()))
                    for g in self.param_groups for p in g["params"])
        return out
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    invert(sd, smooth_image(64), PHOTO[0], num_steps=2, num_inner_steps=2, progress=False)
    assert seen and all(d == torch.float32 for dtypes in seen for d in dtypes), seen
    assert all(p.dtype == torch.float16 for p in sd.unet.parameters())  # the model itself stays fp16


def test_fp16_vae_runs_in_fp32_by_default(golden_dir):
    sd = load_checkpoint(golden_dir / "tiny-sd-a.safetensors", dtype=torch.float16)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert sd.vae_dtype(None) == torch.float32 and sd.decode(z).dtype == torch.float32
    assert sd.decode(z, upcast=False).dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in sd.vae.parameters())  # cast back after the call
    assert sd.encode(sd.decode(z).clamp(-1, 1)).dtype == torch.float16  # latents in the model's dtype
    bf16 = load_checkpoint(golden_dir / "tiny-sd-a.safetensors", dtype=torch.bfloat16)
    assert bf16.vae_dtype(None) == torch.bfloat16 and bf16.decode(z, upcast=True).dtype == torch.float32


def test_attention_probs_softmax_in_fp32():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 6, 8, generator=g) * 150 for _ in range(2))  # q k^T beyond fp16's 65504
    assert torch.equal(attention_probs(q, k), torch.einsum("bhnd,bhkd->bhnk", q, k).mul(8 ** -0.5).softmax(-1))
    assert not torch.isfinite(torch.einsum("bhnd,bhkd->bhnk", q.half(), k.half())).all()  # half q k^T overflows
    M = attention_probs(q.half(), k.half())
    assert M.dtype == torch.float16 and torch.isfinite(M).all()
    assert torch.allclose(M.float().sum(-1), torch.ones(1, 2, 6), atol=1e-2)


def test_store_sums_in_fp32():
    store, site = AttentionStore(), Site("up", 1, 0, True, 2, 2)
    M = torch.full((1, 2, 4, 3), 1 / 3, dtype=torch.bfloat16)
    for _ in range(1000):  # a bf16 running sum of 1/3 stops growing at 128 (its step there is 1)
        store.add(site, M)
        store.end_step()
    assert store.sums[0].dtype == torch.float32
    assert torch.allclose(store.average(site), M.float().mean(1), atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cli_dtype(tmp_path, golden_dir, dtype):
    out = tmp_path / "g.png"
    assert main(["generate", "--ckpt", str(golden_dir / "tiny-sd-a.safetensors"), "--prompt", "a cat",
                 "--steps", "2", "--dtype", dtype, "-o", str(out)]) == 0
    assert json.loads(out.with_name(out.name + ".json").read_text())["dtype"] == dtype


def test_sweep_dtype_reaches_the_loader(tmp_path, golden_dir, monkeypatch):
    cfg = tmp_path / "abl.yaml"
    cfg.write_text(ABLATION.format(ckpt=golden_dir / "tiny-sd-a.safetensors"))
    seen = []

    def loader(ckpt, device, dtype, **load):
        seen.append(dtype)
        raise ValueError("loaded")  # enough: the sweep asked for the dtype given
    monkeypatch.setattr(p2p.sweep.command, "load_checkpoint", loader)
    assert main(["sweep", str(cfg), "-o", str(tmp_path / "run"), "--dtype", "bfloat16", "--no-progress"]) == 2
    assert seen == [torch.bfloat16]
