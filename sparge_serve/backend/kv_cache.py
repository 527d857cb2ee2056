"""The layer's KV cache as the kernels read it: FlashAttention's layout, bf16/fp16 or fp8.

vLLM hands each layer its cache as one ``[num_pages, 2, page, Hkv, D]`` buffer in FlashAttention's
physical order (logically ``[num_pages, Hkv, page, 2*D]`` here); :func:`kv_views` gives the K and
V views the kernels take. An fp8 cache (``--kv-cache-dtype fp8`` / ``fp8_e4m3``) is allocated as
bytes and read as ``float8_e4m3fn``, with the layer's per-tensor scales (:func:`kv_scales`), as
FlashAttention reads it. :func:`triton_dense_attention` is the dense path where FlashAttention is
not available (vLLM's Triton ``unified_attention``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm.utils.torch_utils import is_quantized_kv_cache

from sparge_serve.kernels.checks import FP8_DTYPE
from sparge_serve.kernels.geometry import KVScales

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata


def kv_cache_quantized(vllm_config: VllmConfig | None) -> bool:
    """Whether the KV cache holds fp8 (``--kv-cache-dtype fp8`` / ``fp8_e4m3``): its pages are
    read as ``float8_e4m3fn`` with the layers' per-tensor scales."""
    cc = getattr(vllm_config, "cache_config", None)
    return cc is not None and is_quantized_kv_cache(cc.cache_dtype)


def kv_views(kv_cache: torch.Tensor, head_size: int, fp8: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views ``[num_pages, page, Hkv, D]`` of a layer's cache (logical ``[num_pages,
    Hkv, page, 2*D]``), as ``float8_e4m3fn`` for an fp8 cache."""
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    if fp8:
        return key_cache.view(FP8_DTYPE), value_cache.view(FP8_DTYPE)
    return key_cache, value_cache


def kv_scales(layer: torch.nn.Module, query: torch.Tensor) -> KVScales:
    """The per-tensor scales of ``layer``'s fp8 cache, with the query's when the attention layer
    quantised it (vLLM's ``_k_scale``, ``_v_scale``, ``_q_scale``: device tensors, never read on
    the host)."""
    q_scale = layer._q_scale if query.dtype == FP8_DTYPE else None
    return KVScales(layer._k_scale, layer._v_scale, q_scale)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)``; an fp8 tensor (a quantised query) is gathered as bytes, which
    every torch build indexes."""
    if x.dtype == FP8_DTYPE:
        return x.view(torch.uint8).index_select(0, index).view(FP8_DTYPE)
    return x.index_select(0, index)


_reshape_and_cache_flash = None


def kv_cache_writer():
    """vLLM's ``reshape_and_cache_flash`` (imported on first use; it quantises to fp8 with the
    layer's scales for an fp8 cache)."""
    global _reshape_and_cache_flash
    if _reshape_and_cache_flash is None:
        from vllm._custom_ops import reshape_and_cache_flash

        _reshape_and_cache_flash = reshape_and_cache_flash
    return _reshape_and_cache_flash


def triton_dense_attention(layer: torch.nn.Module, query: torch.Tensor,
                           key_cache: torch.Tensor, value_cache: torch.Tensor,
                           md: FlashAttentionMetadata, output: torch.Tensor, scale: float,
                           sliding_window: tuple[int, int]) -> None:
    """Dense causal attention of ``md``'s batch through vLLM's Triton ``unified_attention``
    (the caches as :func:`kv_views` gives them)."""
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    n = md.num_actual_tokens
    descale_shape = (md.query_start_loc.shape[0] - 1, key_cache.shape[2])
    unified_attention(
        q=query[:n], k=key_cache, v=value_cache, out=output[:n],
        cu_seqlens_q=md.query_start_loc, max_seqlen_q=md.max_query_len,
        seqused_k=md.seq_lens, max_seqlen_k=md.max_seq_len, softmax_scale=scale,
        causal=True, window_size=sliding_window, block_table=md.block_table, softcap=0,
        q_descale=layer._q_scale if query.dtype == FP8_DTYPE else None,
        k_descale=layer._k_scale.expand(descale_shape),
        v_descale=layer._v_scale.expand(descale_shape))
