"""One launch of each sparse kernel configuration, for Nsight Compute to profile.

Runs the predictor and the attention kernel once to compile, then once more inside
``torch.cuda.profiler`` start/stop marks, so that ``ncu --profile-from-start off`` sees exactly
one launch of each kernel per configuration (the issue's "what limits it": occupancy, memory,
LUT imbalance). Run it under ncu on the GPU machine (``scripts/gpu_session.sh profile``)::

    ncu --profile-from-start off --clock-control none --set full \\
        -o prof python benchmarks/profile_kernels.py --length 32768 --config dense

Without ncu it just prints the configurations' times (CUDA events, one launch each).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import HQ, make_inputs  # noqa: E402

from sparge_serve.kernels import predict_block_map, sparse_paged_attention  # noqa: E402

# name: (simthreshd1, cdfthreshd, topk, lazy_rescale: None = the default); "fa3" is the
# baseline, FlashAttention-3 over the same paged cache (vLLM's build; its kernel is cutlass's
# ``device_kernel``)
CONFIGS = {
    "fa3": None,
    "dense": (1.0, 1.0, None, None),  # the kernel's defaults (lazy rescaling on TMA loads)
    "topk0.5": (-1.0, 1.0, 0.5, None),
    "dense_eager": (1.0, 1.0, None, 0.0),  # a rescale every block
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--config", choices=sorted(CONFIGS), nargs="+", default=["dense"])
    args = ap.parse_args()
    q, kc, vc, batch, _, _ = make_inputs(args.length, args.page, structured=False)
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5
    pv = torch.full((HQ,), 50.0, device="cuda")
    for name in args.config:
        if CONFIGS[name] is None:
            run = _fa3(q, kc, vc, batch, scale, out, args.length)
        else:
            sim, cdf, topk, lazy = CONFIGS[name]
            sim_t, cdf_t = (torch.full((HQ,), x, device="cuda") for x in (sim, cdf))
            run = functools.partial(
                _run, q, kc, vc, batch, scale, sim_t, cdf_t, pv, out, topk, lazy
            )
        run()  # compile
        torch.cuda.synchronize()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.profiler.start()
        t0.record()
        run()
        t1.record()
        torch.cuda.profiler.stop()
        torch.cuda.synchronize()
        print(
            json.dumps(
                {
                    "config": name,
                    "length": args.length,
                    "page": args.page,
                    "device": torch.cuda.get_device_name(0),
                    "ms_one_launch": t0.elapsed_time(t1),
                }
            ),
            flush=True,
        )


def _fa3(q, kc, vc, batch, scale, out, length):
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    return lambda: flash_attn_varlen_func(
        q,
        kc,
        vc,
        max_seqlen_q=length,
        cu_seqlens_q=batch.query_start_loc,
        max_seqlen_k=length,
        seqused_k=batch.seq_lens,
        softmax_scale=scale,
        causal=True,
        block_table=batch.block_table,
        out=out,
        fa_version=3,
    )


def _run(q, kc, vc, batch, scale, sim, cdf, pv, out, topk, lazy) -> None:
    bm = predict_block_map(q, kc, batch, scale, sim, cdf, topk, check_finite=False)
    sparse_paged_attention(
        q, kc, vc, batch, bm, scale, pv, out, check_finite=False, pv_skip=False, lazy_rescale=lazy
    )


if __name__ == "__main__":
    main()
