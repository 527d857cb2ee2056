"""Short new-token chunks on a long cached context: sparse path vs FA3 (GPU), for min_sparse_query_len.

    python benchmarks/bench_query_len.py --out benchmarks/results/query_len \
        [--contexts 49152 131072] [--query-lens 64 128 256 512 1024 2048 4096 8192]

A follow-up turn or a prefix-cache hit adds ``q`` new tokens to a context of ``ctx`` tokens (the
queries are its last ``q`` positions). The sparse path pays the predictor's two passes over the
*whole* context's keys whatever ``q`` is, so for small ``q`` dense attention must win; the
backend's ``min_sparse_query_len`` (default 512) keeps such requests dense. This measures where
the sparse path starts to pay, at 50% and 80% block sparsity (top-k, exact) and with every block
kept (dense configuration), against FA3 (``flash_attn_varlen_func`` on the same paged cache) in
the same run. Batch 1, bf16, head dim 128, 32 query / 8 KV heads, 64-token pages (the backend's).
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import triton

from sparge_serve.kernels import PrefillBatch, num_blocks, predict_block_map, sparse_paged_attention

HQ, HKV, D, PAGE = 32, 8, 128, 64


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def case(ctx: int, q_len: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n_pages = num_blocks(ctx, PAGE)
    kv = torch.randn(n_pages, PAGE, HKV, 2 * D, device="cuda", generator=g).bfloat16()
    kc, vc = kv.split(D, dim=-1)
    q = torch.randn(q_len, HQ, D, device="cuda", generator=g).bfloat16()
    perm = torch.randperm(n_pages, device="cuda", generator=g).to(torch.int32)
    batch = PrefillBatch(
        query_start_loc=torch.tensor([0, q_len], dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor([ctx], dtype=torch.int32, device="cuda"),
        block_table=perm[None], max_query_len=q_len, max_seq_len=ctx,
    )
    return q, kc, vc, batch


def measure(ctx: int, q_len: int, fa3) -> dict:
    hv = lambda x: torch.full((HQ,), float(x), device="cuda")  # noqa: E731
    scale = D**-0.5
    q, kc, vc, batch = case(ctx, q_len)
    out = torch.empty_like(q)
    t_fa3 = bench(lambda: fa3(
        q, kc, vc, max_seqlen_q=q_len, cu_seqlens_q=batch.query_start_loc, max_seqlen_k=ctx,
        seqused_k=batch.seq_lens, softmax_scale=scale, causal=True,
        block_table=batch.block_table, out=out, fa_version=3))
    row = dict(context=ctx, query_len=q_len, fa3_ms=t_fa3)
    for name, sim, topk in (("dense", 1.0, None), ("topk_s0.5", -1.0, 0.5),
                            ("topk_s0.8", -1.0, 0.2)):
        def run(sim=sim, topk=topk):
            bm = predict_block_map(q, kc, batch, scale, hv(sim), hv(1.0), topk,
                                   check_finite=False)
            sparse_paged_attention(q, kc, vc, batch, bm, scale, hv(50.0), out,
                                   check_finite=False, pv_skip=False)
        t = bench(run)
        row[f"{name}_ms"] = t
        row[f"{name}_speedup"] = t_fa3 / t
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[49152, 131072])
    ap.add_argument("--query-lens", type=int, nargs="+",
                    default=[64, 128, 256, 512, 1024, 2048, 4096, 8192])
    ap.add_argument("--out", default="benchmarks/results/query_len")
    args = ap.parse_args()
    import vllm
    from vllm.vllm_flash_attn import flash_attn_varlen_func as fa3

    rows = []
    for ctx in args.contexts:
        for q_len in args.query_lens:
            rows.append(measure(ctx, q_len, fa3))
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                torch=torch.__version__, triton=triton.__version__, vllm=vllm.__version__,
                command="python benchmarks/bench_query_len.py " + " ".join(
                    f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in vars(args).items()))
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    lines = [f"# Short chunks on a long context: sparse path vs FA3 — {meta['device']}, "
             f"{meta['date']}", "",
             f"`{meta['command']}` — torch {meta['torch']}, triton {meta['triton']}, vllm "
             f"{meta['vllm']}; bf16, head dim {D}, {HQ} q / {HKV} KV heads, page {PAGE}, batch 1. "
             "Speed-up = FA3 time / (predictor + sparse attention), medians, same run.", "",
             "| context | new tokens | FA3 ms | dense config | 50% sparse | 80% sparse |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['query_len']} | {r['fa3_ms']:.3f} | "
                     f"{r['dense_speedup']:.2f}x | {r['topk_s0.5_speedup']:.2f}x | "
                     f"{r['topk_s0.8_speedup']:.2f}x |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
