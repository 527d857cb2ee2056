"""Results of ``benchmarks/bench_e2e.py``: merging rows into ``e2e.json``, the ratio tables
(``e2e.md``) and the TTFT plot (``e2e.png``). Pure Python; matplotlib only for the plot.

``e2e.json`` holds ``runs`` (one entry per invocation: command, date, device, versions), ``rows``
(one per measurement, each with the index of the run that made it) and ``failed`` (what did not
run, by stage, geometry and configuration). A row replaces an earlier one with the same key, so
separate invocations, each running some stages, accumulate into one file.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from typing import Any

STAGES = ("ttft", "decode", "serve")
# the fields that, with stage, geometry and configuration, identify a row
KEY_FIELDS = {"ttft": ("length",), "decode": ("context", "batch"), "serve": ("concurrency",)}
RESULTS_NAME = "e2e"

# Attention kernels, by name as torch.profiler reports them: FlashAttention (vLLM's FA2/FA3 and
# its split-KV combine), vLLM's Triton fallback, and the SPARGE predictor / attention kernels.
# NOTE: vLLM's "reshape_and_cache_flash_kernel" writes the KV cache; both backends run it the same,
# so it is not attention here ("flash" alone would match it).
FLASH_MARKERS = ("flash::", "flash_fwd", "FlashAttn", "unified_attention", "fmha")
SPARGE_KERNELS = ("_sparse_attn_kernel", "_select_kernel", "_ksum_kernel", "_kblock_kernel",
                  "_virtual_table_kernel", "_values_kmajor_kernel")

_CONFIG = re.compile(r"^(FLASH_ATTN|SPARGE)@(\d+)"
                     r"(?::(topk[0-9.]+|untuned|defaults|dense|calibrated|calibrated_nopv))?"
                     r"(\+fp8(?:dot)?)?(?:\+(fa3|triton))?$")


def is_attention_kernel(name: str) -> bool:
    """Whether a CUDA kernel (profiler name) computes attention or SPARGE's block selection."""
    return any(m in name for m in FLASH_MARKERS) or any(name.startswith(k) or f" {k}" in name
                                                         for k in SPARGE_KERNELS)


def kernel_summary(kernels: list[tuple[str, int, float]], wall_ms: float,
                   host: list[tuple[str, int, float]] | None = None) -> dict[str, Any]:
    """One profiled prefill from its CUDA kernels ``(name, calls, GPU ms)``: wall ms, summed GPU
    kernel ms, attention kernel ms, and the largest kernels of each kind; with ``host``, its CPU
    ops ``(name, calls, self CPU ms)``: their summed host time and the largest."""
    kernels = sorted(kernels, key=lambda k: -k[2])
    attention = [k for k in kernels if is_attention_kernel(k[0])]
    out = dict(wall_ms=wall_ms, gpu_ms=sum(k[2] for k in kernels),
               attention_ms=sum(k[2] for k in attention),
               attention_top=[(n[:100], c, ms) for n, c, ms in attention[:6]],
               top=[(n[:100], c, ms) for n, c, ms in kernels[:10]])
    if host is not None:
        host = sorted(host, key=lambda k: -k[2])
        graphs = [k for k in host if MODEL_GRAPH_OP in k[0]]
        ops: dict[str, list] = {}
        for n, c, ms in host:
            op = ops.setdefault(n[:100], [0, 0.0])
            op[0], op[1] = op[0] + c, op[1] + ms
        out.update(host_ms=sum(k[2] for k in host),
                   host_calls=sum(k[1] for k in host),
                   host_top=[(n[:100], c, ms) for n, c, ms in host[:10]],
                   graph_host=(sum(k[1] for k in graphs), sum(k[2] for k in graphs)),
                   host_ops=ops)
    return out


def host_op_diff(profile: dict[str, Any], base: dict[str, Any], n: int = 6
                 ) -> list[tuple[str, int, int, float, float]]:
    """The host ops whose call count differs between a profiled prefill and its baseline's
    ``(name, baseline calls, calls, baseline ms, ms)``, the ``n`` largest by the change in host
    time; empty where either summary lacks the full op table (``host_ops``)."""
    ops, base_ops = profile.get("host_ops"), base.get("host_ops")
    if not ops or not base_ops:
        return []
    diff = []
    for name in ops.keys() | base_ops.keys():
        (c, ms), (bc, bms) = ops.get(name, (0, 0.0)), base_ops.get(name, (0, 0.0))
        if c != bc:
            diff.append((name, bc, c, bms, ms))
    diff.sort(key=lambda d: (-abs(d[4] - d[3]), d[0]))
    return diff[:n]


_GENERATED = re.compile(r"[^/:]*/[a-z0-9]{40,}\.py:")


def host_function_diff(hp: dict[str, Any], base: dict[str, Any], n: int = 8
                       ) -> list[tuple[str, float, float, float]]:
    """The functions of two ``--host-profile`` summaries (cumulative lists) whose host ms per
    prefill differ most: ``(function, calls, baseline ms, ms)``, the ``n`` largest changes among
    the functions both lists hold (torch.compile's generated modules, named by a hash of each
    engine's graph, compare as one)."""
    def table(summary):
        return {_GENERATED.sub("<generated>.py:", f["fn"]): f for f in summary["cumulative"]}

    rows, base_rows = table(hp), table(base)
    diff = [(fn, rows[fn]["calls"], base_rows[fn]["cum_ms"], rows[fn]["cum_ms"])
            for fn in rows.keys() & base_rows.keys()]
    diff.sort(key=lambda d: (-abs(d[3] - d[2]), d[0]))
    return diff[:n]


MODEL_GRAPH_OP = "CompiledFxGraph"
"""The host op of vLLM's compiled model pieces (torch.compile's graphs between the attention
layers): the same code under every attention backend, so its host time per call is a measure of
the host's speed while a row ran."""


def graph_host_us(profile: dict[str, Any]) -> float | None:
    """Host µs per call of the compiled model graphs in a profiled prefill (from the summary's
    ``graph_host``, else from its largest host ops); None where neither has them."""
    calls, ms = profile.get("graph_host") or (0, 0.0)
    if not calls:
        top = [(c, t) for n, c, t in profile.get("host_top", []) if MODEL_GRAPH_OP in n]
        calls, ms = sum(c for c, _ in top), sum(t for _, t in top)
    return ms * 1e3 / calls if calls else None


BLOCK_SERIES = ("sparge_attention_blocks_valid_total", "sparge_attention_blocks_computed_total")


def block_counts(metrics_text: str) -> tuple[float, float]:
    """(valid, computed) attention blocks summed over layers from a ``/metrics`` page (0 where
    the series are absent, as with FLASH_ATTN)."""
    sums = dict.fromkeys(BLOCK_SERIES, 0.0)
    for line in metrics_text.splitlines():
        for name in BLOCK_SERIES:
            if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
                sums[name] += float(line.rsplit(" ", 1)[1])
    return sums[BLOCK_SERIES[0]], sums[BLOCK_SERIES[1]]


def serve_row(result: dict[str, Any], before: tuple[float, float],
              after: tuple[float, float]) -> dict[str, Any]:
    """A ``serve`` row from a ``vllm bench serve --save-result`` file and the block counts of
    ``/metrics`` before and after the load. The file's scalar fields are kept under ``bench``."""
    row: dict[str, Any] = {k: result.get(k) for k in (
        "completed", "failed", "duration", "request_throughput", "output_throughput",
        "total_token_throughput", "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
        "p50_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p50_itl_ms", "p99_itl_ms",
        "mean_e2el_ms", "p99_e2el_ms")}
    if row["p50_ttft_ms"] is None:
        row["p50_ttft_ms"] = result.get("median_ttft_ms")
    valid, computed = after[0] - before[0], after[1] - before[1]
    if valid > 0:
        row["block_sparsity"] = 1.0 - computed / valid
    row["bench"] = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
    return row


def parse_config(name: str) -> dict[str, Any]:
    """``BACKEND@PAGE[:VARIANT][+fp8][+KERNEL]`` -> backend, page size, variant, topk, KV cache
    dtype, attention kernel. Variants (SPARGE only): ``topkF`` (keep the fraction F of key blocks,
    F in (0, 1]), ``untuned`` (the published untuned thresholds), ``defaults`` (the backend's
    default settings: no thresholds file, so dense), ``dense`` (``mode: dense``, the kill switch),
    ``calibrated`` (a real-weight geometry's ``--thresholds`` file) and ``calibrated_nopv`` (that
    file with its PV skip off, so every sparse layer can attend through FA3).
    ``+fp8``: ``--kv-cache-dtype fp8`` (else ``auto``, the model's dtype); ``+fp8dot`` (SPARGE
    only): the same with the backend's ``fp8_attention`` (the Triton kernel's products in fp8).
    ``+fa3`` / ``+triton`` (SPARGE only): the backend's ``attention_kernel`` (else its default,
    ``auto``)."""
    m = _CONFIG.match(name)
    if m is None:
        raise ValueError(f"configuration {name!r} is not BACKEND@PAGE[:VARIANT][+fp8][+KERNEL] "
                         "(e.g. FLASH_ATTN@16, SPARGE@64:topk0.5, SPARGE@64:untuned, "
                         "SPARGE@64:dense, FLASH_ATTN@64+fp8, SPARGE@64:topk0.5+fa3)")
    backend, page, variant = m.group(1), int(m.group(2)), m.group(3)
    kv = "fp8" if m.group(4) else "auto"
    fp8_attention = m.group(4) == "+fp8dot"
    kernel = m.group(5)
    for opt, on in ((kernel, kernel is not None), ("fp8dot", fp8_attention)):
        if on and (backend != "SPARGE" or variant in ("dense", "defaults")):
            raise ValueError(f"configuration {name!r}: +{opt} sets the sparse path's attention: "
                             "SPARGE with a topk, untuned or calibrated variant only")
    if backend == "SPARGE" and variant is None:
        raise ValueError(f"configuration {name!r}: SPARGE needs a variant (:topkF, :untuned, "
                         ":defaults, :dense, :calibrated or :calibrated_nopv)")
    if backend == "FLASH_ATTN" and variant is not None:
        raise ValueError(f"configuration {name!r}: FLASH_ATTN takes no variant")
    topk = None
    if variant and variant.startswith("topk"):
        try:
            topk = float(variant[4:])
        except ValueError:
            raise ValueError(f"configuration {name!r}: {variant[4:]!r} is not a number") from None
        if not 0 < topk <= 1:
            raise ValueError(f"configuration {name!r}: topk is the kept fraction of key blocks, "
                             "in (0, 1]; 0% block sparsity is topk1.0")
    return dict(backend=backend, page=page, variant=variant, topk=topk, kv_cache_dtype=kv,
                attention_kernel=kernel, fp8_attention=fp8_attention)


def baseline_of(config: str) -> str:
    """FLASH_ATTN on the same page size and KV cache dtype: the reference of every ratio."""
    c = parse_config(config)
    return f"FLASH_ATTN@{c['page']}" + ("+fp8" if c["kv_cache_dtype"] == "fp8" else "")


def config_order(config: str) -> tuple:
    """Table order: the model's cache dtype, then fp8; in each, FLASH_ATTN by page, then SPARGE
    from the most kept blocks to the fewest."""
    c = parse_config(config)
    fp8 = c["kv_cache_dtype"] == "fp8"
    if c["backend"] == "FLASH_ATTN":
        return (fp8, 0, c["page"], 0.0, "")
    kernel = (c["attention_kernel"] or "") + ("+fp8dot" if c["fp8_attention"] else "")
    if c["topk"] is not None:
        return (fp8, 1, c["page"], -c["topk"], kernel)
    order = {"calibrated": 0.0, "calibrated_nopv": 0.5, "untuned": 1.0, "defaults": 2.0}
    return (fp8, 2, c["page"], order.get(c["variant"], 3.0), kernel)


def ttft_order(row: dict[str, Any]) -> tuple:
    """Table order of TTFT rows: by geometry, then length, then configuration."""
    return (row["geometry"], row["length"], config_order(row["config"]))


def ceiling(a: float, k: float) -> float:
    """Amdahl's bound on the end-to-end speed-up when a share ``a`` of the time (attention) runs
    ``k`` times faster and the rest does not change: 1 / (1 - a + a / k)."""
    return 1.0 / (1.0 - a + a / k)


# ---- the results file ------------------------------------------------------------------------
def row_key(row: dict[str, Any]) -> tuple:
    stage = row["stage"]
    return (stage, row["geometry"], row["config"], *(row[f] for f in KEY_FIELDS[stage]))


def new_results() -> dict[str, Any]:
    return {"meta": {}, "runs": [], "rows": [], "failed": []}


def load_results(path: str | None) -> dict[str, Any]:
    """The results at ``path``, or empty results when there is no such file."""
    if not path or not os.path.exists(path):
        return new_results()
    with open(path) as f:
        data = json.load(f)
    for key, empty in new_results().items():
        data.setdefault(key, empty)
    return data


def start_run(data: dict[str, Any], meta: dict[str, Any]) -> int:
    """Appends this invocation to ``data["runs"]``; returns its index."""
    data["runs"].append(dict(meta))
    data["meta"] = data["runs"][-1]
    return len(data["runs"]) - 1


def add_rows(data: dict[str, Any], rows: list[dict[str, Any]], run: int) -> None:
    """Adds ``rows`` made by run ``run``, replacing rows of the same key; a stage's success also
    clears the failure recorded for its geometry and configuration."""
    index = {row_key(r): i for i, r in enumerate(data["rows"])}
    for r in rows:
        r = dict(r, run=run)
        i = index.get(row_key(r))
        if i is not None and r.get("round") and data["rows"][i].get("run") == run:
            r = join_round(data["rows"][i], r)
        if i is None:
            index[row_key(r)] = len(data["rows"])
            data["rows"].append(r)
        else:
            data["rows"][i] = r
        data["failed"] = [f for f in data["failed"] if (f["stage"], f["geometry"], f["config"])
                          != (r["stage"], r["geometry"], r["config"])]


def add_failure(data: dict[str, Any], stage: str, geometry: str, config: str, why: str,
                run: int) -> None:
    data["failed"] = [f for f in data["failed"]
                      if (f["stage"], f["geometry"], f["config"]) != (stage, geometry, config)]
    data["failed"].append(dict(stage=stage, geometry=geometry, config=config, why=why, run=run))


def join_round(first: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """A TTFT row of a later round (``--rounds``) joined to its run's row of the earlier ones:
    the TTFT is the median of all their repeats, ``ttft_round_s`` each round's median; the first
    round's profile and block sparsity stay."""
    rounds = first.get("ttft_round_s", [first["ttft_s"]]) + [later["ttft_s"]]
    times = first.get("ttft_all_s", []) + later.get("ttft_all_s", [])
    return dict(first, ttft_s=statistics.median(times or rounds), ttft_all_s=times,
                ttft_round_s=rounds, round=later["round"])


def merge_results(data: dict[str, Any], other: dict[str, Any]) -> None:
    """Adds ``other``'s runs to ``data`` (as new runs), its rows (replacing rows of the same
    key) and its failures."""
    first = len(data["runs"])
    for meta in other["runs"]:
        start_run(data, meta)
    for row in other["rows"]:
        add_rows(data, [{k: v for k, v in row.items() if k != "run"}], first + row["run"])
    for f in other["failed"]:
        add_failure(data, f["stage"], f["geometry"], f["config"], f["why"], first + f["run"])


def has_row(data: dict[str, Any], key: tuple) -> bool:
    return any(row_key(r) == key for r in data["rows"])


# ---- tables ------------------------------------------------------------------------------------
def _find(data: dict[str, Any], key: tuple) -> dict[str, Any] | None:
    for r in data["rows"]:
        if row_key(r) == key:
            return r
    return None


def _x(v: float | None, digits: int = 2) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}x"


def _f(v: float | None, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _mark(row: dict[str, Any], base: dict[str, Any] | None) -> str:
    """'†' when the baseline row comes from another run than ``row``."""
    return "†" if base is not None and base.get("run") != row.get("run") else ""


def round_lines(data: dict[str, Any], ttft: list[dict[str, Any]]) -> list[str]:
    """The table of the TTFT rows run in several rounds: each round's median and its ratio
    against the baseline's same round, for the rounds both ran (``--budget-s`` may stop a run
    between a round's engines: rounds start in order, so those are each one's first)."""
    rows = [r for r in ttft if len(r.get("ttft_round_s", ())) > 1]
    if not rows:
        return []
    lines = ["", "Rows run in several rounds (`--rounds`: every engine started again, in turn): "
             "each round's median TTFT and its speed-up over the same round of FLASH_ATTN on "
             "the same page size. Rounds that disagree more than the configurations do measure "
             "the engines' hosts, not the backends.", "",
             "| geometry | length | config | TTFT ms by round | vs FLASH_ATTN, same page, by "
             "round |", "|---|---|---|---|---|"]
    for r in rows:
        times = r["ttft_round_s"]
        same = _find(data, ("ttft", r["geometry"], baseline_of(r["config"]), r["length"]))
        base = same.get("ttft_round_s", ()) if same and same["run"] == r["run"] else ()
        both = min(len(base), len(times))
        ratios = " / ".join(f"{b / t:.2f}x" for b, t in zip(base[:both], times[:both],
                                                             strict=True)) or "—"
        lines.append(f"| {r['geometry']} | {r['length']} | {r['config']} | "
                     f"{' / '.join(f'{t * 1e3:.1f}' for t in times)} | {ratios} |")
    return lines


def ttft_ratios(data: dict[str, Any]) -> list[dict[str, Any]]:
    """TTFT rows with their speed-ups: vs FLASH_ATTN on the same page size and vs FLASH_ATTN@16
    (vLLM's default page), as baseline TTFT / this TTFT."""
    out = []
    for r in data["rows"]:
        if r["stage"] != "ttft":
            continue
        same = _find(data, ("ttft", r["geometry"], baseline_of(r["config"]), r["length"]))
        b16 = _find(data, ("ttft", r["geometry"], "FLASH_ATTN@16", r["length"]))
        out.append(dict(r, vs_same=same["ttft_s"] / r["ttft_s"] if same else None,
                        vs_16=b16["ttft_s"] / r["ttft_s"] if b16 else None,
                        mark=_mark(r, same)))
    return sorted(out, key=ttft_order)


def attention_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per SPARGE row profiled together with its FLASH_ATTN baseline (same geometry, length, page):
    ``a`` = attention's share of the baseline's TTFT (and of its GPU kernel time), ``k`` = the
    attention speed-up (baseline attention GPU ms / SPARGE's, predictor included), the ceiling
    1 / (1 - a + a/k) and the measured TTFT speed-up."""
    out = []
    for r in data["rows"]:
        if r["stage"] != "ttft" or parse_config(r["config"])["backend"] != "SPARGE":
            continue
        base = _find(data, ("ttft", r["geometry"], baseline_of(r["config"]), r["length"]))
        if base is None or "profile" not in base or "profile" not in r:
            continue
        bp, sp = base["profile"], r["profile"]
        if bp["attention_ms"] <= 0 or sp["attention_ms"] <= 0:
            continue
        a = min(1.0, bp["attention_ms"] / (base["ttft_s"] * 1e3))
        a_gpu = bp["attention_ms"] / bp["gpu_ms"]
        k = bp["attention_ms"] / sp["attention_ms"]
        out.append(dict(geometry=r["geometry"], length=r["length"], config=r["config"],
                        baseline=base["config"], a=a, a_gpu=a_gpu, k=k, ceiling=ceiling(a, k),
                        ceiling_gpu=ceiling(a_gpu, k), measured=base["ttft_s"] / r["ttft_s"],
                        base_attention_ms=bp["attention_ms"], attention_ms=sp["attention_ms"],
                        mark=_mark(r, base)))
    return sorted(out, key=ttft_order)


def decode_ratios(data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in data["rows"]:
        if r["stage"] != "decode":
            continue
        base = _find(data, ("decode", r["geometry"], baseline_of(r["config"]), r["context"],
                            r["batch"]))
        out.append(dict(r, vs_same=r["tok_per_s"] / base["tok_per_s"] if base else None,
                        mark=_mark(r, base)))
    return sorted(out, key=lambda r: (r["geometry"], r["context"], r["batch"],
                                      config_order(r["config"])))


def serve_ratios(data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in data["rows"]:
        if r["stage"] != "serve":
            continue
        base = _find(data, ("serve", r["geometry"], baseline_of(r["config"]), r["concurrency"]))
        ok = base is not None and r.get("p50_ttft_ms") and base.get("p50_ttft_ms")
        out.append(dict(r, ttft_vs_same=base["p50_ttft_ms"] / r["p50_ttft_ms"] if ok else None,
                        rps_vs_same=(r["request_throughput"] / base["request_throughput"]
                                     if ok and base.get("request_throughput") else None),
                        mark=_mark(r, base)))
    return sorted(out, key=lambda r: (r["geometry"], r["concurrency"], config_order(r["config"])))


def markdown(data: dict[str, Any], geometries: dict[str, str] | None = None) -> str:
    """The report: runs, then one table per stage that has rows. ``geometries``: a description
    per geometry name."""
    meta = data.get("meta") or {}
    lines = [f"# End to end at real models' geometries: SPARGE vs FLASH_ATTN — "
             f"{meta.get('device', '?')}, {meta.get('date', '?')}", ""]
    lines += ["Runs (the `run` column of each table):", ""]
    for i, run in enumerate(data["runs"]):
        lines.append(f"- {i}: `{run.get('command', '?')}` — {run.get('device', '?')}, "
                     f"{run.get('date', '?')}; vllm {run.get('vllm', '?')}, torch "
                     f"{run.get('torch', '?')}, triton {run.get('triton', '?')}")
    lines += ["", "Models are random-weight (vLLM `load_format=\"dummy\"`) at each geometry "
              "but the `*_real` ones (the converted pretrained model, prompted with held-out "
              "documents; `calibrated` serves its thresholds file, `calibrated_nopv` the same "
              "file with the PV skip off), so "
              "attention has no structure: block sparsity is set by the backend's `topk` option "
              "(`SPARGE@64:topkF` keeps the fraction F of each query block's valid key blocks, "
              "with a thresholds file whose similarity gate passes every block; sink and "
              "diagonal blocks are always kept, so measured sparsity is a little below 1 - F). "
              "`topk1.0` is the sparse path at 0% block sparsity; `untuned` runs the published "
              "untuned thresholds; `defaults` the backend's default settings (no thresholds "
              "file: every layer dense); `dense` is `mode: dense`. Ratios are speed-ups over "
              "FLASH_ATTN on the same page size (baseline time / this time; for throughput this / "
              "baseline); † marks a baseline from another run.", ""]
    for name, text in (geometries or {}).items():
        if any(r["geometry"] == name for r in data["rows"]):
            lines.append(f"- `{name}`: {text}")
    ttft = ttft_ratios(data)
    if ttft:
        lines += ["", "## TTFT (`ttft`)", "",
                  "One prompt, `max_tokens=1`, median of the repeats after a warm-up; chunked "
                  "prefill, prefix caching off.", "",
                  "| geometry | length | config | TTFT s | vs FLASH_ATTN, same page | "
                  "vs FLASH_ATTN@16 | block sparsity | run |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in ttft:
            lines.append(f"| {r['geometry']} | {r['length']} | {r['config']} | "
                         f"{r['ttft_s']:.4f} | {_x(r['vs_same'])}{r['mark']} | {_x(r['vs_16'])} | "
                         f"{_f(r.get('block_sparsity'))} | {r['run']} |")
        lines += round_lines(data, ttft)
    att = attention_rows(data)
    if att:
        lines += ["", "## Attention's share and the ceiling", "",
                  "One more prefill of each profiled length under `torch.profiler`, same run. "
                  "`a` = the baseline's attention kernel time over its TTFT (and over its summed "
                  "GPU kernel time); `k` = baseline attention ms / SPARGE's (predictor included); "
                  "ceiling = 1 / (1 - a + a/k), the TTFT speed-up if only attention changed; "
                  "measured = the TTFT speed-up of the table above.", "",
                  "| geometry | length | config | baseline | attention ms (baseline / SPARGE) | "
                  "a of TTFT | a of GPU time | k | ceiling | ceiling (GPU time) | measured |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in att:
            lines.append(f"| {r['geometry']} | {r['length']} | {r['config']} | {r['baseline']} | "
                         f"{r['base_attention_ms']:.1f} / {r['attention_ms']:.1f} | {r['a']:.3f} | "
                         f"{r['a_gpu']:.3f} | {r['k']:.2f} | {_x(r['ceiling'])} | "
                         f"{_x(r['ceiling_gpu'])} | {_x(r['measured'])}{r['mark']} |")
    prof = [r for r in data["rows"] if r["stage"] == "ttft" and "host_ms" in r.get("profile", {})]
    if prof:
        lines += ["", "## Profiled prefills: GPU and host", "",
                  "The profiled prefill of each row: its wall time under the profiler, the summed "
                  "GPU kernel time, and the host's CPU ops (aten and custom ops and CUDA runtime "
                  "calls, self time; synchronisations and the Python between ops are not "
                  "counted): their calls, time and the three largest. Host speed: the host "
                  "µs per call of the compiled model graphs (`CompiledFxGraph`, the same code "
                  "under every backend) and, in brackets, that over the baseline's (same "
                  "geometry and length): a row well above 1.00x ran on a slower host than its "
                  "baseline (another process's load), and where the prefill is bound by the "
                  "host its TTFT ratio carries that slowdown, not the backend's. Where the "
                  "GPU is the bound instead (`Command Buffer Full` among the largest host ops: "
                  "the host waits for room in the GPU's queue), a graph call can hold such a "
                  "wait, and a row that issues more launches waits more: the ratio is then no "
                  "measure of the host. Load: the host's 1-minute load average when the row was "
                  "measured.",
                  "", "| geometry | length | config | wall ms | GPU kernel ms | attention ms | "
                  "host ops | host op ms | host speed: graph µs a call | load | largest host "
                  "ops (calls, ms) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        diffs: list[str] = []
        for r in sorted(prof, key=ttft_order):
            p = r["profile"]
            top = "; ".join(f"`{n[:40]}` ({c}, {ms:.2f})" for n, c, ms in p["host_top"][:3])
            base = _find(data, ("ttft", r["geometry"], baseline_of(r["config"]), r["length"]))
            us = graph_host_us(p)
            b_us = graph_host_us(base["profile"]) if base and "profile" in base else None
            speed = "—" if us is None else (f"{us:.0f}" + (f" ({us / b_us:.2f}x)" if b_us
                                                           else ""))
            lines.append(f"| {r['geometry']} | {r['length']} | {r['config']} | "
                         f"{p['wall_ms']:.1f} | {p['gpu_ms']:.1f} | {p['attention_ms']:.1f} | "
                         f"{p['host_calls']} | {p['host_ms']:.1f} | {speed} | "
                         f"{_f(r.get('host_load'), 1)} | {top} |")
            if base and base["config"] != r["config"] and "profile" in base:
                for name, bc, c, bms, ms in host_op_diff(p, base["profile"]):
                    diffs.append(f"| {r['geometry']} | {r['length']} | {r['config']} | "
                                 f"`{name[:60]}` | {bc} → {c} | {bms:.2f} → {ms:.2f} |")
        if diffs:
            lines += ["", "Host ops whose call count differs from the baseline's in the same "
                      "profiled prefill (the six largest changes in host time):", "",
                      "| geometry | length | config | host op | calls (baseline → this) | "
                      "ms (baseline → this) |", "|---|---|---|---|---|---|", *diffs]
    hosts = []
    for r in sorted(prof, key=ttft_order):
        base = _find(data, ("ttft", r["geometry"], baseline_of(r["config"]), r["length"]))
        if ("host_profile" in r and base and base["config"] != r["config"]
                and "host_profile" in base):
            hosts += [f"| {r['geometry']} | {r['length']} | {r['config']} | `{fn[:70]}` | "
                      f"{calls:g} | {bms:.3f} → {ms:.3f} |"
                      for fn, calls, bms, ms in host_function_diff(r["host_profile"],
                                                                   base["host_profile"])]
    if hosts:
        lines += ["", "Host (Python) time by function against the baseline (`--host-profile N`: "
                  "N more prefills under `cProfile`, cumulative ms per prefill; the profiler "
                  "inflates small calls, so compare the two columns, not absolute times): the "
                  "largest changes among the functions both profiles list.", "",
                  "| geometry | length | config | function | calls a prefill | ms (baseline → "
                  "this) |", "|---|---|---|---|---|---|", *hosts]
    dec = decode_ratios(data)
    if dec:
        lines += ["", "## Decode (`decode`)", "",
                  "A batch of distinct prompts of `context` tokens (prefix-cached), CUDA graphs "
                  "on: tokens/s of the decode steps (the batch with N+1 new tokens minus with 1, "
                  "median of the repeats) and inter-token latency (ms per decode step).", "",
                  "| geometry | context | batch | config | tokens/s | ITL ms | vs FLASH_ATTN, "
                  "same page | run |", "|---|---|---|---|---|---|---|---|"]
        for r in dec:
            lines.append(f"| {r['geometry']} | {r['context']} | {r['batch']} | {r['config']} | "
                         f"{r['tok_per_s']:.0f} | {r['itl_ms']:.2f} | "
                         f"{_x(r['vs_same'], 3)}{r['mark']} | {r['run']} |")
    srv = serve_ratios(data)
    if srv:
        lines += ["", "## Mixed load (`serve`: `vllm serve` + `vllm bench serve`)", "",
                  "Random dataset (input lengths uniform in input x [1 - r, 1 + r]), "
                  "`--max-concurrency` requests at a time; TPOT excludes the first token.", "",
                  "| geometry | concurrency | config | input / output | done / failed | req/s | "
                  "TTFT p50 ms | TTFT p99 ms | TPOT mean ms | TPOT p99 ms | TTFT p50 vs base | "
                  "req/s vs base | block sparsity | run |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in srv:
            lines.append(
                f"| {r['geometry']} | {r['concurrency']} | {r['config']} | {r['input_len']} "
                f"± {r['range_ratio']:.0%} / {r['output_len']} | {r['completed']} / "
                f"{r['failed']} | {_f(r.get('request_throughput'), 3)} | "
                f"{_f(r.get('p50_ttft_ms'), 1)} | {_f(r.get('p99_ttft_ms'), 1)} | "
                f"{_f(r.get('mean_tpot_ms'), 2)} | {_f(r.get('p99_tpot_ms'), 2)} | "
                f"{_x(r['ttft_vs_same'])}{r['mark']} | {_x(r['rps_vs_same'], 3)} | "
                f"{_f(r.get('block_sparsity'))} | {r['run']} |")
    if data["failed"]:
        lines += ["", "## Did not run", ""]
        lines += [f"- {f['stage']} {f['geometry']} {f['config']} (run {f['run']}): {f['why']}"
                  for f in data["failed"]]
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: str) -> bool:
    """TTFT vs prompt length per configuration, one column per geometry, with the speed-up over
    same-page FLASH_ATTN below. False (nothing written) without TTFT rows or matplotlib."""
    rows = ttft_ratios(data)
    if not rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    geos = sorted({r["geometry"] for r in rows})
    configs = sorted({r["config"] for r in rows}, key=config_order)
    palette = plt.get_cmap("tab10" if len(configs) <= 10 else "tab20")
    colors = {c: palette(i % palette.N) for i, c in enumerate(configs)}
    fig, axes = plt.subplots(2, len(geos), figsize=(5.5 * len(geos), 7), squeeze=False)
    for col, geo in enumerate(geos):
        top, bottom = axes[0][col], axes[1][col]
        for config in [c for c in colors if any(r["config"] == c for r in rows
                                                if r["geometry"] == geo)]:
            rs = [r for r in rows if r["geometry"] == geo and r["config"] == config]
            style = dict(fmt="s--" if config.startswith("FLASH_ATTN") else "o-",
                         color=colors[config])
            fmt = style.pop("fmt")
            top.plot([r["length"] for r in rs], [r["ttft_s"] for r in rs], fmt, label=config,
                     **style)
            rs = [r for r in rs if r["vs_same"] is not None]
            if rs and not config.startswith("FLASH_ATTN"):
                bottom.plot([r["length"] for r in rs], [r["vs_same"] for r in rs], fmt, **style)
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("prompt length (tokens)")
            ax.grid(True, alpha=0.3)
        top.set_yscale("log")
        top.set_ylabel("TTFT (s)")
        top.set_title(geo)
        top.legend(fontsize=7)
        bottom.axhline(1.0, color="gray", lw=0.8)
        bottom.set_ylabel("TTFT speed-up vs FLASH_ATTN, same page")
    fig.suptitle(f"TTFT, {(data.get('meta') or {}).get('device', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(data: dict[str, Any], out_dir: str,
              geometries: dict[str, str] | None = None) -> list[str]:
    """Writes ``e2e.json``, ``e2e.md`` and (with TTFT rows) ``e2e.png`` into ``out_dir``
    (the JSON through a temporary file, so that an interrupted write keeps the previous one)."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, RESULTS_NAME)
    tmp = base + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, base + ".json")
    with open(base + ".md", "w") as f:
        f.write(markdown(data, geometries))
    written = [base + ".json", base + ".md"]
    if plot(data, base + ".png"):
        written.append(base + ".png")
    return written
