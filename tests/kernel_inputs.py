"""Builders of varlen prefill batches over a shuffled paged KV cache, for kernel tests/benchmarks,
and the tests' oracles: torch SDPA in fp32 over exactly the key blocks a kernel attends, the
reference's PV-skip decisions with their margins, and the tolerance of a low-precision kernel.

Tolerances follow flash-attention's tests: a kernel's error against the fp32 oracle may be twice
the error of plain low-precision attention on the same inputs (:func:`lowp_attention`: scores and
softmax in fp32 from the rounded inputs, P rounded to the input dtype for P.V, the output rounded,
as the kernels do) plus the output's own rounding.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from sparge_serve.kernels import BLKK, BLKQ, PV_SKIP_OFF, BlockMap, PrefillBatch, num_blocks


@dataclass
class PagedCase:
    q: torch.Tensor  # [num_tokens, Hq, D]
    key_cache: torch.Tensor  # [num_pages, page, Hkv, D]
    value_cache: torch.Tensor
    batch: PrefillBatch
    scale: float

    def request_kv(self, r: int):
        """Contiguous k, v [seq_len, Hkv, D] (on the CPU) and q [query_len, Hq, D] (on its
        device) of request r."""
        from sparge_serve.reference import gather_paged_kv

        seq_len = int(self.batch.seq_lens[r])
        k, v = gather_paged_kv(self.key_cache, self.value_cache, self.batch.block_table[r], seq_len)
        qsl = self.batch.query_start_loc
        return self.q[int(qsl[r]) : int(qsl[r + 1])], k, v


def make_paged_case(
    reqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    structured: bool = True,
    seed: int = 0,
    packed: bool = False,
) -> PagedCase:
    """``reqs`` = [(query_len, seq_len), ...]. Pages are shuffled so no request is contiguous.

    ``structured`` adds what real attention has and random data lacks: a strong sink (the first
    keys align with every query), locality (queries resemble nearby keys) and a few long-range
    "copy" keys; it makes CDF selection and the PV skip actually trigger. ``packed`` lays K and V
    out like vLLM 0.26 does: one ``[num_pages, page, Hkv, 2*D]`` buffer, K and V as views.
    """
    g = torch.Generator().manual_seed(seed)
    pages_per_req = [num_blocks(s, page_size) for _, s in reqs]
    num_pages = sum(pages_per_req) + 2
    perm = torch.randperm(num_pages, generator=g)
    max_pages = max(pages_per_req) + 1
    block_table = torch.full((len(reqs), max_pages), num_pages - 1, dtype=torch.int32)
    key_cache = torch.randn(num_pages, page_size, num_kv_heads, head_dim, generator=g)
    value_cache = torch.randn(num_pages, page_size, num_kv_heads, head_dim, generator=g)
    qs = []
    offset = 0
    group = num_heads // num_kv_heads
    for r, ((q_len, seq_len), n_pages) in enumerate(zip(reqs, pages_per_req, strict=True)):
        pages = perm[offset : offset + n_pages]
        offset += n_pages
        block_table[r, :n_pages] = pages.to(torch.int32)
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=g)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=g)
        q = torch.randn(q_len, num_heads, head_dim, generator=g)
        if structured:
            q *= 0.5
            sink = torch.randn(num_kv_heads, head_dim, generator=g)
            sink = sink / sink.norm(dim=-1, keepdim=True) * math.sqrt(head_dim) * 1.5
            k[:4] += sink
            q += sink.repeat_interleave(group, 0)[None] * 0.8
            # locality: each query looks like a smoothed version of the keys just before it
            ctx = seq_len - q_len
            smooth = torch.cumsum(k, 0)
            lo = torch.clamp(torch.arange(ctx, seq_len) - 32, min=0)
            local = (smooth[ctx:] - smooth[lo]) / 32.0
            q += 2.0 * local.repeat_interleave(group, 1)
            # queries and keys of a block share a direction (self-similar blocks)
            blockdir = torch.randn(num_blocks(seq_len, 64), 1, num_kv_heads, head_dim, generator=g)
            blockdir = blockdir.expand(-1, 64, -1, -1).reshape(-1, num_kv_heads, head_dim)
            k = 0.5 * k + 1.5 * blockdir[:seq_len]
        flat_k = key_cache[pages].flatten(0, 1)
        flat_v = value_cache[pages].flatten(0, 1)
        flat_k[:seq_len] = k
        flat_v[:seq_len] = v
        key_cache[pages] = flat_k.view(n_pages, page_size, num_kv_heads, head_dim)
        value_cache[pages] = flat_v.view(n_pages, page_size, num_kv_heads, head_dim)
        qs.append(q)
    q_lens = torch.tensor([q for q, _ in reqs])
    qsl = torch.zeros(len(reqs) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_lens, 0)
    batch = PrefillBatch(
        query_start_loc=qsl.to(device),
        seq_lens=torch.tensor([s for _, s in reqs], dtype=torch.int32, device=device),
        block_table=block_table.to(device),
        max_query_len=int(q_lens.max()),
        max_seq_len=max(s for _, s in reqs),
    )
    if packed:
        kv = torch.cat([key_cache, value_cache], dim=-1).to(dtype).to(device)
        key_cache, value_cache = kv.split(head_dim, dim=-1)
    return PagedCase(
        q=torch.cat(qs).to(dtype).to(device),
        key_cache=key_cache.to(dtype).to(device),
        value_cache=value_cache.to(dtype).to(device),
        batch=batch,
        scale=head_dim**-0.5,
    )


FP8_MAX = 448.0
"""Largest finite float8_e4m3fn: vLLM's per-tensor fp8 scale is amax / FP8_MAX."""


def quantize_fp8(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as float8_e4m3fn with one per-tensor scale (``amax / 448``, as vLLM's, or with
    ``pow2`` that rounded up to a power of two, so every dequantised value is exact in bf16 and
    fp16), and that scale: a one-element fp32 tensor on ``x``'s device."""
    s = x.float().abs().max() / FP8_MAX
    if pow2:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    s = s.reshape(1).float()
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s


def head_vec(value: float, num_heads: int, device="cpu") -> torch.Tensor:
    return torch.full((num_heads,), float(value), dtype=torch.float32, device=device)


# ---- oracles ------------------------------------------------------------------------------------

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Kernels run under Triton's CPU interpreter, whose fp32 -> bf16 casts truncate (the GPU rounds
to nearest; fp16 rounds to nearest on both)."""


def kernel_round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (fp32) cast to ``dtype`` the way the kernels cast it, back in fp32."""
    if dtype == torch.bfloat16 and INTERPRETED and x.device.type == "cpu":
        return (x.float().view(torch.int32) & -65536).view(torch.float32)
    return x.to(dtype).float()


def request_rows(batch: PrefillBatch, r: int) -> slice:
    qsl = batch.query_start_loc
    return slice(int(qsl[r]), int(qsl[r + 1]))


def token_mask(keep: torch.Tensor, lq: int, lk: int) -> torch.Tensor:
    """``keep [Hq, NQB, NKB]`` (kept key blocks of one request's query blocks) expanded to a token
    mask ``[Hq, Lq, Lk]``, AND the bottom-right causal mask."""
    keep = keep.cpu()
    tok = keep.repeat_interleave(BLKQ, 1)[:, :lq].repeat_interleave(BLKK, 2)[:, :, :lk]
    causal = torch.arange(lk)[None, :] <= torch.arange(lk - lq, lk)[:, None]
    return tok & causal


def sdpa(q, k, v, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch's ``scaled_dot_product_attention`` in fp32 (GQA) on one request's ``q [Lq, Hq, D]``,
    ``k, v [Lk, Hkv, D]``, on their device: bottom-right causal (``causal_lower_right``) or over
    the boolean ``mask [Hq, Lq, Lk]``. Returns fp32 ``[Lq, Hq, D]``."""
    lq, lk = q.shape[0], k.shape[0]
    qh, kh, vh = (t.float().transpose(0, 1)[None] for t in (q, k, v))
    attn_mask = causal_lower_right(lq, lk) if mask is None else mask.to(q.device)[None]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, scale=scale,
                                         enable_gqa=True)
    return out[0].transpose(0, 1)


def lowp_attention(q, k, v, scale: float, mask: torch.Tensor, dtype: torch.dtype | None = None,
                   p_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain attention of one request in the inputs' dtype, rounded where the kernels round:
    scores and softmax in fp32 from the (already rounded) inputs, P cast to the dtype for an
    fp32-accumulated P.V, divided by the fp32 row sum, the output cast to the dtype (as fp32).
    ``dtype`` (default ``q``'s) and ``p_dtype`` (default ``dtype``) name the kernel's output and
    P dtypes where they differ from the inputs' (fp8 caches: dequantised fp32 inputs)."""
    dtype = dtype or q.dtype
    group = q.shape[1] // k.shape[1]
    qh = q.float().transpose(0, 1)
    kh, vh = (t.float().repeat_interleave(group, 1).transpose(0, 1) for t in (k, v))
    s = (qh @ kh.transpose(1, 2)) * scale
    s = s.masked_fill(~mask.to(q.device), float("-inf"))
    p = torch.exp(s - s.max(-1, keepdim=True).values)
    out = (kernel_round(p, p_dtype or dtype) @ vh) / p.sum(-1, keepdim=True)
    return kernel_round(out, dtype).transpose(0, 1)


def attention_oracle(case: PagedCase, keeps: list[torch.Tensor] | None = None,
                     device: str | torch.device = "cpu") -> tuple[torch.Tensor, float]:
    """fp32 SDPA of every request of ``case`` (``[num_tokens, Hq, D]``, on the CPU) over the key
    blocks ``keeps[r] [Hq, NQB, NKB]`` (``None``: dense, bottom-right causal), and the tolerance
    of a kernel's output against it: twice :func:`lowp_attention`'s error plus the output's own
    rounding error. ``device``: where the attention runs (realistic sizes on the GPU)."""
    ref = torch.zeros(case.q.shape, dtype=torch.float32)
    lowp_err = round_err = 0.0
    for r in range(case.batch.num_reqs):
        q, k, v = (t.to(device) for t in case.request_kv(r))
        lq, lk = q.shape[0], k.shape[0]
        if keeps is None:
            mask = token_mask(torch.ones(1, num_blocks(lq, BLKQ), num_blocks(lk, BLKK),
                                         dtype=torch.bool), lq, lk)
            out = sdpa(q, k, v, case.scale)
        else:
            mask = token_mask(keeps[r], lq, lk)
            out = sdpa(q, k, v, case.scale, mask)
        lowp = lowp_attention(q, k, v, case.scale, mask)
        lowp_err = max(lowp_err, (lowp - out).abs().max().item())
        round_err = max(round_err, (kernel_round(out, q.dtype) - out).abs().max().item())
        ref[request_rows(case.batch, r)] = out.cpu()
        del lowp, mask
    return ref, 2 * lowp_err + round_err


def kept_blocks(bm: BlockMap, batch: PrefillBatch) -> list[torch.Tensor]:
    """A kernel's block map as the reference's keep masks: per request ``[Hq, NQB, NKB]`` bool
    (lists must be strictly ascending; bit sets hold no block past the context)."""
    keeps = []
    seq_lens = batch.seq_lens.cpu().tolist()
    for r, seq_len in enumerate(seq_lens):
        rows = request_rows(batch, r)
        nqb, nkb = num_blocks(rows.stop - rows.start, BLKQ), num_blocks(seq_len, BLKK)
        count = bm.count[r, :, :nqb].cpu().long()
        if bm.lut is not None:
            lut = bm.lut[r, :, :nqb].cpu().long()
            listed = torch.arange(lut.shape[-1]) < count[..., None]
            ids = torch.where(listed, lut, -1)
            assert (ids[..., 1:] > ids[..., :-1])[listed[..., 1:]].all(), "lists not ascending"
            keep = torch.zeros(*count.shape, lut.shape[-1] + 1, dtype=torch.bool)
            keep.scatter_(-1, torch.where(listed, lut, lut.shape[-1]), True)
            keep = keep[..., :-1]
        else:
            words = bm.mask[r, :, :nqb].cpu()
            keep = ((words[..., None] >> torch.arange(32)) & 1).flatten(-2).bool()
        assert not keep[..., nkb:].any(), f"request {r}: kept blocks past its context"
        assert torch.equal(keep.sum(-1), count), f"request {r}: counts differ from the map"
        keeps.append(keep[..., :nkb].contiguous())
    return keeps


def reference_block_map(case: PagedCase, simthreshd1, cdfthreshd, topk: float | None = None,
                        ) -> tuple[BlockMap, list[torch.Tensor]]:
    """The reference predictor's block map of ``case`` as the kernels' :class:`BlockMap` (lists,
    on the case's device), and its keep masks: attention tests without the Triton predictor."""
    from sparge_serve.kernels.geometry import key_block_stride
    from sparge_serve.reference import predict_block_map_ref

    b = case.batch
    hq = case.q.shape[1]
    nqb, stride = num_blocks(b.max_query_len, BLKQ), key_block_stride(num_blocks(b.max_seq_len,
                                                                                 BLKK))
    lut = torch.zeros(b.num_reqs, hq, nqb, stride, dtype=torch.int16)
    count = torch.zeros(b.num_reqs, hq, nqb, dtype=torch.int32)
    n_valid = torch.zeros_like(count)
    keeps = []
    for r in range(b.num_reqs):
        q, k, _ = case.request_kv(r)
        keep, valid = predict_block_map_ref(q, k, case.scale, simthreshd1, cdfthreshd, topk)
        keeps.append(keep)
        n = keep.shape[1]
        count[r, :, :n] = keep.sum(-1)
        n_valid[r, :, :n] = valid.sum(-1)
        for h in range(hq):
            for i in range(n):
                ids = torch.nonzero(keep[h, i]).flatten()
                lut[r, h, i, : ids.numel()] = ids.to(torch.int16)
    dev = case.q.device
    return BlockMap(lut.to(dev), count.to(dev), n_valid.to(dev)), keeps


def pv_skip_decisions(q, k, keep: torch.Tensor, scale: float, pvthreshd,
                      ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The PV-skip rule of ``reference.block_sparse_attention_ref`` replayed on one request (on
    its device): off the diagonal, a kept block after a row's first computed one is skipped when
    every real row's block max score is ``pvthreshd`` (log2 units) or more below its running max.

    Returns the computed blocks ``[Hq, NQB, NKB]`` (kept and not skipped), each decision's margin
    ``[Hq, NQB, NKB]`` (``max over rows (block max - running max) + pvthreshd``, skipped iff
    ``<= 0``; NaN where no decision is taken) and how far a kernel's rounding may move a margin:
    twice the fp32 dot product's error bound ``D * 2**-24 * max |q||k|`` (log2 units) for each of
    the block max and the running max. A kernel takes the reference's decision wherever the
    margin is larger than that."""
    from sparge_serve.reference import block_masks

    k = k.to(q.device)
    lq, hq, dim = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    pv = torch.as_tensor(pvthreshd, dtype=torch.float32).flatten().cpu().expand(hq).tolist()
    _, diag = block_masks(lq, lk)
    qk_scale = scale * math.log2(math.e)
    computed = keep.clone().cpu()
    margins = torch.full(keep.shape, float("nan"))
    slack = 0.0
    pad = num_blocks(lk, BLKK) * BLKK - lk
    for h in range(hq):
        if pv[h] >= PV_SKIP_OFF:
            continue
        qh, kh = q[:, h].float(), k[:, h // group].float()
        slack = max(slack, 4 * dim * 2.0**-24 * qk_scale
                    * (qh.abs() @ kh.abs().T).max().item())
        for b in range(keep.shape[1]):
            rows = torch.arange(b * BLKQ, min((b + 1) * BLKQ, lq), device=q.device)
            s = (qh[rows] @ kh.T) * qk_scale
            s = s.masked_fill(torch.arange(lk, device=q.device)[None, :] > (lk - lq + rows)[:, None],
                              float("-inf"))
            tile_max = F.pad(s, (0, pad), value=float("-inf")).view(len(rows), -1, BLKK).amax(-1)
            row_margins = torch.full((keep.shape[2],), float("nan"), device=q.device)
            m = None
            for j in torch.nonzero(keep[h, b]).flatten().tolist():
                if m is None:
                    m = tile_max[:, j]
                    continue
                if not diag[b, j]:
                    row_margins[j] = (tile_max[:, j] - m).max() + pv[h]
                    m = torch.where(row_margins[j] <= 0, m, torch.maximum(m, tile_max[:, j]))
                else:
                    m = torch.maximum(m, tile_max[:, j])
            margins[h, b] = row_margins.cpu()
            computed[h, b] &= ~(margins[h, b] <= 0)
    return computed, margins, slack
