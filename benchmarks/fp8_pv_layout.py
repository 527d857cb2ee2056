"""Does an fp8 ``P.V`` in Triton need V laid out K-major? One flash-attention kernel, three inputs.

    python benchmarks/fp8_pv_layout.py --lengths 8192 32768 --out benchmarks/results/fp8_pv_layout

Hopper's fp8 matrix instructions take their second operand K-major: for ``P.V`` that is V with
the key (token) dimension contiguous, where vLLM's paged cache stores each token's ``D`` values
contiguously. Triton then transposes every V tile of an fp8 ``P.V`` on chip, which is where the
sparse kernel's fp8 product loses to FlashAttention-3's (docs/PERFORMANCE.md, "fp8 KV cache").
This script measures what a K-major copy of V would buy before the sparse kernel takes one:
the same dense, non-causal flash-attention kernel (online softmax, fp32 accumulator) over

- ``bf16``: bf16 q, K, V;
- ``fp8``: fp8 q, K, V (``float8_e4m3fn``), V token-major as the cache holds it;
- ``fp8_kmajor``: the same fp8 V copied once, token dimension contiguous (the copy's own time is
  reported apart: ``copy ms``, and in ``fp8_kmajor + copy``);

each at the best of a few tile configurations, ``--heads`` query heads over as many KV heads,
head dim ``--head-dim``. Ratios are against ``bf16`` of the same length, same run. Writes
``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
# (BLOCK_M, BLOCK_N, num_warps, num_stages): the configurations Triton's fused-attention tutorial
# tries on Hopper at head dim 128
CONFIGS = [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 4)]


@triton.jit
def _attn(q_ptr, k_ptr, v_ptr, o_ptr, n_ctx, qk_scale,
          s_qh, s_qn, s_kh, s_kn, s_vh, s_vn, s_vd, s_oh, s_on,
          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows ``[pid0 * BLOCK_M, +BLOCK_M)`` of head ``pid1`` over every key (no mask: n_ctx is a
    multiple of both blocks). V's strides are free: token-major (``s_vd`` 1) or K-major
    (``s_vn`` 1)."""
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    k_base = k_ptr + h * s_kh + offs_d[:, None] + offs_n[None, :] * s_kn  # [D, BLOCK_N]
    v_base = v_ptr + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd  # [BLOCK_N, D]
    for start in range(0, n_ctx, BLOCK_N):
        kt = tl.load(k_base + start * s_kn)
        qk = tl.dot(q, kt)
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + start * s_vn)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :], out.to(tl.bfloat16))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              config: tuple[int, int, int, int]) -> None:
    """q, k, v ``[H, N, D]`` (v may be any strided view), out ``[H, N, D]`` bf16."""
    bm, bn, warps, stages = config
    h, n, d = q.shape
    grid = (n // bm, h)
    _attn[grid](q, k, v, out, n, d ** -0.5 * 1.4426950408889634,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
                D=d, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)


def kmajor(v: torch.Tensor) -> torch.Tensor:
    """``v`` ``[H, N, D]`` with the same values, stored ``[H, D, N]`` (token dim contiguous)."""
    return v.transpose(1, 2).contiguous().transpose(1, 2)


def timed_ms(fn) -> float:
    """Median GPU time of ``fn`` (Triton's ``do_bench``, as the kernel benchmarks time)."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def measure(n: int, heads: int, d: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(heads, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
               for _ in range(3))
    # 4-D, so that SDPA takes its flash kernel rather than materialising [H, N, N] scores
    ref = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None])[0].float()
    out = torch.empty_like(q)
    q8, k8, v8 = q.to(FP8), k.to(FP8), v.to(FP8)
    v8k = kmajor(v8)
    copy_ms = timed_ms(lambda: kmajor(v8))
    flops = 4 * heads * n * n * d
    rows = []
    for name, args in (("bf16", (q, k, v)), ("fp8", (q8, k8, v8)), ("fp8_kmajor", (q8, k8, v8k))):
        best = None
        for config in CONFIGS:
            try:
                ms = timed_ms(lambda c=config, a=args: attention(*a, out, c))
            except Exception as e:  # e.g. out of shared memory for this tile size
                print(f"  {name} {config}: {type(e).__name__}", file=sys.stderr)
                continue
            if best is None or ms < best[0]:
                best = (ms, config)
        ms, config = best
        attention(*args, out, config)
        err = ((out.float() - ref).abs().mean() / ref.abs().mean()).item()
        rows.append(dict(length=n, variant=name, ms=ms, tflops=flops / ms / 1e9, config=config,
                         rel_l1=err, copy_ms=copy_ms if name == "fp8_kmajor" else None))
        print(f"{n:>6} {name:<10} {ms:8.3f} ms {flops / ms / 1e9:6.0f} TFLOPS {config} "
              f"rel L1 {err:.4f}", flush=True)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# fp8 P.V: V token-major against K-major — {meta['device']}, {meta['date']}", "",
             f"`{meta['command']}`; torch {meta['torch']}, triton {meta['triton']}. One dense, "
             f"non-causal flash-attention kernel, {meta['heads']} heads of {meta['head_dim']}, "
             "best of its tile configurations; ratios against `bf16` of the same length (same "
             "run). `copy ms`: making the K-major copy of V (every head, the whole length).", "",
             "| length | variant | ms | TFLOPS | vs bf16 | with the copy | rel L1 vs SDPA | tile |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["length"] == r["length"] and b["variant"] == "bf16")
        with_copy = "—"
        if r["copy_ms"] is not None:
            with_copy = f"{base['ms'] / (r['ms'] + r['copy_ms']):.2f}x ({r['copy_ms']:.3f} ms)"
        lines.append(f"| {r['length']} | {r['variant']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                     f"{base['ms'] / r['ms']:.2f}x | {with_copy} | {r['rel_l1']:.4f} | "
                     f"{tuple(r['config'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--out", required=True, help="writes <out>.json and <out>.md")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fp8_pv_layout needs a CUDA GPU (fp8 matrix instructions: Hopper)")
    meta = dict(device=torch.cuda.get_device_name(),
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                torch=torch.__version__, triton=triton.__version__, heads=args.heads,
                head_dim=args.head_dim,
                command="python benchmarks/fp8_pv_layout.py " + shlex.join(sys.argv[1:]))
    rows = [r for n in args.lengths for r in measure(n, args.heads, args.head_dim)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    out.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
