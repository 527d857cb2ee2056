"""Head chunks (sparge_serve.kernels.plan): the plan, its memory bound, and that a prefill run
one head chunk at a time computes exactly what the all-heads run computes."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparge_serve.kernels import MAP_BUDGET, predict_block_map, sparge_paged_prefill
from sparge_serve.kernels import plan as chunks
from sparge_serve.kernels.plan import (
    MIN_SLICE_ROWS,
    ChunkPlan,
    Shape,
    chunk_scratch_bytes,
    chunk_sizes,
    plan_chunks,
)
from tests.kernel_inputs import attention_oracle, head_vec, kept_blocks, make_paged_case
from tests.test_virtual import fa3_emulation

# (query_len, seq_len): three query blocks after a prefix (the third partial; the first
# selects), a short query after a prefix; no length is a multiple of a block
REQS = [(260, 500), (37, 165)]


def test_chunk_sizes_pair_query_heads_with_kv_slices():
    assert chunk_sizes(32, 8) == [32, 16, 8, 4, 2, 1]  # GQA 4: whole groups, then parts of one
    assert chunk_sizes(8, 8) == [8, 4, 2, 1]  # MHA
    assert chunk_sizes(8, 1) == [8, 4, 2, 1]  # MQA: parts of the one group
    assert chunk_sizes(12, 2) == [12, 6, 3, 2, 1]  # GQA 6: 4 and 5 heads pair with no KV slice


def test_head_chunks_pair_each_chunk_with_its_kv_slice():
    def chunks_of(hq, hkv, heads):
        return [(h.start, h.stop, g.start, g.stop, first)
                for h, g, first in chunks.head_chunks(hq, hkv, heads)]

    assert chunks_of(8, 2, 8) == [(0, 8, 0, 2, True)]
    assert chunks_of(8, 2, 4) == [(0, 4, 0, 1, True), (4, 8, 1, 2, True)]
    # parts of a group share its KV head, pooled once
    assert chunks_of(8, 2, 2) == [(0, 2, 0, 1, True), (2, 4, 0, 1, False),
                                  (4, 6, 1, 2, True), (6, 8, 1, 2, False)]


def test_config_default_is_the_kernels_default():
    from sparge_serve.config import SpargeConfig

    assert SpargeConfig().map_budget == MAP_BUDGET


@pytest.mark.parametrize("fa3_page", [None, 64])
def test_plan_fits_the_budget_at_the_benchmark_shapes(fa3_page):
    """32 q / 8 KV heads, head dim 128, bf16, one prompt (the kernel benchmark's shape), with no floor (the
    bounded-memory setting): each chunk's buffers stay within 1.5% of the K/V bytes, with as many
    heads as fit (and for FA3, as many of their sequences' tables)."""
    for length in (8192, 32768, 131072):
        shape = Shape(32, 8, 128, 1, length, length, fa3_page)
        heads, rows, sel = plan_chunks(shape, 2, floor=0)
        limit = MAP_BUDGET * 2 * length * 8 * 128 * 2
        assert shape.chunk_bytes(heads, rows, sel) <= limit
        bigger = [s for s in chunk_sizes(32, 8) if s > heads]
        if bigger:  # the next larger chunk fits with no slice of its tables
            assert shape.chunk_bytes(min(bigger), MIN_SLICE_ROWS) > limit
        assert rows is None or (fa3_page and MIN_SLICE_ROWS <= rows < shape.rows)
        # the Triton path selects a chunk's heads; FA3's (bit-set maps) the most whole groups
        # that fit, a multiple of the chunk
        assert sel == heads if fa3_page is None else (sel % heads == 0 and sel % 4 == 0)
        wider = [s for s in chunk_sizes(32, 8) if s > sel and s % heads == 0]
        if fa3_page and wider:
            assert shape.chunk_bytes(heads, rows, min(wider)) > limit
    long = Shape(32, 8, 128, 1, 131072, 131072, fa3_page)
    # 128K: one head a chunk; FA3: one, a third of its tables at a time, one group selected
    assert plan_chunks(long, 2, floor=0) == ((1, None, 1) if fa3_page is None else (1, 342, 4))
    # 32K, FA3: two heads a chunk, one KV head's group a select launch
    assert plan_chunks(Shape(32, 8, 128, 1, 32768, 32768, 64), 2, floor=0) == (2, None, 4)
    assert plan_chunks(long, 2, map_budget=None, floor=0) == (32, None, 32)
    with pytest.raises(ValueError, match="map_budget must be > 0"):
        plan_chunks(long, 2, map_budget=0.0)


def test_default_floor_splits_only_large_block_maps():
    """By default (a 64 MiB floor) a 32K prompt runs in one chunk; a 128K prompt's 128 MiB
    block map (with FA3 tables: 3x that) is split into chunks of at most 64 MiB (FA3: bit-set
    maps of 16 heads a launch, 16 heads a chunk, each with its tables for a third of the
    sequences at a time)."""
    for fa3_page in (None, 64):
        assert plan_chunks(Shape(32, 8, 128, 1, 32768, 32768, fa3_page), 2) == (32, None, 32)
        long = Shape(32, 8, 128, 1, 131072, 131072, fa3_page)
        plan = plan_chunks(long, 2)
        assert plan == ((8, None, 8) if fa3_page is None else (16, 342, 16))
        assert long.chunk_bytes(*plan) <= 64 << 20 < long.chunk_bytes(2 * plan.heads)


@pytest.mark.parametrize("floor", [None, 0])
def test_scratch_bound_covers_every_smaller_call(floor):
    """The backend reserves chunk_scratch_bytes at the step's largest shape: no call within
    those bounds may plan a bigger chunk (with the fp8 products' K-major V copy too)."""
    for fa3_page, budget, v in itertools.product((None, 16, 64), (MAP_BUDGET, 0.002, None),
                                                 (False, True)):
        if fa3_page and v:
            continue  # the copy is the Triton kernel's
        bound = chunk_scratch_bytes(Shape(32, 8, 128, 4, 16384, 131072, fa3_page, v), 2, budget,
                                    floor)
        for reqs, q_len, seq_len in itertools.product((1, 2, 4), (1024, 8192, 16384),
                                                      (16384, 65536, 131072)):
            shape = Shape(32, 8, 128, reqs, q_len, seq_len, fa3_page, v)
            assert shape.chunk_bytes(*plan_chunks(shape, 2, budget, floor)) <= bound


def test_chunk_bytes_count_the_values_kmajor_copy():
    """With the fp8 products a chunk holds its KV slice's values, K-major, one byte each: the
    allocation ``values_kmajor`` makes (``[R, Hkv, D, whole key blocks]``)."""
    for heads in chunk_sizes(32, 8):
        plain = Shape(32, 8, 128, 2, 4096, 5000)
        copy = Shape(32, 8, 128, 2, 4096, 5000, None, True)
        kv = max(1, heads * 8 // 32)
        assert copy.chunk_bytes(heads) - plain.chunk_bytes(heads) == 2 * kv * 128 * 5056


def _run(case, ths, topk, device, **kw):
    out = torch.full_like(case.q, float("nan"))
    stats = torch.zeros(3, dtype=torch.int64, device=device)
    bm = sparge_paged_prefill(case.q, case.key_cache, case.value_cache, case.batch, case.scale,
                              *ths, out, topk=topk, stats=stats, **kw)
    return out, stats, bm


@pytest.mark.parametrize("hq,hkv,budget,want_heads,pv", [
    (4, 2, 1e-9, 1, 50.0),  # one head: parts of a GQA group (sub-group chunks)
    (4, 2, "group", 2, 4.0),  # one whole group a chunk, PV skip on
    (2, 2, 1e-9, 1, 0.0),  # MHA, most blocks PV-skipped
    (2, 1, 1e-9, 1, 50.0),  # MQA
])
def test_chunked_prefill_equals_all_heads_at_once(hq, hkv, budget, want_heads, pv, device,
                                                  monkeypatch):
    monkeypatch.setattr(chunks, "MIN_BUDGET_BYTES", 0)  # chunk even these small shapes
    case = make_paged_case(REQS, hq, hkv, 64, 16, torch.float16, device, seed=hq + hkv,
                           packed=True)
    b = case.batch
    shape = Shape(hq, hkv, 64, b.num_reqs, b.max_query_len, b.max_seq_len)
    if budget == "group":  # exactly one group's chunk fits
        kv = 2 * b.num_reqs * b.max_seq_len * hkv * 64 * 2
        budget = shape.chunk_bytes(hq // hkv) / kv
    assert plan_chunks(shape, 2, map_budget=budget) == (want_heads, None, want_heads)
    assert plan_chunks(shape, 2, map_budget=None) == (hq, None, hq)  # the all-heads run
    ths = (torch.linspace(-0.2, 0.6, hq, device=device), torch.linspace(0.5, 0.95, hq,
           device=device), head_vec(pv, hq, device))
    want, want_stats, want_bm = _run(case, ths, None, device, map_budget=None)
    got, got_stats, got_bm = _run(case, ths, None, device, map_budget=budget)
    assert not torch.isnan(got).any()
    assert torch.equal(got, want)
    assert torch.equal(got_stats, want_stats)
    assert torch.equal(got_bm.count, want_bm.count)
    assert torch.equal(got_bm.n_valid, want_bm.n_valid)
    assert (got_bm.lut is None) == (want_heads < hq)
    assert (want_bm.count < want_bm.n_valid).any()  # some rows are sparse


def test_chunked_fa3_path_equals_all_heads_at_once(device, monkeypatch):
    """The FA3 attention path (PyTorch emulation of FA3 off the GPU) in one-head chunks: the
    whole map's block counts, and attention over its kept blocks (the fp32 SDPA oracle)."""
    import sparge_serve.kernels.fa3 as virtual

    monkeypatch.setattr(chunks, "MIN_BUDGET_BYTES", 0)
    if device == "cpu":
        monkeypatch.setattr(virtual, "fa3_paged_forward", fa3_emulation)
    case = make_paged_case(REQS, 4, 2, 64, 16, torch.float16, device, seed=9, packed=True)
    ths = (head_vec(0.3, 4, device), torch.linspace(0.5, 0.95, 4, device=device),
           head_vec(50.0, 4, device))
    want_stats = torch.zeros(3, dtype=torch.int64, device=device)
    want_bm = predict_block_map(case.q, case.key_cache, case.batch, case.scale, *ths[:2], 0.5,
                                stats=want_stats)
    got, got_stats, bm = _run(case, ths, 0.5, device, map_budget=1e-9, pv_skip=False,
                              attention="fa3")
    assert bm.lut is None and not torch.isnan(got).any()
    assert torch.equal(got_stats, want_stats)
    oracle, tol = attention_oracle(case, kept_blocks(want_bm, case.batch))
    assert (got.float().cpu() - oracle).abs().max().item() <= tol


@pytest.mark.parametrize("hq,hkv,plan", [
    (4, 2, ChunkPlan(1, None, 2)),  # a group a select launch, its heads attended one at a time
    (4, 4, ChunkPlan(1, 2, 2)),  # two KV heads' groups a select launch, tables for 2 sequences
    (4, 2, ChunkPlan(2, None, 4)),  # one select launch (its map returned), two heads a chunk
])
def test_fa3_selections_wider_than_their_chunks(hq, hkv, plan, device, monkeypatch):
    """The FA3 path selects (bit sets) for several chunks at once: each chunk attends its own
    heads of the selection's map (the map's head offset in the table kernel and the views)."""
    import sparge_serve.kernels.fa3 as virtual

    monkeypatch.setattr(chunks, "plan_chunks", lambda *args, **kw: plan)
    if device == "cpu":
        monkeypatch.setattr(virtual, "fa3_paged_forward", fa3_emulation)
    case = make_paged_case(REQS, hq, hkv, 64, 16, torch.float16, device, seed=10, packed=True)
    ths = (torch.linspace(-0.2, 0.6, hq, device=device),
           torch.linspace(0.5, 0.95, hq, device=device), head_vec(50.0, hq, device))
    want_stats = torch.zeros(3, dtype=torch.int64, device=device)
    want_bm = predict_block_map(case.q, case.key_cache, case.batch, case.scale, *ths[:2],
                                stats=want_stats)
    got, got_stats, bm = _run(case, ths, None, device, pv_skip=False, attention="fa3")
    assert not torch.isnan(got).any()
    assert torch.equal(got_stats, want_stats)
    assert torch.equal(bm.count, want_bm.count) and torch.equal(bm.n_valid, want_bm.n_valid)
    assert (bm.mask is not None) == (plan.select_heads == hq) and bm.lut is None
    oracle, tol = attention_oracle(case, kept_blocks(want_bm, case.batch))
    assert (got.float().cpu() - oracle).abs().max().item() <= tol


def test_fa3_path_refuses_pv_skip_and_unknown_kernels(device):
    case = make_paged_case(REQS[:1], 4, 2, 64, 16, torch.float16, device)
    ths = (head_vec(0.3, 4, device), head_vec(0.9, 4, device), head_vec(6.0, 4, device))
    out = torch.empty_like(case.q)
    with pytest.raises(ValueError, match="no PV skip"):
        sparge_paged_prefill(case.q, case.key_cache, case.value_cache, case.batch, case.scale,
                             *ths, out, attention="fa3")
    with pytest.raises(ValueError, match="attention must be 'triton' or 'fa3'"):
        sparge_paged_prefill(case.q, case.key_cache, case.value_cache, case.batch, case.scale,
                             *ths, out, attention="flash")


@pytest.mark.parametrize("attention", ["triton", "fa3"])
def test_predict_only_runs_the_same_chunks_without_attention(attention, device, monkeypatch):
    """``run_prefill(predict_only=True)`` (the benchmark's predictor share of a chunked call):
    the same block counts and counters as the whole map's predictor, and no output written."""
    from sparge_serve.kernels.prefill import block_counts, run_prefill

    monkeypatch.setattr(chunks, "MIN_BUDGET_BYTES", 0)
    case = make_paged_case(REQS, 4, 2, 64, 16, torch.float16, device, seed=3, packed=True)
    ths = (head_vec(0.3, 4, device), torch.linspace(0.5, 0.95, 4, device=device),
           head_vec(50.0, 4, device))
    want_stats = torch.zeros(3, dtype=torch.int64, device=device)
    want_bm = predict_block_map(case.q, case.key_cache, case.batch, case.scale, *ths[:2],
                                stats=want_stats)
    out = torch.full_like(case.q, float("nan"))
    stats = torch.zeros(3, dtype=torch.int64, device=device)
    plan = chunks.plan_prefill(case.batch, 4, 2, 64, case.q.dtype, 16, case.q.device, None, 1e-9,
                               attention, 0)
    assert run_prefill(plan, case.q, case.key_cache, case.value_cache, case.scale, *ths, out,
                       stats, predict_only=True) is None
    bm = block_counts(plan)
    assert torch.isnan(out).all()
    assert torch.equal(stats, want_stats)
    assert torch.equal(bm.count, want_bm.count) and torch.equal(bm.n_valid, want_bm.n_valid)
