"""Block-sparse attention through FlashAttention-3's paged varlen kernel (experimental).

Each (request, q-head, query block) row of a block map becomes one FA3 sequence of one head: its
query rows, and a *virtual* paged context made of its kept key blocks only, in ascending order.
The forced diagonal blocks are always kept and always last, so FA3's bottom-right causal mask
(the last query sees the last key) is exactly the block-sparse kernel's token-level mask: every
kept block before the diagonal is fully visible to every row, and the diagonal tail keeps its
true positions. The result equals ``sparse_paged_attention`` with PV skip off.

Layout tricks (no K/V copies):

- **Heads as pages.** vLLM's cache is ``[pages, page, Hkv, D]`` with strides
  ``(sP, sT, sH, 1)``. A virtual page id ``vp = page * (sP // sH) + kvh`` addresses
  ``page * sP + kvh * sH``, so one ``as_strided`` view ``[NV, page, 1, D]`` with strides
  ``(sH, sT, sH, 1)`` serves every KV head; the virtual block table holds ``vp`` per kept page.
- **Head-major queries.** FA3's varlen queries are one token dimension, so the rows of the sparse
  requests are transposed to ``[Hq, n, D]`` (one copy) and the output back (one copy): sequence
  ``(h, r, b)`` starts at ``h * n + (qsl[r] - qsl[0]) + b * BLKQ``, contiguous in that order.

The virtual block table (``[rows, pages]`` int32) is built by one Triton kernel from the block
map and the request's block table. PV skip (stage 2) is not expressible in FA3: layers with it
keep the Triton attention kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sparge_serve.kernels.geometry import BLKK, BLKQ, PrefillBatch, num_blocks
from sparge_serve.kernels.predictor import BlockMap, key_block_stride


@dataclass(frozen=True)
class VirtualBatch:
    """FA3 inputs of a block map: one sequence per (q-head, request, query block) row."""

    cu_seqlens_q: torch.Tensor  # [Hq * R * NQB + 1] int32, offsets into the head-major queries
    seqused_k: torch.Tensor  # [Hq * R * NQB] int32: tokens of the row's virtual context
    block_table: torch.Tensor  # [Hq * R * NQB, NKB_STRIDE * pages per block] int32: virtual pages


# NOTE: one compiled variant per (GROUP, SUB): sizes and the block table's alignment (a slice of
# vLLM's) are not specialised on, so the start-up warm-up covers serving
@triton.jit(do_not_specialize=["NQB", "num_heads", "stride_bt", "max_pages", "heads_per_page"],
            do_not_specialize_on_alignment=["bt_ptr", "count_ptr"])
def _virtual_table_kernel(
    lut_ptr, count_ptr, bt_ptr, vbt_ptr, NQB, NKB, num_heads, stride_bt, max_pages, vbt_cols,
    heads_per_page,
    GROUP: tl.constexpr, SUB: tl.constexpr, CHUNK: tl.constexpr,
):
    """Virtual pages of one (q-head ``h``, request ``r``, query block ``b``) row, the FA3
    sequence ``(h * R + r) * NQB + b``: for the j-th kept key block and its s-th page,
    ``block_table[r, lut * SUB + s] * heads_per_page + h // GROUP``."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.program_id(2)
    num_reqs = tl.num_programs(2)
    src = (r * num_heads + h) * NQB + b
    dst = ((h * num_reqs + r) * NQB + b).to(tl.int64) * vbt_cols
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
                  page_size: int, heads_per_page: int, num_tokens: int) -> VirtualBatch:
    """The FA3 sequences of ``bm`` (see the module docstring); ``num_tokens``: the sparse
    requests' query rows (``qsl[R] - qsl[0]``, a host int); ``heads_per_page``: ``sP // sH``."""
    if BLKK % page_size:
        raise ValueError(f"page size {page_size} must divide the key block ({BLKK})")
    if bm.lut is None:
        raise ValueError("the block map has no block list (fused kernel); run predict_block_map")
    sub = BLKK // page_size
    nreq, nqb, nkb = batch.num_reqs, bm.count.shape[2], bm.lut.shape[-1]
    dev = bm.count.device
    qsl = batch.query_start_loc.long()
    q_len = qsl[1:] - qsl[:-1]  # [R]
    ctx = batch.seq_lens.long() - q_len
    b0 = torch.arange(nqb, device=dev) * BLKQ  # [NQB]
    first = torch.minimum(b0[None, :], q_len[:, None])  # [R, NQB] row offsets in the request
    last = torch.minimum(b0[None, :] + BLKQ, q_len[:, None])  # one past the row's last query
    heads = torch.arange(num_heads, device=dev)[:, None, None]
    starts = heads * num_tokens + (qsl[:-1] - qsl[0])[None, :, None] + first[None]  # [Hq, R, NQB]
    cu = torch.cat([starts.reshape(-1), starts.new_full((1,), num_heads * num_tokens)])
    count = bm.count.long().permute(1, 0, 2)  # [Hq, R, NQB]
    last_pos = (ctx[:, None] + last - 1)[None]  # [1, R, NQB] the row's last query position
    used = torch.where(count > 0, BLKK * (count - 1) + last_pos % BLKK + 1, 0)
    cols = nkb * sub
    vbt = torch.zeros(num_heads * nreq * nqb, cols, dtype=torch.int32, device=dev)
    _virtual_table_kernel[(nqb, num_heads, nreq)](
        bm.lut, bm.count, batch.block_table, vbt, nqb, nkb, num_heads,
        batch.block_table.stride(0), batch.block_table.shape[1], cols, heads_per_page,
        GROUP=num_heads // num_kv_heads, SUB=sub, CHUNK=256,
    )
    return VirtualBatch(cu.to(torch.int32), used.reshape(-1).to(torch.int32), vbt)


def virtual_scratch_bytes(num_heads: int, head_dim: int, max_reqs: int, max_query_len: int,
                          max_seq_len: int, num_tokens: int, page_size: int) -> int:
    """Upper bound of what :func:`fa3_sparse_attention` allocates on top of the block map: the
    head-major query and output copies (16-bit), the virtual block table, and the per-row
    offsets (with their int64 temporaries)."""
    rows = max_reqs * num_heads * num_blocks(max_query_len, BLKQ)
    cols = key_block_stride(num_blocks(max_seq_len, BLKK)) * (BLKK // page_size)
    return 2 * num_tokens * num_heads * head_dim * 2 + rows * cols * 4 + rows * 8 * 8 + 8


def warm_up_virtual(num_heads: int, num_kv_heads: int, page_size: int, device) -> None:
    """Compile the virtual-table kernel for these heads and pages (a one-row batch)."""
    lut = torch.zeros(1, num_heads, 1, 16, dtype=torch.int16, device=device)
    count = torch.ones(1, num_heads, 1, dtype=torch.int32, device=device)
    batch = PrefillBatch(torch.tensor([0, 1], dtype=torch.int32, device=device),
                         torch.ones(1, dtype=torch.int32, device=device),
                         torch.zeros(1, 4, dtype=torch.int32, device=device), 1, 1)
    virtual_batch(batch, BlockMap(lut, count, count), num_heads, num_kv_heads, page_size,
                  num_kv_heads, 1)


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


def fa3_sparse_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         batch: PrefillBatch, bm: BlockMap, scale: float, out: torch.Tensor,
                         token_range: tuple[int, int], attn_fn=None) -> torch.Tensor:
    """Stage-1 block-sparse attention (PV skip off) of ``batch`` through FA3 (module docstring).

    ``token_range``: host ints ``(qsl[0], qsl[R])``, the sparse requests' rows of ``q``/``out``
    (other rows are left alone). ``attn_fn``: ``flash_attn_varlen_func``'s signature (default:
    vLLM's FA3 build).
    """
    if attn_fn is None:
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        def attn_fn(*args, **kw):
            return flash_attn_varlen_func(*args, fa_version=3, **kw)
    t0, t1 = token_range
    n = t1 - t0
    hq, d = q.shape[1], q.shape[2]
    k_view, k = heads_as_pages(key_cache)
    v_view, k_v = heads_as_pages(value_cache)
    if k != k_v:
        raise ValueError("key and value caches differ in layout")
    vb = virtual_batch(batch, bm, hq, key_cache.shape[2], key_cache.shape[1], k, n)
    q_t = q[t0:t1].transpose(0, 1).reshape(hq * n, 1, d)
    out_t = torch.empty_like(q_t)
    attn_fn(q_t, k_view, v_view, max_seqlen_q=BLKQ, cu_seqlens_q=vb.cu_seqlens_q,
            max_seqlen_k=num_blocks(batch.max_seq_len, BLKK) * BLKK, seqused_k=vb.seqused_k,
            softmax_scale=scale, causal=True, block_table=vb.block_table, out=out_t)
    out[t0:t1] = out_t.view(hq, n, d).transpose(0, 1)
    return out
