"""Builders of varlen prefill batches over a shuffled paged KV cache, for kernel tests/benchmarks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparge_serve.kernels import PrefillBatch, num_blocks


@dataclass
class PagedCase:
    q: torch.Tensor  # [num_tokens, Hq, D]
    key_cache: torch.Tensor  # [num_pages, page, Hkv, D]
    value_cache: torch.Tensor
    batch: PrefillBatch
    scale: float

    def request_kv(self, r: int):
        """Contiguous k, v [seq_len, Hkv, D] and q [query_len, Hq, D] of request r."""
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


def head_vec(value: float, num_heads: int, device="cpu") -> torch.Tensor:
    return torch.full((num_heads,), float(value), dtype=torch.float32, device=device)
