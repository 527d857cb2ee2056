"""Host (CPU) time per call of the sparse prefill path against FA3's, on the GPU machine.

    python benchmarks/host_overhead.py --lengths 8192 32768 --out benchmarks/results/host_overhead

A small model's prefill is host-bound at short contexts (``bench_ttft.py --profile-lengths``: at
8K, 1.5-1.7 ms of GPU kernels in a 25 ms TTFT), so the Python and launch cost of one layer's
attention call matters there. For each path, ``--calls`` back-to-back calls run without a
synchronisation (the GPU queue holds them): CPU time per call is the host overhead. A
synchronised run then gives the GPU time per call. Paths, as the backend calls them (thresholds
bound, ``check_finite=False``, a stats tensor for the block counters): ``fa3`` (vLLM's
``flash_attn_varlen_func`` over the same paged cache), ``predictor``, ``attention``,
``two_kernel`` (predictor + attention), ``fused``, and in head chunks under the 1.5% memory
budget with no floor ``two_kernel_chunked`` and ``fa3_chunked``; ``fa3_attention`` is the FA3
attention path whole (``attention_kernel: fa3``). Shapes: the bench model's 32 q / 8 KV heads,
or ``--heads 8 2`` for the tiny test model's.
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels  # noqa: E402

from sparge_serve.kernels import (  # noqa: E402
    MAP_BUDGET,
    predict_block_map,
    sparge_paged_prefill,
    sparse_paged_attention,
)


def per_call(fn, calls: int) -> tuple[float, float]:
    """(host µs, GPU µs) per call of ``fn``: CPU time of ``calls`` unsynchronised calls, then
    wall time of as many with a synchronisation at the end."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return host / calls * 1e6, (time.perf_counter() - t0) / calls * 1e6


def run_length(length: int, calls: int) -> list[dict]:
    hq = bench_kernels.HQ
    q, kc, vc, batch, _, _ = bench_kernels.make_inputs(length, 64, structured=False)
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5
    sim, cdf, pv = (torch.full((hq,), x, device="cuda") for x in (0.6, 0.98, 50.0))
    stats = torch.zeros(3, dtype=torch.int64, device="cuda")
    bm = predict_block_map(q, kc, batch, scale, sim, cdf, None, stats, check_finite=False)
    paths = {
        "predictor": lambda: predict_block_map(q, kc, batch, scale, sim, cdf, None, stats,
                                               check_finite=False),
        "attention": lambda: sparse_paged_attention(q, kc, vc, batch, bm, scale, pv, out, stats,
                                                    check_finite=False, pv_skip=False),
        "two_kernel": lambda: sparge_paged_prefill(q, kc, vc, batch, scale, sim, cdf, pv, out,
                                                   None, stats, check_finite=False,
                                                   pv_skip=False),
        "fused": lambda: sparge_paged_prefill(q, kc, vc, batch, scale, sim, cdf, pv, out, None,
                                              stats, check_finite=False, pv_skip=False,
                                              fused=True),
    }
    # head chunks under the 1.5% budget with no floor (the #3 memory bar's setting)
    chunked = dict(map_budget=MAP_BUDGET, map_floor=0)
    paths["two_kernel_chunked"] = lambda: sparge_paged_prefill(
        q, kc, vc, batch, scale, sim, cdf, pv, out, None, stats, check_finite=False,
        pv_skip=False, **chunked)
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        pass
    else:
        paths = {"fa3": lambda: flash_attn_varlen_func(
            q, kc, vc, max_seqlen_q=length, cu_seqlens_q=batch.query_start_loc,
            max_seqlen_k=length, seqused_k=batch.seq_lens, softmax_scale=scale, causal=True,
            block_table=batch.block_table, out=out, fa_version=3), **paths}
        for name, kw in (("fa3_attention", dict(map_budget=None)), ("fa3_chunked", chunked)):
            paths[name] = lambda kw=kw: sparge_paged_prefill(
                q, kc, vc, batch, scale, sim, cdf, pv, out, None, stats, check_finite=False,
                pv_skip=False, attention="fa3", **kw)
    rows = []
    for name, fn in paths.items():
        host, gpu = per_call(fn, calls)
        rows.append(dict(length=length, heads=[hq, bench_kernels.HKV], path=name,
                         host_us=host, gpu_us=gpu))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--out", default="benchmarks/results/host_overhead")
    args = ap.parse_args()
    bench_kernels.HQ, bench_kernels.HKV = args.heads
    import triton
    import vllm

    rows = [r for n in args.lengths for r in run_length(n, args.calls)]
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                torch=torch.__version__, triton=triton.__version__, vllm=vllm.__version__,
                command="python benchmarks/host_overhead.py " + " ".join(sys.argv[1:]))
    fa3 = {r["length"]: r["host_us"] for r in rows if r["path"] == "fa3"}
    lines = [f"# Host time per attention call — {meta['device']}, {meta['date']}", "",
             f"`{meta['command']}` — torch {meta['torch']}, triton {meta['triton']}, vllm "
             f"{meta['vllm']}; {args.heads[0]} q / {args.heads[1]} KV heads, D 128, bf16, "
             "64-token pages, untuned default thresholds. Host µs: CPU time per call of "
             f"{args.calls} unsynchronised calls; GPU µs: wall time per call with a final "
             "synchronisation (the larger of the two bounds a layer's attention).", "",
             "| length | path | host µs | host / FA3 | GPU µs |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = r["host_us"] / fa3[r["length"]] if r["length"] in fa3 else float("nan")
        lines.append(f"| {r['length']} | {r['path']} | {r['host_us']:.0f} | {ratio:.2f}x | "
                     f"{r['gpu_us']:.0f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
