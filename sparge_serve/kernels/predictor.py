"""Stage 1 of SpargeAttn as Triton kernels: which (query block, key block) pairs to compute.

For a varlen batch of prefill requests over vLLM's paged KV cache (docs/METHOD.md, "Stage 1"),
after the key pass (``pooling.pool_keys``: pooled smoothed keys and key-block similarity),
``_select_kernel`` runs one program per (q-head, query block, request) row: pooled query and its
similarity, fp32 compressed scores against every valid key block (bottom-right causal), fp32
softmax, sort-free CDF (or top-k) selection, forced blocks and rows (``_select_row``), and the
compact sorted list of kept key blocks (or, for the FA3 attention path, a bit set) + its length.

No host synchronisation and no Python loop over requests or heads: grids are sized from host
bounds (``max_query_len``, ``max_seq_len``) and programs past a request's end return at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparge_serve.kernels.checks import check_group, check_predictor_args, stats_buffer
from sparge_serve.kernels.geometry import (
    BATCH_PTRS,
    BLKK,
    BLKQ,
    BlockMap,
    KVScales,
    PrefillBatch,
    mask_words,
    num_blocks,
)
from sparge_serve.kernels.launch import launch
from sparge_serve.kernels.pooling import EPS, PooledKeys, keeps_every_block, pool_keys

# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


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
    return tl.maximum(tl.sqrt(sq), EPS)


@triton.jit
def _valid_blocks(q_len, seq_len, b, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks valid for query block ``b`` (bottom-right causal): through its last query's."""
    last = seq_len - q_len + tl.minimum((b + 1) * BLOCK_M, q_len) - 1
    return last // BLOCK_N + 1


@triton.jit
def _select_row(
    q_ptr, pk_ptr, ksim_ptr, sim_ptr, cdf_ptr, q_start, q_len, seq_len, b, h, r,
    stride_qt, stride_qh, NKB, num_kv_heads, scale, topk,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    NKB_PAD: tl.constexpr, DC: tl.constexpr, USE_TOPK: tl.constexpr,
):
    """Stage 1 for one (request ``r``, q-head ``h``, query block ``b``) row with real queries:
    returns ``(keep [NKB_PAD] bool, n_valid)``, the kept key blocks among the valid ones."""
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
    first = seq_len - q_len + b * BLOCK_M
    n_valid = _valid_blocks(q_len, seq_len, b, BLOCK_M, BLOCK_N)
    offs_j = tl.arange(0, NKB_PAD)
    valid = offs_j < n_valid
    # NOTE: the pooled-key loads are masked in whole groups of 4 key blocks (16 bytes; rows are
    # padded to 16 blocks, so these stay in the row, and pool_keys zeroes the padding, which is
    # never selected): a mask at block granularity splits each vector load into four scalar
    # ones, which make the kernel L1-bound (Nsight Compute, 32K)
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
    keep, n_valid = _select_from_scores(s, q_sim, ksim_ptr + rh * NKB, cdf_ptr, h, simthr, first,
                                        offs_j, valid, n_valid, scale, topk, BLOCK_N, USE_TOPK)
    # a block holding one of the last BLOCK_M queries keeps every valid one (reference.tail_blocks)
    keep = tl.where((b + 2) * BLOCK_M > q_len, valid, keep)
    return keep, n_valid


@triton.jit
def _select_from_scores(s, q_sim, ksim_row, cdf_ptr, h, simthr, first, offs_j, valid, n_valid,
                        scale, topk, BLOCK_N: tl.constexpr, USE_TOPK: tl.constexpr):
    """The selection of one row from its raw compressed scores ``s [NKB_PAD]`` (``pq . pk``)
    and query self-similarity ``q_sim`` (``valid``: ``offs_j < n_valid``): ``(keep [NKB_PAD]
    bool, n_valid)``.

    NOTE: the threshold searches test one float (as bits) per step. Testing 3-15 at once (one
    ``[NKB_PAD, RADIX]`` reduction per step, 8-15 steps instead of 31) measured 0.64-1.0x
    (``kernels_v10_predictor_h200.md`` in commit 175a6f8): the reductions are not what bounds
    the kernel.
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
    lut_ptr, count_ptr, nvalid_ptr, stats_ptr, q_scale_ptr, k_scale_ptr,
    stride_qt, stride_qh,
    NKB, NQB, num_heads, num_kv_heads, scale, topk,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    NKB_PAD: tl.constexpr, DC: tl.constexpr, USE_TOPK: tl.constexpr, MASK: tl.constexpr,
    Q_SCALED: tl.constexpr = False, K_SCALED: tl.constexpr = False,
):
    """One row's selection, stored as a list (``lut_ptr``: :attr:`BlockMap.lut`) or, with
    ``MASK``, as a bit set (``lut_ptr``: :attr:`BlockMap.mask`).

    An fp8 cache (``K_SCALED``) and query (``Q_SCALED``) are pooled in their stored units (fp32):
    the similarities are scale-free and the pooled vectors linear in them, so the dequantisation
    scales enter once, in the score scale."""
    if K_SCALED:
        scale = scale * tl.load(k_scale_ptr)
    if Q_SCALED:
        scale = scale * tl.load(q_scale_ptr)
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
    if keeps_every_block(cdf_ptr, h, topk, USE_TOPK):
        # NOTE: a dense head's row is known without its scores (nor its KV head's pooled keys,
        # which pool_keys may have skipped)
        n_valid = _valid_blocks(q_len, seq_len, b, BLOCK_M, BLOCK_N)
        keep = tl.arange(0, NKB_PAD) < n_valid
    else:
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


def _select_dc(nkb_pad: int, num_warps: int) -> int:
    """Dimensions per chunk: 16 up to 2048 key blocks at 4 warps, else as many as keep the
    [NKB_PAD, DC] pooled-key tile at <= 64 fp32 per thread.

    NOTE: at 128K (where that budget gave 4) 16 is 1.23x faster than 4 and 1.09x than 8, at 32K
    1.11x than 8, with the same maps (H100, ``benchmarks/results/kernels_fp8.md``, ``--variants
    predictor``); 32 spills with a bf16 query (204 registers, scripts/aot_compile_check.py)."""
    if num_warps == 4 and nkb_pad <= 2048:
        return 16
    return max(1, min(16, (64 * 32 * num_warps) // nkb_pad))


def select_launch_params(nkb_pad: int) -> tuple[int, int]:
    """(DC, num_warps) of the select kernel.

    NOTE: 4 warps up to 2048 key blocks (128K tokens): there 4 warps with 4 dimensions per chunk
    (120 registers, four programs per multiprocessor) are 1.04-1.07x faster than 8 warps with 8
    (``kernels_v10_predictor_h200.md`` in commit 175a6f8), and 16 dimensions faster still
    (:func:`_select_dc`); 8 warps beyond (4 warps would need 214, AOT check).
    """
    num_warps = 4 if nkb_pad <= 2048 else 8
    return _select_dc(nkb_pad, num_warps), num_warps


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
    scales: KVScales | None = None,
) -> BlockMap:
    """Stage 1 for a varlen prefill batch. See the module docstring and docs/DESIGN.md.

    ``q [num_tokens, Hq, D]`` holds the new tokens of every request (``batch.query_start_loc``);
    ``key_cache [num_pages, page_size, Hkv, D]``; an fp8 cache (and fp8 ``q``) come with their
    ``scales``. ``stats`` (int64 ``[3]``), if given, gets
    ``[valid_blocks, kept_blocks, 0]`` added on the device (by the select kernel itself).
    ``select_dc`` (a power of two up to 32) and ``select_warps`` (4 or 8) override the select
    kernel's dimensions per chunk and warps (:func:`select_launch_params`; benchmarks only,
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
                         check_finite, scales)
    if select_dc not in (None, 1, 2, 4, 8, 16, 32) or select_warps not in (None, 4, 8):
        raise ValueError(f"select_dc must be a power of two up to 32 and select_warps 4 or 8; "
                         f"got {select_dc} and {select_warps}")
    group = check_group(group, q.shape[1], key_cache.shape[2])
    return select_blocks(q, key_cache, batch, scale, simthreshd1, cdfthreshd, topk,
                         stats_buffer(stats, q.device), pooled, group, select_dc=select_dc,
                         select_warps=select_warps, as_mask=as_mask, scales=scales)


def select_blocks(q, key_cache, batch, scale, simthreshd1, cdfthreshd, topk, stats, pooled,
                  group, counts=None, select_dc=None, select_warps=None,
                  as_mask=False, scales: KVScales | None = None) -> BlockMap:
    """:func:`predict_block_map` without its checks (the caller's arguments are checked: head
    chunks check the layer's once); ``counts``: an int32 ``[2, R, Hq, NQB]`` buffer for the
    map's ``count`` and ``n_valid`` (default: new)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    nqb = num_blocks(batch.max_query_len, BLKQ)
    nreq = batch.num_reqs
    if pooled is None:
        pooled = pool_keys(key_cache, batch, cdfthreshd, group, topk)
    nkb_stride, nkb_pad = pooled.nkb_stride, pooled.nkb_pad
    if as_mask:
        lut = torch.empty(nreq, num_heads, nqb, mask_words(nkb_stride), dtype=torch.int32,
                          device=q.device)
    else:
        lut = torch.empty(nreq, num_heads, nqb, nkb_stride, dtype=torch.int16, device=q.device)
    if counts is None:
        counts = torch.empty(2, nreq, num_heads, nqb, dtype=torch.int32, device=q.device)
    num_warps = select_warps or select_launch_params(nkb_pad)[1]
    dc = select_dc or _select_dc(nkb_pad, num_warps)
    launch(_select_kernel, (num_heads, nqb, nreq))(
        q, batch.query_start_loc, batch.seq_lens, pooled.pk, pooled.ksim, simthreshd1,
        cdfthreshd, lut, counts[0], counts[1], stats,
        None if scales is None else scales.q_scale, None if scales is None else scales.k_scale,
        q.stride(0), q.stride(1),
        nkb_stride, nqb, num_heads, key_cache.shape[2], float(scale), float(topk or 1.0),
        GROUP=group, BLOCK_M=BLKQ, BLOCK_N=BLKK, HEAD_DIM=head_dim,
        NKB_PAD=nkb_pad, DC=dc, USE_TOPK=topk is not None, MASK=as_mask,
        Q_SCALED=scales is not None and scales.q_scale is not None, K_SCALED=scales is not None,
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
