"""fp8 KV cache (vLLM's ``--kv-cache-dtype fp8``) on the sparse path: the kernels read fp8
(``float8_e4m3fn``) keys and values, and optionally an fp8 query, with per-tensor scales.

Two proofs:

- with power-of-two scales the dequantised tensors are exact in bfloat16 and every scaling in the
  kernels is exact, so the fp8 path must give *bit for bit* the block map and output of the
  bfloat16 path over the dequantised cache (itself proven against SDPA in ``test_oracles``);
  on the GPU an fp8 query's ``q.k`` is one fp8 tensor-core product, whose exact products are
  summed in another order than the bf16 product's, so there the output agrees within a
  rounding of ``P`` and of the output to bf16;
- with arbitrary scales (``amax / 448``, vLLM's), the output equals fp32 SDPA over the
  dequantised tensors and exactly the kept blocks, within the tolerance of bfloat16 attention.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sparge_serve.kernels import (
    BLKK,
    FP8_DTYPE,
    KVScales,
    num_blocks,
    predict_block_map,
    sparge_paged_prefill,
    sparse_paged_attention,
)
from sparge_serve.kernels.attention import attend_params
from sparge_serve.kernels.fa3 import fa3_sparse_attention
from sparge_serve.kernels.pooling import values_kmajor
from sparge_serve.kernels.warmup import warm_up_sparse_kernels
from sparge_serve.reference import gather_paged_kv
from tests.kernel_inputs import (
    PagedCase,
    head_vec,
    kept_blocks,
    kernel_round,
    lowp_attention,
    make_paged_case,
    quantize_fp8,
    request_rows,
    sdpa,
    token_mask,
)


@dataclasses.dataclass
class Fp8Case:
    q: torch.Tensor  # fp8 or bf16
    key_cache: torch.Tensor  # fp8
    value_cache: torch.Tensor  # fp8
    scales: KVScales
    dequant: PagedCase  # the same tensors dequantised (fp32 values, held in `dtype`)


def _fp8_case(case: PagedCase, q_fp8: bool, pow2: bool, dtype=torch.bfloat16) -> Fp8Case:
    (k8, ks), (v8, vs) = quantize_fp8(case.key_cache, pow2), quantize_fp8(case.value_cache, pow2)
    q, qs = case.q, None
    q_deq = case.q.float()
    if q_fp8:
        q, qs = quantize_fp8(case.q, pow2)
        q_deq = q.float() * qs
    dequant = dataclasses.replace(
        case, q=q_deq.to(dtype), key_cache=(k8.float() * ks).to(dtype),
        value_cache=(v8.float() * vs).to(dtype))
    scales = KVScales(ks, vs, qs)
    return Fp8Case(q, k8, v8, scales, dequant)


def _case(device, page=64, hq=4, hkv=2, dim=64, reqs=((256, 600), (70, 390)), seed=0):
    return make_paged_case(list(reqs), hq, hkv, dim, page, device=device, seed=seed)


THRESHOLDS = {  # (simthreshd1, cdfthreshd, pvthreshd): dense, CDF selection, CDF + PV skip
    "dense": (1.0, 1.0, 50.0),
    "cdf": (0.4, 0.8, 50.0),
    "pv_skip": (0.4, 0.9, 4.0),
}


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("q_fp8", [False, True])
@pytest.mark.parametrize("rule", sorted(THRESHOLDS))
def test_fp8_cache_equals_bf16_over_the_dequantised_cache(page, q_fp8, rule, device):
    """Power-of-two scales: the same block map and output, bit for bit, as the bf16 path."""
    base = _case(device, page)
    c = _fp8_case(base, q_fp8, pow2=True)
    sim, cdf, pv = THRESHOLDS[rule]
    hq = base.q.shape[1]
    args = (head_vec(sim, hq, device), head_vec(cdf, hq, device), head_vec(pv, hq, device))
    d = c.dequant
    out_ref = torch.zeros_like(d.q)
    bm_ref = sparge_paged_prefill(d.q, d.key_cache, d.value_cache, d.batch, d.scale, *args,
                                  out_ref)
    out = torch.zeros(c.q.shape, dtype=torch.bfloat16, device=device)
    bm = sparge_paged_prefill(c.q, c.key_cache, c.value_cache, d.batch, d.scale, *args, out,
                              scales=c.scales)
    assert torch.equal(bm.count, bm_ref.count)
    for keep, keep_ref in zip(kept_blocks(bm, d.batch), kept_blocks(bm_ref, d.batch),
                              strict=True):
        assert torch.equal(keep, keep_ref)
    if rule != "dense":
        assert (bm.count < bm.n_valid).any(), "the case keeps every block: no selection tested"
    _assert_equals_bf16_path(out, out_ref, d.value_cache, q_fp8)


def _assert_equals_bf16_path(out: torch.Tensor, ref: torch.Tensor, value_cache: torch.Tensor,
                             q_fp8: bool) -> None:
    """``out`` (the fp8 path, power-of-two scales) against ``ref`` (the bf16 path over the
    dequantised tensors): bit for bit, except for an fp8 query on the GPU, whose fp32 sums of
    the fp8 product come in the tensor cores' order: there within a unit of P's bf16 rounding
    summed over the keys and one of the output's."""
    if q_fp8 and out.is_cuda:
        tol = 2 * 2**-7 * value_cache.float().abs().max().item()
        assert (out.float() - ref.float()).abs().max().item() <= tol
    else:
        assert torch.equal(out, ref)


def _check_against_sdpa(out: torch.Tensor, c: Fp8Case, base: PagedCase, bm,
                        p_dtype: torch.dtype | None = None) -> list[float]:
    """``out`` against fp32 SDPA over the dequantised tensors and exactly the kept blocks of
    ``bm``, within twice the error of attention with ``P`` rounded to ``p_dtype`` (default
    bf16) and the output to bf16, plus the output's rounding; returns each request's error."""
    keeps = kept_blocks(bm, base.batch)
    errors = []
    for r in range(base.batch.num_reqs):
        q, k, v = (t.to(out.device) for t in c.dequant.request_kv(r))
        mask = token_mask(keeps[r], q.shape[0], k.shape[0]).to(q.device)
        ref = sdpa(q, k, v, base.scale, mask)
        lowp = lowp_attention(q, k, v, base.scale, mask, torch.bfloat16, p_dtype)
        tol = 2 * (lowp - ref).abs().max().item()
        tol += (kernel_round(ref, torch.bfloat16) - ref).abs().max().item()
        err = (out[request_rows(base.batch, r)].float() - ref).abs().max().item()
        assert err <= tol, f"request {r}: error {err:.3g} > tolerance {tol:.3g}"
        errors.append(err)
    return errors


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("q_fp8, fp8_dot, v_kmajor", [
    (False, False, False), (True, False, False), (True, True, True), (True, True, False)])
def test_fp8_attention_equals_sdpa_over_its_kept_blocks(page, q_fp8, fp8_dot, v_kmajor, device):
    """vLLM's scales (amax / 448): fp32 SDPA over the dequantised tensors and exactly the
    kernel's kept blocks, within twice the error of rounding ``P`` to bf16, or with ``fp8_dot``
    (both products of fp8 operands) to fp8; with V read from the cache's pages or, as
    ``fp8_dot`` does by default, from its K-major copy (PV skip on, so that every V load
    of the kernel runs)."""
    base = _case(device, page, seed=3)
    c = _fp8_case(base, q_fp8, pow2=False, dtype=torch.float32)
    hq = base.q.shape[1]
    out = torch.zeros(c.q.shape, dtype=torch.bfloat16, device=device)
    thresholds = (head_vec(0.4, hq, device), head_vec(0.8, hq, device))
    bm = predict_block_map(c.q, c.key_cache, base.batch, base.scale, *thresholds,
                           scales=c.scales)
    # PV skip with a threshold no block reaches: the skip loop's V loads, the same output
    stats = torch.zeros(3, dtype=torch.int64, device=device)
    sparse_paged_attention(c.q, c.key_cache, c.value_cache, base.batch, bm, base.scale,
                           head_vec(40.0, hq, device), out, stats, scales=c.scales,
                           fp8_dot=fp8_dot, v_kmajor=v_kmajor)
    assert int(stats[2]) == 0, "a block's P.V was skipped: the SDPA oracle would not hold"
    assert (bm.count < bm.n_valid).any(), "every block kept: no sparsity tested"
    errors = _check_against_sdpa(out, c, base, bm, p_dtype=FP8_DTYPE if fp8_dot else None)
    both = torch.zeros_like(out)
    sparge_paged_prefill(c.q, c.key_cache, c.value_cache, base.batch, base.scale, *thresholds,
                         head_vec(50.0, hq, device), both, scales=c.scales, fp8_dot=fp8_dot)
    _check_against_sdpa(both, c, base, bm, p_dtype=FP8_DTYPE if fp8_dot else None)
    if fp8_dot:
        bf16 = torch.zeros_like(out)
        sparse_paged_attention(c.q, c.key_cache, c.value_cache, base.batch, bm, base.scale,
                               head_vec(50.0, hq, device), bf16, scales=c.scales)
        bf16_errors = _check_against_sdpa(bf16, c, base, bm)
        assert min(errors) > 2 * max(bf16_errors), "no fp8 rounding of P: fp8_dot took no effect"


@pytest.mark.parametrize("pv", [40.0, 50.0])
def test_fp8_dot_loop_options_give_the_default_loops_output(pv, device):
    """The fp8 kernel's loop options, each against the loop without it: page_ahead (each kept
    block's page id read one block ahead of its TMA loads) with V from its K-major copy and from
    the pages, and v_tma (the copy read by TMA, the default with TMA loads) against its pointer
    loads. Each gives the same output (bit for bit on the CPU), within the SDPA oracle's
    tolerance over the kept blocks with ``P`` rounded to fp8, PV skip on (a threshold no block
    reaches) and off; v_tma without the copy or without TMA loads is refused."""
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper")
    base = _case(device, 64, reqs=((256, 600), (70, 390), (70, 70)), seed=3)
    c = _fp8_case(base, True, pow2=False, dtype=torch.float32)
    hq = base.q.shape[1]
    bm = predict_block_map(c.q, c.key_cache, base.batch, base.scale, head_vec(0.4, hq, device),
                           head_vec(0.8, hq, device), scales=c.scales)
    assert (bm.count < bm.n_valid).any(), "every block kept: no sparsity tested"
    pairs = {  # the option off, then on
        "page_ahead, V K-major": (dict(page_ahead=False), dict(page_ahead=True)),
        "page_ahead, V from the pages": (dict(v_kmajor=False, page_ahead=False),
                                         dict(v_kmajor=False, page_ahead=True)),
        "v_tma": (dict(v_tma=False), dict(v_tma=None)),
    }
    for name, pair in pairs.items():
        outs = []
        for kw in pair:
            out = torch.zeros(c.q.shape, dtype=torch.bfloat16, device=device)
            stats = torch.zeros(3, dtype=torch.int64, device=device)
            sparse_paged_attention(c.q, c.key_cache, c.value_cache, base.batch, bm, base.scale,
                                   head_vec(pv, hq, device), out, stats, scales=c.scales,
                                   fp8_dot=True, use_tma=True, **kw)
            assert int(stats[2]) == 0, "a block's P.V was skipped: the SDPA oracle would not hold"
            _check_against_sdpa(out, c, base, bm, p_dtype=FP8_DTYPE)
            outs.append(out)
        if device == "cpu":
            assert torch.equal(outs[0], outs[1]), name
    assert attend_params(64, pv < 50, True, fp8_dot=True).v_tma
    for kw in (dict(v_kmajor=False, use_tma=True), dict(use_tma=False)):
        with pytest.raises(ValueError, match="v_tma .* needs v_kmajor and use_tma"):
            sparse_paged_attention(c.q, c.key_cache, c.value_cache, base.batch, bm, base.scale,
                                   head_vec(50.0, hq, device), out, scales=c.scales,
                                   fp8_dot=True, v_tma=True, **kw)


@pytest.mark.parametrize("page, packed", [(16, False), (64, False), (64, True)])
@pytest.mark.parametrize("fp8", [False, True])
def test_values_kmajor_is_each_requests_values_transposed(page, packed, fp8, device):
    """The K-major copy of V that ``fp8_dot`` reads: each request's values gathered through its
    block table (``reference.gather_paged_kv``), token dimension contiguous, zeros up to the end
    of its last key block, the tokens of each 32 in ``pooling.key_order``; bit for bit
    (``packed``: V a view of vLLM's K/V token rows)."""
    base = make_paged_case([(100, 600), (70, 390), (64, 64)], 4, 2, 64, page, device=device,
                           seed=4, packed=packed)
    cache = base.value_cache
    if fp8:  # the same strides, one byte a value
        cache = torch.empty_strided(cache.shape, cache.stride(), dtype=FP8_DTYPE, device=device)
        cache.copy_(quantize_fp8(base.value_cache)[0])
    vt = values_kmajor(cache, base.batch)
    nkb = num_blocks(int(base.batch.seq_lens.max()), BLKK)
    assert vt.shape == (3, cache.shape[2], cache.shape[3], nkb * BLKK)
    assert vt.stride(-1) == 1 and vt.dtype == cache.dtype
    # position 16e + 4q + 2a + b of each 32 holds token 16e + 8a + 2q + b (e, a, b < 2, q < 4)
    k = torch.arange(nkb * BLKK)
    order = k // 32 * 32 + (k & 16) + (k >> 1 & 1) * 8 + (k >> 2 & 3) * 2 + (k & 1)
    assert torch.equal(order.sort().values, k)
    for r in range(base.batch.num_reqs):
        seq = int(base.batch.seq_lens[r])
        _, v = gather_paged_kv(cache.cpu(), cache.cpu(), base.batch.block_table[r].cpu(), seq)
        width = num_blocks(seq, BLKK) * BLKK
        want = torch.zeros(*v.shape[1:], width, dtype=v.dtype)
        want[..., :seq] = v.permute(1, 2, 0)
        got = vt[r, ..., :width].cpu()
        assert torch.equal(got.view(torch.uint8),
                           want[..., order[:width]].contiguous().view(torch.uint8)), f"request {r}"


def test_fp8_dot_in_head_chunks_copies_each_kv_slices_values(device, monkeypatch):
    """In head chunks of one query head (a chunk's KV slice: one KV head, its K-major values
    copied once for its group's chunks) the fp8 products give the one-chunk call's output, and
    SDPA's over the kept blocks."""
    from sparge_serve.kernels import plan

    monkeypatch.setattr(plan, "MIN_BUDGET_BYTES", 0)
    base = _case(device, 16, seed=6)
    c = _fp8_case(base, True, pow2=False, dtype=torch.float32)
    hq = base.q.shape[1]
    chunked = plan.plan_prefill(base.batch, hq, 2, 64, torch.bfloat16, 16, device,
                                map_budget=1e-9, fp8_dot=True)
    assert chunked.triton.plan.heads == 1 and chunked.attend[False, False].v_kmajor
    args = (head_vec(0.4, hq, device), head_vec(0.8, hq, device), head_vec(50.0, hq, device))
    outs = []
    for budget in (None, 1e-9):
        out = torch.zeros(c.q.shape, dtype=torch.bfloat16, device=device)
        bm = sparge_paged_prefill(c.q, c.key_cache, c.value_cache, base.batch, base.scale, *args,
                                  out, scales=c.scales, fp8_dot=True, map_budget=budget)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    full = predict_block_map(c.q, c.key_cache, base.batch, base.scale, *args[:2],
                             scales=c.scales)
    assert torch.equal(bm.count, full.count)
    _check_against_sdpa(outs[1], c, base, full, p_dtype=FP8_DTYPE)


def test_fp8_scales_are_read_on_the_device_not_baked_in(device):
    """Two calls differing only in the scale tensors' values: outputs scale with ``v_scale`` and
    the scores with ``k_scale`` (the kernels load the scales; nothing is cached per value)."""
    base = _case(device, 64, reqs=((128, 192),))
    c = _fp8_case(base, False, pow2=True)
    hq = base.q.shape[1]
    dense = (head_vec(1.0, hq, device), head_vec(1.0, hq, device), head_vec(50.0, hq, device))
    out1 = torch.zeros(c.q.shape, dtype=torch.bfloat16, device=device)
    sparge_paged_prefill(c.q, c.key_cache, c.value_cache, base.batch, base.scale, *dense, out1,
                         scales=c.scales)
    doubled = KVScales(c.scales.k_scale, c.scales.v_scale * 2)
    out2 = torch.zeros_like(out1)
    sparge_paged_prefill(c.q, c.key_cache, c.value_cache, base.batch, base.scale, *dense, out2,
                         scales=doubled)
    assert torch.equal(out2, out1 * 2)
    flat = KVScales(c.scales.k_scale * 0, c.scales.v_scale)
    with pytest.raises(ValueError, match="k_scale is 0"):
        sparge_paged_prefill(c.q, c.key_cache, c.value_cache, base.batch, base.scale, *dense,
                             out2, scales=flat)


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("page", [16, 64])
def test_fa3_path_over_an_fp8_cache_equals_sdpa_over_its_kept_blocks(page, device):
    """The FA3 attention path over an fp8 cache and query (on the GPU FA3's fp8 forward, on the
    CPU an emulation that dequantises with the descales it is given): fp32 SDPA over the
    dequantised tensors and exactly the predictor's kept blocks, within twice the error of
    rounding ``P`` to fp8, as FA3's fp8 forward does."""
    from tests.test_virtual import fa3_emulation

    if device == "cuda":
        pytest.importorskip("vllm.vllm_flash_attn")
    base = _case(device, page, seed=3)
    c = _fp8_case(base, True, pow2=False, dtype=torch.float32)
    hq = base.q.shape[1]
    bm = predict_block_map(c.q, c.key_cache, base.batch, base.scale, head_vec(0.4, hq, device),
                           head_vec(0.8, hq, device), as_mask=True, scales=c.scales)
    assert (bm.count < bm.n_valid).any(), "every block kept: no sparsity tested"
    out = torch.full(c.q.shape, float("nan"), dtype=torch.bfloat16, device=device)
    fa3_sparse_attention(c.q, c.key_cache, c.value_cache, base.batch, bm, base.scale, out,
                         attn_fn=None if device == "cuda" else fa3_emulation, scales=c.scales)
    assert not torch.isnan(out).any()
    _check_against_sdpa(out, c, base, bm, p_dtype=FP8_DTYPE)
    with pytest.raises(ValueError, match="needs the query in fp8 with its scale"):
        fa3_sparse_attention(c.dequant.q.bfloat16(), c.key_cache, c.value_cache, base.batch, bm,
                             base.scale, out, attn_fn=fa3_emulation,
                             scales=KVScales(c.scales.k_scale, c.scales.v_scale))


def _bad_call(c: Fp8Case, base: PagedCase, device, **over):
    hq = base.q.shape[1]
    args = dict(q=c.q, key_cache=c.key_cache, value_cache=c.value_cache, batch=base.batch,
                scale=base.scale, simthreshd1=head_vec(0.4, hq, device),
                cdfthreshd=head_vec(0.8, hq, device), pvthreshd=head_vec(50.0, hq, device),
                out=torch.zeros(c.q.shape, dtype=torch.bfloat16, device=device),
                scales=c.scales)
    args.update(over)
    return sparge_paged_prefill(**args)


@pytest.mark.parametrize("over, match", [
    (lambda c: dict(scales=None), r"key_cache is float8_e4m3fn: pass its dequantisation scales"),
    (lambda c: dict(key_cache=c.key_cache.view(torch.float8_e5m2),
                    value_cache=c.value_cache.view(torch.float8_e5m2)),
     r"key_cache dtype torch.float8_e5m2 unsupported; supported: float16 or bfloat16, or "
     r"float8_e4m3fn"),
    (lambda c: dict(value_cache=c.value_cache.view(torch.int8)), "value_cache dtype torch.int8"),
    (lambda c: dict(scales=KVScales(c.scales.k_scale, c.scales.v_scale, c.scales.k_scale)),
     "q_scale must be given exactly when q is float8_e4m3fn"),
    (lambda c: dict(scales=KVScales(c.scales.k_scale.double(), c.scales.v_scale)),
     "k_scale must be a one-element float32 tensor"),
    (lambda c: dict(scales=KVScales(c.scales.k_scale, c.scales.v_scale.expand(2))),
     "v_scale must be a one-element float32 tensor"),
    (lambda c: dict(scales=KVScales(c.scales.k_scale, c.scales.v_scale * float("nan"))),
     "v_scale is nan: a dequantisation scale is finite and > 0"),
    (lambda c: dict(scales=(c.scales.k_scale, c.scales.v_scale)), "scales must be a KVScales"),
    (lambda c: dict(attention="fa3"),
     r"the FA3 attention path over an fp8 KV cache needs the query in fp8"),
])
def test_bad_fp8_arguments_are_refused_before_any_launch(over, match, device):
    base = _case(device, 64, reqs=((128, 128),))
    c = _fp8_case(base, False, pow2=True)
    with pytest.raises(ValueError, match=match):
        _bad_call(c, base, device, **over(c))


def test_fp8_query_needs_its_scale_and_a_model_dtype_output(device):
    base = _case(device, 64, reqs=((128, 128),))
    c = _fp8_case(base, True, pow2=True)
    with pytest.raises(ValueError, match="q_scale must be given exactly when q is"):
        _bad_call(c, base, device, scales=KVScales(c.scales.k_scale, c.scales.v_scale))
    with pytest.raises(ValueError, match="out dtype torch.float8_e4m3fn unsupported for an fp8 q"):
        _bad_call(c, base, device, out=torch.zeros_like(c.q))
    with pytest.raises(ValueError, match="q is float8_e4m3fn but key_cache is torch.bfloat16"):
        _bad_call(c, base, device, key_cache=c.dequant.key_cache,
                  value_cache=c.dequant.value_cache, scales=None)


def test_scales_on_a_model_dtype_cache_are_refused(device):
    base = _case(device, 64, reqs=((128, 128),))
    c = _fp8_case(base, False, pow2=True)
    hq = base.q.shape[1]
    with pytest.raises(ValueError, match="scales are for fp8 KV caches; key_cache is "
                                         "torch.bfloat16"):
        predict_block_map(base.q, base.key_cache, base.batch, base.scale,
                          head_vec(0.4, hq, device), head_vec(0.8, hq, device),
                          scales=c.scales)


def test_fp8_attention_entry_point_and_warm_up(device):
    """The attention entry point alone (a reference block map) and the warm-up compile and run
    the fp8 variants."""
    base = _case(device, 64, reqs=((128, 256),))
    c = _fp8_case(base, True, pow2=True)
    hq = base.q.shape[1]
    bm = predict_block_map(c.q, c.key_cache, base.batch, base.scale, head_vec(1.0, hq, device),
                           head_vec(1.0, hq, device), scales=c.scales)
    out = torch.zeros(c.q.shape, dtype=torch.bfloat16, device=device)
    sparse_paged_attention(c.q, c.key_cache, c.value_cache, base.batch, bm, base.scale,
                           head_vec(50.0, hq, device), out, scales=c.scales)
    d = c.dequant
    ref = torch.zeros_like(out)
    sparse_paged_attention(d.q, d.key_cache, d.value_cache, base.batch, bm, base.scale,
                           head_vec(50.0, hq, device), ref)
    _assert_equals_bf16_path(out, ref, d.value_cache, True)
    buckets = warm_up_sparse_kernels(c.key_cache[:1], c.value_cache[:1], hq, 1024, 1024,
                                     dtype=torch.bfloat16, q_dtype=FP8_DTYPE)
    assert buckets == [16]


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("q_fp8, fp8_dot", [(False, False), (True, False), (True, True)])
def test_gpu_fp8_prefill_at_serving_sizes(dim, q_fp8, fp8_dot):
    """Serving-size contexts (chunked prefill on a cached prefix, and a whole prompt) with vLLM's
    scales: SDPA over the dequantised tensors and the kept blocks (``fp8_dot``: with ``P``
    rounded to fp8, V read from its K-major copy); and with power-of-two scales, the bf16
    path's output (bit for bit but for an fp8 query's tensor-core sums)."""
    device = "cuda"
    hq, hkv = (4, 1) if dim == 256 else (8, 2)
    base = make_paged_case([(2048, 8192), (3000, 3000)], hq, hkv, dim, 64, device=device, seed=5)
    for pow2 in (False,) if fp8_dot else (False, True):
        c = _fp8_case(base, q_fp8, pow2=pow2, dtype=torch.float32 if not pow2 else torch.bfloat16)
        out = torch.zeros(c.q.shape, dtype=torch.bfloat16, device=device)
        args = (head_vec(0.4, hq, device), head_vec(0.9, hq, device), head_vec(50.0, hq, device))
        bm = sparge_paged_prefill(c.q, c.key_cache, c.value_cache, base.batch, base.scale, *args,
                                  out, scales=c.scales, fp8_dot=fp8_dot)
        if fp8_dot:
            _check_against_sdpa(out, c, base, bm, p_dtype=FP8_DTYPE)
            continue
        if pow2:
            d = c.dequant
            ref = torch.zeros_like(out)
            sparge_paged_prefill(d.q, d.key_cache, d.value_cache, d.batch, d.scale, *args, ref)
            _assert_equals_bf16_path(out, ref, d.value_cache, q_fp8)
            continue
        _check_against_sdpa(out, c, base, bm)


def test_fp8_dot_needs_an_fp8_query_and_cache(device):
    base = _case(device, 64, reqs=((128, 128),))
    c = _fp8_case(base, False, pow2=True)
    with pytest.raises(ValueError, match="fp8_dot needs an fp8 query and KV cache"):
        _bad_call(c, base, device, fp8_dot=True)
