"""The FA3 attention path's sequences and virtual block tables (``fa3.py`` runs FA3 over them).

:func:`virtual_rows` orders a call's block-map rows (one FA3 sequence each) longest first;
:func:`virtual_table` builds, from the block map as bit sets (``BlockMap.mask``) and the requests'
block table, each sequence's virtual context: the pages of its kept key blocks, in ascending
order, addressed through the cache's heads-as-pages view (:func:`heads_as_pages`). Triton and
torch only: no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sparge_serve.kernels.geometry import (
    BLKK,
    BLKQ,
    BlockMap,
    PrefillBatch,
    key_block_stride,
    mask_words,
    num_blocks,
)
from sparge_serve.kernels.launch import launch
from sparge_serve.kernels.predictor import lut_to_mask


@dataclass(frozen=True)
class VirtualRows:
    """The FA3 sequences of a call's block-map rows (``S = R * NQB``), in one order for every
    head: by the row's last query position, descending, i.e. by its causal context, so (at a
    uniform sparsity) by its kept blocks: longest first."""

    q_start: torch.Tensor  # [S + 1] int32: the sequence's first row of q (last entry: the end)
    q_len: torch.Tensor  # [S] int32: its query rows (FA3's seqused_q; 0 past the query)
    order: torch.Tensor  # [S] int32: its block-map row ``r * NQB + b``
    context: torch.Tensor  # [S] int32: its causal context, the last query's position + 1
    queries: torch.Tensor  # [R, NQB] bool: the block-map rows that hold query rows


def virtual_rows(batch: PrefillBatch, nqb: int) -> VirtualRows:
    """:class:`VirtualRows` of ``batch`` (``nqb`` query blocks a request): a few tensor ops, no
    host synchronisation; the same for every head and head chunk of a call."""
    dev = batch.query_start_loc.device
    qsl = batch.query_start_loc.long()
    q_len = qsl[1:] - qsl[:-1]  # [R]
    ctx = batch.seq_lens.long() - q_len
    b0 = torch.arange(nqb, device=dev) * BLKQ  # [NQB]
    first = torch.minimum(b0[None, :], q_len[:, None])  # [R, NQB] row offsets in the request
    last = torch.minimum(b0[None, :] + BLKQ, q_len[:, None])  # one past the row's last query
    last_pos = torch.where(last > first, ctx[:, None] + last - 1, -1).reshape(-1)
    order = torch.argsort(last_pos, descending=True)
    starts = (qsl[:-1, None] + first).reshape(-1)[order]
    i32 = torch.int32
    return VirtualRows(torch.cat([starts, qsl[-1:]]).to(i32),
                       (last - first).reshape(-1)[order].to(i32), order.to(i32),
                       (last_pos[order] + 1).to(i32), last > first)


def dense_runs(rows: VirtualRows, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences of the dense rows' call (``fa3.VirtualAttention._dense_rows``), in ``rows``'
    order: ``(q_start [S + 1], q_len [S])`` int32, from ``dense`` (``[R, NQB]`` bool: the rows
    that keep every valid block in all of the call's heads). Each maximal run of a request's
    consecutive dense query blocks is one sequence, at the slot of its last block, holding all
    the run's query rows: FA3's bottom-right causal mask over that block's context (the run's
    last query sees the last key) is every row's own causal mask, and that slot comes first of
    the run's in the longest-first order. The run's other slots, and the rows outside runs, get
    no query rows. So a request dense in every block is one sequence, as FLASH_ATTN attends it,
    instead of a sequence a query block (each tile streaming its own context, none of its
    neighbours' reads of the same keys shared in L2)."""
    b = torch.arange(dense.shape[1], device=dense.device)
    dense = dense & rows.queries
    # dense blocks of the run before each dense block: back to the last block not dense
    before = torch.where(dense, b - torch.where(dense, -1, b).cummax(1).values - 1, 0)
    last = dense.clone()
    last[:, :-1] &= ~dense[:, 1:]
    before = before.reshape(-1).index_select(0, rows.order) * BLKQ
    last = last.reshape(-1).index_select(0, rows.order)
    q_start = torch.cat([rows.q_start[:-1] - before, rows.q_start[-1:]]).to(torch.int32)
    return q_start, torch.where(last, rows.q_len + before, 0).to(torch.int32)


TABLE_CHUNK_WORDS = 8
"""Bit-set words (32 key blocks each) the table kernel expands per step."""


# NOTE: one compiled variant per (GROUP, SUB): sizes and the block table's alignment (a slice of
# vLLM's) are not specialised on, so the start-up warm-up covers serving
@triton.jit(do_not_specialize=["NQB", "WORDS", "num_heads", "s0", "h0", "m0", "stride_bt",
                               "max_pages", "heads_per_page", "seq_h", "seq_i"],
            do_not_specialize_on_alignment=["bt_ptr", "count_ptr", "qsl_ptr", "seq_lens_ptr",
                                            "mask_ptr"])
def _virtual_table_kernel(
    mask_ptr, count_ptr, order_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, vbt_ptr, used_ptr,
    NQB, WORDS, num_heads, s0, h0, m0, stride_bt, max_pages, vbt_cols, heads_per_page,
    seq_h, seq_i,
    GROUP: tl.constexpr, SUB: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK_WORDS: tl.constexpr,
):
    """Head ``m0 + h`` of the map's sequence ``s0 + i`` (block-map row ``order[s0 + i]``:
    request ``r``, query block ``b``), table entry ``h * seq_h + i * seq_i``: its virtual
    context length, and its virtual pages: for the j-th kept key block (the j-th set bit of its
    mask) and its s-th page, ``block_table[r, block * SUB + s] * heads_per_page + kvh``, where
    ``kvh = (h0 + m0 + h) // GROUP`` is the KV head of that map head (a map from the layer's
    head ``h0``) in the cache the pages index."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    seq = h * seq_h + i * seq_i
    row = tl.load(order_ptr + s0 + i)
    r = row // NQB
    b = row % NQB
    src = (r * num_heads + m0 + h) * NQB + b
    n = tl.load(count_ptr + src)
    q_start = tl.load(qsl_ptr + r)
    q_len = tl.load(qsl_ptr + r + 1) - q_start
    last_pos = tl.load(seq_lens_ptr + r) - q_len + tl.minimum((b + 1) * BLOCK_Q, q_len) - 1
    # the kept blocks end with the diagonal one, cut at the row's last query
    used = tl.where(n > 0, BLOCK_N * (n - 1) + last_pos % BLOCK_N + 1, 0)
    tl.store(used_ptr + seq, used)
    dst = seq.to(tl.int64) * vbt_cols
    kvh = (h0 + m0 + h) // GROUP
    bt_row = bt_ptr + r * stride_bt
    offs_w = tl.arange(0, CHUNK_WORDS)
    offs_bit = tl.arange(0, 32)
    # only the words up to the diagonal block can have bits set
    n_words = tl.where(n > 0, last_pos // (32 * BLOCK_N) + 1, 0)
    base = tl.zeros([], dtype=tl.int32)  # kept blocks before this chunk of words
    for w0 in range(0, n_words, CHUNK_WORDS):
        w = w0 + offs_w
        words = tl.load(mask_ptr + src.to(tl.int64) * WORDS + w, mask=w < n_words, other=0)
        keep = tl.reshape((words[:, None] >> offs_bit[None, :]) & 1, [CHUNK_WORDS * 32])
        pos = base + tl.cumsum(keep, axis=0) - 1
        blk = w0 * 32 + tl.arange(0, CHUNK_WORDS * 32)
        kept = keep != 0
        for sub in tl.static_range(SUB):
            pidx = tl.minimum(blk * SUB + sub, max_pages - 1)
            page = tl.load(bt_row + pidx, mask=kept, other=0)
            tl.store(vbt_ptr + dst + pos * SUB + sub, page * heads_per_page + kvh, mask=kept)
        base += tl.sum(keep, axis=0)


def table_cols(batch: PrefillBatch, page_size: int) -> int:
    """Entries of one sequence's virtual block table: every page of the longest context's key
    blocks (their count rounded up as the block map's rows are)."""
    return key_block_stride(num_blocks(batch.max_seq_len, BLKK)) * (BLKK // page_size)


def virtual_table(rows: VirtualRows, batch: PrefillBatch, bm: BlockMap, page_size: int,
                  heads_per_page: int, group: int, s0: int, s1: int, h0: int = 0,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None, m0: int = 0,
                  heads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_table [heads, s1 - s0, NKB_STRIDE * pages per block], seqused_k [heads, s1 -
    s0])`` int32: the virtual pages and context lengths of the sequences ``s0:s1`` of the map's
    heads ``m0 : m0 + heads`` (default: all), from its bit sets (:attr:`BlockMap.mask`; a map of
    lists is converted, :func:`~sparge_serve.kernels.predictor.lut_to_mask`).
    ``heads_per_page``: ``sP // sH`` of the cache (:func:`heads_as_pages`); ``h0``: the layer
    head of the map's first, for a head chunk's map over the layer's cache. ``out``: flat int32
    buffers to build them in (at least that many entries; a table's entries past a sequence's
    pages are never read, and hold page ids of this cache or 0), else new ones."""
    if BLKK % page_size:
        raise ValueError(f"page size {page_size} must divide the key block ({BLKK})")
    mask = lut_to_mask(bm)
    sub = BLKK // page_size
    map_heads = mask.shape[1]
    heads = map_heads - m0 if heads is None else heads
    if m0 < 0 or m0 + heads > map_heads:
        raise ValueError(f"heads {m0}:{m0 + heads} are not in the map's {map_heads}")
    cols = table_cols(batch, page_size)
    n = s1 - s0
    if out is None:
        dev = bm.count.device
        out = (torch.zeros(heads * n * cols, dtype=torch.int32, device=dev),
               torch.empty(heads * n, dtype=torch.int32, device=dev))
    elif out[0].numel() < heads * n * cols or out[1].numel() < heads * n:
        raise ValueError(f"table buffers of {out[0].numel()} and {out[1].numel()} entries are "
                         f"too small for {heads} heads x {n} sequences x {cols} pages")
    return build_table(rows, batch, mask, bm.count, sub, cols, heads_per_page, group, s0, s1,
                        h0, out, m0, heads)


def build_table(rows: VirtualRows, batch: PrefillBatch, mask: torch.Tensor,
                 count: torch.Tensor, sub: int, cols: int, heads_per_page: int, group: int,
                 s0: int, s1: int, h0: int, out: tuple[torch.Tensor, torch.Tensor], m0: int,
                 heads: int, seq_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`virtual_table`'s launch (``sub`` pages a key block, ``cols`` entries a table) into
    buffers ``out`` large enough, without its checks. ``seq_major``: the tables in one launch's
    order, ``[(s1 - s0) * heads, cols]`` and ``[(s1 - s0) * heads]`` with sequence ``i`` of head
    ``h`` at ``i * heads + h``; else ``[heads, s1 - s0, ...]``."""
    n = s1 - s0
    vbt = out[0][:heads * n * cols]
    used = out[1][:heads * n]
    seq_h, seq_i = (1, heads) if seq_major else (n, 1)
    _, map_heads, nqb, words = mask.shape
    launch(_virtual_table_kernel, (n, heads))(
        mask, count, rows.order, batch.query_start_loc, batch.seq_lens, batch.block_table,
        vbt, used, nqb, words, map_heads, s0, h0, m0, batch.block_table.stride(0),
        batch.block_table.shape[1], cols, heads_per_page, seq_h, seq_i,
        GROUP=group, SUB=sub, BLOCK_Q=BLKQ, BLOCK_N=BLKK, CHUNK_WORDS=TABLE_CHUNK_WORDS,
    )
    if seq_major:
        return vbt.view(n * heads, cols), used
    return vbt.view(heads, n, cols), used.view(heads, n)


def warm_up_virtual(num_heads: int, num_kv_heads: int, page_size: int, device) -> None:
    """Compile the virtual-table kernel for these heads and pages (a one-row batch)."""
    mask = torch.ones(1, num_heads, 1, mask_words(16), dtype=torch.int32, device=device)
    count = torch.ones(1, num_heads, 1, dtype=torch.int32, device=device)
    batch = PrefillBatch(torch.tensor([0, 1], dtype=torch.int32, device=device),
                         torch.ones(1, dtype=torch.int32, device=device),
                         torch.zeros(1, 4, dtype=torch.int32, device=device), 1, 1)
    bm = BlockMap(None, count, count, mask)
    virtual_table(virtual_rows(batch, 1), batch, bm, page_size, num_kv_heads,
                  num_heads // num_kv_heads, 0, 1)


def heads_as_pages(cache: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``cache [pages, page, Hkv, D]`` as ``[NV, page, 1, D]`` whose page ``p * k + kvh`` is KV
    head ``kvh`` of page ``p``; returns the view and ``k`` (``sP // sH``)."""
    pages, page, hkv, d = cache.shape
    sp, st, sh, sd = cache.stride()
    if sd != 1 or sp % sh or sh < d:
        raise ValueError(f"cache strides {cache.stride()} cannot be viewed as head pages")
    k = sp // sh
    nv = (pages - 1) * k + hkv
    if nv >= 2**31:
        raise ValueError("too many pages for int32 virtual page ids")
    view = cache.as_strided((nv, page, 1, d), (sh, st, sh, 1), cache.storage_offset())
    return view, k
