"""edit(..., sampler="pndm") counts as the reference's stable notebook did with PLMS, on the tiny golden model.

The reference's controller advances `cur_att_layer` at every attention call and `cur_step` after the last
layer of each UNet call, so with PLMS its step counter counts UNet calls (N + 1 for N steps): all N + 1
rows of the cross-attention schedule are used, the self-attention window [int(N s0), int(N s1)) and
LocalBlend's start (it blends once its own per-callback counter exceeds int(start_blend N)) count calls.
A recording controller checks each attention call's step and injection against that counting; then the
bad inputs (an unknown sampler, PLMS with an inversion) and the command line."""
import json

import pytest
import torch
from PIL import Image

import p2p.pipeline
from models.sd import SAMPLERS
from p2p import LocalBlend, Replace, edit, generate
from p2p.cli import main, parser
from p2p.config import load_edit_config
from p2p.control import Controller
from p2p.inversion import Inversion, invert

N = 5  # PLMS: 6 UNet calls
KW = dict(seed=3, num_steps=N, height=32, width=32, progress=False)
SRC, LION = "a painting of a squirrel eating a burger", "a painting of a lion eating a burger"


class ReferenceCounter:
    """The reference's AttentionControl counting: each attention layer call advances cur_att_layer; the
    last layer of a UNet call wraps it to 0 and advances cur_step. Returns the step of the call it counts."""

    def __init__(self, num_att_layers: int):
        self.n, self.cur_att_layer, self.cur_step = num_att_layers, 0, 0

    def __call__(self) -> int:
        step = self.cur_step
        self.cur_att_layer += 1
        if self.cur_att_layer == self.n:
            self.cur_att_layer, self.cur_step = 0, self.cur_step + 1
        return step


def recording(log: dict):
    """A Controller that records, per attention call, (its step index, the reference counter's step, site,
    injected), and per callback (step, whether LocalBlend changed the latents)."""

    class Recording(Controller):
        def __init__(self, tokenizer, prompts, spec, num_steps, sites, *a, **k):
            super().__init__(tokenizer, prompts, spec, num_steps, sites, *a, **k)
            self.reference = ReferenceCounter(len(sites))
            log.update(attn=[], blend=[], num_steps=num_steps)

        def attend(self, i, site, q, k, v):
            injected = self.cross_active(i) if site.is_cross else self.self_active(i, site)
            log["attn"].append((i, self.reference(), site, injected))
            return super().attend(i, site, q, k, v)

        def step_callback(self, i, x):
            out = super().step_callback(i, x)
            log["blend"].append((i, not torch.equal(out, x)))
            return out

    return Recording


def reference_cross_rows(cross: float, T: int) -> set:
    """get_time_words_attention_alpha for a float: rows [0, int(cross (T + 1))) of T + 1."""
    return set(range(0, int(cross * (T + 1))))


def reference_self_steps(s0: float, s1: float, T: int) -> set:
    return set(range(int(T * s0), int(T * s1)))


def test_edit_with_plms_counts_unet_calls_as_the_reference(tiny_sd, monkeypatch):
    log = {}
    monkeypatch.setattr(p2p.pipeline, "Controller", recording(log))
    spec = Replace(cross_replace_steps=0.5, self_replace_steps=(0.2, 0.8), self_replace_max_res=64)
    blend = LocalBlend(words=("squirrel", "lion"), start_blend=0.4, threshold=0.9)
    edit(tiny_sd, [SRC, LION], spec, local_blend=blend, sampler="pndm", **KW)

    layers = len(tiny_sd.unet.sites)
    assert log["num_steps"] == N and len(log["attn"]) == (N + 1) * layers   # N + 1 UNet calls
    assert all(i == ref for i, ref, _, _ in log["attn"]), "the loop's step index is not the reference's counter"
    cross = {i for i, _, site, inj in log["attn"] if site.is_cross and inj}
    self_ = {i for i, _, site, inj in log["attn"] if not site.is_cross and inj}
    assert cross == reference_cross_rows(0.5, N) == {0, 1, 2}                # 3 of the T + 1 = 6 rows
    assert self_ == reference_self_steps(0.2, 0.8, N) == {1, 2, 3}
    for i, _, site, inj in log["attn"]:                                      # every layer of an injecting call
        assert inj == (i in (cross if site.is_cross else self_)), (i, site)
    # the null-text notebook's LocalBlend: counter += 1 per callback, blend while counter > int(start_blend T)
    start = int(0.4 * N)
    assert [i for i, changed in log["blend"]] == list(range(N + 1))
    assert [changed for _, changed in log["blend"]] == [c + 1 > start for c in range(N + 1)]


def test_the_last_alpha_row_is_used_by_plms_only(tiny_sd):
    """Row T of the (T + 1)-row schedule is reached by PLMS's extra call and never by DDIM's T calls."""
    kw = {**KW, "num_steps": 2}                                                # T = 2: PLMS makes 3 calls
    last_row = Replace(cross_replace_steps=(0.7, 1.0), self_replace_steps=0.0)   # rows [int(0.7 * 3), 3) = {2}
    none = Replace(cross_replace_steps=0.0, self_replace_steps=0.0)
    for sampler, differs in (("pndm", True), ("ddim", False)):
        a = edit(tiny_sd, [SRC, LION], last_row, sampler=sampler, **kw).latents
        b = edit(tiny_sd, [SRC, LION], none, sampler=sampler, **kw).latents
        assert torch.equal(a[0], b[0])                                        # the source row is never edited
        assert (not torch.equal(a[1], b[1])) == differs, sampler


def test_plms_and_ddim_differ_and_plms_is_deterministic(tiny_sd):
    a = generate(tiny_sd, SRC, sampler="pndm", **KW).latents
    assert torch.equal(a, generate(tiny_sd, SRC, sampler="pndm", **KW).latents)   # no history leaks between runs
    assert not torch.allclose(a, generate(tiny_sd, SRC, **KW).latents, atol=1e-3)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call", ["generate", "edit", "scheduler"])
def test_an_unknown_sampler_lists_the_known_ones(tiny_sd, call):
    run = {"generate": lambda: generate(tiny_sd, SRC, sampler="euler", **{**KW, "num_steps": 2}),
           "edit": lambda: edit(tiny_sd, [SRC, LION], Replace(), sampler="euler", **{**KW, "num_steps": 2}),
           "scheduler": lambda: tiny_sd.scheduler(10, 1, "euler")}[call]
    with pytest.raises(ValueError, match=r"sampler.*'euler'|'sampler' must be one of ddim, plms, pndm, got 'euler'") \
            as err:
        run()
    assert all(name in str(err.value) for name in SAMPLERS), str(err.value)


def test_a_config_file_with_an_unknown_sampler_fails_naming_it(tmp_path):
    path = tmp_path / "edit.yaml"
    path.write_text(f"prompt: {SRC}\nedits: [{LION}]\nsampler: euler\n")
    with pytest.raises(ValueError, match=r"edit.yaml: 'sampler' must be one of ddim, plms, pndm, got 'euler'"):
        load_edit_config(path).check(path)


def test_the_command_line_lists_the_samplers(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["generate", "--prompt", "a", "--sampler", "euler", "-o", "x.png"])
    assert "invalid choice: 'euler' (choose from ddim, plms, pndm)" in capsys.readouterr().err \
        .replace("'ddim'", "ddim").replace("'plms'", "plms").replace("'pndm'", "pndm")


def fake_inversion(sd) -> Inversion:
    x = torch.zeros(1, 4, 16, 16)
    return Inversion("ddim", SRC, N, 7.5, 1, 32, 32, x_T=x, trajectory=[x] * (N + 1))


def test_plms_with_an_inversion_is_refused(tiny_sd):
    with pytest.raises(ValueError, match=r"sampler='pndm' with an inversion.*need DDIM"):
        edit(tiny_sd, [SRC, LION], Replace(), inversion=fake_inversion(tiny_sd), sampler="pndm", progress=False)
    with pytest.raises(ValueError, match=r"invert\(\): sampler='pndm' with an inversion"):
        invert(tiny_sd, torch.zeros(1, 3, 32, 32), SRC, sampler="pndm", progress=False)


def test_cli_plms_with_an_inversion_fails_before_loading(tmp_path, golden_dir, monkeypatch, capsys):
    monkeypatch.setattr("p2p.cli.load_model", lambda *a: pytest.fail("the model was loaded"))
    photo = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (120, 30, 200)).save(photo)
    for argv in (["invert", "--image", str(photo), "--prompt", SRC, "-o", str(tmp_path / "inv.safetensors")],
                 ["edit", "--image", str(photo), "--prompt", SRC, "--edit", LION, "-o", str(tmp_path / "e.png")]):
        assert main([*argv, "--ckpt", str(golden_dir / "tiny-sd-a.safetensors"), "--sampler", "pndm"]) != 0
        assert "sampler='pndm' with an inversion" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["photo.png"]


def test_cli_edit_with_plms_records_it(tmp_path, golden_dir):
    out = tmp_path / "edit.png"
    rc = main(["edit", "--ckpt", str(golden_dir / "tiny-sd-a.safetensors"), "--prompt", SRC, "--edit", LION,
               "--steps", "2", "--height", "32", "--width", "32", "--sampler", "pndm", "-o", str(out)])
    assert rc == 0 and out.exists()
    assert json.loads(out.with_name(out.name + ".json").read_text())["settings"]["sampler"] == "pndm"


def test_the_plms_example_config_is_the_stable_notebooks():
    cfg = load_edit_config("configs/edits/squirrel_lion_blend_plms.yaml")
    assert (cfg.sampler, cfg.num_steps, cfg.guidance_scale, cfg.seed, cfg.steps_offset) == ("pndm", 50, 7.5, 8888, 1)
    cfg.check("configs/edits/squirrel_lion_blend_plms.yaml")


def test_the_sampler_is_a_sweep_knob_and_override(tmp_path, golden_dir):
    from p2p.sweep.plan import batch_edit, plan_batches, prepare

    path = tmp_path / "abl.yaml"
    path.write_text(f"prompt: {SRC}\nedits: [{LION}]\nckpt: {golden_dir / 'tiny-sd-a.safetensors'}\n"
                    f"grid: {{sampler: [ddim, pndm], cross_replace_steps: [0.2, 0.8]}}\n")
    ab, cells, tok = prepare(path)
    assert ab["rows"] == ["sampler"]                                          # it changes the source image
    assert [batch_edit(b, tok).kwargs["sampler"] for b in plan_batches(cells, 8)] == ["ddim", "ddim", "pndm", "pndm"]
    path.write_text(f"prompt: {SRC}\nedits: [{LION}]\nckpt: {golden_dir / 'tiny-sd-a.safetensors'}\n"
                    f"grid: {{cross_replace_steps: [0.2, 0.8]}}\n")
    _, cells, tok = prepare(path, {"sampler": "pndm"})
    assert {batch_edit(b, tok).kwargs["sampler"] for b in plan_batches(cells, 8)} == {"pndm"}
    path.write_text(f"prompt: {SRC}\nedits: [{LION}]\nckpt: {golden_dir / 'tiny-sd-a.safetensors'}\n"
                    f"grid: {{sampler: [ddim, euler]}}\n")  # (words are checked with this checkpoint's tokenizer)
    with pytest.raises(ValueError, match="'sampler' must be one of ddim, plms, pndm, got 'euler'"):
        prepare(path)
