"""Stage 1's key pass: pooled keys and key-block similarity over vLLM's paged KV cache.

For a varlen batch of prefill requests (docs/METHOD.md, "Stage 1"), :func:`pool_keys`:

1. ``_ksum_kernel``: per (request, KV head, chunk of :data:`KSUM_CHUNK` key blocks) the fp32 sum
   of the keys, over the *whole* context (prefix-cached tokens and earlier chunks included).
2. torch: the per-(request, KV head) key sum over those chunks (one reduction, no host sync).
3. ``_kblock_kernel``: the key mean ``mu`` (that sum over the context length), pooled smoothed
   keys ``mean(k - mu)`` (stored transposed, fp32) and the key-block self-similarity.

:func:`load_kv_block` reads one key or value block through a request's block table (also the
attention kernel's loads, with TMA through :func:`kv_descriptor` where :func:`tma_supported`
and :func:`tma_layout_ok` allow); :func:`values_kmajor` copies a batch's values with the token
dimension contiguous, the layout of the second operand of Hopper's fp8 ``P.V`` (the
attention's ``fp8_dot``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sparge_serve.kernels.geometry import (
    BATCH_PTRS,
    BLKK,
    PrefillBatch,
    key_block_stride,
    num_blocks,
    selection_tile,
)
from sparge_serve.kernels.launch import INTERPRET, launch

KSUM_CHUNK = 4
"""Key blocks summed per program of the key-mean pass. NOTE: 16 made the pass latency-bound in
head chunks (one KV head: 32 programs of 16 loads at 32K, 52 us; H200 profile)."""
EPS = tl.constexpr(1e-6)
"""The norm's floor: a zero vector normalises to zero (keys here, queries in the predictor)."""


@triton.jit
def block_page(bt_ptr, j, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The page id (from a request's block table ``bt_ptr``) of key block ``j``, which lies
    inside one page (``PAGE % BLOCK_N == 0``)."""
    return tl.load(bt_ptr + (j * BLOCK_N) // PAGE)


@triton.jit
def load_kv_block(
    cache_ptr, bt_ptr, j, seq_len, kvh,
    stride_page, stride_tok, stride_head,
    offs_n, offs_d,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    desc=None, USE_TMA: tl.constexpr = False, ZERO_TAIL: tl.constexpr = False,
    DT: tl.constexpr = None, page=None,
):
    """Load key/value block ``j`` (``[BLOCK_N, D]``) of one request through its block table,
    converted to ``DT`` if given (an fp8 cache's blocks to the compute dtype, in registers).

    Without TMA, rows at or past ``seq_len`` read as zeros. With TMA (``desc``: a 2-D descriptor
    over ``[num_pages * PAGE, token row]`` with ``[BLOCK_N, D]`` boxes, see
    :func:`kv_descriptor`; ``PAGE % BLOCK_N == 0``) they hold whatever the page holds, unless
    ``ZERO_TAIL`` (callers mask scores of such keys; values must be zeroed); ``page``, if given,
    is the block's page id, already read from the block table (TMA only).
    """
    pos = j * BLOCK_N + offs_n
    in_ctx = pos < seq_len
    if USE_TMA:
        if page is None:
            page = block_page(bt_ptr, j, PAGE, BLOCK_N)
        x = desc.load([page * PAGE + (j * BLOCK_N) % PAGE, kvh * stride_head])
        if DT is not None:
            x = x.to(DT)
        if ZERO_TAIL:
            x = tl.where(in_ctx[:, None], x, 0.0)
        return x
    if PAGE % BLOCK_N == 0:
        # NOTE: the whole key block lies inside one page: one page-id load, contiguous rows.
        page = block_page(bt_ptr, j, PAGE, BLOCK_N).to(tl.int64)
        row = page * stride_page + ((j * BLOCK_N) % PAGE + offs_n) * stride_tok
    else:
        page = tl.load(bt_ptr + pos // PAGE, mask=in_ctx, other=0).to(tl.int64)
        row = page * stride_page + (pos % PAGE) * stride_tok
    ptrs = cache_ptr + row[:, None] + kvh * stride_head + offs_d[None, :]
    x = tl.load(ptrs, mask=in_ctx[:, None], other=0.0)
    if DT is not None:
        x = x.to(DT)
    return x


@triton.jit
def load_v_block(
    v_cache_ptr, bt_row, j, seq_len, kvh, stride_page, stride_tok, stride_head, offs_n, offs_d,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, v_desc, USE_TMA: tl.constexpr,
    ZERO_TAIL: tl.constexpr, DT: tl.constexpr, vt_row, stride_vh, stride_vd,
    V_KMAJOR: tl.constexpr, page=None, VT_TMA: tl.constexpr = False,
):
    """Value block ``j`` (``[BLOCK_N, D]``): with ``V_KMAJOR`` from a request's row ``vt_row``
    of :func:`values_kmajor`'s copy (token dimension contiguous, keys in :func:`key_order`;
    zeros past the context), else through the block table (:func:`load_kv_block`, ``page`` as
    there). ``VT_TMA``: the copy's ``[D, BLOCK_N]`` tile by TMA (``v_desc``:
    :func:`values_descriptor`; ``vt_row``: the request's first row of it, ``stride_vh`` a KV
    head's rows), transposed on chip."""
    # NOTE: if/else, not an early return: Triton's compiler still visits what follows a
    # return in a constexpr branch (here a TMA load through the absent descriptor)
    if VT_TMA:
        v = tl.trans(v_desc.load([vt_row + kvh * stride_vh, j * BLOCK_N]))
        if DT is not None:
            v = v.to(DT)
    elif V_KMAJOR:
        v = tl.load(vt_row + kvh.to(tl.int64) * stride_vh + offs_d[None, :] * stride_vd
                    + (j * BLOCK_N + offs_n)[:, None])
        if DT is not None:
            v = v.to(DT)
    else:
        v = load_kv_block(v_cache_ptr, bt_row, j, seq_len, kvh, stride_page, stride_tok,
                          stride_head, offs_n, offs_d, PAGE, BLOCK_N, v_desc, USE_TMA, ZERO_TAIL,
                          DT, page)
    return v


def tma_layout_ok(cache: torch.Tensor) -> bool:
    """Pages of whole, 16-byte aligned token rows with unit-stride head dims (a 2-D TMA view).

    Covers vLLM 0.26's packed cache, whose K and V views share each token row ``[Hkv, 2*D]``.
    """
    num_pages, page, num_kv_heads, head_dim = cache.shape
    s_page, s_tok, s_head, s_dim = cache.stride()
    elem = cache.element_size()
    rows_dense = s_page == page * s_tok and s_tok >= (num_kv_heads - 1) * s_head + head_dim
    aligned = (s_tok * elem) % 16 == 0 and (s_head * elem) % 16 == 0 and cache.data_ptr() % 16 == 0
    return bool(s_dim == 1 and rows_dense and aligned)


def tma_supported(device: torch.device, page_size: int, block_n: int = BLKK) -> bool:
    """Whether TMA block loads (the default) can serve caches of ``page_size``-token pages on
    ``device``: a Hopper GPU (or the interpreter) and whole key blocks inside one page. A cache
    must also pass :func:`tma_layout_ok`."""
    hopper = INTERPRET or (device.type == "cuda"
                           and torch.cuda.get_device_capability(device)[0] >= 9)
    return hopper and page_size % block_n == 0


def kv_descriptor(cache: torch.Tensor, block_n: int) -> TensorDescriptor:
    """2-D view ``[num_pages * page, used width of a token row]`` of a K or V cache view, in
    boxes of ``[block_n, head_dim]``."""
    num_pages, page, num_kv_heads, head_dim = cache.shape
    s_tok, s_head = cache.stride(1), cache.stride(2)
    return TensorDescriptor(
        cache, shape=[num_pages * page, (num_kv_heads - 1) * s_head + head_dim],
        strides=[s_tok, 1], block_shape=[block_n, head_dim],
    )


@triton.jit
def keeps_every_block(cdf_ptr, h, topk, USE_TOPK: tl.constexpr):
    """Whether query head ``h`` keeps every valid key block whatever its scores: a top-k
    fraction of 1 or, without top-k, a CDF threshold of 1 (a head calibrated dense). Stage 1
    computes no scores for such a head."""
    if USE_TOPK:
        dense = topk >= 1.0
    else:
        dense = tl.load(cdf_ptr + h) >= 1.0
    return dense


@triton.jit
def _kv_head_dense(cdf_ptr, kvh, num_heads, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr):
    """Whether every query head of KV head ``kvh`` (``GROUP`` a KV head, ``num_heads`` in all;
    ``GROUP_PAD``: ``GROUP``'s next power of two) has a CDF threshold of 1: no row reads its
    pooled keys (:func:`keeps_every_block`)."""
    offs = kvh * GROUP + tl.arange(0, GROUP_PAD)
    ours = (offs < kvh * GROUP + GROUP) & (offs < num_heads)
    dense = keeps_every_block(cdf_ptr, tl.where(ours, offs, kvh * GROUP), 1.0, False)
    return tl.sum((ours & ~dense).to(tl.int32), axis=0) == 0


# NOTE: head counts are never specialised on (a head chunk may have 1): one compiled variant
@triton.jit(do_not_specialize=["stride_bt", "NCH", "num_kv_heads", "num_heads"],
            do_not_specialize_on_alignment=BATCH_PTRS)
def _ksum_kernel(
    key_cache_ptr, bt_ptr, seq_lens_ptr, ksum_ptr, cdf_ptr,
    stride_page, stride_tok, stride_head, stride_bt,
    NCH, num_kv_heads, num_heads,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, SKIP_DENSE: tl.constexpr,
):
    """fp32 key sums of one (request, KV head) over ``CHUNK`` key blocks ``[c*CHUNK, ...)``;
    with ``SKIP_DENSE``, none for a KV head of dense heads only (:func:`_kv_head_dense`)."""
    c = tl.program_id(0)
    kvh = tl.program_id(1)
    r = tl.program_id(2)
    if SKIP_DENSE:  # noqa: SIM102 - a constexpr branch (no thresholds without it)
        if _kv_head_dense(cdf_ptr, kvh, num_heads, GROUP, GROUP_PAD):
            return
    seq_len = tl.load(seq_lens_ptr + r)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for j in range(c * CHUNK, tl.minimum((c + 1) * CHUNK, tl.cdiv(seq_len, BLOCK_N))):
        k = load_kv_block(
            key_cache_ptr, bt_ptr + r * stride_bt, j, seq_len, kvh,
            stride_page, stride_tok, stride_head, offs_n, offs_d, PAGE, BLOCK_N,
        ).to(tl.float32)
        acc += tl.sum(k, axis=0)
    rh = (r * num_kv_heads + kvh).to(tl.int64)
    tl.store(ksum_ptr + (rh * NCH + c) * HEAD_DIM + offs_d, acc)


@triton.jit(do_not_specialize=["stride_bt", "num_kv_heads", "num_heads"],
            do_not_specialize_on_alignment=BATCH_PTRS)
def _kblock_kernel(
    key_cache_ptr, bt_ptr, seq_lens_ptr, ksum_ptr, pk_ptr, ksim_ptr, cdf_ptr,
    stride_page, stride_tok, stride_head, stride_bt,
    NKB, num_kv_heads, num_heads,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, SKIP_DENSE: tl.constexpr,
):
    """Pooled smoothed key ``mean(k - mu)`` and self-similarity of key block ``j`` (``ksum``:
    the context's fp32 key sum, ``mu`` that over the context length). Past the context, up to
    the next multiple of 4 blocks, pooled keys of zero: the select kernel loads them in groups of
    4 blocks (and never selects the padding), so no lane reads uninitialised memory. With
    ``SKIP_DENSE``, nothing for a KV head of dense heads only (:func:`_kv_head_dense`)."""
    j = tl.program_id(0)
    kvh = tl.program_id(1)
    r = tl.program_id(2)
    if SKIP_DENSE:  # noqa: SIM102 - a constexpr branch (no thresholds without it)
        if _kv_head_dense(cdf_ptr, kvh, num_heads, GROUP, GROUP_PAD):
            return
    seq_len = tl.load(seq_lens_ptr + r)
    offs_d = tl.arange(0, HEAD_DIM)
    rh = (r * num_kv_heads + kvh).to(tl.int64)  # NOTE: R*Hkv*NKB*D can pass 2^31
    if j * BLOCK_N >= seq_len:
        if j < (tl.cdiv(seq_len, BLOCK_N) + 3) // 4 * 4:
            tl.store(pk_ptr + rh * HEAD_DIM * NKB + offs_d * NKB + j,
                     tl.zeros([HEAD_DIM], dtype=tl.float32))
        return
    offs_n = tl.arange(0, BLOCK_N)
    k = load_kv_block(
        key_cache_ptr, bt_ptr + r * stride_bt, j, seq_len, kvh,
        stride_page, stride_tok, stride_head, offs_n, offs_d, PAGE, BLOCK_N,
    ).to(tl.float32)
    in_ctx = (j * BLOCK_N + offs_n) < seq_len
    n_rows = tl.minimum(seq_len - j * BLOCK_N, BLOCK_N).to(tl.float32)
    mu = tl.math.div_rn(tl.load(ksum_ptr + rh * HEAD_DIM + offs_d), seq_len.to(tl.float32))
    x = tl.where(in_ctx[:, None], k - mu[None, :], 0.0)
    pooled = tl.sum(x, axis=0) / n_rows
    norm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), EPS)
    mean_unit = tl.sum(x / norm[:, None], axis=0) / n_rows
    # NOTE: pooled keys are stored transposed ([D, NKB]) so the select kernel reads them
    # coalesced along key blocks.
    tl.store(pk_ptr + rh * HEAD_DIM * NKB + offs_d * NKB + j, pooled)
    tl.store(ksim_ptr + rh * NKB + j, tl.sum(mean_unit * mean_unit, axis=0))


@triton.jit
def key_order(x):
    """``x`` ``[M, N]`` (``N`` a multiple of 32) with its columns, keys, in the order in which
    :func:`values_kmajor` stores them: in each 32 keys, position ``16e + 4q + 2a + b`` holds key
    ``16e + 8a + 2q + b`` (``e, a, b`` in 0-1, ``q`` in 0-3).

    NOTE: the thread of quad index ``q`` holds keys ``8a + 2q + b`` of its rows in the ``q.k``
    accumulator of a Hopper matrix instruction, and an fp8 ``P.V`` reads ``4q + (0..3)`` and
    ``16 + 4q + (0..3)`` of them from it: with P's keys and V's in this order, P goes from the
    one to the other inside each thread, without the shuffles between threads that the keys'
    own order takes (8 a block, and their selects and byte permutes; FlashAttention-3's fp8
    forward orders V so too)."""
    M: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    x = tl.permute(tl.reshape(x, [M, N // 32, 2, 2, 4, 2]), [0, 1, 2, 4, 3, 5])
    return tl.reshape(x, [M, N])


@triton.jit(do_not_specialize=["stride_bt", "num_kv_heads", "S"],
            do_not_specialize_on_alignment=BATCH_PTRS)
def _values_kmajor_kernel(
    value_cache_ptr, bt_ptr, seq_lens_ptr, vt_ptr,
    stride_page, stride_tok, stride_head, stride_bt, S, num_kv_heads,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Value block ``j`` of one (request, KV head), stored transposed at
    ``vt[r, kvh, :, j * BLOCK_N:][:BLOCK_N]`` (``[R, Hkv, D, S]``), its keys in
    :func:`key_order`; its rows past the context as zeros."""
    j = tl.program_id(0)
    kvh = tl.program_id(1)
    r = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + r)
    if j * BLOCK_N >= seq_len:
        return
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    v = load_kv_block(value_cache_ptr, bt_ptr + r * stride_bt, j, seq_len, kvh,
                      stride_page, stride_tok, stride_head, offs_n, offs_d, PAGE, BLOCK_N)
    rh = (r * num_kv_heads + kvh).to(tl.int64)
    tl.store(vt_ptr + rh * HEAD_DIM * S + offs_d[:, None] * S + (j * BLOCK_N + offs_n)[None, :],
             key_order(tl.trans(v)))


def values_kmajor(value_cache: torch.Tensor, batch: PrefillBatch) -> torch.Tensor:
    """The batch's values with the token dimension contiguous: ``[R, Hkv, D, S]`` in the cache's
    dtype, ``S`` the longest context in whole key blocks (:data:`BLKK`), the tokens of each 32 in
    :func:`key_order` (the attention puts P's keys in the same order). Within each request's
    last key block, tokens past its context are zeros; past that block, unwritten (the attention
    reads no block past a request's context). One launch, no synchronisation."""
    _, page, num_kv_heads, head_dim = value_cache.shape
    nkb = num_blocks(batch.max_seq_len, BLKK)
    s = nkb * BLKK
    vt = torch.empty(batch.num_reqs, num_kv_heads, head_dim, s, dtype=value_cache.dtype,
                     device=value_cache.device)
    # NOTE: bytes, so that fp8 values are copied bit for bit (the interpreter's fp8 is partial)
    raw = value_cache.view(torch.uint8) if value_cache.element_size() == 1 else value_cache
    launch(_values_kmajor_kernel, (nkb, num_kv_heads, batch.num_reqs))(
        raw, batch.block_table, batch.seq_lens, vt.view(raw.dtype),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        batch.block_table.stride(0), s, num_kv_heads,
        PAGE=page, BLOCK_N=BLKK, HEAD_DIM=head_dim, num_warps=4,
    )
    return vt


def values_descriptor(vt: torch.Tensor, block_n: int = BLKK) -> TensorDescriptor:
    """2-D view ``[R * Hkv * D, S]`` of :func:`values_kmajor`'s copy, in ``[D, block_n]``
    boxes (a KV head's values of one key block)."""
    rows = vt.shape[0] * vt.shape[1] * vt.shape[2]
    return TensorDescriptor(vt, shape=[rows, vt.shape[3]], strides=[vt.stride(2), 1],
                            block_shape=[vt.shape[2], block_n])


def values_kmajor_bytes(num_kv_heads: int, head_dim: int, max_reqs: int, max_seq_len: int,
                        elem_size: int) -> int:
    """Device memory of :func:`values_kmajor`'s result."""
    return max_reqs * num_kv_heads * head_dim * num_blocks(max_seq_len, BLKK) * BLKK * elem_size


@dataclass(frozen=True)
class PooledKeys:
    """Stage 1's per-key-block data of a batch (``_kblock_kernel``'s output)."""

    pk: torch.Tensor  # [R, Hkv, D, NKB_STRIDE] fp32: pooled smoothed keys (transposed)
    ksim: torch.Tensor  # [R, Hkv, NKB_STRIDE] fp32: key-block self-similarity
    nkb: int  # key blocks of the longest context
    nkb_stride: int  # nkb rounded up to 16 (the buffers' row stride)
    nkb_pad: int  # nkb rounded up to a power of two >= 16 (the selection tile)


def pool_keys(key_cache: torch.Tensor, batch: PrefillBatch,
              cdfthreshd: torch.Tensor | None = None, group: int = 1,
              topk: float | None = None) -> PooledKeys:
    """Steps 1-3 of the module docstring: pooled smoothed keys and key-block similarity.

    ``cdfthreshd``: the CDF thresholds of the query heads of ``key_cache``'s KV heads,
    ``group`` a KV head. With the CDF selection (``topk`` None), a KV head whose query heads
    all have a threshold of 1 (dense heads: the select kernel computes no scores for them,
    :func:`keeps_every_block`) is not pooled; its rows of the result are left unwritten."""
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
    skip = cdfthreshd is not None and topk is None
    num_heads = cdfthreshd.shape[0] if skip else 0
    group = group if skip else 1  # NOTE: one compiled variant for every group without the skip
    heads = dict(GROUP=group, GROUP_PAD=triton.next_power_of_2(group), SKIP_DENSE=skip)
    launch(_ksum_kernel, (nch, num_kv_heads, nreq))(
        key_cache, batch.block_table, batch.seq_lens, ksum, cdfthreshd, *strides, nch,
        num_kv_heads, num_heads, PAGE=page, BLOCK_N=BLKK, HEAD_DIM=head_dim, CHUNK=KSUM_CHUNK,
        **heads, num_warps=4,
    )
    # NOTE: blocks up to a multiple of 4 (within the row stride): the padding the select kernel
    # reads is zeroed
    launch(_kblock_kernel, (num_blocks(nkb, 4) * 4, num_kv_heads, nreq))(
        key_cache, batch.block_table, batch.seq_lens, ksum.sum(2), pk, ksim, cdfthreshd,
        *strides, nkb_stride, num_kv_heads, num_heads, PAGE=page, BLOCK_N=BLKK,
        HEAD_DIM=head_dim, **heads, num_warps=4,
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
