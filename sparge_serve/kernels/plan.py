"""Head chunks: the two-kernel sparse prefill in bounded memory.

The block map (``BlockMap.lut``, int16 ``[R, Hq, NQB, NKB]``) grows with the product of query and
context length: at a 128K prompt it is 25% of the K/V bytes the call reads, and the FA3
attention path's virtual block tables (int32, one entry per kept page) are twice that again.
:func:`~sparge_serve.kernels.prefill.sparge_paged_prefill` therefore runs the predictor and the
attention one *head chunk* at a time, each over views of ``q``/``out`` and the KV cache (nothing
is copied), with the pooled keys computed once per KV-head slice. The chunk is the largest one
whose buffers fit ``map_budget`` (a fraction of the K/V bytes of the batch's padded shape): whole
GQA groups where they fit, else a part of one group (down to one query head). The FA3 path also
builds its tables for a *slice* of each head's sequences at a time (longest first, at least
:data:`MIN_SLICE_ROWS` of them, so that each FA3 launch still fills the GPU), and, its block maps
being bit sets, selects for several chunks at once: one predictor launch per *selection* of whole
GQA groups, as many as fit next to one chunk's tables (a select grid of a few heads is
latency-bound).

The chunk plan depends on host ints only (heads, requests, ``max_query_len``, ``max_seq_len``),
so it never synchronises, and the backend can reserve its worst case at start-up.

:func:`plan_prefill` makes a step's :class:`PrefillPlan` once: everything a layer's prefill needs
that depends only on the batch, the model's attention geometry and the settings (the chunks, the
launch parameters, the FA3 path's sequence order, the block counts' buffer), so that
``prefill.run_prefill`` only launches, for every layer of that geometry.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from sparge_serve.kernels.attention import AttendParams, attend_params, tma_supported
from sparge_serve.kernels.checks import (
    SUPPORTED_DTYPES,
    check_context_len,
    check_head_dim,
    check_topk,
)
from sparge_serve.kernels.geometry import (
    BLKK,
    BLKQ,
    MAP_BUDGET,
    MIN_BUDGET_BYTES,
    PrefillBatch,
    key_block_stride,
    mask_words,
    num_blocks,
    selection_tile,
)
from sparge_serve.kernels.pooling import key_sums_bytes, pooled_keys_bytes, values_kmajor_bytes
from sparge_serve.kernels.predictor import select_launch_params

if TYPE_CHECKING:
    from sparge_serve.kernels.fa3 import VirtualPlan

ATTENTION_PATHS = ("triton", "fa3")
"""The attention kernels a prefill can run: the block-sparse Triton kernel, or FlashAttention-3
over virtual contexts (``fa3``)."""

MIN_SLICE_ROWS = 256
"""Fewest sequences per FA3 launch when the tables are sliced: two waves of an H100/H200's 132
multiprocessors (one FA3 tile each), for which a longest-first order balances."""


@dataclass(frozen=True)
class Shape:
    """A prefill call's (or a bound's) host sizes."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_reqs: int
    max_query_len: int
    max_seq_len: int
    fa3_page_size: int | None = None  # the FA3 attention path over pages of this size
    fp8_dot: bool = False  # fp8 products: the Triton kernel's K-major V copy (not on FA3's path)

    @property
    def rows(self) -> int:
        """Block-map rows of one head."""
        return self.max_reqs * num_blocks(self.max_query_len, BLKQ)

    def head_bytes(self) -> int:
        """Bytes one query head of a selection keeps while its chunks run: its block map (int16
        lists, or for the FA3 path bit sets, and two int32 counts per row)."""
        stride = key_block_stride(num_blocks(self.max_seq_len, BLKK))
        row = stride * 2 if self.fa3_page_size is None else mask_words(stride) * 4
        return self.rows * (row + 2 * 4)

    def min_select_heads(self, heads: int) -> int:
        """The fewest query heads one predictor launch covers for chunks of ``heads``: the
        chunk's own, or for the FA3 path at least one GQA group (its bit-set maps are small, and
        the select kernel's grid of a few heads is latency-bound)."""
        if self.fa3_page_size is None:
            return heads
        return max(heads, self.num_heads // self.num_kv_heads)

    def table_row_bytes(self) -> int:
        """Bytes of one sequence's virtual block table and context length (FA3 path; 0
        otherwise)."""
        if self.fa3_page_size is None:
            return 0
        stride = key_block_stride(num_blocks(self.max_seq_len, BLKK))
        return stride * (BLKK // self.fa3_page_size) * 4 + 4

    def chunk_bytes(self, heads: int, slice_rows: int | None = None,
                    select_heads: int | None = None) -> int:
        """Device bytes of one chunk of ``heads`` query heads, with FA3 tables for
        ``slice_rows`` of the sequences (``None``: all), whose map is part of a selection of
        ``select_heads`` (default :meth:`min_select_heads`): the pooled keys of the selection's
        KV heads, the larger of their key sums (temporary) and the selection's
        :meth:`head_bytes`, the tables of each head of the chunk, the selection's K-major
        values (``fp8_dot``, one byte a value), and for FA3 the call's
        sequence order (``fa3_tables.virtual_rows``, with its int64 temporaries), the dense
        rows' flags and lengths, and FA3's log-sum-exp of the dense rows' call (the selection's
        heads). The request of each sequence (``VirtualPlan.row_req``) is the plan's:
        :func:`prefill_scratch_bytes` counts it."""
        sel = self.min_select_heads(heads) if select_heads is None else select_heads
        kv = max(1, sel * self.num_kv_heads // self.num_heads)
        # the key sums live only while the keys are pooled, before the selection's map exists
        sizes = (kv, self.head_dim, self.max_reqs, self.max_seq_len)
        n = pooled_keys_bytes(*sizes) + max(key_sums_bytes(*sizes), sel * self.head_bytes())
        if self.fp8_dot and self.fa3_page_size is None:
            n += values_kmajor_bytes(*sizes, 1)
        if self.fa3_page_size is not None:
            rows = self.rows if slice_rows is None else min(slice_rows, self.rows)
            n += heads * rows * self.table_row_bytes()
            n += self.rows * (4 * 4 + 6 * 8) + 8
            # count == n_valid per head and per row, the launches' lengths, the dense runs'
            # starts and lengths and at most six int64 temporaries of theirs (fa3_tables.dense_runs)
            n += self.rows * (sel + 1 + 3 * 4 + 6 * 8)
            n += sel * self.max_reqs * self.max_query_len * 4
        return n

    def budget_bytes(self, elem_size: int, map_budget: float, floor: int | None = None) -> int:
        """``map_budget`` of the K and V bytes of ``max_reqs`` contexts of ``max_seq_len``
        tokens, at least ``floor`` (default :data:`MIN_BUDGET_BYTES`)."""
        kv = 2 * self.max_reqs * self.max_seq_len * self.num_kv_heads * self.head_dim * elem_size
        return max(int(map_budget * kv), MIN_BUDGET_BYTES if floor is None else floor)


def chunk_sizes(num_heads: int, num_kv_heads: int) -> list[int]:
    """Head-chunk sizes that pair query heads with a KV-head slice, largest first: whole groups
    (``group * m`` for ``m`` dividing ``Hkv``), then parts of one group (divisors of ``group``)."""
    group = num_heads // num_kv_heads
    whole = [group * m for m in range(num_kv_heads, 0, -1) if num_kv_heads % m == 0]
    part = [d for d in range(group - 1, 0, -1) if group % d == 0]
    return whole + part


def head_chunks(num_heads: int, num_kv_heads: int, heads: int,
                ) -> Iterator[tuple[slice, slice, bool]]:
    """Each chunk of ``heads`` query heads (a :func:`chunk_sizes` entry): its query heads, its KV
    heads, and whether it is the first chunk of that KV slice (which pools its keys)."""
    group = num_heads // num_kv_heads
    kv0 = -1
    for h0 in range(0, num_heads, heads):
        g0 = h0 // group
        yield slice(h0, h0 + heads), slice(g0, max(g0 + 1, (h0 + heads) // group)), g0 != kv0
        kv0 = g0


class ChunkPlan(NamedTuple):
    """How a call runs in head chunks (:func:`plan_chunks`)."""

    heads: int  # query heads a chunk attends
    slice_rows: int | None  # FA3 path: sequences a table covers (None: all)
    select_heads: int  # query heads one predictor launch selects (a multiple of heads)


def plan_chunks(shape: Shape, elem_size: int, map_budget: float | None = MAP_BUDGET,
                floor: int | None = None) -> ChunkPlan:
    """The largest :func:`chunk_sizes` entry that fits the budget, with all of its sequences'
    tables if they fit, else the most of them that do (at least :data:`MIN_SLICE_ROWS`); else
    one head with the smallest slice. Its selections cover :meth:`Shape.min_select_heads`, or
    for the FA3 path the most whole groups (a multiple of the chunk) that still fit. ``map_budget
    =None``: no bound, one chunk; ``floor``: as :meth:`Shape.budget_bytes`'s."""
    if map_budget is None:
        return ChunkPlan(shape.num_heads, None, shape.num_heads)
    if map_budget <= 0:
        raise ValueError(f"map_budget must be > 0 (a fraction of the K/V bytes) or None, got "
                         f"{map_budget}")
    limit = shape.budget_bytes(elem_size, map_budget, floor)
    sizes = chunk_sizes(shape.num_heads, shape.num_kv_heads)
    heads, rows = sizes[-1], (MIN_SLICE_ROWS if shape.fa3_page_size is not None else None)
    for size in sizes:
        if shape.chunk_bytes(size) <= limit:
            heads, rows = size, None
            break
        room = limit - shape.chunk_bytes(size, 0)
        if shape.table_row_bytes() and room > 0:
            fit = room // (size * shape.table_row_bytes())
            if fit >= MIN_SLICE_ROWS:
                slices = -(-shape.rows // fit)
                heads, rows = size, -(-shape.rows // slices)  # even slices, none larger
                break
    least = shape.min_select_heads(heads)
    # NOTE: FA3 path: fewer, larger predictor launches (one per KV slice), as memory allows
    wider = [s for s in sizes if s > least and s % heads == 0 and s % least == 0
             and shape.chunk_bytes(heads, rows, s) <= limit] if shape.fa3_page_size else []
    return ChunkPlan(heads, rows, max(wider, default=least))


def chunk_scratch_bytes(shape: Shape, elem_size: int, map_budget: float | None = MAP_BUDGET,
                        floor: int | None = None) -> int:
    """Most bytes a chunk of any call within these bounds allocates: a call's chunk fits its
    budget (at most this one's) or is the smallest chunk (at most this one's), and is never
    more than all heads at once."""
    everything = shape.chunk_bytes(shape.num_heads)
    if map_budget is None:
        return everything
    smallest = shape.chunk_bytes(chunk_sizes(shape.num_heads, shape.num_kv_heads)[-1],
                                 MIN_SLICE_ROWS)
    return min(everything, max(shape.budget_bytes(elem_size, map_budget, floor), smallest))


def prefill_scratch_bytes(num_heads: int, num_kv_heads: int, head_dim: int, max_reqs: int,
                          max_query_len: int, max_seq_len: int,
                          fa3_page_size: int | None = None,
                          map_budget: float | None = MAP_BUDGET, elem_size: int = 2,
                          fp8_dot: bool = False) -> int:
    """Upper bound of the device memory one sparse prefill call allocates (predictor + attention),
    for ``max_reqs`` requests of at most ``max_query_len`` new tokens and ``max_seq_len`` context:
    the whole call's kept/valid counts plus its largest head chunk (:func:`chunk_scratch_bytes`;
    ``fa3_page_size``: with the FA3 attention path over pages of that size, its copies of the
    query and output rows of a launch of several heads, ``fa3.staging_bytes``, bounded by
    ``fa3.MIN_LAUNCH_SEQS`` query tiles rather than by the budget, and the request of each
    sequence; ``fp8_dot``: the Triton kernel's fp8 products, with their K-major copy of V).

    The backend allocates this once during vLLM's memory profiling so that the KV cache is sized
    with room for it.
    """
    nqb = num_blocks(max_query_len, BLKQ)
    counts = max_reqs * num_heads * nqb * 2 * 4  # kept and valid blocks per row
    shape = Shape(num_heads, num_kv_heads, head_dim, max_reqs, max_query_len, max_seq_len,
                  fa3_page_size, fp8_dot)
    staging = 0
    if fa3_page_size is not None:  # a launch of several heads copies their q and out rows
        from sparge_serve.kernels.fa3 import staging_bytes

        staging = staging_bytes(shape.rows, tuple(chunk_sizes(num_heads, num_kv_heads)),
                                max_reqs * max_query_len, head_dim)
        # each sequence's request (the dense rows' call)
        staging += shape.rows * 4
    return counts + chunk_scratch_bytes(shape, elem_size, map_budget) + staging


@dataclass(frozen=True)
class ChunkRun:
    """One attention path's head chunks of a step (:func:`plan_prefill`)."""

    plan: ChunkPlan
    # per selection (one predictor launch): its query heads, the index of its KV slice among
    # the cache's splits into `kv_heads`, and whether it pools that slice's keys
    chunks: tuple[tuple[slice, int, bool], ...]
    kv_heads: int  # KV heads of a selection's slice
    counts: tuple[torch.Tensor, ...]  # per selection: int32 [2, R, select_heads, NQB]


@dataclass(frozen=True)
class PrefillPlan:
    """What a step's sparse prefill needs that depends only on the batch, the model's attention
    geometry and the settings (:func:`plan_prefill`); valid for every layer of that geometry.

    ``prefill.run_prefill`` reads it for each layer and launches; nothing in it reads a layer's
    tensors. A layer whose thresholds use the PV skip runs the Triton chunks (``triton``) even
    in a plan for ``"fa3"``; ``fa3`` and ``virtual`` exist only in such a plan.
    """

    batch: PrefillBatch
    num_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    topk: float | None
    nqb: int  # query blocks a request
    select: tuple[int, int]  # the select kernel's (dimensions per chunk, warps)
    tma: bool  # TMA loads possible (device, page size); a layer's cache layout decides too
    attend: dict[tuple[bool, bool], AttendParams]  # the attention launch by (TMA, PV skip)
    triton: ChunkRun
    fa3: ChunkRun | None
    virtual: VirtualPlan | None  # the FA3 path's sequences and tables
    counts: torch.Tensor  # int32 [2 * R * Hq * NQB]: the runs' block counts (both paths' views)
    stats: torch.Tensor  # int64 [3]: block counters of runs given none (never read)

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def run_for(self, pv_skip: bool) -> ChunkRun:
        """The chunks a layer runs: FA3's in a plan for ``"fa3"`` unless the layer uses the PV
        skip, else the Triton kernel's."""
        return self.fa3 if self.fa3 is not None and not pv_skip else self.triton


def _chunk_run(shape: Shape, chunks: ChunkPlan, counts: torch.Tensor, nqb: int) -> ChunkRun:
    """The selections of ``chunks`` over views of the flat ``counts`` buffer."""
    sel = chunks.select_heads
    group = shape.num_heads // shape.num_kv_heads
    kv_heads = max(1, sel // group)
    steps = tuple((hs, gs.start // kv_heads, first) for hs, gs, first in
                  head_chunks(shape.num_heads, shape.num_kv_heads, sel))
    n = shape.num_heads // sel
    views = counts.view(n, 2, shape.max_reqs, sel, nqb).unbind()
    return ChunkRun(chunks, steps, kv_heads, views)


def plan_prefill(batch: PrefillBatch, num_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, page_size: int, device: torch.device | str,
                 topk: float | None = None, map_budget: float | None = MAP_BUDGET,
                 attention: str = "triton", map_floor: int | None = None,
                 fp8_dot: bool = False, q_rows: int | None = None) -> PrefillPlan:
    """The :class:`PrefillPlan` of ``batch`` for layers of ``num_heads`` query heads,
    ``num_kv_heads`` KV heads of ``head_dim``, ``dtype`` K/V caches of ``page_size``-token pages
    on ``device``: head chunks under ``map_budget`` (``map_floor``: as ``plan_chunks``' floor),
    ``topk`` or CDF selection, ``attention`` ``"triton"`` or ``"fa3"``; ``fp8_dot``: the Triton
    attention's products in fp8 (layers with an fp8 query and cache); ``q_rows``: the rows of
    the layers' ``q`` where ``batch.rows`` is not given (the FA3 path's launches of several heads
    copy them).

    Host work (and for ``"fa3"`` the sequence order's few tensor ops), no synchronisation.
    ``ValueError`` for settings the kernels cannot run (geometry, dtype, page size for FA3, a
    context beyond the predictor's limit, ``topk`` or ``map_budget`` out of range).
    """
    device = torch.device(device)
    if attention not in ATTENTION_PATHS:
        raise ValueError(f"attention must be 'triton' or 'fa3', got {attention!r}")
    check_head_dim(head_dim)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype} unsupported; supported: float16, bfloat16")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    check_topk(topk)
    check_context_len(batch.max_seq_len)
    fa3 = attention == "fa3"
    if fa3 and BLKK % page_size:
        raise ValueError(f"the FA3 attention path needs a page size dividing the key block "
                         f"({BLKK}); got {page_size}-token pages: use attention='triton'")
    elem = dtype.itemsize
    nqb = num_blocks(batch.max_query_len, BLKQ)
    nkb_pad = selection_tile(num_blocks(batch.max_seq_len, BLKK))
    tma = tma_supported(device, page_size)
    attend = {(t, pv): attend_params(head_dim, pv, t, fp8_dot=fp8_dot) for t in (False, True)
              for pv in (False, True)}
    counts = torch.empty(2 * batch.num_reqs * num_heads * nqb, dtype=torch.int32, device=device)
    runs, virtual = [], None
    for page in (None, page_size) if fa3 else (None,):
        shape = Shape(num_heads, num_kv_heads, head_dim, batch.num_reqs, batch.max_query_len,
                      batch.max_seq_len, page, fp8_dot)
        runs.append(_chunk_run(shape, plan_chunks(shape, elem, map_budget, map_floor), counts,
                               nqb))
    if fa3:
        from sparge_serve.kernels.fa3 import plan_virtual

        virtual = plan_virtual(batch, nqb, page_size, runs[1].plan.heads, runs[1].plan.slice_rows,
                               q_rows)
    dc, warps = select_launch_params(nkb_pad)
    return PrefillPlan(batch, num_heads, num_kv_heads, head_dim, page_size, topk, nqb,
                       (dc, warps), tma, attend, runs[0], runs[1] if fa3 else None, virtual,
                       counts, torch.empty(3, dtype=torch.int64, device=device))
