"""The FA3 path's dense configuration, taken apart against FLASH_ATTN's own call (GPU).

    python benchmarks/fa3_dense_call.py --lengths 32768 131072 --out /tmp/fa3_dense_call

With every block kept, the FA3 path (``attention="fa3"``) attends a whole prompt in the dense
rows' call (``fa3.VirtualAttention._dense_rows``): one FA3 call over the requests' own pages, a
sequence per run of a request's dense query blocks (``fa3_tables.dense_runs``), in the
longest-first order of the block-map rows, the other rows' slots empty. Around it run the
predictor and the per-head launches, whose sequences are all empty then. This times, in one run,
bf16 and fp8 caches (per-tensor scales, as vLLM's ``--kv-cache-dtype fp8``), 32 q / 8 KV heads
of 128, 64-token pages, batch 1:

- ``flash_attn``: ``flash_attn_varlen_func`` as vLLM's FLASH_ATTN calls it (the baseline);
- ``fwd_1seq``: ``fa3.fa3_paged_forward`` with one sequence (``seqused_q``, one split);
- ``fwd_1seq_kvidx``: the same with ``kv_batch_idx``;
- ``dense_call``: the dense rows' call as the path makes it (``dense_runs``' sequences);
- ``dense_call_table``: the same with each sequence's row of the page table gathered
  (``block_table[kv_batch_idx]``) instead of ``kv_batch_idx``;
- ``dense_call_first``: the same call ordered with its non-empty sequences first;
- ``launches``: the FA3 path's per-head launches and tables (no dense call) over the dense map;
- ``fa3_path``: ``sparge_paged_prefill(attention="fa3")``, predictor included.

Every row of a length and cache is timed in turns with the others (``timing.interleaved``: a
block of calls of each a round), so that the GPU's clock drift falls alike on all; ratios are
the baseline's median over each row's. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
import triton

from sparge_serve.kernels import predict_block_map, sparge_paged_prefill
from sparge_serve.kernels.fa3 import VirtualAttention, fa3_paged_forward, plan_virtual
from sparge_serve.kernels.fa3_tables import dense_runs, virtual_rows
from sparge_serve.kernels.geometry import BLKQ, num_blocks
from sparge_serve.kernels.predictor import lut_to_mask

HQ, HKV, D, PAGE = 32, 8, 128, 64
BUDGET_MS = 8000.0  # each length's rounds (a block of calls of every row a round)


def time_length(length: int, fp8: bool, fa3) -> dict:
    from bench_kernels import fa3_descales, fp8_inputs, make_inputs
    from timing import interleaved

    q, kc, vc, batch, _, _ = make_inputs(length, PAGE, structured=False)
    scales = None
    if fp8:
        q, kc, vc, scales = fp8_inputs(q, kc, vc)
    out = torch.empty(q.shape, dtype=torch.bfloat16, device=q.device)
    scale = D**-0.5
    cu, i32 = batch.query_start_loc, torch.int32
    desc = fa3_descales(scales, batch, HKV) if fp8 else {}

    def baseline():
        fa3(q, kc, vc, max_seqlen_q=length, cu_seqlens_q=cu, max_seqlen_k=length,
            seqused_k=batch.seq_lens, softmax_scale=scale, causal=True,
            block_table=batch.block_table, out=out, fa_version=3, **desc)

    baseline()
    ref = out.clone()
    fns, diffs = {}, {}

    def timed(name, fn):
        out.zero_()
        fn()
        diffs[name] = (out.float() - ref.float()).abs().max().item()
        fns[name] = fn

    timed("flash_attn", baseline)

    def descale(seqs):
        if not fp8:
            return None
        return tuple(t.reshape(1, 1).expand(seqs, HKV)
                     for t in (scales.q_scale, scales.k_scale, scales.v_scale))

    def fwd(q_start, q_len, used, table, kv_idx=None):
        seqs = q_len.shape[0]
        d = descale(seqs)
        return lambda: fa3_paged_forward(q, kc, vc, out, q_start, q_len, used, table, length,
                                         scale, d, kv_batch_idx=kv_idx, max_seqlen_q=length)

    one = torch.tensor([length], dtype=i32, device=q.device)
    zero = torch.zeros(1, dtype=i32, device=q.device)
    timed("fwd_1seq", fwd(cu, one, one, batch.block_table))
    timed("fwd_1seq_kvidx", fwd(cu, one, one, batch.block_table, zero))

    nqb = num_blocks(length, BLKQ)
    rows = virtual_rows(batch, nqb)
    dense = torch.ones(1, nqb, dtype=torch.bool, device=q.device)
    q_start, q_len = dense_runs(rows, dense)
    row_req = (rows.order // nqb).to(i32)
    timed("dense_call", fwd(q_start, q_len, rows.context, batch.block_table, row_req))
    table = batch.block_table.index_select(0, row_req.long())
    timed("dense_call_table", fwd(q_start, q_len, rows.context, table))
    first = torch.argsort((q_len == 0).to(i32), stable=True)
    q_start_f = torch.cat([q_start[:-1][first], q_start[-1:]])
    timed("dense_call_first", fwd(q_start_f, q_len[first], rows.context[first],
                                  batch.block_table, row_req[first]))

    hv = lambda x: torch.full((HQ,), float(x), device=q.device)  # noqa: E731
    bm = predict_block_map(q, kc, batch, scale, hv(1.0), hv(1.0), check_finite=False,
                           scales=scales)
    bm = dataclasses.replace(bm, mask=lut_to_mask(bm))
    plan = plan_virtual(batch, nqb, PAGE, HQ, q_rows=length)

    def launches_only(*args, kv_batch_idx=None, **kw):
        if kv_batch_idx is None:
            fa3_paged_forward(*args, **kw)

    attn = VirtualAttention(plan, q, kc, vc, batch, scale, out, HQ // HKV, launches_only, scales)
    timed("launches", lambda: attn.attend(bm))
    pv_off = hv(50.0)
    timed("fa3_path", lambda: sparge_paged_prefill(
        q, kc, vc, batch, scale, hv(1.0), hv(1.0), pv_off, out, check_finite=False,
        pv_skip=False, attention="fa3", map_budget=None, scales=scales))
    return interleaved(fns, budget_ms=BUDGET_MS), diffs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import vllm
    from vllm.vllm_flash_attn import flash_attn_varlen_func as fa3

    meta = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                torch=torch.__version__, triton=triton.__version__, vllm=vllm.__version__,
                python=platform.python_version(),
                command="python benchmarks/fa3_dense_call.py --lengths "
                        + " ".join(map(str, args.lengths)) + f" --out {args.out}")
    results = []
    for fp8 in (False, True):
        for length in args.lengths:
            t, d = time_length(length, fp8, fa3)
            results.append(dict(length=length, kv_dtype="fp8" if fp8 else "bf16", ms=t,
                                max_diff=d))
            print(results[-1], flush=True)
            torch.cuda.empty_cache()
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    names = list(results[0]["ms"])
    lines = [f"# The FA3 path's dense configuration against FLASH_ATTN — {meta['device']}, "
             f"{meta['date']}", "",
             f"`{meta['command']}` — torch {meta['torch']}, triton {meta['triton']}, vllm "
             f"{meta['vllm']}; 32 q / 8 KV heads of 128, 64-token pages, batch 1, causal. "
             "Medians in ms, the rows of a line timed in turns; in brackets FLASH_ATTN's time over "
             "the row's.", "",
             "| cache | length | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for r in results:
        base = r["ms"]["flash_attn"]
        lines.append(f"| {r['kv_dtype']} | {r['length']} | " + " | ".join(
            f"{r['ms'][n]:.3f} ({base / r['ms'][n]:.3f}x)" for n in names) + " |")
    lines += ["", "Largest output difference from FLASH_ATTN's (``launches`` attends no row: "
              "its output is the zeros it starts from).", "",
              "| cache | length | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    lines += [f"| {r['kv_dtype']} | {r['length']} | "
              + " | ".join(f"{r['max_diff'][n]:.2e}" for n in names) + " |" for r in results]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
