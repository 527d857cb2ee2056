"""Triton predictor + sparse attention vs the PyTorch reference (CPU: Triton interpreter).

Tolerances follow flash-attention's tests: the kernel's error against an fp32 reference must stay
within a small multiple of PyTorch's own low-precision error on the same data.
"""

import pytest
import torch

from sparge_serve.kernels import (
    BLKK,
    BLKQ,
    FusedLaunch,
    PrefillBatch,
    num_blocks,
    predict_block_map,
    sparge_paged_prefill,
    sparse_paged_attention,
)
from sparge_serve.reference import dense_causal_attention_ref, paged_prefill_ref
from tests.kernel_inputs import head_vec, make_paged_case

# (query_len, seq_len): a full prefill, a chunk after a prefix (query_len < seq_len), a query
# shorter than one block, lengths that are not multiples of BLKQ/BLKK.
REQS_MIXED = [(300, 300), (200, 650), (37, 421), (129, 129)]
REQS_SMALL = [(130, 330), (70, 70)]

THRESHOLD_CASES = {
    # name: (simthreshd1, cdfthreshd, pvthreshd, topk)
    "dense_sim1": (1.0, 0.5, 50.0, None),
    "dense_cdf1": (-1.0, 1.0, 50.0, None),
    "sparse_default": (0.6, 0.98, 50.0, None),
    "sparse_cdf_tiny": (-1.0, 1e-4, 50.0, None),
    "sparse_sim_neg1": (-1.0, 0.5, 50.0, None),
    "pv_zero": (-1.0, 0.9, 0.0, None),
    "pv_mid": (0.0, 0.95, 6.0, None),
    "topk": (-1.0, 0.9, 50.0, 0.25),
}


def _kernel_vs_reference(case, sim, cdf, pv, topk, device):
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
    for r, keep in enumerate(keeps):
        count = bm.count[r].cpu()
        lut = bm.lut[r].cpu()
        got = torch.zeros_like(keep)
        for h in range(keep.shape[0]):
            for b in range(keep.shape[1]):
                idx = lut[h, b, : count[h, b]].long()
                assert torch.all(idx[1:] > idx[:-1]), "LUT must be strictly ascending"
                got[h, b, idx] = True
        assert torch.equal(got, keep), f"block map of request {r} differs from the reference"
    assert stats.cpu().tolist()[:2] == ref_stats.tolist()[:2]
    return out.float().cpu(), ref, stats.cpu(), ref_stats


def _lowp_error(case) -> float:
    """Max error of plain low-precision attention (scores and P.V in the input dtype, softmax in
    fp32: flash-attention's ``attention_ref(upcast=False)``) against the fp32 reference."""
    err = 0.0
    for r in range(case.batch.num_reqs):
        q, k, v = (t.cpu() for t in case.request_kv(r))
        ref = dense_causal_attention_ref(q, k, v, case.scale)
        lq, lk = q.shape[0], k.shape[0]
        g = q.shape[1] // k.shape[1]
        qh = q.transpose(0, 1)
        kh = k.repeat_interleave(g, 1).transpose(0, 1)
        vh = v.repeat_interleave(g, 1).transpose(0, 1)
        s = (qh @ kh.transpose(1, 2)).float() * case.scale
        mask = torch.arange(lk)[None, :] > torch.arange(lk - lq, lk)[:, None]
        p = torch.softmax(s.masked_fill(mask, float("-inf")), -1).to(q.dtype)
        lowp = (p @ vh).transpose(0, 1)
        err = max(err, (lowp.float() - ref).abs().max().item())
    return err


@pytest.mark.parametrize("name", list(THRESHOLD_CASES))
def test_matches_reference_thresholds(name, device):
    sim, cdf, pv, topk = THRESHOLD_CASES[name]
    case = make_paged_case(REQS_MIXED, 4, 2, 64, 16, torch.bfloat16, device)
    out, ref, stats, ref_stats = _kernel_vs_reference(case, sim, cdf, pv, topk, device)
    assert not torch.isnan(out).any()
    tol = 3 * _lowp_error(case) + 1e-3
    if stats[2] == ref_stats[2]:
        assert (out - ref).abs().max().item() <= tol
    else:  # a PV-skip decision at the rounding boundary: the outputs may differ by 2^-pv
        assert abs(int(stats[2]) - int(ref_stats[2])) <= 2
        assert (out - ref).abs().max().item() <= tol + 2.0 ** -pv * 4
    if name.startswith("dense"):
        assert ref_stats[1] == ref_stats[0], "dense thresholds must keep every valid block"
    if name in ("sparse_cdf_tiny", "topk", "sparse_sim_neg1"):
        assert ref_stats[1] < ref_stats[0], "sparse thresholds must skip blocks on this input"
    if name == "pv_zero":
        assert ref_stats[2] > 0, "pvthreshd 0 must skip some PV products on this input"


FUSED_CASES = [
    # (threshold case, Hq, Hkv, head_dim, page, dtype, packed)
    ("sparse_default", 4, 2, 64, 16, torch.bfloat16, False),
    ("pv_mid", 8, 2, 128, 64, torch.bfloat16, True),
    ("topk", 4, 1, 64, 64, torch.float16, False),
    ("dense_cdf1", 2, 2, 64, 32, torch.float16, True),
]


def _fused_vs_two_kernels(case, name, device, **fused_launch):
    """Outputs, block-count maps and stats of sparge_paged_prefill without and with fused=True
    (``fused_launch``: FusedLaunch's fields)."""
    sim, cdf, pv, topk = THRESHOLD_CASES[name]
    hq = case.q.shape[1]
    ths = [head_vec(x, hq, device) for x in (sim, cdf, pv)]
    outs, maps, all_stats = [], [], []
    for fused in (False, True):
        out = torch.full_like(case.q, float("nan"))
        stats = torch.zeros(3, dtype=torch.int64, device=device)
        args = (case.q, case.key_cache, case.value_cache, case.batch, case.scale, *ths, out)
        launch = FusedLaunch(**fused_launch) if fused and fused_launch else None
        maps.append(sparge_paged_prefill(*args, topk=topk, stats=stats, fused=fused,
                                         fused_launch=launch))
        outs.append(out)
        all_stats.append(stats)
    assert maps[1].lut is None
    assert torch.equal(maps[0].count, maps[1].count)
    assert torch.equal(maps[0].n_valid, maps[1].n_valid)
    assert torch.equal(all_stats[0], all_stats[1])
    assert not torch.isnan(outs[1]).any()
    return outs


@pytest.mark.parametrize("name,hq,hkv,dim,page,dtype,packed", FUSED_CASES)
def test_fused_kernel_equals_two_kernel_path(name, hq, hkv, dim, page, dtype, packed, device):
    """The persistent select+attend kernel runs the same code per row as the predictor + sparse
    attention pair: identical outputs, block counts and PV skips (programs take several rows)."""
    case = make_paged_case(REQS_MIXED, hq, hkv, dim, page, dtype, device, seed=dim + page,
                           packed=packed)
    two, fused = _fused_vs_two_kernels(case, name, device)
    if device == "cpu":
        assert torch.equal(two, fused)
    else:  # separately compiled kernels may contract floating-point ops differently
        assert (two.float() - fused.float()).abs().max().item() <= 2e-2


@pytest.mark.parametrize("page,packed", [(16, False), (64, True)])
def test_split_query_blocks_equal_whole_blocks(page, packed, device):
    """split=2 (two 64-row programs per query block, PV skip off) computes the same rows as one
    128-row program: same kept blocks, same order; only the rounding of the matrix products may
    differ."""
    case = make_paged_case(REQS_MIXED, 4, 2, 64, page, torch.bfloat16, device, seed=3,
                           packed=packed)
    hq = 4
    bm = predict_block_map(case.q, case.key_cache, case.batch, case.scale,
                           head_vec(0.6, hq, device), head_vec(0.9, hq, device))
    outs = []
    for split in (1, 2):
        out = torch.full_like(case.q, float("nan"))
        sparse_paged_attention(case.q, case.key_cache, case.value_cache, case.batch, bm,
                               case.scale, head_vec(50.0, hq, device), out, pv_skip=False,
                               split=split)
        outs.append(out.float())
    assert not torch.isnan(outs[1]).any()
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-2
    with pytest.raises(ValueError, match="split must be 1, or 2 with PV skip off"):
        sparse_paged_attention(case.q, case.key_cache, case.value_cache, case.batch, bm,
                               case.scale, head_vec(4.0, hq, device), out, pv_skip=True, split=2)


@pytest.mark.parametrize("topk", [None, 0.3])
def test_select_options_give_the_same_block_map(topk, device):
    """select_dc and select_warps (the select kernel's launch overrides) give exactly the default
    block map, with thresholds that differ per head (cdf tiny, 1, and between) and rows past
    short queries."""
    case = make_paged_case(REQS_MIXED, 8, 2, 64, 16, torch.bfloat16, device, seed=2)
    sim = torch.tensor([0.6, -1.0, 0.2, 1.0, 0.6, -1.0, 0.3, 0.6], device=device)
    cdf = torch.tensor([0.9, 0.5, 1.0, 0.98, 1e-4, 0.9, 0.95, 0.99], device=device)
    ref = predict_block_map(case.q, case.key_cache, case.batch, case.scale, sim, cdf, topk)
    real = ref.count > 0
    assert (ref.count[real] < ref.n_valid[real]).any()  # some rows are sparse
    for dc, warps in ((2, None), (4, 8)):
        bm = predict_block_map(case.q, case.key_cache, case.batch, case.scale, sim, cdf, topk,
                               select_dc=dc, select_warps=warps)
        assert torch.equal(bm.count, ref.count)
        assert torch.equal(bm.n_valid[real], ref.n_valid[real])
        keep = torch.arange(ref.lut.shape[-1], device=device) < ref.count[..., None]
        assert torch.equal(bm.lut[keep], ref.lut[keep])
    for bad in (dict(select_dc=3), dict(select_warps=2)):
        with pytest.raises(ValueError, match="select_dc must be a power of two up to 32 and"):
            predict_block_map(case.q, case.key_cache, case.batch, case.scale, sim, cdf, **bad)


@pytest.mark.parametrize("page,packed,lazy", [(16, False, 8.0), (64, True, 8.0),
                                               (64, True, 0.5)])
def test_lazy_rescale_changes_only_rounding(page, packed, lazy, device):
    """lazy_rescale (FlashAttention-4's conditional rescaling; PV skip off) keeps a stale row
    max until a block exceeds it by more than ``lazy`` log2 units: with 8, no block of these
    inputs moves it after the first, so the stale-max path carries the whole row. Same output as
    the default loop up to the rounding of P, and the reference's within the kernels' tolerance."""
    case = make_paged_case(REQS_MIXED, 4, 2, 64, page, torch.bfloat16, device, seed=5,
                           packed=packed)
    hq = 4
    sim, cdf, pv = head_vec(0.6, hq, device), head_vec(0.9, hq, device), head_vec(50.0, hq, device)
    bm = predict_block_map(case.q, case.key_cache, case.batch, case.scale, sim, cdf)
    outs = []
    for lz in (0.0, lazy):
        out = torch.full_like(case.q, float("nan"))
        sparse_paged_attention(case.q, case.key_cache, case.value_cache, case.batch, bm,
                               case.scale, pv, out, pv_skip=False, lazy_rescale=lz)
        outs.append(out.float())
    assert not torch.isnan(outs[1]).any()
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-2
    ref, _, _ = paged_prefill_ref(case.q, case.key_cache, case.value_cache, case.batch,
                                  case.scale, sim, cdf, pv)
    assert (ref.float() - outs[1].cpu()).abs().max().item() <= 2e-2
    with pytest.raises(ValueError, match="lazy_rescale must be >= 0, and 0 with PV skip on"):
        sparse_paged_attention(case.q, case.key_cache, case.value_cache, case.batch, bm,
                               case.scale, head_vec(4.0, hq, device), out, pv_skip=True,
                               lazy_rescale=8.0)


@pytest.mark.parametrize("page,split,fused", [(64, 1, False), (16, 2, False), (64, 1, True)])
def test_launch_order_changes_nothing(page, split, fused, device):
    """The KV-major launch order (the default) and the former head-major one compute exactly the
    same rows: the order of programs only, in both kernels."""
    case = make_paged_case(REQS_MIXED, 4, 2, 64, page, torch.bfloat16, device, seed=6,
                           packed=page == 64)
    hq = 4
    sim, cdf, pv = head_vec(0.6, hq, device), head_vec(0.9, hq, device), head_vec(50.0, hq, device)
    bm = predict_block_map(case.q, case.key_cache, case.batch, case.scale, sim, cdf)
    outs = []
    for kv_major in (True, False):
        out = torch.full_like(case.q, float("nan"))
        if fused:
            sparge_paged_prefill(case.q, case.key_cache, case.value_cache, case.batch,
                                 case.scale, sim, cdf, pv, out, pv_skip=False, fused=True,
                                 fused_launch=FusedLaunch(programs=2, kv_major=kv_major))
        else:
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
    assert _row_parts(None, 256, False, None, True) == (2, 0.0)
    assert _row_parts(None, 128, False, 0.0, True) == (1, 0.0)


@pytest.mark.parametrize("packed,pv", [(True, 50.0), (False, 6.0)])
def test_tma_loads_equal_pointer_loads(packed, pv, device):
    """TMA block loads (the default on 64-token pages) read the same keys and values as pointer
    loads: same PV skips, same output up to rounding; tails past seq_len included. TMA on pages
    smaller than a key block is refused."""
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper")
    case = make_paged_case(REQS_MIXED, 4, 2, 64, 64, torch.bfloat16, device, seed=5,
                           packed=packed)
    hq = 4
    bm = predict_block_map(case.q, case.key_cache, case.batch, case.scale,
                           head_vec(0.6, hq, device), head_vec(0.9, hq, device))
    outs, skipped = [], []
    for tma in (False, True):
        out = torch.full_like(case.q, float("nan"))
        stats = torch.zeros(3, dtype=torch.int64, device=device)
        sparse_paged_attention(case.q, case.key_cache, case.value_cache, case.batch, bm,
                               case.scale, head_vec(pv, hq, device), out, stats, use_tma=tma,
                               lazy_rescale=0.0)
        outs.append(out.float())
        skipped.append(int(stats[2]))
    assert not torch.isnan(outs[1]).any()
    assert (outs[0] - outs[1]).abs().max().item() <= (0 if device == "cpu" else 1e-2)
    assert skipped[0] == skipped[1] and (pv == 50.0) == (skipped[0] == 0)
    bad = make_paged_case(REQS_SMALL, 4, 2, 64, 16, torch.bfloat16, device)
    with pytest.raises(ValueError, match="TMA loads need key blocks of 64 inside one page"):
        sparse_paged_attention(bad.q, bad.key_cache, bad.value_cache, bad.batch,
                               predict_block_map(bad.q, bad.key_cache, bad.batch, bad.scale,
                                                 head_vec(0.6, hq, device),
                                                 head_vec(0.9, hq, device)),
                               bad.scale, head_vec(50.0, hq, device), torch.empty_like(bad.q),
                               use_tma=True)


def test_prefill_scratch_bytes_bounds_the_allocations(device):
    """The bound the backend reserves during vLLM's memory profiling is what a call has
    allocated at its peak: pooled keys, then key sums (temporary) or the block map and the
    per-row counts."""
    from sparge_serve.kernels import prefill_scratch_bytes
    from sparge_serve.kernels.predictor import KSUM_CHUNK, pool_keys

    case = make_paged_case(REQS_MIXED, 4, 2, 64, 16, torch.bfloat16, device)
    hq, hkv, d = 4, 2, 64
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
    # the fused path: one kept-block list per program instead of the block map
    from sparge_serve.kernels import max_fused_programs

    programs = max_fused_programs(device)
    used_fused = size(pooled.pk, pooled.ksim) + max(sums,
                                                    counts + programs * pooled.nkb_stride * 2)
    assert prefill_scratch_bytes(hq, hkv, d, r, case.batch.max_query_len,
                                 case.batch.max_seq_len, programs) == used_fused


LAYOUT_CASES = [
    # (Hq, Hkv, head_dim, page, dtype, packed): page 64/128 take the TMA path; packed = vLLM's
    # [pages, page, Hkv, 2*D] cache with K and V views
    (4, 4, 64, 16, torch.float16, False),
    (8, 2, 128, 64, torch.bfloat16, True),
    (8, 1, 64, 64, torch.float16, False),
    (4, 1, 128, 16, torch.bfloat16, True),
    (2, 2, 64, 32, torch.bfloat16, False),
    (4, 2, 64, 128, torch.float16, True),
    (4, 2, 256, 64, torch.bfloat16, True),  # head dim 256: 8 warps, split=2 without PV skip
    (2, 1, 256, 16, torch.float16, False),
]


@pytest.mark.parametrize("hq,hkv,dim,page,dtype,packed", LAYOUT_CASES)
def test_matches_reference_layouts(hq, hkv, dim, page, dtype, packed, device):
    case = make_paged_case(
        REQS_SMALL, hq, hkv, dim, page, dtype, device, seed=hq + dim + page, packed=packed
    )
    out, ref, stats, ref_stats = _kernel_vs_reference(case, 0.0, 0.9, 8.0, None, device)
    assert (out - ref).abs().max().item() <= 3 * _lowp_error(case) + 1e-3 + 2.0**-8 * 4


@pytest.mark.parametrize("split,programs", [(1, 2), (2, 1), (1, 5)])
def test_fused_launch_knobs_keep_the_results(split, programs, device):
    """The fused kernel's benchmark knobs (row parts per query block, persistent grid size)
    change the schedule only: the same outputs and counts as the two-kernel path."""
    case = make_paged_case(REQS_MIXED, 4, 2, 64, 16, torch.float16, device, seed=11)
    two, fused = _fused_vs_two_kernels(case, "sparse_sim_neg1", device, split=split, programs=programs)
    if device == "cpu":
        assert torch.equal(two, fused)
    else:
        assert (two.float() - fused.float()).abs().max().item() <= 2e-2


def test_fused_split_needs_pv_skip_off(device):
    case = make_paged_case(REQS_MIXED, 4, 2, 64, 16, torch.float16, device, seed=12)
    ths = [head_vec(x, 4, device) for x in (0.5, 0.9, 8.0)]
    with pytest.raises(ValueError, match="split must be 1, or 2 with PV skip off"):
        sparge_paged_prefill(case.q, case.key_cache, case.value_cache, case.batch, case.scale,
                             *ths, torch.empty_like(case.q), fused=True,
                             fused_launch=FusedLaunch(split=2))


@pytest.mark.parametrize("fused", [False, True])
def test_head_dim_256_without_pv_skip(fused, device):
    """Head dim 256 with PV skip off: 64-row programs (split=2 by default) / parts (fused)."""
    case = make_paged_case(REQS_SMALL, 4, 2, 256, 64, torch.bfloat16, device, seed=7, packed=True)
    hq = 4
    out = torch.full_like(case.q, float("nan"))
    sparge_paged_prefill(case.q, case.key_cache, case.value_cache, case.batch, case.scale,
                         head_vec(0.0, hq, device), head_vec(0.9, hq, device),
                         head_vec(50.0, hq, device), out, fused=fused)
    ref, _, _ = paged_prefill_ref(case.q, case.key_cache, case.value_cache, case.batch,
                                  case.scale, head_vec(0.0, hq), head_vec(0.9, hq),
                                  head_vec(50.0, hq))
    assert (out.float().cpu() - ref).abs().max().item() <= 3 * _lowp_error(case) + 1e-3 + 2.0**-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page", [16, 64])
def test_dense_configuration_equals_sdpa(dtype, page, device):
    """All blocks kept and PV skip off == dense causal attention (bottom-right aligned)."""
    case = make_paged_case(REQS_MIXED, 4, 1, 64, page, dtype, device, structured=False, seed=3)
    hq = case.q.shape[1]
    out = torch.full_like(case.q, float("nan"))
    sparge_paged_prefill(
        case.q, case.key_cache, case.value_cache, case.batch, case.scale,
        head_vec(1.0, hq, device), head_vec(1.0, hq, device), head_vec(50.0, hq, device), out,
    )
    tol = 2 * _lowp_error(case) + 1e-3
    for r in range(case.batch.num_reqs):
        q, k, v = case.request_kv(r)
        ref = dense_causal_attention_ref(q, k, v, case.scale)
        qsl = case.batch.query_start_loc.cpu()
        got = out[int(qsl[r]) : int(qsl[r + 1])].float().cpu()
        assert (got - ref).abs().max().item() <= tol


def test_deterministic(device):
    case = make_paged_case(REQS_SMALL, 4, 2, 64, 16, torch.bfloat16, device)
    hq = 4
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
@pytest.mark.parametrize("name", ["sparse_default", "pv_mid", "topk"])
def test_gpu_fused_kernel_realistic_sizes(name):
    case = make_paged_case(GPU_REQS, 8, 2, 128, 64, torch.bfloat16, "cuda", seed=5, packed=True)
    two, fused = _fused_vs_two_kernels(case, name, "cuda")
    assert (two.float() - fused.float()).abs().max().item() <= 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dim,page,dtype,packed",
    [(128, 16, torch.bfloat16, False), (64, 64, torch.float16, False),
     (128, 64, torch.bfloat16, True), (256, 64, torch.bfloat16, True)],
)
def test_gpu_realistic_sizes(dim, page, dtype, packed):
    case = make_paged_case(GPU_REQS, 8, 2, dim, page, dtype, "cuda", seed=11, packed=packed)
    hq = 8
    # dense configuration vs the fp32 reference
    out = torch.full_like(case.q, float("nan"))
    sparge_paged_prefill(
        case.q, case.key_cache, case.value_cache, case.batch, case.scale,
        head_vec(1.0, hq, "cuda"), head_vec(1.0, hq, "cuda"), head_vec(50.0, hq, "cuda"), out,
    )
    tol = 2 * _lowp_error(case) + 1e-3
    qsl = case.batch.query_start_loc.cpu()
    for r in range(case.batch.num_reqs):
        q, k, v = case.request_kv(r)
        ref = dense_causal_attention_ref(q, k, v, case.scale)
        got = out[int(qsl[r]) : int(qsl[r + 1])].float().cpu()
        assert (got - ref).abs().max().item() <= tol
    # sparse: block map equals the reference's, output within tolerance
    stats = torch.zeros(3, dtype=torch.int64, device="cuda")
    bm = predict_block_map(
        case.q, case.key_cache, case.batch, case.scale,
        head_vec(0.3, hq, "cuda"), head_vec(0.9, hq, "cuda"), stats=stats,
    )
    from sparge_serve.reference import predict_block_map_ref

    for r in range(case.batch.num_reqs):
        q, k, _ = case.request_kv(r)
        keep, _ = predict_block_map_ref(q, k, case.scale, 0.3, 0.9)
        got = torch.zeros_like(keep)
        count, lut = bm.count[r].cpu(), bm.lut[r].cpu().long()
        for h in range(hq):
            for b in range(keep.shape[1]):
                got[h, b, lut[h, b, : count[h, b]]] = True
        mismatch = (got != keep).float().mean().item()
        assert mismatch < 1e-3, f"request {r}: {mismatch:.2%} of block decisions differ"
    assert 0 < stats[1] < stats[0]
