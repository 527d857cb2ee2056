"""Sparse prefill kernels vs FlashAttention-3 over the same paged KV cache (GPU).

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels   [--lengths 8192 32768 131072]

Batch 1, bf16, head dim 128, 32 query / 8 KV heads, causal, page size 16 (and 64 with --pages).
Configurations: dense (all blocks), top-k at block sparsity 0.5 / 0.8 / 0.9 (exact by construction,
random inputs), and the untuned defaults (simthreshd1 0.6, cdfthreshd 0.98) on structured inputs.
The predictor is timed separately and included in the "total" time. Baselines in the same run:
FA3 (``vllm.vllm_flash_attn.flash_attn_varlen_func`` on the paged cache) and torch SDPA on
contiguous K/V. Writes ``<out>.json``, ``<out>.md`` and ``<out>.png``; ratios, not absolute times,
are what compare across runs.

``--kv-dtype fp8`` adds, in the same run, the sparse path over an fp8 (``float8_e4m3fn``) KV cache:
K and V quantised per tensor with scale amax / 448 (vLLM's per-tensor ``k_scale`` / ``v_scale``),
the query too (as vLLM's attention layer quantises it for FlashAttention-fp8), output in bf16.
Rows ``<config>+fp8`` (every configuration above, random and structured inputs) and
``<config>+fp8dot`` (the same with fp8 compute, ``fp8_dot=True``, V read from its K-major copy;
skipped with a note where the kernels lack that option), ``<config>+fp8dot_vpages`` (fp8 compute
with V read from the cache's pages) and, where FA3 is present, ``<config>+fa3+fp8`` (the FA3
attention path: FA3's fp8 forward over each row's kept blocks; PV skip off); baselines FA3 bf16
and FLASH_ATTN-fp8 (FA3 over the fp8 cache with ``q/k/v_descale`` expanded to ``(num_seqs,
num_kv_heads)``, as vLLM's ``FlashAttentionImpl`` calls it). The report's fp8 table gives each
fp8 row's speed-up over both baselines, the relative L1 error of its output against the bf16
output of the same configuration and against the bf16 dense output, and a pass/fail check of
``kernels_report.FP8_BARS``. JSON rows carry ``kv_dtype``.

    python benchmarks/bench_kernels.py --lengths 32768 131072 --pages 64 --kv-dtype fp8 --out /tmp/kernels_fp8
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import platform
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import triton

from sparge_serve.kernels import (
    BLKK,
    BLKQ,
    FP8_DTYPE,
    BlockMap,
    KVScales,
    PrefillBatch,
    num_blocks,
    predict_block_map,
    sparge_paged_prefill,
    sparse_paged_attention,
)
from sparge_serve.kernels.attention import attend_params
from sparge_serve.kernels.geometry import MAP_BUDGET
from sparge_serve.kernels.plan import Shape, plan_chunks, plan_prefill
from sparge_serve.kernels.pooling import key_sums_bytes, pool_keys, pooled_keys_bytes
from sparge_serve.kernels.predictor import _select_dc, select_blocks
from sparge_serve.kernels.prefill import run_prefill

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_report import (  # noqa: E402
    FP8_BARS,
    attach_ratios,
    plot,
    write_reports,
)
from timing import bench, interleaved  # noqa: E402

HQ, HKV, D = 32, 8, 128
DEVICE = "cuda"  # the CPU tests run the fp8 path at toy sizes under Triton's interpreter
SWEEP = False  # --sweep: also time the dense kernel under several (num_warps, num_stages)
# --sweep at head dim 256: (split, num_warps, num_stages) of the attention kernel around its
# default (1, 8, 2), first, timed on the dense and 50% configurations (TMA pages), each output
# checked against the default's; every one compiles for sm_90 (scripts/aot_compile_check.py:
# split 2 at 8 warps without spills, split 1 at 8 warps spilling 24-64 bytes, and faster)
D256_LAUNCHES = ((1, 8, 2), (1, 8, 1), (1, 8, 3), (2, 8, 2), (2, 8, 3), (2, 4, 3))
# --fp8-sweep: launches of the fp8_dot attention kernel (V from its K-major copy; Launch),
# timed on the dense and 50% configurations' +fp8dot rows (64-token pages) after the default
# launch (default_launch), each output checked against the default's. Its loop finds a key block
# through its list, then the block table: the compiled loop keeps two K and V tiles in flight up
# to 4 stages, three from 5 (66 KB of shared memory in fp8; scripts/aot_compile_check.py); with
# page_ahead (the next block's page id read one iteration ahead) three from 3 stages. 4 warps
# take 255 registers a thread, so an SM holds two such programs; 8 warps capped at 128 (maxnreg)
# two (two warp groups each, 64 rows a group); two 64-row programs a query block (split 2: 160
# registers at 2 stages, 168 at most at 3) three 4-warp ones. Conditional rescaling takes a max
# over the program's rows every block (a barrier across its warps); lazy0 rescales every block.
# ptrv: V's K-major tiles by pointer loads (v_tma off; the other TMA launches load them by TMA)
class Launch(NamedTuple):
    warps: int
    stages: int
    tma: bool = True  # TMA K loads (else pointer loads)
    ahead: bool = False  # page_ahead
    split: int = 1  # programs a query block
    maxnreg: int | None = None  # registers a thread at most (None: ptxas's choice)
    lazy: float | None = None  # lazy_rescale (None: the default; 0: a rescale every block)
    v_tma: bool = True  # False: v_tma off (else the default: on with TMA loads and V K-major)

    @property
    def name(self) -> str:
        """The launch's name in ``--fp8-sweep`` and the results (``w4s3_ahead``)."""
        return (f"w{self.warps}s{self.stages}" + ("" if self.tma else "_ptr")
                + ("_ahead" if self.ahead else "")
                + (f"_split{self.split}" if self.split != 1 else "")
                + (f"_r{self.maxnreg}" if self.maxnreg else "")
                + ("" if self.lazy is None else f"_lazy{self.lazy:g}")
                + ("_ptrv" if self.tma and not self.v_tma else ""))

    @property
    def kwargs(self) -> dict:
        """The launch as ``sparse_paged_attention`` keyword arguments."""
        launch = (self.warps, self.stages) + ((self.maxnreg,) if self.maxnreg else ())
        return dict(launch=launch, use_tma=self.tma, page_ahead=self.ahead, split=self.split,
                    lazy_rescale=self.lazy, **({} if self.v_tma else {"v_tma": False}))


FP8_LAUNCHES = tuple(Launch(*x) for x in (
    (4, 2, True, True), (4, 2, True, False), (4, 3, True, False), (4, 5, True, False),
    (8, 2, True, False), (8, 3, True, False), (8, 5, True, False), (4, 3, False, False),
    (8, 3, False, False), (4, 3, True, True), (8, 3, True, True),
    (8, 2, True, True, 1, 128), (8, 3, True, True, 1, 128), (4, 2, True, True, 2),
    (4, 3, True, True, 2), (4, 3, True, True, 2, 168), (4, 2, True, True, 1, None, 0.0),
    (8, 2, True, True, 1, 128, 0.0), (8, 3, True, True, 1, 128, 0.0),
    (8, 4, True, True, 1, 128, 0.0), (8, 5, True, True, 1, 128, 0.0),
    (8, 3, True, False, 1, 128, 0.0), (8, 4, True, True, 1, 128, None, False)))
LAUNCHES_BY_NAME = {x.name: x for x in FP8_LAUNCHES}
FP8_SWEEP: tuple[str, ...] = ()  # --fp8-sweep: the FP8_LAUNCHES (by name) timed
# --bf16-sweep: the FP8_LAUNCHES (by name) timed on the bf16 dense and 50% rows (64-token
# pages), after the bf16 default launch, each output checked against the default's
BF16_SWEEP: tuple[str, ...] = ()
# --virtual: also time FA3 over per-row virtual contexts, all heads at once and in head chunks
# (rows "<config>+fa3", "<config>+fa3_chunked"); --chunked: the Triton kernels in head chunks
# (rows "<config>+chunked"); chunks under the default map_budget (1.5% of the K/V bytes) with no
# floor (map_floor=0: every call bounded by the fraction); each end to end, measured peak memory
VIRTUAL = False
CHUNKED = False
# --variants: the defaults' alternatives (PV skip off), timed on every random-input config (dense
# and top-k) of both kernels -> row["variants_ms"]: either launch order (both kernels' default is
# KV-major after every head's last two query blocks; tail_last: without those first), and a
# rescale every block (no lazy rescaling)
VARIANTS = {
    "head_major": dict(kv_major=False),
    "kv_major": dict(kv_major=True),
    "kv_major_tail_last": dict(kv_major=True, tail_first=0),
    "eager_rescale": dict(lazy_rescale=0.0),
    "head_major_eager_rescale": dict(kv_major=False, lazy_rescale=0.0),
}
# --variants, predictor: the select kernel at 4 and at 8 warps, and at 4, 8 and 16 dimensions
# per chunk (the default is 4 warps and 16 up to 128K: a column repeats it). Measured and
# dropped: pipelined chunk loads, 3-15 thresholds per search step
# (kernels_v9_select_options_h200.md in commit e0f07d8, kernels_v10_predictor_h200.md in commit
# 175a6f8)
PREDICTOR_VARIANTS = {
    "select_w4": dict(select_warps=4),
    "select_w8": dict(select_warps=8),
    "select_dc4": dict(select_dc=4),
    "select_dc8": dict(select_dc=8),
    "select_dc16": dict(select_dc=16),
}
TIME_VARIANTS = False
# --kv-dtype fp8: the fp8 rows and FLASH_ATTN-fp8 next to the bf16 ones
KV_FP8 = False
# --configs: the configurations to time (empty: all), named as in the report
ONLY_CONFIGS: set[str] = set()
# the configurations: (name, thresholds) on random inputs (dense; top-k at 50/80/90% block
# sparsity) and on structured ones (the untuned defaults, with and without the PV skip)
RANDOM_CONFIGS = [("dense", dict(sim=1.0, cdf=1.0, topk=None))] + [
    (f"topk_s{s}", dict(sim=-1.0, cdf=1.0, topk=1.0 - s)) for s in (0.5, 0.8, 0.9)]
STRUCTURED_CONFIGS = [("defaults", dict(sim=0.6, cdf=0.98, topk=None)),
                      ("defaults_pv8", dict(sim=0.6, cdf=0.98, topk=None, pv=8.0))]
FP8_MAX = 448.0  # largest finite float8_e4m3fn: vLLM's per-tensor scale is amax / 448
FP8_NOTES: list[str] = []  # rows of the fp8 part not measured, and why (-> meta["fp8_notes"])


def make_inputs(length: int, page: int, structured: bool, seed: int = 0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    n_pages = num_blocks(length, page)
    q = torch.randn(length, HQ, D, device=DEVICE, generator=g)
    k = torch.randn(length, HKV, D, device=DEVICE, generator=g)
    v = torch.randn(length, HKV, D, device=DEVICE, generator=g)
    if structured:
        # sink + locality + self-similar key blocks, like real attention (see tests/kernel_inputs)
        q *= 0.5
        sink = torch.randn(HKV, D, device=DEVICE, generator=g)
        sink = sink / sink.norm(dim=-1, keepdim=True) * math.sqrt(D) * 1.5
        k[:4] += sink
        group = HQ // HKV
        q += sink.repeat_interleave(group, 0)[None] * 0.8
        csum = torch.cumsum(k, 0)
        lo = torch.clamp(torch.arange(length, device=DEVICE) - 32, min=0)
        q += 2.0 * ((csum - csum[lo]) / 32.0).repeat_interleave(group, 1)
        nb = num_blocks(length, 64)
        blockdir = torch.randn(nb, 1, HKV, D, device=DEVICE, generator=g).expand(-1, 64, -1, -1)
        k = 0.5 * k + 1.5 * blockdir.reshape(-1, HKV, D)[:length]
    perm = torch.randperm(n_pages, device=DEVICE, generator=g).to(torch.int32)
    pad = n_pages * page - length
    # NOTE: vLLM 0.26's layout: one [pages, page, Hkv, 2*D] buffer, K and V as views
    kv = torch.empty(n_pages, page, HKV, 2 * D, device=DEVICE, dtype=torch.bfloat16)
    kc, vc = kv.split(D, dim=-1)
    kc[perm.long()] = torch.cat([k, k.new_zeros(pad, HKV, D)]).view(n_pages, page, HKV, D).bfloat16()
    vc[perm.long()] = torch.cat([v, v.new_zeros(pad, HKV, D)]).view(n_pages, page, HKV, D).bfloat16()
    batch = PrefillBatch(
        query_start_loc=torch.tensor([0, length], dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor([length], dtype=torch.int32, device=DEVICE),
        block_table=perm[None],
        max_query_len=length,
        max_seq_len=length,
    )
    return q.bfloat16(), kc, vc, batch, k.bfloat16(), v.bfloat16()


def dense_block_map(length: int, block_n: int) -> BlockMap:
    """Every valid key block of width ``block_n`` (batch 1, full prefill)."""
    nqb, nkb = num_blocks(length, BLKQ), num_blocks(length, block_n)
    last = torch.clamp((torch.arange(nqb) + 1) * BLKQ, max=length) - 1
    n_valid = (last // block_n + 1).to(torch.int32)
    lut = torch.arange(nkb, dtype=torch.int16).expand(1, HQ, nqb, nkb).contiguous()
    count = n_valid.expand(1, HQ, nqb).contiguous()
    return BlockMap(lut.cuda(), count.cuda(), count.cuda())


def pair_with_baselines(row: dict, total_fn, fp8: dict) -> None:
    """For a row that a bar of ``kernels_report.FP8_BARS`` holds: ``row["interleaved_ms"]``,
    the medians of ``total_fn`` (the row's predictor and attention, as one call) and of the
    run's baselines, timed in turns (``timing.interleaved``); the bars are checked on those."""
    held = {(b[0], b[3]) for b in FP8_BARS}
    if (row["config"], row["length"]) in held and fp8.get("base_fns"):
        row["interleaved_ms"] = interleaved({"row": total_fn, **fp8["base_fns"]})


def d256_sweep(q, kc, vc, batch, bm, scale, pv_off, out) -> tuple[dict, dict]:
    """:func:`launch_sweep` of the :data:`D256_LAUNCHES` (PV skip off, TMA loads)."""
    def attend(o, **kw):
        sparse_paged_attention(q, kc, vc, batch, bm, scale, pv_off, o, pv_skip=False, **kw)

    return launch_sweep(attend, out, {
        f"split{split}_w{w}s{st}": dict(launch=(w, st), use_tma=True, split=split)
        for split, w, st in D256_LAUNCHES})


def default_launch(fp8_dot: bool, use_tma: bool = True) -> Launch:
    """The attention kernel's default launch at head dim ``D`` with PV skip off (``lazy`` None:
    the default rescaling)."""
    p = attend_params(D, False, use_tma, fp8_dot=fp8_dot)
    return Launch(p.num_warps, p.num_stages, p.use_tma, p.page_ahead, p.split, p.maxnreg)


def named_launches(default: Launch, names) -> dict[str, dict]:
    """``default`` and the :data:`FP8_LAUNCHES` named in ``names``, by name, as keyword
    arguments of the attention call."""
    return {default.name: default.kwargs,
            **{n: LAUNCHES_BY_NAME[n].kwargs for n in names if n != default.name}}


def dense_sweep(q, kc, vc, batch, bm, scale, pv_off, out, length, page) -> tuple[dict, dict]:
    """:func:`launch_sweep` of the bf16 attention kernel on the dense configuration (PV skip
    off): the default launch for these pages first (the report's baseline), then 4 and 8 warps
    at 2-5 stages, uncapped (5 stages: three K/V tiles in flight); with whole-block pages TMA
    loads on and off at 8 / 3, two 64-row programs a query block (no register spills at 4
    warps, ``scripts/aot_compile_check.py``) and ``page_ahead`` (the next kept block's page id
    read one iteration ahead); FlashAttention-4's conditional rescaling (the accumulator
    rescaled only when a row max grows by more than 8 log2 units) on and off; and key blocks of
    128 over a dense map in those units (what a wider tile would buy)."""
    tma = page % BLKK == 0
    launches = {default_launch(False, tma).name: {}}
    launches.update({f"w{w}s{st}": dict(launch=(w, st)) for w in (4, 8) for st in (2, 3, 4, 5)})
    if tma:
        launches.update({f"w8s3_tma{int(t)}": dict(launch=(8, 3), use_tma=t)
                         for t in (False, True)})
        launches.update({f"split2_w{w}s{st}_tma1": dict(launch=(w, st), use_tma=True, split=2)
                         for w, st in ((4, 2), (4, 3))})
        launches.update({f"w{w}s{st}_ahead": dict(launch=(w, st), use_tma=True, page_ahead=True)
                         for w, st in ((4, 2), (4, 3), (8, 3))})
    launches.update({f"lazy{int(lz)}_w{w}s{st}": dict(launch=(w, st), lazy_rescale=lz)
                     for lz in (0.0, 8.0)
                     for w, st in (((4, 2), (4, 3)) if tma else ((8, 3), (4, 2)))})
    bm128 = dense_block_map(length, 128)
    launches.update({f"bn128_w{w}s{st}": dict(launch=(w, st), bm=bm128, block_n=128)
                     for w, st in ((4, 2), (8, 2), (8, 3))})
    return launch_sweep(lambda o, bm=bm, **kw: sparse_paged_attention(
        q, kc, vc, batch, bm, scale, pv_off, o, pv_skip=False, **kw), out, launches)


def fp8_dot_sweep(q8, kc8, vc8, batch, bm, scale, pv_off, out, kv_scales) -> tuple[dict, dict]:
    """:func:`launch_sweep` of the attention kernel with ``fp8_dot`` (V from its K-major copy,
    PV skip off): its default launch, then the :data:`FP8_LAUNCHES` named in
    :data:`FP8_SWEEP`."""
    def attend(o, **kw):
        sparse_paged_attention(q8, kc8, vc8, batch, bm, scale, pv_off, o, pv_skip=False,
                               scales=kv_scales, fp8_dot=True, **kw)

    return launch_sweep(attend, out, named_launches(default_launch(True), FP8_SWEEP))


def launch_sweep(attend, out, launches: dict[str, dict]) -> tuple[dict, dict]:
    """ms of each of ``launches`` (name -> keyword arguments of ``attend(out, **kw)``), timed
    in turns (:func:`~timing.interleaved`: launches a few percent apart are told apart despite
    the clock's drift over a run), and the largest difference of its output from the default
    launch's (``attend(ref)``); a launch the device refuses is noted (NaN) and the run goes on."""
    ref = torch.empty_like(out)
    attend(ref)
    runs, diffs = {}, {}
    for key, kw in launches.items():
        run = lambda kw=kw: attend(out, check_finite=False, **kw)  # noqa: E731
        try:
            run()
            diffs[key] = (out.float() - ref.float()).abs().max().item()
            runs[key] = run
        except Exception as e:  # noqa: BLE001 - one refused launch must not end the run
            print(f"launch {key} not measured: {type(e).__name__}: "
                  f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}",
                  flush=True)
            diffs[key] = float("nan")
    times = interleaved(runs) if runs else {}
    return {key: times.get(key, float("nan")) for key in launches}, diffs


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` in ``float8_e4m3fn`` with its per-tensor scale (amax / 448, a one-element fp32
    tensor; real = stored * scale), as vLLM quantises a KV cache and a query."""
    s = (x.float().abs().amax() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny).reshape(1)
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s


def fp8_inputs(q, kc, vc):
    """The fp8 query and K/V cache views of bf16 ``q, kc, vc`` in vLLM's layout (one
    ``[pages, page, Hkv, 2*D]`` fp8 buffer, K and V as views) and their :class:`KVScales`."""
    kv8 = torch.empty(*kc.shape[:3], 2 * kc.shape[3], dtype=FP8_DTYPE, device=kc.device)
    kc8, vc8 = kv8.split(kc.shape[3], dim=-1)
    k_stored, ks = quantize_fp8(kc)
    kc8.copy_(k_stored)
    del k_stored
    v_stored, vs = quantize_fp8(vc)
    vc8.copy_(v_stored)
    del v_stored
    q8, qs = quantize_fp8(q)
    return q8, kc8, vc8, KVScales(ks, vs, qs)


def fa3_descales(scales: KVScales, batch: PrefillBatch, num_kv_heads: int) -> dict:
    """FA3's ``q/k/v_descale`` for an fp8 cache: the per-tensor scales expanded to
    ``(num_seqs, num_kv_heads)``, as vLLM's ``FlashAttentionImpl.forward`` passes them."""
    shape = (batch.query_start_loc.shape[0] - 1, num_kv_heads)
    return dict(q_descale=scales.q_scale.expand(shape), k_descale=scales.k_scale.expand(shape),
                v_descale=scales.v_scale.expand(shape))


def rel_l1(out: torch.Tensor, ref: torch.Tensor, rows: int = 16384) -> float:
    """Relative L1 error ``sum|out - ref| / sum|ref|``, in fp32 over ``rows`` tokens at a time
    (no fp32 copy of a whole 128K output)."""
    num = den = 0.0
    for i in range(0, ref.shape[0], rows):
        a, b = out[i:i + rows].float(), ref[i:i + rows].float()
        num += (a - b).abs().sum().item()
        den += b.abs().sum().item()
    return num / den if den else float("nan")


def fp8_dot_entry() -> str | None:
    """Where the kernels take ``fp8_dot`` (fp8 compute): ``"attention"`` (the attention kernel
    alone, ``sparse_paged_attention``), ``"prefill"`` (only both stages together,
    ``sparge_paged_prefill``) or ``None`` (not in this tree: the ``+fp8dot`` rows are skipped)."""
    if "fp8_dot" in inspect.signature(sparse_paged_attention).parameters:
        return "attention"
    if "fp8_dot" in inspect.signature(sparge_paged_prefill).parameters:
        return "prefill"
    return None


def configs_to_time(structured: bool) -> list[tuple[str, dict]]:
    """The configurations of the structured or random inputs that this run times (``--configs``)."""
    return [(name, c) for name, c in (STRUCTURED_CONFIGS if structured else RANDOM_CONFIGS)
            if not ONLY_CONFIGS or name in ONLY_CONFIGS]


def run_length(length: int, page: int, results: list, fa3):
    for structured in (False, True):
        if not configs_to_time(structured):
            continue  # no input built for nothing
        _bench_inputs(length, page, structured, results, fa3)
        torch.cuda.empty_cache()


def _bench_inputs(length: int, page: int, structured: bool, results: list, fa3):
    scale = D**-0.5
    hv = lambda x: torch.full((HQ,), float(x), device=DEVICE)  # noqa: E731
    pv_off = hv(50.0)
    flops = 4.0 * HQ * D * length * (length + 1) / 2  # causal
    q, kc, vc, batch, k, v = make_inputs(length, page, structured)
    out = torch.empty_like(q)
    kv_bytes = 2 * length * HKV * D * 2
    base = {}
    fp8 = None
    if KV_FP8:
        # the bf16 dense output: what the fp8 rows' relative L1 errors are measured against
        dense_bm = predict_block_map(q, kc, batch, scale, hv(1.0), hv(1.0))
        ref_dense = torch.empty_like(q)
        sparse_paged_attention(q, kc, vc, batch, dense_bm, scale, pv_off, ref_dense, pv_skip=False)
        del dense_bm
        fp8 = dict(inputs=fp8_inputs(q, kc, vc), ref_dense=ref_dense, same_config={},
                   base_fns={})
    if fa3 is not None and not structured:
        cu = batch.query_start_loc

        def fa3_bf16():
            fa3(q, kc, vc, max_seqlen_q=length, cu_seqlens_q=cu, max_seqlen_k=length,
                seqused_k=batch.seq_lens, softmax_scale=scale, causal=True,
                block_table=batch.block_table, out=out, fa_version=3)

        base["fa3"] = bench(fa3_bf16)
        if fp8 is not None:
            # FLASH_ATTN-fp8: the fp8 cache views and the query quantised by the layer, the
            # per-tensor scales expanded to (num_seqs, num_kv_heads); output in bf16
            q8, kc8, vc8, kv_scales = fp8["inputs"]
            descales = fa3_descales(kv_scales, batch, HKV)

            def fa3_fp8():
                fa3(q8, kc8, vc8, max_seqlen_q=length, cu_seqlens_q=cu, max_seqlen_k=length,
                    seqused_k=batch.seq_lens, softmax_scale=scale, causal=True,
                    block_table=batch.block_table, out=out, fa_version=3, **descales)

            base["fa3_fp8"] = bench(fa3_fp8)
            fp8["fa3_fp8_rel_l1"] = rel_l1(out, fp8["ref_dense"])
            fp8["base_fns"] = {"fa3": fa3_bf16, "fa3_fp8": fa3_fp8}
    if not structured and length <= 32768:
        qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        base["sdpa"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True))
    configs = configs_to_time(structured)
    for name, c in configs:
        sim, cdf = hv(c["sim"]), hv(c["cdf"])
        pv = hv(c.get("pv", 50.0))
        stats = torch.zeros(3, dtype=torch.int64, device=DEVICE)
        bm = predict_block_map(q, kc, batch, scale, sim, cdf, c["topk"], stats)
        sparse_paged_attention(q, kc, vc, batch, bm, scale, pv, out, stats)
        torch.cuda.synchronize()
        if fp8 is not None:
            fp8["same_config"][name] = out.clone()
        sparsity = 1.0 - stats[1].item() / stats[0].item()
        pv_skipped = stats[2].item() / max(stats[1].item(), 1)
        t_pred = bench(lambda sim=sim, cdf=cdf, topk=c["topk"]: predict_block_map(
            q, kc, batch, scale, sim, cdf, topk, check_finite=False))
        t_attn = bench(lambda bm=bm, pv=pv, skip="pv" in c: sparse_paged_attention(
            q, kc, vc, batch, bm, scale, pv, out, check_finite=False, pv_skip=skip))
        if name == "dense":
            # where the predictor's time goes: key pooling (two kernels and the key mean; as
            # the predictor runs it, so none for KV heads of dense heads only) and the select
            # kernel (the rest)
            t_pool = bench(lambda cdf=cdf, topk=c["topk"]: pool_keys(kc, batch, cdf, HQ // HKV,
                                                                      topk))
            predictor_parts = {"pool_keys": t_pool, "select": t_pred - t_pool}
        extra = pooled_keys_bytes(HKV, D, 1, length) + max(
            key_sums_bytes(HKV, D, 1, length),
            sum(t.numel() * t.element_size() for t in (bm.lut, bm.count, bm.n_valid)))
        row = dict(
            length=length, page=page, config=name, inputs="structured" if structured else
            "random", kv_dtype="bf16", block_sparsity=round(sparsity, 4),
            pv_skipped_frac_of_kept=round(pv_skipped, 4), predictor_ms=t_pred,
            attention_ms=t_attn, total_ms=t_pred + t_attn,
            attention_tflops_dense_equiv=flops / (t_attn * 1e-3) / 1e12,
            extra_mem_bytes=extra, kv_bytes=kv_bytes, extra_mem_frac_of_kv=extra / kv_bytes,
            **{f"{b}_ms": t for b, t in base.items()},
        )
        if name == "dense":
            row["predictor_parts_ms"] = predictor_parts
        if BF16_SWEEP and name in ("dense", "topk_s0.5") and page % BLKK == 0:
            row["bf16_launch_sweep_ms"], row["bf16_launch_sweep_max_diff"] = launch_sweep(
                lambda o, bm=bm, pv=pv, **kw: sparse_paged_attention(
                    q, kc, vc, batch, bm, scale, pv, o, pv_skip=False, **kw), out,
                named_launches(default_launch(False), BF16_SWEEP))
        if SWEEP and D == 256:
            if name in ("dense", "topk_s0.5") and page % BLKK == 0:
                row["launch_sweep_ms"], row["launch_sweep_max_diff"] = d256_sweep(
                    q, kc, vc, batch, bm, scale, pv_off, out)
        elif SWEEP and name == "dense":
            row["launch_sweep_ms"], row["launch_sweep_max_diff"] = dense_sweep(
                q, kc, vc, batch, bm, scale, pv_off, out, length, page)
        if TIME_VARIANTS and page % BLKK == 0:
            row["predictor_variants_ms"] = {
                v: bench(lambda sim=sim, cdf=cdf, topk=c["topk"], kw=kw: predict_block_map(
                    q, kc, batch, scale, sim, cdf, topk, check_finite=False, **kw))
                for v, kw in PREDICTOR_VARIANTS.items()
            }
        if TIME_VARIANTS == "all" and not structured and page % BLKK == 0:
            row["variants_ms"] = {
                v: bench(lambda bm=bm, kw=kw: sparse_paged_attention(
                    q, kc, vc, batch, bm, scale, pv_off, out, check_finite=False, pv_skip=False,
                    **kw))
                for v, kw in VARIANTS.items()
            }
        if SWEEP and name == "defaults_pv8":
            # the PV-skip variant spills at 4 warps (scripts/aot_compile_check.py), not at 8
            row["launch_sweep_ms"], row["launch_sweep_max_diff"] = launch_sweep(
                lambda o, bm=bm, pv=pv, **kw: sparse_paged_attention(
                    q, kc, vc, batch, bm, scale, pv, o, pv_skip=True, **kw), out,
                {f"pv_w{w}s{st}": dict(launch=(w, st)) for w, st in ((4, 2), (8, 2), (8, 3))})
        results.append(row)
        print(json.dumps(row), flush=True)
        args = (q, kc, vc, batch, scale, sim, cdf, pv_off, out)
        if CHUNKED and not structured:
            _bench_chunked(args, c["topk"], row, results, kv_bytes, "triton", MAP_BUDGET,
                           "+chunked")
        if VIRTUAL and not structured and fa3 is not None:
            _bench_chunked(args, c["topk"], row, results, kv_bytes, "fa3", None, "+fa3")
            _bench_chunked(args, c["topk"], row, results, kv_bytes, "fa3", MAP_BUDGET,
                           "+fa3_chunked")
    if fp8 is not None:
        _bench_fp8(length, page, structured, configs, batch, out, fp8, base, results,
                   virtual=fa3 is not None)


def _bench_fp8(length, page, structured, configs, batch, out, fp8, base, results,
               virtual: bool = False):
    """Rows ``<config>+fp8`` (the two kernels over the fp8 cache, fp8 query),
    ``<config>+fp8dot`` (the same with ``fp8_dot=True``, where the kernels take it) and, with
    ``virtual`` (FA3 present), ``<config>+fa3+fp8`` (the FA3 attention path: FA3's fp8 forward
    over the kept blocks; PV skip off), each with the relative L1 error of its output against
    the bf16 output of the same configuration and against the bf16 dense output."""
    scale = D**-0.5
    hv = lambda x: torch.full((HQ,), float(x), device=DEVICE)  # noqa: E731
    q8, kc8, vc8, kv_scales = fp8["inputs"]
    entry = fp8_dot_entry()
    kv_bytes = 2 * length * HKV * D  # one byte a value
    flops = 4.0 * HQ * D * length * (length + 1) / 2
    fa3_err = ({"fa3_fp8_rel_l1_vs_bf16_dense": fp8["fa3_fp8_rel_l1"]}
               if "fa3_fp8_rel_l1" in fp8 else {})

    def errors(name):
        return dict(rel_l1_vs_bf16=rel_l1(out, fp8["same_config"][name]),
                    rel_l1_vs_bf16_dense=rel_l1(out, fp8["ref_dense"]))

    def add(row):
        results.append(row)
        print(json.dumps(row), flush=True)

    for name, c in configs:
        sim, cdf, pv = hv(c["sim"]), hv(c["cdf"]), hv(c.get("pv", 50.0))
        skip, topk = "pv" in c, c["topk"]
        stats = torch.zeros(3, dtype=torch.int64, device=DEVICE)
        bm = predict_block_map(q8, kc8, batch, scale, sim, cdf, topk, stats, scales=kv_scales)
        sparse_paged_attention(q8, kc8, vc8, batch, bm, scale, pv, out, stats, scales=kv_scales)
        torch.cuda.synchronize()
        sparsity = 1.0 - stats[1].item() / stats[0].item()
        pv_skipped = stats[2].item() / max(stats[1].item(), 1)
        err = errors(name)
        t_pred = bench(lambda sim=sim, cdf=cdf, topk=topk: predict_block_map(
            q8, kc8, batch, scale, sim, cdf, topk, check_finite=False, scales=kv_scales))
        t_attn = bench(lambda bm=bm, pv=pv, skip=skip: sparse_paged_attention(
            q8, kc8, vc8, batch, bm, scale, pv, out, check_finite=False, pv_skip=skip,
            scales=kv_scales))
        extra = pooled_keys_bytes(HKV, D, 1, length) + max(
            key_sums_bytes(HKV, D, 1, length),
            sum(t.numel() * t.element_size() for t in (bm.lut, bm.count, bm.n_valid)))
        row = dict(
            length=length, page=page, config=name + "+fp8",
            inputs="structured" if structured else "random", kv_dtype="fp8", q_dtype="fp8",
            fp8_dot=False, block_sparsity=round(sparsity, 4),
            pv_skipped_frac_of_kept=round(pv_skipped, 4), predictor_ms=t_pred,
            attention_ms=t_attn, total_ms=t_pred + t_attn,
            attention_tflops_dense_equiv=flops / (t_attn * 1e-3) / 1e12,
            extra_mem_bytes=extra, kv_bytes=kv_bytes, extra_mem_frac_of_kv=extra / kv_bytes,
            **err, **fa3_err, **{f"{b}_ms": t for b, t in base.items()},
        )

        def total(sim=sim, cdf=cdf, topk=topk, pv=pv, skip=skip):
            bm = predict_block_map(q8, kc8, batch, scale, sim, cdf, topk, check_finite=False,
                                   scales=kv_scales)
            sparse_paged_attention(q8, kc8, vc8, batch, bm, scale, pv, out, check_finite=False,
                                   pv_skip=skip, scales=kv_scales)

        pair_with_baselines(row, total, fp8)
        add(row)
        if entry is None:
            continue
        # fp8 compute: the same predictor and block map, the attention's products in fp8. A
        # failure is noted in the report, not fatal: the run keeps every other row
        try:
            dot = _fp8_dot_row(row, name, c, batch, out, fp8, bm, stats, t_pred, entry, errors)
            if FP8_SWEEP and entry == "attention" and not skip and name in (
                    "dense", "topk_s0.5") and page % BLKK == 0:
                dot["fp8_launch_sweep_ms"], dot["fp8_launch_sweep_max_diff"] = fp8_dot_sweep(
                    q8, kc8, vc8, batch, bm, scale, pv, out, kv_scales)
            add(dot)
            if entry == "attention":  # V read from the pages, transposed on chip
                add(_fp8_dot_row(row, name, c, batch, out, fp8, bm, stats, t_pred, entry,
                                 errors, v_kmajor=False))
        except Exception as e:
            FP8_NOTES.append(f"{length} tokens, page {page}: {name}+fp8dot not measured: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            print(FP8_NOTES[-1], flush=True)
        if virtual and not skip:
            add(_fa3_fp8_row(row, name, c, batch, out, fp8, errors))
    if entry is None and not any("fp8_dot" in n for n in FP8_NOTES):
        FP8_NOTES.append("fp8 compute rows (`+fp8dot`) not measured: neither "
                         "`sparse_paged_attention` nor `sparge_paged_prefill` takes `fp8_dot`.")
        print(FP8_NOTES[-1], flush=True)
    del fp8["same_config"]


def _fp8_dot_row(row, name, c, batch, out, fp8, bm, stats, t_pred, entry, errors,
                 v_kmajor: bool | None = None) -> dict:
    """Row ``<config>+fp8dot``: the ``+fp8`` row's predictor and block map, the attention with
    ``fp8_dot=True`` (``entry`` "prefill": both stages timed together, all heads at once, the
    attention's time being the rest after the ``+fp8`` row's predictor); its K-major copy of V
    included. ``v_kmajor=False``: row ``<config>+fp8dot_vpages``, V read from the cache's pages
    (``entry`` "attention" only)."""
    vk = {} if v_kmajor is None else {"v_kmajor": v_kmajor}
    scale = D**-0.5
    hv = lambda x: torch.full((HQ,), float(x), device=DEVICE)  # noqa: E731
    q8, kc8, vc8, kv_scales = fp8["inputs"]
    sim, cdf, pv = hv(c["sim"]), hv(c["cdf"]), hv(c.get("pv", 50.0))
    skip, topk = "pv" in c, c["topk"]
    length = row["length"]
    dstats = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    if entry == "attention":
        dstats[:2] = stats[:2]  # the attention kernel adds its PV skips only
        sparse_paged_attention(q8, kc8, vc8, batch, bm, scale, pv, out, dstats,
                               scales=kv_scales, fp8_dot=True, **vk)
        t_total = t_pred + bench(lambda: sparse_paged_attention(
            q8, kc8, vc8, batch, bm, scale, pv, out, check_finite=False, pv_skip=skip,
            scales=kv_scales, fp8_dot=True, **vk))

        def total():
            bm = predict_block_map(q8, kc8, batch, scale, sim, cdf, topk, check_finite=False,
                                   scales=kv_scales)
            sparse_paged_attention(q8, kc8, vc8, batch, bm, scale, pv, out, check_finite=False,
                                   pv_skip=skip, scales=kv_scales, fp8_dot=True, **vk)
    else:
        def prefill(st=None, check=False):
            sparge_paged_prefill(q8, kc8, vc8, batch, scale, sim, cdf, pv, out, topk=topk,
                                 stats=st, check_finite=check, pv_skip=skip, map_budget=None,
                                 scales=kv_scales, fp8_dot=True)

        prefill(st=dstats, check=True)
        t_total = bench(prefill)
        total = prefill
    torch.cuda.synchronize()
    flops = 4.0 * HQ * D * length * (length + 1) / 2
    suffix = "+fp8dot_vpages" if v_kmajor is False else "+fp8dot"
    new = dict(row, config=name + suffix, fp8_dot=True, fp8_dot_timed=entry,
               block_sparsity=round(1.0 - dstats[1].item() / dstats[0].item(), 4),
               pv_skipped_frac_of_kept=round(dstats[2].item() / max(dstats[1].item(), 1), 4),
               attention_ms=t_total - t_pred, total_ms=t_total,
               attention_tflops_dense_equiv=flops / ((t_total - t_pred) * 1e-3) / 1e12,
               **errors(name))
    new.pop("interleaved_ms", None)
    pair_with_baselines(new, total, fp8)
    return new


def _fa3_fp8_row(row, name, c, batch, out, fp8, errors) -> dict:
    """Row ``<config>+fa3+fp8``: ``sparge_paged_prefill`` with ``attention="fa3"`` over the fp8
    cache and query (the predictor's bit sets, then FA3's fp8 forward over each row's kept
    blocks; all heads at once), both stages timed together; the attention's time is the rest
    after the ``+fp8`` row's predictor."""
    scale = D**-0.5
    hv = lambda x: torch.full((HQ,), float(x), device=DEVICE)  # noqa: E731
    q8, kc8, vc8, kv_scales = fp8["inputs"]
    sim, cdf, pv_off = hv(c["sim"]), hv(c["cdf"]), hv(50.0)
    stats = torch.zeros(3, dtype=torch.int64, device=DEVICE)

    def prefill(st=None, check=False):
        sparge_paged_prefill(q8, kc8, vc8, batch, scale, sim, cdf, pv_off, out, topk=c["topk"],
                             stats=st, check_finite=check, pv_skip=False, attention="fa3",
                             map_budget=None, scales=kv_scales)

    prefill(st=stats, check=True)
    t_total = bench(prefill)
    torch.cuda.synchronize()
    flops = 4.0 * HQ * D * row["length"] * (row["length"] + 1) / 2
    t_attn = t_total - row["predictor_ms"]
    new = dict(row, config=name + "+fa3+fp8", attention_path="fa3",
               block_sparsity=round(1.0 - stats[1].item() / stats[0].item(), 4),
               pv_skipped_frac_of_kept=0.0, attention_ms=t_attn, total_ms=t_total,
               attention_tflops_dense_equiv=flops / (t_attn * 1e-3) / 1e12 if t_attn > 0
               else None, **errors(name))
    for key in ("extra_mem_bytes", "extra_mem_frac_of_kv", "interleaved_ms"):
        new.pop(key, None)  # the Triton path's block lists; its paired timings
    pair_with_baselines(new, prefill, fp8)
    return new


def _peak_extra(fn) -> int:
    """Device bytes ``fn`` allocates at its peak (what it needs on top of its inputs)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _chunked_predictor(args, topk, attention: str, map_budget):
    """The predictor's part of ``sparge_paged_prefill``'s head chunks: its chunk loop without
    the attention (``predict_only``), for the predictor's share of a chunked run."""
    q, kc, vc, batch, scale, sim, cdf, pv_off, out = args
    stats = torch.zeros(3, dtype=torch.int64, device=q.device)
    plan = plan_prefill(batch, q.shape[1], kc.shape[2], q.shape[2], q.dtype, kc.shape[1],
                        q.device, topk, map_budget, attention, 0, q_rows=q.shape[0])
    run_prefill(plan, q, kc, vc, scale, sim, cdf, pv_off, out, stats, predict_only=True)


def graph_ms(fn) -> float:
    """``fn``'s GPU time without host gaps: its launches captured once in a CUDA graph, whose
    replay is timed (in a chunked call the next chunk's launches are issued while the GPU runs
    the previous chunk's attention, so the host's time between them is hidden there)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # NOTE: compiles and caches outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def chunk_select_ms(q, kc, batch, scale, sim, cdf, topk, heads: int, time_fn,
                    as_mask: bool = False):
    """One select launch of a chunked call (the first ``heads`` query heads over their KV slice:
    a small, latency-bound grid; ``as_mask``: the FA3 path's bit sets) at its default launch, and
    at 4 and 8 warps: ``(default ms, {"w4": ms, "w8": ms})`` as ``time_fn`` (a function of a
    callable) measures them."""
    group = q.shape[1] // kc.shape[2]
    keys = kc[:, :, :max(1, heads // group)]
    pooled = pool_keys(keys, batch)
    stats = torch.zeros(3, dtype=torch.int64, device=q.device)

    def select(**kw):
        return select_blocks(q[:, :heads], keys, batch, scale, sim[:heads], cdf[:heads], topk,
                             stats, pooled, group, as_mask=as_mask, **kw)

    variants = {f"w{w}": time_fn(lambda w=w: select(
        select_warps=w, select_dc=_select_dc(pooled.nkb_pad, w))) for w in (4, 8)}
    return time_fn(select), variants


def _bench_chunked(args, topk, row, results, kv_bytes, attention, map_budget, suffix):
    """Row ``<config><suffix>``: ``sparge_paged_prefill`` end to end (PV skip off) with
    ``attention`` ("triton" or "fa3") and ``map_budget`` with no floor (every call bounded by
    the fraction; None: all heads at once), its largest difference to the two-kernel row's
    output, its predictor share (the same head chunks without the attention) and its measured
    peak extra memory."""
    q, kc, vc, batch, scale, sim, cdf, pv_off, out = args
    want = torch.empty_like(q)
    call = dict(topk=topk, check_finite=False, pv_skip=False)
    sparge_paged_prefill(q, kc, vc, batch, scale, sim, cdf, pv_off, want, map_budget=None,
                         **call)

    def run():
        sparge_paged_prefill(q, kc, vc, batch, scale, sim, cdf, pv_off, out,
                             attention=attention, map_budget=map_budget, map_floor=0, **call)

    run()
    diff = (out.float() - want.float()).abs().max().item()
    total = bench(run)
    predict = lambda: _chunked_predictor(args, topk, attention, map_budget)  # noqa: E731
    t_pred = bench(predict)
    t_pred_gpu = graph_ms(predict)
    extra = _peak_extra(run)
    heads, slice_rows, sel = plan_chunks(
        Shape(HQ, HKV, D, 1, batch.max_query_len, batch.max_seq_len,
              kc.shape[1] if attention == "fa3" else None), q.element_size(), map_budget, floor=0)
    crow = dict(row, config=row["config"] + suffix, predictor_ms=t_pred,
                predictor_gpu_ms=t_pred_gpu,
                attention_ms=total - t_pred, total_ms=total, max_abs_diff_vs_triton=diff,
                extra_mem_bytes=extra, extra_mem_frac_of_kv=extra / kv_bytes,
                chunk_heads=heads, slice_rows=slice_rows, select_heads=sel,
                map_budget=map_budget)
    if sel < HQ:
        crow["chunk_select_default_ms"], crow["chunk_select_ms"] = chunk_select_ms(
            q, kc, batch, scale, sim, cdf, topk, sel, bench, as_mask=attention == "fa3")
    for key in ("launch_sweep_ms", "launch_sweep_max_diff",
                "predictor_variants_ms", "predictor_parts_ms", "variants_ms"):
        crow.pop(key, None)
    results.append(crow)
    print(json.dumps(crow), flush=True)


def main():
    global SWEEP, D, HQ, HKV, TIME_VARIANTS, VIRTUAL, CHUNKED, KV_FP8, ONLY_CONFIGS, FP8_SWEEP
    global BF16_SWEEP
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--pages", type=int, nargs="+", default=[64, 16])
    ap.add_argument("--out", default="benchmarks/results/kernels")
    ap.add_argument("--sweep", action="store_true", help="time launch configs of the dense kernel")
    ap.add_argument("--fp8-sweep", nargs="*", metavar="LAUNCH",
                    help="with --kv-dtype fp8: time launch configs of the fp8_dot attention "
                    "kernel on the dense and 50%% rows: the named ones (e.g. w4s2 w4s3_ahead), "
                    "else every one of FP8_LAUNCHES")
    ap.add_argument("--bf16-sweep", nargs="+", metavar="LAUNCH",
                    help="time the named launches of --fp8-sweep's table on the bf16 dense "
                    "and 50%% rows (64-token pages), after the bf16 default launch")
    ap.add_argument("--virtual", action="store_true",
                    help="also time FA3 over per-row virtual contexts (kernels/fa3.py), all "
                    "heads at once and in head chunks")
    ap.add_argument("--chunked", action="store_true",
                    help="also time the Triton kernels in head chunks (kernels/plan.py)")
    ap.add_argument("--variants", nargs="?", const="all", choices=("all", "predictor"),
                    help=f"also time the defaults' alternatives ({', '.join(VARIANTS)}) and the "
                    f"predictor options ({', '.join(PREDICTOR_VARIANTS)}); 'predictor': only "
                    "the latter")
    ap.add_argument("--head-dim", type=int, default=D, choices=(64, 128, 256),
                    help=f"head dim (default {D}, the issue's benchmark)")
    ap.add_argument("--heads", type=int, nargs=2, metavar=("Q", "KV"), default=[HQ, HKV],
                    help=f"query and KV heads (default {HQ} {HKV}; Gemma 3 270M: 4 1 with "
                    "--head-dim 256)")
    ap.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16",
                    help="fp8: also time the sparse path over an fp8 KV cache with an fp8 query "
                    "(rows <config>+fp8, and <config>+fp8dot with fp8 compute) against "
                    "FLASH_ATTN-fp8 and FA3 bf16, with their relative L1 errors and the fp8 "
                    "bars (default bf16: the bf16 rows only)")
    ap.add_argument("--configs", nargs="+", metavar="NAME",
                    choices=[name for name, _ in RANDOM_CONFIGS + STRUCTURED_CONFIGS],
                    help="only these configurations (default: all; their +fp8 / +fp8dot / "
                    "+fa3 rows follow them)")
    ap.add_argument("--replot", metavar="JSON",
                    help="only redraw the PNG of a saved result (next to it), no GPU needed")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        plot(saved["results"], saved["meta"], str(Path(args.replot).with_suffix(".png")))
        return
    SWEEP, D, TIME_VARIANTS = args.sweep, args.head_dim, args.variants
    for flag, named in (("--fp8-sweep", args.fp8_sweep), ("--bf16-sweep", args.bf16_sweep)):
        unknown = [n for n in named or () if n not in LAUNCHES_BY_NAME]
        if unknown:
            ap.error(f"{flag} {' '.join(unknown)}: no such launch; name any of "
                     f"{' '.join(LAUNCHES_BY_NAME)}")
    if args.fp8_sweep is not None:
        FP8_SWEEP = tuple(args.fp8_sweep or LAUNCHES_BY_NAME)
        if args.kv_dtype != "fp8":
            ap.error("--fp8-sweep times the fp8 rows: add --kv-dtype fp8")
    if args.bf16_sweep:
        BF16_SWEEP = tuple(args.bf16_sweep)
    q_heads, kv_heads = args.heads
    if q_heads < 1 or kv_heads < 1 or q_heads % kv_heads:
        ap.error(f"--heads {q_heads} {kv_heads}: query heads must be a multiple of KV heads")
    HQ, HKV = q_heads, kv_heads
    VIRTUAL, CHUNKED = args.virtual, args.chunked
    KV_FP8 = args.kv_dtype == "fp8"
    ONLY_CONFIGS = set(args.configs or ())
    try:
        import vllm
        from vllm.vllm_flash_attn import flash_attn_varlen_func as fa3
        vllm_version = vllm.__version__
    except ImportError:
        fa3, vllm_version = None, "not installed"
    meta = dict(
        device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
        torch=torch.__version__, triton=triton.__version__, vllm=vllm_version,
        python=platform.python_version(), geometry=dict(head_dim=D, q_heads=HQ, kv_heads=HKV),
        command="python benchmarks/bench_kernels.py " + " ".join(
            f"--{k.replace('_', '-')}" if v is True else
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if v is not False and v is not None),
    )
    results = []
    for page in args.pages:
        for length in args.lengths:
            run_length(length, page, results, fa3)
    if FP8_NOTES:
        meta["fp8_notes"] = FP8_NOTES
    attach_ratios(results)
    write_reports(results, meta, args.out)
    with open(args.out + ".md") as f:
        print(f.read())


if __name__ == "__main__":
    main()
