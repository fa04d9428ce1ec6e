"""The sampler protocol (models/sampler.py): a sampler lists its UNet calls, each with the row of the
(T + 1)-row edit schedules it reads, and the controller follows that list.

`Heun`, a second-order sampler with two UNet calls per step, lives here: it is registered in SAMPLERS
by the tests that use it, runs an edit end to end (Replace, LocalBlend, stored maps) and its controller
is held to its call -> row mapping. Then "plms" as PLMS's name, the eps / v / x0 / flow conversions,
and the inversion's question to a sampler (an inverse step, not a name)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import models.sd
import p2p.pipeline
from models.config import NoiseSchedule
from models.ddim import DDIM
from models.pndm import PNDM
from models.prediction import PREDICTIONS, as_eps, from_eps, noised, to_eps, vp, x0_and_eps
from models.sampler import Call, has_inverse_step
from p2p import LocalBlend, Replace, edit, generate
from p2p.cli import main
from p2p.config import load_edit_config
from p2p.control import Controller
from p2p.inversion import Inversion, invert, require_inverse_step
from test_pndm_edit import recording  # a Controller recording each attention call's step and injection

N = 4
KW = dict(seed=3, num_steps=N, height=32, width=32, progress=False)
SRC, LION = "a painting of a squirrel eating a burger", "a painting of a lion eating a burger"


@dataclass
class Heun:
    """Heun's method on DDIM's schedule and timesteps. DDIM's eta-0 move is Euler's method on the
    probability-flow ODE d(x / sqrt(a)) = eps d(sqrt(1 - a) / sqrt(a)); Heun's evaluates eps again at
    the Euler point and moves from x_s with the mean of both. Steps 0..N-2 are two UNet calls (t_s on
    x_s, t_{s+1} on the Euler point), both reading row s; the last step, whose next timestep is before
    0, is one Euler call (as diffusers' Heun ends). No inverse step. Written for epsilon models, whose
    output (what `step` is given) is eps."""
    ddim: DDIM
    made: int = 0
    kept: list = field(default_factory=list)  # (x_s, eps_s, t_s) between the two calls of a step

    @classmethod
    def create(cls, num_steps=50, steps_offset=1, beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
               prediction_type="epsilon", schedule=NoiseSchedule()):
        return cls(DDIM.create(num_steps, steps_offset, beta_start, beta_end, num_train_timesteps, prediction_type,
                               schedule))

    @property
    def num_steps(self) -> int:
        return self.ddim.num_steps

    @property
    def calls(self) -> tuple[Call, ...]:
        t = self.ddim.timesteps.tolist()
        pairs = [c for s in range(len(t) - 1) for c in (Call(t[s], s), Call(t[s + 1], s))]
        return tuple(pairs + [Call(t[-1], len(t) - 1)])

    def step(self, eps, t, x):
        calls, i = self.calls, self.made
        assert calls[i].timestep == t, (i, t)
        self.made += 1
        if self.kept:                                        # the second call: from x_s with the mean
            x_s, eps_s, t_s = self.kept.pop()
            return self.ddim.step((eps_s + eps) / 2, t_s, x_s)
        if i + 1 < len(calls) and calls[i + 1].row == calls[i].row:
            self.kept.append((x, eps, t))                    # the first call: the Euler point
        return self.ddim.step(eps, t, x)


@pytest.fixture
def heun(monkeypatch):
    monkeypatch.setitem(models.sd.SAMPLERS, "heun", Heun)
    return "heun"


def test_heun_lists_two_calls_per_step_on_one_row():
    calls = Heun.create(N).calls
    t = DDIM.create(N).timesteps.tolist()                                    # 751, 501, 251, 1
    assert [c.timestep for c in calls] == [t[0], t[1], t[1], t[2], t[2], t[3], t[3]]
    assert [c.row for c in calls] == [0, 0, 1, 1, 2, 2, 3]


def solve(sampler, k: float) -> float:
    """|x_end - exact| for eps = k x / sqrt(a), i.e. d(xb)/d(sigma) = k xb with xb = x / sqrt(a) and
    sigma = sqrt(1 - a) / sqrt(a), from x = 1 at the first timestep to alpha_cumprod[0], in float64."""
    schedule, x = getattr(sampler, "ddim", sampler), torch.ones(1, dtype=torch.float64)
    for c in sampler.calls:
        x = sampler.step(k * x / schedule.alpha(c.timestep).double() ** 0.5, c.timestep, x)
    a0, a1 = schedule.alpha(sampler.calls[0].timestep).double(), schedule.alphas_cumprod[0].double()
    sigma0, sigma1 = ((1 - a0) / a0) ** 0.5, ((1 - a1) / a1) ** 0.5
    return float((x - (a1 / a0) ** 0.5 * torch.exp(k * (sigma1 - sigma0))).abs())


def test_heun_is_second_order():
    """Halving the step divides Heun's error by about 4 and DDIM's (Euler's) by about 2. The offset keeps
    the first timestep at 975 for 10, 20 and 40 steps."""
    for cls, order in ((Heun, 4), (DDIM, 2)):
        e = [solve(cls.create(n, 975 - (n - 1) * (1000 // n)), -0.01) for n in (10, 20, 40)]
        assert all(0.75 * order < e[j] / e[j + 1] < 1.25 * order for j in range(2)), (cls.__name__, e)


# ------------------------------------------------------------------------- an edit, two calls per step
def test_an_edit_with_two_calls_per_step_reads_the_rows_of_its_steps(tiny_sd, heun, monkeypatch):
    log = {}
    monkeypatch.setattr(p2p.pipeline, "Controller", recording(log))          # (row, reference counter, site, ...)
    spec = Replace(cross_replace_steps=0.5, self_replace_steps=(0.25, 0.75), self_replace_max_res=64)
    blend = LocalBlend(words=("squirrel", "lion"), start_blend=0.5, threshold=0.9)
    out = edit(tiny_sd, [SRC, LION], spec, local_blend=blend, sampler=heun, **KW)

    rows = [c.row for c in Heun.create(N).calls]                               # [0, 0, 1, 1, 2, 2, 3]
    layers = len(tiny_sd.unet.sites)
    assert [i for i, _, _, _ in log["attn"]] == [r for r in rows for _ in range(layers)]
    cross = {i for i, _, site, inj in log["attn"] if site.is_cross and inj}
    self_ = {i for i, _, site, inj in log["attn"] if not site.is_cross and inj}
    assert cross == set(range(int(0.5 * (N + 1)))) == {0, 1}                   # rows of the T + 1
    assert self_ == set(range(int(0.25 * N), int(0.75 * N))) == {1, 2}
    assert all(inj == (i in (cross if site.is_cross else self_)) for i, _, site, inj in log["attn"])
    assert [i for i, _ in log["blend"]] == list(range(len(rows)))              # one callback per call
    assert [changed for _, changed in log["blend"]] == [r >= int(0.5 * N) for r in rows]
    assert out.attention.num_steps == len(rows) and out.attention.sums      # maps stored at every call
    source = generate(tiny_sd, SRC, sampler=heun, **KW).latents
    torch.testing.assert_close(out.latents[:1], source, rtol=0, atol=1e-4)    # the source row is not edited


def test_replacing_a_prompt_by_itself_is_generating_it(tiny_sd, heun):
    spec = Replace(cross_replace_steps=1.0, self_replace_steps=1.0, self_replace_max_res=64)
    edited = edit(tiny_sd, [SRC, SRC], spec, sampler=heun, **KW).latents
    plain = generate(tiny_sd, SRC, sampler=heun, **KW).latents
    torch.testing.assert_close(edited, plain.expand_as(edited), rtol=0, atol=1e-4)


def test_only_the_rows_the_calls_read_inject(tiny_sd, heun):
    """T = 2: Heun's calls read rows 0, 0, 1; row 2 of the T + 1 is never read, rows 0 and 1 are."""
    kw = {**KW, "num_steps": 2}
    none = edit(tiny_sd, [SRC, LION], Replace(cross_replace_steps=0.0, self_replace_steps=0.0), sampler=heun, **kw)
    for window, injects in (((0.7, 1.0), False), ((0.0, 0.5), True), ((0.4, 0.7), True)):
        spec = Replace(cross_replace_steps=window, self_replace_steps=0.0)
        got = edit(tiny_sd, [SRC, LION], spec, sampler=heun, **kw).latents
        assert torch.equal(got[0], none.latents[0])
        assert (not torch.equal(got[1], none.latents[1])) == injects, window


def test_the_fast_path_follows_the_rows(tiny_sd, heun):
    spec = Replace(cross_replace_steps=0.6, self_replace_steps=0.5, self_replace_max_res=64)
    fast, maps = (edit(tiny_sd, [SRC, LION], spec, sampler=heun, fast=f, **KW).latents for f in (True, False))
    torch.testing.assert_close(fast, maps, rtol=0, atol=1e-4)


def test_the_controller_refuses_calls_outside_its_schedule(tiny_sd):
    tok, sites = tiny_sd.tokenizer, tiny_sd.unet.sites
    with pytest.raises(ValueError, match=r"rows \[0, 6\], but 5 steps have the rows 0..5"):
        Controller(tok, [SRC, LION], Replace(), 5, sites, calls=[Call(981, 0), Call(961, 6)])
    ctl = Controller(tok, [SRC, LION], Replace(), 5, sites, calls=DDIM.create(5).calls)
    with pytest.raises(ValueError, match="UNet call 5, but the sampler this controller was built for makes 5 calls"):
        ctl.override(5)


# ------------------------------------------------------------------------------------------- plms
def test_plms_and_pndm_are_one_sampler(tiny_sd):
    assert models.sd.SAMPLERS["plms"] is models.sd.SAMPLERS["pndm"] is PNDM
    assert torch.equal(generate(tiny_sd, SRC, sampler="plms", **KW).latents,
                       generate(tiny_sd, SRC, sampler="pndm", **KW).latents)
    spec = Replace(cross_replace_steps=0.5, self_replace_steps=0.4)
    assert torch.equal(edit(tiny_sd, [SRC, LION], spec, sampler="plms", **KW).latents,
                       edit(tiny_sd, [SRC, LION], spec, sampler="pndm", **KW).latents)


def test_a_config_file_may_name_plms(tmp_path):
    path = tmp_path / "edit.yaml"
    path.write_text(f"prompt: {SRC}\nedits: [{LION}]\nsampler: plms\n")
    cfg = load_edit_config(path)
    cfg.check(path)
    assert cfg.sampler == "plms"


def test_the_command_line_runs_plms_as_pndm(tmp_path, golden_dir):
    images = {}
    for name in ("plms", "pndm"):
        out = tmp_path / f"{name}.png"
        assert main(["edit", "--ckpt", str(golden_dir / "tiny-sd-a.safetensors"), "--prompt", SRC, "--edit", LION,
                     "--steps", "2", "--height", "32", "--width", "32", "--sampler", name, "-o", str(out)]) == 0
        assert json.loads(out.with_name(out.name + ".json").read_text())["settings"]["sampler"] == name
        images[name] = out.read_bytes()
    assert images["plms"] == images["pndm"]


# ------------------------------------------------------------------------------------------ inversion
def test_inversion_asks_for_an_inverse_step_not_a_name(tiny_sd, heun, monkeypatch, tmp_path):
    assert has_inverse_step(DDIM) and not has_inverse_step(PNDM) and not has_inverse_step(Heun)
    photo = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"invert\(\): sampler='heun' with an inversion: .*need DDIM or another "
                                         r"sampler with an inverse step .* Heun has none; .*'ddim'"):
        invert(tiny_sd, photo, SRC, sampler=heun, progress=False)
    with pytest.raises(ValueError, match="unknown sampler 'euler'; known samplers: ddim, plms, pndm, heun"):
        require_inverse_step("euler", "invert()")
    monkeypatch.setitem(models.sd.SAMPLERS, "eta0", DDIM)                     # another name, an inverse step
    inv = invert(tiny_sd, photo, SRC, method="ddim", num_steps=2, sampler="eta0", progress=False)
    assert inv.sampler == "eta0"
    assert torch.equal(inv.x_T, invert(tiny_sd, photo, SRC, method="ddim", num_steps=2, progress=False).x_T)
    loaded = Inversion.load(inv.save(tmp_path / "inv.safetensors"))
    assert loaded.sampler == "eta0"
    edit(tiny_sd, [SRC, LION], Replace(), inversion=loaded, progress=False)
    with pytest.raises(ValueError, match="sampler='ddim' conflicts with the inversion's sampler='eta0'"):
        edit(tiny_sd, [SRC, LION], Replace(), inversion=loaded, sampler="ddim", progress=False)


class InvertibleHeun(Heun):
    def inverse_step(self, eps, t, x):
        return self.ddim.inverse_step(eps, t, x)


def test_the_inversions_retrace_one_call_per_step(tiny_sd, monkeypatch):
    monkeypatch.setitem(models.sd.SAMPLERS, "heun", InvertibleHeun)
    with pytest.raises(ValueError, match=r"one UNet call per step, but InvertibleHeun makes 3 calls for 2 steps "
                                         r"\(reading the rows \[0, 0, 1\]\)"):
        invert(tiny_sd, torch.zeros(1, 3, 32, 32), SRC, method="ddim", num_steps=2, sampler="heun", progress=False)


def resaved(src, dst, change) -> None:
    with safe_open(str(src), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(metadata["inversion"])
    change(meta)
    save_file(tensors, str(dst), metadata={"format": metadata["format"], "inversion": json.dumps(meta)})


def test_a_saved_inversion_names_its_sampler(tmp_path):
    x = torch.zeros(1, 4, 4, 4)
    path = Inversion("ddim", SRC, 2, 7.5, 1, 32, 32, x_T=x, trajectory=[x] * 3).save(tmp_path / "inv.safetensors")
    resaved(path, tmp_path / "old.safetensors", lambda m: m.pop("sampler"))  # saved before it was recorded
    assert Inversion.load(tmp_path / "old.safetensors").sampler == "ddim"
    resaved(path, tmp_path / "plms.safetensors", lambda m: m.update(sampler="plms"))
    with pytest.raises(ValueError, match="sampler 'plms' is not a known sampler with an inverse step"):
        Inversion.load(tmp_path / "plms.safetensors")


# ---------------------------------------------------------------------------------- eps / v / x0 / flow
@pytest.mark.parametrize("kind", list(PREDICTIONS))
def test_each_prediction_converts_to_and_from_eps_by_its_definition(kind):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, 3, generator=g,
                                                                                     dtype=torch.float64)
    alpha, sigma = (0.6, 0.4) if kind == "flow" else vp(torch.tensor(0.3, dtype=torch.float64))
    x = noised(x0, eps, alpha, sigma)
    pred = {"epsilon": eps, "v": alpha * eps - sigma * x0, "sample": x0, "flow": eps - x0}[kind]
    torch.testing.assert_close(from_eps(kind, eps, x, alpha, sigma), pred)
    torch.testing.assert_close(to_eps(kind, pred, x, alpha, sigma), eps)
    torch.testing.assert_close(PREDICTIONS[kind].to_x0(pred, x, alpha, sigma), x0)


def test_model_outputs_convert_in_fp32_and_keep_their_dtype():
    x, out = torch.randn(1, 4, 2, 2).half(), torch.randn(1, 4, 2, 2).half()
    a = torch.tensor(0.4)
    assert as_eps("epsilon", out, x, a) is out and x0_and_eps("epsilon", out, x, a)[1] is out
    v_eps = as_eps("v", out, x, a)
    assert v_eps.dtype == torch.float16
    assert torch.equal(v_eps, (a.sqrt() * out.float() + (1 - a).sqrt() * x.float()).half())
    with pytest.raises(ValueError, match="unknown prediction type 'v_prediction'; known: epsilon, v, sample, flow"):
        as_eps("v_prediction", out, x, a)
