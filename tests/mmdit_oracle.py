"""Test-only oracle: the official MM-DiT Prompt-to-Prompt (Shin et al., ICCV 2025; SNU-VGILab/exploring-mmdit,
utils/dit_utils.py, attn_processors.py, common.py) re-expressed on diffusers' own StableDiffusion3Pipeline /
FluxPipeline, to hold p2p.joint_control to it beyond the recorded golden cases.

- Attention processors rebuild diffusers' JointAttnProcessor2_0 (SD3) and FluxAttnProcessor with a hook on
  (q, k, v) just before scaled-dot-product attention (after qk-norm and RoPE).
- The hook decides once, at its first call, whether the batch carries classifier-free guidance (SD3 only:
  batch x heads == 2 prompts x 2 x heads), and then reads and edits the conditional half only.
- It stores each row's word map (head-averaged joint softmax, its own word columns, image rows) BEFORE the
  projection swap, in the aggregate blocks and blend steps.
- Block indices are positions in `transformer.attn_processors`, image-only `attn2` processors included (those
  keep diffusers' plain processor and are never counted as controlled).
- The step callback (callback_on_step_end) blends the latents, then advances the step counter when every
  controlled processor has been called since the last advance.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

PROJECTIONS = {  # what the target takes from the source: (tensor, tokens)
    "qiki": (("q", "img"), ("k", "img")), "qi": (("q", "img"),), "ki": (("k", "img"),),
    "qk": (("q", "all"), ("k", "all")), "qikt": (("q", "img"), ("k", "txt")),
    "qtki": (("q", "txt"), ("k", "img")), "qtkt": (("q", "txt"), ("k", "txt")),
    "kivi": (("k", "img"), ("v", "img")),
}


def fraction_steps(fraction, num_steps):
    lo, hi = (0.0, fraction) if isinstance(fraction, float) else fraction
    return int(num_steps * lo), int(num_steps * hi)


def official_word_tokens(text, word, tokenizer, is_t5):
    """The official word -> token positions: decode each token (T5: all but </s>; CLIP: without BOS/EOS,
    positions shifted by 1), strip only '#', count characters against the whitespace piece's length."""
    pieces = text.strip().split()
    wanted = [i for i, w in enumerate(pieces) if w == word] if isinstance(word, str) else [word]
    if not wanted:
        return []
    tokens = tokenizer.encode(text)
    decoded = [tokenizer.decode([t]).strip("#") for t in tokens]
    decoded, shift = (decoded[:-1], 0) if is_t5 else (decoded[1:-1], 1)
    out, ptr, length = [], 0, 0
    for i, s in enumerate(decoded):
        length += len(s)
        if ptr in wanted:
            out.append(i + shift)
        if length >= len(pieces[ptr]):
            ptr, length = ptr + 1, 0
    return out


def alpha_layers(family, prompts, words, tokenizers, t5_len):
    """(2, S_txt) 0/1 of each prompt's blend words: SD3 CLIP-L positions then 77 + T5's; Flux T5's."""
    clip, t5 = tokenizers
    width = 77 + t5_len if family == "sd3" else t5_len
    alpha = torch.zeros(len(prompts), width)
    for i, (prompt, ws) in enumerate(zip(prompts, words)):
        for w in ([ws] if isinstance(ws, str) else ws):
            for piece in w.split():
                cols = official_word_tokens(prompt, piece, t5, True)
                if family == "sd3":
                    cols = official_word_tokens(prompt, piece, clip, False) + [77 + p for p in cols]
                alpha[i, cols] = 1
    return alpha


def smooth_map(maps, grid, size=7, sigma=1.0):
    r = (torch.arange(size) - size // 2).float()
    xg = r.repeat(size, 1)
    kernel = torch.exp(-(xg ** 2 + xg.t() ** 2) / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).view(1, 1, size, size).to(maps)
    out = F.conv2d(maps.view(maps.shape[0], 1, *grid), kernel, padding=size // 2)
    return out.view(maps.shape[0], -1)


class Official:
    """The official controller's state and arithmetic (two prompts: row 0 source, row 1 target)."""

    def __init__(self, family, prompts, num_steps, method="qiki", replace_steps=0.2, replace_blocks=None,
                 alpha=None, threshold=0.3, blend_steps=0.5, aggregate_blocks=None, t5_len=256,
                 height=96, width=128):
        self.family, self.prompts, self.method = family, prompts, method
        self.text_len = 77 + t5_len if family == "sd3" else t5_len
        self.replace = fraction_steps(replace_steps, num_steps)
        self.blend = fraction_steps(blend_steps, num_steps)
        self.replace_blocks, self.aggregate_blocks = replace_blocks, aggregate_blocks
        self.alpha, self.threshold, self.grid = alpha, threshold, (height // 16, width // 16)
        self.step, self.calls, self.controlled, self.heads = 0, 0, 0, None
        self.cfg, self.place_to_idx, self.store, self.masks, self.margins = None, {}, {}, [], []

    def slices(self, seq):
        img = seq - self.text_len
        if self.family == "sd3":
            return {"img": slice(0, img), "txt": slice(img, None), "all": slice(None)}
        return {"img": slice(self.text_len, None), "txt": slice(0, self.text_len), "all": slice(None)}

    def hook(self, q, k, v, place):
        """(B, heads, S, d) q, k, v -> the same, the conditional target edited as the official does."""
        if self.cfg is None:
            self.cfg = self.family == "sd3" and q.shape[0] * q.shape[1] == 2 * 2 * self.heads
        c = q.shape[0] // 2 if self.cfg else 0
        idx = self.place_to_idx.get(place, -1)
        in_blend = self.blend[0] <= self.step < self.blend[1]
        if self.alpha is not None and in_blend and (self.aggregate_blocks is None or idx in self.aggregate_blocks):
            self.keep(q[c:c + 2], k[c:c + 2], place)
        if self.replace[0] <= self.step < self.replace[1] and (self.replace_blocks is None or
                                                               idx in self.replace_blocks):
            out = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
            sl = self.slices(q.shape[2])
            for name, tokens in PROJECTIONS[self.method]:
                out[name][c + 1, :, sl[tokens]] = out[name][c, :, sl[tokens]]
            q, k, v = out["q"], out["k"], out["v"]
        self.calls += 1
        return q, k, v

    def keep(self, q, k, place):
        probs = (torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1).mean(1)
        img = self.slices(q.shape[2])["img"]
        txt0 = 0 if self.family == "flux" else q.shape[2] - self.text_len
        rows = []
        for i in range(2):
            cols = torch.where(self.alpha[i] > 0)[0] + txt0
            rows.append(probs[i][:, cols].mean(-1)[img] if len(cols) else probs.new_zeros(probs.shape[1])[img])
        entry = torch.stack(rows)[None]
        self.store[place] = entry if place not in self.store else torch.cat([self.store[place], entry])

    def aggregate(self):
        vals = list(self.store.values())
        return torch.cat([torch.cat([v[:, r] for v in vals]).mean(0, keepdim=True) for r in range(2)])

    def local_blend(self, x):
        maps = smooth_map(self.aggregate(), self.grid)
        if self.family == "sd3":
            m = maps.view(x.shape[0], 1, x.shape[2] // 2, x.shape[3] // 2)
            m = F.interpolate(F.max_pool2d(m, 3, stride=1, padding=1), size=x.shape[2:])
            m = m / m.amax(dim=(2, 3), keepdim=True)
        else:
            m = (maps / maps.amax(-1, keepdim=True))[..., None]
        self.margins.append((m - self.threshold).abs().min().item())
        m = m > self.threshold
        mask = (m[:1] | m[1:]).to(x.dtype)
        self.masks.append(mask)
        return x[:1] + mask * (x - x[:1])

    def callback(self, pipe, i, t, kwargs):
        x = kwargs["latents"]
        if self.alpha is not None and self.blend[0] <= self.step < self.blend[1] and self.store:
            kwargs["latents"] = self.local_blend(x)
        if self.calls == self.controlled:
            self.calls, self.step = 0, self.step + 1
        return kwargs


class SD3Processor:
    """diffusers' JointAttnProcessor2_0 with the official hook before SDPA."""

    def __init__(self, ctrl, place):
        self.ctrl, self.place = ctrl, place

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_img = hidden_states.shape[0], hidden_states.shape[1]
        heads = lambda x: x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q = attn.norm_q(q) if attn.norm_q is not None else q
        k = attn.norm_k(k) if attn.norm_k is not None else k
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            eq, ek, ev = heads(attn.add_q_proj(e)), heads(attn.add_k_proj(e)), heads(attn.add_v_proj(e))
            eq = attn.norm_added_q(eq) if attn.norm_added_q is not None else eq
            ek = attn.norm_added_k(ek) if attn.norm_added_k is not None else ek
            q, k, v = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)
        q, k, v = self.ctrl.hook(q, k, v, self.place)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        ctx = None
        if encoder_hidden_states is not None:
            out, ctx = out[:, :n_img], out[:, n_img:]
            ctx = ctx if attn.context_pre_only else attn.to_add_out(ctx)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if ctx is None else (out, ctx)


class FluxProcessor:
    """diffusers' FluxAttnProcessor with the official hook before SDPA (double and single blocks)."""

    def __init__(self, ctrl, place):
        self.ctrl, self.place = ctrl, place

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        b = hidden_states.shape[0]
        heads = lambda x: x.view(b, -1, attn.heads, attn.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            eq, ek, ev = heads(attn.add_q_proj(e)), heads(attn.add_k_proj(e)), heads(attn.add_v_proj(e))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], 2), torch.cat([ek, k], 2), torch.cat([ev, v], 2)
        if image_rotary_emb is not None:
            q, k = apply_rotary_emb(q, image_rotary_emb), apply_rotary_emb(k, image_rotary_emb)
        q, k, v = self.ctrl.hook(q, k, v, self.place)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * attn.head_dim).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        n_txt = encoder_hidden_states.shape[1]
        ctx, out = out[:, :n_txt], out[:, n_txt:]
        return attn.to_out[1](attn.to_out[0](out)), attn.to_add_out(ctx)


def register(pipe, ctrl):
    """Every processor gets the hooked one except image-only attn2 (diffusers' plain processor); a block's
    index is its position in transformer.attn_processors."""
    procs = {}
    ctrl.heads = pipe.transformer.config.num_attention_heads
    cls = SD3Processor if isinstance(pipe, StableDiffusion3Pipeline) else FluxProcessor
    for idx, name in enumerate(pipe.transformer.attn_processors):
        if "attn2" in name:
            procs[name] = JointAttnProcessor2_0()
            continue
        place = name.split(".attn.")[0]
        ctrl.place_to_idx[place] = idx
        procs[name] = cls(ctrl, place)
    ctrl.controlled = len(ctrl.place_to_idx)
    pipe.transformer.set_attn_processor(procs)


def load_pipe(folder):
    """The diffusers pipeline of a tiny SD3 / Flux folder in fp32."""
    for cls in (StableDiffusion3Pipeline, FluxPipeline):
        try:
            return cls.from_pretrained(folder, torch_dtype=torch.float32)
        except (ValueError, TypeError, OSError):
            continue
    raise ValueError(f"{folder} is neither an SD3 nor a Flux folder")


def pack(x):
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack(x, h, w):
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def run_official(pipe, prompts, x_T, num_steps, guidance, height, width, method="qiki", replace_steps=0.2,
                 replace_blocks=None, words=None, threshold=0.3, blend_steps=0.5, aggregate_blocks=None):
    """One official edit (or the plain pipeline with method=None): z0 (2, 16, H/8, W/8) unpacked, and the
    controller (its masks, its store)."""
    family = "sd3" if isinstance(pipe, StableDiffusion3Pipeline) else "flux"
    t5_len = 256 if family == "sd3" else 512
    toks = (pipe.tokenizer, pipe.tokenizer_3 if family == "sd3" else pipe.tokenizer_2)
    alpha = None if words is None else alpha_layers(family, prompts, words, toks, t5_len)
    ctrl = Official(family, prompts, num_steps, method, replace_steps, replace_blocks, alpha, threshold,
                    blend_steps, aggregate_blocks, t5_len, height, width)
    latents = x_T.expand(2, *x_T.shape[1:]).clone()
    kw = dict(prompt=list(prompts), height=height, width=width, num_inference_steps=num_steps,
              guidance_scale=guidance, max_sequence_length=t5_len, output_type="latent")
    plain = pipe.transformer.attn_processors
    if method is not None:
        register(pipe, ctrl)
        kw.update(callback_on_step_end=ctrl.callback, callback_on_step_end_tensor_inputs=["latents"])
    try:
        z = pipe(latents=latents if family == "sd3" else pack(latents), **kw).images
    finally:
        pipe.transformer.set_attn_processor(plain)
    return (z if family == "sd3" else unpack(z, height // 8, width // 8)), ctrl


def randomize(module, seed):
    """The golden folders' weight draw: 1-D 0.1 N(0, 1) (+1 for norm weights), else N(0, 1)/sqrt(numel p[0])."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                norm = ("norm" in name or "ln" in name) and name.endswith("weight")
                p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1.0 if norm else 0.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return module


def model_config(folder):
    cfg = json.loads((Path(folder) / "transformer" / "config.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def sd35_folder(sd3_folder, out, seed=31):
    """An SD3.5-medium-like folder: the SD3 folder's text encoders, VAE and scheduler with a new random
    transformer that has qk RMS-norm and dual attention (an image-only attn2) in blocks 0 and 1, so attn2
    processors take block indices 1 and 3 and the joint blocks are 0, 2, 4."""
    shutil.copytree(sd3_folder, out, ignore=shutil.ignore_patterns("transformer"))
    cfg = model_config(sd3_folder) | {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)}
    randomize(SD3Transformer2DModel(**cfg), seed).save_pretrained(Path(out) / "transformer")
    return Path(out)


def schnell_folder(flux_folder, out, seed=37):
    """A FLUX.1-schnell-like folder: the Flux folder's parts with a new random transformer without guidance
    embedding and schnell's static scheduler (shift 1, no dynamic shifting)."""
    shutil.copytree(flux_folder, out, ignore=shutil.ignore_patterns("transformer"))
    randomize(FluxTransformer2DModel(**model_config(flux_folder) | {"guidance_embeds": False}), seed).save_pretrained(
        Path(out) / "transformer")
    path = Path(out) / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"use_dynamic_shifting": False, "shift": 1.0}))
    return Path(out)
