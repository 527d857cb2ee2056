"""What the SPARGE backend serves: vLLM's capability hooks, model-level and per-layer checks.

vLLM asks an attention backend about a configuration through the ``supports_*`` classmethods and
``validate_configuration`` (a list of reasons, printed at start-up when the backend is selected).
:class:`SpargeCapabilities` gives SPARGE's answers: FlashAttention's KV cache layout and dense
path, minus what the sparse kernels cannot do. Every reason names SPARGE and the feature, and
where there is one, the fix. :func:`check_layer` repeats the per-layer checks when a layer is
built (``SpargeAttentionImpl.__init__``), for layers that reach the backend without selection.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.v1.attention.backend import AttentionType

from sparge_serve.config import SpargeConfig
from sparge_serve.plugin import BACKEND_NAME

FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")
"""vLLM's names of the fp8 KV cache SPARGE serves (``float8_e4m3fn`` with per-tensor scales)."""
SUPPORTED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", *FP8_KV_CACHE_DTYPES)
KV_CACHE_DTYPES_RULE = ("auto, bfloat16, float16, and fp8 / fp8_e4m3 where FlashAttention 3 "
                        "runs (Hopper GPUs), as for FLASH_ATTN")
PREFERRED_PAGE_SIZE = 64

# The arguments of vLLM's validate_configuration that SPARGE checks itself, to word the reason
# (and name the fix): (argument, whether SPARGE serves the value, reason, a value that passes
# vLLM's own check of the argument, so that each feature is reported once).
_OWN_CHECKS: tuple[tuple[str, Any, str, Any], ...] = (
    ("kv_cache_dtype", lambda b, v: b.supports_kv_cache_dtype(v),
     f"--kv-cache-dtype {{value!s}} is not supported here; SPARGE serves {KV_CACHE_DTYPES_RULE}",
     "auto"),
    ("has_sink", lambda b, v: not v or b.supports_sink(),
     "attention sinks are not supported", False),
    ("use_mla", lambda b, v: bool(v) == b.is_mla(),
     "MLA (multi-head latent attention) models are not supported", False),
    ("use_non_causal", lambda b, v: not v or b.supports_non_causal(),
     "non-causal attention is not supported", False),
    ("use_mm_prefix", lambda b, v: not v or b.supports_mm_prefix(),
     "prefix-LM (bidirectional multimodal) attention is not supported", False),
    ("use_sparse", lambda b, v: bool(v) == b.is_sparse(),
     "models with their own sparse attention (indexer) are not supported", False),
    ("use_batch_invariant", lambda b, v: not v or b.supports_batch_invariance(),
     "VLLM_BATCH_INVARIANT is not supported", False),
    ("use_pcp", lambda b, v: not v or b.supports_pcp(),
     "prefill context parallelism is not supported", False),
    ("attn_type", lambda b, v: b.supports_attn_type(v),
     "attention type {value!s} (encoder / encoder-only / cross attention) is not supported; "
     "only decoder self-attention is", AttentionType.DECODER),
)


class SpargeCapabilities:
    """SPARGE's answers to vLLM's capability hooks (a base of ``SpargeAttentionBackend``, before
    ``FlashAttentionBackend``, whose checks it extends)."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[Any]] = list(SUPPORTED_KV_CACHE_DTYPES)

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        # NOTE: a 64-token page holds whole 64-key blocks, so the sparse kernel loads K/V with TMA
        # (about 1.5x faster than per-row gathers from 16-token pages on H200; see
        # benchmarks/results/kernels.md). Decode is a little faster on vLLM's default pages
        # (benchmarks/results/ttft.md), so when no request can take the sparse path (mode dense,
        # or max_model_len below min_sparse_len) the default stays. vLLM skips this when the user
        # passes --block-size; it sets the current config around this call.
        vllm_config = get_current_vllm_config_or_none()
        mc = vllm_config.model_config if vllm_config is not None else None
        if mc is not None:
            try:
                cfg = SpargeConfig.from_vllm_config(vllm_config)
            except ValueError:  # reported with its fix when the backend loads its settings
                return PREFERRED_PAGE_SIZE
            if not cfg.sparse_possible(mc.max_model_len):
                return default_block_size
        return PREFERRED_PAGE_SIZE

    @classmethod
    def supports_sliding_window(cls) -> bool:
        # Sliding-window layers run FlashAttention's dense path with their window.
        return True

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_per_head_quant_scales(cls) -> bool:
        return False

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype: Any) -> bool:
        # NOTE: an fp8 cache where FLASH_ATTN serves one (FA3 on Hopper): the dense path (decode,
        # short prefills, sliding-window layers) is FlashAttention's fp8 path
        if kv_cache_dtype in FP8_KV_CACHE_DTYPES:
            from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

            return FlashAttentionBackend.supports_kv_cache_dtype(kv_cache_dtype)
        return kv_cache_dtype is None or kv_cache_dtype in SUPPORTED_KV_CACHE_DTYPES

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def validate_configuration(cls, **config: Any) -> list[str]:
        """vLLM's checks plus SPARGE's model-level ones; every reason names SPARGE and the feature.

        The features of ``_OWN_CHECKS`` are checked here, through the ``supports_*`` hooks, and
        reach vLLM's checks (block size, compute capability, per-head quant scales, KV connector,
        FlashAttention's combinations) as supported values. vLLM passes every argument by name.
        """
        reasons = []
        for name, served, reason, passing in _OWN_CHECKS:
            if name in config and not served(cls, config[name]):
                reasons.append(reason.format(value=config[name]))
                config[name] = passing
        reasons += super().validate_configuration(**config)
        reasons += unsupported_model_reasons(get_current_vllm_config_or_none(),
                                             config.get("head_size"), config.get("dtype"))
        return [f"{BACKEND_NAME}: {r}" for r in dict.fromkeys(reasons)]


def unsupported_model_reasons(vllm_config: VllmConfig | None, head_size: int | None,
                              dtype: torch.dtype | None) -> list[str]:
    """Model-level features SPARGE rejects, as reasons vLLM prints at startup."""
    reasons: list[str] = []
    try:
        from sparge_serve.kernels import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
    except ImportError as e:
        return [f"the sparse kernels (sparge_serve.kernels) failed to import: {e}"]
    if head_size is not None and head_size not in SUPPORTED_HEAD_DIMS:
        reasons.append(f"head size {head_size} is not supported by the sparse kernels "
                       f"(supported: {sorted(SUPPORTED_HEAD_DIMS)})")
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {dtype} is not supported by the sparse kernels")
    mc = getattr(vllm_config, "model_config", None)
    if mc is not None:
        if mc.is_hybrid:
            reasons.append("hybrid models (attention + Mamba/linear-attention layers) are not "
                           "supported")
        if mc.use_mla:
            reasons.append("MLA (multi-head latent attention) models are not supported")
        if mc.is_encoder_decoder:
            reasons.append("encoder-decoder models (cross-attention) are not supported")
        if mc.uses_alibi:
            reasons.append("ALiBi position biases are not supported")
        if getattr(mc.hf_text_config, "attn_logit_softcapping", None):
            reasons.append("attention logit soft-capping is not supported")
    pc = getattr(vllm_config, "parallel_config", None)
    if pc is not None and getattr(pc, "decode_context_parallel_size", 1) > 1:
        reasons.append("decode context parallelism is not supported")
    return reasons


def check_layer(head_size: int, alibi_slopes: list[float] | None, kv_cache_dtype: str,
                logits_soft_cap: float | None, attn_type: str, sinks: torch.Tensor | None,
                unsupported: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming every feature of one attention layer that SPARGE cannot serve
    (the arguments of ``SpargeAttentionImpl``; ``unsupported``: options it does not know)."""
    problems = []
    if alibi_slopes is not None:
        problems.append("ALiBi position biases")
    if logits_soft_cap:
        problems.append(f"attention logit soft-capping ({logits_soft_cap})")
    if attn_type != AttentionType.DECODER:
        problems.append(f"attention type {attn_type!s} (only decoder self-attention)")
    if kv_cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        problems.append(f"kv_cache_dtype {kv_cache_dtype!r} (supported: {KV_CACHE_DTYPES_RULE})")
    if sinks is not None:
        problems.append("attention sinks")
    if unsupported:
        problems.append(f"attention options {sorted(unsupported)}")
    from sparge_serve.kernels import SUPPORTED_HEAD_DIMS

    if head_size not in SUPPORTED_HEAD_DIMS:
        problems.append(f"head size {head_size} (the sparse kernels support "
                        f"{sorted(SUPPORTED_HEAD_DIMS)})")
    if problems:
        raise ValueError(f"{BACKEND_NAME} attention backend does not support: "
                         f"{'; '.join(problems)}. Serve this model with another backend "
                         "(e.g. --attention-backend FLASH_ATTN).")
