"""Triton predictor + sparse attention vs the PyTorch reference (CPU: Triton interpreter).

Outputs are compared with fp32 attention (torch SDPA) over exactly the key blocks the kernels
compute, within flash-attention's tolerance: twice plain low-precision attention's error on the
same data plus the output's own rounding (``tests/kernel_inputs.py``). With the PV skip on, the
inputs are checked to take every skip decision further from the threshold than a kernel's
rounding can move it, so the kernels and the reference skip the same blocks; the skip's own
error bound is tested on the reference.

Shapes are the smallest that hold the behaviour (a few key blocks, partial tail blocks); the same
checks at realistic sizes run on the GPU (``gpu``) and some repeats on other layouts are
``slow``.
"""

import pytest
import torch
import triton
import triton.language as tl

from sparge_serve.kernels import (
    BLKK,
    BLKQ,
    PV_SKIP_OFF,
    PrefillBatch,
    num_blocks,
    predict_block_map,
    sparge_paged_prefill,
    sparse_paged_attention,
)
from sparge_serve.kernels.attention import _program_row
from sparge_serve.reference import (
    block_sparse_attention_ref,
    paged_prefill_ref,
    predict_block_map_ref,
)
from tests.kernel_inputs import (
    attention_oracle,
    head_vec,
    kept_blocks,
    make_paged_case,
    pv_skip_decisions,
    reference_block_map,
    request_rows,
    sdpa,
    token_mask,
)

# (query_len, seq_len): a chunk of three query blocks after a prefix (the third partial; the
# first is the one outside the last 128 queries' rows, which keep every block), a query shorter
# than one block after a prefix, a full prefill shorter than one block; no length is a multiple
# of BLKQ or BLKK, and the prefixes leave blocks for the selection to drop.
REQS = [(260, 560), (37, 421), (70, 70)]
REQS_SMALL = [(260, 500), (70, 70)]  # the same kinds with fewer keys (layout and launch checks)

THRESHOLD_CASES = {
    # name: (simthreshd1, cdfthreshd, pvthreshd, topk)
    "dense_sim1": (1.0, 0.5, 50.0, None),
    "dense_cdf1": (-1.0, 1.0, 50.0, None),
    "sparse_default": (0.6, 0.98, 50.0, None),
    "sparse_cdf_tiny": (-1.0, 1e-4, 50.0, None),
    "sparse_sim_neg1": (-1.0, 0.5, 50.0, None),
    "pv_zero": (-1.0, 0.9, 0.0, None),
    "pv_mid": (0.0, 0.95, 4.0, None),
    "topk": (-1.0, 0.9, 50.0, 0.25),
}


def _computed_blocks(case, keeps, pv, exact=True):
    """The blocks the reference computes (kept, not PV-skipped) per request, and which rows
    ``[num_tokens, Hq]`` take every skip decision further from the threshold than a kernel's
    rounding can move it (there a kernel skips what the reference skips). ``exact``: all rows
    must (small inputs are chosen so)."""
    computed = []
    robust = torch.ones(case.q.shape[:2], dtype=torch.bool)
    for r, keep in enumerate(keeps):
        q, k, _ = case.request_kv(r)
        done, margins, slack = pv_skip_decisions(q, k, keep, case.scale, pv)
        near = (margins.abs() <= slack).any(-1)  # [Hq, NQB]
        robust[request_rows(case.batch, r)] = ~near.repeat_interleave(BLKQ, 1)[:, :q.shape[0]].T
        assert not (exact and near.any()), (
            f"request {r}: a PV-skip decision lies within rounding of pvthreshd {pv}: a kernel "
            "may decide either way; choose inputs or a threshold away from it")
        computed.append(done)
    return computed, robust


def _kernel_vs_reference(case, sim, cdf, pv, topk, device):
    """sparge_paged_prefill vs the reference: the same block map, block counts and PV skips, and
    the output within tolerance of fp32 attention over the blocks both compute."""
    hq = case.q.shape[1]
    out = torch.full_like(case.q, float("nan"))  # poison: every row must be written
    stats = torch.zeros(3, dtype=torch.int64, device=device)
    bm = sparge_paged_prefill(
        case.q, case.key_cache, case.value_cache, case.batch, case.scale,
        head_vec(sim, hq, device), head_vec(cdf, hq, device), head_vec(pv, hq, device), out,
        topk=topk, stats=stats,
    )
    ref, keeps, ref_stats = paged_prefill_ref(
        case.q, case.key_cache, case.value_cache, case.batch, case.scale,
        head_vec(sim, hq), head_vec(cdf, hq), head_vec(pv, hq), topk,
    )
    for r, (got, keep) in enumerate(zip(kept_blocks(bm, case.batch), keeps, strict=True)):
        assert torch.equal(got, keep), f"block map of request {r} differs from the reference"
    computed, _ = _computed_blocks(case, keeps, pv)
    assert ref_stats[2] == sum(int((k & ~c).sum()) for k, c in zip(keeps, computed, strict=True))
    assert stats.cpu().tolist() == ref_stats.tolist()
    oracle, tol = attention_oracle(case, computed)
    torch.testing.assert_close(ref, oracle)  # the reference: exact attention over those blocks
    assert not torch.isnan(out).any()
    assert (out.float().cpu() - oracle).abs().max().item() <= tol
    return ref_stats


@pytest.mark.parametrize("name", list(THRESHOLD_CASES))
def test_matches_reference_thresholds(name, device):
    sim, cdf, pv, topk = THRESHOLD_CASES[name]
    case = make_paged_case(REQS, 2, 1, 64, 16, torch.bfloat16, device)
    ref_stats = _kernel_vs_reference(case, sim, cdf, pv, topk, device)
    if name.startswith("dense"):
        assert ref_stats[1] == ref_stats[0], "dense thresholds must keep every valid block"
    if name in ("sparse_cdf_tiny", "topk", "sparse_sim_neg1", "pv_zero", "pv_mid"):
        assert ref_stats[1] < ref_stats[0], "sparse thresholds must skip blocks on this input"
    if name.startswith("pv"):
        assert ref_stats[2] > 0, "the PV skip must skip some blocks on this input"


@pytest.mark.parametrize("lq,lk", [(260, 560), (300, 300), (290, 600)])
def test_reference_stage2_equals_sdpa_over_its_kept_blocks(lq, lk):
    """The reference's stage 2 is attention over exactly the kept blocks: for heads without the
    PV skip (one softmax over the kept keys) and for heads whose PV threshold is on but never met
    (the online walk), against SDPA with the kept blocks' token mask."""
    case = make_paged_case([(lq, lk)], 4, 2, 64, 16, torch.float16)
    q, k, v = case.request_kv(0)
    keep, _ = predict_block_map_ref(q, k, case.scale, 0.0, 0.9)
    pv = torch.tensor([PV_SKIP_OFF, 1e4, PV_SKIP_OFF, 1e4])  # 1e4: on, and never met
    out, skipped = block_sparse_attention_ref(q, k, v, keep, case.scale, pv)
    assert skipped == 0 and not keep.all()
    torch.testing.assert_close(out, sdpa(q, k, v, case.scale, token_mask(keep, q.shape[0], lk)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pv", [0.0, 4.0, 6.0])
def test_pv_skip_error_is_bounded_by_the_skipped_mass(pv):
    """The reference's PV skip (the kernels take its decisions, see above) drops a block only
    when every row's scores in it are ``pvthreshd`` (log2) or more below the row's running max:
    each dropped key's probability is at most ``2**-pv`` of the row's largest, so a row's dropped
    mass ``m`` is at most ``n 2**-pv / (1 + n 2**-pv)`` for ``n`` dropped keys, and the output
    moves from attention over all kept blocks by ``m * (dropped keys' mean value - output)``, at
    most ``m * (max |v| + |output|)``."""
    case = make_paged_case([(150, 450)], 4, 2, 64, 16, torch.float16)
    q, k, v = case.request_kv(0)
    lq, lk = q.shape[0], k.shape[0]
    keep, _ = predict_block_map_ref(q, k, case.scale, 0.0, 0.95)
    out, skipped = block_sparse_attention_ref(q, k, v, keep, case.scale, pv)
    computed, margins, _ = pv_skip_decisions(q, k, keep, case.scale, pv)
    dropped = keep & ~computed
    assert skipped == int(dropped.sum()) > 0 and (margins > 0).any()  # some blocks stay
    # the reference drops exactly the replayed decisions' blocks
    torch.testing.assert_close(out, sdpa(q, k, v, case.scale, token_mask(computed, lq, lk)))
    mask = token_mask(keep, lq, lk)
    full = sdpa(q, k, v, case.scale, mask).transpose(0, 1)  # [Hq, Lq, D], PV skip off
    group = q.shape[1] // k.shape[1]
    qh, kh = q.float().transpose(0, 1), k.float().repeat_interleave(group, 1).transpose(0, 1)
    p = torch.softmax(((qh @ kh.transpose(1, 2)) * case.scale).masked_fill(~mask, -torch.inf), -1)
    gone = token_mask(dropped, lq, lk)
    mass = (p * gone).sum(-1)
    n = gone.sum(-1) * 2.0**-pv
    assert (mass <= n / (1 + n) * (1 + 1e-5)).all()
    vmax = v.float().abs().amax(0).repeat_interleave(group, 0)[:, None]  # [Hq, 1, D]
    skip = out.transpose(0, 1)
    bound = mass[..., None] * (vmax + skip.abs())
    # + torch.testing's fp32 tolerances: both outputs are fp32 attention
    assert ((full - skip).abs() <= bound + 1e-5 + 1.3e-6 * skip.abs()).all()


@pytest.mark.parametrize("page,packed", [(16, False),
                                         pytest.param(64, True, marks=pytest.mark.slow)])
def test_split_query_blocks_equal_whole_blocks(page, packed, device):
    """split=2 (two 64-row programs per query block, PV skip off) computes the same rows as one
    128-row program: both within tolerance of the oracle over the same kept blocks."""
    case = make_paged_case(REQS_SMALL, 2, 1, 64, page, torch.bfloat16, device, seed=3,
                           packed=packed)
    hq = 2
    bm, keeps = reference_block_map(case, 0.6, 0.9)
    oracle, tol = attention_oracle(case, keeps)
    for split in (1, 2):
        out = torch.full_like(case.q, float("nan"))
        sparse_paged_attention(case.q, case.key_cache, case.value_cache, case.batch, bm,
                               case.scale, head_vec(50.0, hq, device), out, pv_skip=False,
                               split=split)
        assert (out.float().cpu() - oracle).abs().max().item() <= tol, f"split {split}"
    with pytest.raises(ValueError, match="split must be 1, or 2 with PV skip off"):
        sparse_paged_attention(case.q, case.key_cache, case.value_cache, case.batch, bm,
                               case.scale, head_vec(4.0, hq, device), out, pv_skip=True, split=2)


@pytest.mark.parametrize("topk", [None, pytest.param(0.3, marks=pytest.mark.slow)])
def test_select_options_give_the_same_block_map(topk, device):
    """select_dc and select_warps (the select kernel's launch overrides) give exactly the default
    block map, with thresholds that differ per head (cdf tiny, 1, and between) and rows past
    short queries."""
    case = make_paged_case(REQS[:2], 4, 2, 64, 16, torch.bfloat16, device, seed=2)
    sim = torch.tensor([0.6, -1.0, 0.2, 1.0], device=device)
    cdf = torch.tensor([0.9, 1e-4, 1.0, 0.98], device=device)
    ref = predict_block_map(case.q, case.key_cache, case.batch, case.scale, sim, cdf, topk)
    real = ref.count > 0
    assert (ref.count[real] < ref.n_valid[real]).any()  # some rows are sparse
    assert not real.all()  # and some rows lie past a short query
    for dc, warps in ((8, None), (32, 8)):  # the default: 16 dimensions a step, 4 warps
        bm = predict_block_map(case.q, case.key_cache, case.batch, case.scale, sim, cdf, topk,
                               select_dc=dc, select_warps=warps)
        assert torch.equal(bm.count, ref.count)
        assert torch.equal(bm.n_valid[real], ref.n_valid[real])
        keep = torch.arange(ref.lut.shape[-1], device=device) < ref.count[..., None]
        assert torch.equal(bm.lut[keep], ref.lut[keep])
    for bad in (dict(select_dc=3), dict(select_warps=2)):
        with pytest.raises(ValueError, match="select_dc must be a power of two up to 32 and"):
            predict_block_map(case.q, case.key_cache, case.batch, case.scale, sim, cdf, **bad)


@pytest.mark.parametrize("page,split", [(64, 1), (16, 2)])
def test_launch_order_changes_nothing(page, split, device):
    """The KV-major launch order (the default) and the head-major one compute exactly the same
    rows: the order of programs only."""
    case = make_paged_case(REQS_SMALL, 2, 1, 64, page, torch.bfloat16, device, seed=6,
                           packed=page == 64)
    hq = 2
    pv = head_vec(50.0, hq, device)
    bm, _ = reference_block_map(case, 0.6, 0.9)
    outs = []
    for kv_major in (True, False):
        out = torch.full_like(case.q, float("nan"))
        sparse_paged_attention(case.q, case.key_cache, case.value_cache, case.batch, bm,
                               case.scale, pv, out, pv_skip=False, split=split,
                               kv_major=kv_major)
        outs.append(out)
    assert not torch.isnan(outs[0]).any() and torch.equal(outs[0], outs[1])


def test_lazy_rescale_default_where_measured():
    """Conditional rescaling is on by default only where it was timed faster: TMA loads, head
    dim 128, PV skip off."""
    from sparge_serve.kernels.attention import LAZY_RESCALE, _row_parts

    assert _row_parts(None, 128, False, None, True) == (1, LAZY_RESCALE)
    assert _row_parts(None, 128, True, None, True) == (1, 0.0)
    assert _row_parts(None, 128, False, None, False) == (1, 0.0)
    assert _row_parts(None, 256, False, None, True) == (1, 0.0)  # one 128-row program a block
    assert _row_parts(None, 128, False, 0.0, True) == (1, 0.0)


@pytest.mark.parametrize("page,packed,lazy", [(16, False, 8.0), (64, True, 0.5)])
def test_lazy_rescale_changes_only_rounding(page, packed, lazy, device):
    """lazy_rescale (FlashAttention-4's conditional rescaling; PV skip off) keeps a stale row
    max until a block exceeds it by more than ``lazy`` log2 units (8: most rows never rescale
    after their first block; 0.5: some do): the output stays within the oracle's tolerance over
    the same kept blocks, as the default loop's does."""
    case = make_paged_case(REQS_SMALL, 2, 1, 64, page, torch.bfloat16, device, seed=5,
                           packed=packed)
    hq = 2
    pv = head_vec(50.0, hq, device)
    bm, keeps = reference_block_map(case, 0.6, 0.9)
    oracle, tol = attention_oracle(case, keeps)
    for lz in (0.0, lazy):
        out = torch.full_like(case.q, float("nan"))
        sparse_paged_attention(case.q, case.key_cache, case.value_cache, case.batch, bm,
                               case.scale, pv, out, pv_skip=False, lazy_rescale=lz)
        assert (out.float().cpu() - oracle).abs().max().item() <= tol, f"lazy_rescale {lz}"
    with pytest.raises(ValueError, match="lazy_rescale must be >= 0, and 0 with PV skip on"):
        sparse_paged_attention(case.q, case.key_cache, case.value_cache, case.batch, bm,
                               case.scale, head_vec(4.0, hq, device), out, pv_skip=True,
                               lazy_rescale=8.0)


def _launches_agree(case, bm, keeps, pv, launches: list[dict]) -> None:
    """Each of ``launches`` (keyword arguments of ``sparse_paged_attention``) over ``bm`` with the
    PV-skip threshold ``pv`` matches the attention oracle over the blocks it computes, skips the
    blocks the reference skips, and, on the CPU, gives the same output bit for bit."""
    hq, device = case.q.shape[1], case.q.device
    computed, _ = _computed_blocks(case, keeps, pv)
    oracle, tol = attention_oracle(case, computed)
    outs, skipped = [], []
    for kw in launches:
        out = torch.full_like(case.q, float("nan"))
        stats = torch.zeros(3, dtype=torch.int64, device=device)
        sparse_paged_attention(case.q, case.key_cache, case.value_cache, case.batch, bm,
                               case.scale, head_vec(pv, hq, device), out, stats, **kw)
        assert (out.float().cpu() - oracle).abs().max().item() <= tol, kw
        outs.append(out)
        skipped.append(int(stats[2]))
    if device.type == "cpu":
        assert all(torch.equal(outs[0], o) for o in outs[1:])
    want = sum(int((k & ~c).sum()) for k, c in zip(keeps, computed, strict=True))
    assert skipped == [want] * len(launches) and (pv == 50.0) == (want == 0)


@pytest.mark.parametrize("packed,pv", [(True, 50.0), (False, 4.0)])
def test_tma_loads_equal_pointer_loads(packed, pv, device):
    """TMA block loads (the default on 64-token pages) read the same keys and values as pointer
    loads: same PV skips, same output up to rounding; tails past seq_len included. TMA on pages
    smaller than a key block is refused."""
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper")
    case = make_paged_case(REQS, 2, 1, 64, 64, torch.bfloat16, device, seed=5, packed=packed)
    hq = 2
    bm, keeps = reference_block_map(case, 0.0, 0.95)
    _launches_agree(case, bm, keeps, pv, [dict(use_tma=False, lazy_rescale=0.0),
                                          dict(use_tma=True, lazy_rescale=0.0)])
    bad = make_paged_case(REQS_SMALL, hq, 1, 64, 16, torch.bfloat16, device)
    with pytest.raises(ValueError, match="TMA loads need key blocks of 64 inside one page"):
        sparse_paged_attention(bad.q, bad.key_cache, bad.value_cache, bad.batch,
                               reference_block_map(bad, 0.6, 0.9)[0], bad.scale,
                               head_vec(50.0, hq, device), torch.empty_like(bad.q), use_tma=True)


def _off_band_counts(case, keeps) -> list[int]:
    """Kept blocks before each (request, head, query block) row's diagonal band (the key block
    of its first query): what the attention's off-band loop walks."""
    counts = []
    for r, keep in enumerate(keeps):
        rows = request_rows(case.batch, r)
        lq, lk = rows.stop - rows.start, int(case.batch.seq_lens[r])
        for b in range(num_blocks(lq, BLKQ)):
            counts += keep[:, b, :(lk - lq + b * BLKQ) // BLKK].sum(-1).tolist()
    return counts


@pytest.mark.parametrize("packed,pv", [(True, 50.0), (False, 4.0)])
def test_page_ahead_equals_the_default_loop(packed, pv, device):
    """page_ahead (each kept block's page id read one block ahead of its TMA loads) computes
    what the default loop does: the same PV skips, the same output (bit for bit on the CPU),
    within the oracle's tolerance, over rows with off-band blocks and rows without (the last
    block read ahead is then the diagonal band's first). Refused without TMA loads."""
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper")
    case = make_paged_case(REQS, 2, 1, 64, 64, torch.bfloat16, device, seed=5, packed=packed)
    hq = 2
    bm, keeps = reference_block_map(case, 0.0, 0.95)
    n_off = _off_band_counts(case, keeps)
    assert min(n_off) == 0 and max(n_off) > 1, n_off
    _launches_agree(case, bm, keeps, pv, [dict(use_tma=True, page_ahead=False),
                                          dict(use_tma=True, page_ahead=True)])
    for tma in (False, None):  # pointer loads, asked for or the default on 16-token pages
        bad = case if tma is False else make_paged_case(REQS_SMALL, hq, 1, 64, 16,
                                                         torch.bfloat16, device)
        with pytest.raises(ValueError, match="page_ahead reads the page ids of TMA block"):
            sparse_paged_attention(bad.q, bad.key_cache, bad.value_cache, bad.batch,
                                   reference_block_map(bad, 0.6, 0.9)[0], bad.scale,
                                   head_vec(50.0, hq, device), torch.empty_like(bad.q),
                                   use_tma=tma, page_ahead=True)


def test_a_register_cap_computes_the_same_attention(device):
    """``launch=(num_warps, num_stages, maxnreg)`` caps the kernel's registers a thread (ptxas
    ``.maxnreg``, for two 8-warp programs an SM): the same PV skips and output as the default
    launch, within the oracle's tolerance, at 8 warps and at 4 with two programs a query
    block."""
    from sparge_serve.kernels.attention import attend_params

    case = make_paged_case(REQS, 2, 1, 64, 64, torch.bfloat16, device, seed=5)
    bm, keeps = reference_block_map(case, 0.0, 0.95)
    _launches_agree(case, bm, keeps, 50.0, [dict(lazy_rescale=0.0),
                                            dict(lazy_rescale=0.0, launch=(8, 2, 128)),
                                            dict(lazy_rescale=0.0, launch=(4, 3, 168), split=2)])
    assert attend_params(128, False, True, launch=(8, 2, 128)).maxnreg == 128
    assert attend_params(128, False, True, launch=(8, 2)).maxnreg is None


def test_default_launches_are_the_measured_ones():
    """At head dim 128 with TMA loads and no PV skip the kernel launches as measured fastest:
    8 warps capped at 128 registers (two programs an SM), page ids read ahead; 2 stages with
    conditional rescaling in bf16, 4 stages rescaling every block with fp8 products. Elsewhere
    4 warps (TMA) or 8 (pointer loads, head dim 256), no cap, no page ids ahead; page_ahead
    needs TMA loads."""
    from sparge_serve.kernels.attention import LAZY_RESCALE, attend_params

    bf16, fp8 = attend_params(128, False, True), attend_params(128, False, True, fp8_dot=True)
    assert (bf16.num_warps, bf16.num_stages, bf16.maxnreg, bf16.page_ahead,
            bf16.lazy_rescale) == (8, 2, 128, True, LAZY_RESCALE)
    assert (fp8.num_warps, fp8.num_stages, fp8.maxnreg, fp8.page_ahead, fp8.lazy_rescale,
            fp8.v_kmajor) == (8, 4, 128, True, 0.0, True)
    for args in ((128, True, True), (128, False, False), (64, False, True), (256, False, True)):
        for dot in (False, True):
            p = attend_params(*args, fp8_dot=dot)
            assert not p.page_ahead and p.maxnreg is None, (args, dot)
            assert p.num_warps == (4 if args[2] and args[0] != 256 else 8), (args, dot)
    assert not attend_params(128, False, True, fp8_dot=True, page_ahead=False).page_ahead
    assert attend_params(128, True, True, page_ahead=True).page_ahead
    with pytest.raises(ValueError, match="it needs TMA loads"):
        attend_params(128, False, False, page_ahead=True)


def test_prefill_scratch_bytes_bounds_the_allocations(device):
    """The bound the backend reserves during vLLM's memory profiling is what a call has
    allocated at its peak: pooled keys, then key sums (temporary) or the block map and the
    per-row counts."""
    from sparge_serve.kernels import prefill_scratch_bytes
    from sparge_serve.kernels.pooling import KSUM_CHUNK, pool_keys

    hq, hkv, d = 2, 1, 64
    case = make_paged_case(REQS_SMALL, hq, hkv, d, 16, torch.bfloat16, device)
    bm = predict_block_map(case.q, case.key_cache, case.batch, case.scale,
                           head_vec(0.6, hq, device), head_vec(0.9, hq, device))
    pooled = pool_keys(case.key_cache, case.batch)
    r = case.batch.num_reqs
    size = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    counts = size(bm.count, bm.n_valid)
    sums = 4 * r * hkv * (num_blocks(pooled.nkb, KSUM_CHUNK) + 1) * d  # pool_keys' temporaries
    # pooled keys, then the key sums (freed) or the block map: the call's counts, and the map
    # with its own (as a head chunk's)
    used = size(pooled.pk, pooled.ksim) + max(sums, size(bm.lut) + counts)
    bound = prefill_scratch_bytes(hq, hkv, d, r, case.batch.max_query_len, case.batch.max_seq_len)
    assert bound == counts + used


def test_pool_keys_zeroes_the_padding_the_select_kernel_reads(device, monkeypatch):
    """The select kernel loads pooled keys in groups of 4 key blocks: past each request's
    context, up to that group, pool_keys writes zeros, so no lane computes on uninitialised
    memory (here every float buffer the call allocates starts as NaN)."""
    from sparge_serve.kernels.pooling import pool_keys

    _nan_empty(monkeypatch)
    reqs = [(100, 300), (70, 70)]  # 5 and 2 key blocks of 64: padding to 8 and to 4
    case = make_paged_case(reqs, 2, 1, 64, 16, torch.bfloat16, device)
    pk = pool_keys(case.key_cache, case.batch).pk.cpu()  # [R, Hkv, D, stride]
    for r, (_, seq_len) in enumerate(reqs):
        n = num_blocks(seq_len, 64)
        assert torch.isfinite(pk[r, ..., :n]).all()
        assert torch.equal(pk[r, ..., n : num_blocks(n, 4) * 4],
                           torch.zeros_like(pk[r, ..., n : num_blocks(n, 4) * 4]))


def _nan_empty(monkeypatch):
    """Every float buffer allocated from here on starts as NaN (an unwritten one shows)."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


# CDF thresholds of 4 query heads over 2 KV heads: KV head 0 serves dense heads only (cdf 1),
# KV head 1 one sparse head and one dense
MIXED_CDF = (1.0, 1.0, 0.5, 1.0)


def test_pool_keys_skips_kv_heads_of_dense_heads_only(device, monkeypatch):
    """With the CDF thresholds, a KV head whose query heads are all dense is not pooled (its
    rows stay unwritten: NaN here); the other KV heads pool as without them."""
    from sparge_serve.kernels.pooling import pool_keys

    case = make_paged_case(REQS_SMALL, 4, 2, 64, 16, torch.bfloat16, device)
    want = pool_keys(case.key_cache, case.batch)
    _nan_empty(monkeypatch)
    got = pool_keys(case.key_cache, case.batch, torch.tensor(MIXED_CDF, device=device), 2)
    assert torch.isnan(got.pk[:, 0]).all() and torch.isnan(got.ksim[:, 0]).all()
    for r, (_, seq_len) in enumerate(REQS_SMALL):  # the written blocks (padding included)
        n = num_blocks(num_blocks(seq_len, 64), 4) * 4
        assert torch.equal(got.pk[r, 1, :, :n], want.pk[r, 1, :, :n])
        n = num_blocks(seq_len, 64)
        assert torch.equal(got.ksim[r, 1, :n], want.ksim[r, 1, :n])


@pytest.mark.parametrize("budget", [None, 1e-9])
def test_dense_heads_keep_every_block_without_scores(budget, device, monkeypatch):
    """Dense heads (CDF threshold 1) mixed with a sparse one: the reference's block map, all heads
    at once and in one-head chunks (each KV slice pooled for its own query heads), though the
    pooled keys the dense heads would read were never written (NaN)."""
    from sparge_serve.kernels import plan as chunks

    monkeypatch.setattr(chunks, "MIN_BUDGET_BYTES", 0)  # chunk even these small shapes
    case = make_paged_case(REQS, 4, 2, 64, 16, torch.bfloat16, device, seed=3)
    sim, cdf = head_vec(-1.0, 4, device), torch.tensor(MIXED_CDF, device=device)
    _nan_empty(monkeypatch)
    out = torch.empty_like(case.q)
    bm = sparge_paged_prefill(case.q, case.key_cache, case.value_cache, case.batch, case.scale,
                              sim, cdf, head_vec(PV_SKIP_OFF, 4, device), out, map_budget=budget)
    _, keeps = reference_block_map(case, sim.cpu(), cdf.cpu())
    assert (bm.lut is None) == (budget is not None)
    for r, keep in enumerate(keeps):
        nqb = keep.shape[1]
        assert torch.equal(bm.count[r, :, :nqb].cpu(), keep.sum(-1).int()), f"request {r}"
        assert torch.equal(bm.n_valid[r, :, :nqb].cpu(), bm.n_valid[r, 0, :nqb].cpu().expand(4, -1))
    dense = [h for h, c in enumerate(MIXED_CDF) if c >= 1.0]
    assert (bm.count[:, dense] == bm.n_valid[:, dense]).all()
    assert (bm.count[:, 2] < bm.n_valid[:, 2]).any(), "the sparse head must skip blocks here"
    if bm.lut is not None:
        for r, (got, keep) in enumerate(zip(kept_blocks(bm, case.batch), keeps, strict=True)):
            assert torch.equal(got, keep), f"block map of request {r} differs from the reference"
    assert not torch.isnan(out).any()


LAYOUT_CASES = [
    # (Hq, Hkv, head_dim, page, dtype, packed): page 64/128 take the TMA path; packed = vLLM's
    # [pages, page, Hkv, 2*D] cache with K and V views
    (2, 2, 64, 16, torch.float16, False),
    (4, 1, 128, 64, torch.bfloat16, True),
    (2, 1, 64, 32, torch.bfloat16, False),
    (2, 1, 64, 128, torch.float16, True),
    (2, 1, 256, 64, torch.bfloat16, True),  # head dim 256 with PV skip: 8 warps, whole blocks
    (2, 1, 256, 16, torch.float16, False),
    (3, 1, 64, 64, torch.bfloat16, True),  # a group of 3 query heads per KV head (SmolLM2's)
    pytest.param(8, 2, 128, 64, torch.bfloat16, True, marks=pytest.mark.slow),
    pytest.param(4, 2, 64, 128, torch.float16, True, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("hq,hkv,dim,page,dtype,packed", LAYOUT_CASES)
def test_matches_reference_layouts(hq, hkv, dim, page, dtype, packed, device):
    case = make_paged_case(
        REQS_SMALL, hq, hkv, dim, page, dtype, device, seed=hq + dim + page, packed=packed
    )
    _kernel_vs_reference(case, 0.0, 0.9, 4.0, None, device)


def test_head_dim_256_without_pv_skip(device):
    """Head dim 256 with PV skip off: whole query blocks, the default (two 64-row programs a
    query block are the ``split`` test's)."""
    case = make_paged_case(REQS_SMALL, 2, 1, 256, 64, torch.bfloat16, device, seed=7,
                           packed=True)
    hq = 2
    out = torch.full_like(case.q, float("nan"))
    bm = sparge_paged_prefill(case.q, case.key_cache, case.value_cache, case.batch, case.scale,
                              head_vec(0.0, hq, device), head_vec(0.9, hq, device),
                              head_vec(50.0, hq, device), out)
    ref_bm, keeps = reference_block_map(case, 0.0, 0.9)
    assert torch.equal(bm.count.cpu(), ref_bm.count.cpu())
    oracle, tol = attention_oracle(case, keeps)
    assert (out.float().cpu() - oracle).abs().max().item() <= tol


def test_deterministic(device):
    case = make_paged_case([(100, 300)], 2, 1, 64, 16, torch.bfloat16, device)
    hq = 2
    args = (head_vec(0.0, hq, device), head_vec(0.9, hq, device), head_vec(4.0, hq, device))
    outs = []
    for _ in range(2):
        out = torch.empty_like(case.q)
        sparge_paged_prefill(
            case.q, case.key_cache, case.value_cache, case.batch, case.scale, *args, out
        )
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


def test_only_batch_rows_written(device):
    """The kernels write exactly the batch's query rows of a larger output buffer."""
    case = make_paged_case([(70, 200)], 2, 1, 64, 16, torch.bfloat16, device)
    hq = 2
    big_q = torch.cat([torch.randn_like(case.q[:5]), case.q, torch.randn_like(case.q[:3])])
    batch = PrefillBatch(
        case.batch.query_start_loc + 5, case.batch.seq_lens, case.batch.block_table,
        case.batch.max_query_len, case.batch.max_seq_len,
    )
    out = torch.full_like(big_q, 7.0)
    sparge_paged_prefill(
        big_q, case.key_cache, case.value_cache, batch, case.scale,
        head_vec(1.0, hq, device), head_vec(1.0, hq, device), head_vec(50.0, hq, device), out,
    )
    assert torch.all(out[:5] == 7.0) and torch.all(out[-3:] == 7.0)
    assert not torch.any(out[5:-3] == 7.0)


def _tiny(device, dtype=torch.bfloat16, dim=64):
    return make_paged_case([(20, 40)], 2, 1, dim, 16, dtype, device, structured=False)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda c: c.__setattr__("q", c.q[..., :48].contiguous()), "head dim 48 unsupported"),
        (lambda c: c.__setattr__("q", c.q.float()), "dtype torch.float32 unsupported"),
        (lambda c: c.__setattr__("key_cache", c.key_cache.half()), "fp8|differs"),
        (lambda c: c.__setattr__("key_cache", c.key_cache[..., :32]), "FlashAttention layout"),
    ],
)
def test_bad_layout_raises(mutate, match, device):
    case = _tiny(device)
    mutate(case)
    h = head_vec(0.5, case.q.shape[1], device)
    with pytest.raises(ValueError, match=match):
        sparge_paged_prefill(
            case.q, case.key_cache, case.value_cache, case.batch, case.scale, h, h, h,
            torch.empty_like(case.q),
        )


@pytest.mark.parametrize(
    "sim,match",
    [
        (torch.zeros(3), r"shape \(2,\)"),
        (torch.zeros(2, dtype=torch.float64), "float32"),
        (torch.tensor([0.5, float("nan")]), "NaN"),
    ],
)
def test_bad_thresholds_raise(sim, match, device):
    case = _tiny(device)
    h = head_vec(0.5, 2, device)
    with pytest.raises(ValueError, match=match):
        predict_block_map(case.q, case.key_cache, case.batch, case.scale, sim.to(device), h)


def test_bad_topk_and_out_raise(device):
    case = _tiny(device)
    h = head_vec(0.5, 2, device)
    with pytest.raises(ValueError, match="topk"):
        predict_block_map(case.q, case.key_cache, case.batch, case.scale, h, h, topk=1.5)
    bm = predict_block_map(case.q, case.key_cache, case.batch, case.scale, h, h)
    with pytest.raises(ValueError, match="out must have"):
        sparse_paged_attention(
            case.q, case.key_cache, case.value_cache, case.batch, bm, case.scale, h,
            torch.empty(3, device=device),
        )


# NOTE: made on the device itself (``.to("cuda")`` of a strided CPU view copies it contiguous)
@pytest.mark.parametrize("make_stats", [
    lambda d: torch.zeros(3, dtype=torch.int32, device=d),
    lambda d: torch.zeros(4, dtype=torch.int64, device=d),
    lambda d: torch.zeros(3, 2, dtype=torch.int64, device=d)[:, 0],
], ids=["int32", "shape4", "strided"])
def test_bad_stats_raise(make_stats, device):
    """The block counters must be a contiguous int64 [3] tensor on the inputs' device (the kernels
    add into them with atomics): anything else is refused before a launch."""
    case = _tiny(device)
    h = head_vec(0.5, 2, device)
    with pytest.raises(ValueError, match=r"stats must be a contiguous int64 \[3\] tensor"):
        sparge_paged_prefill(case.q, case.key_cache, case.value_cache, case.batch, case.scale,
                             h, h, h, torch.empty_like(case.q), stats=make_stats(device))


def test_block_geometry_constants():
    # The thresholds files and the kernels' tiles depend on these; changing them is a format change.
    assert (BLKQ, BLKK) == (128, 64)


# ------------------------------------------------------------------------------------------
# GPU: the same checks at realistic sizes (run on the GPU machine; see README)
# ------------------------------------------------------------------------------------------

GPU_REQS = [(4096, 4096), (1000, 9000), (3000, 3000), (77, 5000)]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dim,page,dtype,packed,hq,hkv",
    [(128, 16, torch.bfloat16, False, 8, 2), (64, 64, torch.float16, False, 8, 2),
     (128, 64, torch.bfloat16, True, 8, 2), (256, 64, torch.bfloat16, True, 8, 2),
     # the real models' grouping: SmolLM2's 9 / 3 heads of 64, Gemma 3 270M's 4 / 1 of 256
     (64, 64, torch.bfloat16, True, 9, 3), (256, 64, torch.bfloat16, True, 4, 1)],
)
def test_gpu_realistic_sizes(dim, page, dtype, packed, hq, hkv):
    case = make_paged_case(GPU_REQS, hq, hkv, dim, page, dtype, "cuda", seed=11, packed=packed)
    # dense configuration vs fp32 SDPA (bottom-right causal)
    out = torch.full_like(case.q, float("nan"))
    sparge_paged_prefill(
        case.q, case.key_cache, case.value_cache, case.batch, case.scale,
        head_vec(1.0, hq, "cuda"), head_vec(1.0, hq, "cuda"), head_vec(50.0, hq, "cuda"), out,
    )
    oracle, tol = attention_oracle(case, None, "cuda")
    assert (out.float().cpu() - oracle).abs().max().item() <= tol
    # sparse: block map equals the reference's up to decisions at a threshold
    stats = torch.zeros(3, dtype=torch.int64, device="cuda")
    bm = predict_block_map(
        case.q, case.key_cache, case.batch, case.scale,
        head_vec(0.3, hq, "cuda"), head_vec(0.9, hq, "cuda"), stats=stats,
    )
    for r, got in enumerate(kept_blocks(bm, case.batch)):
        q, k, _ = case.request_kv(r)
        keep, _ = predict_block_map_ref(q, k, case.scale, 0.3, 0.9)
        mismatch = (got != keep).float().mean().item()
        assert mismatch < 1e-3, f"request {r}: {mismatch:.2%} of block decisions differ"
    assert 0 < stats[1] < stats[0]


@triton.jit
def _program_rows(out_ptr, num_heads, n_t, GROUP: tl.constexpr, FIRST: tl.constexpr):
    lin = tl.program_id(0)
    h, t = _program_row(lin, num_heads, n_t, GROUP, FIRST)
    tl.store(out_ptr + 2 * lin, h)
    tl.store(out_ptr + 2 * lin + 1, t)


def _launch_order(num_heads: int, n_t: int, group: int, first: int, device) -> list[tuple]:
    """``(head, t)`` of every program of the attention kernel's KV-major launch, in launch
    order (``attention._program_row`` run as a one-program-a-row kernel)."""
    out = torch.full((num_heads * n_t, 2), -1, dtype=torch.int32, device=device)
    _program_rows[(num_heads * n_t,)](out, num_heads, n_t, GROUP=group, FIRST=first)
    return [tuple(r) for r in out.cpu().tolist()]


@pytest.mark.parametrize("num_heads,n_t,group,first", [
    (8, 5, 4, 2),  # two KV heads of 4, 5 query blocks, the last 2 of every head first
    (8, 5, 4, 0),  # the plain KV-major order
    (2, 6, 4, 4),  # a head chunk smaller than a group, two programs a block (SPLIT=2)
    (4, 1, 2, 2),  # fewer blocks than the tail-first count
])
def test_launch_order_runs_every_heads_last_blocks_first_then_kv_major(num_heads, n_t, group,
                                                                       first, device):
    """Every (head, query-block part) exactly once; first the last ``first`` parts of every head
    (the dense rows of a chunk's last queries: none runs alone at the end), then one KV head's
    group at a time over its other parts, heaviest first."""
    order = _launch_order(num_heads, n_t, group, first, device)
    assert sorted(order) == [(h, t) for h in range(num_heads) for t in range(n_t)]
    k = min(first, n_t) * num_heads
    head, rest = order[:k], order[k:]
    assert sorted(head) == [(h, t) for h in range(num_heads) for t in range(n_t - k // num_heads,
                                                                             n_t)]
    assert [t for _, t in head] == sorted((t for _, t in head), reverse=True)
    gc = min(num_heads, group)
    kv = [h // gc for h, _ in rest]
    assert kv == sorted(kv)  # one KV head's group before the next
    for g in set(kv):
        ts = [t for h, t in rest if h // gc == g]
        assert ts == sorted(ts, reverse=True)  # heaviest first within the group
