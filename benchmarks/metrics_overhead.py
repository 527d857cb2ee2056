"""Cost of the metrics path per forward step, relative to a 32K prefill's sparse attention (GPU).

    python benchmarks/metrics_overhead.py                  # 32K, 32 layers, bf16, 32/8 heads, D 128
    python benchmarks/metrics_overhead.py --device cpu --seq-len 512 --layers 2 --reps 2  # smoke

One "step" = the sparse prefill attention of one 32K-token request in every layer (the predictor
and the block-sparse kernel, top-k at --topk, default 0.1 = 90 % block sparsity, so the attention
is fast and the overhead fraction conservative). Two variants, interleaved, same inputs:

- baseline: ``sparge_paged_prefill(..., stats=None)`` per layer;
- metrics: what the backend does with metrics on: ``maybe_flush()`` once, then per layer
  ``kernel_stats(layer)`` passed to the kernels (their device-side counter adds), ``count_prefill``,
  ``start_timing`` (every ``--sample-every``-th call: CUDA events around predictor and kernel),
  with the background writer thread exporting to a temp directory.

Prints one JSON line: device, date, versions, median step times, the overhead in % of the
baseline step (the issue's budget: <= 1 % of TTFT; attention alone is a lower bound on TTFT, so
this ratio is an upper bound), and the host-side cost of the metric calls alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--topk", type=float, default=0.1)
    ap.add_argument("--sample-every", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

    import torch
    import triton

    from sparge_serve.kernels import (
        PrefillBatch,
        num_blocks,
        predict_block_map,
        sparge_paged_prefill,
        sparse_paged_attention,
    )
    from sparge_serve.metrics import SpargeStats

    dev = torch.device(args.device)
    is_cuda = dev.type == "cuda"
    dtype = torch.bfloat16
    torch.manual_seed(0)
    n, hq, hkv, d, page = args.seq_len, args.heads, args.kv_heads, args.head_dim, args.page_size
    n_pages = num_blocks(n, page)
    q = torch.randn(n, hq, d, device=dev, dtype=dtype)
    key_cache = torch.randn(n_pages, page, hkv, d, device=dev, dtype=dtype)
    value_cache = torch.randn_like(key_cache)
    batch = PrefillBatch(
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
        block_table=torch.arange(n_pages, dtype=torch.int32, device=dev)[None],
        max_query_len=n, max_seq_len=n)
    th = {name: torch.full((hq,), v, dtype=torch.float32, device=dev)
          # NOTE: simthreshd1 -1 marks every block similar, so top-k alone decides and the
          # step really is ~(1 - topk) sparse (with 0.6, random keys are non-similar: all forced).
          for name, v in (("sim", -1.0), ("cdf", 0.98), ("pv", 20.0))}
    out = torch.empty_like(q)
    scale = d ** -0.5
    kw = dict(topk=args.topk, check_finite=False)

    def attention(stats_row=None, timing=None):
        if timing is None:
            sparge_paged_prefill(q, key_cache, value_cache, batch, scale, th["sim"], th["cdf"],
                                 th["pv"], out, stats=stats_row, pv_skip=True, **kw)
            return
        bm = predict_block_map(q, key_cache, batch, scale, th["sim"], th["cdf"], args.topk,
                               stats_row, check_finite=False)
        timing.predictor_done()
        sparse_paged_attention(q, key_cache, value_cache, batch, bm, scale, th["pv"], out,
                               stats_row, check_finite=False, pv_skip=True)
        timing.done()

    sink = tempfile.mkdtemp(prefix="sparge-metrics-bench-")
    stats = SpargeStats(args.layers, dev, "bench", sink_dir=sink, sample_every=args.sample_every,
                        write_interval_s=1.0)

    def step_baseline():
        for _ in range(args.layers):
            attention()

    def step_metrics():
        stats.maybe_flush()
        for layer in range(args.layers):
            timing = stats.start_timing()
            stats.count_prefill(layer, n, 0)
            attention(stats.kernel_stats(layer), timing)

    def sync():
        if is_cuda:
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t0) * 1e3

    for _ in range(args.warmup):
        timed(step_baseline)
        timed(step_metrics)
    base, met = [], []
    for _ in range(args.reps):  # interleaved, so clock and thermal drift hit both alike
        base.append(timed(step_baseline))
        met.append(timed(step_metrics))

    # Host cost of the metric calls alone (no kernels): what the model thread pays per step.
    host_reps = 200
    t0 = time.perf_counter()
    for _ in range(host_reps):
        stats.maybe_flush()
        for layer in range(args.layers):
            timing = stats.start_timing()
            stats.count_prefill(layer, n, 0)
            stats.kernel_stats(layer)
            if timing is not None:
                timing.predictor_done()
                timing.done()
    host_us = (time.perf_counter() - t0) / host_reps * 1e6
    sync()
    stats.maybe_flush()
    stats.close()
    shutil.rmtree(sink, ignore_errors=True)

    base_ms, met_ms = statistics.median(base), statistics.median(met)
    snap = stats.snapshot()
    valid, kept = (sum(r[i] for r in snap["blocks"]) for i in (0, 1))
    print(json.dumps({
        "bench": "metrics_overhead",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev) if is_cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "vllm": _version("vllm"),
        "cuda": torch.version.cuda, "sparge_serve": _version("sparge-serve"),
        "seq_len": n, "layers": args.layers, "heads": hq, "kv_heads": hkv, "head_dim": d,
        "topk": args.topk, "sample_every": args.sample_every, "reps": args.reps,
        "baseline_step_ms": round(base_ms, 3), "metrics_step_ms": round(met_ms, 3),
        "overhead_pct": round((met_ms - base_ms) / base_ms * 100, 3),
        "baseline_step_ms_iqr": _iqr(base), "metrics_step_ms_iqr": _iqr(met),
        "host_metrics_us_per_step": round(host_us, 2),
        "host_metrics_pct": round(host_us / (base_ms * 1e3) * 100, 4),
        "counted_block_sparsity": round(1 - kept / valid, 4) if valid else None,
        "timing_samples": sum(snap["attention_hist"][0]),
    }))


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _iqr(xs: list[float]) -> list[float]:
    qs = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return [round(qs[0], 3), round(qs[2], 3)]


if __name__ == "__main__":
    main()
