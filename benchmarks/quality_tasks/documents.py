"""Held-out documents for perplexity: Python standard library source, cut at exact token counts.

The calibration prompts (``scripts/make_code_prompts.py``) are the *first* files of a package in
sorted path order (``vllm`` for ``benchmarks/quality.py``'s calibration, the standard library by
default). The documents here are the standard library's files of at least ``MIN_FILE_BYTES``
taken from the *end* of the sorted order, skipping test folders and every file that
``make_code_prompts.py`` would read for ``COVERED_PROMPTS`` prompts of ``COVERED_CHARS``
characters from the standard library (a superset of the README's 8 x 60000): the documents never
overlap a calibration set made that way. Each file is tokenized on its own (``# file: NAME``
header, no special tokens) and the token lists are concatenated; document ``i`` is the
tokenizer's leading special tokens (Gemma's ``<bos>``, none for SmolLM2) followed by the next
``tokens - len(prefix)`` tokens. Same Python version and tokenizer, same documents.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib
import os
import sysconfig
from typing import Any

MIN_FILE_BYTES = 20_000
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
COVERED_PROMPTS, COVERED_CHARS = 16, 100_000


def source_root(package: str | None) -> str:
    """The folder ``make_code_prompts.py --package`` reads (the standard library for None)."""
    if package is None:
        return sysconfig.get_paths()["stdlib"]
    return os.path.dirname(importlib.import_module(package).__file__)


@functools.cache
def calibration_files(package: str | None, n: int, chars: int, skip: int = 0) -> tuple[str, ...]:
    """The files ``make_code_prompts.py --package P --n N --chars C --skip S`` reads, in order
    (its selection: sorted ``*.py`` under the root, until ``(n + skip) * chars`` characters)."""
    need = (n + skip) * chars
    size, files = 0, []
    root = source_root(package)
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        with open(path, encoding="utf-8", errors="replace") as f:
            body = f.read()
        files.append(path)
        size += len(f"# file: {os.path.basename(path)}\n{body}\n")
        if size >= need:
            break
    return tuple(files)


def document_files(exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Candidate document files: standard library ``*.py`` of at least ``MIN_FILE_BYTES``, outside
    test folders and the covered calibration set, from the end of the sorted order."""
    root = sysconfig.get_paths()["stdlib"]
    covered = set(calibration_files(None, COVERED_PROMPTS, COVERED_CHARS)) | set(exclude)
    out = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True), reverse=True):
        parts = set(os.path.relpath(path, root).split(os.sep)[:-1])
        if parts & SKIP_DIRS or path in covered or os.path.getsize(path) < MIN_FILE_BYTES:
            continue
        out.append(path)
    return out


def make_documents(tokenizer: Any, n_docs: int, tokens: int,
                   exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """``n_docs`` token lists of exactly ``tokens`` tokens; ``files``: the files they cover
    (paths relative to the standard library), ``sha256``: a digest of each list."""
    prefix = list(tokenizer("").input_ids)  # the special tokens a prompt starts with
    body = tokens - len(prefix)
    need = n_docs * body
    root = sysconfig.get_paths()["stdlib"]
    ids: list[int] = []
    used = []
    for path in document_files(exclude):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f"# file: {os.path.relpath(path, root)}\n{f.read()}\n"
        ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
        used.append(os.path.relpath(path, root))
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"the standard library holds only {len(ids)} tokens of documents, "
                         f"{need} needed ({n_docs} x {body})")
    docs = [prefix + ids[i * body:(i + 1) * body] for i in range(n_docs)]
    return dict(docs=docs, files=used, tokens=tokens,
                sha256=[hashlib.sha256(str(d).encode()).hexdigest()[:16] for d in docs])
