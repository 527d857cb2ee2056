"""Both stages of the sparse prefill for a varlen batch, one head chunk at a time.

:func:`sparge_paged_prefill` checks its arguments, plans the call's head chunks
(``plan.plan_chunks``) and runs them: per chunk the predictor's block map
(``predictor.select_blocks``), then the attention over it (``attention.attend_blocks``, or for
``attention="fa3"`` FlashAttention-3 over virtual contexts, ``experimental.fa3``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparge_serve.kernels.attention import attend_blocks
from sparge_serve.kernels.checks import (
    check_head_thresholds,
    check_out_and_layout,
    check_paged_inputs,
    check_predictor_args,
    stats_buffer,
)
from sparge_serve.kernels.geometry import (
    BLKK,
    BLKQ,
    MAP_BUDGET,
    PV_SKIP_OFF,
    BlockMap,
    PrefillBatch,
    num_blocks,
)
from sparge_serve.kernels.plan import Shape, head_chunks, plan_chunks
from sparge_serve.kernels.pooling import pool_keys
from sparge_serve.kernels.predictor import select_blocks


def sparge_paged_prefill(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    batch: PrefillBatch,
    scale: float,
    simthreshd1: torch.Tensor,
    cdfthreshd: torch.Tensor,
    pvthreshd: torch.Tensor,
    out: torch.Tensor,
    topk: float | None = None,
    stats: torch.Tensor | None = None,
    check_finite: bool = True,
    pv_skip: bool | None = None,
    attention: str = "triton",
    map_budget: float | None = MAP_BUDGET,
    on_predicted: Callable[[], None] | None = None,
    map_floor: int | None = None,
) -> BlockMap:
    """Both stages for a varlen prefill batch; returns its block counts (and its block map).

    Two kernels, run one *head chunk* at a time (``plan.py``): the predictor's
    block map, then the attention kernel (``attention``: ``"triton"``, the block-sparse kernel
    of this module, or ``"fa3"``, FlashAttention-3 over virtual contexts, PV skip off; see
    ``experimental/fa3.py``), over head slices of ``q``/``out``/the caches, so that the block map and the
    FA3 tables never pass ``map_budget`` of the batch's K/V bytes or ``map_floor`` bytes,
    whichever is more (``geometry.MIN_BUDGET_BYTES`` by default; ``map_budget=None``: all heads in
    one chunk). The returned map has the whole call's ``count``/``n_valid``, and its ``lut`` (the
    ``fa3`` path: its bit sets, ``mask``) when it ran as one chunk (else ``None``). The ``fa3``
    path selects for several chunks at once (``plan.ChunkPlan.select_heads``). ``on_predicted`` is
    called between the two stages of a one-chunk call (the backend's predictor timing).

    Arguments are checked before any launch (``ValueError``; docs/DESIGN.md, "Argument
    checks"). ``check_finite`` also checks the values held in tensors: the thresholds (finite, in
    range) and the batch's offsets, lengths and page ids, a host sync for device tensors;
    ``False`` (the backend's calls) skips those and, for device tensors, every batch check.
    """
    check_paged_inputs(q, key_cache, value_cache)
    check_head_thresholds("pvthreshd", pvthreshd, q.shape[1], q.device, check_finite)
    if attention not in ("triton", "fa3"):
        raise ValueError(f"attention must be 'triton' or 'fa3', got {attention!r}")
    stats = stats_buffer(stats, q.device)  # one for both stages
    check_predictor_args(q, key_cache, batch, scale, simthreshd1, cdfthreshd, topk,
                         check_finite)
    check_out_and_layout(q, key_cache, value_cache, out)
    if attention == "fa3" and BLKK % key_cache.shape[1]:
        raise ValueError(f"the FA3 attention path needs a page size dividing the key block "
                         f"({BLKK}); got {key_cache.shape[1]}-token pages: use "
                         "attention='triton'")
    if pv_skip is None:
        pv_skip = bool((pvthreshd < PV_SKIP_OFF).any())
    if attention == "fa3" and pv_skip:
        raise ValueError("the FA3 attention path has no PV skip (stage 2): use "
                         "attention='triton' for thresholds with pvthreshd < 50")
    return _chunked_prefill(q, key_cache, value_cache, batch, scale, simthreshd1, cdfthreshd,
                            pvthreshd, out, topk, stats, pv_skip, attention, map_budget,
                            map_floor, on_predicted)


def _chunked_prefill(q, key_cache, value_cache, batch, scale, simthreshd1, cdfthreshd, pvthreshd,
                     out, topk, stats, pv_skip, attention, map_budget, map_floor,
                     on_predicted, predict_only: bool = False) -> BlockMap:
    """:func:`sparge_paged_prefill`'s two-kernel path, one head chunk at a time (arguments
    checked by the caller). ``predict_only``: the same chunks' predictor alone, ``out`` left
    alone (the benchmark's predictor share of a chunked call)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, page, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    fa3 = attention == "fa3"
    heads, slice_rows, sel_heads = plan_chunks(
        Shape(num_heads, num_kv_heads, head_dim, batch.num_reqs, batch.max_query_len,
              batch.max_seq_len, page if fa3 else None), q.element_size(), map_budget, map_floor)
    nqb = num_blocks(batch.max_query_len, BLKQ)
    n_chunks = num_heads // sel_heads  # predictor launches (the Triton path: one per chunk)
    kv_heads = max(1, sel_heads // group)  # KV heads of a selection's slice
    # NOTE: a call's views of every chunk are made at once (one split per tensor) and each
    # selection's block counts are a contiguous part of one buffer: slicing and copying them per
    # chunk was a third of a chunk's host time (H200 profile, session 16)
    counts = torch.empty(n_chunks, 2, batch.num_reqs, sel_heads, nqb, dtype=torch.int32,
                         device=q.device).unbind()
    qs = q.split(sel_heads, 1)
    sims, cdfs = simthreshd1.split(sel_heads), cdfthreshd.split(sel_heads)
    key_slices = key_cache.split(kv_heads, 2)
    if not fa3:
        value_slices = value_cache.split(kv_heads, 2)
        outs, pvs = out.split(sel_heads, 1), pvthreshd.split(sel_heads)  # sel_heads = heads
    elif not predict_only:
        from sparge_serve.kernels.experimental.fa3 import VirtualAttention

        # the selection's heads attended `heads` at a time (the tables' memory)
        attend = VirtualAttention(q, key_cache, value_cache, batch, nqb, scale, out, group,
                                  heads, slice_rows)
    # NOTE: a host loop over head chunks (few, and only where one chunk would not fit the
    # memory budget): each chunk is one batched launch per kernel over all its rows
    for c, (hs, gs, first) in enumerate(head_chunks(num_heads, num_kv_heads, sel_heads)):
        kv = gs.start // kv_heads
        bm = None  # NOTE: the last chunk's map is freed before the next one is allocated
        if first:  # first chunk of this KV slice: its pooled keys (the last ones freed first)
            pooled = None
            pooled = pool_keys(key_slices[kv], batch)
        # NOTE: the FA3 path's maps are bit sets: a sixteenth of the lists' bytes, so that one
        # select launch covers whole KV slices (a grid of a few heads is latency-bound: 43 us
        # for 2 heads at 32K, against 24 us of a 32-head launch's time per 2 heads; H200)
        bm = select_blocks(qs[c], key_slices[kv], batch, scale, sims[c], cdfs[c], topk, stats,
                           pooled, group, counts[c], as_mask=fa3)
        if on_predicted is not None and n_chunks == 1:
            on_predicted()
        if predict_only:
            continue
        if fa3:
            attend.attend(bm, hs.start)
        else:
            attend_blocks(qs[c], key_slices[kv], value_slices[kv], batch, bm, scale, pvs[c],
                          outs[c], stats, pv_skip, group)
    if n_chunks == 1:
        return bm
    # [2, R, Hq, NQB] from the selections' [2, R, sel_heads, NQB] (one copy a call)
    both = torch.stack(counts, 2).reshape(2, batch.num_reqs, num_heads, nqb)
    return BlockMap(None, both[0], both[1])


__all__ = ["sparge_paged_prefill"]
