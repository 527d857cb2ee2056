"""Host (CPU) time per call of the sparse prefill path against FA3's, on the GPU machine.

    python benchmarks/host_overhead.py --lengths 8192 32768 --out benchmarks/results/host_overhead

A small model's prefill is host-bound at short contexts (``bench_ttft.py --profile-lengths``: at
8K, 1.5-1.7 ms of GPU kernels in a 25 ms TTFT), so the Python and launch cost of one layer's
attention call matters there. For each path, host µs is the CPU time of one call issued with
the GPU idle (the median of ``--calls``), GPU µs the wall time of one call to its end: where the
two are close, the call is host-bound. Paths (thresholds bound, ``check_finite=False``, a
stats tensor for the block counters): ``fa3`` (vLLM's ``flash_attn_varlen_func`` over the same
paged cache), ``predictor``, ``attention``, ``two_kernel`` (``sparge_paged_prefill``: its
checks, the step's plan and both stages), ``layer`` (what the backend runs per layer:
``run_prefill`` on a plan made once, ``plan_prefill`` per step), and in head chunks under the
1.5% memory budget with no floor ``two_kernel_chunked``, ``layer_chunked`` and ``fa3_chunked``;
``fa3_attention`` is the FA3 attention path whole (``attention_kernel: fa3``). Shapes: the bench
model's 32 q / 8 KV heads, or ``--heads 8 2`` for the tiny test model's.

``--profile`` also writes ``<out>_profile.txt``: a cProfile table of the chunked paths at the
first length, and each Triton kernel's host µs per launch through ``JITFunction`` against a
direct launch of its compiled kernel (the part of a launch that Triton's Python adds).
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import functools
import io
import json
import pstats
import statistics
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
from sparge_serve.kernels.plan import plan_prefill  # noqa: E402
from sparge_serve.kernels.prefill import run_prefill  # noqa: E402


def per_call(fn, calls: int) -> tuple[float, float]:
    """(host µs, GPU µs) of one call of ``fn``, medians over ``calls``: the CPU time to issue
    it with the GPU idle, and the wall time to its end on the GPU."""
    for _ in range(3):
        fn()
    host, wall = [], []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    return statistics.median(host) * 1e6, statistics.median(wall) * 1e6


def profile_paths(paths: dict, names: tuple[str, ...], calls: int) -> str:
    """cProfile tables (by own time) of ``calls`` calls of each path in ``names``, each issued
    with the GPU idle."""
    text = []
    for name in names:
        if name not in paths:
            continue
        fn = paths[name]
        fn()
        prof = cProfile.Profile()
        for _ in range(calls):
            torch.cuda.synchronize()
            prof.enable()
            fn()
            prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(35)
        text.append(f"## {name}: {calls} calls, by own time\n\n{buf.getvalue()}")
    return "\n".join(text)


def launch_costs(fn, calls: int) -> list[dict]:
    """Host µs per launch of each Triton kernel that ``fn`` launches (its first launch's
    arguments): through ``JITFunction`` (``kernel[grid](...)``) and through the launcher the
    kernels use (``sparge_serve.kernels.launch``: the compiled kernel's own launcher)."""
    from sparge_serve.kernels.launch import Launcher

    seen = {}
    launcher_run = Launcher.run

    def spy(self, grid, args, kwargs):
        seen.setdefault(self, (grid, args, kwargs))
        return launcher_run(self, grid, args, kwargs)

    Launcher.run = spy
    try:
        fn()
    finally:
        Launcher.run = launcher_run
    torch.cuda.synchronize()
    rows = []
    for launcher, (grid, args, kwargs) in seen.items():
        ways = {"jit": functools.partial(launcher.fn[grid], *args, **kwargs),
                "direct": functools.partial(launcher.run, grid, args, kwargs)}
        row = dict(kernel=launcher.fn.fn.__name__, grid=list((*grid, 1, 1)[:3]))
        for way, launch in ways.items():
            launch()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                launch()
            row[f"{way}_us"] = (time.perf_counter() - t0) / calls * 1e6
            torch.cuda.synchronize()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def gpu_timeline(fn, reps: int = 5) -> dict:
    """``reps`` back-to-back calls of ``fn`` under the torch profiler: per call, the span from
    the first kernel's start to the last one's end, the kernels' summed time (the rest of the
    span: the GPU idle, waiting for launches) and the kernel table."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    start = min(e.time_range.start for e in kernels)
    end = max(e.time_range.end for e in kernels)
    busy = sum(e.time_range.end - e.time_range.start for e in kernels)
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=14)
    return dict(span_us=(end - start) / reps, kernels_us=busy / reps,
                launches=len(kernels) / reps, table=table)


def run_length(length: int, calls: int, topk: float | None) -> tuple[list[dict], dict]:
    hq = bench_kernels.HQ
    q, kc, vc, batch, _, _ = bench_kernels.make_inputs(length, 64, structured=False)
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5
    # top-k alone (every query block similar) keeps exactly that fraction, as bench_kernels.py's
    sim, cdf, pv = (torch.full((hq,), x, device="cuda")
                    for x in ((0.6, 0.98, 50.0) if topk is None else (-1.0, 1.0, 50.0)))
    stats = torch.zeros(3, dtype=torch.int64, device="cuda")
    bm = predict_block_map(q, kc, batch, scale, sim, cdf, topk, stats, check_finite=False)
    paths = {
        "predictor": lambda: predict_block_map(q, kc, batch, scale, sim, cdf, topk, stats,
                                               check_finite=False),
        "attention": lambda: sparse_paged_attention(q, kc, vc, batch, bm, scale, pv, out, stats,
                                                    check_finite=False, pv_skip=False),
        "two_kernel": lambda: sparge_paged_prefill(q, kc, vc, batch, scale, sim, cdf, pv, out,
                                                   topk, stats, check_finite=False,
                                                   pv_skip=False),
    }
    # head chunks under the 1.5% budget with no floor (the bounded-memory setting)
    chunked = dict(map_budget=MAP_BUDGET, map_floor=0)
    paths["two_kernel_chunked"] = lambda: sparge_paged_prefill(
        q, kc, vc, batch, scale, sim, cdf, pv, out, topk, stats, check_finite=False,
        pv_skip=False, **chunked)
    # the backend's per-layer call: the step's plan made once
    geometry = (q.shape[1], kc.shape[2], q.shape[2], q.dtype, kc.shape[1], q.device, topk)
    for name, budget, floor in (("layer", MAP_BUDGET, None), ("layer_chunked", MAP_BUDGET, 0)):
        plan = plan_prefill(batch, *geometry, budget, "triton", floor)
        paths[name] = lambda plan=plan: run_prefill(plan, q, kc, vc, scale, sim, cdf, pv, out,
                                                    stats)
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
                q, kc, vc, batch, scale, sim, cdf, pv, out, topk, stats, check_finite=False,
                pv_skip=False, attention="fa3", **kw)
    rows = []
    for name, fn in paths.items():
        host, gpu = per_call(fn, calls)
        rows.append(dict(length=length, heads=[hq, bench_kernels.HKV], path=name,
                         topk=topk, host_us=host, gpu_us=gpu))
        print(json.dumps(rows[-1]), flush=True)
    return rows, paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--topk", type=float, default=None,
                    help="keep this fraction of the blocks (default: the untuned thresholds)")
    ap.add_argument("--profile", action="store_true",
                    help="also write <out>_profile.txt (cProfile, Triton launch costs)")
    ap.add_argument("--out", default="benchmarks/results/host_overhead")
    args = ap.parse_args()
    bench_kernels.HQ, bench_kernels.HKV = args.heads
    import triton
    import vllm

    rows, launches = [], []
    for i, n in enumerate(args.lengths):
        length_rows, paths = run_length(n, args.calls, args.topk)
        rows += length_rows
        if args.profile and i == 0:
            names = ("fa3_chunked", "two_kernel_chunked", "fa3_attention")
            text = profile_paths(paths, names, 20)
            for name in names + ("fa3",):
                if name in paths:
                    t = gpu_timeline(paths[name])
                    text += (f"\n## {name}: GPU timeline of 5 back-to-back calls, per call: span "
                             f"{t['span_us']:.0f} µs, kernels {t['kernels_us']:.0f} µs, "
                             f"{t['launches']:.0f} launches\n\n{t['table']}\n")
                    print(name, {k: v for k, v in t.items() if k != "table"}, flush=True)
            for name in names[:2]:
                if name in paths:
                    launches += [dict(length=n, path=name, **r)
                                 for r in launch_costs(paths[name], args.calls)]
            table = ["| length | path | kernel | grid | JITFunction µs | direct µs |",
                     "|---|---|---|---|---|---|"]
            table += [f"| {r['length']} | {r['path']} | {r['kernel']} | {r['grid']} | "
                      f"{r['jit_us']:.1f} | {r['direct_us']:.1f} |" for r in launches]
            with open(args.out + "_profile.txt", "w") as f:
                f.write("\n".join(table) + "\n\n" + text)
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                torch=torch.__version__, triton=triton.__version__, vllm=vllm.__version__,
                command="python benchmarks/host_overhead.py " + " ".join(sys.argv[1:]))
    fa3 = {r["length"]: r["host_us"] for r in rows if r["path"] == "fa3"}
    lines = [f"# Host time per attention call — {meta['device']}, {meta['date']}", "",
             f"`{meta['command']}` — torch {meta['torch']}, triton {meta['triton']}, vllm "
             f"{meta['vllm']}; {args.heads[0]} q / {args.heads[1]} KV heads, D 128, bf16, "
             "64-token pages, "
             + (f"top-k {args.topk}" if args.topk else "untuned default thresholds")
             + f". Medians of {args.calls} calls, each issued with the GPU idle: host µs "
             "is the CPU time to issue it, GPU µs the wall time to its end (close to the host "
             "time: host-bound).", "",
             "| length | path | host µs | host / FA3 | GPU µs |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = r["host_us"] / fa3[r["length"]] if r["length"] in fa3 else float("nan")
        lines.append(f"| {r['length']} | {r['path']} | {r['host_us']:.0f} | {ratio:.2f}x | "
                     f"{r['gpu_us']:.0f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=rows, launches=launches), f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
