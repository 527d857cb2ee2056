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
  longest row's), so a launch then attends several heads: their query rows copied head-major
  (``[heads * T, 1, D]``), one longest-first order across all of them, and the output copied
  back (two copies of the chunk's rows, against a launch per head).
- **Dense rows.** A row that keeps every valid key block (the query blocks holding a chunk's
  last 128 queries always do, stage 1) is a whole-context tile, which a launch cannot end
  before. Where a chunk's heads take :data:`DENSE_CALL_LAUNCHES` launches or more (long
  prompts), each launch would wait on its own such tiles, so the rows dense in all the chunk's
  heads are no virtual sequences there: one FA3 call of all those heads attends them over their
  requests' own pages (``VirtualAttention._dense_rows``), a run of a request's consecutive
  dense query blocks as one sequence (``fa3_tables.dense_runs``: a request dense throughout is
  attended as FLASH_ATTN attends it). With fewer launches (an engine's prefill chunks) they
  stay in the launches, whose other tiles run beside them.

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

from sparge_serve.kernels.checks import (
    FP8_DTYPE,
    check_batch,
    check_block_map,
    check_group,
    check_out_and_layout,
    check_paged_inputs,
    check_scale,
)
from sparge_serve.kernels.fa3_tables import (
    VirtualRows,
    build_table,
    dense_runs,
    heads_as_pages,
    table_cols,
    virtual_rows,
)
from sparge_serve.kernels.geometry import (
    BLKK,
    BLKQ,
    BlockMap,
    KVScales,
    PrefillBatch,
    num_blocks,
)
from sparge_serve.kernels.predictor import lut_to_mask


def fa3_paged_forward(q, k, v, out, q_start, q_len, seqused_k, block_table, max_seqlen_k,
                      scale, descale=None, kv_batch_idx=None, max_seqlen_q=BLKQ) -> None:
    """vLLM's FA3 forward (``torch.ops._vllm_fa3_C.fwd``, as ``flash_attn_varlen_func`` calls
    it) with ``seqused_q``, which that wrapper does not pass: sequence ``i`` is rows
    ``q_start[i] : q_start[i] + q_len[i]`` (at most ``max_seqlen_q``) of ``q``/``out``,
    bottom-right causal over the first ``seqused_k[i]`` tokens of its pages (``block_table``'s
    row ``i``, or ``kv_batch_idx[i]``).
    One split per sequence: no split-KV scratch, which FA3 would size by every row of ``q``.
    ``descale``: fp8 ``q, k, v``'s ``(q_descale, k_descale, v_descale)``, each ``[num_seqs,
    num_kv_heads]`` fp32 (FA3's fp8 forward). ``kv_batch_idx``: ``[num_seqs]`` int32, the row of
    ``block_table`` each sequence reads (default: its own)."""
    import vllm.vllm_flash_attn  # noqa: F401  (registers the op)

    q_descale, k_descale, v_descale = descale or (None, None, None)
    torch.ops._vllm_fa3_C.fwd(
        q, k, v, None, None, None, out,  # k_new, v_new, q_v
        q_start, None, None, q_len, seqused_k,  # cu_seqlens_q/k/k_new, seqused_q/k
        max_seqlen_q, max_seqlen_k, block_table,
        kv_batch_idx, None, None, None, None,  # leftpad_k, rotary cos/sin/seqlens
        q_descale, k_descale, v_descale,
        scale, True, -1, -1, 0.0,  # causal, window left/right, softcap
        True, None, 1,  # rotary_interleaved, scheduler_metadata, num_splits
        None, 0, None, 1, 0, None,  # pack_gqa, sm_margin, s_aux, cp world size/rank/seqused
    )


MIN_LAUNCH_SEQS = 1024
"""Fewest sequences (query tiles) one FA3 launch should hold: about eight per multiprocessor of
an H100/H200 (132), enough for the longest-first schedule to balance rows of unequal kept
blocks. With fewer rows a head (an engine's prefill chunk: 128 rows at 16K tokens), a launch
attends several heads."""


DENSE_CALL_LAUNCHES = 8
"""Fewest launches a head chunk's sequences take for its dense rows to get a call of their own
(:class:`VirtualPlan`). Measured on an H100, both ways in one run (32 q / 8 KV heads of 128,
64-token pages; docs/PERFORMANCE.md "Dense tails"): a 128K prompt in one call (32 launches) runs
1.28x faster at 80% block sparsity with the call, and 1.15x dense over an fp8 cache; 2K and 16K
chunks on 32K-128K contexts (1 or 4 launches) run 1.05-1.4x faster at 80% without it, their
dense tiles beside the launch's other tiles instead of after them. At 8 launches (a 32K prompt)
the two tie up to 80%; at 90% the call measured 1.27x faster (separate runs)."""


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
    # per slice: (first sequence, end, its q_start [n * launch + 1])
    slices: tuple[tuple[int, int, torch.Tensor], ...]
    heads: int  # query heads one table buffer holds (a chunk's)
    step: int  # sequences one table holds (a slice's)
    cols: int  # entries of one sequence's table
    sub: int  # pages a key block
    max_k: int  # bound on a virtual context's tokens
    # [S] int32: each sequence's request, the row of the requests' page table it reads in the
    # dense rows' call (FA3's kv_batch_idx); None: no such call (DENSE_CALL_LAUNCHES)
    row_req: torch.Tensor | None
    launch: int = 1  # query heads one FA3 launch attends (a divisor of `heads`)
    span: tuple[int, int] = (0, 0)  # rows of q a launch of several heads copies
    exact: bool = True

    @property
    def dense_call(self) -> bool:
        """Whether the rows dense in all heads go to one call of their own."""
        return self.row_req is not None


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
    row_req = ((rows.order // nqb).to(torch.int32)
               if heads // launch >= DENSE_CALL_LAUNCHES else None)
    span, exact = (batch.rows, True) if batch.rows is not None else ((0, q_rows), False)
    if launch > 1 and span[1] is None:
        raise ValueError("the FA3 path attends several heads a launch for this batch and needs "
                         "the rows of q it covers: set batch.rows or pass q_rows")
    slices = []
    for s0 in range(0, n_seq, step):
        s1 = min(n_seq, s0 + step)
        q_start = rows.q_start[s0:s1 + 1]
        if launch > 1:  # head-major copies of the rows in span: sequence i of head h at i*L + h
            tokens = span[1] - span[0]
            dev = q_start.device
            starts = (q_start[:-1, None].long() - span[0]
                      + torch.arange(launch, device=dev) * tokens).reshape(-1)
            end = torch.full((1,), launch * tokens, dtype=torch.long, device=dev)
            q_start = torch.cat([starts, end]).to(torch.int32)
        slices.append((s0, s1, q_start))
    return VirtualPlan(rows, tuple(slices), heads, step, table_cols(batch, page_size),
                       BLKK // page_size, num_blocks(batch.max_seq_len, BLKK) * BLKK, row_req,
                       launch, span if launch > 1 else (0, 0), exact)


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
        self.k_view, self.heads_per_page = heads_as_pages(key_cache)
        self.v_view, _ = heads_as_pages(value_cache)
        self.key_cache, self.value_cache, self.scales = key_cache, value_cache, scales
        # each slice's descales: its sequences read one head page each
        self.descales = [self._descale(q_start.shape[0] - 1, 1) for _, _, q_start in plan.slices]
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
        plan, rows = self.plan, self.plan.rows
        map_heads = bm.count.shape[1]
        staged = plan.launch > 1
        width = plan.launch if staged else plan.heads
        # with the dense call, rows that keep every valid block in all of the map's heads (a
        # chunk's last queries always; any row where the thresholds keep everything) are no
        # virtual sequences: the call after the launches attends them (:meth:`_dense_rows`)
        q_lens = rows.q_len
        if plan.dense_call:
            dense = (bm.count == bm.n_valid).all(1)  # [R, NQB]
            q_lens = torch.where(dense.reshape(-1).index_select(0, rows.order), 0, rows.q_len)
        # each slice's lengths, the same for every head group (staged: sequence i of head h at
        # i * launch + h)
        slice_lens = [q_lens[s0:s1].repeat_interleave(plan.launch) if staged else q_lens[s0:s1]
                      for s0, s1, _ in plan.slices]
        for m0 in range(0, map_heads, width):
            n = min(width, map_heads - m0)
            if staged:
                self._stage(h0 + m0, n)
            for (s0, s1, q_start), q_len, descale in zip(plan.slices, slice_lens, self.descales,
                                                         strict=True):
                vbt, used = build_table(rows, self.batch, bm.mask, bm.count, plan.sub, plan.cols,
                                        self.heads_per_page, self.group, s0, s1, h0, self.tables,
                                        m0, n, seq_major=staged)
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
        # NOTE: after the launches: a staged launch copies back its whole span, dense rows too
        if plan.dense_call:
            self._dense_rows(h0, map_heads, *dense_runs(rows, dense))

    def _dense_rows(self, h: int, n: int, q_start: torch.Tensor, q_len: torch.Tensor) -> None:
        """The dense rows (:func:`~sparge_serve.kernels.fa3_tables.dense_runs`' sequences) as
        dense causal attention of heads ``h : h + n`` (a chunk's: whole GQA groups, or heads of
        one KV head) over their requests' own pages: one FA3 call, GQA packed as FLASH_ATTN's,
        in the sequences' longest-first order, a run of a request's dense rows one sequence.

        Such a row kept in every head's launch would be that launch's longest tile (a chunk's
        last queries: the whole context on one multiprocessor, while the launch's other rows
        at high sparsity end sooner), so every launch would last that long; here those tiles
        run side by side once a call. And a dense configuration runs as FA3 does, each KV head's
        blocks read once for its group (over an fp8 cache, V transposed once a KV head)."""
        kv0, kvn = h // self.group, max(1, n // self.group)
        rows = self.plan.rows
        self.attn_fn(self.q[:, h:h + n], self.key_cache[:, :, kv0:kv0 + kvn],
                     self.value_cache[:, :, kv0:kv0 + kvn], self.out[:, h:h + n], q_start,
                     q_len, rows.context, self.batch.block_table, self.plan.max_k, self.scale,
                     self._descale(q_len.shape[0], kvn), kv_batch_idx=self.plan.row_req,
                     max_seqlen_q=self.batch.max_query_len)

    def _descale(self, seqs: int, kv_heads: int) -> tuple[torch.Tensor, ...] | None:
        """FA3's ``(q, k, v)`` descales for ``seqs`` sequences over ``kv_heads`` KV heads: views
        of the one-element scales (``None`` over a model-dtype cache)."""
        if self.scales is None:
            return None
        s = self.scales
        return tuple(t.reshape(1, 1).expand(seqs, kv_heads)
                     for t in (s.q_scale, s.k_scale, s.v_scale))

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
