"""Train the miniature Stable Diffusion from scratch on `data.make_sample` pictures.

    python -m p2p.miniature.train [--out p2p/miniature/miniature.safetensors] [--threads 2]

Two stages, as SD v1 was built:
1. the VAE (AutoencoderKL): L1 + L2 reconstruction + a small KL (1e-6, SD's weight), on the posterior
   sample, on random 32x32 crops (the VAE is convolutional; a quarter of the cost of whole pictures).
   Then every training picture is encoded once (posterior mean and std kept) and `scale_factor` is
   set to 1 / std of the latents, as SD's 0.18215 was chosen.
2. the UNet and the CLIP text encoder together, epsilon prediction on z_t = sqrt(a_t) z_0 +
   sqrt(1 - a_t) eps with SD's scaled-linear schedule (models.ddim), t uniform in [0, 1000), so
   `p2p.generate`'s DDIM sampler fits the model; the loss is weighted by min-SNR-5 (Hang et al.,
   2023), which learns layout and colour sooner. 10% of captions are dropped to "" so
   classifier-free guidance works. AdamW, linear warmup then cosine decay, grad-norm clip 1, EMA of
   the weights (the EMA is what is saved).
Parts beyond SD's recipe (docs/miniature.md says what each measured). The defaults are the command
that wrote the shipped file: `--decoder-steps 200 --layout-loss 0.1 --layout-from 0.5 --layout-to qk
--layout-all-from 0.9 --bg-word-p 0.9`; `--vae-paste` is off.
- `--vae-paste F`: F of each VAE batch is decoded from latents pasted from two pictures through a
  random rectangle, against the same paste of the pixels (`paste`), so that the decoder keeps a
  latent change where it is (LocalBlend blends latents; GroupNorm statistics and the mid-block
  attention otherwise carry a change in the middle to the whole picture).
- `--decoder-steps N`: stage 1b, the decoder alone on whole pictures with half of each batch pasted
  (`train_decoder_local`); the encoder, hence the latents, stay, so it can follow a trained UNet.
  With `--init-from` it defaults to 0 (that file's decoder is kept).
- `--layout-loss W`: plus W * `layout_loss`, the share of each object word's cross-attention that
  falls outside its object. SD's maps come out localised from training at scale; this small a model
  trained for an hour spreads them, and the maps Prompt-to-Prompt injects and LocalBlend thresholds
  then mean little. `--layout-from F` starts it after a fraction F of the UNet steps; `--layout-to
  qk` lets its gradient reach only the cross-attention query and key projections (the maps move, the
  features the UNet draws with do not), and with it `--layout-all-from F2` lets it reach every
  parameter again from the fraction F2 of the steps on.
- `--bg-word-p P`: only P of the captions name the background, so that prompts without one (Refine's
  source) are ones the model has seen.
The stages can run as separate commands: `--unet-steps 0` writes the VAE stage (with an untrained
UNet), and `--init-from FILE` keeps that file's VAE (but for `--decoder-steps`) and scale_factor and
trains its UNet and text encoder further. With `--fresh-unet` as well, only that file's VAE is kept
and the UNet stage starts from scratch (ablations of the UNet stage without training the VAE again).
A run split so writes the same bytes as the whole run: the VAE stage does not depend on the UNet
stage's options, and a whole run reseeds its generator and re-encodes the pictures with the VAE as
saved (fp16) before the UNet stage, as the second command starts. (A run with `--init-from` and
`--decoder-steps` keeps drawing from one generator through its decoder stage and UNet stage.)
The checkpoint is written in the original single-file layout (models.sd.PREFIXES, int64
position_ids, config JSON in the `ldm_config` metadata), floats as fp16 (`load_checkpoint` casts
them back to fp32), and rewritten every `--save-every` steps so a cut-off run loses little.
Deterministic for a given seed and thread count. `--device cuda` moves the models to a GPU; every
random draw stays on the CPU generator, so the batches are the same (the file differs in rounding).
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.attention import attention_probs
from models.config import load_config
from models.ddim import DDIM
from models.sd import StableDiffusion
from weights_tools import load_checkpoint
from weights_tools.registry import save_checkpoint

from . import CHECKPOINT
from .data import make_dataset

DEFAULT_OUT = CHECKPOINT  # without --out a run overwrites the shipped file


# ------------------------------------------------------------------------------------- model
def init_weights(sd: StableDiffusion) -> None:
    """PyTorch's default init, plus what the CompVis/CLIP code does: zero the last layer of every
    residual branch of the UNet (ResBlock out conv, transformer proj_out, the output conv) so the
    untrained UNet is near the identity on its skip paths; CLIP embeddings N(0, 0.02)."""
    u = sd.unet
    for m in u.modules():
        if hasattr(m, "out_layers"):
            torch.nn.init.zeros_(m.out_layers[-1].weight)
            torch.nn.init.zeros_(m.out_layers[-1].bias)
        if hasattr(m, "proj_out") and hasattr(m, "transformer_blocks"):
            torch.nn.init.zeros_(m.proj_out.weight)
            torch.nn.init.zeros_(m.proj_out.bias)
    torch.nn.init.zeros_(u.out[-1].weight)
    torch.nn.init.zeros_(u.out[-1].bias)
    e = sd.text_encoder.embeddings
    torch.nn.init.normal_(e.token_embedding.weight, std=0.02)
    torch.nn.init.normal_(e.position_embedding.weight, std=0.01)


def build_model(config, init_from=None, fresh_unet=False) -> StableDiffusion:
    """A new model from `config`; or the checkpoint `init_from` (its VAE and scale_factor are kept),
    with a new UNet and text encoder when `fresh_unet`. Built after torch.manual_seed(seed): the
    initial weights are drawn from torch's global generator."""
    if init_from is None:
        sd = StableDiffusion(load_config(config))
        init_weights(sd)
        return sd
    sd = load_checkpoint(init_from).requires_grad_(True).train()  # loaded frozen: train it again
    if fresh_unet:  # the UNet and text encoder start again from scratch on this VAE
        fresh = StableDiffusion(sd.cfg)
        init_weights(fresh)
        sd.unet, sd.text_encoder = fresh.unet.train(), fresh.text_encoder.train()
    return sd


class EMA:
    """Exponential moving average of parameters, with the warm-up decay min(decay, (1+n)/(10+n))."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay, self.n = decay, 0
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for s, p in zip(self.shadow.parameters(), module.parameters()):
            s.lerp_(p.detach(), 1 - d)


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def set_lr(opt, lr: float) -> None:
    for grp in opt.param_groups:
        grp["lr"] = lr


def clip_and_step(opt, params) -> None:
    """Every stage clips the gradient norm at 1 before its AdamW step."""
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1


# ------------------------------------------------------------------------------------- VAE stages
def train_vae(sd, imgs, steps, batch, lr, g, log, crop: int = 32, paste_frac: float = 0.5, progress=True):
    """Stage 1. Random `crop` x `crop` crops: the VAE is convolutional and the pictures are flat colours,
    edges and stripes, so crops teach it nearly as well as whole pictures at a fraction of the cost."""
    vae = sd.vae.train()
    dev = next(vae.parameters()).device  # every random draw stays on the CPU generator g
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    N, H = imgs.shape[0], imgs.shape[1]
    bar = tqdm(range(steps), desc="VAE", disable=not progress)
    for step in bar:
        set_lr(opt, lr_at(step, steps, lr, max(1, steps // 20)))
        idx = torch.randint(0, N, (batch,), generator=g)
        oy, ox = (torch.randint(0, H - crop + 1, (2,), generator=g).tolist() if crop < H else (0, 0))
        x = to_tensor(imgs[idx.numpy(), oy:oy + crop, ox:ox + crop]).to(dev)
        mean, logvar = vae.encode_moments(x)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g).to(dev)
        z, x, w = paste_within(z, x, int(round(paste_frac * batch)), g)
        l1, l2 = weighted_l1_l2(vae.decode(z), x, w)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean()
        opt.zero_grad(set_to_none=True)
        (l1 + l2 + 1e-6 * kl).backward()
        clip_and_step(opt, vae.parameters())
        bar.set_postfix(l1=f"{l1.item():.4f}", kl=f"{kl.item():.0f}")
        log(dict(stage="vae", step=step, l1=l1.item(), l2=l2.item(), kl=kl.item()))
    return vae.eval()


def train_decoder_local(sd, imgs, mean, std, steps, batch, lr, g, log, progress=True):
    """Stage 1b: the decoder alone, on whole pictures (the encoder, hence every latent, is left as it
    is). As in `train_vae`, half of each batch is decoded from pasted latents (`paste`), here at the
    size pictures are generated at: what `--vae-paste` teaches on 32x32 crops barely carries over to
    the GroupNorm statistics and mid-block attention of a whole 64x64 picture (docs/miniature.md)."""
    vae = sd.vae
    dev = next(vae.parameters()).device
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    N = mean.shape[0]
    bar = tqdm(range(steps), desc="decoder", disable=not progress)
    for step in bar:
        set_lr(opt, lr_at(step, steps, lr, max(1, steps // 20)))
        idx = torch.randint(0, N, (batch,), generator=g)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)).to(dev)
        z, x, w = paste_within(z, to_tensor(imgs[idx.numpy()]).to(dev), batch // 2, g)
        l1, l2 = weighted_l1_l2(vae.decode(z), x, w)
        opt.zero_grad(set_to_none=True)
        (l1 + l2).backward()
        clip_and_step(opt, params)
        bar.set_postfix(l1=f"{l1.item():.4f}")
        log(dict(stage="decoder", step=step, l1=l1.item(), l2=l2.item()))
    return vae.eval()


@torch.no_grad()
def encode_all(sd, imgs, batch=256):
    """Posterior mean and std of every training picture (unscaled), on the CPU."""
    means, stds = [], []
    dev = next(sd.vae.parameters()).device
    for i in range(0, len(imgs), batch):
        m, lv = sd.vae.encode_moments(to_tensor(imgs[i:i + batch]).to(dev))
        means.append(m.cpu())
        stds.append(torch.exp(0.5 * lv.clamp(-30, 20)).cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def settle_vae(sd, imgs, mean):
    """The end of the VAE stage from scratch: scale_factor = 1 / std of the latents `mean` (as SD's
    0.18215 was chosen), the VAE rounded to fp16 as it is saved, and every picture encoded again by
    it. The UNet then learns the latents a run split here (`--unet-steps 0`, then `--init-from` that
    file `--fresh-unet`) learns: the two write the same bytes."""
    sd.cfg = sd.cfg.replace(scale_factor=round(float(1.0 / mean.std()), 5))
    for t in sd.vae.parameters():
        t.copy_(t.half().float())
    return encode_all(sd.eval(), imgs)


def latent_rectangles(n: int, h: int, w: int, g, lo: int = 3) -> torch.Tensor:
    """(n, 1, h, w) float masks, each one random axis-aligned rectangle of sides lo..3/4 of the latent."""
    m = torch.zeros(n, 1, h, w)
    for i in range(n):
        rh, rw = (int(torch.randint(lo, max(lo, 3 * s // 4) + 1, (1,), generator=g)) for s in (h, w))
        y, x = int(torch.randint(0, h - rh + 1, (1,), generator=g)), int(torch.randint(0, w - rw + 1, (1,), generator=g))
        m[i, :, y:y + rh, x:x + rw] = 1
    return m


def paste(z, x, zb, xb, g):
    """Latents z pasted over zb through a random rectangle (latent_rectangles), the pixels x over xb
    through the same rectangle upsampled; and per-pixel loss weights that are 0 on the cells touching
    the rectangle's edge (what a latent there decodes to is not a clean cut) and 1 elsewhere."""
    m = latent_rectangles(z.shape[0], *z.shape[-2:], g, lo=max(2, z.shape[-1] // 6)).to(z.device)
    edge = F.max_pool2d(m, 3, 1, 1) != -F.max_pool2d(-m, 3, 1, 1)
    f = x.shape[-1] // z.shape[-1]
    up = lambda t: t.repeat_interleave(f, -2).repeat_interleave(f, -1)  # noqa: E731
    return m * z + (1 - m) * zb, up(m) * x + (1 - up(m)) * xb, up((~edge).float())


def paste_within(z, x, k: int, g):
    """The first k latents of the batch pasted over its last k (other pictures), pixels alike
    (`paste`); with per-pixel loss weights (B, 1, H, W), 1 for the untouched pictures."""
    w = torch.ones_like(x[:, :1])
    if k <= 0:
        return z, x, w
    z, x, w = z.clone(), x.clone(), w.clone()
    z[:k], x[:k], w[:k] = paste(z[:k], x[:k], z[-k:], x[-k:], g)
    return z, x, w


def weighted_l1_l2(rec, x, w):
    """L1 and L2 reconstruction losses, per-pixel weighted by w and normalised by its mean."""
    err = rec - x
    return (err.abs() * w).mean() / w.mean(), (err.pow(2) * w).mean() / w.mean()


# ------------------------------------------------------------------------------------- UNet stage
class AttentionRecorder:
    """attn_override for training: cross-attention run with the explicit map M (models.attention),
    each M kept (with its gradient) for `layout_loss`."""

    def __init__(self):
        self.maps = []

    def __call__(self, site, q, k, v):
        if not site.is_cross:
            return None
        m = attention_probs(q, k)
        self.maps.append((site, m))
        return m @ v


def layout_loss(maps, masks, owners, weight) -> torch.Tensor:
    """How much of each object word's cross-attention falls outside its object: for every recorded
    layer, 1 - (head-mean map of the word's token, summed inside the object's mask) / (summed
    everywhere), averaged over the words (owners >= 0) with per-sample weights. masks: (B, 2, H, W)
    float object masks at the latent size; owners: (B, 77) object index of each token or -1;
    weight: (B,)."""
    own = owners.long()
    valid = (own >= 0).float() * weight[:, None]
    total = 0.0
    for site, m in maps:
        mk = F.adaptive_max_pool2d(masks, (site.h, site.w)).flatten(2)  # (B, 2, N)
        mm = m.mean(1)  # (B, N, K)
        inside = torch.einsum("bnk,bjn->bkj", mm, mk) / mm.sum(1).clamp_min(1e-8)[..., None]
        frac = inside.gather(-1, own.clamp_min(0)[..., None])[..., 0]  # (B, K)
        total = total + ((1 - frac) * valid).sum() / valid.sum().clamp_min(1e-8)
    return total / max(1, len(maps))


def latent_layout(obj_masks: np.ndarray, owners: np.ndarray, side: int):
    """`train_unet`'s `layout`: the object masks (N, 2, H, W) at the latent side (a cell is in if
    any of its pixels is), and the word owners (N, 77), as tensors."""
    f = obj_masks.shape[-1] // side
    lat_masks = torch.from_numpy(obj_masks.reshape(*obj_masks.shape[:2], side, f, side, f).any((3, 5)))
    return lat_masks, torch.from_numpy(owners)


def backward(loss, extra, only=None) -> None:
    """Gradients of loss + extra into .grad; with `only` (parameters), extra's gradient reaches only
    those (the others get loss's alone)."""
    if only is None:
        (loss + extra).backward()
        return
    extra_grads = torch.autograd.grad(extra, only, retain_graph=True, allow_unused=True)
    loss.backward()
    for p, gr in zip(only, extra_grads):
        if gr is not None:
            p.grad = gr if p.grad is None else p.grad.add_(gr)


class Batch(NamedTuple):
    idx: torch.Tensor  # (B,) which pictures
    tok: torch.Tensor  # (B, 77) their captions' tokens, some dropped to ""
    t: torch.Tensor  # (B,) timesteps
    eps: torch.Tensor  # the noise, (B, 4, h, w)
    a: torch.Tensor  # alpha_cumprod at t, (B, 1, 1, 1)
    zt: torch.Tensor  # the noised latents
    w: torch.Tensor  # min-SNR-gamma loss weights, (B, 1, 1, 1)


def noised_batch(mean, std, ids, batch, g, *, scale, acp, empty, p_uncond, min_snr) -> Batch:
    """A batch of the UNet stage, every draw on the CPU generator g: posterior samples of `batch`
    pictures scaled by `scale`, captions dropped to `empty` with probability p_uncond, t uniform,
    z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps; and the min-SNR-gamma (Hang et al. 2023) weight for
    epsilon prediction, min(SNR, gamma) / SNR (low-noise steps, which only refine detail, count less)."""
    idx = torch.randint(0, mean.shape[0], (batch,), generator=g)
    z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
    tok = ids[idx].clone()
    tok[torch.rand(batch, generator=g) < p_uncond] = empty
    t = torch.randint(0, len(acp), (batch,), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    a = acp[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    snr = acp[t] / (1 - acp[t])
    return Batch(idx, tok, t, eps, a, zt, (snr.clamp(max=min_snr) / snr).view(-1, 1, 1, 1))


def unet_losses(unet, text, b: Batch, rec=None, layout=None, empty=None):
    """The weighted epsilon loss on batch b; with an AttentionRecorder `rec`, also the batch's
    `layout_loss` (layout: latent_layout's masks and owners), each sample weighted by sqrt(a_t) (how
    much of z_0 shows through the noise, hence how well the object's place can be known), 0 for the
    captions dropped to `empty` (they have no words). The batch moves to the UNet's device here."""
    dev = next(unet.parameters()).device
    pred = unet(b.zt.to(dev), b.t.to(dev), text(b.tok.to(dev)), attn_override=rec)
    eps_loss = (b.w.to(dev) * (pred - b.eps.to(dev)).pow(2)).mean()
    if rec is None:
        return eps_loss, None
    masks, owners = layout
    kept = (b.tok != empty).any(-1).float()
    lay = layout_loss(rec.maps, masks[b.idx].float().to(dev), owners[b.idx].to(dev),
                      (b.a.sqrt().flatten() * kept).to(dev))
    return eps_loss, lay


def train_unet(sd, mean, std, ids, steps, batch, lr, g, log, ema_decay=0.999, p_uncond=0.1,
               save=None, save_every=0, progress=True, min_snr=5.0, layout=None, layout_weight=0.0,
               layout_from=0.0, layout_to="all", layout_all_from=1.0):
    """Stage 2: UNet + text encoder, epsilon loss on scaled VAE latents weighted by min-SNR-gamma,
    caption dropout p_uncond (`noised_batch`). With `layout` (`latent_layout`) and layout_weight > 0,
    plus layout_weight * `layout_loss` (`unet_losses`) from the step `layout_from` * steps on (before
    it the model learns colours and shapes undisturbed). layout_to="qk": the layout loss's gradient
    reaches only the cross-attention query and key projections (it moves the maps, not the features
    the UNet draws with) until the step `layout_all_from` * steps, every parameter from it on; "all":
    every parameter. Returns the EMA UNet and text encoder; `save` gets them every save_every steps."""
    unet, text = sd.unet.train(), sd.text_encoder.train()
    params = [*unet.parameters(), *text.parameters()]
    qk = [p for n, p in unet.named_parameters() if ".attn2.to_q." in n or ".attn2.to_k." in n]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema_u, ema_t = EMA(unet, ema_decay), EMA(text, ema_decay)
    c = sd.cfg
    acp = DDIM.create(50, 1, c.linear_start, c.linear_end, c.num_train_timesteps).alphas_cumprod.float()
    empty = sd.tokenize([""])[0]
    draw = dict(scale=c.scale_factor, acp=acp, empty=empty, p_uncond=p_uncond, min_snr=min_snr)
    warmup = min(200, max(1, steps // 10))
    layout_start, all_start = int(layout_from * steps), int(layout_all_from * steps)
    bar = tqdm(range(steps), desc="UNet+text", disable=not progress)
    for step in bar:
        set_lr(opt, lr_at(step, steps, lr, warmup))
        b = noised_batch(mean, std, ids, batch, g, **draw)
        rec = AttentionRecorder() if layout_weight > 0 and step >= layout_start else None
        eps_loss, lay = unet_losses(unet, text, b, rec, layout, empty)
        opt.zero_grad(set_to_none=True)
        if lay is None:
            eps_loss.backward()
        else:
            backward(eps_loss, layout_weight * lay, qk if layout_to == "qk" and step < all_start else None)
        clip_and_step(opt, params)
        ema_u.update(unet)
        ema_t.update(text)
        extra = dict(layout=round(lay.item(), 4)) if lay is not None else {}
        bar.set_postfix(loss=f"{eps_loss.item():.4f}", **extra)
        log(dict(stage="unet", step=step, loss=eps_loss.item(), lr=opt.param_groups[0]["lr"], **extra))
        if save is not None and save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save(ema_u.shadow, ema_t.shadow)
    return ema_u.shadow, ema_t.shadow


# ------------------------------------------------------------------------------------- main
def check_options(init_from, fresh_unet, layout_to, layout_all_from) -> None:
    """Refuse bad options before the VAE stage, not 20 minutes into the run."""
    if fresh_unet and init_from is None:
        raise ValueError("fresh_unet=True needs init_from=FILE, the checkpoint whose VAE is kept "
                         "(without a file the whole model trains from scratch: leave fresh_unet off)")
    if layout_to not in ("all", "qk"):
        raise ValueError(f"layout_to must be 'all' or 'qk', not {layout_to!r}")
    if not 0.0 <= layout_all_from <= 1.0:
        raise ValueError(f"layout_all_from is a fraction of the UNet steps (0 to 1), not {layout_all_from!r}")


@contextmanager
def json_lines(path, t0: float):
    """log(record): one JSON line per record in `path` (appended), with the seconds since t0; a
    no-op without a path."""
    f = open(path, "a") if path else None

    def log(rec):
        if f is not None:
            rec["time"] = round(time.time() - t0, 1)
            f.write(json.dumps(rec) + "\n")
            f.flush()

    try:
        yield log
    finally:
        if f is not None:
            f.close()


def checkpoint_saver(sd, out, log):
    """save(ema_unet, ema_text): `out` written with the EMA weights in place of the live ones (fp16)."""
    unet_live, text_live = sd.unet, sd.text_encoder

    def save(ema_unet, ema_text):
        sd.unet, sd.text_encoder = ema_unet, ema_text
        save_checkpoint(sd, out, torch.float16)
        sd.unet, sd.text_encoder = unet_live, text_live
        log(dict(stage="save", path=str(out)))

    return save


def train(out=DEFAULT_OUT, *, config="miniature", seed=0, n_data=8000, vae_steps=600, vae_batch=32, vae_crop=32,
          vae_lr=2e-3, vae_paste=0.0, decoder_steps=None, decoder_batch=16, decoder_lr=1e-3, unet_steps=1600,
          batch=32, lr=1e-3, ema_decay=0.995, layout_weight=0.1, layout_from=0.5, layout_to="qk", layout_all_from=0.9,
          bg_word_p=0.9, save_every=100, log_path=None, threads=None, init_from=None, fresh_unet=False, device="cpu",
          progress=True) -> Path:
    """The whole recipe (module docstring); the defaults wrote the shipped file. Returns `out`."""
    check_options(init_from, fresh_unet, layout_to, layout_all_from)
    if decoder_steps is None:  # a run from scratch trains the decoder on whole pictures; --init-from keeps it
        decoder_steps = 200 if init_from is None else 0
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    with json_lines(log_path, t0) as log:
        sd = build_model(config, init_from, fresh_unet)
        sd.to(device)  # every random draw stays on the CPU generator, so the batches are the same anywhere
        data = make_dataset(n_data, seed, layout=layout_weight > 0, p_bg_word=bg_word_p)
        imgs, caps = data[:2]
        log(dict(stage="data", n=n_data))
        if init_from is None:
            train_vae(sd, imgs, vae_steps, vae_batch, vae_lr, g, log, crop=vae_crop, paste_frac=vae_paste,
                      progress=progress)
        mean, std = encode_all(sd.eval(), imgs)
        if decoder_steps:
            train_decoder_local(sd, imgs, mean, std, decoder_steps, decoder_batch, decoder_lr, g, log,
                                progress=progress)
        if init_from is None:
            mean, std = settle_vae(sd, imgs, mean)
            g = torch.Generator().manual_seed(seed)  # and draws what a run split here draws in its second command
        log(dict(stage="encode", scale_factor=sd.cfg.scale_factor, latent_std=float(mean.std())))
        layout = latent_layout(*data[2:], mean.shape[-1]) if layout_weight > 0 else None
        save = checkpoint_saver(sd, out, log)
        ema_unet, ema_text = train_unet(sd, mean, std, sd.tokenize(caps), unet_steps, batch, lr, g, log, ema_decay,
                                        save=save, save_every=save_every, progress=progress, layout=layout,
                                        layout_weight=layout_weight, layout_from=layout_from, layout_to=layout_to,
                                        layout_all_from=layout_all_from)
        save(ema_unet, ema_text)
        log(dict(stage="done", seconds=round(time.time() - t0, 1)))
    return Path(out)


# option -> train()'s keyword, where they differ; every other option is its keyword's name
KEYWORDS = {"layout_loss": "layout_weight", "ema": "ema_decay", "log": "log_path"}
# each option's default is train()'s (read once, here: the command line passes every option on)
DEFAULTS = {k: p.default for k, p in inspect.signature(train).parameters.items()}
DEFAULTS.update({option: DEFAULTS[k] for option, k in KEYWORDS.items()})


def parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    ap = argparse.ArgumentParser(prog="python -m p2p.miniature.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--config", default=d["config"], help="CompVis-style YAML or a configs/ name")
    ap.add_argument("--seed", type=int, default=d["seed"])
    ap.add_argument("--n-data", type=int, default=d["n_data"], help="training pictures (generated, seeds seed*1e7+i)")
    for name in ("vae_steps", "vae_batch", "vae_crop"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=d[name])
    ap.add_argument("--bg-word-p", type=float, default=d["bg_word_p"],
                    help="share of captions that name the background (below 1: some prompts without one; Refine's "
                         "source has none)")
    ap.add_argument("--vae-paste", type=float, default=d["vae_paste"],
                    help="fraction of each VAE batch decoded from latents pasted from two pictures (keeps edits local)")
    ap.add_argument("--decoder-steps", type=int, default=d["decoder_steps"],
                    help="stage 1b: the decoder alone on whole pictures, half of them pasted (default 200; with "
                         "--init-from 0, else that file's decoder is trained further; its encoder, hence the "
                         "latents, stay)")
    ap.add_argument("--decoder-batch", type=int, default=d["decoder_batch"])
    ap.add_argument("--unet-steps", type=int, default=d["unet_steps"], help="0: write the VAE stage only")
    ap.add_argument("--batch", type=int, default=d["batch"])
    ap.add_argument("--lr", type=float, default=d["lr"])
    ap.add_argument("--ema", type=float, default=d["ema"])
    add_layout_options(ap, d)
    ap.add_argument("--save-every", type=int, default=d["save_every"])
    ap.add_argument("--log", default=d["log"], help="JSON-lines log of every step")
    ap.add_argument("--threads", type=int, default=d["threads"], help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default=d["device"],
                    help="where the models train (cuda: the same batches, drawn on the CPU; the file then differs "
                         "from the CPU's in rounding)")
    ap.add_argument("--init-from", default=d["init_from"],
                    help="continue from this checkpoint: keep its VAE (but for --decoder-steps), train its UNet and "
                         "text encoder further")
    ap.add_argument("--fresh-unet", action="store_true",
                    help="with --init-from: keep only that file's VAE; the UNet and text encoder start from scratch "
                         "(ablations of the UNet stage without retraining the VAE)")
    return ap


def add_layout_options(ap, d) -> None:
    ap.add_argument("--layout-loss", type=float, default=d["layout_loss"],
                    help="weight of the loss that keeps object words' cross-attention on their objects (0: off)")
    ap.add_argument("--layout-from", type=float, default=d["layout_from"],
                    help="the layout loss starts after this fraction of the UNet steps (0: from the first)")
    ap.add_argument("--layout-to", choices=("all", "qk"), default=d["layout_to"],
                    help="what the layout loss trains: every parameter, or only the cross-attention query and key "
                         "projections")
    ap.add_argument("--layout-all-from", type=float, default=d["layout_all_from"],
                    help="with --layout-to qk: from this fraction of the UNet steps on, the layout loss reaches every "
                         "parameter (1: never)")


def main(argv=None) -> int:
    ap = parser()
    a = ap.parse_args(argv)
    if a.fresh_unet and not a.init_from:
        ap.error("--fresh-unet needs --init-from FILE (the checkpoint whose VAE is kept)")
    out = train(a.out, **{KEYWORDS.get(k, k): v for k, v in vars(a).items() if k != "out"})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
