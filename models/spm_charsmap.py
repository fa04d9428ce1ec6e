"""SentencePiece's precompiled normaliser (T5's `nmt_nfkc`), as tokenizer.json carries it (`Precompiled`).

The `precompiled_charsmap` is SentencePiece's compiled normalisation table: a little-endian u32 giving the
size in bytes of a Darts double-array trie, the trie (u32 units), then the replacement strings, each ended
by a NUL byte. The trie maps a byte string to the offset of its replacement.

Applied as the `tokenizers` library applies it (normalizers/precompiled.rs): the text is cut into extended
grapheme clusters; a cluster shorter than 6 UTF-8 bytes whose bytes start with a key of the trie is replaced
by the SHORTEST such key's replacement (the whole cluster, whatever follows that key); otherwise each of its
characters is looked up alone the same way and kept as it is where no key matches. Python's `regex` `\\X`
finds the clusters (its Unicode version may split a rare new emoji sequence differently from Rust's
unicode-segmentation).
"""
from __future__ import annotations

import base64
import struct

import regex

GRAPHEME = regex.compile(r"\X")


class PrecompiledCharsmap:
    def __init__(self, charsmap: str | bytes, where: str = "precompiled_charsmap"):
        blob = base64.b64decode(charsmap) if isinstance(charsmap, str) else bytes(charsmap)
        if len(blob) < 4:
            raise ValueError(f"{where}: a precompiled charsmap of {len(blob)} bytes is not SentencePiece's table")
        (size,) = struct.unpack_from("<I", blob)
        if size % 4 or 4 + size > len(blob):
            raise ValueError(f"{where}: its trie of {size} bytes does not fit the {len(blob)}-byte charsmap")
        self.units = struct.unpack_from(f"<{size // 4}I", blob, 4)
        self.normalized = blob[4 + size:]

    def first_prefix(self, key: bytes) -> int | None:
        """The replacement offset of the shortest trie key that `key` starts with (Darts' common prefix search,
        its first result), or None."""
        units = self.units
        if not units:  # an empty table maps nothing
            return None
        pos = offset(units[0])
        for c in key:
            if c == 0:
                break
            pos ^= c
            if pos >= len(units) or label(units[pos]) != c:
                return None
            unit = units[pos]
            pos ^= offset(unit)
            if has_leaf(unit):
                return value(units[pos])
        return None

    def transform(self, chunk: str) -> str | None:
        at = self.first_prefix(chunk.encode("utf-8"))
        if at is None:
            return None
        end = self.normalized.find(b"\0", at)
        return self.normalized[at:end if end >= 0 else len(self.normalized)].decode("utf-8")

    def __call__(self, text: str) -> str:
        out = []
        for cluster in GRAPHEME.findall(text):
            whole = self.transform(cluster) if len(cluster.encode("utf-8")) < 6 else None
            if whole is not None:
                out.append(whole)
                continue
            for c in cluster:
                one = self.transform(c)
                out.append(c if one is None else one)
        return "".join(out)


def has_leaf(unit: int) -> bool:
    return bool((unit >> 8) & 1)


def value(unit: int) -> int:
    return unit & ((1 << 31) - 1)


def label(unit: int) -> int:
    return unit & ((1 << 31) | 0xFF)


def offset(unit: int) -> int:
    return (unit >> 10) << ((unit & (1 << 9)) >> 6)
