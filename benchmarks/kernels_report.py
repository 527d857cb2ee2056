"""The kernel benchmark's report (``bench_kernels.py``): speed-up ratios, the fp8 bars, the markdown
tables and the plot, from the measured rows (``--replot`` redraws a saved result's plot).
"""

from __future__ import annotations

import json

from sparge_serve.kernels import BLKK, BLKQ

DEFAULT_GEOMETRY = dict(head_dim=128, q_heads=32, kv_heads=8)
"""The benchmark's attention geometry where a result's meta does not record one."""
# Speed-ups the fp8 rows are held to (same run): (row, baseline, least speed-up, length); the
# baseline "fa3_fp8" is FLASH_ATTN-fp8 over the same fp8 cache, "fa3" FA3 over the bf16 cache.
# Each bar is checked at every page size of the run's fp8 rows. The fp8 products are held to
# the fp8-compute bars through either path: the Triton kernel's (`+fp8dot`) or FA3's fp8
# forward over the kept blocks (`+fa3+fp8`, which is also an fp8-cache path); and every path
# that serves an fp8 cache (SERVED_BY) to the fp8-cache bars.
FP8_BARS = [
    ("dense+fp8", "fa3_fp8", 0.95, 131072),
    ("topk_s0.5+fp8", "fa3_fp8", 1.7, 131072),
    ("topk_s0.9+fp8", "fa3_fp8", 6.0, 131072),
    ("dense+fp8dot", "fa3_fp8", 0.95, 131072),
    ("topk_s0.5+fp8dot", "fa3_fp8", 1.7, 131072),
    ("topk_s0.9+fp8dot", "fa3_fp8", 6.0, 131072),
    ("dense+fp8dot", "fa3", 1.15, 32768),
    ("dense+fp8dot", "fa3", 1.15, 131072),
    ("topk_s0.5+fp8dot", "fa3", 1.7, 32768),
    ("topk_s0.5+fp8dot", "fa3", 2.1, 131072),
    ("dense+fa3+fp8", "fa3_fp8", 0.95, 131072),
    ("topk_s0.5+fa3+fp8", "fa3_fp8", 1.7, 131072),
    ("topk_s0.9+fa3+fp8", "fa3_fp8", 6.0, 131072),
    ("dense+fa3+fp8", "fa3", 1.15, 32768),
    ("dense+fa3+fp8", "fa3", 1.15, 131072),
    ("topk_s0.5+fa3+fp8", "fa3", 1.7, 32768),
    ("topk_s0.5+fa3+fp8", "fa3", 2.1, 131072),
]
BASELINE_NAMES = {"fa3": "FA3 bf16", "fa3_fp8": "FLASH_ATTN-fp8"}
# The backend's settings that serve each kind of fp8 row (README, "Configuration"): the FA3 path
# is attention_kernel auto's for layers without the PV skip, fp8_attention takes the Triton
# kernel with fp8 products, and the Triton kernel converting V to bf16 is attention_kernel
# triton's (and that of layers with the PV skip)
SERVED_BY = {"+fa3+fp8": "default (auto: FA3 path)", "+fp8dot": "fp8_attention",
             "+fp8": "attention_kernel triton"}


def served_by(config: str) -> str:
    """The settings that serve an fp8 row's kernels (:data:`SERVED_BY`), or ``-``."""
    return next((v for k, v in SERVED_BY.items() if config.endswith(k)), "-")


def attach_ratios(results):
    fa3 = {(r["length"], r["page"]): r.get("fa3_ms") for r in results if "fa3_ms" in r}
    fa3_fp8 = {(r["length"], r["page"]): r["fa3_fp8_ms"] for r in results if "fa3_fp8_ms" in r}
    for r in results:
        base = fa3.get((r["length"], r["page"]))
        if base:
            r["speedup_vs_fa3"] = base / r["total_ms"]
            r["predictor_frac_of_fa3"] = r["predictor_ms"] / base
        base = fa3_fp8.get((r["length"], r["page"]))
        if base and r.get("kv_dtype") == "fp8":
            r["speedup_vs_fa3_fp8"] = base / r["total_ms"]
        paired = r.get("interleaved_ms", {})
        for b in ("fa3", "fa3_fp8"):
            if b in paired:
                r[f"speedup_vs_{b}_interleaved"] = paired[b] / paired["row"]


def fp8_bar_checks(results) -> list[dict]:
    """:data:`FP8_BARS` checked against the rows, at every page size of the fp8 rows: one dict
    per bar and page with the measured speed-up (``None``: no such row or baseline in the run)
    and ``passed`` (``None`` when not measured). The speed-up is the row's and the baseline's
    medians timed in turns (``interleaved_ms``) where the run has them (``first``: then the
    ratio to the baseline timed once before the length's rows, else ``None``)."""
    pages = sorted({r["page"] for r in results if r.get("kv_dtype") == "fp8"})
    rows = {(r["config"], r["length"], r["page"]): r for r in results}
    checks = []
    for config, base, least, length in FP8_BARS:
        for page in pages:
            r = rows.get((config, length, page), {})
            first = r.get("speedup_vs_" + base)
            paired = r.get(f"speedup_vs_{base}_interleaved")
            ratio = first if paired is None else paired
            checks.append(dict(config=config, baseline=base, length=length, page=page,
                               bar=least, speedup=ratio, first=None if paired is None else first,
                               passed=None if ratio is None else ratio >= least))
    return checks


def _fp8_lines(results, meta) -> list[str]:
    """The report's fp8 part: the fp8 rows against both baselines with their errors, the
    baselines themselves, and the bars' checklist (none without fp8 rows)."""
    rows = [r for r in results if r.get("kv_dtype") == "fp8"]
    if not rows:
        return []
    nan = float("nan")
    # the baselines run on the random inputs: every row of a length and page shares them
    fa3 = {(r["length"], r["page"]): r["fa3_ms"] for r in results if "fa3_ms" in r}
    fa3_fp8 = {(r["length"], r["page"]): r["fa3_fp8_ms"] for r in results if "fa3_fp8_ms" in r}
    lines = _table(
        "fp8 KV cache (`--kv-dtype fp8`): K, V and the query in float8_e4m3fn with per-tensor "
        "scales (amax / 448), output in bf16. `+fp8`: the two kernels over the fp8 cache; "
        "`+fp8dot`: the same with fp8 compute (`fp8_dot=True`); `+fa3+fp8`: the FA3 attention "
        "path, FA3's fp8 forward over the kept blocks (both stages timed together). Speed-ups "
        "(predictor included) over FLASH_ATTN-fp8 (FA3 over the same fp8 cache) and over FA3 on the bf16 cache, same "
        "run; relative L1 error (sum |out - ref| / sum |ref|) against the bf16 output of the "
        "same configuration and against the bf16 dense output.",
        ["length", "page", "config", "inputs", "block sparsity", "predictor ms", "attention ms",
         "FA3-fp8 ms", "FA3 ms", "vs FA3-fp8", "vs FA3 bf16", "rel L1 vs bf16",
         "rel L1 vs bf16 dense"],
        [[r["length"], r["page"], r["config"], r["inputs"], f"{r['block_sparsity']:.3f}",
          f"{r['predictor_ms']:.3f}", f"{r['attention_ms']:.3f}",
          f"{fa3_fp8.get((r['length'], r['page']), nan):.3f}",
          f"{fa3.get((r['length'], r['page']), nan):.3f}",
          f"{r.get('speedup_vs_fa3_fp8', nan):.2f}x", f"{r.get('speedup_vs_fa3', nan):.2f}x",
          f"{r.get('rel_l1_vs_bf16', nan):.4f}", f"{r.get('rel_l1_vs_bf16_dense', nan):.4f}"]
         for r in rows])
    bases = {}
    for r in rows:
        if "fa3_fp8_ms" in r and "fa3_ms" in r:
            bases.setdefault((r["length"], r["page"]), r)
    lines += _table(
        "Baselines: FA3 over the bf16 cache and FLASH_ATTN-fp8 (vLLM's call: fp8 views, "
        "`q/k/v_descale` expanded to (num_seqs, num_kv_heads)).",
        ["length", "page", "FA3 ms", "FA3-fp8 ms", "FA3-fp8 speed-up over FA3",
         "FA3-fp8 rel L1 vs bf16 dense"],
        [[length, page, f"{r['fa3_ms']:.3f}", f"{r['fa3_fp8_ms']:.3f}",
          f"{r['fa3_ms'] / r['fa3_fp8_ms']:.2f}x",
          f"{r.get('fa3_fp8_rel_l1_vs_bf16_dense', nan):.4f}"]
         for (length, page), r in bases.items()])
    checks = fp8_bar_checks(results)
    lines += _table(
        "Bars (speed-up of the row over the baseline, predictor included, same run): the row "
        "and the baselines timed in turns, a block of back-to-back calls of each a round, its "
        "second half timed (medians; a GPU's clock drifts over a run, and in turns the drift "
        "falls alike on both; `benchmarks/timing.py`), and in brackets over the baseline timed "
        "once before the length's rows (rows without timings in turns: that ratio alone):",
        ["row", "served by", "over", "length", "page", "speed-up", "bar", "result"],
        [[c["config"], served_by(c["config"]), BASELINE_NAMES[c["baseline"]], c["length"],
          c["page"],
          ("-" if c["speedup"] is None else f"{c['speedup']:.3f}x")
          + ("" if c["first"] is None else f" ({c['first']:.3f}x)"), f">= {c['bar']:g}x",
          {True: "pass", False: "FAIL", None: "not measured"}[c["passed"]]]
         for c in checks])
    for note in meta.get("fp8_notes", []):
        lines += ["", note]
    return lines


def write_reports(results, meta, out):
    geo = {**DEFAULT_GEOMETRY, **meta.get("geometry", {})}
    with open(out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    lines = [
        f"# Sparse prefill kernels vs FA3 — {meta['device']}, {meta['date']}",
        "",
        f"`{meta['command']}` — torch {meta['torch']}, triton {meta['triton']}, "
        f"vllm {meta['vllm']}; bf16, head dim {geo['head_dim']}, {geo['q_heads']} q / "
        f"{geo['kv_heads']} KV heads, batch 1, causal; "
        f"blocks {BLKQ}x{BLKK}. Times are medians (ms); speed-up = FA3 time / (predictor + "
        "attention) in the same run.",
        "",
        "| length | page | config | inputs | block sparsity | predictor ms | attention ms | FA3 ms "
        "| speed-up vs FA3 | predictor / FA3 | extra mem / KV |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fa3 = {(r["length"], r["page"]): r.get("fa3_ms") for r in results if "fa3_ms" in r}
    for r in results:
        if r.get("kv_dtype", "bf16") != "bf16":
            continue  # the fp8 table's
        base = fa3.get((r["length"], r["page"]))
        lines.append(
            f"| {r['length']} | {r['page']} | {r['config']} | {r['inputs']} | "
            f"{r['block_sparsity']:.3f} | {r['predictor_ms']:.3f} | {r['attention_ms']:.3f} | "
            f"{base or float('nan'):.3f} | {r.get('speedup_vs_fa3', float('nan')):.2f}x | "
            f"{r.get('predictor_frac_of_fa3', float('nan')):.2%} | "
            f"{r['extra_mem_frac_of_kv']:.1%} |"
        )
    lines += _table(
        "Predictor parts (dense configuration): key pooling (`pool_keys`: key sums, key mean, "
        "pooled keys and similarity) and the select kernel (the rest).",
        ["length", "page", "predictor ms", "pool_keys ms", "select ms"],
        [[r["length"], r["page"], f"{r['predictor_ms']:.3f}",
          f"{r['predictor_parts_ms']['pool_keys']:.3f}",
          f"{r['predictor_parts_ms']['select']:.3f}"]
         for r in results if "predictor_parts_ms" in r])
    lines += _variants_table(
        results, "variants_ms", "attention_ms", "The defaults' alternatives (`--variants`, PV "
        "skip off): attention ms, and in brackets the default's time over the "
        "alternative's.")
    lines += _variants_table(
        results, "predictor_variants_ms", "predictor_ms", "Predictor options (`--variants`): "
        "predictor ms, and in brackets the default's time over the option's.")
    lines += _table(
        "Chunked and `fa3` rows' predictor (its chunk loop without the attention) timed two "
        "ways: as issued (the predictor column: the host's time between launches counts, nothing "
        "else is queued) and replayed from a CUDA graph (its GPU time: in the real call the host "
        "issues a chunk's predictor while the GPU still runs the previous chunk's attention).",
        ["length", "page", "config", "chunk heads", "select heads", "predictor ms",
         "predictor GPU ms", "predictor GPU / FA3"],
        [[r["length"], r["page"], r["config"], r["chunk_heads"], r["select_heads"],
          f"{r['predictor_ms']:.3f}", f"{r['predictor_gpu_ms']:.3f}",
          f"{r['predictor_gpu_ms'] / fa3[r['length'], r['page']]:.2%}"]
         for r in results if "predictor_gpu_ms" in r and fa3.get((r["length"], r["page"]))])
    lines += _variants_table(
        results, "chunk_select_ms", "chunk_select_default_ms", "One select launch of a chunked "
        "call (its selection's rows only, a small grid): ms at the default launch, at 4 and "
        "8 warps, and in brackets the default's time over each.")
    lines += _sweep_table(results)
    lines += _sweep_table(results, "fp8_launch_sweep", "with fp8 products (`--fp8-sweep`, V "
                          "from its K-major copy, PV skip off, the copy included): ms of each "
                          "warps / stages, `_ptr` with pointer K loads instead of TMA, `_ahead` with "
                          "page_ahead, `_split2` two programs a query block, `_r` a register cap, "
                          "`_lazy0` a rescale every block, `_ptrv` V's tiles by pointer loads "
                          "instead of TMA; the launches timed in turns")
    lines += _sweep_table(results, "bf16_launch_sweep", "in bf16 (`--bf16-sweep`, PV skip off): "
                          "ms of each warps / stages, `_ahead` with page_ahead, `_split2` two "
                          "programs a query block, `_r` a register cap, `_lazy0` a rescale "
                          "every block; the launches timed in turns")
    lines += _fp8_lines(results, meta)
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(results, meta, out + ".png")


def _table(title: str, header: list[str], rows: list[list]) -> list[str]:
    """Markdown lines of a titled table (none without rows)."""
    if not rows:
        return []
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
    return ["", title, "", line(header), "|" + "---|" * len(header), *map(line, rows)]


def _variants_table(results, key: str, default_key: str, title: str) -> list[str]:
    """Markdown lines of the rows' ``key`` timings ({name: ms}) against their ``default_key``."""
    rows = [r for r in results if key in r]
    names = list(rows[0][key]) if rows else []
    return _table(title, ["length", "page", "config", "default ms", *names], [
        [r["length"], r["page"], r["config"], f"{r[default_key]:.3f}",
         *(f"{r[key][n]:.3f} ({r[default_key] / r[key][n]:.3f}x)" for n in names)]
        for r in rows])


def _sweep_table(results, key: str = "launch_sweep",
                 what: str = "(`--sweep`): ms of each launch (warps `w`, stages `s`; head dim 256: "
                 "`split` programs a query block; `_ahead`: page_ahead; `tma0`/`tma1`: pointer "
                 "or TMA loads; `lazy`: the conditional rescaling threshold; `bn128`: key blocks "
                 "of 128; `pv_`: with PV skip; the launches timed in turns)") -> list[str]:
    """Markdown lines of a launch sweep (rows' ``<key>_ms``, first the default launch, and
    ``<key>_max_diff`` for the launches whose output was checked): each launch's attention ms,
    the default's time over it, and the largest output difference from the default's; one table
    per set of launches."""
    rows = [r for r in results if f"{key}_ms" in r]

    def worst(diffs: dict) -> str:
        checked = [v for v in diffs.values() if v == v]
        return f"{max(checked):.2e}" if checked else "—"

    lines = []
    for names in dict.fromkeys(tuple(r[f"{key}_ms"]) for r in rows):
        default = names[0]
        lines += _table(
            f"Launches of the attention kernel {what}, in brackets the default `{default}`'s "
            "time over it; max diff: the largest output difference from the default's (of the "
            "launches checked).",
            ["length", "page", "config", *names, "max diff"],
            [[r["length"], r["page"], r["config"],
              *(f"{r[f'{key}_ms'][n]:.3f} "
                f"({r[f'{key}_ms'][default] / r[f'{key}_ms'][n]:.2f}x)" for n in names),
              worst(r.get(f"{key}_max_diff", {}))]
             for r in rows if tuple(r[f"{key}_ms"]) == names])
    return lines


def _series(rows, key):
    rows = sorted(rows, key=lambda r: r[key])
    return [r[key] for r in rows], [r["speedup_vs_fa3"] for r in rows]


def plot(results, meta, path: str) -> None:
    """Speed-up vs block sparsity (per length and page) and vs length (per configuration); the
    rows of each variant (``<config>+<variant>``: head chunks, ``fa3``) are their own dotted
    series, never joined to the default path's."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in results if r["inputs"] == "random" and "speedup_vs_fa3" in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (length, page) in sorted({(r["length"], r["page"]) for r in rows}):
        mine = [r for r in rows if r["length"] == length and r["page"] == page]
        variant = lambda r: r["config"].partition("+")[2]  # noqa: E731
        base = [r for r in mine if not variant(r)]
        line = axes[0].plot(*_series(base, "block_sparsity"), "o-",
                            label=f"{length // 1024}K, page {page}")[0]
        for name in sorted({variant(r) for r in mine} - {""}):
            axes[0].plot(*_series([r for r in mine if variant(r) == name], "block_sparsity"),
                         "x:", color=line.get_color(),
                         label=f"{length // 1024}K, page {page}, {name}")
    axes[0].axhline(1.0, color="gray", ls="--")
    axes[0].set_xlabel("block sparsity")
    axes[0].set_ylabel("speed-up vs FA3 (incl. predictor)")
    axes[0].legend(fontsize=7)
    for page in sorted({r["page"] for r in rows}):
        for cfg in ("dense", "topk_s0.5", "topk_s0.9"):
            mine = [r for r in rows if r["config"] == cfg and r["page"] == page]
            if mine:
                style = "o-" if page % BLKK == 0 else "o--"
                axes[1].plot(*_series(mine, "length"), style, label=f"{cfg}, page {page}")
    axes[1].set_xscale("log", base=2)
    axes[1].axhline(1.0, color="gray", ls="--")
    axes[1].set_xlabel("context length")
    axes[1].set_ylabel("speed-up vs FA3")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"sparge_serve kernels vs FA3 ({meta['device']}, {meta['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
