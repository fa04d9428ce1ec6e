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
The stages can run as two commands: `--unet-steps 0` writes the VAE stage (with an untrained UNet),
and `--init-from FILE` keeps that file's VAE and scale_factor and trains its UNet and text encoder;
the shipped checkpoint was made that way (README, "Miniature").
The checkpoint is written in the original single-file layout (models.sd.PREFIXES, int64
position_ids, config JSON in the `ldm_config` metadata), floats as fp16 (`load_checkpoint` casts
them back to fp32), and rewritten every `--save-every` steps so a cut-off run loses little.
Deterministic for a given seed and thread count.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models import PREFIXES
from models.config import load_config
from models.ddim import DDIM
from models.sd import StableDiffusion

from .data import make_dataset

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "miniature.safetensors"


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


def save_checkpoint(sd: StableDiffusion, out, fp16: bool = True, extra: dict | None = None) -> Path:
    """Original single-file layout, written atomically with weights_tools' writer."""
    from weights_tools.conversion import position_ids, save_safetensors_atomic
    from weights_tools.layout import POSITION_IDS

    state = {}
    for part, prefix in PREFIXES.items():
        for k, v in getattr(sd, part).state_dict().items():
            v = v.detach().cpu()
            state[prefix + k] = v.half() if (fp16 and v.is_floating_point()) else v.float()
    state[POSITION_IDS] = position_ids(sd.cfg.text.max_position_embeddings)
    # one metadata key only: safetensors writes metadata in hash order, so more keys would make
    # the bytes differ between runs (see weights_tools.tiny)
    return save_safetensors_atomic(state, out, {"ldm_config": sd.cfg.to_json()})


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


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1


# ------------------------------------------------------------------------------------- stages
def train_vae(sd, imgs, steps, batch, lr, g, log, crop: int = 32, progress=True):
    """Stage 1. Random `crop` x `crop` crops: the VAE is convolutional and the pictures are flat colours,
    edges and stripes, so crops teach it nearly as well as whole pictures at a fraction of the cost."""
    vae = sd.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    N, H = imgs.shape[0], imgs.shape[1]
    bar = tqdm(range(steps), desc="VAE", disable=not progress)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps, lr, max(1, steps // 20))
        idx = torch.randint(0, N, (batch,), generator=g)
        oy, ox = (torch.randint(0, H - crop + 1, (2,), generator=g).tolist() if crop < H else (0, 0))
        x = to_tensor(imgs[idx.numpy(), oy:oy + crop, ox:ox + crop])
        mean, logvar = vae.encode_moments(x)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        rec = vae.decode(z)
        l1, l2 = (rec - x).abs().mean(), F.mse_loss(rec, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean()
        loss = l1 + l2 + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.set_postfix(l1=f"{l1.item():.4f}", kl=f"{kl.item():.0f}")
        log(dict(stage="vae", step=step, l1=l1.item(), l2=l2.item(), kl=kl.item()))
    return vae.eval()


@torch.no_grad()
def encode_all(sd, imgs, batch=256):
    """Posterior mean and std of every training picture (unscaled)."""
    means, stds = [], []
    for i in range(0, len(imgs), batch):
        m, lv = sd.vae.encode_moments(to_tensor(imgs[i:i + batch]))
        means.append(m)
        stds.append(torch.exp(0.5 * lv.clamp(-30, 20)))
    return torch.cat(means), torch.cat(stds)


def train_unet(sd, mean, std, ids, steps, batch, lr, g, log, ema_decay=0.999, p_uncond=0.1,
               save=None, save_every=0, progress=True, min_snr=5.0):
    """Stage 2: UNet + text encoder, epsilon loss on scaled VAE latents weighted by min-SNR-gamma
    (low-noise steps, which only refine detail, count less: layout and colour are learnt sooner),
    caption dropout p_uncond."""
    unet, text = sd.unet.train(), sd.text_encoder.train()
    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema_u, ema_t = EMA(unet, ema_decay), EMA(text, ema_decay)
    c = sd.cfg
    acp = DDIM.create(50, 1, c.linear_start, c.linear_end, c.num_train_timesteps).alphas_cumprod.float()
    snr = acp / (1 - acp)
    empty = sd.tokenize([""])[0]
    N, warmup = mean.shape[0], min(200, max(1, steps // 10))
    bar = tqdm(range(steps), desc="UNet+text", disable=not progress)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps, lr, warmup)
        idx = torch.randint(0, N, (batch,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * c.scale_factor
        tok = ids[idx].clone()
        tok[torch.rand(batch, generator=g) < p_uncond] = empty
        t = torch.randint(0, c.num_train_timesteps, (batch,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        # min-SNR-gamma weighting (Hang et al. 2023) for epsilon prediction: min(SNR, gamma) / SNR
        w = (snr[t].clamp(max=min_snr) / snr[t]).view(-1, 1, 1, 1)
        loss = (w * (unet(zt, t, text(tok)) - eps).pow(2)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_u.update(unet)
        ema_t.update(text)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log(dict(stage="unet", step=step, loss=loss.item(), lr=opt.param_groups[0]["lr"]))
        if save is not None and save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save(ema_u.shadow, ema_t.shadow)
    return ema_u.shadow, ema_t.shadow


# ------------------------------------------------------------------------------------- main
def train(out=DEFAULT_OUT, *, config="miniature", seed=0, n_data=8000, vae_steps=600, vae_batch=32, vae_crop=32,
          vae_lr=2e-3, unet_steps=2000, batch=32, lr=1e-3, ema_decay=0.995, save_every=100, log_path=None, threads=None,
          init_from=None, progress=True) -> Path:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    logf = open(log_path, "a") if log_path else None

    def log(rec):
        if logf is not None:
            rec["time"] = round(time.time() - t0, 1)
            logf.write(json.dumps(rec) + "\n")
            logf.flush()

    if init_from is not None:  # continue from a checkpoint: its VAE and scale_factor are kept
        from weights_tools import load_checkpoint

        sd = load_checkpoint(init_from).train()
        cfg = sd.cfg
    else:
        cfg = load_config(config)
        sd = StableDiffusion(cfg)
        init_weights(sd)
    imgs, caps = make_dataset(n_data, seed)
    log(dict(stage="data", n=n_data))

    if init_from is None:
        train_vae(sd, imgs, vae_steps, vae_batch, vae_lr, g, log, crop=vae_crop, progress=progress)
    mean, std = encode_all(sd.eval(), imgs)
    if init_from is None:
        sd.cfg = cfg = cfg.replace(scale_factor=round(float(1.0 / mean.std()), 5))
    log(dict(stage="encode", scale_factor=sd.cfg.scale_factor, latent_std=float(mean.std())))

    ids = sd.tokenize(caps)
    unet_live, text_live = sd.unet, sd.text_encoder

    def save(ema_unet, ema_text):
        sd.unet, sd.text_encoder = ema_unet, ema_text
        save_checkpoint(sd, out)
        sd.unet, sd.text_encoder = unet_live, text_live
        log(dict(stage="save", path=str(out)))

    ema_unet, ema_text = train_unet(sd, mean, std, ids, unet_steps, batch, lr, g, log, ema_decay,
                                    save=save, save_every=save_every, progress=progress)
    save(ema_unet, ema_text)
    log(dict(stage="done", seconds=round(time.time() - t0, 1)))
    if logf is not None:
        logf.close()
    return Path(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m p2p.miniature.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--config", default="miniature", help="CompVis-style YAML or a configs/ name")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-data", type=int, default=8000, help="training pictures (generated, seeds seed*1e7+i)")
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-crop", type=int, default=32)
    ap.add_argument("--unet-steps", type=int, default=2000, help="0: write the VAE stage only")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--log", default=None, help="JSON-lines log of every step")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--init-from", default=None,
                    help="continue from this checkpoint: keep its VAE, train its UNet and text encoder further")
    a = ap.parse_args(argv)
    out = train(a.out, config=a.config, seed=a.seed, n_data=a.n_data, vae_steps=a.vae_steps, vae_batch=a.vae_batch, vae_crop=a.vae_crop,
                unet_steps=a.unet_steps, batch=a.batch, lr=a.lr, ema_decay=a.ema, save_every=a.save_every,
                log_path=a.log, threads=a.threads, init_from=a.init_from)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
