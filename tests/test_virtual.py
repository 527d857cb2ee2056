"""FA3 over virtual per-row contexts (sparge_serve.kernels.fa3) equals attention
over the kept blocks: fp32 torch SDPA masked with exactly the block map's key blocks AND the
causal mask (``kernel_inputs.attention_oracle``).

On the CPU FA3 is replaced by a PyTorch emulation of ``flash_attn_varlen_func``'s paged,
bottom-right causal semantics, so these tests check the construction (sequence offsets, virtual
block table, virtual context lengths, the heads-as-pages view) over block maps of the reference
predictor; the GPU tests run the real FA3 over the Triton predictor's maps at realistic sizes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sparge_serve.kernels import (
    BLKQ,
    BlockMap,
    KVScales,
    predict_block_map,
    sparse_paged_attention,
)
from sparge_serve.kernels.fa3 import fa3_sparse_attention
from sparge_serve.kernels.fa3_tables import heads_as_pages
from sparge_serve.kernels.predictor import lut_to_mask
from tests.kernel_inputs import (
    attention_oracle,
    head_vec,
    kept_blocks,
    make_paged_case,
    quantize_fp8,
    reference_block_map,
)

# (query_len, seq_len): three query blocks after a prefix (the third partial; the first
# selects), a short query after a prefix, a full prefill shorter than one query block
REQS = [(260, 560), (37, 421), (70, 70)]


def fa3_emulation(q, k, v, out, q_start, q_len, seqused_k, block_table, max_seqlen_k, scale,
                  descale=None, kv_batch_idx=None, max_seqlen_q=BLKQ):
    """:func:`fa3_paged_forward` semantics (FA3 with ``seqused_q``: explicit start rows, paged
    K/V through row ``kv_batch_idx[i]`` of ``block_table`` (default ``i``), bottom-right causal,
    query heads in GQA groups over the KV heads; fp8 ``q, k, v`` dequantised by ``descale``),
    one sequence and head at a time, in fp32."""
    hq, hkv = q.shape[1], k.shape[2]
    assert out.shape[1] == hq and hq % hkv == 0
    assert q.stride(-1) == out.stride(-1) == 1  # strided per-head views, as FA3 accepts them
    n_seq = q_len.shape[0]
    assert q_start.shape[0] == n_seq + 1 and seqused_k.shape[0] == n_seq
    if kv_batch_idx is None:
        assert block_table.shape[0] == n_seq
        table_rows = list(range(n_seq))
    else:  # FA3's kv_batch_idx: int32, one valid row of the table a sequence
        assert kv_batch_idx.dtype == torch.int32 and kv_batch_idx.shape == (n_seq,)
        table_rows = kv_batch_idx.tolist()
        assert all(0 <= r < block_table.shape[0] for r in table_rows)
    page = k.shape[1]
    starts, lens, used = q_start[:-1].tolist(), q_len.tolist(), seqused_k.tolist()
    if descale is not None:
        assert all(d.shape == (n_seq, hkv) for d in descale)
        q, k, v = (t.float() * d[0, 0] for t, d in zip((q, k, v), descale, strict=True))
    for i, (s0, n_q, n_k) in enumerate(zip(starts, lens, used, strict=True)):
        if n_q == 0:
            continue
        assert n_q <= max_seqlen_q and n_q <= n_k <= max_seqlen_k and s0 + n_q <= q.shape[0]
        pages = block_table[table_rows[i], : -(-n_k // page)].long()
        keys = k[pages].reshape(-1, hkv, k.shape[-1])[:n_k].float()
        vals = v[pages].reshape(-1, hkv, v.shape[-1])[:n_k].float()
        qpos = torch.arange(n_q, device=q.device) + n_k - n_q
        future = torch.arange(n_k, device=q.device)[None, :] > qpos[:, None]
        for h in range(hq):
            kh = h // (hq // hkv)
            s = q[s0: s0 + n_q, h].float() @ keys[:, kh].T * scale
            s = s.masked_fill(future, float("-inf"))
            out[s0: s0 + n_q, h] = (torch.softmax(s, -1) @ vals[:, kh]).to(out.dtype)


def _fa3_vs_oracle(case, bm, keeps, **kw):
    """The FA3 path (CPU: emulated) over ``bm`` against SDPA over its kept blocks."""
    got = torch.full_like(case.q, float("nan"))
    kw.setdefault("attn_fn", fa3_emulation)
    fa3_sparse_attention(case.q, case.key_cache, case.value_cache, case.batch, bm, case.scale,
                         got, **kw)
    oracle, tol = attention_oracle(case, keeps)
    assert not torch.isnan(got).any()
    assert (got.float().cpu() - oracle).abs().max().item() <= tol
    return got


# (MIN_LAUNCH_SEQS, heads a launch): REQS has 9 sequences a head
LAUNCHES = [(1, lambda hq: 1), (10, lambda hq: 2), (1024, lambda hq: hq)]


@pytest.mark.parametrize("min_seqs,launch", LAUNCHES, ids=["one_head", "two_heads", "all"])
@pytest.mark.parametrize("page,hq,hkv,packed,topk,d", [
    (64, 4, 2, True, None, 64), (16, 4, 4, False, 0.3, 64), (32, 2, 1, True, 0.5, 64),
    (64, 4, 1, True, 0.5, 256),
])
def test_fa3_virtual_contexts_equal_attention_over_the_kept_blocks(page, hq, hkv, packed, topk, d,
                                                                   min_seqs, launch, device,
                                                                   monkeypatch):
    """One query head a launch (per-head views) and several (head-major copies of their rows,
    one order across them) give attention over exactly the kept blocks, head dims 64 and 256,
    with the dense rows' own call (two launches or more here) and without it."""
    import sparge_serve.kernels.fa3 as virtual

    monkeypatch.setattr(virtual, "MIN_LAUNCH_SEQS", min_seqs)
    monkeypatch.setattr(virtual, "DENSE_CALL_LAUNCHES", 2)
    case = make_paged_case(REQS, hq, hkv, d, page, torch.float16, device, seed=3, packed=packed)
    bm, keeps = reference_block_map(case, 0.3, torch.linspace(0.5, 0.95, hq), topk)
    real = bm.count > 0
    assert (bm.count[real] < bm.n_valid[real]).any()  # some rows are sparse
    n_seq = bm.count.shape[0] * bm.count.shape[2]
    assert virtual.launch_heads(n_seq, hq) == launch(hq)
    seqs: list[int] = []

    def counting(q, k, v, out, q_start, q_len, *args, **kw):
        seqs.append(q_len.shape[0])
        fa3_emulation(q, k, v, out, q_start, q_len, *args, **kw)

    _fa3_vs_oracle(case, bm, keeps, attn_fn=counting)
    # heads x sequences a launch, then (two launches or more) one call of every head for the
    # dense rows
    launches = hq // launch(hq)
    assert seqs == [n_seq * launch(hq)] * launches + [n_seq] * (launches >= 2)


@pytest.mark.parametrize("cdf", [0.8, 1.0], ids=["mixed", "dense_configuration"])
def test_dense_rows_go_to_one_call_and_the_rest_to_virtual_sequences(cdf, device, monkeypatch):
    """A row that keeps every valid block in all heads (a chunk's last queries always; with
    cdfthreshd 1 every row) is attended by the one dense call over the request's pages, every
    other row by its heads' virtual sequences: each row with queries exactly once. In the dense
    call a run of a request's consecutive dense query blocks is one sequence (a request dense
    throughout: its whole query, as FLASH_ATTN attends it)."""
    import sparge_serve.kernels.fa3 as virtual

    monkeypatch.setattr(virtual, "MIN_LAUNCH_SEQS", 1)  # one head a launch: q_len per row
    monkeypatch.setattr(virtual, "DENSE_CALL_LAUNCHES", 4)  # the hq launches get the dense call
    hq = 4
    case = make_paged_case(REQS, hq, 2, 64, 16, torch.float16, device, seed=4, packed=True)
    bm, keeps = reference_block_map(case, -1.0, cdf)
    has_rows = (bm.n_valid > 0).any(1).cpu()  # [R, NQB]
    dense = (bm.count == bm.n_valid).all(1).cpu() & has_rows
    assert dense.any() and (cdf == 1.0) == bool(dense[has_rows].all())
    calls = []

    def spy(q, k, v, out, q_start, q_len, *args, **kw):
        calls.append((q.shape[1], q_start[:-1].tolist(), q_len.tolist()))
        fa3_emulation(q, k, v, out, q_start, q_len, *args, **kw)

    mask = BlockMap(None, bm.count, bm.n_valid, lut_to_mask(bm))
    _fa3_vs_oracle(case, mask, keeps, attn_fn=spy)
    *launches, (heads, starts, lens) = calls
    assert heads == hq and len(launches) == hq  # the dense call: all heads, GQA packed
    qsl = case.batch.query_start_loc.tolist()

    def covered(seq_starts, seq_lens):
        rows = torch.zeros(qsl[-1], dtype=torch.int64)
        for s0, n in zip(seq_starts, seq_lens, strict=True):
            rows[s0: s0 + n] += 1
        return rows

    want = torch.zeros(qsl[-1], dtype=torch.int64)  # the rows of the dense blocks
    for r, b in dense.nonzero().tolist():
        want[qsl[r] + b * BLKQ: min(qsl[r] + (b + 1) * BLKQ, qsl[r + 1])] = 1
    assert torch.equal(covered(starts, lens), want)
    for _, l_starts, l_lens in launches:  # each head's virtual sequences: the other rows
        assert torch.equal(covered(l_starts, l_lens) + want, torch.ones_like(want))
    # one sequence a run of consecutive dense blocks (some run of two or more here)
    runs = int((dense & ~torch.nn.functional.pad(dense[:, 1:], (0, 1))).sum())
    assert sum(n > 0 for n in lens) == runs < int(dense.sum())
    if cdf == 1.0:
        assert sorted((s0, n) for s0, n in zip(starts, lens, strict=True) if n) == [
            (qsl[r], qsl[r + 1] - qsl[r]) for r in range(len(REQS))]


def test_dense_call_only_where_the_heads_take_many_launches():
    """A long prompt (one head a launch, 32 launches) gets the dense rows' call; an engine
    chunk (16K tokens: 8 heads a launch, 4 launches) keeps them in its launches."""
    from sparge_serve.kernels import PrefillBatch
    from sparge_serve.kernels.fa3 import DENSE_CALL_LAUNCHES, plan_virtual

    def plan(tokens):
        i32 = dict(dtype=torch.int32)
        b = PrefillBatch(torch.tensor([0, tokens], **i32), torch.tensor([tokens], **i32),
                         torch.arange(tokens // 64, **i32)[None], tokens, tokens)
        return plan_virtual(b, tokens // 128, 64, 32, q_rows=tokens)

    long, chunk = plan(1024 * 128), plan(128 * 128)
    assert (long.launch, chunk.launch) == (1, 8)
    assert long.dense_call and not chunk.dense_call
    # the call reads each sequence's request's page table (FA3's kv_batch_idx): one request here
    assert torch.equal(long.row_req, torch.zeros(1024, dtype=torch.int32))
    assert chunk.row_req is None
    assert 32 // 8 < DENSE_CALL_LAUNCHES <= 32


def test_launch_heads_fill_a_launch_with_the_fewest_heads():
    from sparge_serve.kernels.fa3 import MIN_LAUNCH_SEQS, launch_heads, staging_bytes

    assert launch_heads(MIN_LAUNCH_SEQS, 32) == 1  # a long prompt: one head a launch
    assert launch_heads(128, 32) == 8  # a 16K-token chunk: 8 x 128 sequences
    assert launch_heads(100, 32) == 16  # the fewest heads dividing the buffer's that fill it
    assert launch_heads(16, 32) == 32 and launch_heads(16, 6) == 6  # all, where none fills it
    # the copies' bound: largest just below a drop of the heads a launch, never past MIN tiles x 2
    bound = staging_bytes(10**6, (32, 16, 8), 10**6, 128)
    assert bound == max(launch_heads(r, 32) * r * 128 * 128 * 4 for r in range(1, 1024)
                        if launch_heads(r, 32) > 1)
    assert bound <= 2 * MIN_LAUNCH_SEQS * 128 * 128 * 4
    assert staging_bytes(10**6, (32,), 3000, 128) == 32 * 3000 * 128 * 4  # few tokens
    assert staging_bytes(10**6, (1,), 10**6, 128) == 0  # one head: per-head views, no copy


@pytest.mark.parametrize("reqs,sim,cdf,topk", [
    (REQS, 0.3, 0.9, None),  # 8 key blocks: one word of 16 bits
    ([(260, 2100), (37, 421)], 0.3, 0.6, None),  # 33 key blocks: two words
    ([(260, 2100)], -1.0, 1.0, 0.4),  # top-k
    # head 0: every block forced (no similar block), head 1: the fewest blocks
    ([(260, 2100)], [1.0, -1.0], [0.0, 0.0], None),
])
def test_bit_set_maps_hold_the_lists_blocks(reqs, sim, cdf, topk, device):
    """``predict_block_map(as_mask=True)`` (the FA3 path's map): bit j of a row holds key block
    j iff the row's list holds it; the same counts and counters; ``lut_to_mask`` agrees."""
    case = make_paged_case(reqs, 2, 1, 64, 16, torch.float16, device, seed=5, packed=True)
    ths = tuple(torch.tensor(x, dtype=torch.float32, device=device).expand(2).contiguous()
                for x in (sim, cdf))
    stats = [torch.zeros(3, dtype=torch.int64, device=device) for _ in range(2)]
    lists = predict_block_map(case.q, case.key_cache, case.batch, case.scale, *ths, topk,
                              stats=stats[0])
    bits = predict_block_map(case.q, case.key_cache, case.batch, case.scale, *ths, topk,
                             stats=stats[1], as_mask=True)
    assert bits.lut is None and bits.mask.dtype == torch.int32
    assert torch.equal(bits.count, lists.count) and torch.equal(bits.n_valid, lists.n_valid)
    assert torch.equal(stats[0], stats[1])
    nkb = lists.lut.shape[-1]
    assert bits.mask.shape == (*lists.count.shape, -(-nkb // 32))
    decoded = (bits.mask[..., None] >> torch.arange(32, device=device)) & 1
    decoded = decoded.flatten(-2).bool()
    assert torch.equal(decoded.sum(-1), lists.count)  # no bit but the list's
    listed = torch.arange(nkb, device=device) < lists.count[..., None]
    assert decoded.gather(-1, lists.lut.long().clamp(0, nkb - 1))[listed].all()
    assert torch.equal(lut_to_mask(lists), bits.mask)
    sparse = (lists.count < lists.n_valid).any(-1).any(0).tolist()  # per head
    assert sparse == ([False, True] if topk is None and cdf == [0.0, 0.0] else [True, True])


def test_fa3_tables_from_bit_sets_of_several_words(device, monkeypatch):
    """Contexts of 33 key blocks (two words), expanded one word a step (the table kernel's
    running position across steps), 16-token pages (four per block)."""
    import sparge_serve.kernels.fa3_tables as tables

    monkeypatch.setattr(tables, "TABLE_CHUNK_WORDS", 1)
    case = make_paged_case([(260, 2100), (37, 421)], 2, 1, 64, 16, torch.float16, device,
                           seed=6, packed=True)
    bm, keeps = reference_block_map(case, 0.3, 0.6)
    assert (bm.count[bm.count > 0] < bm.n_valid[bm.count > 0]).any()
    assert (bm.lut[..., :bm.count.max()] >= 32).any()  # kept blocks in the second word
    mask = BlockMap(None, bm.count, bm.n_valid, lut_to_mask(bm))
    _fa3_vs_oracle(case, mask, keeps)


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
@pytest.mark.parametrize("page,topk,slice_rows,dtype,min_seqs,geo", [
    (64, None, None, torch.bfloat16, 1024, (8, 2, 128)),
    (64, 0.5, 60, torch.float16, 1024, (8, 2, 128)),
    (16, 0.3, None, torch.bfloat16, 1024, (8, 2, 128)),
    (64, 0.5, None, torch.bfloat16, 1, (8, 2, 128)),
    (64, 0.5, None, torch.bfloat16, 1024, (9, 3, 64)),  # SmolLM2's heads
    (64, 0.5, None, torch.bfloat16, 1024, (4, 1, 256))])  # Gemma 3 270M's
def test_gpu_fa3_path_equals_attention_over_its_kept_blocks(page, topk, slice_rows, dtype,
                                                            min_seqs, geo, monkeypatch):
    """The real FA3 (vLLM's build) at realistic sizes (prefix offsets, partial query blocks)
    over the Triton predictor's bit-set map: within tolerance of SDPA masked with exactly the
    map's kept blocks AND the causal mask, as the Triton sparse kernel over the same map is;
    launches of all heads (128 sequences a head; in slices of 60) and of one; head dims 128, 64
    and 256 (``auto`` takes this path wherever FA3 serves)."""
    import sparge_serve.kernels.fa3 as virtual

    pytest.importorskip("vllm.vllm_flash_attn")
    monkeypatch.setattr(virtual, "MIN_LAUNCH_SEQS", min_seqs)
    hq, hkv, d = geo
    reqs = [(4096, 4096), (1000, 9000), (3000, 3000), (77, 5000)]
    case = make_paged_case(reqs, hq, hkv, d, page, dtype, "cuda", seed=5, packed=True)
    sim = head_vec(0.3, hq, "cuda")
    cdf = torch.linspace(0.6, 0.98, hq, device="cuda")
    bm = predict_block_map(case.q, case.key_cache, case.batch, case.scale, sim, cdf, topk,
                           as_mask=True)
    keeps = kept_blocks(bm, case.batch)
    assert any((keep.sum(-1) < keep.shape[-1]).any() for keep in keeps)  # some rows sparse
    oracle, tol = attention_oracle(case, keeps, "cuda")
    got = torch.full_like(case.q, float("nan"))
    fa3_sparse_attention(case.q, case.key_cache, case.value_cache, case.batch, bm, case.scale,
                         got, slice_rows=slice_rows)
    assert not torch.isnan(got).any()
    assert (got.float().cpu() - oracle).abs().max().item() <= tol
    lists = predict_block_map(case.q, case.key_cache, case.batch, case.scale, sim, cdf, topk)
    assert torch.equal(lut_to_mask(lists), bm.mask)
    triton_out = torch.full_like(case.q, float("nan"))
    sparse_paged_attention(case.q, case.key_cache, case.value_cache, case.batch, lists,
                           case.scale, head_vec(50.0, hq, "cuda"), triton_out, pv_skip=False)
    assert (triton_out.float().cpu() - oracle).abs().max().item() <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_gpu_fa3_path_dense_configuration_equals_flash_attn(fp8, monkeypatch):
    """Every block kept, with the heads in launches enough for the dense rows' call: each
    request is one sequence of that call over its own pages, so the output is FLASH_ATTN's
    (vLLM's ``flash_attn_varlen_func`` over the same cache; an fp8 cache: its fp8 forward, the
    per-tensor scales as ``q/k/v_descale``), up to FA3's own choice of splits."""
    import sparge_serve.kernels.fa3 as virtual

    fa = pytest.importorskip("vllm.vllm_flash_attn")
    monkeypatch.setattr(virtual, "MIN_LAUNCH_SEQS", 1)  # one head a launch: 8, the dense call
    hq, hkv = 8, 2
    reqs = [(4096, 4096), (1000, 9000), (3000, 3000), (77, 5000)]
    case = make_paged_case(reqs, hq, hkv, 128, 64, torch.bfloat16, "cuda", seed=7, packed=True)
    b, q, kc, vc, scales, descale = (case.batch, case.q, case.key_cache, case.value_cache, None,
                                     {})
    if fp8:
        (q, qs), (kc, ks), (vc, vs) = (quantize_fp8(t) for t in (q, kc, vc))
        scales = KVScales(ks, vs, qs)
        shape = (len(reqs), hkv)
        descale = dict(q_descale=qs.expand(shape), k_descale=ks.expand(shape),
                       v_descale=vs.expand(shape))
    bm = predict_block_map(q, kc, b, case.scale, head_vec(0.3, hq, "cuda"),
                           head_vec(1.0, hq, "cuda"), as_mask=True, scales=scales)
    assert torch.equal(bm.count, bm.n_valid)
    got = torch.full(case.q.shape, float("nan"), dtype=torch.bfloat16, device="cuda")
    fa3_sparse_attention(q, kc, vc, b, bm, case.scale, got, scales=scales)
    want = torch.full_like(got, float("nan"))
    fa.flash_attn_varlen_func(q, kc, vc, max_seqlen_q=b.max_query_len,
                              cu_seqlens_q=b.query_start_loc, max_seqlen_k=b.max_seq_len,
                              seqused_k=b.seq_lens, softmax_scale=case.scale, causal=True,
                              block_table=b.block_table, out=want, fa_version=3, **descale)
    assert not torch.isnan(got).any()
    assert (got.float() - want.float()).abs().max().item() <= 2e-2


def test_shape_bytes_bound_the_fa3_allocations(device):
    """``plan.Shape`` (the head chunks' plan and the backend's reservation) covers what
    ``virtual_rows`` and ``virtual_table`` allocate, with room for temporaries only."""
    from sparge_serve.kernels.fa3_tables import virtual_rows, virtual_table
    from sparge_serve.kernels.plan import Shape
    from sparge_serve.kernels.pooling import key_sums_bytes, pooled_keys_bytes

    case = make_paged_case(REQS, 4, 2, 64, 16, torch.float16, device, seed=1, packed=True)
    lists, _ = reference_block_map(case, 0.3, 0.9)
    bm = BlockMap(None, lists.count, lists.n_valid, lut_to_mask(lists))  # the predictor's shapes
    rows = virtual_rows(case.batch, bm.count.shape[2])
    n = rows.order.shape[0]
    table, used = virtual_table(rows, case.batch, bm, 16, heads_as_pages(case.key_cache)[1], 2,
                                0, n)
    b = case.batch
    fa3 = Shape(4, 2, 64, b.num_reqs, b.max_query_len, b.max_seq_len, 16)
    assert table.numel() * 4 + used.numel() * 4 == 4 * n * fa3.table_row_bytes()
    assert 4 * fa3.head_bytes() == sum(
        t.numel() * t.element_size() for t in (bm.mask, bm.count, bm.n_valid))
    own = sum(t.numel() * t.element_size()
              for t in (rows.q_start, rows.q_len, rows.order, rows.context))
    sizes = (2, 64, b.num_reqs, b.max_seq_len)
    maps = pooled_keys_bytes(*sizes) + max(key_sums_bytes(*sizes), 4 * fa3.head_bytes())
    fixed = fa3.chunk_bytes(4) - maps - 4 * n * fa3.table_row_bytes()
    lse = 4 * b.num_reqs * b.max_query_len * 4  # FA3's, of the dense rows' call of 4 heads
    # count == n_valid of 4 heads, a row's flag, three lengths, the dense runs' temporaries
    flags = n * (4 + 1 + 3 * 4 + 6 * 8)
    # the call's rows, plus at most six int64 [S] temporaries alive with them
    assert own <= fixed - lse - flags <= own + 6 * 8 * n + 8


def test_staging_bytes_bound_the_copies_of_a_launch_of_several_heads(device):
    """``fa3.staging_bytes`` (in the backend's reservation) covers the query and output copies
    that a launch of several heads allocates."""
    from sparge_serve.kernels.fa3 import VirtualAttention, plan_virtual, staging_bytes

    case = make_paged_case(REQS, 4, 2, 64, 16, torch.bfloat16, device, seed=1, packed=True)
    b = case.batch
    nqb = -(-b.max_query_len // BLKQ)
    plan = plan_virtual(b, nqb, 16, 4, q_rows=case.q.shape[0])
    assert plan.launch == 4 and plan.span == (0, case.q.shape[0]) and not plan.exact
    attend = VirtualAttention(plan, case.q, case.key_cache, case.value_cache, b, case.scale,
                              torch.empty_like(case.q), 2)
    copies = sum(t.numel() * t.element_size() for t in (attend.q_stage, attend.out_stage))
    bound = staging_bytes(b.num_reqs * nqb, (4, 2, 1), b.num_reqs * b.max_query_len, 64)
    assert 0 < copies <= bound
    with pytest.raises(ValueError, match="set batch.rows or pass q_rows"):
        plan_virtual(b, nqb, 16, 4)


def test_virtual_sequences_run_longest_first_and_cover_every_row(device):
    from sparge_serve.kernels.fa3_tables import virtual_rows, virtual_table

    case = make_paged_case(REQS, 4, 2, 64, 16, torch.float16, device, seed=2, packed=True)
    bm, _ = reference_block_map(case, 0.3, -1.0, topk=0.5)
    rows = virtual_rows(case.batch, bm.count.shape[2])
    qsl = case.batch.query_start_loc.tolist()
    # one order for every head: by the row's last query position in its context
    ctx = [s - (qsl[r + 1] - qsl[r]) for r, s in enumerate(case.batch.seq_lens.tolist())]
    nqb = bm.count.shape[2]
    q_lens = [qsl[r + 1] - qsl[r] for r in range(len(ctx))]
    last = [ctx[r] + min((b + 1) * BLKQ, q_lens[r]) - 1 if b * BLKQ < q_lens[r] else -1
            for r, b in (divmod(i, nqb) for i in rows.order.tolist())]
    assert last == sorted(last, reverse=True)
    assert rows.context.tolist() == [p + 1 for p in last]  # the dense rows' call's contexts
    covered = torch.zeros(qsl[-1], dtype=torch.int64)  # the sequences tile the rows once
    for s0, n in zip(rows.q_start[:-1].tolist(), rows.q_len.tolist(), strict=True):
        covered[s0: s0 + n] += 1
    assert torch.equal(covered, torch.ones_like(covered)) and rows.q_start[-1] == qsl[-1]
    # (an approximate longest-first order: forced blocks and a partial last block make the kept
    # tokens of short rows not quite proportional to their context)
    _, used = virtual_table(rows, case.batch, bm, 16, 2, 2, 0, rows.order.shape[0])
    assert used[:, 0].min() > used[:, -1].max()


@pytest.mark.parametrize("slice_rows", [1, 5])
def test_fa3_table_slices_give_the_same_output(slice_rows, device):
    """Tables built for a slice of each head's sequences at a time (bounded memory)."""
    case = make_paged_case(REQS, 4, 2, 64, 16, torch.float16, device, seed=6, packed=True)
    bm, _ = reference_block_map(case, 0.3, 0.9)
    outs = []
    for rows in (None, slice_rows):
        out = torch.full_like(case.q, float("nan"))
        fa3_sparse_attention(case.q, case.key_cache, case.value_cache, case.batch, bm,
                             case.scale, out, attn_fn=fa3_emulation, slice_rows=rows)
        outs.append(out)
    assert not torch.isnan(outs[1]).any() and torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("min_seqs", [1, 1024], ids=["one_head", "all"])
@pytest.mark.parametrize("known", [False, True], ids=["rows_unknown", "rows_given"])
def test_fa3_path_leaves_rows_outside_the_batch_alone(known, min_seqs, device, monkeypatch):
    """Absolute offsets (the backend's contiguous sub-batch): rows before and after stay, with
    the batch's rows given (the launch of several heads copies just those) or not (all of q's,
    from out)."""
    import sparge_serve.kernels.fa3 as virtual

    monkeypatch.setattr(virtual, "MIN_LAUNCH_SEQS", min_seqs)
    case = make_paged_case(REQS[:2], 4, 2, 64, 16, torch.float16, device, seed=4, packed=True)
    bm, keeps = reference_block_map(case, 0.3, 0.9)
    pad = 7
    q = torch.cat([torch.randn(pad, 4, 64, dtype=case.q.dtype, device=device), case.q,
                   torch.randn(3, 4, 64, dtype=case.q.dtype, device=device)])
    batch = dataclasses.replace(case.batch, query_start_loc=case.batch.query_start_loc + pad,
                                rows=(pad, pad + case.q.shape[0]) if known else None)
    got = torch.full_like(q, float("nan"))
    fa3_sparse_attention(q, case.key_cache, case.value_cache, batch, bm, case.scale, got,
                         attn_fn=fa3_emulation)
    n = case.q.shape[0]
    assert torch.isnan(got[:pad]).all() and torch.isnan(got[pad + n:]).all()
    oracle, tol = attention_oracle(case, keeps)
    assert (got[pad: pad + n].float().cpu() - oracle).abs().max().item() <= tol


def _fa3_fwd_call_args(path) -> list[str]:
    """The arguments of the ``torch.ops._vllm_fa3_C.fwd(...)`` call in a Python file."""
    import ast

    tree = ast.parse(path.read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "fwd"
             and "_vllm_fa3_C" in ast.unparse(node.func)]
    assert len(calls) == 1, f"{path}: {len(calls)} calls of _vllm_fa3_C.fwd"
    return [ast.unparse(a) for a in calls[0].args]


def test_fa3_forward_passes_arguments_where_vllm_does():
    """``fa3_paged_forward`` calls FA3's op positionally, as vLLM's ``flash_attn_varlen_func``
    does, plus ``seqused_q`` (slot 10, which vLLM leaves None). A vLLM whose wrapper passes the
    op's arguments in another order fails here, not with wrong attention on a GPU."""
    import importlib.util
    from pathlib import Path

    import sparge_serve.kernels.fa3 as virtual

    spec = importlib.util.find_spec("vllm.vllm_flash_attn")  # imports vllm only (CPU-safe)
    theirs = _fa3_fwd_call_args(Path(next(iter(spec.submodule_search_locations)))
                                / "flash_attn_interface.py")
    assert theirs == [
        "q", "k", "v", "None", "None", "q_v", "out", "cu_seqlens_q", "cu_seqlens_k", "None",
        "None", "seqused_k", "max_seqlen_q", "max_seqlen_k", "block_table", "None", "None",
        "None", "None", "None", "q_descale", "k_descale", "v_descale", "softmax_scale", "causal",
        "real_window_size[0]", "real_window_size[1]", "softcap", "True", "scheduler_metadata",
        "num_splits", "None", "0", "s_aux", "cp_world_size", "cp_rank", "cp_tot_seqused_k"]
    ours = _fa3_fwd_call_args(Path(virtual.__file__))
    assert len(ours) == len(theirs)
    # ours: the sequence starts as cu_seqlens_q, their lengths as seqused_q, causal, no window
    assert (ours[7], ours[8], ours[10], ours[11]) == ("q_start", "None", "q_len", "seqused_k")
    assert (ours[12], ours[14], ours[23], ours[24], ours[25], ours[26], ours[30]) == (
        "max_seqlen_q", "block_table", "scale", "True", "-1", "-1", "1")
    assert ours[20:23] == ["q_descale", "k_descale", "v_descale"]
    assert (theirs[15], ours[15]) == ("None", "kv_batch_idx")  # the dense rows' call sets it
