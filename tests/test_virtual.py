"""FA3 over virtual per-row contexts (sparge_serve.kernels.virtual) equals the sparse kernel.

On the CPU FA3 is replaced by a PyTorch emulation of ``flash_attn_varlen_func``'s paged,
bottom-right causal semantics, so these tests check the construction (sequence offsets, virtual
block table, virtual context lengths, the heads-as-pages view); the GPU test runs the real FA3.
"""

from __future__ import annotations

import pytest
import torch

from sparge_serve.kernels import predict_block_map, sparse_paged_attention
from sparge_serve.kernels.virtual import fa3_sparse_attention, heads_as_pages
from tests.kernel_inputs import head_vec, make_paged_case

REQS = [(300, 300), (200, 650), (37, 421), (129, 129)]


def fa_varlen_emulation(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, seqused_k,
                        softmax_scale, causal, block_table, out):
    """``flash_attn_varlen_func`` semantics (paged K/V, bottom-right causal), one sequence at a
    time, in fp32."""
    assert causal and q.shape[1] == k.shape[2] == 1
    page = k.shape[1]
    cu = cu_seqlens_q.tolist()
    for i in range(len(cu) - 1):
        n_q, n_k = cu[i + 1] - cu[i], int(seqused_k[i])
        if n_q == 0:
            continue
        assert n_q <= max_seqlen_q and n_k <= max_seqlen_k and n_k >= n_q
        pages = block_table[i, : -(-n_k // page)].long()
        keys = k[pages].reshape(-1, k.shape[-1])[:n_k].float()
        vals = v[pages].reshape(-1, v.shape[-1])[:n_k].float()
        s = q[cu[i]: cu[i + 1], 0].float() @ keys.T * softmax_scale
        qpos = torch.arange(n_q, device=q.device) + n_k - n_q
        s = s.masked_fill(torch.arange(n_k, device=q.device)[None, :] > qpos[:, None],
                          float("-inf"))
        out[cu[i]: cu[i + 1], 0] = (torch.softmax(s, -1) @ vals).to(out.dtype)
    return out


@pytest.mark.parametrize("page,hq,hkv,packed,topk", [
    (64, 8, 2, True, None), (16, 4, 4, False, 0.3), (64, 4, 1, False, 0.5), (32, 8, 2, True, None),
])
def test_fa3_virtual_contexts_equal_the_sparse_kernel(page, hq, hkv, packed, topk, device):
    case = make_paged_case(REQS, hq, hkv, 64, page, torch.float16, device, seed=3, packed=packed)
    sim = head_vec(0.3, hq, device)
    cdf = torch.linspace(0.5, 0.95, hq, device=device)
    bm = predict_block_map(case.q, case.key_cache, case.batch, case.scale, sim, cdf, topk)
    real = bm.count > 0
    assert (bm.count[real] < bm.n_valid[real]).any()  # some rows are sparse
    want = torch.zeros_like(case.q)
    sparse_paged_attention(case.q, case.key_cache, case.value_cache, case.batch, bm, case.scale,
                           head_vec(50.0, hq, device), want, pv_skip=False)
    got = torch.full_like(case.q, float("nan"))
    n = case.q.shape[0]
    fa3_sparse_attention(case.q, case.key_cache, case.value_cache, case.batch, bm, case.scale,
                         got, (0, n), attn_fn=fa_varlen_emulation)
    assert not torch.isnan(got).any()
    assert (got.float() - want.float()).abs().max().item() <= 2e-3


def test_heads_as_pages_addresses_every_head_of_every_page():
    case = make_paged_case([(64, 200)], 4, 2, 64, 16, torch.float16, "cpu", packed=True)
    view, k = heads_as_pages(case.key_cache)
    pages, _, hkv, _ = case.key_cache.shape
    for p in (0, pages - 1):
        for h in range(hkv):
            assert torch.equal(view[p * k + h, :, 0], case.key_cache[p, :, h])
    with pytest.raises(ValueError, match="cannot be viewed as head pages"):
        # a page stride that is no multiple of the head stride
        heads_as_pages(torch.empty(10000).as_strided((4, 16, 2, 64), (2050, 128, 64, 1)))


@pytest.mark.gpu
@pytest.mark.parametrize("page,topk", [(64, None), (64, 0.5), (16, 0.3)])
def test_gpu_fa3_virtual_contexts_equal_the_sparse_kernel(page, topk):
    """The real FA3 (vLLM's build) at realistic sizes: prefix offsets, partial query blocks."""
    pytest.importorskip("vllm.vllm_flash_attn")
    reqs = [(4096, 4096), (1000, 9000), (3000, 3000), (77, 5000)]
    case = make_paged_case(reqs, 8, 2, 128, page, torch.bfloat16, "cuda", seed=5, packed=True)
    sim = head_vec(0.3, 8, "cuda")
    cdf = torch.linspace(0.6, 0.98, 8, device="cuda")
    bm = predict_block_map(case.q, case.key_cache, case.batch, case.scale, sim, cdf, topk)
    want = torch.zeros_like(case.q)
    sparse_paged_attention(case.q, case.key_cache, case.value_cache, case.batch, bm, case.scale,
                           head_vec(50.0, 8, "cuda"), want, pv_skip=False)
    got = torch.full_like(case.q, float("nan"))
    fa3_sparse_attention(case.q, case.key_cache, case.value_cache, case.batch, bm, case.scale,
                         got, (0, case.q.shape[0]))
    assert not torch.isnan(got).any()
    assert (got.float() - want.float()).abs().max().item() <= 2e-2


def test_virtual_scratch_bytes_bounds_the_allocations(device):
    from sparge_serve.kernels.virtual import virtual_batch, virtual_scratch_bytes

    case = make_paged_case(REQS, 4, 2, 64, 16, torch.float16, device, seed=1, packed=True)
    bm = predict_block_map(case.q, case.key_cache, case.batch, case.scale,
                           head_vec(0.3, 4, device), head_vec(0.9, 4, device))
    n = case.q.shape[0]
    vb = virtual_batch(case.batch, bm, 4, 2, 16, heads_as_pages(case.key_cache)[1], n)
    used = 2 * case.q.numel() * 2 + sum(t.numel() * t.element_size()
                                        for t in (vb.cu_seqlens_q, vb.seqused_k, vb.block_table))
    bound = virtual_scratch_bytes(4, 64, case.batch.num_reqs, case.batch.max_query_len,
                                  case.batch.max_seq_len, n, 16)
    assert used <= bound <= 2 * used
