"""Compile the sparse-prefill kernels ahead of the first long prompt.

Triton compiles a kernel the first time it meets a new set of compile-time arguments. For the
sparse path those are fixed by the model and the cache (head dim, GQA group, page size, layout,
dtype, PV skip on/off, top-k vs CDF) except one: the selection kernel's key-block tile
(``NKB_PAD``, the context's key-block count rounded up to a power of two). Lengths are otherwise
never specialised on (``NQB`` and the block-table stride are ``do_not_specialize``; per-key-block
buffers are padded to 16 blocks).

:func:`warm_up_sparse_kernels` runs one tiny prefill per ``NKB_PAD`` bucket that a context between
``min_seq_len`` and ``max_seq_len`` can hit, so serving never compiles (a compile takes seconds:
the first long prompt's time to first token would pay it). The warm-up reads a single page: every
block-table entry points to page 0 of a caller-built cache with the serving layout.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sparge_serve.kernels.attention import sparse_paged_attention
from sparge_serve.kernels.checks import FP8_DTYPE
from sparge_serve.kernels.geometry import (
    BLKK,
    BLKQ,
    MAX_KEY_BLOCKS,
    KVScales,
    PrefillBatch,
    num_blocks,
    selection_tile,
)
from sparge_serve.kernels.predictor import predict_block_map


def nkb_pad_buckets(min_seq_len: int, max_seq_len: int) -> list[int]:
    """Every ``NKB_PAD`` (power of two >= 16 key blocks) of a context in [min, max] tokens."""
    hi = min(max_seq_len, MAX_KEY_BLOCKS * BLKK)
    lo = max(1, min_seq_len)
    if lo > hi:
        return []
    buckets, b = [], selection_tile(num_blocks(lo, BLKK))
    while b <= selection_tile(num_blocks(hi, BLKK)):
        buckets.append(b)
        b *= 2
    return buckets


def warm_up_sparse_kernels(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    num_heads: int,
    min_seq_len: int,
    max_seq_len: int,
    pv_skip_variants: Iterable[bool] = (False,),
    topk: float | None = None,
    masks: bool = False,
    dtype: torch.dtype | None = None,
    q_dtype: torch.dtype | None = None,
    fp8_dot: bool = False,
) -> list[int]:
    """Compile the predictor and attention kernels for contexts of ``min..max`` tokens;
    ``masks``: also the predictor's bit-set maps (the FA3 attention path's;
    ``fa3.warm_up_virtual`` compiles its table kernel).

    ``key_cache``/``value_cache``: ``[num_pages >= 1, page, Hkv, D]`` views with the serving
    layout and dtype (only page 0 is read); ``dtype``: the model's (default: the cache's; needed
    for an fp8 cache), ``q_dtype``: the query's as served (default ``dtype``; fp8 where the
    attention layer quantises it), ``fp8_dot``: the attention's fp8 products. Returns the
    ``NKB_PAD`` buckets compiled. Synchronises with the device (start-up only).
    """
    dev = key_cache.device
    dtype = dtype or key_cache.dtype
    q_dtype = q_dtype or dtype
    _, page, _, head_dim = key_cache.shape
    buckets = nkb_pad_buckets(min_seq_len, max_seq_len)
    variants = sorted(set(pv_skip_variants))
    q = torch.zeros(BLKQ, num_heads, head_dim, dtype=q_dtype, device=dev)
    out = torch.empty(q.shape, dtype=dtype, device=dev)
    head = lambda x: torch.full((num_heads,), x, dtype=torch.float32, device=dev)  # noqa: E731
    scales = None
    if key_cache.dtype == FP8_DTYPE:
        one = torch.ones(1, dtype=torch.float32, device=dev)
        scales = KVScales(one, one, one if q_dtype == FP8_DTYPE else None)
    for nkb_pad in buckets:
        seq_len = min(max_seq_len, nkb_pad * BLKK, MAX_KEY_BLOCKS * BLKK)
        batch = PrefillBatch(
            query_start_loc=torch.tensor([0, BLKQ], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([seq_len], dtype=torch.int32, device=dev),
            block_table=torch.zeros(1, num_blocks(seq_len, page), dtype=torch.int32, device=dev),
            max_query_len=BLKQ, max_seq_len=seq_len,
        )
        # NOTE: cdfthreshd 0 keeps only forced blocks: the attention pass stays short
        bm = predict_block_map(q, key_cache, batch, 1.0, head(0.6), head(0.0), topk,
                               scales=scales)
        if masks:
            predict_block_map(q, key_cache, batch, 1.0, head(0.6), head(0.0), topk,
                              as_mask=True, scales=scales)
        for pv_skip in variants:
            sparse_paged_attention(q, key_cache, value_cache, batch, bm, 1.0,
                                   head(8.0 if pv_skip else 50.0), out, pv_skip=pv_skip,
                                   scales=scales, fp8_dot=fp8_dot)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return buckets


__all__ = ["nkb_pad_buckets", "warm_up_sparse_kernels"]
