"""Block-sparse attention through FlashAttention-3's paged varlen kernel (experimental).

Each (request, q-head, query block) row of a block map becomes one FA3 sequence of one head: its
query rows, and a *virtual* paged context made of its kept key blocks only, in ascending order.
The forced diagonal blocks are always kept and always last, so FA3's bottom-right causal mask
(the last query sees the last key) is exactly the block-sparse kernel's token-level mask: every
kept block before the diagonal is fully visible to every row, and the diagonal tail keeps its
true positions. The result equals ``sparse_paged_attention`` with PV skip off.

Layout (nothing is copied: no K/V, no queries, no outputs):

- **Heads as pages.** vLLM's cache is ``[pages, page, Hkv, D]`` with strides
  ``(sP, sT, sH, 1)``. A virtual page id ``vp = page * (sP // sH) + kvh`` addresses
  ``page * sP + kvh * sH``, so one ``as_strided`` view ``[NV, page, 1, D]`` with strides
  ``(sH, sT, sH, 1)`` serves every KV head; the virtual block table holds ``vp`` per kept page.
- **One FA3 call per query head**, on the strided views ``q[:, h:h+1]`` and ``out[:, h:h+1]``:
  FA3 shares one page table among the heads of a sequence, and each head keeps its own blocks.
  The sequences are given by ``seqused_q`` with explicit start rows (``cu_seqlens_q`` need not
  be cumulative then), so they can come in any order: **longest first** (by context), which
  FA3's in-order tile scheduler then runs as a longest-processing-time schedule. In ascending
  order (a causal prompt's natural one) the longest rows would start last and idle the GPU.

The virtual block tables (``[Hq, rows, pages]`` int32, twice the block map's bytes at 64-token
pages) are built by one Triton kernel from the block map and the requests' block table, for a
slice of each head's sorted sequences at a time where memory is bounded (``chunks.py``). PV skip
(stage 2) is not expressible in FA3: layers with it keep the Triton attention kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sparge_serve.kernels.geometry import BLKK, BLKQ, PrefillBatch, num_blocks
from sparge_serve.kernels.predictor import BlockMap, check_group


@dataclass(frozen=True)
class VirtualBatch:
    """FA3 inputs of a block map: per q-head, one sequence per (request, query block) row, the
    rows of each head sorted by context tokens, descending (``S = R * NQB`` rows per head).
    The virtual block tables are built per slice of that order (:func:`virtual_table`)."""

    q_start: torch.Tensor  # [Hq, S + 1] int32: the sequence's first row of q (last column: end)
    q_len: torch.Tensor  # [Hq, S] int32: its query rows (FA3's seqused_q; 0 past the query)
    seqused_k: torch.Tensor  # [Hq, S] int32: tokens of its virtual context
    order: torch.Tensor  # [Hq, S] int64: its row ``r * NQB + b`` of the block map
    group: int  # query heads per KV head of the layer


# NOTE: one compiled variant per (GROUP, SUB): sizes and the block table's alignment (a slice of
# vLLM's) are not specialised on, so the start-up warm-up covers serving
@triton.jit(do_not_specialize=["NQB", "num_heads", "rows", "s0", "stride_bt", "max_pages",
                               "heads_per_page"],
            do_not_specialize_on_alignment=["bt_ptr", "count_ptr"])
def _virtual_table_kernel(
    lut_ptr, count_ptr, order_ptr, bt_ptr, vbt_ptr, NQB, NKB, num_heads, rows, s0, stride_bt,
    max_pages, vbt_cols, heads_per_page,
    GROUP: tl.constexpr, SUB: tl.constexpr, CHUNK: tl.constexpr,
):
    """Virtual pages of head ``h``'s sequence ``s0 + i`` (block-map row ``order[h, s0 + i]``,
    request ``r``): for the j-th kept key block and its s-th page,
    ``block_table[r, lut * SUB + s] * heads_per_page + h // GROUP``."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(order_ptr + h.to(tl.int64) * rows + s0 + i)
    r = row // NQB
    src = (r * num_heads + h) * NQB + row % NQB
    dst = (h * tl.num_programs(0) + i).to(tl.int64) * vbt_cols
    n = tl.load(count_ptr + src)
    kvh = h // GROUP
    offs = tl.arange(0, CHUNK)
    for j0 in range(0, n * SUB, CHUNK):
        col = j0 + offs
        m = col < n * SUB
        blk = tl.load(lut_ptr + src.to(tl.int64) * NKB + col // SUB, mask=m, other=0).to(tl.int32)
        pidx = tl.minimum(blk * SUB + col % SUB, max_pages - 1)
        page = tl.load(bt_ptr + r * stride_bt + pidx, mask=m, other=0)
        tl.store(vbt_ptr + dst + col, page * heads_per_page + kvh, mask=m)


def virtual_batch(batch: PrefillBatch, bm: BlockMap, num_heads: int, num_kv_heads: int,
                  group: int | None = None) -> VirtualBatch:
    """The FA3 sequences of ``bm`` (see the module docstring); ``group`` as
    ``predict_block_map``'s (head chunks). Tensor ops only: no host synchronisation."""
    group = check_group(group, num_heads, num_kv_heads)
    if bm.lut is None:
        raise ValueError("the block map has no block list (fused kernel); run predict_block_map")
    nreq, nqb = batch.num_reqs, bm.count.shape[2]
    rows = nreq * nqb
    dev = bm.count.device
    qsl = batch.query_start_loc.long()
    q_len = qsl[1:] - qsl[:-1]  # [R]
    ctx = batch.seq_lens.long() - q_len
    b0 = torch.arange(nqb, device=dev) * BLKQ  # [NQB]
    first = torch.minimum(b0[None, :], q_len[:, None])  # [R, NQB] row offsets in the request
    last = torch.minimum(b0[None, :] + BLKQ, q_len[:, None])  # one past the row's last query
    count = bm.count.long().permute(1, 0, 2).reshape(num_heads, rows)  # [Hq, S]
    last_pos = (ctx[:, None] + last - 1).reshape(1, rows)  # the row's last query position
    used = torch.where(count > 0, BLKK * (count - 1) + last_pos % BLKK + 1, 0)
    used, order = torch.sort(used, dim=1, descending=True)  # [Hq, S] longest first
    starts = (qsl[:-1, None] + first).reshape(rows)[order]
    q_start = torch.cat([starts, qsl[-1:].expand(num_heads, 1)], dim=1)
    lens = (last - first).reshape(rows)[order]
    i32 = torch.int32
    return VirtualBatch(q_start.to(i32), lens.to(i32), used.to(i32), order, group)


def virtual_table(vb: VirtualBatch, batch: PrefillBatch, bm: BlockMap, page_size: int,
                  heads_per_page: int, s0: int, s1: int) -> torch.Tensor:
    """``[Hq, s1 - s0, NKB_STRIDE * pages per block]`` int32: the virtual pages of every head's
    sequences ``s0:s1`` (``heads_per_page``: ``sP // sH`` of the cache, :func:`heads_as_pages`)."""
    if BLKK % page_size:
        raise ValueError(f"page size {page_size} must divide the key block ({BLKK})")
    sub = BLKK // page_size
    num_heads, rows = vb.order.shape
    nqb, nkb = bm.count.shape[2], bm.lut.shape[-1]
    cols = nkb * sub
    vbt = torch.zeros(num_heads, s1 - s0, cols, dtype=torch.int32, device=bm.count.device)
    _virtual_table_kernel[(s1 - s0, num_heads)](
        bm.lut, bm.count, vb.order, batch.block_table, vbt, nqb, nkb, num_heads, rows, s0,
        batch.block_table.stride(0), batch.block_table.shape[1], cols, heads_per_page,
        GROUP=vb.group, SUB=sub, CHUNK=256,
    )
    return vbt


def warm_up_virtual(num_heads: int, num_kv_heads: int, page_size: int, device) -> None:
    """Compile the virtual-table kernel for these heads and pages (a one-row batch)."""
    lut = torch.zeros(1, num_heads, 1, 16, dtype=torch.int16, device=device)
    count = torch.ones(1, num_heads, 1, dtype=torch.int32, device=device)
    batch = PrefillBatch(torch.tensor([0, 1], dtype=torch.int32, device=device),
                         torch.ones(1, dtype=torch.int32, device=device),
                         torch.zeros(1, 4, dtype=torch.int32, device=device), 1, 1)
    bm = BlockMap(lut, count, count)
    vb = virtual_batch(batch, bm, num_heads, num_kv_heads)
    virtual_table(vb, batch, bm, page_size, num_kv_heads, 0, 1)


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


def fa3_paged_forward(q, k, v, out, q_start, q_len, seqused_k, block_table, max_seqlen_k,
                      scale) -> None:
    """vLLM's FA3 forward (``torch.ops._vllm_fa3_C.fwd``, as ``flash_attn_varlen_func`` calls
    it) with ``seqused_q``, which that wrapper does not pass: sequence ``i`` is rows
    ``q_start[i] : q_start[i] + q_len[i]`` of ``q``/``out``, bottom-right causal over the first
    ``seqused_k[i]`` tokens of its pages ``block_table[i]``. One split per sequence (no
    split-KV scratch)."""
    import vllm.vllm_flash_attn  # noqa: F401  (registers the op)

    torch.ops._vllm_fa3_C.fwd(
        q, k, v, None, None, None, out,  # k_new, v_new, q_v
        q_start, None, None, q_len, seqused_k,  # cu_seqlens_q/k/k_new, seqused_q/k
        BLKQ, max_seqlen_k, block_table,
        None, None, None, None, None,  # kv_batch_idx, leftpad_k, rotary cos/sin/seqlens
        None, None, None,  # q/k/v descale
        scale, True, -1, -1, 0.0,  # causal, window left/right, softcap
        True, None, 1, None, 0,  # rotary_interleaved, scheduler_metadata, num_splits,
        None, 1, 0, None,  # pack_gqa, sm_margin; s_aux, cp world size/rank/seqused
    )


def fa3_sparse_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         batch: PrefillBatch, bm: BlockMap, scale: float, out: torch.Tensor,
                         attn_fn=None, group: int | None = None,
                         slice_rows: int | None = None) -> torch.Tensor:
    """Stage-1 block-sparse attention (PV skip off) of ``batch`` through FA3 (module docstring).

    Writes the rows of ``out`` that ``batch.query_start_loc`` covers (others are left alone).
    ``attn_fn``: :func:`fa3_paged_forward`'s signature (the default); ``group`` as
    ``predict_block_map``'s (head chunks); ``slice_rows``: build the virtual block tables and
    call FA3 for that many of each head's sequences at a time (longest first; ``None``: all),
    which bounds the tables' memory (``chunks.plan_chunks``).
    """
    attn_fn = attn_fn or fa3_paged_forward
    hq = q.shape[1]
    k_view, k = heads_as_pages(key_cache)
    v_view, k_v = heads_as_pages(value_cache)
    if k != k_v:
        raise ValueError("key and value caches differ in layout")
    vb = virtual_batch(batch, bm, hq, key_cache.shape[2], group)
    rows = vb.order.shape[1]
    step = rows if slice_rows is None else max(1, slice_rows)
    max_k = num_blocks(batch.max_seq_len, BLKK) * BLKK
    # NOTE: host loops over slices and heads, one FA3 launch each: FA3 shares a page table among
    # a sequence's heads, so per-head contexts need per-head calls (module docstring)
    for s0 in range(0, rows, step):
        s1 = min(rows, s0 + step)
        vbt = virtual_table(vb, batch, bm, key_cache.shape[1], k, s0, s1)
        for h in range(hq):
            attn_fn(q[:, h:h + 1], k_view, v_view, out[:, h:h + 1], vb.q_start[h, s0:s1 + 1],
                    vb.q_len[h, s0:s1], vb.seqused_k[h, s0:s1], vbt[h], max_k, scale)
    return out
