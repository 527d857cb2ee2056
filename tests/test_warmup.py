"""Start-up compilation of the sparse kernels (sparge_serve.kernels.warmup)."""

import pytest
import torch

from sparge_serve.kernels import BLKK, BLKQ, MAX_KEY_BLOCKS
from sparge_serve.kernels.warmup import nkb_pad_buckets, warm_up_sparse_kernels
from tests.kernel_inputs import head_vec, make_paged_case


def test_buckets_cover_every_context_length():
    pad = lambda n: max(16, 1 << (-(-n // BLKK) - 1).bit_length())  # noqa: E731
    lo, hi = 49152, 131072
    assert nkb_pad_buckets(lo, hi) == [1024, 2048]
    for n in range(lo, hi + 1, 997):
        assert pad(n) in nkb_pad_buckets(lo, hi)
    assert nkb_pad_buckets(1, 64) == [16]
    assert nkb_pad_buckets(200_000, 100_000) == []
    assert nkb_pad_buckets(1, 10**9)[-1] == MAX_KEY_BLOCKS


def _packed_cache(pages, page, hkv, dim, device):
    kv = torch.zeros(pages, page, hkv, 2 * dim, dtype=torch.bfloat16, device=device)
    return kv.split(dim, dim=-1)


def test_warm_up_runs_every_bucket(device):
    kc, vc = _packed_cache(1, 64, 2, 64, device)
    buckets = warm_up_sparse_kernels(kc, vc, num_heads=4, min_seq_len=300, max_seq_len=2100,
                                     pv_skip_variants=(True, False), masks=True)
    assert buckets == [16, 32, 64]


@pytest.mark.gpu
@pytest.mark.parametrize("attention_kernel", ["triton", "fa3"])
def test_no_compilation_after_warm_up(attention_kernel):
    """After the warm-up, prefills of any length in range (and any batch) compile nothing."""
    from sparge_serve.kernels import attention, fa3_tables, pooling, predictor

    kernels = (pooling._ksum_kernel, pooling._kblock_kernel, predictor._select_kernel,
               attention._sparse_attn_kernel, fa3_tables._virtual_table_kernel)
    dev = torch.device("cuda", torch.cuda.current_device())
    kc, vc = _packed_cache(1, 64, 2, 128, "cuda")
    fa3 = attention_kernel == "fa3"
    warm_up_sparse_kernels(kc, vc, num_heads=8, min_seq_len=1000, max_seq_len=40_000,
                           masks=fa3)
    if fa3:
        fa3_tables.warm_up_virtual(8, 2, 64, dev)
    compiled = [len(k.device_caches[dev.index][0]) for k in kernels]
    from sparge_serve.kernels import PrefillBatch, sparge_paged_prefill

    for reqs in ([(3000, 3000)], [(BLKQ + 5, 17_003), (700, 33_333)], [(40_000, 40_000)],
                 [(1, 900), (1, 1500), (1, 2000), (2500, 9000)]):
        case = make_paged_case(reqs, 8, 2, 128, 64, torch.bfloat16, "cuda", packed=True)
        batch = case.batch
        if len(reqs) == 4:  # the last request alone, as slices at an odd offset (a mixed step)
            batch = PrefillBatch(batch.query_start_loc[3:], batch.seq_lens[3:],
                                 batch.block_table[3:], 2500, 9000)
        out = torch.empty_like(case.q)
        sparge_paged_prefill(case.q, case.key_cache, case.value_cache, batch, case.scale,
                             head_vec(0.6, 9, "cuda")[1:], head_vec(0.9, 9, "cuda")[1:],
                             head_vec(50.0, 9, "cuda")[1:], out, pv_skip=False,
                             attention=attention_kernel, map_budget=1e-9 if fa3 else None)
    torch.cuda.synchronize()
    assert [len(k.device_caches[dev.index][0]) for k in kernels] == compiled
