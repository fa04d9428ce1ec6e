"""CLIP ViT-L/14 text transformer (`cond_stage_model.transformer.text_model`) and SD tokenisation.

The output SD v1 feeds to cross-attention is HF's `last_hidden_state`: after `final_layer_norm`,
all 77 positions, padding included. Pre-LN layers, quick_gelu, causal mask, no padding mask.
Tokenisation is CLIP's byte-level BPE with the vocabulary file open_clip ships; prompts become
BOS 49406, at most 75 content tokens, EOS 49407, then 49407 up to 77.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
from pathlib import Path

import regex
import torch
import torch.nn.functional as F
from torch import nn

try:
    import ftfy
except ImportError:  # ftfy only repairs mojibake; ASCII prompts are unaffected without it
    ftfy = None

from .config import CLIPTextConfig, context_layers
from .textfile import read_json, read_text
from .tokens import token_rows

BOS, EOS, CONTEXT_LENGTH = 49406, 49407, 77
BANG = 0  # "!", the first byte symbol of the vocabulary: OpenCLIP's padding (SD 2.x, SDXL's second tokenizer)


# ----------------------------------------------------------------------------------- tokenizer
def bpe_vocab_path() -> Path:
    """open_clip's `bpe_simple_vocab_16e6.txt.gz`, found without importing open_clip (which needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the CLIP BPE vocabulary comes from the open_clip_torch package: "
                          "pip install --no-deps open_clip_torch")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall open_clip_torch")
    return path


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Tokenizer:
    """CLIP BPE tokenizer. `pad`: the id after EOS up to the length: EOS (49407) as SD v1's
    CLIPTokenizer, or BANG ("!" = 0) as OpenCLIP's (SD 2.x, SDXL's second tokenizer)."""

    bos, eos, pad, length = BOS, EOS, EOS, CONTEXT_LENGTH  # the tokenizer protocol's ids and positions

    PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

    def __init__(self, vocab_path: str | Path | None = None, pad: int = EOS):
        with gzip.open(vocab_path or bpe_vocab_path(), "rt", encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1:49152 - 256 - 2 + 1]]
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self._build({tok: i for i, tok in enumerate(vocab)}, merges)
        assert self.encoder["<|startoftext|>"] == BOS and self.encoder["<|endoftext|>"] == EOS and self.encoder["!"] == BANG
        if pad not in (EOS, BANG):
            raise ValueError(f"pad must be EOS ({EOS}, SD v1) or BANG ({BANG}, '!', OpenCLIP), got {pad}")
        self.pad = pad

    def _build(self, encoder: dict[str, int], merges: list[tuple[str, str]]) -> None:
        self.encoder = encoder
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.pat = regex.compile(self.PATTERN, regex.IGNORECASE)
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        """A diffusers folder's own CLIP tokenizer (its tokenizer/: transformers' tokenizer.json, or vocab.json
        and merges.txt), its ids and padding (tokenizer_config.json's pad_token, else <|endoftext|>) its own:
        diffusers' test pipelines use a vocabulary of 1000."""
        encoder, merges, pad_token = read_bpe_folder(Path(folder))
        missing = [t for t in ("<|startoftext|>", "<|endoftext|>", pad_token) if t not in encoder]
        if missing:
            raise ValueError(f"{folder}: the tokenizer's vocabulary lacks {missing}: not a CLIP BPE tokenizer")
        tok = cls.__new__(cls)
        tok._build(encoder, merges)
        tok.bos, tok.eos, tok.pad = encoder["<|startoftext|>"], encoder["<|endoftext|>"], encoder[pad_token]
        return tok

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self.cache[token] = out
        return out

    @staticmethod
    def normalize(text: str) -> str:
        if ftfy is not None:
            text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
        return " ".join(text.split()).strip().lower()

    def encode(self, text: str) -> list[int]:
        """Content token ids, without BOS/EOS."""
        ids = []
        for chunk in self.pat.findall(self.normalize(text)):
            chunk = "".join(self.byte_encoder[b] for b in chunk.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(chunk).split(" "))
        return ids

    def decode(self, ids) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        text = bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")
        return text.replace("</w>", " ")

    def __call__(self, prompts: list[str] | str, length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """(N, 77) int64: BOS, content truncated to 75 tokens (with a warning), EOS, then `pad`."""
        return token_rows(self, prompts, length, "CLIP")


def read_bpe_folder(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]], str]:
    """(vocabulary, merges in rank order, pad token) of a transformers CLIP tokenizer folder, read through the
    one reader of small files (size- and depth-checked)."""
    config_file = folder / "tokenizer_config.json"
    config = read_json(config_file, "tokenizer config") if config_file.exists() else {}
    pad = (config.get("pad_token") if isinstance(config, dict) else None) or "<|endoftext|>"
    pad = pad.get("content") if isinstance(pad, dict) else pad
    try:
        if (folder / "tokenizer.json").exists():
            model = read_json(folder / "tokenizer.json", "tokenizer.json")["model"]
            vocab, merges = model["vocab"], [tuple(m.split(" ") if isinstance(m, str) else m) for m in model["merges"]]
        elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            vocab = read_json(folder / "vocab.json", "vocab.json")
            lines = read_text(folder / "merges.txt", "merges.txt").split("\n")
            merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        else:
            raise ValueError(f"{folder}: no tokenizer.json, nor vocab.json with merges.txt")
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{folder}: not a CLIP BPE tokenizer (vocab and merges): {e!r}") from None
    if not isinstance(vocab, dict) or not all(type(i) is int and 0 <= i < len(vocab) for i in vocab.values()):
        raise ValueError(f"{folder}: its vocabulary is not a mapping of tokens to ids 0..{len(vocab) - 1}")
    return vocab, merges, pad


@functools.lru_cache()
def folder_tokenizer(folder: str) -> Tokenizer:
    return Tokenizer.from_folder(folder)


@functools.lru_cache()
def default_tokenizer() -> Tokenizer:
    return Tokenizer()


# ----------------------------------------------------------------------------------- text model
class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.width)

    def forward(self, ids):
        # position ids are regenerated, never read from a checkpoint (merged files carry broken float ones)
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(pos)[None]


class SelfAttention(nn.Module):
    """`causal`: each position sees only those before it (the text tower); the vision tower sees all."""

    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.heads, self.causal = cfg.heads, causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.width, cfg.width) for _ in range(4))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, c))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# config.json's hidden_act -> the function, as transformers' ACT2FN computes it (CLIPTextConfig refuses others)
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_new": tanh_gelu, "gelu_pytorch_tanh": tanh_gelu,
               "relu": F.relu, "silu": F.silu, "swish": F.silu}


class MLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.width, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, cfg.width)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.self_attn = SelfAttention(cfg, causal)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """CLIP's pre-LN layers; the text tower's are causal, the vision tower's (models/clip_vision.py) are not."""

    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg, causal) for _ in range(cfg.layers)])

    def forward(self, x, n: int | None = None):
        """The first n layers (all by default)."""
        for layer in self.layers[:n]:
            x = layer(x)
        return x


class CLIPTextModel(nn.Module):
    """Token ids (N, 77) -> the context (N, 77, width). SD v1: last_hidden_state (the last layer, then
    final_layer_norm). SDXL's first tower: hidden_states[-2] (the penultimate layer, no final norm);
    its last layer then never runs."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, ids):
        x = self.encoder(self.embeddings(ids), context_layers(self.cfg.layers, self.cfg.output_layer))
        return self.final_layer_norm(x) if self.cfg.final_ln else x
