"""Independent reference implementations ("oracles") built offline from our own random weights.

Our tiny model gets a seeded, deliberately non-trivial init (no zero layers, peaked attention maps);
its state dict is exported with the CompVis single-file prefixes and converted with diffusers' /
transformers' OWN original-layout converters into `UNet2DConditionModel`, `AutoencoderKL` and
`CLIPTextModel`. The HF `CLIPTokenizer` is built from open_clip's BPE file, and a
`StableDiffusionPipeline` is assembled from those parts. Nothing here touches a model hub.

Used by tests/test_parity_*.py, tests/test_tokenizer.py and benchmarks/parity_report.py.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import math
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

SEED = 1234
DDIM_KW = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
               set_alpha_to_one=False, steps_offset=1)


# ------------------------------------------------------------------------------ our model, seeded
def seeded_init_(module: torch.nn.Module, gen: torch.Generator, qk_gain: float = 1.0) -> None:
    """Re-draw every parameter: Linear/Conv weights N(0, 1/fan_in) (attention to_q/to_k x qk_gain),
    embeddings N(0, 1), norm weights 1 + 0.1 N, biases 0.1 N. Nothing is left at zero."""
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                if p_name == "bias":
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
                elif isinstance(mod, norm_types):
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
                elif isinstance(mod, torch.nn.Embedding):
                    p.copy_(torch.randn(p.shape, generator=gen))
                else:
                    fan_in = p[0].numel()
                    gain = qk_gain if mod_name.endswith(("to_q", "to_k")) else 1.0
                    p.copy_(torch.randn(p.shape, generator=gen) * gain / math.sqrt(fan_in))


@functools.lru_cache(maxsize=None)
def ours(seed: int = SEED):
    """Our tiny StableDiffusion (configs/tiny.yaml), seeded non-trivial weights, fp32, eval, no grad."""
    sd, gen = seeded_model("tiny", seed)
    seeded_init_(sd.text_encoder, gen)
    return sd.float().eval().requires_grad_(False)


def seeded_model(config, seed: int = SEED):
    """A model of a config (or a shipped config's name) with seeded UNet (q/k gain 1.5) and VAE; the
    generator, for the rest."""
    from models import StableDiffusion, load_config

    sd = StableDiffusion(load_config(config) if isinstance(config, str) else config)
    gen = torch.Generator().manual_seed(seed)
    seeded_init_(sd.unet, gen, qk_gain=1.5)
    seeded_init_(sd.vae, gen)
    return sd, gen


def ldm_state_dict(sd) -> dict[str, torch.Tensor]:
    """Our weights under the CompVis single-file keys of their family (what a real checkpoint holds)."""
    from models import prefixes

    return {prefix + k: v.clone() for part, prefix in prefixes(sd.cfg).items()
            for k, v in getattr(sd, part).state_dict().items()}


# ------------------------------------------------------------------------------ reference models
@functools.lru_cache(maxsize=None)
def ref_unet(seed: int = SEED):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    sd = ours(seed)
    ckpt, ldm_cfg = ldm_state_dict(sd), sd.cfg.to_ldm()
    cfg = create_unet_diffusers_config_from_ldm(ldm_cfg, ckpt)
    model = UNet2DConditionModel(**cfg)
    model.load_state_dict(convert_ldm_unet_checkpoint(ckpt, cfg), strict=True)
    return model.float().eval().requires_grad_(False)


@functools.lru_cache(maxsize=None)
def ref_vae(seed: int = SEED):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    sd = ours(seed)
    ckpt, ldm_cfg = ldm_state_dict(sd), sd.cfg.to_ldm()
    cfg = create_vae_diffusers_config_from_ldm(ldm_cfg, ckpt)
    model = AutoencoderKL(**cfg)
    model.load_state_dict(convert_ldm_vae_checkpoint(ckpt, cfg), strict=True)
    return model.float().eval().requires_grad_(False)


@functools.lru_cache(maxsize=None)
def ref_text_encoder(seed: int = SEED):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = ours(seed)
    t = sd.cfg.text
    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.max_position_embeddings,
        hidden_act=t.hidden_act, layer_norm_eps=t.layer_norm_eps, bos_token_id=49406, eos_token_id=49407))
    sdict = convert_ldm_clip_checkpoint(ldm_state_dict(sd))
    sdict = {k.removeprefix("text_model."): v for k, v in sdict.items()}  # transformers >= 5.6: flat keys
    if "text_model" in dict(model.named_children()):  # older transformers keep the prefix
        sdict = {"text_model." + k: v for k, v in sdict.items()}
    sdict = {k: v for k, v in sdict.items() if not k.endswith("position_ids")}
    missing, unexpected = model.load_state_dict(sdict, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return model.float().eval().requires_grad_(False)


def ref_scheduler(num_steps: int | None = None):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=1000, **DDIM_KW)
    if num_steps is not None:
        s.set_timesteps(num_steps)
    return s


# ------------------------------------------------------------------------------ tokenizer
def open_clip_bpe_path() -> Path:
    """open_clip's vocabulary file, located without importing open_clip (which needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.submodule_search_locations, "open_clip_torch is not installed"
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=None)
def hf_tokenizer():
    """transformers' CLIPTokenizer (SD v1's: pad = <|endoftext|>, 77) built offline from open_clip's BPE file."""
    from transformers import CLIPTokenizer

    with gzip.open(open_clip_bpe_path(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    d = Path(tempfile.mkdtemp(prefix="hf-clip-tok-"))
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer.from_pretrained(str(d), local_files_only=True, model_max_length=77)
    assert len(tok) == 49408 and tok.bos_token_id == 49406 and tok.pad_token_id == 49407, (len(tok), tok.pad_token_id)
    return tok


def hf_ids(prompts) -> torch.Tensor:
    return hf_tokenizer()(list(prompts), padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids


@functools.lru_cache(maxsize=None)
def ref_pipeline(seed: int = SEED):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=ref_vae(seed), text_encoder=ref_text_encoder(seed), tokenizer=hf_tokenizer(),
                                   unet=ref_unet(seed), scheduler=ref_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------ inputs and metrics
def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def compare(ours_t: torch.Tensor, ref_t: torch.Tensor) -> tuple[float, float]:
    """(max |ours - ref|, reference scale = max(1, std(ref)))."""
    assert ours_t.shape == ref_t.shape, (tuple(ours_t.shape), tuple(ref_t.shape))
    diff = (ours_t.double() - ref_t.double()).abs().max().item()
    return diff, max(1.0, ref_t.double().std().item())


def z0_against_pipeline(sd, pipe, prompts, steps: int, guidance: float, height: int, width: int) -> tuple[float, float]:
    """`compare` of our generated latents and a diffusers pipeline's, both from one seeded x_T (DDIM, eta 0)."""
    from p2p import generate

    x_T = randn(1, 4, height // sd.latent_downsample, width // sd.latent_downsample, seed=7)
    ours = generate(sd, prompts, latents=x_T, num_steps=steps, guidance_scale=guidance, height=height, width=width,
                    progress=False)
    with torch.no_grad():
        ref = pipe(prompts, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance, eta=0.0,
                   latents=x_T.expand(len(prompts), -1, -1, -1).clone(), output_type="latent").images
    return compare(ours.latents, ref)


TOKENIZER_PROMPTS = [
    "a photo of a cat riding a bicycle",
    "A Photo Of A CAT Riding A Bicycle",
    "a   photo    of a    cat",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\there",
    "it's a dog's life, isn't it?",
    "we'll see; they've gone, i'm here, you'd know, we're fine",
    "don't stop believin'",
    "hello, world!",
    "wait... what?!",
    "(masterpiece), [best quality], {detailed}",
    "a red-haired woman with a well-known smile",
    "state-of-the-art, high-resolution, 8k",
    "1girl, 2boys, 3 cats and 42 dogs",
    "room 101 at 3:45pm on 2024-06-01",
    "pi is 3.14159265358979",
    "$100 bill & 50% off #sale @store",
    "email me: someone@example.com",
    "https://example.com/path?query=1&x=2",
    "C++ and C# programmers",
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "antidisestablishmentarianism is a long word",
    "photorealistic hyperdetailed octane render trending on artstation",
    "a squirrel eating a burger",
    "a lion eating a burger",
    "a fluffy cat sitting on a windowsill in winter",
    "UPPERCASE WORDS ONLY",
    "MiXeD cAsE wOrDs",
    "quotes \"double\" and 'single'",
    "back`tick and tilde~ and caret^",
    "semi;colon:colon/slash\\backslash|pipe",
    "under_score and hash#tag",
    "a,b,c,d,e,f",
    "a.b.c.d",
    "!!!???...",
    "ok",
    "x",
    "The quick brown fox jumps over the lazy dog.",
    "Sphinx of black quartz, judge my vow!",
    "an oil painting of a sunflower field by van gogh",
    "a cyberpunk city at night, neon lights, rain, 4k, artstation",
    "a bowl of soup with croutons",
    "a bowl of soup with carrots",
    "a smiling woman",
    "cat's whiskers'",
    "rock'n'roll",
    "o'clock o'neill",
    "e=mc^2 + 1/2",
    "<|startoftext|> special tokens written in the text <|endoftext|>",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "0123456789",
]


def tiny_generate_inputs(height: int = 64, width: int = 48, seed: int = 7):
    """Prompts and an x_T (1, 4, h, w) for a 10-step generate-vs-pipeline comparison (non-square)."""
    sd = ours()
    f = sd.latent_downsample
    return ["a photo of a cat riding a bicycle", "a lion eating a burger"], randn(1, 4, height // f, width // f, seed=seed)
