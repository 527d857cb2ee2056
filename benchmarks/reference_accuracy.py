"""Long-context retrieval accuracy of the SpargeAttn algorithm on a real model, on a CPU.

    uv run sparge-models convert smollm2 --out /tmp/smollm2
    uv run python benchmarks/reference_accuracy.py --model /tmp/smollm2 --length 4096 \
        --samples 10 --thresholds calibrated=FILE --out benchmarks/results/reference_accuracy

lm-eval's ``hf`` model (its ``HFLM`` around the loaded transformers model, greedy generation)
runs the project's passkey tasks (``benchmarks/quality_tasks``: prompts of exactly ``--length``
minus 32 tokens, the needle at ten depths) and lm-eval's own RULER tasks that generate their data
offline (``niah_single_1``, ``niah_multikey_2``, ``ruler_vt``, ...; prompts up to ``--length``
tokens, scored by lm-eval's RULER metric) for dense attention (SDPA) and each configuration of
``reference_quality.py``: the untuned defaults, a uniform ``cdfthreshd`` sweep, calibrated
thresholds files. The sparse attention is ``sparge_serve.reference`` (the kernels' oracle) on
every full-attention layer of the prompt's forward pass; decode steps and sliding-window layers
run dense, as the backend serves them. It needs no GPU and no vLLM; the served measurement, through
``vllm serve`` and lm-eval's ``local-completions`` client, is ``benchmarks/quality.py``. Needs
lm-eval (``pip install 'sparge-serve[quality,models]'``; the ``test`` extra has it too).
Writes ``<out>.json``, ``<out>.md`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TASK_DIR = HERE / "quality_tasks"
sys.path.insert(0, str(HERE))

from quality import OWN_TASKS, RULER_TASKS  # noqa: E402
from quality_eval import LM_EVAL_SEEDS, seed_like_lm_eval, task_metric  # noqa: E402
from reference_quality import (  # noqa: E402
    add_setting_args,
    model_name,
    parse_settings,
    write_report,
)

from sparge_calibrate.evaluators import ReferenceEvaluator  # noqa: E402
from sparge_calibrate.hf_driver import SparseAttention, load_model  # noqa: E402

TASKS = OWN_TASKS + RULER_TASKS


def evaluate(lm, task, manager, samples: int, length: int) -> dict:
    """One lm-eval run of ``task``: its accuracy and the samples it got wrong."""
    import lm_eval

    res = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=samples, log_samples=True,
                                  bootstrap_iters=0, task_manager=manager, **LM_EVAL_SEEDS)
    name = next(iter(res["results"]))
    metric = task_metric(name, length)
    wrong = [dict(depth=s["doc"].get("depth"), answer=s.get("target"),
                  prediction=str((s.get("filtered_resps") or [""])[0])[:40])
             for s in res["samples"][name] if float(s[metric]) < 1]
    n = len(res["samples"][name])
    return dict(task=name, acc=float(res["results"][name][f"{metric},none"]), n=n, wrong=wrong)


def report(rows: list[dict], meta: dict, out: str) -> None:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    cell = {(r["config"], r["task"]): r for r in rows}
    lines = [
        f"# Long-context retrieval with SpargeAttn on {meta['model']} (PyTorch reference, CPU) — "
        f"{meta['date']}", "",
        f"`{meta['command']}` — {meta['device']}; torch {meta['torch']}, transformers "
        f"{meta['transformers']}, lm-eval {meta['lm_eval']}; lm-eval's `hf` model, greedy; "
        f"{meta['samples']} prompts a task ({meta['length'] - 32} tokens for the passkey tasks, "
        f"up to {meta['length']} for RULER's); every full-attention layer sparse for the prompt "
        "(decode steps and sliding-window layers dense, as served), fp32.", "",
        "| configuration | block sparsity | " + " | ".join(f"{t} acc" for t in tasks) + " |",
        "|---|---|" + "---|" * len(tasks),
    ]
    for c in configs:
        spars = [cell[c, t]["sparsity"] for t in tasks if (c, t) in cell]
        sp = "-" if c == "dense" else f"{sum(spars) / len(spars):.3f}"
        accs = [f"{cell[c, t]['acc']:.2f} ({cell[c, t]['n']})" if (c, t) in cell else "-"
                for t in tasks]
        lines.append(f"| {c} | {sp} | " + " | ".join(accs) + " |")
    lines += ["", "Accuracy: the fraction of prompts whose greedy answer contains the pass key "
              "(RULER: lm-eval's RULER score, the fraction of the expected values the answer "
              "contains), prompts in parentheses. Block sparsity: the fraction of causally valid "
              "(layer, head, query block, key block) pairs the predictor skips on the prompts."]

    def draw(ax) -> None:
        for t, marker in zip(tasks, "os^v", strict=False):
            pts = [(0.0 if r["config"] == "dense" else r["sparsity"], r["acc"])
                   for r in rows if r["task"] == t]
            ax.scatter(*zip(*pts, strict=True), marker=marker, label=t, alpha=0.7)
        points = [(0.0 if c == "dense" else cell[c, tasks[0]]["sparsity"],
                   cell[c, tasks[0]]["acc"], c) for c in configs if (c, tasks[0]) in cell]
        for i, (x, y, c) in enumerate(sorted(points)):  # staggered: neighbours often tie
            ax.annotate(c, (x, y), fontsize=7, xytext=(3, 3 - 10 * (i % 4)),
                        textcoords="offset points")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7)

    write_report(out, meta, rows, lines, draw, "block sparsity", "accuracy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setting_args(ap, [])
    ap.add_argument("--length", type=int, default=4096, help="context length of a prompt (4096)")
    ap.add_argument("--samples", type=int, default=10, help="prompts a task (10)")
    ap.add_argument("--tasks", nargs="+", default=list(OWN_TASKS), choices=TASKS)
    args = ap.parse_args()
    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    _, named = parse_settings(ap, args, args.length, "--length")
    model = load_model(args.model, "cpu", torch.float32, "sdpa")
    lm = HFLM(pretrained=model, tokenizer=args.model, batch_size=1, max_length=args.length,
              add_bos_token=True, device="cpu")
    metadata = {"tokenizer": str(Path(args.model).resolve()), "max_seq_lengths": [args.length],
                "sparge_samples": args.samples}
    manager = TaskManager(include_path=str(TASK_DIR), metadata=metadata,
                          include_defaults=not set(args.tasks) <= set(OWN_TASKS))
    tasks = {}
    for t in args.tasks:
        seed_like_lm_eval()
        tasks[t] = manager.load([t])["tasks"][t]
    t0 = time.perf_counter()
    rows = []
    configs = {"dense": None, **named}
    for i, (name, th) in enumerate(configs.items()):
        for t, task in tasks.items():
            print(f"[{i + 1}/{len(configs)}] {name}: {t} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            if th is None:
                r = evaluate(lm, task, manager, args.samples, args.length)
                r.update(config=name, sparsity=0.0)
            else:
                attn = SparseAttention(ReferenceEvaluator(), *th)
                with torch.inference_mode(), attn.installed(model):
                    r = evaluate(lm, task, manager, args.samples, args.length)
                r.update(config=name, sparsity=attn.sparsity)
            print(f"    acc {r['acc']:.2f} of {r['n']}, block sparsity {r['sparsity']:.3f}",
                  flush=True)
            rows.append(r)
    meta = dict(model=model_name(args.model), device=f"CPU ({platform.machine()})",
                date=datetime.date.today().isoformat(), torch=torch.__version__,
                transformers=transformers.__version__, lm_eval=lm_eval.__version__,
                python=platform.python_version(), length=args.length, samples=args.samples,
                seconds=round(time.perf_counter() - t0, 1),
                command="python benchmarks/reference_accuracy.py " + " ".join(sys.argv[1:]))
    report(rows, meta, args.out)
    print(Path(args.out + ".md").read_text())


if __name__ == "__main__":
    main()
