"""Prompt files: ``.txt`` (one prompt per blank-line-separated paragraph) or ``.jsonl`` (one object
per line with ``"text"`` or ``"prompt_token_ids"``)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Callable, Sequence

from sparge_serve.kernels.geometry import BLKQ

__all__ = [
    "MIN_PROMPT_TOKENS",
    "PROMPT_EXTENSIONS",
    "PromptError",
    "check_lengths",
    "load_prompts",
    "prompts_sha256",
]

PROMPT_EXTENSIONS = (".txt", ".jsonl")

MIN_PROMPT_TOKENS = 3 * BLKQ
"""Shortest calibration prompt, in tokens (384). The sink block, the diagonal blocks and the rows
of the last ``BLKQ`` (128) queries are always computed, so a prompt of fewer than three query
blocks has no block the thresholds could skip; at 384 tokens the second query block has a real
choice (1 of its 4 key blocks). Real calibration wants prompts as long as the ones served
(thousands of tokens); the sparse path is only used above the backend's ``min_sparse_len``."""


class PromptError(ValueError):
    """A prompt file cannot be used; the message says why and how to fix it."""


def _open_text(path: str) -> io.StringIO:
    """The file's text, newlines read as ``open`` reads them; :class:`PromptError` naming the first
    byte that is not UTF-8 (offset from the start of the file, and its line)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise PromptError(
            f"prompt file {path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} "
            f"(line {line}) cannot be decoded ({e.reason}); save the file as UTF-8 (e.g. `iconv -f "
            "latin1 -t utf-8`)"
        ) from None
    return io.StringIO(text, newline=None)


def _read_txt(path: str) -> list[str]:
    text = _open_text(path).read()
    paragraphs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def _read_jsonl(path: str) -> list[str | list[int]]:
    records: list[str | list[int]] = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise PromptError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            if "prompt_token_ids" in obj:
                ids = obj["prompt_token_ids"]
                if not isinstance(ids, list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in ids
                ):
                    raise PromptError(f"{path}:{lineno}: `prompt_token_ids` must be a list of integers")
                records.append(ids)
            elif "text" in obj:
                if not isinstance(obj["text"], str):
                    raise PromptError(f"{path}:{lineno}: `text` must be a string")
                records.append(obj["text"])
            else:
                raise PromptError(
                    f"{path}:{lineno}: needs a `text` or a `prompt_token_ids` field "
                    f"(has {sorted(obj)})"
                )
    return records


def load_prompts(
    path: str,
    tokenize: Callable[[str], list[int]] | None,
    vocab_size: int = 0,
) -> list[list[int]]:
    """Token ids of every prompt in ``path``. ``tokenize`` is needed for text prompts only
    (``None``: text prompts are an error naming the fix)."""
    if not os.path.isfile(path):
        raise PromptError(f"prompt file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in PROMPT_EXTENSIONS:
        raise PromptError(
            f"prompt file {path} has extension {ext or '(none)'!r}; use .txt (prompts separated "
            "by blank lines) or .jsonl (objects with `text` or `prompt_token_ids`)"
        )
    try:
        records = _read_txt(path) if ext == ".txt" else _read_jsonl(path)
    except OSError as e:
        raise PromptError(f"prompt file {path} cannot be read ({e.strerror or e})") from None
    if not records:
        raise PromptError(f"prompt file {path} holds no prompts")
    out = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            if tokenize is None:
                raise PromptError(
                    f"prompt file {path} holds text but the model directory has no usable "
                    "tokenizer; add one or give `prompt_token_ids` in a .jsonl file"
                )
            rec = tokenize(rec)
        if vocab_size:
            bad = [t for t in rec if not 0 <= t < vocab_size]
            if bad:
                raise PromptError(
                    f"prompt {i} of {path} has token id {bad[0]} outside the model's vocabulary "
                    f"[0, {vocab_size})"
                )
        out.append(list(rec))
    return out


def check_lengths(prompts: Sequence[Sequence[int]], minimum: int, path: str) -> None:
    """``PromptError`` naming the prompts shorter than ``minimum`` tokens."""
    short = [(i, len(p)) for i, p in enumerate(prompts) if len(p) < minimum]
    if short:
        listed = ", ".join(f"prompt {i} has {n}" for i, n in short[:5])
        more = f" (and {len(short) - 5} more)" if len(short) > 5 else ""
        raise PromptError(f"{path}: {listed} tokens{more}; need at least {minimum} tokens each")


def prompts_sha256(prompts: Sequence[Sequence[int]]) -> str:
    """sha256 of the token ids actually used (length-prefixed little-endian int64s)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(struct.pack("<q", len(p)))
        h.update(struct.pack(f"<{len(p)}q", *p))
    return h.hexdigest()
