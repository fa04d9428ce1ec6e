"""BERT WordPiece tokenisation (uncased), the tokenizer LDM-400M's text tower was trained with.

LDM-400M tokenises with `bert-base-uncased`: clean the text (drop control characters, every
whitespace becomes a space), put spaces around CJK ideographs, lowercase and strip accents (NFD,
then drop the combining marks), split on whitespace and on every punctuation character, then cut
each word greedily into the longest pieces of the vocabulary, pieces after the first spelled with
a leading `##` ("squirrels" -> "squirrel", "##s"). A word with no such cut becomes [UNK].
Prompts become [CLS], at most 75 content tokens, [SEP], then [PAD] up to 77.

The vocabulary is the user's file (`vocab.txt`, one token a line, id = line number): it is read,
never downloaded or shipped.
"""
from __future__ import annotations

import unicodedata
from pathlib import Path

import torch

from .textfile import BadTextFile, read_json, read_text
from .tokens import token_rows

CONTEXT_LENGTH = 77
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
MAX_WORD_CHARS = 100  # BERT's limit: a longer word is [UNK] without trying to cut it
NO_SPACE_BEFORE = (".", "?", "!", ",")  # BERT's decoder glues these to the token before ("cats.")


# ----------------------------------------------------------------------------- characters
def is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def is_punctuation(ch: str) -> bool:
    """BERT's punctuation: all non-alphanumeric ASCII (so `$`, `^`, `+` count) and Unicode's P* classes."""
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 \
        or unicodedata.category(ch).startswith("P")


def is_cjk(ch: str) -> bool:
    """CJK Unified Ideographs (and extensions, compatibility forms): BERT treats each as a word."""
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def normalize(text: str) -> str:
    """Cleaned, CJK-spaced, lowercased and accent-stripped text."""
    out = []
    for ch in text:
        if ord(ch) in (0, 0xFFFD) or is_control(ch):
            continue
        out.append(" " if is_whitespace(ch) else f" {ch} " if is_cjk(ch) else ch)
    text = unicodedata.normalize("NFD", "".join(out).lower())
    return "".join(ch for ch in text if unicodedata.category(ch) != "Mn")


def words(text: str) -> list[str]:
    """Normalised text split on whitespace, each punctuation character a word of its own."""
    out = []
    for chunk in normalize(text).split():
        word = ""
        for ch in chunk:
            if is_punctuation(ch):
                out += [word, ch] if word else [ch]
                word = ""
            else:
                word += ch
        if word:
            out.append(word)
    return out


# ----------------------------------------------------------------------------- the tokenizer
def read_vocab(path: str | Path) -> dict[str, int]:
    """{token: id} from a BERT `vocab.txt` (or the `tokenizer.json` transformers writes beside or instead
    of it), with a clear error for a missing file or missing specials."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"BERT vocabulary {path} not found: pass the `vocab.txt` of the model's "
                                f"tokenizer (the diffusers folder's tokenizer/vocab.txt)")
    if path.suffix == ".json":
        vocab = json_vocab(path)
    else:
        vocab = {}
        for i, line in enumerate(read_text(path, "vocabulary").split("\n")):
            token = line.rstrip("\r")
            if token:
                vocab[token] = i  # a token listed twice has its last line's id, as transformers' BertTokenizer
    missing = [s for s in SPECIALS if s not in vocab]
    if missing:
        raise ValueError(f"{path} is not a BERT WordPiece vocabulary: it lacks {missing}")
    return vocab


def json_vocab(path: Path) -> dict[str, int]:
    """The WordPiece vocabulary inside a `tokenizer.json` (its model.vocab)."""
    try:
        vocab = read_json(path, "tokenizer.json")["model"]["vocab"]
    except BadTextFile:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a tokenizer.json with a WordPiece vocabulary (model.vocab): {e}") from e
    if not isinstance(vocab, dict) or not all(type(i) is int for i in vocab.values()):  # true is no id
        raise ValueError(f"{path}: its model.vocab is not a mapping of tokens to (integer) ids")
    outside = next((t for t, i in vocab.items() if not 0 <= i < len(vocab)), None)
    if outside is not None:  # an id is a row of the embedding: -1 or 10**9 would index past it
        raise ValueError(f"{path}: its model.vocab gives {outside!r} the id {vocab[outside]}, outside 0..{len(vocab) - 1} "
                         "(ids number the vocabulary's tokens): pass the tokenizer.json the model was trained with")
    return vocab


class WordPieceTokenizer:
    """BERT WordPiece (uncased) with LDM's layout: [CLS] content [SEP] [PAD]..., 77 ids."""

    def __init__(self, vocab_path: str | Path, length: int = CONTEXT_LENGTH):
        self.path = Path(vocab_path)
        self.encoder = read_vocab(vocab_path)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.pad, self.unk, self.bos, self.eos = (self.encoder[s] for s in SPECIALS)
        self.length = length

    def __len__(self) -> int:
        """The number of ids the vocabulary spans (the text tower's embedding rows)."""
        return max(self.decoder) + 1

    def pieces(self, word: str) -> list[str]:
        """Greedy longest-match-first cut of one word; [UNK] when some part has no piece."""
        if len(word) > MAX_WORD_CHARS:
            return ["[UNK]"]
        out, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.encoder:
                    break
            else:
                return ["[UNK]"]
            out.append(piece)
            start = end
        return out

    def encode(self, text: str) -> list[int]:
        """Content token ids, without [CLS] / [SEP]."""
        return [self.encoder[p] for w in words(text) for p in self.pieces(w)]

    def decode(self, ids) -> str:
        """Tokens joined by spaces, except before a `##` piece (glued, without its ##) and before
        `. ? ! ,` (BERT's decoder clean-up); a lone piece keeps its ## ("##s"), as BERT's does."""
        out = []
        for i, token in enumerate(self.decoder[int(i)] for i in ids):
            glued = i > 0 and (token.startswith("##") or token in NO_SPACE_BEFORE)
            out.append(token.removeprefix("##") if i > 0 else token)
            if i > 0 and not glued:
                out[-1] = " " + out[-1]
        return "".join(out)

    def __call__(self, prompts: list[str] | str, length: int | None = None) -> torch.Tensor:
        """(N, length) int64: [CLS], content truncated to length - 2 (with a warning), [SEP], [PAD]s."""
        return token_rows(self, prompts, length or self.length, "the text encoder")
