"""Stage 2 of SpargeAttn: block-sparse flash attention over vLLM's paged KV cache.

One program computes one (q-head, query block, request) tile of ``BLKQ`` rows: an online-softmax
flash-attention forward (fp32 statistics and accumulator) over the row's kept key blocks only
(``BlockMap``), reading K/V through the block table for any page size, with the token-level
bottom-right causal mask on diagonal blocks and the per-head PV-skip filter (docs/DESIGN.md,
"Stage 2"). With every block kept and PV skip off it is dense causal attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sparge_serve.kernels.checks import (
    check_batch,
    check_block_map,
    check_fp8_dot,
    check_group,
    check_head_thresholds,
    check_out_and_layout,
    check_paged_inputs,
    check_scale,
    stats_buffer,
)
from sparge_serve.kernels.geometry import (
    BATCH_PTRS,
    BLKK,
    BLKQ,
    PV_SKIP_OFF,
    BlockMap,
    KVScales,
    PrefillBatch,
)
from sparge_serve.kernels.launch import INTERPRET, launch
from sparge_serve.kernels.pooling import (
    block_page,
    kv_descriptor,
    load_kv_block,
    load_v_block,
    tma_layout_ok,
    tma_supported,
    values_descriptor,
    values_kmajor,
)
from sparge_serve.kernels.softmax import _dot, _online_softmax_update, _softmax_step

_LOG2E = 1.4426950408889634
# FlashAttention-4's conditional rescaling, on by default for bf16 products with TMA loads at head
# dim 128 without PV skip: the running max (and the accumulator's rescale) moves only when a
# row's block max exceeds it by more than 2**8 (log2 units). 1-10% faster on an H200 at 32K-128K,
# 64-token pages; slower on 16-token pages (kernels.md) and with fp8 products (kernels_launches.md).
LAZY_RESCALE = 8.0
# Query blocks from each head's end launched before the KV-major order (``_program_row``): those
# holding a chunk's last 128 queries, which keep every valid key block; in KV-major order the last
# KV head's would start near the end of the launch and run alone (90% block sparsity).
TAIL_FIRST = 2

@triton.jit
def _kept_block(lut_row, bt_row, t, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Entry ``t`` of a row's kept key blocks and its page id (``PAGE_AHEAD``)."""
    j = tl.load(lut_row + t).to(tl.int32)
    return j, block_page(bt_row, j, PAGE, BLOCK_N)


@triton.jit
def _attend_row(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, bt_row, lut_row, n_kept, pv_ptr, k_desc, v_desc,
    q_scale_ptr, k_scale_ptr, v_scale_ptr, vt_row, stride_vh, stride_vd,
    q_start, q_len, seq_len, b, m0, h,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_page, stride_tok, stride_head, qk_scale,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, PV_SKIP: tl.constexpr, PV_OFF: tl.constexpr,
    UPCAST: tl.constexpr, USE_TMA: tl.constexpr, LAZY: tl.constexpr = 0.0,
    Q_SCALED: tl.constexpr = False, KV_SCALED: tl.constexpr = False,
    FP8_DOT: tl.constexpr = False, V_KMAJOR: tl.constexpr = False,
    PAGE_AHEAD: tl.constexpr = False, VT_TMA: tl.constexpr = False,
):
    """Attention of query rows ``[m0, m0 + BLOCK_M)`` (inside query block ``b`` of ``BLOCK_Q``
    rows) of one q-head ``h`` of a request over the block's ``n_kept`` kept key blocks
    (``lut_row``, ascending); writes those rows' output, returns PV-skipped blocks.

    ``BLOCK_M < BLOCK_Q`` splits a query block over several programs (PV skip off only: the skip
    decision is taken over the whole block's rows).

    Everything computes in the output's dtype (``DT``): fp8 q and K/V blocks are converted in
    registers (exact), the dequantisation scales of q and K fold into the score scale and V's
    into the final normalisation: attention of the dequantised tensors. ``FP8_DOT`` (an fp8
    query and cache) keeps both products in fp8, as FlashAttention-3's fp8 forward: ``P`` is
    rounded to fp8 for ``P.V``. Without it, an fp8 query over an fp8 cache still takes ``q.k``
    in fp8 (Hopper sums fp8 products with fewer bits than fp32, far finer than the inputs' own
    rounding): the matrix unit reads the K block where TMA put it, not a bf16 copy.
    ``V_KMAJOR``: V blocks come from the request's K-major copy ``vt_row`` (``[Hkv, D, S]``,
    :func:`~sparge_serve.kernels.pooling.values_kmajor`; P's keys put in its ``key_order``),
    whose tiles an fp8 ``P.V`` reads as they lie. ``PAGE_AHEAD`` (TMA loads): the off-band loops
    read the next kept block's page id one iteration ahead, carried in the loop, so that the
    block-table load takes no pipeline stage of its own before the block's TMA loads. ``VT_TMA``:
    the K-major copy's tiles by TMA (``v_desc`` over it, ``vt_row`` the request's first row)."""
    DT = None if FP8_DOT else out_ptr.dtype.element_ty
    QK_FP8: tl.constexpr = FP8_DOT or (Q_SCALED and KV_SCALED)
    DK = None if QK_FP8 else DT  # K blocks' dtype in q.k
    if KV_SCALED:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    if Q_SCALED:
        qk_scale = qk_scale * tl.load(q_scale_ptr)
    ctx = seq_len - q_len
    kvh = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, HEAD_DIM)
    m_real = offs_m < q_len
    q_pos = ctx + offs_m
    first = ctx + b * BLOCK_Q
    last_block_row = ctx + tl.minimum((b + 1) * BLOCK_Q, q_len) - 1
    last = ctx + tl.minimum(m0 + BLOCK_M, q_len) - 1
    q_tok = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + q_tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        mask=m_real[:, None], other=0.0,
    )
    if not QK_FP8:
        q = q.to(DT)
    # NOTE: the query block's diagonal band [j_diag0, n_valid_block), from the key block holding
    # its first query, is always kept (forced by the predictor) and is the tail of the ascending
    # LUT; it is walked directly, with the token-level causal mask and no PV skip, up to the last
    # block these rows see.
    n_valid = last // BLOCK_N + 1
    j_diag0 = first // BLOCK_N
    n_off = n_kept - (last_block_row // BLOCK_N + 1 - j_diag0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_skipped = 0
    # off-band kept blocks: no mask
    if PV_SKIP:
        pv_thr = tl.load(pv_ptr + h)
        if PAGE_AHEAD:
            jn, pn = _kept_block(lut_row, bt_row, 0, PAGE, BLOCK_N)
        for t in range(0, n_off):
            if PAGE_AHEAD:
                j, page = jn, pn
                # NOTE: in bounds at t = n_off - 1: the diagonal band's first block (always kept)
                jn, pn = _kept_block(lut_row, bt_row, t + 1, PAGE, BLOCK_N)
            else:
                j, page = tl.load(lut_row + t).to(tl.int32), None
            k = load_kv_block(k_cache_ptr, bt_row, j, seq_len, kvh, stride_page, stride_tok,
                               stride_head, offs_n, offs_d, PAGE, BLOCK_N, k_desc, USE_TMA,
                               DT=DK, page=page)
            qk = _dot(q, tl.trans(k), UPCAST)
            # stage-2 filter: skip when every real row's block max is pv_thr (log2) below its
            # running max; never the first block of the row.
            negligible = tl.where(m_real, tl.max(qk, axis=1) * qk_scale - m_i <= -pv_thr, 1)
            skip = (t > 0) & (pv_thr < PV_OFF) & (tl.min(negligible, axis=0) > 0)
            if skip:
                n_skipped += 1
            else:
                v = load_v_block(v_cache_ptr, bt_row, j, seq_len, kvh, stride_page, stride_tok,
                                 stride_head, offs_n, offs_d, PAGE, BLOCK_N, v_desc, USE_TMA,
                                 False, DT, vt_row, stride_vh, stride_vd, V_KMAJOR, page, VT_TMA)
                acc, l_i, m_i = _online_softmax_update(acc, l_i, m_i, qk, qk_scale, v, UPCAST,
                                                       KEY_ORDER=V_KMAJOR)
    else:
        if PAGE_AHEAD:
            jn, pn = _kept_block(lut_row, bt_row, 0, PAGE, BLOCK_N)
        for t in range(0, n_off):
            if PAGE_AHEAD:  # as above
                j, page = jn, pn
                jn, pn = _kept_block(lut_row, bt_row, t + 1, PAGE, BLOCK_N)
            else:
                j, page = tl.load(lut_row + t).to(tl.int32), None
            k = load_kv_block(k_cache_ptr, bt_row, j, seq_len, kvh, stride_page, stride_tok,
                               stride_head, offs_n, offs_d, PAGE, BLOCK_N, k_desc, USE_TMA,
                               DT=DK, page=page)
            v = load_v_block(v_cache_ptr, bt_row, j, seq_len, kvh, stride_page, stride_tok,
                             stride_head, offs_n, offs_d, PAGE, BLOCK_N, v_desc, USE_TMA, False,
                             DT, vt_row, stride_vh, stride_vd, V_KMAJOR, page, VT_TMA)
            qk = _dot(q, tl.trans(k), UPCAST)
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, qk_scale, v, LAZY, UPCAST, V_KMAJOR)
    # diagonal band: always computed, causal mask
    for j in range(j_diag0, n_valid):
        k = load_kv_block(k_cache_ptr, bt_row, j, seq_len, kvh, stride_page, stride_tok,
                           stride_head, offs_n, offs_d, PAGE, BLOCK_N, k_desc, USE_TMA,
                           DT=DK)
        # NOTE: with TMA, rows past seq_len hold stale page contents: zero V (0 * NaN = NaN).
        v = load_v_block(v_cache_ptr, bt_row, j, seq_len, kvh, stride_page, stride_tok,
                         stride_head, offs_n, offs_d, PAGE, BLOCK_N, v_desc, USE_TMA, True, DT,
                         vt_row, stride_vh, stride_vd, V_KMAJOR, VT_TMA=VT_TMA)
        qk = _dot(q, tl.trans(k), UPCAST)
        k_pos = j * BLOCK_N + offs_n
        qk = tl.where(k_pos[None, :] <= q_pos[:, None], qk, float("-inf"))
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, qk_scale, v, LAZY, UPCAST, V_KMAJOR)
    if KV_SCALED:
        l_i = l_i / tl.load(v_scale_ptr)
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + q_tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=m_real[:, None],
    )
    return n_skipped


@triton.jit
def _count_skipped(stats_ptr, n_skipped, PV_SKIP: tl.constexpr):
    """Adds a row's PV-skipped blocks to ``stats_ptr[2]`` (no atomic when there are none)."""
    if PV_SKIP:  # noqa: SIM102 - a constexpr test, then a runtime one
        if n_skipped > 0:
            tl.atomic_add(stats_ptr + 2, n_skipped.to(tl.int64), sem="relaxed")


@triton.jit
def _program_row(lin, num_heads, n_t, GROUP: tl.constexpr, FIRST: tl.constexpr):
    """``(head, t)`` of the program ``lin`` in launch order (``t``: the ``SPLIT``-row part of a
    query block, ``n_t`` of them a head): first the last ``FIRST`` parts of every head, the
    heaviest rows (a chunk's last queries keep every valid key block, stage 1), so that no head's
    runs last and alone; then one KV head's GQA group over its other parts, heaviest first,
    before the next KV head's, so that the programs resident together read the keys of fewer KV
    heads: L2 reuse where their kept blocks differ (docs/DESIGN.md, "Launch order"). A head chunk
    smaller than one group is its heads, all of one KV head."""
    first = tl.minimum(n_t, FIRST)
    if lin < first * num_heads:
        h = lin % num_heads
        t = n_t - 1 - lin // num_heads
    else:
        gc = tl.minimum(num_heads, GROUP)
        rest = lin - first * num_heads
        per_kv = gc * (n_t - first)
        h = rest // per_kv * gc + rest % gc
        t = n_t - first - 1 - rest % per_kv // gc
    return h, t


@triton.jit(do_not_specialize=["NQB", "stride_bt", "num_heads"],
            do_not_specialize_on_alignment=BATCH_PTRS)
def _sparse_attn_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, bt_ptr, qsl_ptr, seq_lens_ptr,
    lut_ptr, count_ptr, pv_ptr, stats_ptr, k_desc, v_desc, q_scale_ptr, k_scale_ptr, v_scale_ptr,
    vt_ptr, stride_vr, stride_vh, stride_vd,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_page, stride_tok, stride_head, stride_bt,
    NKB, NQB, num_heads, qk_scale,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, PV_SKIP: tl.constexpr, PV_OFF: tl.constexpr, UPCAST: tl.constexpr,
    USE_TMA: tl.constexpr, SPLIT: tl.constexpr, LAZY: tl.constexpr = 0.0,
    KV_MAJOR: tl.constexpr = True, Q_SCALED: tl.constexpr = False,
    KV_SCALED: tl.constexpr = False, FP8_DOT: tl.constexpr = False,
    V_KMAJOR: tl.constexpr = False, PAGE_AHEAD: tl.constexpr = False,
    VT_TMA: tl.constexpr = False,
    TAIL_FIRST: tl.constexpr = TAIL_FIRST,  # the module constant (one definition)
):
    # NOTE: heaviest (last) query blocks first, for a shorter tail; SPLIT programs a query block.
    r = tl.program_id(2)
    q_start = tl.load(qsl_ptr + r)
    q_len = tl.load(qsl_ptr + r + 1) - q_start
    if KV_MAJOR:
        # over this request's own parts (a batch's shorter requests leave the grid's last
        # programs of their slice idle, not the first ones: their own tails still go first)
        n_t = tl.cdiv(q_len, BLOCK_Q // SPLIT)
        lin = tl.program_id(1) * num_heads + tl.program_id(0)
        if lin >= n_t * num_heads:
            return
        h, t = _program_row(lin, num_heads, n_t, GROUP, TAIL_FIRST * SPLIT)
    else:
        h = tl.program_id(0)
        t = NQB * SPLIT - 1 - tl.program_id(1)
    b = t // SPLIT
    m0 = b * BLOCK_Q + (t % SPLIT) * (BLOCK_Q // SPLIT)
    if m0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + r)
    row_id = (r * num_heads + h) * NQB + b
    if VT_TMA:  # the request's first row of the copy's 2-D view (strides in rows)
        vt_row = r * stride_vr
    elif V_KMAJOR:
        vt_row = vt_ptr + r.to(tl.int64) * stride_vr
    else:
        vt_row = vt_ptr
    n_skipped = _attend_row(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, bt_ptr + r * stride_bt,
        lut_ptr + row_id.to(tl.int64) * NKB, tl.load(count_ptr + row_id), pv_ptr, k_desc, v_desc,
        q_scale_ptr, k_scale_ptr, v_scale_ptr, vt_row, stride_vh, stride_vd,
        q_start, q_len, seq_len, b, m0, h,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_page, stride_tok, stride_head, qk_scale,
        GROUP, BLOCK_Q, BLOCK_Q // SPLIT, BLOCK_N, HEAD_DIM, PAGE, PV_SKIP, PV_OFF, UPCAST,
        USE_TMA, LAZY, Q_SCALED, KV_SCALED, FP8_DOT, V_KMAJOR, PAGE_AHEAD, VT_TMA,
    )
    _count_skipped(stats_ptr, n_skipped, PV_SKIP)  # (SPLIT is 1 with PV skip)


def _attn_launch_params(head_dim: int, use_tma: bool, pv_skip: bool = True,
                        fp8_dot: bool = False) -> tuple[int, ...]:
    """(num_warps, num_stages[, maxnreg]), pinned from benchmarks/bench_kernels.py sweeps, never
    autotuned at serve time. Head dim 128, TMA loads, PV skip off: 8 warps capped at 128
    registers a thread, so that an SM holds two programs (four warp groups of 64 rows); 2 stages
    in bf16, 4 with fp8 products (H100, 32K / 128K: 1.04-1.08x and 1.03-1.10x 4 warps / 2 stages
    with every block kept and at 50%; ``kernels_launches.md``). Otherwise with TMA 4 warps / 2
    stages (H200: 0.75x the time of 8/3; ``kernels_v6_h200.md`` in commit 1f68c02), without
    (16-token pages) 8/3. Head dim 256: 8 warps / 2 stages (``kernels_d256.md``, ``--sweep``:
    the fastest of 4-8 warps, 1-3 stages, one or two programs a query block); it runs 0.68x
    FA3 dense at 32K on an H100, so ``auto`` sends such layers to FA3 unless they skip PV."""
    if head_dim == 256:
        return (8, 2)
    if use_tma and head_dim == 128 and not pv_skip:
        return (8, 4, 128) if fp8_dot else (8, 2, 128)
    if use_tma:
        return (4, 2)
    return (8, 3) if head_dim == 128 else (4, 2)


def _row_parts(split: int | None, head_dim: int, pv_skip: bool, lazy_rescale: float | None,
               use_tma: bool, fp8_dot: bool = False) -> tuple[int, float]:
    """``(SPLIT, LAZY)`` of the attention kernel, after checking them against ``pv_skip``. ``split``
    ``None``: whole query blocks (at head dim 256 too: one 128-row program a query block takes
    0.46-0.50x the time of two 64-row ones at 8K-32K, H100, ``kernels_d256.md``, as the two
    programs each load every kept K/V block); ``lazy_rescale`` ``None``: :data:`LAZY_RESCALE`
    where it measures faster (TMA loads, head dim 128, PV skip off, bf16 products), else 0."""
    if split is None:
        split = 1
    if split not in (1, 2) or (pv_skip and split != 1):
        raise ValueError(f"split must be 1, or 2 with PV skip off; got {split} (pv_skip "
                         f"{pv_skip})")
    if lazy_rescale is None:
        lazy = use_tma and head_dim == 128 and not pv_skip and not fp8_dot
        lazy_rescale = LAZY_RESCALE if lazy else 0.0
    if lazy_rescale < 0 or (lazy_rescale > 0 and pv_skip):
        raise ValueError(f"lazy_rescale must be >= 0, and 0 with PV skip on; got {lazy_rescale} "
                         f"(pv_skip {pv_skip})")
    return split, float(lazy_rescale)


@dataclass(frozen=True)
class AttendParams:
    """A launch of the attention kernel (:func:`attend_params`)."""

    use_tma: bool  # TMA block loads (else pointer loads)
    split: int  # programs per query block (``BLKQ // split`` rows each)
    lazy_rescale: float  # LAZY: conditional rescaling threshold (log2 units; 0: every block)
    num_warps: int
    num_stages: int
    fp8_dot: bool = False  # both products in fp8 (an fp8 query and cache)
    v_kmajor: bool = False  # V read from a K-major copy (``pooling.values_kmajor``)
    page_ahead: bool = False  # PAGE_AHEAD: page ids read one kept block ahead (TMA loads)
    maxnreg: int | None = None  # registers a thread at most (ptxas .maxnreg); None: its choice
    v_tma: bool = False  # VT_TMA: the K-major copy's tiles by TMA (v_kmajor, use_tma)


def attend_params(head_dim: int, pv_skip: bool, use_tma: bool, split: int | None = None,
                  lazy_rescale: float | None = None, launch: tuple[int, ...] | None = None,
                  fp8_dot: bool = False, v_kmajor: bool | None = None,
                  page_ahead: bool | None = None, v_tma: bool | None = None) -> AttendParams:
    """The attention kernel's launch for ``head_dim`` with or without PV skip and TMA loads:
    the defaults (:func:`_row_parts`, :func:`_attn_launch_params`) where an override is
    ``None``; ``v_kmajor`` ``None``: with ``fp8_dot`` (an fp8 ``P.V`` over V as the cache holds
    it transposes every tile on chip: 0.64-0.67x the bf16 kernel's speed, against 1.47-1.56x
    over a K-major copy, H100, ``benchmarks/results/fp8_pv_layout.md``). ``page_ahead`` (TMA
    loads only, ``ValueError`` without) ``None``: on at head dim 128 without PV skip, as the
    default launches there were measured, else off. ``v_tma`` ``None``: the K-major copy's tiles
    by TMA wherever loads are TMA's (1.01-1.02x pointer loads, ``kernels_fp8_vtma.md``)."""
    split, lazy_rescale = _row_parts(split, head_dim, pv_skip, lazy_rescale, use_tma, fp8_dot)
    num_warps, num_stages, *maxnreg = launch or _attn_launch_params(head_dim, use_tma, pv_skip,
                                                                    fp8_dot)
    v_kmajor = fp8_dot if v_kmajor is None else v_kmajor
    if page_ahead is None:
        page_ahead = use_tma and head_dim == 128 and not pv_skip
    if page_ahead and not use_tma:
        raise ValueError("page_ahead reads the page ids of TMA block loads ahead: it needs TMA "
                         "loads (use_tma, pages of whole key blocks)")
    v_tma = v_kmajor and use_tma if v_tma is None else v_tma
    if v_tma and not (v_kmajor and use_tma):
        raise ValueError("v_tma reads V's K-major copy by TMA: it needs v_kmajor and use_tma")
    return AttendParams(use_tma, split, lazy_rescale, num_warps, num_stages, fp8_dot, v_kmajor,
                        bool(page_ahead), *(maxnreg or [None]), v_tma)


def sparse_paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    batch: PrefillBatch,
    block_map: BlockMap,
    scale: float,
    pvthreshd: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor | None = None,
    check_finite: bool = True,
    pv_skip: bool | None = None,
    launch: tuple[int, ...] | None = None,
    use_tma: bool | None = None,
    block_n: int = BLKK,
    split: int | None = None,
    lazy_rescale: float | None = None,
    kv_major: bool = True,
    group: int | None = None,
    scales: KVScales | None = None,
    fp8_dot: bool = False,
    tail_first: int = TAIL_FIRST,
    v_kmajor: bool | None = None,
    page_ahead: bool | None = None,
    v_tma: bool | None = None,
) -> torch.Tensor:
    """Block-sparse attention of a varlen prefill batch; writes the batch's rows of ``out``.

    ``q, out [num_tokens, Hq, D]``; caches ``[num_pages, page_size, Hkv, D]``, in ``q``'s dtype or
    fp8 (``float8_e4m3fn``, with their ``scales``; ``q`` may then be fp8 too, ``out`` is in the
    model's dtype: attention of the dequantised tensors; ``fp8_dot``: with an fp8 ``q``, both
    products in fp8, ``P`` rounded to fp8, as FlashAttention-3's fp8 forward); ``pvthreshd`` fp32
    ``[Hq]`` (>= 50 disables PV skip). ``stats`` (int64 ``[3]``), if given, gets
    ``[0, 0, pv_skipped_blocks]`` added on the device. ``pv_skip``: whether any head has PV skip on;
    ``None`` reads it from ``pvthreshd`` (a host sync: the backend knows it from its thresholds file
    and passes it). For benchmarks: ``launch`` overrides (num_warps, num_stages[, maxnreg]),
    ``use_tma`` the choice of TMA loads (``False``: pointer loads), ``block_n`` the key-block width
    of ``block_map``; ``split`` (programs a query block), ``lazy_rescale``, ``v_kmajor`` (V from a
    K-major copy of the values, made first), ``page_ahead`` and ``v_tma``: :func:`attend_params`'s
    (``None``: its defaults). ``kv_major`` (the default) launches every head's last ``tail_first``
    (:data:`TAIL_FIRST`) query blocks, then one KV head's other query programs before the next KV
    head's; ``False`` (benchmarks only) runs every head of one query block together.
    ``group``: for head slices, as :func:`~sparge_serve.kernels.predictor.predict_block_map`'s.

    Arguments are checked before any launch (``ValueError``; docs/DESIGN.md, "Argument
    checks"). ``check_finite`` also checks the values held in tensors: the thresholds (finite, in
    range) and the batch's offsets, lengths and page ids, a host sync for device tensors;
    ``False`` (the backend's calls) skips those and, for device tensors, every batch check.
    """
    check_paged_inputs(q, key_cache, value_cache, scales, check_finite)
    check_out_and_layout(q, key_cache, value_cache, out)
    check_batch(q, key_cache, batch, check_finite)
    check_scale(scale)
    if fp8_dot:
        check_fp8_dot(q, key_cache)
    num_heads = q.shape[1]
    check_head_thresholds("pvthreshd", pvthreshd, num_heads, q.device, check_finite)
    group = check_group(group, num_heads, key_cache.shape[2])
    check_block_map(block_map, batch, num_heads, q.device, block_n, as_mask=False)
    if pv_skip is None:
        pv_skip = bool((pvthreshd < PV_SKIP_OFF).any())
    page = key_cache.shape[1]
    tma_layout = tma_layout_ok(key_cache) and tma_layout_ok(value_cache)
    if use_tma is None:
        use_tma = tma_supported(q.device, page, block_n) and tma_layout
    elif use_tma and (page % block_n or not tma_layout):
        raise ValueError(f"TMA loads need key blocks of {block_n} inside one page and a cache of "
                         f"whole 16-byte aligned token rows; got {page}-token pages with strides "
                         f"{tuple(key_cache.stride())}")
    params = attend_params(q.shape[2], pv_skip, use_tma, split, lazy_rescale, launch, fp8_dot,
                           v_kmajor, page_ahead, v_tma)
    if params.v_kmajor and block_n != BLKK:
        raise ValueError(f"v_kmajor copies values in key blocks of {BLKK}; got block_n {block_n}")
    vt = values_kmajor(value_cache, batch) if params.v_kmajor else None
    attend_blocks(q, key_cache, value_cache, batch, block_map, scale, pvthreshd, out,
                  stats_buffer(stats, q.device), pv_skip, group, params, block_n, kv_major,
                  scales, tail_first, vt)
    return out


def attend_blocks(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  batch: PrefillBatch, block_map: BlockMap, scale: float,
                  pvthreshd: torch.Tensor, out: torch.Tensor, stats: torch.Tensor,
                  pv_skip: bool, group: int, params: AttendParams, block_n: int = BLKK,
                  kv_major: bool = True, scales: KVScales | None = None,
                  tail_first: int = TAIL_FIRST, vt: torch.Tensor | None = None) -> None:
    """:func:`sparse_paged_attention`'s launch, without its checks: the caller's arguments are
    valid (a planned step's, or checked), and ``params`` its launch (TMA loads only on caches
    that :func:`tma_layout_ok` accepts); ``vt``: where ``params.v_kmajor``, the values' K-major
    copy (``pooling.values_kmajor`` of ``value_cache`` and ``batch``)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    page = key_cache.shape[1]
    nreq, _, nqb, nkb = block_map.lut.shape
    k_desc = v_desc = None
    vt_strides = (0, 0, 0) if vt is None else vt.stride()[:3]
    if params.use_tma:
        k_desc = kv_descriptor(key_cache, block_n)
        if params.v_tma:  # the copy's 2-D view: its strides in rows
            v_desc = values_descriptor(vt, block_n)
            vt_strides = tuple(s // vt.stride(2) for s in vt_strides)
        elif vt is None:
            v_desc = kv_descriptor(value_cache, block_n)
    launch(_sparse_attn_kernel, (num_heads, nqb * params.split, nreq))(
        q, key_cache, value_cache, out, batch.block_table, batch.query_start_loc, batch.seq_lens,
        block_map.lut, block_map.count, pvthreshd, stats, k_desc, v_desc,
        *((None, None, None) if scales is None else
          (scales.q_scale, scales.k_scale, scales.v_scale)),
        vt, *vt_strides,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), batch.block_table.stride(0),
        nkb, nqb, num_heads, float(scale) * _LOG2E,
        GROUP=group, BLOCK_Q=BLKQ, BLOCK_N=block_n, HEAD_DIM=head_dim,
        PAGE=page, PV_SKIP=pv_skip, PV_OFF=PV_SKIP_OFF, UPCAST=INTERPRET, USE_TMA=params.use_tma,
        SPLIT=params.split, LAZY=params.lazy_rescale, KV_MAJOR=kv_major, TAIL_FIRST=tail_first,
        Q_SCALED=scales is not None and scales.q_scale is not None, KV_SCALED=scales is not None,
        FP8_DOT=params.fp8_dot, V_KMAJOR=vt is not None, PAGE_AHEAD=params.page_ahead,
        VT_TMA=params.v_tma,
        num_warps=params.num_warps, num_stages=params.num_stages,
        **({} if params.maxnreg is None else {"maxnreg": params.maxnreg}),
    )


__all__ = ["AttendParams", "attend_blocks", "attend_params", "check_fp8_dot",
           "sparse_paged_attention", "tma_layout_ok", "tma_supported"]
