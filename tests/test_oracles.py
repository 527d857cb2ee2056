"""The kernels against torch's ``scaled_dot_product_attention``, an oracle independent of the
project's reference.

- The dense configuration (every block kept, PV skip off) against SDPA with its own bottom-right
  causal mask (``causal_lower_right``) over the paged cache gathered into contiguous K/V.
- The sparse kernel (PV skip off) against SDPA masked with exactly the key blocks of the block
  map the predictor returned AND the token-level causal mask (brute force).

GQA, shuffled page tables (``kernel_inputs.make_paged_case``), prefix-cached requests (the
queries are the last ``Lq`` of ``Lk`` positions), a query and a context shorter than one block,
lengths that are no multiple of a block, fp16 and bf16. Tolerance: twice plain low-precision
attention's error plus the output's rounding (``kernel_inputs.attention_oracle``). Realistic
sizes run on the GPU.
"""

import pytest
import torch

from sparge_serve.kernels import PV_SKIP_OFF, sparge_paged_prefill
from sparge_serve.reference import block_masks
from tests.kernel_inputs import attention_oracle, head_vec, kept_blocks, make_paged_case

# (query_len, seq_len): three query blocks after a 300-token prefix (the third partial; the
# first selects, the rows of the last 128 queries keep every block), 37 queries after 384 cached
# tokens, a 45-token prompt (shorter than a key block)
REQS = [(260, 560), (37, 421), (45, 45)]
GPU_REQS = [(4096, 4096), (1000, 9000), (3000, 3000), (77, 5000)]

DENSE_CASES = [
    # (Hq, Hkv, page, dtype, packed)
    (4, 2, 16, torch.bfloat16, False),
    (2, 1, 64, torch.float16, True),
]


def _dense(case, device):
    hq = case.q.shape[1]
    out = torch.full_like(case.q, float("nan"))
    sparge_paged_prefill(
        case.q, case.key_cache, case.value_cache, case.batch, case.scale,
        head_vec(1.0, hq, device), head_vec(1.0, hq, device), head_vec(PV_SKIP_OFF, hq, device),
        out,
    )
    oracle, tol = attention_oracle(case, None, device)
    assert not torch.isnan(out).any()
    assert (out.float().cpu() - oracle).abs().max().item() <= tol


@pytest.mark.parametrize("hq,hkv,page,dtype,packed", DENSE_CASES)
def test_dense_configuration_equals_sdpa(hq, hkv, page, dtype, packed, device):
    """All blocks kept and PV skip off == SDPA with a bottom-right causal mask."""
    case = make_paged_case(REQS, hq, hkv, 64, page, dtype, device, structured=False, seed=3,
                           packed=packed)
    _dense(case, device)


SPARSE_CASES = [
    # (Hq, Hkv, page, dtype, packed, topk)
    (4, 2, 16, torch.bfloat16, False, None),
    (2, 1, 64, torch.float16, True, 0.5),
]


def _sparse(case, topk, device):
    """The predictor's map, then the sparse kernel over it, against SDPA over that map."""
    hq = case.q.shape[1]
    sim = torch.linspace(-0.2, 0.6, hq, device=device)
    cdf = torch.linspace(0.5, 0.95, hq, device=device)
    out = torch.full_like(case.q, float("nan"))
    bm = sparge_paged_prefill(case.q, case.key_cache, case.value_cache, case.batch, case.scale,
                              sim, cdf, head_vec(PV_SKIP_OFF, hq, device), out, topk=topk)
    keeps = kept_blocks(bm, case.batch)
    sparse = False
    for r, keep in enumerate(keeps):
        lq = case.batch.query_start_loc[r + 1] - case.batch.query_start_loc[r]
        valid, diag = block_masks(int(lq), int(case.batch.seq_lens[r]))
        # a map with a block past the causal limit, or without the diagonal band or the first
        # block (which every row keeps), would show here before the output
        assert not (keep & ~valid).any() and keep[:, :, 0].all() and (keep | ~diag).all()
        sparse |= bool((keep != valid).any())
    assert sparse, "the thresholds must drop blocks on these inputs"
    oracle, tol = attention_oracle(case, keeps, device)
    assert not torch.isnan(out).any()
    assert (out.float().cpu() - oracle).abs().max().item() <= tol


@pytest.mark.parametrize("hq,hkv,page,dtype,packed,topk", SPARSE_CASES)
def test_sparse_kernel_equals_sdpa_over_its_kept_blocks(hq, hkv, page, dtype, packed, topk,
                                                        device):
    """Brute force: SDPA with a mask built from exactly the kept blocks of the block map, AND
    the token-level causal mask, equals the sparse kernel's output (PV skip off)."""
    case = make_paged_case(REQS, hq, hkv, 64, page, dtype, device, seed=4, packed=packed)
    _sparse(case, topk, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dim,page,dtype,packed", [(128, 16, torch.bfloat16, False),
                                                   (128, 64, torch.float16, True),
                                                   (64, 64, torch.bfloat16, True)])
def test_gpu_dense_configuration_equals_sdpa(dim, page, dtype, packed):
    case = make_paged_case(GPU_REQS, 8, 2, dim, page, dtype, "cuda", structured=False, seed=3,
                           packed=packed)
    _dense(case, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dim,page,dtype,packed,topk", [(128, 64, torch.bfloat16, True, None),
                                                        (128, 16, torch.float16, False, 0.3),
                                                        (256, 64, torch.bfloat16, True, None)])
def test_gpu_sparse_kernel_equals_sdpa_over_its_kept_blocks(dim, page, dtype, packed, topk):
    case = make_paged_case(GPU_REQS, 8, 2, dim, page, dtype, "cuda", seed=4, packed=packed)
    _sparse(case, topk, "cuda")



@pytest.mark.parametrize("lq,lk", [(200, 200), (77, 300)])
def test_dense_reference_in_query_chunks_equals_sdpa(lq, lk, monkeypatch):
    """The reference's dense attention, 32 queries at a time against the keys they see, equals
    SDPA with the whole bottom-right causal mask (the oracle the calibration's errors use)."""
    import sparge_serve.reference as ref

    monkeypatch.setattr(ref, "_DENSE_ROWS", 32)
    g = torch.Generator().manual_seed(lq)
    q, k, v = (torch.randn(n, h, 64, generator=g) for n, h in ((lq, 4), (lk, 2), (lk, 2)))
    mask = torch.arange(lk)[None, :] <= torch.arange(lk - lq, lk)[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1), attn_mask=mask, scale=0.125).transpose(0, 1)
    torch.testing.assert_close(ref.dense_causal_attention_ref(q, k, v, 0.125), want,
                               rtol=1e-5, atol=1e-5)
