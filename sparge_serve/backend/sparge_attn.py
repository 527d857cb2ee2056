"""SPARGE attention backend: SpargeAttn block-sparse prefill, FlashAttention for everything else.

Select it with ``--attention-backend SPARGE`` (or ``LLM(attention_backend="SPARGE")``, or the
legacy ``VLLM_ATTENTION_BACKEND=SPARGE``); settings come from ``--additional-config
'{"sparge": {...}}'`` (see :mod:`sparge_serve.config`).

How a step runs:

- The KV cache layout is FlashAttention's (same shape, stride order and page sizes), so the KV
  write is ``reshape_and_cache_flash`` and decode / short prefills go to
  ``vllm.vllm_flash_attn.flash_attn_varlen_func`` (FA3 on Hopper), or to vLLM's Triton
  ``unified_attention`` where FlashAttention is unavailable.
- :class:`SpargeAttentionMetadataBuilder` (once per step, host data only) picks the *sparse
  sub-batch*: requests with ``query_len > 1`` (beyond spec-decode verification lengths) whose
  context ``seq_len >= min_sparse_len`` — long prefills, chunked-prefill chunks and prefix-cache
  hits alike. For the dense call their ``seq_lens`` are set to 0, so FlashAttention does no work
  for them (it writes zeros, which the sparse kernel then overwrites).
- :class:`SpargeAttentionImpl` runs the dense call for the other requests and
  ``sparge_serve.kernels.sparge_paged_prefill`` for the sparse sub-batch, with this layer's
  per-head thresholds (global layer index from the layer name: pipeline-parallel safe; heads of
  this tensor-parallel rank via ``Thresholds.for_rank``). Layers in ``dense_layers``, layers whose
  heads were all calibrated dense, ``mode: dense``, and the layers of a speculative-decoding draft
  model (built under one of vLLM's proposer model tags; their thresholds are never loaded) run the
  whole batch dense.
- Start-up: the builder compiles the sparse kernels for every context-length bucket the sparse
  path can see (``sparge_serve.kernels.warmup``), so no request pays a Triton compile; vLLM's
  profiling forward allocates the sparse path's worst-case scratch
  (:meth:`SpargeAttentionImpl.sparse_scratch_bytes`), so the KV cache is sized with room for it.

NOTE (CUDA graphs): the sparse/dense split is decided on the host per step, so it must never be
frozen into a full CUDA graph. The builder therefore declares ``UNIFORM_SINGLE_TOKEN_DECODE``:
full graphs only for pure ``query_len == 1`` decode batches (which never take the sparse path);
mixed and prefill batches run attention eagerly (piecewise mode), where the split is rebuilt
every step.

Statistics go to the process's ``sparge_serve.metrics.SpargeStats``: the kernels add block counts
into its per-layer device rows (``kernel_stats(layer)``); each layer adds the step's prompt-token
and dense-fallback counts, host integers the builder computed (``count_prefill``,
``count_fallback``); the builder calls ``maybe_flush()`` once per step. Nothing here synchronises
with the GPU. vLLM's start-up and dummy runs (memory profiling, warm-ups, CUDA-graph capture) build
metadata here like real prefills; they are not counted because the plugin runs them with the
metrics suspended (``sparge_serve.metrics.metrics_suspended``), which this module need not know.

Calibration: while ``sparge_serve.backend.capture`` has a sink installed (``sparge-calibrate
--driver vllm`` only), every layer reports its sparse sub-batch through ``capture.emit_prefill`` and
computes it dense.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from vllm.config import VllmConfig, get_current_vllm_config_or_none, get_layers_from_vllm_config
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionImpl,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from sparge_serve.backend import capture
from sparge_serve.config import SpargeConfig
from sparge_serve.thresholds import (
    DEFAULT_BLKK,
    DEFAULT_BLKQ,
    PV_OFF,
    ModelGeometry,
    Thresholds,
    load_thresholds,
    model_geometry_of,
)

if TYPE_CHECKING:
    from vllm.v1.kv_cache_interface import AttentionSpec

    from sparge_serve.kernels import PrefillBatch

# NOTE: a child of vLLM's "vllm" logger so that our lines use vLLM's handler and level.
logger = init_logger(f"vllm.{__name__}")

BACKEND_NAME = "SPARGE"
_SUPPORTED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16")


# ---------------------------------------------------------------------------------------------
# Per-process state: settings + thresholds (loaded once), metrics object
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpargeRuntime:
    """What every layer of one process shares: the settings and the (global) thresholds."""

    config: SpargeConfig
    thresholds: Thresholds  # global layers x global query heads, CPU fp32
    source: str  # thresholds file path, or "defaults"
    _by_rank: dict[tuple[int, int], Thresholds] = field(default_factory=dict, compare=False)

    def for_rank(self, tp_rank: int, tp_size: int) -> Thresholds:
        key = (tp_rank, tp_size)
        if key not in self._by_rank:
            self._by_rank[key] = self.thresholds.for_rank(tp_rank, tp_size)
        return self._by_rank[key]


_RUNTIMES: dict[tuple[Any, ...], SpargeRuntime] = {}
_RUNTIME_LOCK = threading.Lock()


def model_geometry(vllm_config: VllmConfig, with_hash: bool = True) -> ModelGeometry:
    """The served model's global attention geometry, as a thresholds file must match it."""
    try:
        from sparge_serve.kernels import BLKK, BLKQ
    except ImportError:  # kernels not importable: the file format's defaults are the same tile
        BLKQ, BLKK = DEFAULT_BLKQ, DEFAULT_BLKK
    return model_geometry_of(vllm_config.model_config, blkq=BLKQ, blkk=BLKK, with_hash=with_hash)


def load_runtime(vllm_config: VllmConfig) -> SpargeRuntime:
    """Parse the settings and load + validate the thresholds: once per process (cached).

    The file is read once; its digest (``thresholds.sha256``, exported as the ``sha256`` label
    of ``sparge_thresholds_info``) is that of the bytes loaded. Raises ``ValueError`` (bad
    settings) or ``ThresholdsError`` (bad or mismatched file) with a message that names the fix.
    The plugin runs the same checks in the front end when vLLM builds its configuration
    (``sparge_serve.plugin``), so these errors normally stop ``vllm serve`` before any worker
    starts; here they catch a file changed since.
    """
    cfg = SpargeConfig.from_vllm_config(vllm_config)
    geo = model_geometry(vllm_config, with_hash=False)
    key = (cfg, geo)
    with _RUNTIME_LOCK:
        rt = _RUNTIMES.get(key)
        if rt is not None:
            return rt
        cfg.check_num_layers(geo.num_layers)
        if cfg.thresholds:
            th = load_thresholds(cfg.thresholds, expect=model_geometry(vllm_config))
            source = cfg.thresholds
        else:
            th = Thresholds.defaults(geo.num_layers, geo.num_heads, geo.num_kv_heads,
                                     geo.head_dim, blkq=geo.blkq, blkk=geo.blkk)
            source = "defaults"
            if cfg.enabled:
                logger.warning(
                    "SPARGE: no thresholds file given; using the untuned SpargeAttn defaults "
                    "(simthreshd1=0.6, cdfthreshd=0.98, PV skip off) for every head. Calibrate "
                    "with `sparge-calibrate` and pass --additional-config "
                    "'{\"sparge\": {\"thresholds\": \"PATH\"}}' (or SPARGE_THRESHOLDS=PATH) for "
                    "accuracy-checked sparsity.")
        rt = SpargeRuntime(cfg, th, source)
        _RUNTIMES[key] = rt
        logger.info("SPARGE: mode=%s min_sparse_len=%d min_sparse_query_len=%d dense_layers=%s "
                    "topk=%s thresholds=%s%s", cfg.mode, cfg.min_sparse_len,
                    cfg.min_sparse_query_len, cfg.dense_layers, cfg.topk, source,
                    f" (sha256 {th.sha256})" if th.sha256 else "")
        return rt


def _metrics_for(vllm_config: VllmConfig, runtime: SpargeRuntime, device: torch.device):
    """This process's ``sparge_serve.metrics.SpargeStats`` (None, with a warning, if unavailable)."""
    try:
        from sparge_serve.metrics import get_sparge_stats
    except ImportError as e:
        logger.warning("SPARGE: metrics unavailable (%s); sparge_* series will not be exported", e)
        return None
    mc = vllm_config.model_config
    name = mc.served_model_name
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    rank, _ = _tp_rank_and_size(vllm_config)
    stats = get_sparge_stats(runtime.thresholds.num_layers, device, str(name or mc.model),
                             tp_rank=rank)
    th = runtime.thresholds
    if runtime.source != "defaults":
        # The digest of the bytes loaded: the file itself may have been replaced since.
        stats.set_thresholds_info(file=runtime.source, sha256=th.sha256,
                                  l1="" if th.l1 is None else th.l1,
                                  pv_l1="" if th.pv_l1 is None else th.pv_l1, created=th.created)
    else:
        stats.set_thresholds_info(file="defaults")
    return stats


# ---------------------------------------------------------------------------------------------
# Backend
# ---------------------------------------------------------------------------------------------

_GENERIC_REASONS = {
    "kv_cache_dtype not supported": "quantized (fp8) KV cache is not supported; use "
                                    "--kv-cache-dtype auto",
    "sliding window not supported": "sliding-window attention is not supported",
    "attention sinks not supported": "attention sinks are not supported",
    "MLA not supported": "MLA (multi-head latent attention) models are not supported",
    "non-causal attention not supported": "non-causal attention is not supported",
    "partial multimodal token full attention not supported":
        "prefix-LM (bidirectional multimodal) attention is not supported",
    "sparse not supported": "models with their own sparse attention (indexer) are not supported",
    "batch invariance not supported": "VLLM_BATCH_INVARIANT is not supported",
    "PCP not supported": "prefill context parallelism is not supported",
}


def _unsupported_model_reasons(vllm_config: VllmConfig | None, head_size: int | None,
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


PREFERRED_PAGE_SIZE = 64


class SpargeAttentionBackend(FlashAttentionBackend):
    """FlashAttention's KV cache layout and capabilities, minus what the sparse path cannot do."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[Any]] = list(_SUPPORTED_KV_CACHE_DTYPES)
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        # NOTE: resolved through AttentionBackendEnum["SPARGE"], an alias of CUSTOM made by
        # sparge_serve.plugin.register().
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[SpargeAttentionImpl]:
        return SpargeAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SpargeAttentionMetadataBuilder]:
        return SpargeAttentionMetadataBuilder

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
        return False

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
        return kv_cache_dtype is None or kv_cache_dtype in _SUPPORTED_KV_CACHE_DTYPES

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def validate_configuration(cls, *args: Any, **kwargs: Any) -> list[str]:
        """vLLM's checks plus SPARGE's model-level ones; every reason names SPARGE and the feature."""
        reasons = super().validate_configuration(*args, **kwargs)
        reasons = [_GENERIC_REASONS.get(r, r) for r in reasons]
        attn_type = kwargs.get("attn_type", AttentionType.DECODER)
        if not cls.supports_attn_type(attn_type):
            reasons = [r for r in reasons if not r.startswith("attention type")]
            reasons.append(f"attention type {attn_type!s} (encoder / encoder-only / cross "
                           "attention) is not supported; only decoder self-attention is")
        reasons += _unsupported_model_reasons(get_current_vllm_config_or_none(),
                                              kwargs.get("head_size"), kwargs.get("dtype"))
        return [f"{BACKEND_NAME}: {r}" for r in dict.fromkeys(reasons)]


# ---------------------------------------------------------------------------------------------
# Metadata + builder
# ---------------------------------------------------------------------------------------------


@dataclass
class SparsePrefill:
    """The step's sparse sub-batch (built once per step, shared by every layer)."""

    batch: PrefillBatch  # query_start_loc [R+1] int32, seq_lens [R] int32, block_table [R, P] int32
    token_index: torch.Tensor | None  # [num_tokens] int64 device: rows of q/out of the sparse
    # requests, in sub-batch order; None when those rows are one contiguous run, in which case
    # batch.query_start_loc holds absolute offsets into the step's q/out and nothing is copied.
    req_index: np.ndarray  # [R] int64 host: the sparse requests' rows in the step's batch
    num_tokens: int  # host: new tokens of the sparse requests


@dataclass(frozen=True)
class StepCounts:
    """Host-side counts of one step for ``sparge_serve.metrics`` (each layer adds them)."""

    sparse_tokens: int  # prompt tokens of the requests on the sparse path
    dense_tokens: int  # prompt tokens of the other prefill requests (query_len > 1)
    sparse_reqs: int  # requests on the sparse path (a dense layer runs them dense)
    fallbacks: tuple[tuple[Any, int], ...]  # (FallbackReason, requests) dense in every layer
    dense_layer_reason: Any  # FallbackReason for sparse requests run by a dense layer


@dataclass
class SpargeAttentionMetadata(FlashAttentionMetadata):
    """FlashAttention's metadata plus the sparse sub-batch.

    When ``sparse`` is set, the inherited ``seq_lens`` ([num_reqs] int32, device) are 0 for the
    sparse requests (the dense call skips them) and ``scheduler_metadata`` matches that; the
    unmodified batch for layers that run everything dense is ``all_dense``.
    """

    sparse: SparsePrefill | None = None
    # Same batch with every request dense (true seq_lens, no AOT schedule); set iff `sparse` is.
    all_dense: FlashAttentionMetadata | None = None
    # False when every request with new tokens is in `sparse` (the dense call is skipped).
    has_dense: bool = True
    # Host counts for metrics; None when there is nothing to count (decode-only, dummy, draft).
    counts: StepCounts | None = None


def select_sparse_requests(query_start_loc: np.ndarray, seq_lens: np.ndarray,
                           min_sparse_len: int, max_decode_query_len: int = 1,
                           min_sparse_query_len: int = 1) -> np.ndarray:
    """Bool mask ``[num_reqs]`` of the requests that take the sparse prefill path.

    ``query_start_loc`` ``[num_reqs + 1]`` and ``seq_lens`` ``[num_reqs]`` are host arrays; a
    request qualifies iff ``query_len > max_decode_query_len`` (a prefill / chunked prefill /
    prefix-hit extension, not a (spec-)decode), ``query_len >= min_sparse_query_len`` and
    ``seq_len >= min_sparse_len``.
    """
    query_lens = np.diff(query_start_loc)
    return ((query_lens > max_decode_query_len) & (query_lens >= min_sparse_query_len)
            & (seq_lens >= min_sparse_len))


class SpargeAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
    """FlashAttention's builder + the per-step sparse sub-batch (host-side work only)."""

    # See the module docstring: full CUDA graphs only for pure single-token decode batches.
    _cudagraph_support: ClassVar[AttentionCGSupport] = (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)
    # update_block_table() would leave the sparse sub-batch's block table stale.
    supports_update_block_table: bool = False

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.runtime = load_runtime(vllm_config)
        self.sparge_config = self.runtime.config
        spec = vllm_config.speculative_config
        num_spec = (spec.num_speculative_tokens or 0) if spec is not None else 0
        per_spec = 2 if spec is not None and getattr(spec, "parallel_drafting", False) else 1
        # Longest query a (spec-)decode row can have: such rows never take the sparse path.
        self.max_decode_query_len = 1 + per_spec * num_spec
        self.has_flash_attn = get_flash_attn_version() is not None
        from sparge_serve.kernels import BLKK, MAX_KEY_BLOCKS

        # Longest context the predictor handles; longer prefills run dense ("unsupported").
        self.max_sparse_seq_len = MAX_KEY_BLOCKS * BLKK
        self.stats = _metrics_for(vllm_config, self.runtime, device)
        self._reasons = None
        if self.stats is not None:
            from sparge_serve.metrics import FallbackReason

            self._reasons = FallbackReason
        self._counting = True
        self._warned_no_cpu_seq_lens = False
        impls = self._bind_layers(vllm_config, layer_names, device)
        if device.type == "cuda":
            _warm_up_kernels(vllm_config, self.runtime, kv_cache_spec, impls, device)

    def _bind_layers(self, vllm_config: VllmConfig, layer_names: list[str],
                     device: torch.device) -> None:
        from vllm.model_executor.layers.attention import Attention

        impls = []
        for name, layer in get_layers_from_vllm_config(vllm_config, Attention,
                                                       layer_names).items():
            if isinstance(layer.impl, SpargeAttentionImpl):
                layer.impl.bind(name, device, self.stats)
                impls.append(layer.impl)
        return impls

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata):
        # Dummy batches: their tokens are not counted.
        self._counting = False
        try:
            return super().build_for_cudagraph_capture(common_attn_metadata)
        finally:
            self._counting = True

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> SpargeAttentionMetadata:
        cam = common_attn_metadata
        count = self._counting and not fast_build and self.stats is not None
        if count:
            self.stats.maybe_flush()  # cheap; never waits for the GPU
        if not self.has_flash_attn:
            common_prefix_len = 0  # the Triton fallback has no cascade attention
        plan, counts = None, None
        if cam.max_query_len > self.max_decode_query_len:  # O(1) exit for decode-only steps
            plan, counts = self._plan(cam, count)
        if plan is None:
            md = super().build(common_prefix_len, cam, fast_build)
            return SpargeAttentionMetadata(**vars(md), counts=counts)
        sparse, dense_seq_lens, has_dense = plan
        # NOTE: the dense call sees seq_len 0 for the sparse requests (and the AOT schedule is
        # computed for exactly that), so it spends no work on them; cascade is off for the step.
        md = super().build(0, cam.replace(seq_lens=dense_seq_lens), fast_build)
        all_dense = copy.copy(md)
        all_dense.seq_lens = cam.seq_lens
        all_dense.scheduler_metadata = None  # the AOT schedule above is for the dense subset
        return SpargeAttentionMetadata(**vars(md), sparse=sparse, all_dense=all_dense,
                                       has_dense=has_dense, counts=counts)

    def _plan(self, cam: CommonAttentionMetadata, count: bool
              ) -> tuple[tuple[SparsePrefill, torch.Tensor, bool] | None, StepCounts | None]:
        """Host-side split of the step into the sparse sub-batch and the rest (no GPU sync)."""
        num_reqs = cam.num_reqs
        qsl = cam.query_start_loc_cpu[: num_reqs + 1].numpy().astype(np.int64)
        query_lens = np.diff(qsl)
        prompt = query_lens > self.max_decode_query_len
        if not prompt.any():
            return None, None
        cfg = self.sparge_config
        seq_cpu = cam.seq_lens_cpu_upper_bound
        if seq_cpu is None:
            seq_cpu = cam._seq_lens_cpu  # exact host copy where the runner kept one
        eligible = None  # long prefills, whatever the mode
        too_long = None  # beyond the kernels' context limit
        if seq_cpu is not None:
            # NOTE: seq_lens_cpu_upper_bound is exact for prefill rows, the only ones used here.
            seq_np = seq_cpu[:num_reqs].numpy()
            eligible = select_sparse_requests(qsl, seq_np, cfg.min_sparse_len,
                                              self.max_decode_query_len,
                                              cfg.min_sparse_query_len)
            too_long = eligible & (seq_np > self.max_sparse_seq_len)
            if too_long.any():
                eligible = eligible & ~too_long
                logger.warning_once("SPARGE: contexts longer than %d tokens run dense (the "
                                    "predictor's limit)", self.max_sparse_seq_len)
        elif cfg.sparse_possible(cam.max_seq_len) and (
                not self._warned_no_cpu_seq_lens):
            self._warned_no_cpu_seq_lens = True
            logger.warning("SPARGE: a step without a host copy of seq_lens; its long prefills "
                           "run dense (reading seq_lens from the GPU would stall)")
        sparse_mask = eligible if cfg.enabled and eligible is not None and eligible.any() else None

        counts = None
        if count:
            R = self._reasons
            num_sparse_tokens = int(query_lens[sparse_mask].sum()) if sparse_mask is not None else 0
            fallbacks = []
            if eligible is None:
                fallbacks.append((R.UNSUPPORTED, int(prompt.sum())))
            else:
                fallbacks.append((R.UNSUPPORTED, int(too_long.sum())))
                fallbacks.append((R.SHORT_PROMPT, int((prompt & ~eligible & ~too_long).sum())))
                if not cfg.enabled:
                    fallbacks.append((R.MODE_DENSE, int(eligible.sum())))
            counts = StepCounts(
                sparse_tokens=num_sparse_tokens,
                dense_tokens=int(query_lens[prompt].sum()) - num_sparse_tokens,
                sparse_reqs=int(sparse_mask.sum()) if sparse_mask is not None else 0,
                fallbacks=tuple((r, n) for r, n in fallbacks if n),
                dense_layer_reason=R.DENSE_LAYER)
        if sparse_mask is None:
            return None, counts

        from sparge_serve.kernels import PrefillBatch

        req_index = np.flatnonzero(sparse_mask)
        num_sparse = len(req_index)
        sparse_qlens = query_lens[req_index]
        num_tokens = int(sparse_qlens.sum())
        max_query_len = int(sparse_qlens.max())
        max_seq_len = int(seq_np[req_index].max())
        has_dense = bool((query_lens[~sparse_mask] > 0).any())
        first, last = int(req_index[0]), int(req_index[-1])
        if last - first + 1 == num_sparse:
            # One contiguous run of requests: views only, absolute token offsets.
            batch = PrefillBatch(
                query_start_loc=cam.query_start_loc[first : last + 2],
                seq_lens=cam.seq_lens[first : last + 1],
                block_table=cam.block_table_tensor[first : last + 1],
                max_query_len=max_query_len, max_seq_len=max_seq_len)
            token_index = None
            dense_seq_lens = cam.seq_lens.clone()
            dense_seq_lens[first : last + 1] = 0
        else:
            device = cam.seq_lens.device
            sub_qsl = np.zeros(num_sparse + 1, dtype=np.int32)
            np.cumsum(sparse_qlens, out=sub_qsl[1:])
            # token i of the k-th sparse request sits at qsl[req_index[k]] + i
            tokens = (np.repeat(qsl[req_index] - sub_qsl[:-1], sparse_qlens)
                      + np.arange(num_tokens, dtype=np.int64))
            req_index_dev = torch.from_numpy(req_index).to(device, non_blocking=True)
            batch = PrefillBatch(
                query_start_loc=torch.from_numpy(sub_qsl).to(device, non_blocking=True),
                seq_lens=cam.seq_lens.index_select(0, req_index_dev),
                block_table=cam.block_table_tensor.index_select(0, req_index_dev),
                max_query_len=max_query_len, max_seq_len=max_seq_len)
            token_index = torch.from_numpy(tokens).to(device, non_blocking=True)
            dense_seq_lens = cam.seq_lens.index_fill(0, req_index_dev, 0)
        sparse = SparsePrefill(batch=batch, token_index=token_index, req_index=req_index,
                               num_tokens=num_tokens)
        return (sparse, dense_seq_lens, has_dense), counts


# ---------------------------------------------------------------------------------------------
# Impl
# ---------------------------------------------------------------------------------------------

_reshape_and_cache_flash = None


def _kv_cache_writer():
    global _reshape_and_cache_flash
    if _reshape_and_cache_flash is None:
        from vllm._custom_ops import reshape_and_cache_flash

        _reshape_and_cache_flash = reshape_and_cache_flash
    return _reshape_and_cache_flash


_WARMED: set[tuple[Any, ...]] = set()


def _warm_up_kernels(vllm_config: VllmConfig, runtime: SpargeRuntime, spec: AttentionSpec,
                     impls: list[SpargeAttentionImpl], device: torch.device) -> None:
    """Compile the sparse kernels at start-up for every context the sparse path can see.

    NOTE: once per process and kernel variant; without it the first long prompt of each length
    bucket pays several seconds of Triton compilation in its time to first token.
    """
    sparse = [i for i in impls if not i.dense_layer]
    cfg = runtime.config
    max_len = vllm_config.model_config.max_model_len
    if not sparse or not cfg.sparse_possible(max_len):
        return
    from sparge_serve.kernels.warmup import warm_up_sparse_kernels

    first = sparse[0]
    pv_variants = tuple(sorted({i._pv_skip for i in sparse}))
    key = (first.num_heads, first.num_kv_heads, first.head_size, spec.block_size, spec.dtype,
           pv_variants, cfg.topk, cfg.fused, cfg.attention_kernel, cfg.min_sparse_len, max_len,
           str(device))
    if key in _WARMED:
        return
    shape = SpargeAttentionBackend.get_kv_cache_shape(1, spec.block_size, first.num_kv_heads,
                                                      first.head_size)
    order = SpargeAttentionBackend.get_kv_cache_stride_order()
    inverse = tuple(order.index(i) for i in range(len(order)))
    kv = torch.zeros(tuple(shape[i] for i in order), dtype=spec.dtype,
                     device=device).permute(*inverse)
    key_cache, value_cache = kv.transpose(1, 2).split(first.head_size, dim=-1)
    t0 = time.perf_counter()
    fa3 = any(i.fa3_attention for i in sparse)
    buckets = warm_up_sparse_kernels(key_cache, value_cache, first.num_heads, cfg.min_sparse_len,
                                     max_len, pv_variants, cfg.topk, cfg.fused, masks=fa3)
    if fa3:
        from sparge_serve.kernels.virtual import warm_up_virtual

        warm_up_virtual(first.num_heads, first.num_kv_heads, spec.block_size, device)
    _WARMED.add(key)
    logger.info("SPARGE: compiled the sparse kernels for contexts of %d-%d tokens (%d length "
                "buckets) in %.1f s", cfg.min_sparse_len, max_len, len(buckets),
                time.perf_counter() - t0)


# vLLM's model tags (vllm.compilation.backends.set_model_tag) under which speculative-decoding
# proposers build their draft models: "draft_model", "eagle_head", "medusa_head", ...
_DRAFT_MODEL_TAGS = ("draft_model", "extract_hidden_states")


def _draft_model_tag() -> str | None:
    """The model tag if the layer being built belongs to a speculative-decoding draft model.

    NOTE: a draft model is another model (its own layers, heads and weights): the target's
    thresholds do not apply to it, and validating them against it would fail the start-up. Its
    layers run dense. vLLM builds draft models only inside ``set_model_tag(...)``.
    """
    try:
        from vllm.compilation import backends
    except ImportError:  # pragma: no cover - vLLM always has it
        return None
    tag = getattr(backends, "model_tag", "backbone")
    return tag if tag in _DRAFT_MODEL_TAGS or tag.endswith("_head") else None


def _tp_rank_and_size(vllm_config: VllmConfig | None) -> tuple[int, int]:
    try:
        from vllm.distributed.parallel_state import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except AssertionError:  # no process groups (unit tests): only valid without TP
        tp = vllm_config.parallel_config.tensor_parallel_size if vllm_config else 1
        if tp != 1:
            raise RuntimeError("SPARGE: tensor parallelism configured but its process group "
                               "is not initialised") from None
        return 0, 1


class SpargeAttentionImpl(AttentionImpl[SpargeAttentionMetadata]):
    """KV write + dense attention (FlashAttention / Triton) + the sparse prefill kernels."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **unsupported: Any,
    ) -> None:
        problems = []
        if alibi_slopes is not None:
            problems.append("ALiBi position biases")
        if sliding_window is not None:
            problems.append(f"sliding-window attention (window {sliding_window})")
        if logits_soft_cap:
            problems.append(f"attention logit soft-capping ({logits_soft_cap})")
        if attn_type != AttentionType.DECODER:
            problems.append(f"attention type {attn_type!s} (only decoder self-attention)")
        if kv_cache_dtype not in _SUPPORTED_KV_CACHE_DTYPES:
            problems.append(f"kv_cache_dtype {kv_cache_dtype!r} (use --kv-cache-dtype auto)")
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
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        # FlashAttentionImpl's attributes for the features rejected above (read by vLLM tools).
        self.sliding_window = (-1, -1)
        self.logits_soft_cap = 0.0
        self.alibi_slopes = None
        self.sinks = None

        vllm_config = get_current_vllm_config_or_none()
        self._vllm_config = vllm_config
        self.draft_tag = _draft_model_tag()  # set: a speculative-decoding draft layer (dense)
        # Settings and thresholds: loaded and validated against the model once per process.
        has_model = (vllm_config is not None and vllm_config.model_config is not None
                     and self.draft_tag is None)
        self.runtime: SpargeRuntime | None = load_runtime(vllm_config) if has_model else None
        self._fa: FlashAttentionImpl | None = None
        if get_flash_attn_version(head_size=head_size) is not None:
            self._fa = FlashAttentionImpl(num_heads, head_size, scale, num_kv_heads, None, None,
                                          kv_cache_dtype, None, attn_type,
                                          kv_sharing_target_layer_name)
        else:
            logger.info_once("SPARGE: FlashAttention unavailable; dense attention uses vLLM's "
                             "Triton unified_attention")
        # Set by bind() (from the metadata builder, once the model is loaded).
        self.layer_name: str | None = None
        self.layer_index: int | None = None  # global layer index (None: runs dense, uncounted)
        self.dense_layer = True
        self.topk: float | None = None
        self.fused = False  # select + attend in one kernel (SpargeConfig.fused)
        self.map_budget: float | None = None  # head chunks' memory bound (SpargeConfig.map_budget)
        self.fa3_attention = False  # kept blocks attended by FA3 (SpargeConfig.attention_kernel)
        self._simthreshd1: torch.Tensor | None = None  # [num_heads] fp32 device
        self._cdfthreshd: torch.Tensor | None = None  # [num_heads] fp32 device
        self._pvthreshd: torch.Tensor | None = None  # [num_heads] fp32 device
        self._pv_skip = False  # host: any head of this layer with pvthreshd < 50
        self._stats = None  # sparge_serve.metrics.SpargeStats
        self._scratch_reserved = False  # the profiling forward reserved the sparse scratch

    def bind(self, layer_name: str, device: torch.device, stats: Any = None,
             runtime: SpargeRuntime | None = None, tp: tuple[int, int] | None = None) -> None:
        """Attach this layer's thresholds (on ``device``) and the metrics object; idempotent.

        Called by the metadata builder for each of its layers. ``runtime``/``tp`` override the
        process defaults (tests).
        """
        from vllm.model_executor.models.utils import extract_layer_index

        if self.draft_tag is not None:
            logger.info_once("SPARGE: speculative-decoding draft model (%s) layers run dense",
                             self.draft_tag)
            self.layer_name, self._stats = layer_name, None
            self.layer_index, self.dense_layer = None, True
            return
        runtime = runtime or self.runtime
        if runtime is None:
            raise RuntimeError("SPARGE: bind() needs the sparge runtime (no vLLM config was "
                               "current when the layer was built)")
        self.runtime = runtime
        self.layer_name = layer_name
        self._stats = stats
        try:
            index = extract_layer_index(layer_name)
        except (AssertionError, ValueError):
            index = None
        cfg, th = runtime.config, runtime.thresholds
        reason = None
        if index is None:
            reason = f"cannot read a layer index from the name {layer_name!r}"
        elif index >= th.num_layers:
            reason = (f"layer index {index} is beyond the thresholds' {th.num_layers} layers "
                      "(e.g. a speculative-decoding draft layer)")
        if reason is not None:
            logger.warning("SPARGE: layer %s runs dense: %s", layer_name, reason)
            self.layer_index, self.dense_layer = None, True
            return
        rank, size = tp if tp is not None else _tp_rank_and_size(self._vllm_config)
        local = runtime.for_rank(rank, size)
        if local.num_heads != self.num_heads:
            raise ValueError(
                f"SPARGE: layer {layer_name} has {self.num_heads} query heads on this rank but "
                f"the thresholds give {local.num_heads} per rank ({th.num_heads} over {size} "
                "tensor-parallel ranks). Fix: use the thresholds file of this model.")
        self.layer_index = index
        self.dense_layer = (not cfg.enabled or cfg.is_dense_layer(index)
                            or local.layer_is_dense(index))
        self.topk = cfg.topk
        self.fused = cfg.fused
        self.map_budget = cfg.map_budget
        # NOTE: copies (own allocations, 16-byte aligned on any device): kernels are specialised
        # on pointer alignment, and the warm-up compiles for aligned threshold vectors
        self._simthreshd1 = local.simthreshd1[index].to(device, copy=True)
        self._cdfthreshd = local.cdfthreshd[index].to(device, copy=True)
        self._pvthreshd = local.pvthreshd[index].to(device, copy=True)
        # Host-side (CPU thresholds): whether any head of this layer uses the PV skip, so the
        # kernel launch never reads pvthreshd back from the GPU.
        self._pv_skip = bool((local.pvthreshd[index] < PV_OFF).any())
        # FA3 has no PV skip: such layers keep the Triton kernel (one note per process)
        self.fa3_attention = cfg.attention_kernel == "fa3" and not self._pv_skip
        if cfg.attention_kernel == "fa3" and (
                self._fa is None or get_flash_attn_version(head_size=self.head_size) != 3):
            raise ValueError("SPARGE: attention_kernel \"fa3\" needs FlashAttention 3 (a Hopper "
                             "GPU and vLLM's vllm_flash_attn). Fix: use \"attention_kernel\": "
                             "\"triton\".")
        if cfg.attention_kernel == "fa3" and self._pv_skip:
            logger.info_once("SPARGE: layers whose thresholds use the PV skip keep the Triton "
                             "attention kernel (attention_kernel fa3 has no PV skip)")

    # ---- KV cache ------------------------------------------------------------------------------
    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        # Same as FlashAttention: (B, H, N, 2*D) -> K, V views (B, N, H, D); padded tokens are
        # dropped by reshape_and_cache_flash through slot_mapping's length.
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        _kv_cache_writer()(key, value, key_cache, value_cache, slot_mapping,
                           self.kv_cache_dtype, layer._k_scale, layer._v_scale)

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: SpargeAttentionMetadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query ``[num_tokens, Hq, D]``, kv_cache ``[num_blocks, Hkv, block_size, 2*D]``
        (logical), output ``[num_tokens, Hq, D]`` written in place and returned.

        NOTE: eager in piecewise CUDA-graph mode: keep host work minimal (all decisions were made
        in the builder).
        """
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{BACKEND_NAME}: fused output quantization is not "
                                      "supported")
        if attn_metadata is None:  # profiling run
            self._reserve_sparse_scratch(query)
            return output.fill_(0)
        sparse = attn_metadata.sparse
        run_sparse = sparse is not None and not self.dense_layer
        if sparse is not None and capture.get_sink() is not None:
            # Calibration (sparge-calibrate --driver vllm): report the sparse sub-batch, then
            # run it dense so every layer sees the dense model's activations.
            self._emit_capture(query, kv_cache, sparse)
            run_sparse = False
        if sparse is None:
            self._dense(layer, query, key, value, kv_cache, attn_metadata, output)
        elif not run_sparse:
            self._dense(layer, query, key, value, kv_cache, attn_metadata.all_dense, output)
        else:
            if attn_metadata.has_dense:
                self._dense(layer, query, key, value, kv_cache, attn_metadata, output)
            self._sparse(query, kv_cache, sparse, output)
        counts = attn_metadata.counts
        if counts is not None and self._stats is not None and self.layer_index is not None:
            self._count(counts, run_sparse)
        return output

    def sparse_scratch_bytes(self, device: torch.device | str = "cpu") -> int:
        """Most device memory one layer's sparse prefill can allocate in a step on ``device`` (0
        if none can run): the predictor's buffers and block map (or, with ``fused``, the fused
        kernel's per-program lists) of the step's largest sparse sub-batch, in head chunks under
        ``map_budget`` (with ``attention_kernel: fa3``, with the FA3 path's virtual block
        tables), plus the gathered q/out rows."""
        vc, rt = self._vllm_config, self.runtime
        if vc is None or rt is None or not rt.config.sparse_possible(vc.model_config.max_model_len):
            return 0
        max_len = vc.model_config.max_model_len
        from sparge_serve.kernels import max_fused_programs, prefill_scratch_bytes

        tokens = vc.scheduler_config.max_num_batched_tokens
        reqs = max(1, min(vc.scheduler_config.max_num_seqs,
                          tokens // max(rt.config.min_sparse_query_len, 2)))
        rows = 2 * tokens * self.num_heads * self.head_size * 2  # q gather + out, 16-bit
        programs = max_fused_programs(device) if rt.config.fused else None
        page = None
        if rt.config.attention_kernel == "fa3":
            page = vc.cache_config.block_size or PREFERRED_PAGE_SIZE
        return rows + prefill_scratch_bytes(
            self.num_heads, self.num_kv_heads, self.head_size, reqs, tokens, max_len, programs,
            fa3_page_size=page, map_budget=rt.config.map_budget)

    def _reserve_sparse_scratch(self, query: torch.Tensor) -> None:
        # NOTE: vLLM sizes the KV cache from the peak memory of its profiling forward, where
        # attention does no work; allocating (and freeing) the sparse path's worst case here puts
        # it into that peak, so a long prefill never runs out of memory at serving time. Once per
        # layer (the memory profile is the first metadata-less forward), never in a graph capture.
        if self._scratch_reserved or not query.is_cuda:
            return
        if torch.cuda.is_current_stream_capturing():
            return
        self._scratch_reserved = True
        n = self.sparse_scratch_bytes(query.device)
        if n:
            torch.empty(n, dtype=torch.uint8, device=query.device)

    def _emit_capture(self, query: torch.Tensor, kv_cache: torch.Tensor,
                      sparse: SparsePrefill) -> None:
        if self.layer_index is None:
            return
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        batch = sparse.batch
        if sparse.token_index is None:
            q = query
        else:
            q = query.index_select(0, sparse.token_index)
        capture.emit_prefill(self.layer_index, q, key_cache, value_cache, batch, self.scale,
                             self.layer_name or "")

    def _count(self, c: StepCounts, ran_sparse: bool) -> None:
        st, layer = self._stats, self.layer_index
        if ran_sparse:
            st.count_prefill(layer, c.sparse_tokens, c.dense_tokens)
        else:
            st.count_prefill(layer, 0, c.sparse_tokens + c.dense_tokens)
            if c.sparse_reqs:
                st.count_fallback(c.dense_layer_reason, c.sparse_reqs)
        for reason, n in c.fallbacks:
            st.count_fallback(reason, n)

    def _dense(self, layer, query, key, value, kv_cache, md: FlashAttentionMetadata,
               output: torch.Tensor) -> None:
        if self._fa is not None:
            self._fa.forward(layer, query, key, value, kv_cache, md, output)
            return
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention

        n = md.num_actual_tokens
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        descale_shape = (md.query_start_loc.shape[0] - 1, self.num_kv_heads)
        unified_attention(
            q=query[:n], k=key_cache, v=value_cache, out=output[:n],
            cu_seqlens_q=md.query_start_loc, max_seqlen_q=md.max_query_len,
            seqused_k=md.seq_lens, max_seqlen_k=md.max_seq_len, softmax_scale=self.scale,
            causal=True, window_size=(-1, -1), block_table=md.block_table, softcap=0,
            q_descale=None, k_descale=layer._k_scale.expand(descale_shape),
            v_descale=layer._v_scale.expand(descale_shape))

    def _sparse(self, query: torch.Tensor, kv_cache: torch.Tensor, sparse: SparsePrefill,
                output: torch.Tensor) -> None:
        if self._simthreshd1 is None:
            raise RuntimeError(f"SPARGE: layer {self.layer_name or '?'} was never bound to its "
                               "thresholds (SpargeAttentionMetadataBuilder binds its layers)")
        from sparge_serve.kernels import sparge_paged_prefill

        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        if sparse.token_index is None:
            q, out = query, output  # batch.query_start_loc holds absolute offsets
        else:
            q = query.index_select(0, sparse.token_index)
            out = torch.empty_like(q)
        st = self._stats
        block_stats = st.kernel_stats(self.layer_index) if st is not None else None
        timing = st.start_timing() if st is not None else None
        # NOTE: check_finite=False: the thresholds were validated at load; the check would sync.
        # NOTE: one kernel when fused (no predictor time of its own); else the two stages, one
        # head chunk at a time where the block map would pass its memory budget (the predictor
        # time is then not separated)
        sparge_paged_prefill(q, key_cache, value_cache, sparse.batch, self.scale,
                             self._simthreshd1, self._cdfthreshd, self._pvthreshd, out,
                             self.topk, block_stats, check_finite=False, pv_skip=self._pv_skip,
                             fused=self.fused, attention="fa3" if self.fa3_attention else "triton",
                             map_budget=self.map_budget,
                             on_predicted=None if timing is None else timing.predictor_done)
        if timing is not None:
            timing.done()
        if sparse.token_index is not None:
            output.index_copy_(0, sparse.token_index, out)
