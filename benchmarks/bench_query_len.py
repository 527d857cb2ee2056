"""Short new-token chunks on a long cached context: sparse path vs FA3 (GPU), for min_sparse_query_len.

    python benchmarks/bench_query_len.py --out benchmarks/results/query_len \
        [--contexts 49152 131072] [--query-lens 64 128 256 512 1024 2048 4096 8192] \
        [--attention triton fa3] [--kv-dtype bf16|fp8] [--profile]
    python benchmarks/bench_query_len.py --report OUT.json --out OUT  # the table again

A follow-up turn or a prefix-cache hit adds ``q`` new tokens to a context of ``ctx`` tokens (the
queries are its last ``q`` positions). The sparse path pays the predictor's two passes over the
*whole* context's keys whatever ``q`` is, so for small ``q`` dense attention must win; the
backend's ``min_sparse_query_len`` (default 512) keeps such requests dense. This measures where
the sparse path starts to pay, at 50% and 80% block sparsity (top-k, exact) and with every block
kept (dense configuration), against FA3 (``flash_attn_varlen_func`` on the same paged cache) in
the same run. Batch 1, bf16, head dim 128, 32 query / 8 KV heads, 64-token pages (the backend's).
Each sparse row is one ``sparge_paged_prefill`` call as the backend makes it (predictor, then
the attention, in head chunks under the default ``map_budget``), with ``--attention``'s kernels:
``triton`` (the block-sparse kernel) and ``fa3`` (FlashAttention-3 over each row's kept blocks;
columns ``+fa3``), and ``fa3_call`` / ``fa3_nocall``: the FA3 path with the rows that keep every
block in one call of their own, or in the launches (``fa3.DENSE_CALL_LAUNCHES`` picks between
the two; a query length equal to the context is a whole prompt). Query lengths above a context
are left out. ``--planned`` times instead what the backend pays in each layer: the
plan (``plan.plan_prefill``: sub-batch, head chunks, tables) is built once per engine step and
shared by every layer, so each timed call is ``prefill.run_prefill`` over a prebuilt plan, with
no argument checks. ``--kv-dtype fp8`` runs everything over an fp8 cache and query (per-tensor
scales, as vLLM's ``--kv-cache-dtype fp8``) against FA3's fp8 forward on the same cache
(FLASH_ATTN-fp8); a chunk of an engine's chunked prefill (e.g. 16384 new tokens on a 131072-token
context) is one such case. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json

import torch
import triton
from bench_kernels import fa3_descales, fp8_inputs

from sparge_serve.kernels import PrefillBatch, num_blocks, sparge_paged_prefill
from sparge_serve.kernels.plan import plan_prefill
from sparge_serve.kernels.prefill import run_prefill

HQ, HKV, D, PAGE = 32, 8, 128, 64
DEVICE = "cuda"


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def case(ctx: int, q_len: int, seed: int = 0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    n_pages = num_blocks(ctx, PAGE)
    kv = torch.randn(n_pages, PAGE, HKV, 2 * D, device=DEVICE, generator=g).bfloat16()
    kc, vc = kv.split(D, dim=-1)
    q = torch.randn(q_len, HQ, D, device=DEVICE, generator=g).bfloat16()
    perm = torch.randperm(n_pages, device=DEVICE, generator=g).to(torch.int32)
    batch = PrefillBatch(
        query_start_loc=torch.tensor([0, q_len], dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor([ctx], dtype=torch.int32, device=DEVICE),
        block_table=perm[None], max_query_len=q_len, max_seq_len=ctx,
    )
    return q, kc, vc, batch


CONFIGS = (("dense", 1.0, None), ("topk_s0.5", -1.0, 0.5), ("topk_s0.8", -1.0, 0.2))
SUFFIX = {"triton": "", "fa3": "+fa3", "fa3_call": "+fa3_call", "fa3_nocall": "+fa3_nocall"}
"""Row keys and table columns per attention path: ``triton``, ``fa3`` (the FA3 path as the
backend runs it), and the FA3 path with the dense rows' own call forced on (``fa3_call``) or
off (``fa3_nocall``) whatever ``fa3.DENSE_CALL_LAUNCHES`` picks, to measure that rule."""
DENSE_CALL_LAUNCHES = {"fa3_call": 1, "fa3_nocall": 1 << 30}


@contextlib.contextmanager
def dense_call(path: str):
    """``fa3.DENSE_CALL_LAUNCHES`` as ``path`` forces it, for the plans made inside."""
    import sparge_serve.kernels.fa3 as fa3_path

    saved = fa3_path.DENSE_CALL_LAUNCHES
    fa3_path.DENSE_CALL_LAUNCHES = DENSE_CALL_LAUNCHES.get(path, saved)
    try:
        yield
    finally:
        fa3_path.DENSE_CALL_LAUNCHES = saved


def kernel_table(fn, calls: int = 3) -> str:
    """GPU time per kernel over ``calls`` calls of ``fn`` (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12)


def measure(ctx: int, q_len: int, fa3, attention: list[str], kv_dtype: str,
            profile: bool = False, planned: bool = False) -> dict:
    hv = lambda x: torch.full((HQ,), float(x), device=DEVICE)  # noqa: E731
    scale = D**-0.5
    q, kc, vc, batch = case(ctx, q_len)
    out = torch.empty_like(q)
    scales, extra = None, {}
    if kv_dtype == "fp8":
        q, kc, vc, scales = fp8_inputs(q, kc, vc)
        extra = fa3_descales(scales, batch, HKV)
    t_fa3 = bench(lambda: fa3(
        q, kc, vc, max_seqlen_q=q_len, cu_seqlens_q=batch.query_start_loc, max_seqlen_k=ctx,
        seqused_k=batch.seq_lens, softmax_scale=scale, causal=True,
        block_table=batch.block_table, out=out, fa_version=3, **extra))
    row = dict(context=ctx, query_len=q_len, kv_dtype=kv_dtype, fa3_ms=t_fa3)
    if profile:
        print(f"## FA3, context {ctx}, {q_len} new tokens, {kv_dtype}\n" + kernel_table(
            lambda: fa3(q, kc, vc, max_seqlen_q=q_len, cu_seqlens_q=batch.query_start_loc,
                        max_seqlen_k=ctx, seqused_k=batch.seq_lens, softmax_scale=scale,
                        causal=True, block_table=batch.block_table, out=out, fa_version=3,
                        **extra)), flush=True)
    for path in attention:
        kernel = "fa3" if path.startswith("fa3") else path
        for name, sim, topk in CONFIGS:
            def run(sim=sim, topk=topk, kernel=kernel):
                sparge_paged_prefill(q, kc, vc, batch, scale, hv(sim), hv(1.0), hv(50.0), out,
                                     topk=topk, check_finite=False, pv_skip=False,
                                     attention=kernel, scales=scales)

            with dense_call(path):
                if planned:  # one plan a step, as the backend builds it; each layer launches
                    plan = plan_prefill(batch, HQ, HKV, D, out.dtype, PAGE, q.device, topk,
                                        attention=kernel, q_rows=q.shape[0])

                    def run(sim=sim, plan=plan):  # noqa: F811
                        run_prefill(plan, q, kc, vc, scale, hv(sim), hv(1.0), hv(50.0), out,
                                    scales=scales)
                t = bench(run)
            key = name + SUFFIX[path]
            if profile:
                with dense_call(path):
                    table = kernel_table(run)
                print(f"## {key}, context {ctx}, {q_len} new tokens, {kv_dtype}\n" + table,
                      flush=True)
            row[f"{key}_ms"] = t
            row[f"{key}_speedup"] = t_fa3 / t
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[49152, 131072])
    ap.add_argument("--query-lens", type=int, nargs="+",
                    default=[64, 128, 256, 512, 1024, 2048, 4096, 8192])
    ap.add_argument("--attention", nargs="+", choices=tuple(SUFFIX), default=["triton"],
                    help="the sparse path's attention kernels to time (default triton); "
                    "fa3_call / fa3_nocall: the FA3 path with the dense rows' own call forced "
                    "on / off")
    ap.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--planned", action="store_true",
                    help="time each layer's launches over a plan built once (as the backend "
                    "runs a step), not the checked call that plans itself")
    ap.add_argument("--profile", action="store_true",
                    help="print each row's GPU time per kernel (torch.profiler, 3 calls)")
    ap.add_argument("--out", default="benchmarks/results/query_len")
    ap.add_argument("--report", metavar="JSON",
                    help="only write <out>.md from an earlier run's JSON (no GPU)")
    args = ap.parse_args()
    if args.report:
        with open(args.report) as f:
            data = json.load(f)
        write_report(data["meta"], data["results"], args.out)
        return
    import vllm
    from vllm.vllm_flash_attn import flash_attn_varlen_func as fa3

    rows = []
    for ctx in args.contexts:
        for q_len in (n for n in args.query_lens if n <= ctx):
            rows.append(measure(ctx, q_len, fa3, args.attention, args.kv_dtype,
                                args.profile, args.planned))
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                torch=torch.__version__, triton=triton.__version__, vllm=vllm.__version__,
                command=command(args))
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    write_report(meta, rows, args.out)


def command(args: argparse.Namespace) -> str:
    parts = []
    for k, v in vars(args).items():
        if k == "report" or v is False or v is None:
            continue
        flag = "--" + k.replace("_", "-")
        parts.append(flag if v is True else
                     f"{flag} {' '.join(map(str, v)) if isinstance(v, list) else v}")
    return "python benchmarks/bench_query_len.py " + " ".join(parts)


def write_report(meta: dict, rows: list[dict], out: str) -> None:
    """``<out>.md`` from the rows (the kernels and cache dtype they hold)."""
    kv_dtype = rows[0]["kv_dtype"]
    attention = [p for p in SUFFIX if f"dense{SUFFIX[p]}_ms" in rows[0]]
    base = "FA3" if kv_dtype == "bf16" else "FLASH_ATTN-fp8 (FA3's fp8 forward)"
    cols = [(name + SUFFIX[p], f"{label}{' ' + SUFFIX[p] if SUFFIX[p] else ''}")
            for p in attention
            for name, label in (("dense", "dense config"), ("topk_s0.5", "50% sparse"),
                                ("topk_s0.8", "80% sparse"))]
    lines = [f"# Short chunks on a long context: sparse path vs FA3 — {meta['device']}, "
             f"{meta['date']}", "",
             f"`{meta['command']}` — torch {meta['torch']}, triton {meta['triton']}, vllm "
             f"{meta['vllm']}; {kv_dtype} KV cache, head dim {D}, {HQ} q / {HKV} KV heads, "
             f"page {PAGE}, batch 1. Speed-up = {base} time / (predictor + sparse attention), "
             "medians, same run; `+fa3`: the kept blocks attended by FlashAttention-3"
             + ("; `+fa3_call` / `+fa3_nocall`: the same with the rows that keep every block "
                "in a call of their own / in the launches"
                if {"fa3_call", "fa3_nocall"} & set(attention) else "") + ".", "",
             "| context | new tokens | FA3 ms | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['context']} | {r['query_len']} | {r['fa3_ms']:.3f} | "
                     + " | ".join(f"{r[c[0] + '_speedup']:.2f}x" for c in cols) + " |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
