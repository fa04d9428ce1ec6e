"""The miniature Stable Diffusion's data, its measurements from pixels, and its training loop.
Prompt-to-Prompt's claims on the shipped checkpoint are in tests/test_miniature_claims.py."""
import json

import numpy as np
import pytest

from p2p.miniature import measure as M
from p2p.miniature.data import make_sample

def test_samples_are_deterministic_and_captioned():
    a, cap_a, fa = make_sample(7)
    b, cap_b, fb = make_sample(7)
    assert np.array_equal(a, b) and cap_a == cap_b
    o = fa["objects"][0]
    assert o["shape"] in cap_a and o["colour"] in cap_a
    assert (f"on a {fa['background']} background" in cap_a) == fa["bg_word"]
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and o["mask"].any()


def test_some_captions_leave_the_background_unnamed():
    """with p_bg_word 0.8 about 80% of captions name the background, the others end with the
    object(s); the picture of a seed does not depend on it."""
    caps = [make_sample(s, p_bg_word=0.8)[1] for s in range(200)]
    assert all(np.array_equal(make_sample(s)[0], make_sample(s, p_bg_word=0.8)[0]) for s in range(20))
    assert all(make_sample(s)[1].endswith(" background") for s in range(50))
    named = sum(c.endswith(" background") for c in caps)
    assert 0.7 * 200 <= named <= 0.9 * 200
    assert all(" background" not in c for c in caps if not c.endswith(" background"))


def test_facts_are_recoverable_from_pixels():
    """colour and shape read back from the generator's own pictures (the measurement's ceiling)."""
    colour_ok = shape_ok = n = 0
    for seed in range(150):
        img, _, f = make_sample(seed)
        if len(f["objects"]) != 1:
            continue
        o, r = f["objects"][0], M.read_facts(img, f["background"])
        n += 1
        colour_ok += r["colour"] == o["colour"]
        shape_ok += r["shape"] == o["shape"]
        assert np.array_equal(r["mask"], o["mask"])
    assert colour_ok == n
    assert shape_ok >= 0.95 * n  # a few small stars and triangles rasterise ambiguously


def test_training_smoke(tmp_path):
    """Two steps of each stage (every opt-in part on) on a tiny batch; the result loads as a checkpoint."""
    from p2p.miniature.train import train
    from weights_tools import load_checkpoint

    out = train(tmp_path / "m.safetensors", n_data=8, vae_steps=2, vae_batch=2, vae_paste=0.5, decoder_steps=2,
                decoder_batch=2, unet_steps=3, batch=2, layout_weight=0.1, layout_from=0.5, bg_word_p=0.8, save_every=1,
                log_path=tmp_path / "log.jsonl", progress=False)
    sd = load_checkpoint(out)
    assert sd.cfg.unet.model_channels == 64 and sd.cfg.image_size == 16 and sd.latent_downsample == 4
    log = (tmp_path / "log.jsonl").read_text()
    unet = [json.loads(r) for r in log.splitlines() if '"stage": "unet"' in r]
    assert len(unet) == 3 and log.count('"stage": "decoder"') == 2
    assert ["layout" in r for r in unet] == [False, True, True]  # from step int(0.5 * 3) on


def test_two_stage_training_keeps_the_vae(tmp_path):
    """The shipped checkpoint's recipe: `--unet-steps 0` (VAE stage), then `--init-from` (UNet and
    text encoder); the second stage keeps the first's VAE and scale_factor exactly."""
    from safetensors.torch import load_file

    from p2p.miniature.train import main, train
    from weights_tools import load_checkpoint

    kw = dict(n_data=8, vae_steps=2, vae_batch=2, batch=2, decoder_batch=2, progress=False)
    stage1 = train(tmp_path / "s1.safetensors", unet_steps=0, decoder_steps=2, **kw)
    final = train(tmp_path / "s2.safetensors", unet_steps=2, init_from=stage1, **kw)
    a, b = load_file(stage1), load_file(final)
    vae = [k for k in a if k.startswith("first_stage_model.")]
    unet = [k for k in a if k.startswith("model.diffusion_model.")]
    assert vae and all(a[k].equal(b[k]) for k in vae)
    assert not all(a[k].equal(b[k]) for k in unet)
    assert load_checkpoint(stage1).cfg.scale_factor == load_checkpoint(final).cfg.scale_factor
    # --decoder-steps with --init-from trains that file's decoder only: the encoder, so the latents
    # and scale_factor, stay
    redo = load_file(train(tmp_path / "s3.safetensors", unet_steps=0, decoder_steps=2, init_from=stage1, **kw))
    enc = [k for k in vae if k.startswith(("first_stage_model.encoder.", "first_stage_model.quant_conv."))]
    dec = [k for k in vae if k.startswith(("first_stage_model.decoder.", "first_stage_model.post_quant_conv."))]
    assert enc and all(a[k].equal(redo[k]) for k in enc)
    assert dec and not all(a[k].equal(redo[k]) for k in dec)
    # --fresh-unet keeps the whole VAE but starts the UNet and text encoder again: with no UNet steps
    # the UNet is the untrained one (its output conv zeroed), not the file's
    fresh = load_file(train(tmp_path / "s4.safetensors", unet_steps=0, init_from=final, fresh_unet=True, **kw))
    trained = load_file(final)
    assert all(fresh[k].equal(trained[k]) for k in vae)
    out_w = "model.diffusion_model.out.2.weight"
    assert not trained[out_w].eq(0).all() and fresh[out_w].eq(0).all()
    # without a file to keep the VAE of, it is refused before anything runs or is written
    with pytest.raises(ValueError, match="needs init_from"):
        train(tmp_path / "s5.safetensors", unet_steps=0, fresh_unet=True, **kw)
    with pytest.raises(SystemExit):
        main(["--fresh-unet", "--out", str(tmp_path / "s5.safetensors")])
    with pytest.raises(ValueError, match="layout_to must be"):
        train(tmp_path / "s5.safetensors", unet_steps=0, layout_to="q", **kw)
    assert not (tmp_path / "s5.safetensors").exists()


def test_a_run_split_into_its_stages_writes_the_same_file(tmp_path):
    """`--unet-steps 0` (the VAE stage), then `--init-from` that file `--fresh-unet` with the UNet
    stage's options, writes the bytes the whole run writes: the VAE stage does not depend on the
    caption or layout options, and the whole run reseeds its generator and re-encodes the pictures
    with the fp16 VAE before its UNet stage, as the second command starts. (docs/miniature.md.)"""
    from p2p.miniature.train import train

    kw = dict(n_data=12, vae_steps=3, vae_batch=2, batch=2, decoder_batch=2, progress=False)
    unet = dict(unet_steps=3, layout_weight=0.1, layout_from=0.5, bg_word_p=0.8)
    whole = train(tmp_path / "whole.safetensors", decoder_steps=2, **unet, **kw)
    stage1 = train(tmp_path / "stage1.safetensors", decoder_steps=2, unet_steps=0, **kw)
    split = train(tmp_path / "split.safetensors", init_from=stage1, fresh_unet=True, **unet, **kw)
    assert whole.read_bytes() == split.read_bytes()
    assert stage1.read_bytes() != split.read_bytes()


def test_layout_loss_to_qk_reaches_only_the_query_and_key_projections():
    """`--layout-to qk`: every other parameter gets the epsilon loss's gradient alone, the
    cross-attention query and key projections that plus the layout loss's."""
    import torch

    from models.config import load_config
    from models.sd import StableDiffusion
    from p2p.miniature.train import AttentionRecorder, backward, layout_loss

    torch.manual_seed(0)
    sd = StableDiffusion(load_config("miniature"))
    unet, text = sd.unet, sd.text_encoder
    params = [*unet.parameters(), *text.parameters()]
    qk = [p for n, p in unet.named_parameters() if ".attn2.to_q." in n or ".attn2.to_k." in n]
    is_qk = [any(p is q for q in qk) for p in params]
    z, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    tok = sd.tokenize(["a big red circle", "a blue square on a gray background"])
    masks = torch.zeros(2, 2, 16, 16)
    masks[:, 0, 3:9, 4:12] = 1
    owners = torch.full((2, 77), -1)
    owners[:, 1:4] = 0

    def losses():
        rec = AttentionRecorder()
        eps = unet(z, t, text(tok), attn_override=rec).pow(2).mean()
        return eps, layout_loss(rec.maps, masks, owners, torch.ones(2))

    def grads(step):
        for p in params:
            p.grad = None
        step()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    eps_only = grads(lambda: losses()[0].backward())
    both = grads(lambda: backward(*losses()))
    split = grads(lambda: backward(*losses(), only=qk))
    assert sum(is_qk) == len(qk) > 0
    for a, b, c, q in zip(eps_only, both, split, is_qk):
        torch.testing.assert_close(c, b if q else a)
    # unrestricted, the layout loss reaches the rest of the UNet and the text encoder too
    assert any(not torch.allclose(a, b) for a, b, q in zip(eps_only, both, is_qk) if not q)
    assert any(not torch.allclose(a, b) for a, b, q in zip(eps_only, both, is_qk) if q)


def test_layout_all_from_hands_the_layout_loss_to_every_parameter(tmp_path, monkeypatch):
    """--layout-to qk --layout-all-from 0.5: the first half of the layout steps train q/k alone,
    the rest every parameter; a fraction outside 0..1 is refused before anything runs."""
    from p2p.miniature import train as T

    seen = []
    real = T.backward
    monkeypatch.setattr(T, "backward", lambda loss, extra, only=None: (seen.append(only), real(loss, extra, only)))
    T.train(tmp_path / "m.safetensors", n_data=8, vae_steps=1, vae_batch=2, decoder_steps=0, unet_steps=4, batch=2,
            layout_weight=0.1, layout_from=0.0, layout_to="qk", layout_all_from=0.5, progress=False)
    assert [only is None for only in seen] == [False, False, True, True]
    assert len(seen[0]) > 0
    with pytest.raises(ValueError, match="layout_all_from"):
        T.train(tmp_path / "bad.safetensors", n_data=8, unet_steps=0, layout_all_from=1.5, progress=False)
    assert not (tmp_path / "bad.safetensors").exists()


def test_striped_background_is_read_from_pixels():
    """The Refine measurement's reading of 'striped': right on every generated picture (a flat gray
    background must not pass: it sits between the two stripe greys)."""
    from p2p.miniature.evaluate import is_striped

    for seed in range(120):
        img, _, f = make_sample(seed)
        mask = np.zeros(img.shape[:2], bool)
        for o in f["objects"]:
            mask |= o["mask"]
        assert is_striped(img, mask) == (f["background"] == "striped"), (seed, f["background"])


def test_word_owners_follow_the_caption():
    from p2p.miniature.data import word_owners

    objs = [dict(size_word="small", colour="red", shape="circle"), dict(size_word=None, colour="red", shape="star")]
    cap = "a small red circle and a red star on a red background"
    assert word_owners(cap, objs) == [-1, 0, 0, 0, -1, -1, 1, 1, -1, -1, -1, -1]


def test_paste_keeps_each_latent_on_its_side():
    """Latents and pixels inside the rectangle come from the first picture, outside from the second,
    and the loss skips the cells that touch the rectangle's edge."""
    import torch

    from p2p.miniature.train import paste

    g = torch.Generator().manual_seed(0)
    z, zb, x, xb = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8), torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    zc, xc, w = paste(z, x, zb, xb, g)
    inside = (zc == z).all(1)                        # (6, 8, 8)
    assert inside.any((1, 2)).all() and (~inside).any((1, 2)).all()
    assert torch.equal((zc == zb).all(1), ~inside)
    up = inside.repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert torch.equal(xc, torch.where(up[:, None], x, xb))
    edge = torch.nn.functional.max_pool2d(inside[:, None].float(), 3, 1, 1) != -torch.nn.functional.max_pool2d(
        -inside[:, None].float(), 3, 1, 1)
    assert torch.equal(w == 0, edge.repeat_interleave(4, 2).repeat_interleave(4, 3))


def test_layout_loss_is_the_attention_outside_the_object():
    import torch

    from models.attention import Site
    from p2p.miniature.train import layout_loss

    site = Site("down", 0, 1, True, 4, 4)
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :, :2] = 1                            # object 0: the left half
    owners = torch.full((1, 77), -1)
    owners[0, 3] = 0                                  # token 3 describes object 0
    m = torch.zeros(1, 2, 16, 77)
    m[..., 0] = 1.0                                   # the rest of the mass on the start token
    inside, outside = m.clone(), m.clone()
    inside[0, :, 0, 3] = outside[0, :, 3, 3] = 0.5    # pixel 0 is in the left half, pixel 3 is not
    w = torch.ones(1)
    assert layout_loss([(site, inside)], masks, owners, w).item() == 0.0
    assert layout_loss([(site, outside)], masks, owners, w).item() == 1.0
    half = m.clone()
    half[0, :, 0, 3] = half[0, :, 3, 3] = 0.5
    assert abs(layout_loss([(site, half)], masks, owners, w).item() - 0.5) < 1e-6


def test_background_psnr_skips_a_seed_without_background():
    """The colour swap's background rows compare each picture on the same seeds: one whose object
    covers the picture (nothing left to compare) drops the seed from all of them."""
    from p2p.miniature.data import BACKGROUNDS, PALETTE
    from p2p.miniature.evaluate import background_psnrs

    src = np.full((64, 64, 3), BACKGROUNDS["gray"], np.uint8)
    src[20:40, 20:40] = PALETTE["red"]
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    moved = src.copy()
    moved[0:4, 0:4] = (100, 100, 100)  # background changed in a corner
    full = np.full_like(src, PALETTE["green"])
    same, worse = background_psnrs(src, mask, [src, moved], "gray")
    assert same == 60.0 and 20 < worse < 60
    assert background_psnrs(src, mask, [src, full], "gray") is None


def test_the_command_line_defaults_are_train_defaults(tmp_path, monkeypatch):
    """`python -m p2p.miniature.train` with no options calls `train()` with train()'s own defaults
    (the command that wrote the shipped file, docs/miniature.md); --decoder-steps left out is None, which
    train() reads as 200 from scratch and 0 with --init-from (that file's decoder is kept)."""
    import inspect

    from p2p.miniature import train as T

    defaults = {k: p.default for k, p in inspect.signature(T.train).parameters.items() if p.kind is p.KEYWORD_ONLY}
    calls = []
    monkeypatch.setattr(T, "train", lambda out, **kw: calls.append(kw) or out)
    assert T.main([]) == 0
    assert calls[0] and {k: defaults[k] for k in calls[0]} == calls[0]
    assert calls[0]["unet_steps"] == 1600 and calls[0]["layout_to"] == "qk" and calls[0]["decoder_steps"] is None


def test_subset_bounds_are_the_quantiles_of_small_subset_means(tmp_path, capsys):
    """`evaluate --bounds-from FILE`: the margins a 12-seed test may assert, from a 100-seed file."""
    from p2p.miniature.evaluate import main, subset_bounds

    R = {"const": [2.0] * 100, "coin": [0.0, 1.0] * 50, "few": [1.0] * 20,
         "rep_shift_base": list(np.arange(100.0)), "rep_shift_p2p": list(np.arange(100.0) - 3)}
    B = subset_bounds(R, k=12, draws=20_000)
    assert B["const"] == (2.0, 2.0, 2.0)
    m, lo, hi = B["coin"]
    assert m == 0.5 and 0.0 <= lo < 0.25 and 0.75 < hi <= 1.0  # 12 fair coins: 0.1% tails near 1/12 and 11/12
    assert "few" not in B  # under 2k seeds: no bound
    assert B["rep_shift_base-p2p"] == (3.0, 3.0, 3.0)  # per-seed differences, not differences of means
    path = tmp_path / "r.json"
    path.write_text(json.dumps(R))
    assert main(["--bounds-from", str(path)]) == 0
    assert "| coin | 0.500 |" in capsys.readouterr().out


def test_evaluate_refuses_an_unknown_part_and_defaults_to_the_shipped_checkpoint(capsys):
    """A misspelt --parts name is refused with the names it may take (it used to measure fidelity
    alone, silently); the default --checkpoint is the registry's name for the shipped file."""
    from p2p.miniature import CHECKPOINT
    from p2p.miniature.evaluate import main, parser
    from weights_tools.registry import resolve_checkpoint

    with pytest.raises(SystemExit):
        main(["--parts", "fidelity,blnd", "--seeds", "0"])
    err = capsys.readouterr().err
    assert "unknown 'blnd'" in err and "fidelity, replace, blend, reweight, refine, decoder" in err
    assert resolve_checkpoint(parser().parse_args([]).checkpoint) == CHECKPOINT


def test_the_training_log_keeps_what_a_failed_run_wrote(tmp_path):
    """json_lines writes one JSON record a line, with the seconds since the start, and the records of
    a run that fails stay in the file."""
    from p2p.miniature.train import json_lines

    path = tmp_path / "log.jsonl"
    with pytest.raises(RuntimeError), json_lines(path, 0.0) as log:
        log(dict(stage="vae", step=0))
        raise RuntimeError("stage failed")
    rec = json.loads(path.read_text())
    assert rec["stage"] == "vae" and rec["step"] == 0 and rec["time"] > 0
    with json_lines(None, 0.0) as log:
        log(dict(stage="vae"))  # no path: nothing written, no error
