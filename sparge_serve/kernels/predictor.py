"""Stage 1 of SpargeAttn as Triton kernels: which (query block, key block) pairs to compute.

For a varlen batch of prefill requests over vLLM's paged KV cache (docs/DESIGN.md, "Stage 1"):

1. ``_ksum_kernel``: per (request, KV head, chunk of 16 key blocks) the fp32 sum of the keys,
   over the *whole* context (prefix-cached tokens and earlier chunks included).
2. torch: the per-(request, KV head) key sum over those chunks (one reduction, no host sync).
3. ``_kblock_kernel``: the key mean ``mu`` (that sum over the context length), pooled smoothed
   keys ``mean(k - mu)`` (stored transposed, fp32) and the key-block self-similarity (steps
   1-3: :func:`pool_keys`).
4. ``_select_kernel``: one program per (q-head, query block, request) row: pooled query and its
   similarity, fp32 compressed scores against every valid key block (bottom-right causal), fp32
   softmax, sort-free CDF (or top-k) selection, forced blocks (``_select_row``), and the compact
   sorted list of kept key blocks (or, for the FA3 attention path, a bit set) + its length.

No host synchronisation and no Python loop over requests or heads: grids are sized from host
bounds (``max_query_len``, ``max_seq_len``) and programs past a request's end return at once.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sparge_serve.kernels.geometry import (
    BATCH_PTRS,
    BLKK,
    BLKQ,
    PV_SKIP_OFF,
    PrefillBatch,
    num_blocks,
)
from sparge_serve.kernels.launch import launch

KSUM_CHUNK = 4
"""Key blocks summed per program of the key-mean pass. NOTE: 16 made the pass latency-bound in
head chunks (one KV head: 32 programs of 16 loads at 32K, 52 us; H200 profile)."""
MAX_KEY_BLOCKS = 16384
"""Longest context the predictor handles, in key blocks (16384 * 64 = 1M tokens)."""
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_EPS = tl.constexpr(1e-6)


@dataclass(frozen=True)
class BlockMap:
    """Kept key blocks per (request, q-head, query block) row."""

    # [R, Hq, NQB, NKB_STRIDE] int16: kept key-block ids, ascending, first `count` valid
    # (NKB_STRIDE: the key-block count rounded up to 16, see `predict_block_map`); None from
    # sparge_paged_prefill when the map was built one head chunk at a time
    lut: torch.Tensor | None
    count: torch.Tensor  # [R, Hq, NQB] int32: number of kept key blocks (0 for rows past the query)
    n_valid: torch.Tensor  # [R, Hq, NQB] int32: number of causally valid key blocks of the row
    # [R, Hq, NQB, mask_words(NKB_STRIDE)] int32: the kept key blocks as a bit set (block j is
    # bit j % 32 of word j // 32), the FA3 path's form (`predict_block_map(as_mask=True)`, lut
    # None then): a sixteenth of the list's bytes
    mask: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_kv_block(
    cache_ptr, bt_ptr, j, seq_len, kvh,
    stride_page, stride_tok, stride_head,
    offs_n, offs_d,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    desc=None, USE_TMA: tl.constexpr = False, ZERO_TAIL: tl.constexpr = False,
):
    """Load key/value block ``j`` (``[BLOCK_N, D]``) of one request through its block table.

    Without TMA, rows at or past ``seq_len`` read as zeros. With TMA (``desc``: a 2-D descriptor
    over ``[num_pages * PAGE, token row]`` with ``[BLOCK_N, D]`` boxes, see
    ``attention._kv_descriptor``; ``PAGE % BLOCK_N == 0``) they hold whatever the page holds,
    unless ``ZERO_TAIL`` (callers mask scores of such keys; values must be zeroed).
    """
    pos = j * BLOCK_N + offs_n
    in_ctx = pos < seq_len
    if USE_TMA:
        page = tl.load(bt_ptr + (j * BLOCK_N) // PAGE)
        x = desc.load([page * PAGE + (j * BLOCK_N) % PAGE, kvh * stride_head])
        if ZERO_TAIL:
            x = tl.where(in_ctx[:, None], x, 0.0)
        return x
    if PAGE % BLOCK_N == 0:
        # NOTE: the whole key block lies inside one page: one page-id load, contiguous rows.
        page = tl.load(bt_ptr + (j * BLOCK_N) // PAGE).to(tl.int64)
        row = page * stride_page + ((j * BLOCK_N) % PAGE + offs_n) * stride_tok
    else:
        page = tl.load(bt_ptr + pos // PAGE, mask=in_ctx, other=0).to(tl.int64)
        row = page * stride_page + (pos % PAGE) * stride_tok
    ptrs = cache_ptr + row[:, None] + kvh * stride_head + offs_d[None, :]
    return tl.load(ptrs, mask=in_ctx[:, None], other=0.0)


# NOTE: head counts are never specialised on (a head chunk may have 1): one compiled variant
@triton.jit(do_not_specialize=["stride_bt", "NCH", "num_kv_heads"],
            do_not_specialize_on_alignment=BATCH_PTRS)
def _ksum_kernel(
    key_cache_ptr, bt_ptr, seq_lens_ptr, ksum_ptr,
    stride_page, stride_tok, stride_head, stride_bt,
    NCH, num_kv_heads,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
):
    """fp32 key sums of one (request, KV head) over ``CHUNK`` key blocks ``[c*CHUNK, ...)``."""
    c = tl.program_id(0)
    kvh = tl.program_id(1)
    r = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + r)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for j in range(c * CHUNK, tl.minimum((c + 1) * CHUNK, tl.cdiv(seq_len, BLOCK_N))):
        k = _load_kv_block(
            key_cache_ptr, bt_ptr + r * stride_bt, j, seq_len, kvh,
            stride_page, stride_tok, stride_head, offs_n, offs_d, PAGE, BLOCK_N,
        ).to(tl.float32)
        acc += tl.sum(k, axis=0)
    rh = (r * num_kv_heads + kvh).to(tl.int64)
    tl.store(ksum_ptr + (rh * NCH + c) * HEAD_DIM + offs_d, acc)


@triton.jit(do_not_specialize=["stride_bt", "num_kv_heads"],
            do_not_specialize_on_alignment=BATCH_PTRS)
def _kblock_kernel(
    key_cache_ptr, bt_ptr, seq_lens_ptr, ksum_ptr, pk_ptr, ksim_ptr,
    stride_page, stride_tok, stride_head, stride_bt,
    NKB, num_kv_heads,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Pooled smoothed key ``mean(k - mu)`` and self-similarity of key block ``j`` (``ksum``:
    the context's fp32 key sum, ``mu`` that over the context length)."""
    j = tl.program_id(0)
    kvh = tl.program_id(1)
    r = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + r)
    if j * BLOCK_N >= seq_len:
        return
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_kv_block(
        key_cache_ptr, bt_ptr + r * stride_bt, j, seq_len, kvh,
        stride_page, stride_tok, stride_head, offs_n, offs_d, PAGE, BLOCK_N,
    ).to(tl.float32)
    rh = (r * num_kv_heads + kvh).to(tl.int64)  # NOTE: R*Hkv*NKB*D can pass 2^31
    in_ctx = (j * BLOCK_N + offs_n) < seq_len
    n_rows = tl.minimum(seq_len - j * BLOCK_N, BLOCK_N).to(tl.float32)
    mu = tl.math.div_rn(tl.load(ksum_ptr + rh * HEAD_DIM + offs_d), seq_len.to(tl.float32))
    x = tl.where(in_ctx[:, None], k - mu[None, :], 0.0)
    pooled = tl.sum(x, axis=0) / n_rows
    norm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), _EPS)
    mean_unit = tl.sum(x / norm[:, None], axis=0) / n_rows
    # NOTE: pooled keys are stored transposed ([D, NKB]) so the select kernel reads them
    # coalesced along key blocks.
    tl.store(pk_ptr + rh * HEAD_DIM * NKB + offs_d * NKB + j, pooled)
    tl.store(ksim_ptr + rh * NKB + j, tl.sum(mean_unit * mean_unit, axis=0))


@triton.jit
def _float_bits(i):
    return i.to(tl.float32, bitcast=True)


@triton.jit
def _q_norms(q_rows, m_real, HEAD_DIM: tl.constexpr, DC: tl.constexpr):
    """Row norms ``[BLOCK_M]`` of a query block (``q_rows``: its rows' pointers), read in chunks
    of ``DC`` dimensions."""
    offs_c = tl.arange(0, DC)
    sq = tl.zeros([q_rows.shape[0]], dtype=tl.float32)
    for d0 in range(0, HEAD_DIM, DC):
        qc = tl.load(q_rows + (d0 + offs_c)[None, :], mask=m_real[:, None], other=0.0)
        qc = qc.to(tl.float32)
        sq += tl.sum(qc * qc, axis=1)
    return tl.maximum(tl.sqrt(sq), _EPS)


@triton.jit
def _select_row(
    q_ptr, pk_ptr, ksim_ptr, sim_ptr, cdf_ptr, q_start, q_len, seq_len, b, h, r,
    stride_qt, stride_qh, NKB, num_kv_heads, scale, topk,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    NKB_PAD: tl.constexpr, DC: tl.constexpr, USE_TOPK: tl.constexpr,
):
    """Stage 1 for one (request ``r``, q-head ``h``, query block ``b``) row with real queries:
    returns ``(keep [NKB_PAD] bool, n_valid)``, the kept key blocks among the valid ones."""
    ctx = seq_len - q_len
    kvh = h // GROUP
    rh = (r * num_kv_heads + kvh).to(tl.int64)  # NOTE: R*Hkv*NKB*D can pass 2^31

    # NOTE: q is read in chunks of DC dimensions, never as a whole [BLOCK_M, D] fp32 tile (which
    # spilled registers at 4 warps, scripts/aot_compile_check.py): row norms in a first pass, the
    # pooled query, its self-similarity and the compressed scores in a second.
    offs_m = b * BLOCK_M + tl.arange(0, BLOCK_M)
    m_real = offs_m < q_len
    n_rows = tl.minimum(q_len - b * BLOCK_M, BLOCK_M).to(tl.float32)
    q_rows = q_ptr + (q_start + offs_m).to(tl.int64)[:, None] * stride_qt + h * stride_qh
    offs_c = tl.arange(0, DC)
    norm = _q_norms(q_rows, m_real, HEAD_DIM, DC)

    simthr = tl.load(sim_ptr + h)
    first = ctx + b * BLOCK_M
    last = ctx + tl.minimum((b + 1) * BLOCK_M, q_len) - 1
    n_valid = last // BLOCK_N + 1
    offs_j = tl.arange(0, NKB_PAD)
    valid = offs_j < n_valid
    # NOTE: the pooled-key loads are masked in whole groups of 4 key blocks (16 bytes; rows are
    # padded to 16 blocks, so these stay in the row, and the extra blocks are never selected): a
    # mask at block granularity split each vector load into four scalar ones, and the kernel
    # was L1-bound on them (Nsight Compute, 32K)
    loadable = offs_j < (n_valid + 3) // 4 * 4

    # pooled query (real rows), its self-similarity |mean of unit rows|^2, and the compressed
    # scores pooled_q . pooled_k, all accumulated over the chunks, fp32
    # NOTE: the 64-bit part of the offset is a scalar; tile offsets (< D * NKB) stay 32-bit.
    pk_head = pk_ptr + rh * HEAD_DIM * NKB
    q_sim = tl.zeros([], dtype=tl.float32)
    s = tl.zeros([NKB_PAD], dtype=tl.float32)
    for d0 in range(0, HEAD_DIM, DC):
        qc = tl.load(q_rows + (d0 + offs_c)[None, :], mask=m_real[:, None], other=0.0)
        qc = qc.to(tl.float32)
        mean_unit = tl.sum(qc / norm[:, None], axis=0) / n_rows
        q_sim += tl.sum(mean_unit * mean_unit, axis=0)
        pq = tl.sum(qc, axis=0) / n_rows
        pk = tl.load(
            pk_head + (d0 + offs_c)[None, :] * NKB + offs_j[:, None],
            mask=loadable[:, None], other=0.0,
        )
        s += tl.sum(pk * pq[None, :], axis=1)
    return _select_from_scores(s, q_sim, ksim_ptr + rh * NKB, cdf_ptr, h, simthr, first,
                               offs_j, valid, n_valid, scale, topk, BLOCK_N, USE_TOPK)


@triton.jit
def _select_from_scores(s, q_sim, ksim_row, cdf_ptr, h, simthr, first, offs_j, valid, n_valid,
                        scale, topk, BLOCK_N: tl.constexpr, USE_TOPK: tl.constexpr):
    """The selection of one row from its raw compressed scores ``s [NKB_PAD]`` (``pq . pk``)
    and query self-similarity ``q_sim`` (``valid``: ``offs_j < n_valid``): ``(keep [NKB_PAD]
    bool, n_valid)``.

    NOTE: the threshold searches test one float (as bits) per step. Testing 3-15 at once (one
    ``[NKB_PAD, RADIX]`` reduction per step, 8-15 steps instead of 31) measured 0.64-1.0x
    (``history/kernels_v10_predictor_h200.md``): the reductions are not what bounds the kernel.
    """
    k_sim = tl.load(ksim_row + offs_j, mask=valid, other=0.0) > simthr
    allowed = valid & k_sim
    s = tl.where(allowed, s * scale, float("-inf"))
    s_max = tl.max(s, axis=0)
    s_max = tl.where(s_max == float("-inf"), 0.0, s_max)
    e = tl.where(allowed, tl.exp(s - s_max), 0.0)
    p = e / tl.maximum(tl.sum(e, axis=0), 1e-30)

    if USE_TOPK:
        # keep the n_keep most probable valid blocks, lower index first on ties: t = the largest
        # float with count(valid & p >= t) >= n_keep (holds at lo, fails at hi)
        n_keep = tl.maximum(tl.floor(topk * n_valid.to(tl.float32) + 0.5), 1.0).to(tl.int32)
        lo = tl.zeros([], dtype=tl.int32)  # count(valid & p >= bits(lo)) >= n_keep holds
        hi = tl.full([], 0x3F800001, dtype=tl.int32)  # just above 1.0: count is 0
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            n_ge = tl.sum((valid & (p >= _float_bits(mid))).to(tl.int32), axis=0)
            ok = n_ge >= n_keep
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        t = _float_bits(lo)
        above = valid & (p > t)
        ties = valid & (p == t)
        tie_rank = tl.cumsum(ties.to(tl.int32), axis=0)
        n_above = tl.sum(above.to(tl.int32), axis=0)
        selected = above | (ties & (tie_rank <= n_keep - n_above))
    else:
        # CDF: keep j iff the mass of blocks at least as probable as j is <= cdfthreshd, or j is
        # the most probable. mass(t) = sum(p >= t) is non-increasing; find the smallest t (as
        # float bits) with mass(t) <= cdf; fp64 sums keep the comparison exact enough.
        cdf = tl.load(cdf_ptr + h)
        p64 = p.to(tl.float64)
        lo = tl.zeros([], dtype=tl.int32)
        hi = tl.full([], 0x3F800001, dtype=tl.int32)
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            mass = tl.sum(tl.where(p >= _float_bits(mid), p64, 0.0), axis=0)
            ok = mass <= cdf
            lo = tl.where(ok, lo, mid)
            hi = tl.where(ok, mid, hi)
        p_max = tl.max(p, axis=0)
        selected = allowed & ((p >= _float_bits(hi)) | (p == p_max))
        selected = tl.where(cdf >= 1.0, valid, selected)

    # diagonal: holds a position at or after the first query's (its own token's block included)
    diag = (offs_j + 1) * BLOCK_N - 1 >= first
    forced = (k_sim == 0) | diag | (offs_j == 0)
    forced = tl.where(q_sim <= simthr, valid, forced)
    keep = valid & (selected | forced)
    return keep, n_valid


@triton.jit
def _count_blocks(stats_ptr, n_valid, n_kept):
    """Adds a row's valid and kept key blocks to the block counters ``stats_ptr[0:2]`` (int64;
    :func:`stats_buffer`)."""
    tl.atomic_add(stats_ptr, n_valid.to(tl.int64), sem="relaxed")
    tl.atomic_add(stats_ptr + 1, n_kept.to(tl.int64), sem="relaxed")


@triton.jit
def _store_list(lut_ptr, row_id, NKB, keep, offs_j):
    """``keep`` as row ``row_id`` of a :attr:`BlockMap.lut`: its kept key blocks as an
    ascending list (``NKB``: the row stride)."""
    pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(lut_ptr + row_id.to(tl.int64) * NKB + pos, offs_j.to(tl.int16), mask=keep)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _store_bits(mask_ptr, row_id, NKB, keep, NKB_PAD: tl.constexpr):
    """``keep [NKB_PAD]`` as row ``row_id`` of a :attr:`BlockMap.mask` (``NKB``: the list's row
    stride)."""
    BITS: tl.constexpr = 32 if NKB_PAD >= 32 else NKB_PAD
    WORDS: tl.constexpr = NKB_PAD // BITS
    bits = tl.reshape(keep.to(tl.int32), [WORDS, BITS]) << tl.arange(0, BITS)[None, :]
    words = tl.reduce(bits, 1, _or)
    offs_w = tl.arange(0, WORDS)
    n_words = (NKB + 31) // 32
    tl.store(mask_ptr + row_id.to(tl.int64) * n_words + offs_w, words, mask=offs_w < n_words)


@triton.jit
def _store_counts(count_ptr, nvalid_ptr, stats_ptr, row_id, keep, n_valid):
    """A row's kept and valid block counts, also added to the block counters."""
    n_kept = tl.sum(keep.to(tl.int32), axis=0)
    tl.store(count_ptr + row_id, n_kept)
    tl.store(nvalid_ptr + row_id, n_valid)
    _count_blocks(stats_ptr, n_valid, n_kept)


@triton.jit(do_not_specialize=["NQB", "num_heads", "num_kv_heads"],
            do_not_specialize_on_alignment=BATCH_PTRS)
def _select_kernel(
    q_ptr, qsl_ptr, seq_lens_ptr, pk_ptr, ksim_ptr, sim_ptr, cdf_ptr,
    lut_ptr, count_ptr, nvalid_ptr, stats_ptr,
    stride_qt, stride_qh,
    NKB, NQB, num_heads, num_kv_heads, scale, topk,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    NKB_PAD: tl.constexpr, DC: tl.constexpr, USE_TOPK: tl.constexpr, MASK: tl.constexpr,
):
    """One row's selection, stored as a list (``lut_ptr``: :attr:`BlockMap.lut`) or, with
    ``MASK``, as a bit set (``lut_ptr``: :attr:`BlockMap.mask`)."""
    h = tl.program_id(0)
    b = tl.program_id(1)
    r = tl.program_id(2)
    q_start = tl.load(qsl_ptr + r)
    q_len = tl.load(qsl_ptr + r + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + r)
    row_id = (r * num_heads + h) * NQB + b
    if b * BLOCK_M >= q_len:
        tl.store(count_ptr + row_id, 0)
        tl.store(nvalid_ptr + row_id, 0)
        if MASK:  # no set bit past the query (a list's entries past its count are not read)
            _store_bits(lut_ptr, row_id, NKB, tl.arange(0, NKB_PAD) < 0, NKB_PAD)
        return
    keep, n_valid = _select_row(
        q_ptr, pk_ptr, ksim_ptr, sim_ptr, cdf_ptr, q_start, q_len, seq_len, b, h, r,
        stride_qt, stride_qh, NKB, num_kv_heads, scale, topk,
        GROUP, BLOCK_M, BLOCK_N, HEAD_DIM, NKB_PAD, DC, USE_TOPK,
    )
    if MASK:
        _store_bits(lut_ptr, row_id, NKB, keep, NKB_PAD)
    else:
        _store_list(lut_ptr, row_id, NKB, keep, tl.arange(0, NKB_PAD))
    _store_counts(count_ptr, nvalid_ptr, stats_ptr, row_id, keep, n_valid)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


# NOTE: the checks below are for direct callers of the public entry points. Those that read the
# values of tensors (thresholds, batch offsets, lengths, page ids) read them on the host: free for
# CPU tensors, a device synchronisation for device tensors, which ``check_finite=False`` skips
# together with the rest of the batch checks (the backend's calls: it validates its thresholds
# at load and builds its batches itself).


def _on_host(t: torch.Tensor, check_values: bool) -> torch.Tensor | None:
    """``t``'s values on the host: itself on the CPU, a copy (a sync) with ``check_values``, else
    ``None`` (its value checks are skipped)."""
    if t.device.type == "cpu":
        return t
    return t.cpu() if check_values else None


def check_paged_inputs(q: torch.Tensor, key_cache: torch.Tensor, value_cache=None) -> None:
    """Raise ``ValueError`` (before any launch) for layouts/dtypes the kernels do not support."""
    for name, t in (("q", q), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype {q.dtype} unsupported; supported: float16, bfloat16")
    head_dim = q.shape[2]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} unsupported; supported: {SUPPORTED_HEAD_DIMS}")
    caches = [key_cache] if value_cache is None else [key_cache, value_cache]
    for name, c in zip(("key_cache", "value_cache"), caches, strict=False):
        if c.dim() != 4 or c.shape[3] != head_dim:
            raise ValueError(
                f"{name} must be [num_pages, page_size, num_kv_heads, {head_dim}] (vLLM's "
                f"FlashAttention layout), got shape {tuple(c.shape)}"
            )
        if c.dtype != q.dtype:
            raise ValueError(
                f"{name} dtype {c.dtype} differs from q dtype {q.dtype}; fp8 KV caches are not "
                "supported"
            )
        if c.stride(3) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride {c.stride(3)})")
        if c.device != q.device:
            raise ValueError(f"{name} is on {c.device}, q on {q.device}")
    if value_cache is not None and value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache shape {tuple(value_cache.shape)} differs from key_cache "
                         f"shape {tuple(key_cache.shape)}: pass one layer's K and V caches")
    if q.stride(2) != 1:
        raise ValueError("q must be contiguous in head_dim")
    if q.shape[1] % key_cache.shape[2]:
        raise ValueError(
            f"{q.shape[1]} query heads are not a multiple of {key_cache.shape[2]} KV heads"
        )


def check_out_and_layout(q, key_cache, value_cache, out) -> None:
    """``ValueError`` for an ``out`` unlike ``q`` (shape, dtype, device, unit stride in head_dim)
    or K and V caches of different layouts."""
    if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.stride(2) != 1:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out must have q's shape {tuple(q.shape)} and be contiguous in "
                         f"head_dim, got {got}")
    if out.dtype != q.dtype:
        raise ValueError(f"out dtype {out.dtype} differs from q dtype {q.dtype}: allocate out "
                         "like q (torch.empty_like(q))")
    if out.device != q.device:
        raise ValueError(f"out is on {out.device}, q on {q.device}: allocate out on q's device")
    if key_cache.stride() != value_cache.stride():
        raise ValueError("key_cache and value_cache must share one layout (strides)")


def check_scale(scale) -> None:
    """``ValueError`` unless ``scale`` (the softmax scale) is a finite number > 0."""
    try:
        value = float(scale)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"scale must be a number (the softmax scale, usually head_dim ** -0.5), "
                         f"got {type(scale).__name__}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"scale must be finite and > 0 (the softmax scale, usually head_dim ** "
                         f"-0.5), got {value}")


THRESHOLD_RANGES = {
    "simthreshd1": (-1.0, 1.0, "in [-1, 1] (1: no block is similar, every block is kept)"),
    "cdfthreshd": (0.0, 1.0, "in [0, 1] (1: every block is kept; 0: only the forced blocks and "
                             "the most probable one)"),
    "pvthreshd": (0.0, math.inf, f">= 0 ({PV_SKIP_OFF:g} or more turns the PV skip off)"),
}
"""Valid values of each per-head threshold: ``(low, high, rule)``, both ends included."""


def check_head_thresholds(name: str, t: torch.Tensor, num_heads: int, device, check_finite: bool,
                          check_range: bool = True):
    """Per-head thresholds must be fp32 ``[num_heads]`` on the kernels' device, finite and (with
    ``check_range``) in their :data:`THRESHOLD_RANGES` range (values: on CPU tensors always, on
    device tensors with ``check_finite``, a host sync)."""
    if not isinstance(t, torch.Tensor) or t.shape != (num_heads,) or t.dtype != torch.float32:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        dtype = t.dtype if isinstance(t, torch.Tensor) else None
        raise ValueError(
            f"{name} must be a float32 tensor of shape ({num_heads},) (one value per local query "
            f"head), got {shape} {dtype}"
        )
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    # NOTE: a host sync for device tensors; the backend validates its thresholds once at load
    # and passes False.
    values = _on_host(t, check_finite)
    if values is None:
        return
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contains NaN or inf: recalibrate or fix the thresholds file")
    lo, hi, rule = THRESHOLD_RANGES[name]
    bad = torch.nonzero((values < lo) | (values > hi)).flatten()
    if check_range and bad.numel():
        h = int(bad[0])
        raise ValueError(f"{name}[{h}] = {float(values[h]):g} is out of range: it must be {rule}; "
                         "recalibrate or fix the thresholds file")


def _check_bound(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"batch.{name} must be a host int >= 1 (a bound on every request's "
                         f"{name[4:]}), got {value!r}")


def check_batch(q: torch.Tensor, key_cache: torch.Tensor, batch: PrefillBatch,
                check_values: bool = True) -> None:
    """``ValueError`` (before any launch) for batch metadata the kernels would misread: wrong
    dtypes, devices or shapes, and (reading the values on the host) offsets outside ``q``, a
    ``max_query_len`` or ``max_seq_len`` below some request's length (rows past it would never
    be computed), a ``query_len`` above its ``seq_len``, or block-table entries that are no page
    of the cache.

    Runs for CPU tensors, and for device tensors with ``check_values`` (a host sync). Without it
    a device batch is not checked at all: the backend builds its batches itself, and the checks
    cost host time on every layer call (about 14 us on a 2-core CPU host).
    """
    if not check_values and q.device.type != "cpu":
        return
    if not isinstance(batch, PrefillBatch):
        raise ValueError(f"batch must be a PrefillBatch, got {type(batch).__name__}")
    metadata = (("query_start_loc", batch.query_start_loc, 1), ("seq_lens", batch.seq_lens, 1),
                ("block_table", batch.block_table, 2))
    for name, t, dims in metadata:
        if not isinstance(t, torch.Tensor) or t.dim() != dims or t.dtype != torch.int32:
            got = (f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor)
                   else type(t).__name__)
            raise ValueError(f"batch.{name} must be a {dims}-D int32 tensor, got {got}")
        if t.device != q.device:
            raise ValueError(f"batch.{name} is on {t.device}, q on {q.device}: the batch "
                             "metadata must live on q's device")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"batch.{name} must be contiguous in its last dimension, got "
                             f"stride {t.stride(-1)}")
    nreq = batch.seq_lens.shape[0]
    if nreq < 1:
        raise ValueError("batch.seq_lens is empty: a batch needs at least one request")
    if batch.query_start_loc.shape[0] != nreq + 1 or batch.block_table.shape[0] != nreq:
        raise ValueError(f"batch has {nreq} seq_lens, so query_start_loc must have {nreq + 1} "
                         f"entries and block_table {nreq} rows; got "
                         f"{batch.query_start_loc.shape[0]} and {batch.block_table.shape[0]}")
    _check_bound("max_query_len", batch.max_query_len)
    _check_bound("max_seq_len", batch.max_seq_len)

    # the values (on the host: a copy of device tensors, a sync)
    qsl, seq = batch.query_start_loc.cpu().long(), batch.seq_lens.cpu().long()
    q_lens = qsl[1:] - qsl[:-1]
    if qsl[0] < 0:
        raise ValueError(f"batch.query_start_loc[0] is {int(qsl[0])}: offsets into q start at 0 "
                         "or later")
    down = torch.nonzero(q_lens < 0).flatten()
    if down.numel():
        r = int(down[0])
        raise ValueError(f"batch.query_start_loc decreases at request {r} ({int(qsl[r])} -> "
                         f"{int(qsl[r + 1])}): offsets must be non-decreasing")
    if qsl[-1] > q.shape[0]:
        raise ValueError(f"batch.query_start_loc ends at {int(qsl[-1])} but q has {q.shape[0]} "
                         "rows: pass the q (and out) that these offsets index")
    r = int(q_lens.argmax())
    if q_lens[r] > batch.max_query_len:
        raise ValueError(f"batch.max_query_len {batch.max_query_len} is less than request {r}'s "
                         f"query_len {int(q_lens[r])}: rows past it would never be computed; "
                         "pass the longest query_len (or more)")
    short = torch.nonzero(seq < q_lens).flatten()
    if short.numel():
        r = int(short[0])
        raise ValueError(f"request {r}'s query_len {int(q_lens[r])} exceeds its seq_len "
                         f"{int(seq[r])}: batch.seq_lens counts the whole context, the new "
                         "tokens included")
    r = int(seq.argmax())
    if seq[r] > batch.max_seq_len:
        raise ValueError(f"batch.max_seq_len {batch.max_seq_len} is less than request {r}'s "
                         f"seq_len {int(seq[r])}: pass the longest seq_len (or more)")
    num_pages, page = key_cache.shape[0], key_cache.shape[1]
    pages = (seq + page - 1) // page
    r = int(pages.argmax())
    if pages[r] > batch.block_table.shape[1]:
        raise ValueError(f"request {r}'s seq_len {int(seq[r])} needs {int(pages[r])} pages of "
                         f"{page} tokens, but batch.block_table has {batch.block_table.shape[1]} "
                         "columns")
    table = batch.block_table.cpu()
    used = torch.arange(table.shape[1])[None, :] < pages[:, None]
    bad = torch.nonzero(used & ((table < 0) | (table >= num_pages)))
    if bad.numel():
        r, c = (int(x) for x in bad[0])
        raise ValueError(f"batch.block_table[{r}, {c}] = {int(table[r, c])} is no page of the "
                         f"KV cache (key_cache has {num_pages} pages: ids 0..{num_pages - 1})")


def check_block_map(bm: BlockMap, batch: PrefillBatch, num_heads: int, device,
                    block_n: int = BLKK, as_mask: bool | None = None) -> None:
    """``ValueError`` (before any launch) unless ``bm`` is a block map of ``batch``'s rows for
    ``num_heads`` query heads on ``device``, with key blocks of ``block_n``: as lists
    (``as_mask=False``: :attr:`BlockMap.lut`), bit sets (``True``: :attr:`BlockMap.mask`) or
    either (``None``)."""
    if not isinstance(bm, BlockMap):
        raise ValueError(f"block_map must be a BlockMap (predict_block_map's), got "
                         f"{type(bm).__name__}")
    if as_mask is None:
        as_mask = bm.mask is not None
    table, kind = (bm.mask, "mask") if as_mask else (bm.lut, "lut")
    if table is None:
        raise ValueError(f"block_map has no {kind} (head-chunked calls keep only the counts): "
                         f"make it with predict_block_map(as_mask={as_mask})")
    rows = (batch.num_reqs, num_heads, num_blocks(batch.max_query_len, BLKQ))
    nkb = num_blocks(batch.max_seq_len, block_n)
    width = mask_words(nkb) if as_mask else nkb
    dtype = torch.int32 if as_mask else torch.int16
    for name, t, want in (("count", bm.count, torch.int32), (kind, table, dtype)):
        if tuple(t.shape[:3]) != rows:
            raise ValueError(f"block_map was predicted for a different batch or heads: its {name} "
                             f"has rows {tuple(t.shape[:3])}, this call (requests, heads, query "
                             f"blocks) {rows}")
        if t.dtype != want or t.device != device or not t.is_contiguous():
            raise ValueError(f"block_map.{name} must be a contiguous {want} tensor on {device}, "
                             f"got {t.dtype} on {t.device} (contiguous: {t.is_contiguous()})")
    if bm.count.dim() != 3 or table.dim() != 4 or table.shape[3] < width:
        raise ValueError(f"block_map.{kind} must be [R, Hq, NQB, >= {width}] for contexts of "
                         f"{batch.max_seq_len} tokens in key blocks of {block_n}, got shape "
                         f"{tuple(table.shape)} (count: {tuple(bm.count.shape)}): predict it "
                         "for this batch")


def check_group(group: int | None, num_heads: int, num_kv_heads: int) -> int:
    """Query heads per KV head for (slices of) ``num_heads`` and ``num_kv_heads`` heads:
    ``group`` (``ValueError`` unless the slices pair up under it), or ``Hq // Hkv``."""
    if group is None:
        return num_heads // num_kv_heads
    if group < 1 or not (num_heads == group * num_kv_heads or (
            num_kv_heads == 1 and num_heads < group and group % num_heads == 0)):
        raise ValueError(f"{num_heads} query heads and {num_kv_heads} KV heads are no head chunk "
                         f"of a layer with {group} query heads per KV head")
    return group


def key_block_stride(nkb: int) -> int:
    """Row stride of the per-key-block buffers: ``nkb`` rounded up to 16.

    NOTE: aligned rows, and the kernels (which take it as their row stride NKB) compile once for
    every context length.
    """
    return num_blocks(nkb, 16) * 16


def mask_words(nkb_stride: int) -> int:
    """int32 words of a :attr:`BlockMap.mask` row (``nkb_stride``: :func:`key_block_stride`)."""
    return num_blocks(nkb_stride, 32)


def selection_tile(nkb: int) -> int:
    """``NKB_PAD``: the selection's key-block tile for ``nkb`` key blocks (a power of two >= 16)."""
    return max(16, triton.next_power_of_2(nkb))


def _select_dc(nkb_pad: int, num_warps: int) -> int:
    """Dimensions per chunk keeping the [NKB_PAD, DC] pooled-key tile at <= 64 fp32 per thread."""
    return max(1, min(16, (64 * 32 * num_warps) // nkb_pad))


def _select_launch_params(nkb_pad: int) -> tuple[int, int]:
    """(DC, num_warps) of the select kernel.

    NOTE: 4 warps up to 2048 key blocks (128K tokens): there 4 warps with 4 dimensions per chunk
    (120 registers, four programs per multiprocessor) were 1.04-1.07x faster than 8 warps with 8
    (``history/kernels_v10_predictor_h200.md``); 8 warps beyond (4 warps would need 214, AOT
    check).
    """
    num_warps = 4 if nkb_pad <= 2048 else 8
    return _select_dc(nkb_pad, num_warps), num_warps


@dataclass(frozen=True)
class PooledKeys:
    """Stage 1's per-key-block data of a batch (``_kblock_kernel``'s output)."""

    pk: torch.Tensor  # [R, Hkv, D, NKB_STRIDE] fp32: pooled smoothed keys (transposed)
    ksim: torch.Tensor  # [R, Hkv, NKB_STRIDE] fp32: key-block self-similarity
    nkb: int  # key blocks of the longest context
    nkb_stride: int  # nkb rounded up to 16 (the buffers' row stride)
    nkb_pad: int  # nkb rounded up to a power of two >= 16 (the selection tile)


def stats_buffer(stats: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The block counters the kernels add into: ``stats`` (int64 ``[3]``: valid, kept and
    PV-skipped key blocks) after checking it, or a fresh zeroed one to discard."""
    if stats is None:
        return torch.zeros(3, dtype=torch.int64, device=device)
    if stats.dtype != torch.int64 or stats.shape != (3,) or stats.stride(0) != 1 or (
            stats.device != device):
        raise ValueError(f"stats must be a contiguous int64 [3] tensor on {device}; got "
                         f"{stats.dtype} {tuple(stats.shape)} strides {stats.stride()} on "
                         f"{stats.device}")
    return stats


def check_predictor_args(q, key_cache, batch, scale, simthreshd1, cdfthreshd, topk,
                         check_finite):
    """``ValueError`` (before any launch) for bad stage-1 arguments."""
    check_paged_inputs(q, key_cache)
    check_batch(q, key_cache, batch, check_finite)
    check_scale(scale)
    check_head_thresholds("simthreshd1", simthreshd1, q.shape[1], q.device, check_finite)
    # NOTE: top-k mode never reads cdfthreshd: any finite value passes
    check_head_thresholds("cdfthreshd", cdfthreshd, q.shape[1], q.device, check_finite,
                          check_range=topk is None)
    if topk is not None and not 0.0 < topk <= 1.0:
        raise ValueError(f"topk must be in (0, 1], got {topk}")
    if num_blocks(batch.max_seq_len, BLKK) > MAX_KEY_BLOCKS:
        raise ValueError(
            f"context of {batch.max_seq_len} tokens exceeds the predictor's limit of "
            f"{MAX_KEY_BLOCKS * BLKK}; serve such prompts dense (min_sparse_len / mode=dense)"
        )


def pool_keys(key_cache: torch.Tensor, batch: PrefillBatch) -> PooledKeys:
    """Steps 1-3 of the module docstring: pooled smoothed keys and key-block similarity."""
    _, page, num_kv_heads, head_dim = key_cache.shape
    nkb = num_blocks(batch.max_seq_len, BLKK)
    nkb_stride = key_block_stride(nkb)
    nreq = batch.num_reqs
    f32 = dict(dtype=torch.float32, device=key_cache.device)
    # NOTE: key sums per chunk of KSUM_CHUNK blocks: a quarter of a per-block buffer's memory,
    # and temporary (key_sums_bytes)
    nch = num_blocks(nkb, KSUM_CHUNK)
    ksum = torch.empty(nreq, num_kv_heads, nch, head_dim, **f32)
    pk = torch.empty(nreq, num_kv_heads, head_dim, nkb_stride, **f32)
    ksim = torch.empty(nreq, num_kv_heads, nkb_stride, **f32)
    strides = (key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
               batch.block_table.stride(0))
    launch(_ksum_kernel, (nch, num_kv_heads, nreq))(
        key_cache, batch.block_table, batch.seq_lens, ksum, *strides, nch, num_kv_heads,
        PAGE=page, BLOCK_N=BLKK, HEAD_DIM=head_dim, CHUNK=KSUM_CHUNK, num_warps=4,
    )
    launch(_kblock_kernel, (nkb, num_kv_heads, nreq))(
        key_cache, batch.block_table, batch.seq_lens, ksum.sum(2), pk, ksim, *strides,
        nkb_stride, num_kv_heads, PAGE=page, BLOCK_N=BLKK, HEAD_DIM=head_dim, num_warps=4,
    )
    return PooledKeys(pk, ksim, nkb, nkb_stride, selection_tile(nkb))


def pooled_keys_bytes(num_kv_heads: int, head_dim: int, max_reqs: int, max_seq_len: int) -> int:
    """Device memory of :func:`pool_keys`' result (fp32 pooled keys and similarity), alive while
    block maps are made from it."""
    nkb_stride = key_block_stride(num_blocks(max_seq_len, BLKK))
    return 4 * max_reqs * num_kv_heads * (head_dim + 1) * nkb_stride


def key_sums_bytes(num_kv_heads: int, head_dim: int, max_reqs: int, max_seq_len: int) -> int:
    """Device memory of :func:`pool_keys`' temporaries (fp32 key sums per chunk of
    :data:`KSUM_CHUNK` key blocks, and their total), freed when it returns: never alive with a
    block map."""
    nch = num_blocks(num_blocks(max_seq_len, BLKK), KSUM_CHUNK)
    return 4 * max_reqs * num_kv_heads * head_dim * (nch + 1)


def predict_block_map(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    batch: PrefillBatch,
    scale: float,
    simthreshd1: torch.Tensor,
    cdfthreshd: torch.Tensor,
    topk: float | None = None,
    stats: torch.Tensor | None = None,
    check_finite: bool = True,
    select_dc: int | None = None,
    select_warps: int | None = None,
    pooled: PooledKeys | None = None,
    group: int | None = None,
    as_mask: bool = False,
) -> BlockMap:
    """Stage 1 for a varlen prefill batch. See the module docstring and docs/DESIGN.md.

    ``q [num_tokens, Hq, D]`` holds the new tokens of every request (``batch.query_start_loc``);
    ``key_cache [num_pages, page_size, Hkv, D]``. ``stats`` (int64 ``[3]``), if given, gets
    ``[valid_blocks, kept_blocks, 0]`` added on the device (by the select kernel itself).
    ``select_dc`` (a power of two up to 32) and ``select_warps`` (4 or 8) override the select
    kernel's dimensions per chunk and warps (:func:`_select_launch_params`; benchmarks only,
    same block map).

    Head chunks (``attention.sparge_paged_prefill``): ``q`` and ``key_cache`` may be head slices
    of the layer's tensors, ``pooled`` that key slice's :func:`pool_keys` (computed once for the
    chunks that share it), and ``group`` the layer's query heads per KV head (default: ``Hq //
    Hkv`` of the slices; a slice of fewer heads than one group passes the layer's, so that query
    head ``h`` of the slice still reads KV head ``h // group`` and the kernel is the one the
    warm-up compiled).

    ``as_mask``: the map as bit sets (:attr:`BlockMap.mask`, for the FA3 attention path) instead
    of lists (``lut``, for :func:`~sparge_serve.kernels.attention.sparse_paged_attention`).

    Arguments are checked before any launch (``ValueError``; docs/DESIGN.md, "Argument
    checks"). ``check_finite`` also checks the values held in tensors: the thresholds (finite, in
    range) and the batch's offsets, lengths and page ids, a host sync for device tensors;
    ``False`` (the backend's calls) skips those and, for device tensors, every batch check.
    """
    check_predictor_args(q, key_cache, batch, scale, simthreshd1, cdfthreshd, topk,
                         check_finite)
    if select_dc not in (None, 1, 2, 4, 8, 16, 32) or select_warps not in (None, 4, 8):
        raise ValueError(f"select_dc must be a power of two up to 32 and select_warps 4 or 8; "
                         f"got {select_dc} and {select_warps}")
    group = check_group(group, q.shape[1], key_cache.shape[2])
    return select_blocks(q, key_cache, batch, scale, simthreshd1, cdfthreshd, topk,
                         stats_buffer(stats, q.device), pooled, group, select_dc=select_dc,
                         select_warps=select_warps, as_mask=as_mask)


def select_blocks(q, key_cache, batch, scale, simthreshd1, cdfthreshd, topk, stats, pooled,
                  group, counts=None, select_dc=None, select_warps=None,
                  as_mask=False) -> BlockMap:
    """:func:`predict_block_map` without its checks (the caller's arguments are checked: head
    chunks check the layer's once); ``counts``: an int32 ``[2, R, Hq, NQB]`` buffer for the
    map's ``count`` and ``n_valid`` (default: new)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    nqb = num_blocks(batch.max_query_len, BLKQ)
    nreq = batch.num_reqs
    if pooled is None:
        pooled = pool_keys(key_cache, batch)
    nkb_stride, nkb_pad = pooled.nkb_stride, pooled.nkb_pad
    if as_mask:
        lut = torch.empty(nreq, num_heads, nqb, mask_words(nkb_stride), dtype=torch.int32,
                          device=q.device)
    else:
        lut = torch.empty(nreq, num_heads, nqb, nkb_stride, dtype=torch.int16, device=q.device)
    if counts is None:
        counts = torch.empty(2, nreq, num_heads, nqb, dtype=torch.int32, device=q.device)
    num_warps = select_warps or _select_launch_params(nkb_pad)[1]
    dc = select_dc or _select_dc(nkb_pad, num_warps)
    launch(_select_kernel, (num_heads, nqb, nreq))(
        q, batch.query_start_loc, batch.seq_lens, pooled.pk, pooled.ksim, simthreshd1,
        cdfthreshd, lut, counts[0], counts[1], stats,
        q.stride(0), q.stride(1),
        nkb_stride, nqb, num_heads, key_cache.shape[2], float(scale), float(topk or 1.0),
        GROUP=group, BLOCK_M=BLKQ, BLOCK_N=BLKK, HEAD_DIM=head_dim,
        NKB_PAD=nkb_pad, DC=dc, USE_TOPK=topk is not None, MASK=as_mask,
        num_warps=num_warps,
    )
    if as_mask:
        return BlockMap(None, counts[0], counts[1], lut)
    return BlockMap(lut, counts[0], counts[1])


def lut_to_mask(bm: BlockMap) -> torch.Tensor:
    """:attr:`BlockMap.mask` of a map given as lists (torch ops, for maps made by
    :func:`predict_block_map` without ``as_mask`` or by hand)."""
    if bm.mask is not None:
        return bm.mask
    if bm.lut is None:
        raise ValueError("the block map has no block list (a head-chunked call's): run "
                         "predict_block_map")
    nkb_stride = bm.lut.shape[-1]
    words = mask_words(nkb_stride)
    lut = bm.lut.int()
    kept = torch.arange(nkb_stride, device=lut.device) < bm.count[..., None]
    # each kept block adds its bit to its word (distinct bits: the sum is their OR, bit 31
    # included, in int32); entries past a row's count go to an extra word, then dropped
    index = torch.where(kept, lut // 32, words).long()
    bit = torch.where(kept, torch.bitwise_left_shift(torch.ones_like(lut), lut % 32), 0)
    out = torch.zeros(*lut.shape[:-1], words + 1, dtype=torch.int32, device=lut.device)
    return out.scatter_add_(-1, index, bit)[..., :words].contiguous()
