"""Checks a converted folder against transformers' own loading of the GGUF file it came from.

Both models run on the CPU in float32 over the same token ids: a long Python source file from the
standard library (``argparse.py`` unless another text is given), cut to ``tokens`` tokens or the
model's context length. The per-token negative log-likelihoods are averaged over position buckets
(0-63, 64-127, 128-255, ... doubling), and each bucket of the converted model must be within
``tolerance`` (relative) of transformers' GGUF loading. A short greedy answer to "What is the
capital of France?" must name Paris (both models are asked; the reference's answer is reported
beside the converted model's). The folder's tokenizer must pass the converter's checks against the
GGUF file's tokenizer metadata (``tokenizer.py``): the NLL comparison feeds both models the same
token ids, so it cannot see a wrong tokenizer.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .convert import read_provenance
from .gguf_source import ModelsError, file_sha256, locate, spec_for
from .tokenizer import TokenizerSpec, tokenizer_problems

__all__ = [
    "Bucket",
    "Report",
    "bucket_edges",
    "default_text",
    "folder_tokenizer_problems",
    "greedy",
    "load_converted",
    "load_reference",
    "token_nll",
    "verify",
]

# A question, not "The capital of France is": the Gemma 3 270M base model completes that
# sentence with "the capital of the country of France." (transformers' GGUF loading does too).
PROMPT = "Q: What is the capital of France?\nA:"
ANSWER = "Paris"


@dataclass
class Bucket:
    """Mean NLL (nats per token) of the targets at positions [lo, hi)."""

    lo: int
    hi: int
    converted: float
    reference: float

    @property
    def rel(self) -> float:
        return (self.converted - self.reference) / self.reference


@dataclass
class Report:
    model: str
    folder: str
    text: str
    tokens: int
    tolerance: float
    buckets: list[Bucket] = field(default_factory=list)
    converted_nll: float = math.nan
    reference_nll: float = math.nan
    generation: str = ""
    reference_generation: str = ""
    tokenizer_problems: list[str] = field(default_factory=list)

    @property
    def nll_ok(self) -> bool:
        return bool(self.buckets) and all(abs(b.rel) <= self.tolerance for b in self.buckets)

    @property
    def generation_ok(self) -> bool:
        return ANSWER in self.generation

    @property
    def passed(self) -> bool:
        return self.nll_ok and self.generation_ok and not self.tokenizer_problems

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for b, row in zip(self.buckets, d["buckets"], strict=True):
            row["rel"] = b.rel
        d.update(nll_ok=self.nll_ok, generation_ok=self.generation_ok, passed=self.passed)
        return d

    def table(self) -> str:
        lines = [
            f"{self.model}: {self.folder} vs transformers' GGUF loading, {self.tokens} tokens "
            f"of {self.text}",
            f"{'positions':>14}  {'converted':>9}  {'reference':>9}  {'rel':>8}",
        ]
        for b in self.buckets:
            lines.append(
                f"{f'{b.lo}-{b.hi - 1}':>14}  {b.converted:9.4f}  {b.reference:9.4f}  "
                f"{b.rel * 100:+7.3f}%"
            )
        lines.append(
            f"{'all':>14}  {self.converted_nll:9.4f}  {self.reference_nll:9.4f}  "
            f"{(self.converted_nll / self.reference_nll - 1) * 100:+7.3f}%"
        )
        lines.append(f"greedy answer to {PROMPT!r}: {self.generation!r}")
        lines.append(f"the reference's answer: {self.reference_generation!r}")
        verdict = "PASS" if self.passed else "FAIL"
        why = []
        if not self.nll_ok:
            why.append(f"a bucket differs by more than {self.tolerance:.1%}")
        if not self.generation_ok:
            why.append(f"the answer does not name {ANSWER}")
        why += [f"the tokenizer: {p}" for p in self.tokenizer_problems]
        lines.append(verdict + (f" ({'; '.join(why)})" if why else ""))
        return "\n".join(lines)


def default_text() -> tuple[str, str]:
    """A long, stable Python source file: the standard library's argparse.py."""
    path = Path(argparse.__file__)
    return f"stdlib {path.name}", path.read_text(encoding="utf-8")


def bucket_edges(n: int) -> list[int]:
    """0, 64, 128, 256, ... doubling, closed by ``n``."""
    edges, e = [0], 64
    while e < n:
        edges.append(e)
        e *= 2
    return [*edges, n]


def load_converted(folder: Path | str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def load_reference(gguf: Path | str) -> Any:
    """transformers' own GGUF loading, float32: the oracle the converter is checked against."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = Path(gguf)
    return AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()


def token_nll(model: Any, ids: list[int]) -> Any:
    """Per-target negative log-likelihood (float64, length len(ids) - 1) in one causal pass."""
    import torch

    x = torch.tensor([ids])
    with torch.inference_mode():
        logits = model(x).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits.float(), x[0, 1:], reduction="none").double()


def greedy(model: Any, tokenizer: Any, prompt: str = PROMPT, new_tokens: int = 12) -> str:
    import torch

    enc = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def _buckets(a: Any, b: Any) -> list[Bucket]:
    edges = bucket_edges(len(a))
    return [
        Bucket(lo, hi, float(a[lo:hi].mean()), float(b[lo:hi].mean()))
        for lo, hi in zip(edges, edges[1:], strict=False)
    ]


def folder_tokenizer_problems(folder: Path | str) -> list[str]:
    """The checks of ``tokenizer.tokenizer_problems`` on a converted folder's tokenizer, against
    the GGUF metadata its conversion record keeps (no GGUF file needed: cheap enough to run
    before serving). A folder whose record keeps none (converted before the checks) is a
    problem."""
    from transformers import AutoTokenizer

    record = read_provenance(Path(folder)) or {}
    kept = record.get("tokenizer")
    if not isinstance(kept, dict):
        return [f"{folder} keeps no record of a checked tokenizer: convert it again with this "
                "sparge-models"]
    spec = TokenizerSpec(bool(kept["add_bos"]), kept["bos_id"], int(kept["vocab_size"]))
    return tokenizer_problems(AutoTokenizer.from_pretrained(str(folder)), spec)


def verify(
    folder: Path | str,
    *,
    tokens: int = 2048,
    tolerance: float = 0.01,
    text: tuple[str, str] | None = None,
    log: Callable[[str], None] | None = None,
    models: tuple[Any, Any] | None = None,
) -> Report:
    """Compares ``folder`` (a ``sparge-models convert`` output) with its GGUF source on the CPU.

    ``models``: the (converted, reference) pair already loaded with :func:`load_converted` and
    :func:`load_reference`, instead of loading them here.
    """
    from transformers import AutoTokenizer

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    folder = Path(folder)
    record = read_provenance(folder)
    if record is None:
        raise ModelsError(
            f"{folder} holds no sparge-models conversion record; convert first: "
            f"sparge-models convert MODEL --out {folder}"
        )
    src = locate(spec_for(record["model"]))
    want = record.get("source", {}).get("sha256")
    if want and file_sha256(src.path) != want:
        raise ModelsError(
            f"{folder} was converted from a different {src.spec.gguf_name} than the installed "
            f"{src.spec.distribution} {src.version} holds; convert again into a new directory"
        )
    name, body = text or default_text()
    tok = AutoTokenizer.from_pretrained(str(folder))
    log("loading the converted model")
    model = models[0] if models else load_converted(folder)
    cap = min(tokens, int(model.config.max_position_embeddings))
    ids = tok(body).input_ids[:cap]
    if len(ids) < 2:
        raise ModelsError(f"{name} tokenises to {len(ids)} tokens; verification needs at least 2")
    report = Report(record["model"], str(folder), name, len(ids), tolerance)
    report.tokenizer_problems = tokenizer_problems(tok, TokenizerSpec.from_gguf(src.path))
    log(f"scoring {len(ids)} tokens of {name} with the converted model")
    a = token_nll(model, ids)
    log(f"greedy answer to {PROMPT!r}")
    report.generation = greedy(model, tok)
    del model
    log(f"loading the reference: transformers' GGUF loading of {src.path}")
    ref = models[1] if models else load_reference(src.path)
    log(f"scoring {len(ids)} tokens with the reference")
    b = token_nll(ref, ids)
    report.reference_generation = greedy(ref, tok)
    del ref
    report.buckets = _buckets(a, b)
    report.converted_nll, report.reference_nll = float(a.mean()), float(b.mean())
    return report
