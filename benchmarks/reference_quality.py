"""Block sparsity and perplexity of the SpargeAttn algorithm on a real model, on a CPU.

    uv run sparge-models convert smollm2 --out /tmp/smollm2
    uv run python benchmarks/reference_quality.py --model /tmp/smollm2 --tokens 4096 --docs 2 \
        --out benchmarks/results/reference_quality_smollm2

The sparse attention here is ``sparge_serve.reference``, the PyTorch oracle the kernels are tested
against (the same block selection, the same output up to rounding), run inside transformers by
``sparge-calibrate``'s quality report: every full-attention layer sparse (sliding-window layers
dense with their window, as the backend serves them), one held-out document at a time,
next-token log-probabilities against the same model with dense attention. It needs no GPU and no
vLLM, so it shows on any machine what the algorithm costs a real model; served numbers
(through vLLM and its kernels, with lm-eval) come from ``benchmarks/quality.py``.

Documents: held-out standard-library source of exactly ``--tokens`` tokens
(``benchmarks/quality_tasks/documents.py``: never a file of a calibration prompt set).
Configurations: the untuned SpargeAttn defaults (simthreshd1 0.6, cdfthreshd 0.98, PV skip off),
one ``cdfthreshd`` for every head with every block eligible (simthreshd1 -1, PV skip off), a
sweep (``--uniform-cdf``), and calibrated thresholds files (``--thresholds NAME=FILE``). Writes
``<out>.json``, ``<out>.md`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_tasks.documents import make_documents  # noqa: E402

from sparge_calibrate.evaluators import ReferenceEvaluator  # noqa: E402
from sparge_calibrate.hf_driver import ModelInfo, model_info, quality_report  # noqa: E402
from sparge_serve.kernels.geometry import PV_SKIP_OFF  # noqa: E402
from sparge_serve.thresholds import load_thresholds  # noqa: E402

DEFAULTS = (0.6, 0.98)
"""SpargeAttn's untuned defaults (simthreshd1, cdfthreshd), as the backend serves them."""


def settings(num_layers: int, num_heads: int, uniform_cdf: list[float],
             files: dict[str, str] | None = None) -> dict:
    """Named threshold settings ``(sim, cdf, pv)``, each ``[num_layers, num_heads]``: the
    defaults, the uniform sweep and each calibrated ``files[name]`` (a thresholds file)."""
    full = lambda x: torch.full((num_layers, num_heads), float(x))  # noqa: E731
    out = {"untuned defaults": (full(DEFAULTS[0]), full(DEFAULTS[1]), full(PV_SKIP_OFF))}
    for cdf in uniform_cdf:
        out[f"uniform cdf={cdf:g}"] = (full(-1.0), full(cdf), full(PV_SKIP_OFF))
    for name, path in (files or {}).items():
        th = load_thresholds(path)
        if th.simthreshd1.shape != (num_layers, num_heads):
            raise ValueError(f"{path}: thresholds for {tuple(th.simthreshd1.shape)} (layers, "
                             f"heads), the model has ({num_layers}, {num_heads})")
        out[name] = (th.simthreshd1, th.cdfthreshd, th.pvthreshd)
    return out


def add_setting_args(ap: argparse.ArgumentParser, uniform_cdf: list[float]) -> None:
    """The model, the configurations to compare and the output path (``--model``,
    ``--uniform-cdf``, ``--thresholds``, ``--out``)."""
    ap.add_argument("--model", required=True, help="a Hugging Face folder (sparge-models convert)")
    ap.add_argument("--uniform-cdf", type=float, nargs="*", default=uniform_cdf,
                    help="cdfthreshd values of a uniform sweep")
    ap.add_argument("--thresholds", nargs="*", default=[], metavar="NAME=FILE",
                    help="calibrated thresholds files to compare (sparge-calibrate's output)")
    ap.add_argument("--out", required=True, help="output path without extension")


def parse_settings(ap: argparse.ArgumentParser, args: argparse.Namespace, length: int,
                   flag: str) -> tuple[ModelInfo, dict]:
    """The model's geometry and the named settings of :func:`settings`; a parser error for a
    ``length`` (given by ``flag``) past the model's positions or a bad ``--thresholds`` item."""
    info = model_info(args.model)
    if info.max_positions and length > info.max_positions:
        ap.error(f"{flag} {length} exceeds the model's {info.max_positions} positions")
    files = {}
    for item in args.thresholds:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            ap.error(f"--thresholds {item!r}: give NAME=FILE with an existing file")
        files[name] = path
    return info, settings(info.num_layers, info.num_heads, args.uniform_cdf, files)


def model_name(model_dir: str) -> str:
    """The model key a ``sparge-models`` conversion records, else the folder's name."""
    config = Path(model_dir) / "sparge_model.json"
    if config.exists():
        return json.loads(config.read_text()).get("model", Path(model_dir).name)
    return Path(model_dir).name


def write_report(out: str, meta: dict, rows: list[dict], lines: list[str], draw,
                 xlabel: str, ylabel: str) -> None:
    """``<out>.json`` (meta and rows), ``<out>.md`` (``lines``) and ``<out>.png``: ``draw(ax)``
    on axes titled with the model and length."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    length = meta.get("tokens", meta.get("length"))
    ax.set_title(f"{meta['model']}, {length} tokens (reference, CPU)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)
    plt.close(fig)


def report(rows: list[dict], meta: dict, out: str) -> None:
    dense = rows[0]["dense_perplexity"]
    lines = [
        f"# SpargeAttn on {meta['model']} (PyTorch reference, CPU) — {meta['date']}", "",
        f"`{meta['command']}` — {meta['device']}; torch {meta['torch']}, transformers "
        f"{meta['transformers']}; {meta['docs']} held-out documents of {meta['tokens']} tokens "
        f"(standard-library source); every full-attention layer sparse (sliding-window layers "
        f"dense with their window, as served), fp32. Dense perplexity {dense:.4f}.",
        "",
        "| configuration | block sparsity | perplexity | vs dense | mean abs delta log p | "
        "mean KL (nats) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['sparsity']:.3f} | {r['perplexity']:.4f} | "
                     f"{r['perplexity'] / r['dense_perplexity'] - 1:+.2%} | "
                     f"{r['mean_abs_logprob_diff']:.4f} | {r['mean_kl']:.5f} |")
    lines += ["", "Block sparsity: the fraction of causally valid (layer, head, query block, key "
              "block) pairs the predictor skips. Random structure is absent here: these are the "
              "model's own attention patterns on real text."]

    def draw(ax) -> None:
        for r in rows:
            xy = (r["sparsity"], 100 * (r["perplexity"] / r["dense_perplexity"] - 1))
            ax.scatter(*xy, marker="s" if r["name"] == "untuned defaults" else "o")
            ax.annotate(r["name"], xy, fontsize=7, xytext=(3, 3), textcoords="offset points")

    write_report(out, meta, rows, lines, draw, "block sparsity", "perplexity vs dense (%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setting_args(ap, [0.9, 0.95, 0.98, 0.99])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens a document (4096)")
    ap.add_argument("--docs", type=int, default=2, help="documents (2)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    _, named = parse_settings(ap, args, args.tokens, "--tokens")
    docs = make_documents(AutoTokenizer.from_pretrained(args.model), args.docs, args.tokens)
    t0 = time.perf_counter()
    print(f"{len(docs['docs'])} documents x {args.tokens} tokens, {len(named)} configurations "
          "(a forward pass each, plus a dense one a document)", flush=True)
    rows = quality_report(args.model, docs["docs"], named, ReferenceEvaluator(), "cpu",
                          torch.float32, progress=True)
    import transformers

    meta = dict(
        model=model_name(args.model), device=f"CPU ({platform.processor() or platform.machine()})",
        date=datetime.date.today().isoformat(), torch=torch.__version__,
        transformers=transformers.__version__, python=platform.python_version(),
        tokens=args.tokens, docs=args.docs, documents_sha256=docs["sha256"],
        seconds=round(time.perf_counter() - t0, 1),
        command="python benchmarks/reference_quality.py " + " ".join(sys.argv[1:]),
    )
    report([r.__dict__ for r in rows], meta, args.out)
    print(Path(args.out + ".md").read_text())


if __name__ == "__main__":
    main()
