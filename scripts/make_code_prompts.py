"""Write calibration / evaluation prompts (JSONL, one ``{"text": ...}`` per line) from Python source.

    python scripts/make_code_prompts.py --out prompts.jsonl --n 8 --chars 60000 [--package vllm]
        [--skip 0]

Files of the package (default: the standard library) are concatenated in sorted order and cut into
``n`` prompts of ``chars`` characters, after skipping the first ``skip`` prompts' worth (so two
calls with different ``--skip`` give disjoint calibration and held-out sets). Code has the
long-range structure (definitions far from uses, repeated identifiers) that makes attention sparse.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import sysconfig


def source_root(package: str | None) -> str:
    if package is None:
        return sysconfig.get_paths()["stdlib"]
    return os.path.dirname(importlib.import_module(package).__file__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--chars", type=int, default=60000)
    ap.add_argument("--skip", type=int, default=0, help="prompts' worth of text to skip first")
    ap.add_argument("--package", default=None, help="importable package (default: stdlib)")
    args = ap.parse_args()
    need = (args.n + args.skip) * args.chars
    text = []
    size = 0
    for path in sorted(glob.glob(os.path.join(source_root(args.package), "**", "*.py"),
                                 recursive=True)):
        with open(path, encoding="utf-8", errors="replace") as f:
            body = f.read()
        text.append(f"# file: {os.path.basename(path)}\n{body}\n")
        size += len(text[-1])
        if size >= need:
            break
    blob = "".join(text)
    if len(blob) < need:
        raise SystemExit(f"only {len(blob)} characters of source found, {need} needed")
    with open(args.out, "w") as f:
        for i in range(args.skip, args.skip + args.n):
            f.write(json.dumps({"text": blob[i * args.chars : (i + 1) * args.chars]}) + "\n")


if __name__ == "__main__":
    main()
