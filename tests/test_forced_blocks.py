"""A query always sees its own key block: the forced ("diagonal") blocks of a query block are
every valid key block holding a position at or after its first query position; and the rows of
the last ``BLKQ`` queries keep every valid block.

The cases start a query block exactly on a key block's last position (one query at position 127
of a 128-token context; 129 new tokens on a 256-token context; ...), where that key block holds
the first query's own token and no later one. The data make key block 0 the most probable one
and the thresholds keep only forced blocks (every block similar, ``cdfthreshd`` tiny), so a block
that is not forced is dropped: the kept set must be exactly the sink and the blocks holding a
position ``>= first``, in the reference, the predictor, the attention kernel and the FA3 path,
and the sparse output must equal brute-force attention (SDPA) over exactly those blocks.
"""

from __future__ import annotations

import pytest
import torch

from sparge_serve.kernels import (
    BLKK,
    BLKQ,
    num_blocks,
    predict_block_map,
    sparge_paged_prefill,
    sparse_paged_attention,
)
from sparge_serve.kernels.fa3 import fa3_sparse_attention
from sparge_serve.reference import (
    block_masks,
    dense_causal_attention_ref,
    paged_prefill_ref,
    predict_block_map_ref,
    tail_blocks,
)
from tests.kernel_inputs import PagedCase, head_vec, make_paged_case
from tests.test_virtual import fa3_emulation

# (query_len, seq_len): query block starts at a key block's last position (first % BLKK ==
# BLKK - 1), plus one query block that starts inside a key block (the control)
REQS = [
    (1, 128),  # one query at position 127: key block 1 (64..127) holds it
    (129, 256),  # query block 0 starts at 127 (key block 1), query block 1 at 255 (key block 3)
    (200, 263),  # query block 1 starts at 191 (key block 2)
    (1, 192),  # one query at 191 (key block 2)
    (50, 150),  # control: query block 0 starts at 100, inside key block 1
    (300, 363),  # blocks 0 and 1 start at 63 and 191; blocks 1 and 2 hold the last 128 queries
    (400, 463),  # blocks 0, 1 and 2 start at 63, 191 and 319; only block 3 holds the last 128
]
HQ, HKV, DIM = 2, 1, 64
SIM, CDF, PV_OFF = -1.0, 1e-6, 50.0  # every block similar, only forced blocks (and the sink)


def _sink_case(reqs, page: int, device: str, seed: int = 0) -> PagedCase:
    """Random keys and values, with key block 0 of each request shifted along one direction
    ``s`` per KV head and every query pointing along ``s``: block 0 is by far the most probable
    block (the only one the CDF keeps) and has the largest scores, while the attention stays
    spread over all kept keys (so a dropped block shows in the output)."""
    case = make_paged_case(reqs, HQ, HKV, DIM, page, torch.float16, "cpu", structured=False,
                           seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    q, key_cache = case.q.clone(), case.key_cache.clone()
    qsl = case.batch.query_start_loc.tolist()
    for r in range(case.batch.num_reqs):
        s = torch.randn(HKV, DIM, generator=g)
        s = s / s.norm(dim=-1, keepdim=True)
        n_pages = num_blocks(min(BLKK, int(case.batch.seq_lens[r])), page)
        for p in range(n_pages):
            page_id = int(case.batch.block_table[r, p])
            rows = min(page, BLKK - p * page)
            key_cache[page_id, :rows] += (2.0 * s).to(key_cache.dtype)
        rows = qsl[r + 1] - qsl[r]
        noise = 0.05 * torch.randn(rows, HQ, DIM, generator=g)
        q[qsl[r] : qsl[r + 1]] = (2.0 * s.repeat_interleave(HQ // HKV, 0)[None] + noise).to(
            q.dtype)
    return PagedCase(q.to(device), key_cache.to(device), case.value_cache.to(device),
                     _batch_to(case.batch, device), case.scale)


def _batch_to(batch, device):
    from sparge_serve.kernels import PrefillBatch

    return PrefillBatch(batch.query_start_loc.to(device), batch.seq_lens.to(device),
                        batch.block_table.to(device), batch.max_query_len, batch.max_seq_len)


def _expected_keep(lq: int, lk: int) -> torch.Tensor:
    """``[NQB, NKB]``: the sink and every valid key block holding a position >= the query
    block's first position, and every valid block of a query block that holds one of the last
    ``BLKQ`` queries (written out here, independently of ``block_masks`` and ``tail_blocks``)."""
    ctx = lk - lq
    nqb, nkb = num_blocks(lq, BLKQ), num_blocks(lk, BLKK)
    keep = torch.zeros(nqb, nkb, dtype=torch.bool)
    for b in range(nqb):
        first = ctx + b * BLKQ
        last = ctx + min((b + 1) * BLKQ, lq) - 1
        in_tail = last >= lk - BLKQ  # holds one of the last BLKQ positions
        for j in range(nkb):
            valid = j * BLKK <= last
            holds_first_or_later = (j + 1) * BLKK - 1 >= first
            keep[b, j] = valid and (j == 0 or holds_first_or_later or in_tail)
        assert keep[b, first // BLKK], "the block holding the first query must be kept"
    return keep


def test_tail_blocks_hold_the_last_queries():
    """``tail_blocks``: the last query block, and the one before it exactly when the last is
    partial; the others are selected."""
    assert tail_blocks(128).tolist() == [True]
    assert tail_blocks(256).tolist() == [False, True]
    assert tail_blocks(257).tolist() == [False, True, True]
    assert tail_blocks(384).tolist() == [False, False, True]
    for lq in range(1, 700, 7):
        tail = tail_blocks(lq)
        rows = torch.arange(lq) // BLKQ  # each query's block
        assert torch.equal(tail, torch.isin(torch.arange(tail.numel()), rows[-BLKQ:]))


def test_block_masks_mark_the_first_querys_own_block_diagonal():
    """``block_masks``: the key block holding a query block's first position is diagonal."""
    for lq, lk in REQS:
        valid, diag = block_masks(lq, lk)
        ctx = lk - lq
        for b in range(valid.shape[0]):
            first = ctx + b * BLKQ
            assert diag[b, first // BLKK], (lq, lk, b)
            assert not diag[b, : first // BLKK].any(), (lq, lk, b)
            assert torch.equal(diag[b], valid[b] & (torch.arange(valid.shape[1]) >= first // BLKK))


@pytest.mark.parametrize("lq,lk", REQS)
def test_reference_keeps_the_block_holding_the_first_query(lq, lk):
    case = _sink_case([(lq, lk)], 16, "cpu")
    q, k, _ = case.request_kv(0)
    keep, valid = predict_block_map_ref(q, k, case.scale, SIM, CDF)
    want = _expected_keep(lq, lk)
    for h in range(HQ):
        assert torch.equal(keep[h], want), f"head {h}: {keep[h].int().tolist()}"


def _brute_force(case: PagedCase, keeps) -> torch.Tensor:
    """fp32 SDPA of every request with a boolean mask: causal, and only the kept key blocks of
    each query's block (``keeps[r]``: ``[Hq, NQB, NKB]`` or ``[NQB, NKB]``)."""
    qsl = case.batch.query_start_loc.cpu().tolist()
    out = torch.zeros(case.q.shape, dtype=torch.float32)
    for r, keep in enumerate(keeps):
        q, k, v = (t.float().cpu() for t in case.request_kv(r))
        lq, lk = q.shape[0], k.shape[0]
        keep = keep.expand(HQ, *keep.shape[-2:])
        qpos = torch.arange(lk - lq, lk)
        causal = torch.arange(lk)[None, :] <= qpos[:, None]  # [Lq, Lk]
        qb = torch.arange(lq) // BLKQ
        kb = torch.arange(lk) // BLKK
        mask = causal[None] & keep[:, qb][:, :, kb]  # [Hq, Lq, Lk]
        g = HQ // HKV
        kh = k.repeat_interleave(g, 1).transpose(0, 1)
        vh = v.repeat_interleave(g, 1).transpose(0, 1)
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), kh, vh, attn_mask=mask, scale=case.scale)
        out[qsl[r] : qsl[r + 1]] = o.transpose(0, 1)
    return out


def _kept_blocks(bm, r: int, case: PagedCase) -> torch.Tensor:
    """``[Hq, NQB_r, NKB]`` bool from a block map's lists (request ``r``'s rows)."""
    lq = int(case.batch.query_start_loc[r + 1] - case.batch.query_start_loc[r])
    lk = int(case.batch.seq_lens[r])
    nqb, nkb = num_blocks(lq, BLKQ), num_blocks(lk, BLKK)
    got = torch.zeros(HQ, nqb, nkb, dtype=torch.bool)
    lut, count = bm.lut[r].cpu(), bm.count[r].cpu()
    for h in range(HQ):
        for b in range(nqb):
            got[h, b, lut[h, b, : count[h, b]].long()] = True
    return got


@pytest.mark.parametrize("page", [16, 64])
def test_predictor_and_attention_keep_the_first_querys_block(page, device):
    """The Triton predictor keeps exactly the forced blocks (the sink and the blocks holding a
    position >= first); the sparse attention over them equals SDPA masked to those blocks."""
    case = _sink_case(REQS, page, device)
    ths = head_vec(SIM, HQ, device), head_vec(CDF, HQ, device)
    bm = predict_block_map(case.q, case.key_cache, case.batch, case.scale, *ths)
    wants = [_expected_keep(lq, lk) for lq, lk in REQS]
    for r, want in enumerate(wants):
        got = _kept_blocks(bm, r, case)
        for h in range(HQ):
            assert torch.equal(got[h], want), f"request {r} {REQS[r]} head {h}"
    out = torch.full_like(case.q, float("nan"))
    sparse_paged_attention(case.q, case.key_cache, case.value_cache, case.batch, bm, case.scale,
                           head_vec(PV_OFF, HQ, device), out, pv_skip=False)
    want_out = _brute_force(case, wants)
    assert (out.float().cpu() - want_out).abs().max().item() <= 2e-3


@pytest.mark.parametrize("chunks", [dict(map_budget=None), dict(map_budget=1e-9, map_floor=0)],
                         ids=["one-chunk", "head-chunks"])
def test_prefill_paths_attend_the_first_querys_block(chunks, device):
    """``sparge_paged_prefill`` (all heads at once, and in head chunks whose maps are not kept):
    counts of exactly the forced blocks, output of SDPA over them, and the reference's output."""
    case = _sink_case(REQS, 16, device, seed=1)
    ths = [head_vec(x, HQ, device) for x in (SIM, CDF, PV_OFF)]
    out = torch.full_like(case.q, float("nan"))
    bm = sparge_paged_prefill(case.q, case.key_cache, case.value_cache, case.batch, case.scale,
                              *ths, out, **chunks)
    wants = [_expected_keep(lq, lk) for lq, lk in REQS]
    for r, want in enumerate(wants):
        nqb = want.shape[0]
        count = bm.count[r, :, :nqb].cpu()
        assert torch.equal(count, want.sum(-1).int().expand(HQ, nqb)), f"request {r} {REQS[r]}"
    want_out = _brute_force(case, wants)
    assert (out.float().cpu() - want_out).abs().max().item() <= 2e-3
    ref, keeps, _ = paged_prefill_ref(case.q, case.key_cache, case.value_cache, case.batch,
                                      case.scale, *(head_vec(x, HQ) for x in (SIM, CDF, PV_OFF)))
    for keep, want in zip(keeps, wants, strict=True):
        assert torch.equal(keep, want.expand_as(keep))
    assert (ref - want_out).abs().max().item() <= 1e-5


def test_fa3_path_attends_the_first_querys_block(device):
    """The FA3 path (virtual contexts of the kept blocks; FA3 emulated off the GPU): the forced
    band starts at the block holding the first query, and its bottom-right mask is still the
    token-level one."""
    case = _sink_case(REQS, 16, device, seed=2)
    ths = head_vec(SIM, HQ, device), head_vec(CDF, HQ, device)
    bm = predict_block_map(case.q, case.key_cache, case.batch, case.scale, *ths, as_mask=True)
    out = torch.full_like(case.q, float("nan"))
    fa3_sparse_attention(case.q, case.key_cache, case.value_cache, case.batch, bm, case.scale,
                         out, attn_fn=fa3_emulation)
    want_out = _brute_force(case, [_expected_keep(lq, lk) for lq, lk in REQS])
    assert (out.float().cpu() - want_out).abs().max().item() <= 2e-3


@pytest.mark.parametrize("chunks", [dict(map_budget=None), dict(map_budget=1e-9, map_floor=0)],
                         ids=["one-chunk", "head-chunks"])
def test_pv_skip_never_skips_the_first_querys_block(chunks, device):
    """Every block kept and ``pvthreshd`` 0 (skip any block whose scores do not raise the running
    max): a query block whose only off-band block is the sink (processed first, never skipped)
    attends every block, so its rows equal dense attention, in the kernels and the reference."""
    reqs = [(1, 128), (129, 256)]
    case = _sink_case(reqs, 16, device, seed=3)
    ths = [head_vec(x, HQ, device) for x in (SIM, 1.0, 0.0)]
    out = torch.full_like(case.q, float("nan"))
    stats = torch.zeros(3, dtype=torch.int64, device=device)
    sparge_paged_prefill(case.q, case.key_cache, case.value_cache, case.batch, case.scale, *ths,
                         out, stats=stats, **chunks)
    ref, _, ref_stats = paged_prefill_ref(case.q, case.key_cache, case.value_cache, case.batch,
                                          case.scale, *(head_vec(x, HQ) for x in (SIM, 1.0, 0.0)))
    assert stats.cpu().tolist() == ref_stats.tolist()
    out = out.float().cpu()
    # request 0 (one query at 127) and query block 0 of request 1 (first query at 127): only the
    # sink precedes the blocks that hold positions >= 127
    for r, rows in ((0, slice(0, 1)), (1, slice(0, BLKQ))):
        q, k, v = case.request_kv(r)
        dense = dense_causal_attention_ref(q, k, v, case.scale)[rows]
        start = int(case.batch.query_start_loc[r])
        span = slice(start + rows.start, start + rows.stop)
        assert (ref[span] - dense).abs().max().item() <= 1e-5, f"reference, request {r}"
        assert (out[span] - dense).abs().max().item() <= 2e-3, f"kernel, request {r}"
