"""The one reader of the project's small text files (configs, tokenizer files, vocabularies, YAML, JSON
metadata): a regular file (not a device or FIFO, which would be read forever or block) of at most
`limit` bytes, read only after its size is known, and JSON parsed with a bound on its nesting (a
100 000-deep `[[[...]]]` is a RecursionError in the parser and in anything that walks it)."""
from __future__ import annotations

import json
import stat
from pathlib import Path

MAX_TEXT = 32 * 2 ** 20   # far above every config, vocabulary and tokenizer.json of the supported models (~2 MB)
MAX_DEPTH = 64            # far above any config's nesting (a few levels)


class BadTextFile(ValueError):
    """A small file (or a JSON text) the project will not read: too large, not a regular file, too deeply
    nested or not valid. The message names the file and the problem."""


def read_text(path, what: str = "file", limit: int = MAX_TEXT) -> str:
    """The UTF-8 text of `path` (a `what`: "config", "vocabulary", ...), refused before reading when it
    is not a regular file or larger than `limit` bytes."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as e:
        raise BadTextFile(f"{path}: cannot read this {what} ({e})") from e
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a device, FIFO or socket, not a regular file"
        raise BadTextFile(f"{path}: this {what} is {kind}; pass the file itself")
    if info.st_size > limit:
        raise BadTextFile(f"{path}: this {what} is {info.st_size} bytes, over the {limit} a {what} may have "
                          f"(real ones are a few KB to a few MB): is it the right file (two arguments swapped?)")
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:  # grew since stat
        raise BadTextFile(f"{path}: this {what} is over the {limit} bytes a {what} may have")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadTextFile(f"{path}: this {what} is not UTF-8 text ({e})") from e


def parse_json(text: str | bytes, where: str, limit: int = MAX_TEXT):
    """json.loads(text), refused (naming `where`) when longer than `limit`, invalid, or nested deeper
    than MAX_DEPTH."""
    if len(text) > limit:
        raise BadTextFile(f"{where}: {len(text)} characters of JSON, over the {limit} allowed")
    try:
        data = json.loads(text)
    except RecursionError:
        raise BadTextFile(f"{where}: JSON nested too deeply (over {MAX_DEPTH} levels; a config has a few)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadTextFile(f"{where}: not valid JSON ({e})") from e
    if json_depth(data) > MAX_DEPTH:
        raise BadTextFile(f"{where}: JSON nested over {MAX_DEPTH} levels deep (a config has a few)")
    return data


def read_json(path, what: str = "JSON file", limit: int = MAX_TEXT):
    """parse_json of read_text(path): the one way the project reads a JSON file."""
    return parse_json(read_text(path, what, limit), str(path), limit)


def json_depth(data) -> int:
    """The nesting depth of parsed JSON (a scalar: 0), without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_DEPTH:
            stack.extend((c, depth + 1) for c in children)
    return deepest
