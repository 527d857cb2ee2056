"""Build the offline code corpus for the tiny test model.

Source text is whatever Python is installed on the machine: the standard library and the
site-packages folder (``sysconfig``), Python sources plus README-like docs. Everything is
deterministic for a given set of installed files: files are visited in sorted order, the
train/held-out split is a hash of each file's path, and there is no randomness at all.

Two steps (run_all.sh calls them around the tokenizer training)::

    python build_corpus.py collect --out WORK/data --max-chars 200e6
    python train_tokenizer.py --corpus WORK/data --out WORK/model
    python build_corpus.py encode --data WORK/data --tokenizer WORK/model

``collect`` writes ``docs_train.jsonl`` / ``docs_heldout.jsonl`` (one JSON string per file, in
corpus order) and ``manifest.json``. ``encode`` writes ``train.npy`` / ``heldout.npy``: flat
uint16 token arrays in which every document is followed by the end-of-text token, and adds
token counts to the manifest.

NOTE (corpus order): files of one package folder are consecutive and in path order, so a
16K-token window holds related modules (definitions far from their uses, copies of patterns).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import logging
import os
import platform
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("build_corpus")

EOS_TOKEN = "<|endoftext|>"
SOURCE_SUFFIXES = (".py", ".pyi", ".md", ".rst")
DOC_FILE_NAMES = ("METADATA",)  # a distribution's README, inside *.dist-info
SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", "node_modules"})
TRAIN_TOKENS_FILE = "train.npy"
HELDOUT_TOKENS_FILE = "heldout.npy"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class SourceFile:
    root_name: str  # "stdlib" or "site" (or a name given with --root)
    rel_path: str  # POSIX path relative to the root
    abs_path: str
    size: int  # bytes on disk, the budget's unit (about one character each)

    @property
    def key(self) -> str:
        """Machine-independent name: split hashing and the manifest use it."""
        return f"{self.root_name}/{self.rel_path}"

    @property
    def group(self) -> str:
        """Budget group: root + top-level package + its first sub-folder."""
        parts = self.rel_path.split("/")
        sub = parts[1] if len(parts) > 2 else "_files"
        top = parts[0] if len(parts) > 1 else "_top"
        return f"{self.root_name}/{top}/{sub}"


def default_roots() -> list[tuple[str, Path]]:
    """The standard library and site-packages of the running interpreter."""
    paths = sysconfig.get_paths()
    roots: list[tuple[str, Path]] = []
    for name, key in (("stdlib", "stdlib"), ("site", "purelib"), ("site-plat", "platlib")):
        p = Path(paths[key]).resolve()
        if p.is_dir() and p not in [r[1] for r in roots]:
            roots.append((name, p))
    return roots


def discover_files(roots: Sequence[tuple[str, Path]]) -> list[SourceFile]:
    """Every candidate file under the roots, sorted by (group, path)."""
    files: list[SourceFile] = []
    for root_name, root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(
                d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")
            )
            for fn in sorted(filenames):
                if not (fn.endswith(SOURCE_SUFFIXES) or fn in DOC_FILE_NAMES):
                    continue
                p = os.path.join(dirpath, fn)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                rel = Path(os.path.relpath(p, root)).as_posix()
                files.append(SourceFile(root_name, rel, p, st.st_size))
    files.sort(key=lambda f: (f.group, f.rel_path))
    return files


def select_files(
    files: Sequence[SourceFile], max_chars: int, min_bytes: int, max_bytes: int
) -> list[SourceFile]:
    """Water-fill the character budget over groups, one whole file at a time.

    The group with the fewest selected bytes so far takes its next file (in path order), so big
    packages cannot crowd out small ones, and each group contributes a contiguous run of files.
    A group whose next file does not fit the remaining budget is closed.
    """
    groups: dict[str, list[SourceFile]] = {}
    for f in files:
        if min_bytes <= f.size <= max_bytes:
            groups.setdefault(f.group, []).append(f)
    heap = [(0, g) for g in sorted(groups)]
    heapq.heapify(heap)
    cursor = dict.fromkeys(groups, 0)
    remaining = max_chars
    chosen: list[SourceFile] = []
    while heap and remaining > 0:
        taken, g = heapq.heappop(heap)
        i = cursor[g]
        f = groups[g][i]
        if f.size > remaining:
            continue  # group closed
        chosen.append(f)
        remaining -= f.size
        cursor[g] = i + 1
        if i + 1 < len(groups[g]):
            heapq.heappush(heap, (taken + f.size, g))
    chosen.sort(key=lambda f: (f.group, f.rel_path))
    return chosen


def is_heldout(key: str, heldout_frac: float) -> bool:
    """File-level split: a stable hash of the file's root-relative name."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return (h % 1_000_000) < heldout_frac * 1_000_000


def read_text(f: SourceFile, max_line_chars: int) -> tuple[str | None, str]:
    """The file's text, or None and the reason it was skipped."""
    try:
        raw = Path(f.abs_path).read_bytes()
    except OSError:
        return None, "unreadable"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    text = text.replace("\r\n", "\n").replace("\x00", "")
    lines = text.split("\n")
    # Generated tables and embedded blobs teach nothing about code structure.
    if max(len(line) for line in lines) > max_line_chars:
        return None, "long_lines"
    if len(text) / max(1, len(lines)) > 100:
        return None, "dense_lines"
    if not text.strip():
        return None, "empty"
    return text, "ok"


def collect(
    out_dir: Path,
    max_chars: int,
    heldout_frac: float = 0.02,
    roots: Sequence[tuple[str, Path]] | None = None,
    min_bytes: int = 200,
    max_bytes: int = 400_000,
    max_line_chars: int = 2_000,
) -> dict:
    """Select, read and split the files; write the JSONL documents and the manifest."""
    t0 = time.time()
    roots = list(roots) if roots is not None else default_roots()
    out_dir.mkdir(parents=True, exist_ok=True)
    files = discover_files(roots)
    chosen = select_files(files, max_chars, min_bytes, max_bytes)
    skipped: Counter[str] = Counter()
    group_stats: dict[str, dict[str, int]] = {}
    chars = {"train": 0, "heldout": 0}
    docs = {"train": 0, "heldout": 0}
    digest = hashlib.sha256()
    with (
        open(out_dir / "docs_train.jsonl", "w", encoding="utf-8") as f_train,
        open(out_dir / "docs_heldout.jsonl", "w", encoding="utf-8") as f_held,
    ):
        for f in chosen:
            text, why = read_text(f, max_line_chars)
            if text is None:
                skipped[why] += 1
                continue
            split = "heldout" if is_heldout(f.key, heldout_frac) else "train"
            (f_held if split == "heldout" else f_train).write(json.dumps(text) + "\n")
            chars[split] += len(text)
            docs[split] += 1
            gs = group_stats.setdefault(f.group, {"files": 0, "chars": 0})
            gs["files"] += 1
            gs["chars"] += len(text)
            digest.update(f"{f.key}\0{len(text)}\n".encode())
    manifest = {
        "format": "sparge-tiny-corpus",
        "args": {
            "max_chars": max_chars,
            "heldout_frac": heldout_frac,
            "min_bytes": min_bytes,
            "max_bytes": max_bytes,
            "max_line_chars": max_line_chars,
        },
        "roots": {name: str(p) for name, p in roots},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "candidate_files": len(files),
        "selected_files": len(chosen),
        "skipped": dict(sorted(skipped.items())),
        "docs": docs,
        "chars": chars,
        "files_sha256": digest.hexdigest(),
        "num_groups": len(group_stats),
        "groups": group_stats,
        "collect_seconds": round(time.time() - t0, 2),
    }
    write_manifest(out_dir, manifest)
    log.info(
        "collected %d train docs (%.1fM chars) and %d held-out docs (%.1fM chars) from %d groups "
        "in %.1fs",
        docs["train"], chars["train"] / 1e6, docs["heldout"], chars["heldout"] / 1e6,
        len(group_stats), time.time() - t0,
    )  # fmt: skip
    return manifest


def iter_docs(data_dir: Path, split: str) -> Iterator[str]:
    with open(data_dir / f"docs_{split}.jsonl", encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def write_manifest(data_dir: Path, manifest: dict) -> None:
    tmp = data_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(data_dir / MANIFEST_FILE)


def read_manifest(data_dir: Path) -> dict:
    return json.loads((data_dir / MANIFEST_FILE).read_text())


def encode(data_dir: Path, tokenizer_dir: Path, batch_chars: int = 8_000_000) -> dict:
    """Tokenize both splits into flat uint16 arrays, each document followed by EOS."""
    from tokenizers import Tokenizer

    t0 = time.time()
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    # NOTE: a literal "<|endoftext|>" inside a source file stays text, not a document break.
    tok.encode_special_tokens = True
    eos = tok.token_to_id(EOS_TOKEN)
    if eos is None:
        raise ValueError(f"{tokenizer_dir}/tokenizer.json has no {EOS_TOKEN} token; retrain it")
    if tok.get_vocab_size() > 65535:
        raise ValueError(f"vocab of {tok.get_vocab_size()} does not fit uint16 tokens")
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
    manifest = read_manifest(data_dir)
    tokens: dict[str, int] = {}
    for split, fname in (("train", TRAIN_TOKENS_FILE), ("heldout", HELDOUT_TOKENS_FILE)):
        parts: list[np.ndarray] = []
        batch: list[str] = []
        n_chars = 0
        # Large batches by characters: the tokenizer's threads then share the work evenly.
        for doc in iter_docs(data_dir, split):
            batch.append(doc)
            n_chars += len(doc)
            if n_chars >= batch_chars:
                parts.extend(_encode_docs(encode_batch, batch, eos))
                batch, n_chars = [], 0
        parts.extend(_encode_docs(encode_batch, batch, eos))
        arr = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
        np.save(data_dir / fname, arr)
        tokens[split] = int(arr.size)
    manifest["tokens"] = tokens
    manifest["eos_id"] = eos
    manifest["vocab_size"] = tok.get_vocab_size()
    manifest["chars_per_token"] = round(
        sum(manifest["chars"].values()) / max(1, sum(tokens.values())), 3
    )
    manifest["encode_seconds"] = round(time.time() - t0, 2)
    write_manifest(data_dir, manifest)
    log.info(
        "encoded %.2fM train and %.2fM held-out tokens (%.2f chars/token) in %.1fs",
        tokens["train"] / 1e6, tokens["heldout"] / 1e6, manifest["chars_per_token"],
        time.time() - t0,
    )  # fmt: skip
    return manifest


def _encode_docs(encode_batch, docs: list[str], eos: int) -> list[np.ndarray]:
    out = []
    for enc in encode_batch(docs, add_special_tokens=False) if docs else []:
        ids = enc.ids
        ids.append(eos)
        out.append(np.asarray(ids, dtype=np.uint16))
    return out


def load_tokens(data_dir: Path, split: str) -> np.ndarray:
    """The split's flat token array, memory-mapped."""
    fname = TRAIN_TOKENS_FILE if split == "train" else HELDOUT_TOKENS_FILE
    return np.load(data_dir / fname, mmap_mode="r")


def make_window(tokens: np.ndarray, start: int, length: int, eos_id: int) -> np.ndarray:
    """One training/eval window: EOS, then ``length - 1`` corpus tokens from ``start``.

    NOTE: every window starts with EOS, as every prompt the tokenizer encodes starts with it
    (its BOS), so position 0 is the same token in training, evaluation and serving.
    """
    out = np.empty(length, dtype=np.int64)
    out[0] = eos_id
    out[1:] = tokens[start : start + length - 1]
    return out


def _parse_roots(specs: Sequence[str] | None) -> list[tuple[str, Path]] | None:
    if not specs:
        return None
    roots = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or "/" in name:
            raise SystemExit(f"--root wants NAME=PATH (NAME without '/'), got {spec!r}")
        roots.append((name, Path(path).resolve()))
    return roots


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="select, read and split the source files")
    c.add_argument("--out", type=Path, required=True, help="data folder to write")
    c.add_argument("--max-chars", type=float, default=200e6, help="corpus size cap (characters)")
    c.add_argument("--heldout-frac", type=float, default=0.02)
    c.add_argument("--min-bytes", type=int, default=200)
    c.add_argument("--max-bytes", type=int, default=400_000)
    c.add_argument(
        "--root", action="append", metavar="NAME=PATH",
        help="source folder (repeatable); default: the stdlib and site-packages",
    )  # fmt: skip
    e = sub.add_parser("encode", help="tokenize the collected documents")
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.cmd == "collect":
        collect(
            args.out, int(args.max_chars), args.heldout_frac, _parse_roots(args.root),
            args.min_bytes, args.max_bytes,
        )  # fmt: skip
    else:
        encode(args.data, args.tokenizer)


if __name__ == "__main__":
    main()
