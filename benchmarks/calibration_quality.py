"""Sparsity vs quality: per-head calibration at several budgets against uniform thresholds (GPU).

    python benchmarks/calibration_quality.py --model models/sparge-tiny-code \
        --prompts calib.jsonl --heldout heldout.jsonl --max-len 16384 \
        --l1 0.01 0.02 0.03 0.04 0.06 --uniform-cdf 0.9 0.95 0.98 0.99 0.995 0.999 \
        --out benchmarks/results/calibration_quality [--save-dir DIR]

The calibration issue's claim is "more sparsity *and* better quality than the untuned defaults".
A single pair of points cannot show that when the defaults are almost dense on a model, so this
script draws both families on held-out prompts, with the serving kernels:

- ``calibrated l1=X``: the calibration search (``sparge-calibrate``'s library path: transformers
  capture, kernel evaluator, default search settings, ``pv_l1 = l1 + 0.01``) at each budget;
- ``uniform cdf=C``: one threshold for every head (simthreshd1 -1, i.e. every block eligible,
  cdfthreshd C, PV skip off) — what a user without calibration would tune by hand;
- ``untuned defaults``: SpargeAttn's published defaults (simthreshd1 0.6, cdfthreshd 0.98).

Quality: perplexity of the held-out prompts with sparse attention in every layer vs dense
(and mean |delta log p|, KL). Calibration wins where its curve lies below the uniform one: less
perplexity increase at the same measured sparsity. Writes ``<out>.json``, ``<out>.md``, ``<out>.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="calibration prompts (.txt / .jsonl)")
    ap.add_argument("--heldout", required=True, help="held-out prompts (.txt / .jsonl)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--heldout-samples", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=16384)
    ap.add_argument("--l1", type=float, nargs="+", default=[0.01, 0.02, 0.03, 0.04, 0.06])
    ap.add_argument("--uniform-cdf", type=float, nargs="+",
                    default=[0.9, 0.95, 0.98, 0.99, 0.995, 0.999])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the reference evaluator, fp32 (a smoke test on short prompts)")
    ap.add_argument("--save-dir", default=None, help="also write each calibrated file here")
    ap.add_argument("--out", default="benchmarks/results/calibration_quality")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from sparge_calibrate.evaluators import make_evaluator
    from sparge_calibrate.hf_driver import capture_hf, load_model, model_info, quality_report
    from sparge_calibrate.prompts import load_prompts, prompts_sha256
    from sparge_calibrate.search import LayerBudget, SearchConfig, search_layers, stack_results
    from sparge_serve.kernels import BLKK, BLKQ
    from sparge_serve.thresholds import Thresholds, save_thresholds

    info = model_info(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    calib = [p[: args.max_len] for p in load_prompts(args.prompts, enc)[: args.samples]]
    held = [p[: args.max_len] for p in load_prompts(args.heldout, enc)[: args.heldout_samples]]
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = load_model(args.model, dev, dtype, "sdpa")
    t0 = time.perf_counter()
    cap = capture_hf(args.model, calib, dev, dtype, model=model)
    t_capture = time.perf_counter() - t0
    evaluator = make_evaluator(dev)
    L, H = info.num_layers, info.num_heads
    settings, search_s, calib_sparsity = {}, {}, {}
    for l1 in args.l1:
        t0 = time.perf_counter()
        results = search_layers(cap.layers, cap.scales, evaluator,
                                [LayerBudget(l1, l1 + 0.01)] * L, SearchConfig())
        name = f"calibrated l1={l1:g}"
        search_s[name] = time.perf_counter() - t0
        calib_sparsity[name] = float(torch.stack([r.sparsity for r in results]).mean())
        t = stack_results(results)
        settings[name] = (t["simthreshd1"], t["cdfthreshd"], t["pvthreshd"])
        print(f"{name}: search {search_s[name]:.1f} s, calibration-set sparsity "
              f"{calib_sparsity[name]:.3f}", flush=True)
        if args.save_dir:
            os.makedirs(args.save_dir, exist_ok=True)
            th = Thresholds(**t, num_kv_heads=info.num_kv_heads, head_dim=info.head_dim,
                            blkq=BLKQ, blkk=BLKK, model=os.path.normpath(args.model),
                            config_hash=info.config_hash, l1=l1, pv_l1=l1 + 0.01, sim_rule="l1",
                            num_prompts=len(calib), prompts_sha256=prompts_sha256(calib))
            save_thresholds(os.path.join(args.save_dir, f"thresholds_l1_{l1:g}.safetensors"), th)
    del cap
    full = lambda x: torch.full((L, H), float(x))  # noqa: E731
    for cdf in args.uniform_cdf:
        settings[f"uniform cdf={cdf:g}"] = (full(-1.0), full(cdf), full(50.0))
    settings["untuned defaults"] = (full(0.6), full(0.98), full(50.0))
    t0 = time.perf_counter()
    rows = quality_report(args.model, held, settings, evaluator, dev, dtype, model=model)
    t_report = time.perf_counter() - t0

    results = []
    for r in rows:
        d = dict(vars(r))
        d["ppl_increase"] = r.perplexity / r.dense_perplexity - 1.0
        d["family"] = r.name.split(" ")[0]
        if r.name in calib_sparsity:
            d["calibration_set_sparsity"] = calib_sparsity[r.name]
            d["search_s"] = search_s[r.name]
        results.append(d)
    import transformers
    import triton

    meta = dict(
        device=torch.cuda.get_device_name() if dev == "cuda" else "CPU", date=datetime.date.today().isoformat(),
        torch=torch.__version__, triton=triton.__version__,
        transformers=transformers.__version__, model=args.model,
        calibration_prompts=len(calib), heldout_prompts=len(held),
        heldout_tokens=sum(len(p) for p in held), max_len=args.max_len,
        capture_s=t_capture, report_s=t_report,
        command="python benchmarks/calibration_quality.py " + " ".join(sys.argv[1:]),
    )
    write_reports(results, meta, args.out)


def write_reports(results: list[dict], meta: dict, out: str) -> None:
    with open(out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    lines = [
        f"# Calibrated vs uniform thresholds: sparsity and held-out quality — {meta['device']}, "
        f"{meta['date']}", "",
        f"`{meta['command']}` — torch {meta['torch']}, triton {meta['triton']}, transformers "
        f"{meta['transformers']}; model `{meta['model']}`; {meta['calibration_prompts']} "
        f"calibration prompts, {meta['heldout_prompts']} held-out prompts "
        f"({meta['heldout_tokens']} tokens, max {meta['max_len']} each); sparse attention in every "
        "layer, serving kernels. Block sparsity = 1 - computed / valid blocks on the held-out prompts.", "",
        "| setting | held-out block sparsity | perplexity | dense perplexity | ppl increase | "
        "mean abs dlogp | mean KL |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in sorted(results, key=lambda d: (d["family"], d["sparsity"])):
        lines.append(
            f"| {d['name']} | {d['sparsity']:.3f} | {d['perplexity']:.4f} | "
            f"{d['dense_perplexity']:.4f} | {100 * d['ppl_increase']:+.2f}% | "
            f"{d['mean_abs_logprob_diff']:.2e} | {d['mean_kl']:.2e} |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = {"calibrated": ("o-", "per-head calibration (l1 budgets)"),
              "uniform": ("s--", "uniform thresholds (cdfthreshd sweep)"),
              "untuned": ("r*", "untuned defaults")}
    for fam, (style, label) in styles.items():
        pts = sorted((d["sparsity"], 100 * d["ppl_increase"], d["name"]) for d in results
                     if d["family"] == fam)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, markersize=7)
        for x, y, name in pts:
            ax.annotate(name.split(" ")[-1], (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("held-out block sparsity")
    ax.set_ylabel("perplexity increase vs dense (%)")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_title(f"{os.path.basename(meta['model'].rstrip('/'))}: sparsity vs quality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
