"""LDM-400M's reference parts, built offline: a made-up BERT vocabulary file, transformers'
`BertTokenizer` reading it, and diffusers' `LDMBertModel` holding our random LDMBert weights
(moved by diffusers' own CompVis -> diffusers converter, so the names are checked too).

Nothing here is real BERT: the vocabulary is small and invented, covering the cases WordPiece
has to get right (## pieces, accents, punctuation, CJK, unknown characters).
"""
from __future__ import annotations

import copy
import functools
import string
import tempfile
import types
from pathlib import Path

import torch

import oracles as O

WORDS = """a an the of on in with and at by photo painting picture cat cats dog lion tiger squirrel bear
burger lasagne soup bowl pea carrots croutons house winter fall bicycle riding eating sitting smiling
woman man child tree forest city night neon lights rain field sunflower oil van gogh pink red blue
green fluffy big small cake pie cafe creme brulee naive resume over lazy quick brown fox jumps
un happy fast big apple sandwich pizza table chair ##s ##es ##ed ##ing ##er ##est ##ly ##ness
##able ##ful ##y ##ish ##happy 猫 犬""".split()

VOCAB = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.punctuation) + list(string.ascii_lowercase)
         + ["##" + c for c in string.ascii_lowercase] + list(string.digits) + ["##" + c for c in string.digits]
         + [w for w in WORDS if len(w) > 1 or w in "猫犬"]))

WORDPIECE_PROMPTS = [
    "a photo of a cat riding a bicycle",
    "A Photo Of A CAT Riding A Bicycle",
    "two cats and dogs",                       # ## pieces: cat ##s, and letters for "two"
    "the quickest foxes jumps over the laziness",
    "unhappy squirrels eating burgers",
    "a   photo    of a    cat",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\there",
    "café crème brûlée, naïve résumé",         # accents stripped
    "ÀÉÎÕÜ Ç ñ",
    "it's a dog's life, isn't it?",
    "hello, world!",
    "wait... what?!",
    "(masterpiece), [best quality], {detailed}",
    "a red-haired woman with a well-known smile",
    "$100 bill & 50% off #sale @store",
    "e=mc^2 + 1/2; semi:colon/slash\\back|pipe",
    "under_score and hash#tag and back`tick~",
    "a,b,c,d.e",
    "!!!???...",
    "猫 and 犬 on a table",
    "a 猫猫 cat",
    "emoji 🐱 and ☃ snowman",                  # no piece: [UNK]
    "x" * 120,                                  # longer than 100 characters: [UNK]
    "",
    "ok",
    "0123456789 3.14",
    " ".join(["squirrel"] * 90),                # over-long: truncated to 75 content tokens
    " ".join(f"unhappiness{i}" for i in range(40)),
]


def write_vocab(folder: str | Path) -> Path:
    path = Path(folder) / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return path


@functools.lru_cache(maxsize=None)
def vocab_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="ldm-vocab-"))
    write_vocab(d)
    return d


@functools.lru_cache(maxsize=None)
def hf_bert_tokenizer():
    """transformers' BertTokenizer on the same file (uncased, as bert-base-uncased; read through
    `from_pretrained`, since transformers 5's `BertTokenizer(vocab_file=...)` ignores the file)."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(vocab_dir()), local_files_only=True, do_lower_case=True)
    assert len(tok) == len(VOCAB) and tok.cls_token_id == 2 and tok.pad_token_id == 0, (len(tok), tok.cls_token_id)
    return tok


def hf_bert_ids(prompts, length: int = 77) -> torch.Tensor:
    """The ids LDM's pipelines feed the text tower: padding to 77 with [PAD], truncated."""
    return hf_bert_tokenizer()(list(prompts), padding="max_length", max_length=length, truncation=True,
                               return_tensors="pt").input_ids


def tiny_ldmbert_config(**kw):
    from models.ldmbert import LDMBertConfig

    return LDMBertConfig(**(dict(vocab_size=len(VOCAB), width=64, layers=2, heads=4, head_dim=16, intermediate_size=256) | kw))


def seeded_ldmbert(cfg, seed: int = O.SEED):
    from models.ldmbert import LDMBertModel

    model = LDMBertModel(cfg)
    O.seeded_init_(model, torch.Generator().manual_seed(seed))
    return model.float().eval().requires_grad_(False)


def ref_ldmbert(ours):
    """diffusers' LDMBertModel with `ours`' weights, copied by diffusers' own converter, which reads
    the CompVis module tree by attribute (`transformer.token_emb`, `attn_layers.layers[i][1].to_q`, ...)."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_bert_checkpoint

    c = ours.cfg
    config = LDMBertConfig(vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings,
                           d_model=c.width, encoder_layers=c.layers, encoder_attention_heads=c.heads,
                           head_dim=c.head_dim, encoder_ffn_dim=c.intermediate_size)
    transformer = types.SimpleNamespace(**dict(ours.named_children()))
    transformer.to_logits = torch.nn.Linear(c.width, c.vocab_size)  # the LM head we do not build
    ref = convert_ldm_bert_checkpoint(types.SimpleNamespace(transformer=transformer), config)
    return copy.deepcopy(ref).float().eval().requires_grad_(False)  # the converter shares our Parameters


def ref_ldmbert_meta():
    """diffusers' full-size LDMBertModel (its default config is LDM-400M's) on the meta device."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    with torch.device("meta"):
        return LDMBertModel(LDMBertConfig())


# ------------------------------------------------------------------------------ a tiny LDM
def tiny_ldm_config():
    """configs/tiny.yaml's UNet with the tiny LDMBert (its width is the UNet's context), family "ldm", and its
    VAE given four levels: f8 like KL-f8, which LDMTextToImagePipeline assumes (it sizes x_T as H // 8)."""
    import dataclasses

    from models import load_config

    base = load_config("tiny")
    text = tiny_ldmbert_config(vocab=str(vocab_dir() / "vocab.txt"))
    return base.replace(unet=dataclasses.replace(base.unet, context_dim=text.width), text=text, family="ldm",
                        vae=dataclasses.replace(base.vae, ch_mult=(1, 1, 1, 1)))


@functools.lru_cache(maxsize=None)
def tiny_ldm(seed: int = O.SEED):
    """Our tiny LDM with seeded non-trivial weights, fp32, eval, no grad."""
    sd, gen = O.seeded_model(tiny_ldm_config(), seed)
    O.seeded_init_(sd.text_encoder, gen)
    return sd.float().eval().requires_grad_(False)


def single_file_state(sd) -> dict[str, torch.Tensor]:
    """Our weights under CompVis' single-file keys, the LM head `to_logits` a real file carries added."""
    out = O.ldm_state_dict(sd)
    c = sd.cfg.text
    out["cond_stage_model.transformer.to_logits.weight"] = torch.ones(c.vocab_size, c.width)
    out["cond_stage_model.transformer.to_logits.bias"] = torch.ones(c.vocab_size)
    return out


@functools.lru_cache(maxsize=None)
def ref_ldm_pipeline(seed: int = O.SEED):
    """diffusers' LDMTextToImagePipeline from the tiny LDM's weights: UNet and KL autoencoder through
    diffusers' CompVis converters, LDMBert through its converter, BertTokenizer on the same vocab.txt."""
    from diffusers import AutoencoderKL, LDMTextToImagePipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    sd = tiny_ldm(seed)
    ckpt, ldm_cfg = single_file_state(sd), sd.cfg.to_ldm()
    ucfg = create_unet_diffusers_config_from_ldm(ldm_cfg, ckpt)
    unet = UNet2DConditionModel(**ucfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, ucfg), strict=True)
    unet.register_to_config(sample_size=sd.cfg.image_size)  # the latent side, as the hub's unet/config.json
    vcfg = create_vae_diffusers_config_from_ldm(ldm_cfg, ckpt)
    vae = AutoencoderKL(**vcfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vcfg), strict=True)
    pipe = LDMTextToImagePipeline(vqvae=vae.float().eval(), bert=ref_ldmbert(sd.text_encoder),
                                  tokenizer=hf_bert_tokenizer(), unet=unet.float().eval(),
                                  scheduler=O.ref_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compvis_bert_shapes(vocab: int = 30522, d: int = 1280, layers: int = 32, inner: int = 512, ff: int = 5120,
                        positions: int = 77) -> dict[str, tuple]:
    """CompVis BERTEmbedder's `transformer.*` keys and shapes, written out from x_transformer.py:
    TransformerWrapper(token_emb, pos_emb.emb, attn_layers = Encoder(layers of [norm, block, residual])
    alternating Attention (to_q/k/v without bias, to_out) and FeedForward (net.0.0, net.2), norm, to_logits)."""
    want = {"token_emb.weight": (vocab, d), "pos_emb.emb.weight": (positions, d), "norm.weight": (d,),
            "norm.bias": (d,), "to_logits.weight": (vocab, d), "to_logits.bias": (vocab,)}
    for i in range(layers):
        a, f = f"attn_layers.layers.{2 * i}", f"attn_layers.layers.{2 * i + 1}"
        want |= {f"{a}.0.weight": (d,), f"{a}.0.bias": (d,), f"{f}.0.weight": (d,), f"{f}.0.bias": (d,)}
        want |= {f"{a}.1.to_{x}.weight": (inner, d) for x in "qkv"}
        want |= {f"{a}.1.to_out.weight": (d, inner), f"{a}.1.to_out.bias": (d,)}
        want |= {f"{f}.1.net.0.0.weight": (ff, d), f"{f}.1.net.0.0.bias": (ff,),
                 f"{f}.1.net.2.weight": (d, ff), f"{f}.1.net.2.bias": (d,)}
    return want
