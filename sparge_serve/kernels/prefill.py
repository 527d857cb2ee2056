"""Both stages of the sparse prefill for a varlen batch, one head chunk at a time.

A step plans once and launches per layer:

- ``plan.plan_prefill`` (once per step): a :class:`~sparge_serve.kernels.plan.PrefillPlan` of what
  depends only on the batch, the model's attention geometry and the settings;
- :func:`run_prefill` (per layer): per head chunk the predictor's block map
  (``predictor.select_blocks``), then the attention over it (``attention.attend_blocks``, or for
  ``"fa3"`` FlashAttention-3 over virtual contexts, ``fa3``). Launches only: no
  checks, no host synchronisation.

:func:`sparge_paged_prefill` (the public entry point) is the checked form of both for one call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparge_serve.kernels.attention import attend_blocks, check_fp8_dot, tma_layout_ok
from sparge_serve.kernels.checks import (
    check_head_thresholds,
    check_out_and_layout,
    check_paged_inputs,
    check_predictor_args,
    stats_buffer,
)
from sparge_serve.kernels.geometry import (
    MAP_BUDGET,
    PV_SKIP_OFF,
    BlockMap,
    KVScales,
    PrefillBatch,
)
from sparge_serve.kernels.plan import PrefillPlan, plan_prefill
from sparge_serve.kernels.pooling import pool_keys, values_kmajor
from sparge_serve.kernels.predictor import select_blocks


def run_prefill(plan: PrefillPlan, q: torch.Tensor, key_cache: torch.Tensor,
                value_cache: torch.Tensor, scale: float, simthreshd1: torch.Tensor,
                cdfthreshd: torch.Tensor, pvthreshd: torch.Tensor, out: torch.Tensor,
                stats: torch.Tensor | None = None, pv_skip: bool = False,
                on_predicted: Callable[[], None] | None = None,
                predict_only: bool = False, scales: KVScales | None = None) -> BlockMap | None:
    """Both stages of ``plan``'s batch for one layer: launches only (no checks; the arguments
    are those :func:`sparge_paged_prefill` checks, for the plan's geometry).

    ``stats``: the int64 ``[3]`` block counters to add into (``None``: the plan's discarded
    ones). ``pv_skip``: whether any head's ``pvthreshd`` uses the PV skip; such a layer runs the
    Triton attention kernel even in a plan for ``"fa3"``. ``on_predicted`` is called between the
    two stages of a one-chunk run (the backend's predictor timing). ``predict_only``: the
    chunks' predictor alone, ``out`` left alone (the benchmark's predictor share of a chunked
    call). ``scales``: an fp8 cache's (and fp8 query's) dequantisation scales.

    Returns the block map when the run is one chunk (its lists, for ``"fa3"`` its bit sets);
    else ``None``, and :func:`block_counts` assembles the run's counts. The counts live in the
    plan's buffer: the next run of the plan overwrites them.
    """
    run = plan.run_for(pv_skip)
    fa3 = run is plan.fa3
    stats = plan.stats if stats is None else stats
    sel = run.plan.select_heads
    group, batch = plan.group, plan.batch
    dc, warps = plan.select
    qs = q.split(sel, 1)
    sims, cdfs = simthreshd1.split(sel), cdfthreshd.split(sel)
    key_slices = key_cache.split(run.kv_heads, 2)
    if fa3:
        from sparge_serve.kernels.fa3 import VirtualAttention

        if not predict_only:  # a selection's heads attended `plan.heads` at a time
            attend = VirtualAttention(plan.virtual, q, key_cache, value_cache, batch, scale, out,
                                      group, scales=scales)
    else:
        value_slices = value_cache.split(run.kv_heads, 2)
        outs, pvs = out.split(sel, 1), pvthreshd.split(sel)  # a selection is a chunk
        use_tma = plan.tma and tma_layout_ok(key_cache) and tma_layout_ok(value_cache)
        params = plan.attend[use_tma, pv_skip]
    one = len(run.chunks) == 1
    # NOTE: a host loop over head chunks (few, and only where one chunk would not fit the
    # memory budget): each chunk is one batched launch per kernel over all its rows
    for c, (hs, kv, first) in enumerate(run.chunks):
        bm = None  # NOTE: the last chunk's map is freed before the next one is allocated
        if first:  # first chunk of this KV slice: its pooled keys (the last ones freed first)
            pooled = vt = None
            kv_q = slice(kv * run.kv_heads * group, (kv + 1) * run.kv_heads * group)
            pooled = pool_keys(key_slices[kv], batch, cdfthreshd[kv_q], group, plan.topk)
            if not fa3 and not predict_only and params.v_kmajor:  # its values, K-major
                vt = values_kmajor(value_slices[kv], batch)
        # NOTE: the FA3 path's maps are bit sets: a sixteenth of the lists' bytes, so that one
        # select launch covers whole KV slices (a grid of a few heads is latency-bound: 43 us
        # for 2 heads at 32K, against 24 us of a 32-head launch's time per 2 heads; H200)
        bm = select_blocks(qs[c], key_slices[kv], batch, scale, sims[c], cdfs[c], plan.topk,
                           stats, pooled, group, run.counts[c], dc, warps, as_mask=fa3,
                           scales=scales)
        if on_predicted is not None and one:
            on_predicted()
        if predict_only:
            continue
        if fa3:
            attend.attend(bm, hs.start)
        else:
            attend_blocks(qs[c], key_slices[kv], value_slices[kv], batch, bm, scale, pvs[c],
                          outs[c], stats, pv_skip, group, params, scales=scales, vt=vt)
    return bm if one else None


def block_counts(plan: PrefillPlan, pv_skip: bool = False) -> BlockMap:
    """The block counts ``[R, Hq, NQB]`` of ``plan``'s last run (of a layer with or without the
    PV skip), one copy from its selections' ``[2, R, select_heads, NQB]`` parts; no lists."""
    b = plan.batch
    counts = plan.run_for(pv_skip).counts
    both = torch.stack(counts, 2).reshape(2, b.num_reqs, plan.num_heads, plan.nqb)
    return BlockMap(None, both[0], both[1])


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
    scales: KVScales | None = None,
    fp8_dot: bool = False,
) -> BlockMap:
    """Both stages for a varlen prefill batch; returns its block counts (and its block map).

    The checked form of ``plan.plan_prefill`` + :func:`run_prefill` for one call: two kernels,
    run one *head chunk* at a time (``plan.py``): the predictor's block map, then the attention
    (``attention``: ``"triton"``, the block-sparse kernel, or ``"fa3"``, FlashAttention-3 over
    virtual contexts, PV skip off; ``fa3.py``), over head slices of
    ``q``/``out``/the caches, so that the block map and the FA3 tables never pass
    ``map_budget`` of the batch's K/V bytes or ``map_floor`` bytes, whichever is more
    (``geometry.MIN_BUDGET_BYTES`` by default; ``map_budget=None``: all heads in one chunk). The
    returned map has the whole call's ``count``/``n_valid``, and its ``lut`` (the ``fa3`` path:
    its bit sets, ``mask``) when it ran as one chunk (else ``None``). The ``fa3`` path selects
    for several chunks at once (``plan.ChunkPlan.select_heads``). ``on_predicted`` is called
    between the two stages of a one-chunk call. An fp8 KV cache (``float8_e4m3fn``; ``q`` may be
    fp8 too, and must be for ``"fa3"``; ``out`` is in the model's dtype) comes with its
    ``scales``; the budget stays a fraction of the K/V bytes in the model's dtype. ``fp8_dot``
    (an fp8 ``q`` and cache): the Triton attention's products in fp8, ``P`` rounded to fp8, as
    FlashAttention-3's fp8 forward.

    Arguments are checked before any launch (``ValueError``; docs/DESIGN.md, "Argument
    checks"). ``check_finite`` also checks the values held in tensors: the thresholds (finite, in
    range) and the batch's offsets, lengths and page ids, a host sync for device tensors;
    ``False`` skips those and, for device tensors, every batch check. ``pv_skip``: whether any
    head uses the PV skip; ``None`` reads ``pvthreshd`` (a host sync for device tensors).
    """
    check_paged_inputs(q, key_cache, value_cache, scales, check_finite)
    check_head_thresholds("pvthreshd", pvthreshd, q.shape[1], q.device, check_finite)
    stats = stats_buffer(stats, q.device)  # one for both stages
    check_predictor_args(q, key_cache, batch, scale, simthreshd1, cdfthreshd, topk,
                         check_finite, scales)
    check_out_and_layout(q, key_cache, value_cache, out)
    if pv_skip is None:
        pv_skip = bool((pvthreshd < PV_SKIP_OFF).any())
    if fp8_dot:
        check_fp8_dot(q, key_cache)
    if attention == "fa3":
        from sparge_serve.kernels.fa3 import check_fp8_inputs

        check_fp8_inputs(q, key_cache)
    if attention == "fa3" and pv_skip:
        raise ValueError("the FA3 attention path has no PV skip (stage 2): use "
                         "attention='triton' for thresholds with pvthreshd < 50")
    plan = plan_prefill(batch, q.shape[1], key_cache.shape[2], q.shape[2], out.dtype,
                        key_cache.shape[1], q.device, topk, map_budget, attention, map_floor,
                        fp8_dot, q.shape[0])
    bm = run_prefill(plan, q, key_cache, value_cache, scale, simthreshd1, cdfthreshd, pvthreshd,
                     out, stats, pv_skip, on_predicted, scales=scales)
    if bm is not None:
        return bm
    return block_counts(plan, pv_skip)


__all__ = ["block_counts", "run_prefill", "sparge_paged_prefill"]
