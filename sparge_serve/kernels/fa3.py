"""Block-sparse attention through FlashAttention-3's paged varlen kernel (the ``fa3`` attention
path; the only kernels module that uses vLLM: its FA3 op, imported on first use).

Each (request, q-head, query block) row of a block map becomes one FA3 sequence of one head: its
query rows, and a *virtual* paged context made of its kept key blocks only, in ascending order.
The forced diagonal blocks are always kept and always last, so FA3's bottom-right causal mask
(the last query sees the last key) is exactly the block-sparse kernel's token-level mask: every
kept block before the diagonal is fully visible to every row, and the diagonal tail keeps its
true positions. The result equals ``sparse_paged_attention`` with PV skip off.

Layout (no K/V is copied):

- **Heads as pages.** vLLM's cache is ``[pages, page, Hkv, D]`` with strides
  ``(sP, sT, sH, 1)``. A virtual page id ``vp = page * (sP // sH) + kvh`` addresses
  ``page * sP + kvh * sH``, so one ``as_strided`` view ``[NV, page, 1, D]`` with strides
  ``(sH, sT, sH, 1)`` serves every KV head; the virtual block table holds ``vp`` per kept page.
- **Heads as sequences.** FA3 shares one page table among the heads of a sequence, and each
  head keeps its own blocks, so a launch sees the cache as one single-head view (heads as
  pages) and each query head's rows as sequences of their own. The sequences are given by
  ``seqused_q`` with explicit start rows (``cu_seqlens_q`` need not be cumulative then), so
  they can come in any order: **longest first** (by the row's causal context, one order for
  every head, made once per step), which FA3's in-order tile scheduler then runs as a
  longest-processing-time schedule. In ascending order (a causal prompt's natural one) the
  longest rows would start last and idle the GPU.
- **Heads per launch.** Where a head has at least :data:`MIN_LAUNCH_SEQS` rows (long prompts),
  a launch is one query head, on the strided views ``q[:, h:h+1]`` and ``out[:, h:h+1]``. An
  engine's prefill chunk has fewer (128 at 16K tokens: one wave of tiles, whose time is its
  longest row's, a dense tail row's), so a launch then attends several heads: their query rows
  copied head-major (``[heads * T, 1, D]``), one longest-first order across all of them, and
  the output copied back (two copies of the chunk's rows, against a launch per head).

The virtual block tables (``[Hq, rows, pages]`` int32, twice the int16 block lists' bytes at
64-token pages) are built by one Triton kernel from the block map as bit sets
(``BlockMap.mask``, a sixteenth of the lists: the predictor writes them for this path) and the
requests' block table, for some heads and a slice of their sorted sequences at a time where
memory is bounded (``plan.py``). PV skip (stage 2) is not expressible in FA3: layers with it
keep the Triton attention kernel.

An fp8 KV cache (``float8_e4m3fn`` with per-tensor scales, vLLM's ``--kv-cache-dtype fp8``) runs
FA3's fp8 forward, as FLASH_ATTN does over that cache: the query quantised to fp8 by the attention
layer, the three scales passed as FA3's ``q/k/v_descale`` (expanded to one per sequence), the
output in the model's dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sparge_serve.kernels.checks import (
    FP8_DTYPE,
    check_batch,
    check_block_map,
    check_group,
    check_out_and_layout,
    check_paged_inputs,
    check_scale,
)
from sparge_serve.kernels.geometry import (
    BLKK,
    BLKQ,
    BlockMap,
    KVScales,
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
                       (last - first).reshape(-1)[order].to(i32), order.to(i32))


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
    return _build_table(rows, batch, mask, bm.count, sub, cols, heads_per_page, group, s0, s1,
                        h0, out, m0, heads)


def _build_table(rows: VirtualRows, batch: PrefillBatch, mask: torch.Tensor,
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


def fa3_paged_forward(q, k, v, out, q_start, q_len, seqused_k, block_table, max_seqlen_k,
                      scale, descale=None) -> None:
    """vLLM's FA3 forward (``torch.ops._vllm_fa3_C.fwd``, as ``flash_attn_varlen_func`` calls
    it) with ``seqused_q``, which that wrapper does not pass: sequence ``i`` is rows
    ``q_start[i] : q_start[i] + q_len[i]`` of ``q``/``out``, bottom-right causal over the first
    ``seqused_k[i]`` tokens of its pages ``block_table[i]``. One split per sequence (no
    split-KV scratch). ``descale``: fp8 ``q, k, v``'s ``(q_descale, k_descale, v_descale)``,
    each ``[num_seqs, num_kv_heads]`` fp32 (FA3's fp8 forward)."""
    import vllm.vllm_flash_attn  # noqa: F401  (registers the op)

    q_descale, k_descale, v_descale = descale or (None, None, None)
    torch.ops._vllm_fa3_C.fwd(
        q, k, v, None, None, None, out,  # k_new, v_new, q_v
        q_start, None, None, q_len, seqused_k,  # cu_seqlens_q/k/k_new, seqused_q/k
        BLKQ, max_seqlen_k, block_table,
        None, None, None, None, None,  # kv_batch_idx, leftpad_k, rotary cos/sin/seqlens
        q_descale, k_descale, v_descale,
        scale, True, -1, -1, 0.0,  # causal, window left/right, softcap
        True, None, 1, None, 0,  # rotary_interleaved, scheduler_metadata, num_splits,
        None, 1, 0, None,  # pack_gqa, sm_margin; s_aux, cp world size/rank/seqused
    )


MIN_LAUNCH_SEQS = 1024
"""Fewest sequences (query tiles) one FA3 launch should hold: about eight per multiprocessor of
an H100/H200 (132), enough for the longest-first schedule to balance rows of unequal kept
blocks, such as a chunk's last query blocks, which keep every block. With fewer rows a head (an
engine's prefill chunk: 128 rows at 16K tokens), a launch attends several heads."""


def launch_heads(rows: int, heads: int) -> int:
    """Query heads one FA3 launch attends, for ``rows`` sequences a head and table buffers of
    ``heads`` heads: 1 where ``rows`` reach :data:`MIN_LAUNCH_SEQS`, else the fewest heads
    dividing ``heads`` that do (all of them where none does)."""
    return next((d for d in range(1, heads + 1)
                 if heads % d == 0 and d * rows >= MIN_LAUNCH_SEQS), heads)


def staging_bytes(max_rows: int, heads: tuple[int, ...], max_tokens: int, head_dim: int) -> int:
    """Most device bytes the query and output copies of a launch of several heads take (16 bits
    an element at most each), over batches of at most ``max_rows`` sequences a head and
    ``max_tokens`` rows of q, for table buffers of any of ``heads`` heads: a bound of
    :data:`MIN_LAUNCH_SEQS` query tiles' rows, 0 where no launch takes several heads."""
    return max((launch_heads(r, h) * min(max_tokens, r * BLKQ) * head_dim * 4
                for h in heads for r in range(1, min(max_rows, MIN_LAUNCH_SEQS - 1) + 1)
                if launch_heads(r, h) > 1), default=0)


@dataclass(frozen=True)
class VirtualPlan:
    """What the FA3 path needs of a batch, the same for every layer and head chunk of a step
    (:func:`plan_virtual`): the sequences longest first and their slices, the tables' shape, and
    how many heads one launch attends.

    With one head a launch, the sequences address the layer's ``q``/``out`` through per-head
    views. With ``launch > 1``, a launch's query rows are a head-major copy of the heads' rows
    ``span`` of ``q`` (``[launch * T, 1, D]``, ``T = span[1] - span[0]``), its sequence ``i`` of
    head ``h`` at ``i * launch + h`` (one longest-first order across the heads), and its output
    is copied back into those rows of ``out``; ``exact``: every row in ``span`` belongs to some
    sequence (else the copy starts from ``out``, so that rows outside the batch stay)."""

    rows: VirtualRows
    # per slice: (first sequence, end, its q_start [n * launch + 1] and q_len [n * launch])
    slices: tuple[tuple[int, int, torch.Tensor, torch.Tensor], ...]
    heads: int  # query heads one table buffer holds (a chunk's)
    step: int  # sequences one table holds (a slice's)
    cols: int  # entries of one sequence's table
    sub: int  # pages a key block
    max_k: int  # bound on a virtual context's tokens
    launch: int = 1  # query heads one FA3 launch attends (a divisor of `heads`)
    span: tuple[int, int] = (0, 0)  # rows of q a launch of several heads copies
    exact: bool = True


def plan_virtual(batch: PrefillBatch, nqb: int, page_size: int, heads: int,
                 slice_rows: int | None = None, q_rows: int | None = None) -> VirtualPlan:
    """:class:`VirtualPlan` of ``batch`` (``nqb`` query blocks a request) for chunks of ``heads``
    query heads, tables of ``slice_rows`` sequences (``None``: all): a few tensor ops for the
    order, no host synchronisation. ``q_rows``: the rows of ``q`` where ``batch.rows`` is not
    given (a launch of several heads copies them all)."""
    rows = virtual_rows(batch, nqb)
    n_seq = nqb * batch.num_reqs
    step = n_seq if slice_rows is None else max(1, min(slice_rows, n_seq))
    launch = launch_heads(n_seq, heads)
    span, exact = (batch.rows, True) if batch.rows is not None else ((0, q_rows), False)
    if launch > 1 and span[1] is None:
        raise ValueError("the FA3 path attends several heads a launch for this batch and needs "
                         "the rows of q it covers: set batch.rows or pass q_rows")
    slices = []
    for s0 in range(0, n_seq, step):
        s1 = min(n_seq, s0 + step)
        q_start, q_len = rows.q_start[s0:s1 + 1], rows.q_len[s0:s1]
        if launch > 1:  # head-major copies of the rows in span: sequence i of head h at i*L + h
            tokens = span[1] - span[0]
            dev = q_start.device
            starts = (q_start[:-1, None].long() - span[0]
                      + torch.arange(launch, device=dev) * tokens).reshape(-1)
            end = torch.full((1,), launch * tokens, dtype=torch.long, device=dev)
            q_start = torch.cat([starts, end]).to(torch.int32)
            q_len = q_len.repeat_interleave(launch)
        slices.append((s0, s1, q_start, q_len))
    return VirtualPlan(rows, tuple(slices), heads, step, table_cols(batch, page_size),
                       BLKK // page_size, num_blocks(batch.max_seq_len, BLKK) * BLKK, launch,
                       span if launch > 1 else (0, 0), exact)


class VirtualAttention:
    """The FA3 attention path for one layer (module docstring): ``plan``'s sequences and the
    layer's per-head views of ``q`` and ``out`` (or, for launches of several heads, copies of
    their rows), its caches as head pages, and one table buffer for ``plan.heads`` query heads
    (allocated here, freed with the object: the memory the backend reserves holds it only during
    a layer's call). :meth:`attend` runs a block map's heads. An fp8 cache comes with its
    ``scales`` and an fp8 ``q`` (:func:`check_fp8_inputs`)."""

    def __init__(self, plan: VirtualPlan, q: torch.Tensor, key_cache: torch.Tensor,
                 value_cache: torch.Tensor, batch: PrefillBatch, scale: float, out: torch.Tensor,
                 group: int, attn_fn=None, scales: KVScales | None = None):
        self.plan, self.batch, self.scale, self.group = plan, batch, scale, group
        # FA3's descales, one row a sequence of each slice (views of the one-element scales)
        self.descales = [None if scales is None else tuple(
            t.reshape(1, 1).expand(q_len.shape[0], 1)
            for t in (scales.q_scale, scales.k_scale, scales.v_scale))
            for _, _, _, q_len in plan.slices]
        self.k_view, self.heads_per_page = heads_as_pages(key_cache)
        self.v_view, _ = heads_as_pages(value_cache)
        self.q, self.out = q, out
        self.q_heads, self.out_heads = q.split(1, 1), out.split(1, 1)
        i32 = dict(dtype=torch.int32, device=q.device)
        n = plan.heads * plan.step
        self.tables = (torch.zeros(n * plan.cols, **i32), torch.empty(n, **i32))
        if plan.launch > 1:
            r0, r1 = plan.span
            rows = plan.launch * (r1 - r0)
            self.q_stage = torch.empty(rows, 1, q.shape[2], dtype=q.dtype, device=q.device)
            self.out_stage = torch.empty(rows, 1, q.shape[2], dtype=out.dtype, device=q.device)
        self.attn_fn = attn_fn or fa3_paged_forward

    def attend(self, bm: BlockMap, h0: int = 0) -> None:
        """Attention of the heads ``h0, h0 + 1, ...`` of ``bm`` (bit sets: a head chunk's map,
        or the whole call's), with tables for ``plan.heads`` of them at a time."""
        # NOTE: host loops over head groups and slices (and, one head a launch, over heads):
        # FA3 shares a page table among a sequence's heads, so per-head contexts are per-head
        # sequences (module docstring)
        plan = self.plan
        map_heads = bm.count.shape[1]
        staged = plan.launch > 1
        width = plan.launch if staged else plan.heads
        for m0 in range(0, map_heads, width):
            n = min(width, map_heads - m0)
            if staged:
                self._stage(h0 + m0, n)
            for (s0, s1, q_start, q_len), descale in zip(plan.slices, self.descales,
                                                         strict=True):
                vbt, used = _build_table(plan.rows, self.batch, bm.mask, bm.count, plan.sub,
                                         plan.cols, self.heads_per_page, self.group, s0, s1, h0,
                                         self.tables, m0, n, seq_major=staged)
                if staged:
                    self.attn_fn(self.q_stage, self.k_view, self.v_view, self.out_stage, q_start,
                                 q_len, used, vbt, plan.max_k, self.scale, descale)
                    continue
                for h, (table, n_used) in enumerate(zip(vbt.unbind(), used.unbind(),
                                                        strict=True)):
                    hq = h0 + m0 + h
                    self.attn_fn(self.q_heads[hq], self.k_view, self.v_view, self.out_heads[hq],
                                 q_start, q_len, n_used, table, plan.max_k, self.scale,
                                 descale)
            if staged:
                self._unstage(h0 + m0, n)

    def _views(self, h: int, n: int) -> tuple[torch.Tensor, ...]:
        """Rows ``span`` of heads ``h : h + n`` of ``q`` and ``out`` as ``[n, T, D]``, and the
        staging buffers as the same shape."""
        if n != self.plan.launch:
            raise ValueError(f"a launch of {self.plan.launch} heads got {n}: the map's heads "
                             "must be a multiple of the plan's")
        r0, r1 = self.plan.span
        d = self.q.shape[2]
        return (self.q[r0:r1, h:h + n].transpose(0, 1), self.out[r0:r1, h:h + n].transpose(0, 1),
                self.q_stage.view(n, r1 - r0, d), self.out_stage.view(n, r1 - r0, d))

    def _stage(self, h: int, n: int) -> None:
        q, out, q_stage, out_stage = self._views(h, n)
        q_stage.copy_(q)
        if not self.plan.exact:  # rows of span outside the batch keep their values
            out_stage.copy_(out)

    def _unstage(self, h: int, n: int) -> None:
        _, out, _, out_stage = self._views(h, n)
        out.copy_(out_stage)


def check_fp8_inputs(q: torch.Tensor, key_cache: torch.Tensor) -> None:
    """``ValueError`` unless an fp8 cache comes with an fp8 query: FA3's fp8 forward multiplies
    fp8 ``q``, K and V. (The scales are ``checks.check_paged_inputs``': a ``q_scale`` exactly
    when ``q`` is fp8.)"""
    if key_cache.dtype == FP8_DTYPE and q.dtype != FP8_DTYPE:
        raise ValueError("the FA3 attention path over an fp8 KV cache needs the query in fp8 with "
                         f"its scale (FA3's fp8 forward); got q {q.dtype}: quantise the query as "
                         "vLLM's attention layer does for FlashAttention, or use the Triton "
                         "attention kernel")


def fa3_sparse_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         batch: PrefillBatch, bm: BlockMap, scale: float, out: torch.Tensor,
                         attn_fn=None, group: int | None = None, slice_rows: int | None = None,
                         check_finite: bool = True,
                         scales: KVScales | None = None) -> torch.Tensor:
    """Stage-1 block-sparse attention (PV skip off) of ``batch`` through FA3 (module docstring).

    Writes the rows of ``out`` that ``batch.query_start_loc`` covers (others are left alone).
    ``bm``: :func:`~sparge_serve.kernels.predictor.predict_block_map`'s map of this batch (lists
    or bit sets). ``attn_fn``: :func:`fa3_paged_forward`'s signature (the default); ``group`` as
    ``predict_block_map``'s (head slices); ``slice_rows``: build the virtual block tables and
    call FA3 for that many of the sequences at a time (longest first; ``None``: all), which
    bounds the tables' memory (``plan.plan_chunks``). ``check_finite=False`` skips the checks
    of a batch of device tensors (their values: a host sync), as the other entry points' (docs/
    DESIGN.md, "Argument checks"). An fp8 cache (``float8_e4m3fn``) comes with its ``scales``
    and an fp8 ``q``; ``out`` is in the model's dtype. A planned prefill step uses
    :func:`plan_virtual` once per step and a :class:`VirtualAttention` per layer
    (``prefill.run_prefill``).
    """
    check_paged_inputs(q, key_cache, value_cache, scales, check_finite)
    check_fp8_inputs(q, key_cache)
    check_out_and_layout(q, key_cache, value_cache, out)
    check_batch(q, key_cache, batch, check_finite)
    check_scale(scale)
    check_block_map(bm, batch, q.shape[1], q.device)
    group = check_group(group, q.shape[1], key_cache.shape[2])
    page_size = key_cache.shape[1]
    if BLKK % page_size:
        raise ValueError(f"the FA3 path needs a page size dividing the key block ({BLKK}); got "
                         f"{page_size}-token pages: use sparse_paged_attention")
    if heads_as_pages(key_cache)[1] != heads_as_pages(value_cache)[1]:
        raise ValueError("key and value caches differ in layout")
    plan = plan_virtual(batch, bm.count.shape[2], page_size, q.shape[1], slice_rows,
                        q.shape[0])
    bm = dataclasses.replace(bm, mask=lut_to_mask(bm))
    VirtualAttention(plan, q, key_cache, value_cache, batch, scale, out, group, attn_fn,
                     scales).attend(bm)
    return out
