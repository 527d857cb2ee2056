"""Per-process state of the SPARGE backend: settings and thresholds, metrics, parallel layout,
start-up kernel compilation and memory reservation.

Every layer of one process shares one :class:`SpargeRuntime` (the settings and the global
thresholds, loaded and validated once by :func:`load_runtime`; each tensor-parallel rank binds its
heads' slice, :meth:`SpargeRuntime.for_rank`) and one ``sparge_serve.metrics.SpargeStats``
(:func:`metrics_for`). The metadata builder compiles the sparse kernels at start-up
(:func:`warm_up_kernels`) and plans each step's sparse prefill with the arguments of
:func:`prefill_plan_args`; vLLM's profiling forward reserves the sparse path's worst-case scratch
(:func:`sparse_scratch_bytes`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

from sparge_serve.backend.capabilities import PREFERRED_PAGE_SIZE
from sparge_serve.backend.kv_cache import kv_cache_quantized
from sparge_serve.config import UNTUNED_THRESHOLDS, SpargeConfig
from sparge_serve.kernels.checks import FP8_DTYPE
from sparge_serve.kernels.geometry import BLKK, BLKQ, PV_SKIP_OFF
from sparge_serve.thresholds import (
    ModelGeometry,
    Thresholds,
    load_thresholds,
    model_geometry_of,
)

if TYPE_CHECKING:
    from vllm.v1.kv_cache_interface import AttentionSpec

    from sparge_serve.metrics import SpargeStats


class BoundLayer(Protocol):
    """What start-up reads of a layer bound to its thresholds (``SpargeAttentionImpl``)."""

    dense_layer: bool  # runs dense: no sparse kernels to compile or plan
    pv_skip: bool  # any head uses the PV skip
    fa3_attention: bool  # its kept blocks are attended by FA3
    supports_quant_query_input: bool  # with an fp8 KV cache, its query arrives in fp8
    num_heads: int
    num_kv_heads: int
    head_size: int

# NOTE: a child of vLLM's "vllm" logger so that our lines use vLLM's handler and level.
logger = init_logger(f"vllm.{__name__}")

# the runtime's source without a thresholds setting: every layer dense
NO_THRESHOLDS = "none"


@dataclass(frozen=True)
class SpargeRuntime:
    """What every layer of one process shares: the settings and the (global) thresholds."""

    config: SpargeConfig
    thresholds: Thresholds  # global layers x global query heads, CPU fp32
    source: str  # thresholds file path, "untuned", or NO_THRESHOLDS
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
        if vllm_config.cache_config is not None:
            cfg.check_kv_cache_dtype(vllm_config.cache_config.cache_dtype)
        args = (geo.num_layers, geo.num_heads, geo.num_kv_heads, geo.head_dim)
        if cfg.thresholds_file:
            th = load_thresholds(cfg.thresholds_file, expect=model_geometry(vllm_config))
            source = cfg.thresholds_file
        elif cfg.thresholds == UNTUNED_THRESHOLDS:
            th = Thresholds.defaults(*args, blkq=geo.blkq, blkk=geo.blkk)
            source = UNTUNED_THRESHOLDS
        else:
            th = Thresholds.dense(*args, blkq=geo.blkq, blkk=geo.blkk)
            source = NO_THRESHOLDS
            if cfg.enabled:
                logger.warning(
                    "SPARGE: no thresholds file given, so every layer attends densely "
                    "(FlashAttention). Calibrate with `sparge-calibrate` and pass "
                    "--additional-config '{\"sparge\": {\"thresholds\": \"PATH\"}}' (or "
                    "SPARGE_THRESHOLDS=PATH) for accuracy-checked sparsity; \"thresholds\": "
                    "\"untuned\" runs the published untuned SpargeAttn thresholds (they skip few "
                    "blocks of real models).")
        rt = SpargeRuntime(cfg, th, source)
        _RUNTIMES[key] = rt
        logger.info("SPARGE: mode=%s min_sparse_len=%d min_sparse_query_len=%d dense_layers=%s "
                    "topk=%s thresholds=%s%s", cfg.mode, cfg.min_sparse_len,
                    cfg.min_sparse_query_len, cfg.dense_layers, cfg.topk, source,
                    f" (sha256 {th.sha256})" if th.sha256 else "")
        return rt


def metrics_for(vllm_config: VllmConfig, runtime: SpargeRuntime,
                device: torch.device) -> SpargeStats | None:
    """This process's ``sparge_serve.metrics.SpargeStats`` (None, with a warning, if
    unavailable)."""
    try:
        from sparge_serve.metrics import get_sparge_stats
    except ImportError as e:
        logger.warning("SPARGE: metrics unavailable (%s); sparge_* series will not be exported", e)
        return None
    mc = vllm_config.model_config
    name = mc.served_model_name
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    rank, _ = tp_rank_and_size(vllm_config)
    stats = get_sparge_stats(runtime.thresholds.num_layers, device, str(name or mc.model),
                             tp_rank=rank)
    th = runtime.thresholds
    if runtime.source not in (UNTUNED_THRESHOLDS, NO_THRESHOLDS):
        # The digest of the bytes loaded: the file itself may have been replaced since.
        stats.set_thresholds_info(file=runtime.source, sha256=th.sha256,
                                  l1="" if th.l1 is None else th.l1,
                                  pv_l1="" if th.pv_l1 is None else th.pv_l1, created=th.created)
    else:
        stats.set_thresholds_info(file=runtime.source)
    return stats


def tp_rank_and_size(vllm_config: VllmConfig | None) -> tuple[int, int]:
    """This process's tensor-parallel rank and size."""
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


# vLLM's model tags (vllm.compilation.backends.set_model_tag) under which speculative-decoding
# proposers build their draft models: "draft_model", "eagle_head", "medusa_head", ...
_DRAFT_MODEL_TAGS = ("draft_model", "extract_hidden_states")


def draft_model_tag() -> str | None:
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


def fa3_serves(head_size: int) -> bool:
    """Whether vLLM's FlashAttention 3 serves this head size on this machine."""
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    return get_flash_attn_version(head_size=head_size) == 3


def fa3_configured(cfg: SpargeConfig, head_size: int) -> bool:
    """Whether layers without the PV skip attend through FA3 under ``cfg.attention_kernel``
    (``SpargeConfig.fa3_attention``), judged from the settings alone: before any layer has
    bound, or for a step without sparse layers."""
    return cfg.attention_kernel != "triton" and cfg.fa3_attention(fa3_serves(head_size))


def fp8_attention_on(vllm_config: VllmConfig, cfg: SpargeConfig) -> bool:
    """``fp8_attention`` over an fp8 KV cache, from the settings alone (:func:`fp8_products`
    also checks the layers)."""
    return cfg.fp8_attention and kv_cache_quantized(vllm_config)


def fp8_products(vllm_config: VllmConfig, cfg: SpargeConfig, sparse: list[BoundLayer]) -> bool:
    """Whether the sparse attention multiplies in fp8 (``fp8_attention``): an fp8 cache, and
    queries the layers quantise (``ValueError`` where FlashAttention is missing and they do
    not)."""
    if not fp8_attention_on(vllm_config, cfg):
        return False
    if not all(i.supports_quant_query_input for i in sparse):
        raise ValueError("SPARGE: fp8_attention needs queries quantised to fp8 by the attention "
                         "layer, which happens where FlashAttention takes fp8 (FlashAttention "
                         "3). Fix: drop fp8_attention.")
    return True


def compute_dtype(vllm_config: VllmConfig, spec: AttentionSpec) -> torch.dtype:
    """The dtype the sparse kernels compute (and write) in: the cache's, or for an fp8 cache
    (whose spec holds bytes) the model's. The memory budgets are fractions of K/V bytes in it."""
    return vllm_config.model_config.dtype if kv_cache_quantized(vllm_config) else spec.dtype


_WARMED: set[tuple[Any, ...]] = set()


def warm_up_kernels(vllm_config: VllmConfig, runtime: SpargeRuntime, spec: AttentionSpec,
                    impls: list[BoundLayer], device: torch.device) -> None:
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
    pv_variants = tuple(sorted({i.pv_skip for i in sparse}))
    fp8 = kv_cache_quantized(vllm_config)
    q_dtype = FP8_DTYPE if fp8 and first.supports_quant_query_input else None
    fp8_dot = fp8_products(vllm_config, cfg, sparse)
    key = (first.num_heads, first.num_kv_heads, first.head_size, spec.block_size, spec.dtype,
           q_dtype, fp8_dot, pv_variants, cfg.topk, cfg.attention_kernel, cfg.min_sparse_len,
           max_len, str(device))
    if key in _WARMED:
        return
    # SPARGE's KV cache layout is FlashAttention's (SpargeAttentionBackend inherits it).
    shape = FlashAttentionBackend.get_kv_cache_shape(1, spec.block_size, first.num_kv_heads,
                                                     first.head_size)
    order = FlashAttentionBackend.get_kv_cache_stride_order()
    inverse = tuple(order.index(i) for i in range(len(order)))
    kv = torch.zeros(tuple(shape[i] for i in order), dtype=spec.dtype,
                     device=device).permute(*inverse)
    if fp8:
        kv = kv.view(FP8_DTYPE)
    key_cache, value_cache = kv.transpose(1, 2).split(first.head_size, dim=-1)
    t0 = time.perf_counter()
    fa3 = any(i.fa3_attention for i in sparse)
    buckets = warm_up_sparse_kernels(key_cache, value_cache, first.num_heads, cfg.min_sparse_len,
                                     max_len, pv_variants, cfg.topk, masks=fa3,
                                     dtype=compute_dtype(vllm_config, spec), q_dtype=q_dtype,
                                     fp8_dot=fp8_dot)
    if fa3:
        from sparge_serve.kernels.fa3_tables import warm_up_virtual

        warm_up_virtual(first.num_heads, first.num_kv_heads, spec.block_size, device)
    _WARMED.add(key)
    logger.info("SPARGE: compiled the sparse kernels for contexts of %d-%d tokens (%d length "
                "buckets) in %.1f s; kept blocks attended by %s", cfg.min_sparse_len, max_len,
                len(buckets), time.perf_counter() - t0,
                "FlashAttention 3" + (" and the Triton kernel (PV-skip layers)"
                                      if any(not i.fa3_attention for i in sparse) else "")
                if fa3 else "the Triton kernel")


def prefill_plan_args(vllm_config: VllmConfig, cfg: SpargeConfig, spec: AttentionSpec,
                      impls: list[BoundLayer],
                      device: torch.device) -> dict[str, Any] | None:
    """``plan_prefill``'s arguments besides the batch, the same for every sparse layer of one
    metadata builder (None when none runs sparse): the KV-cache group's geometry (its spec), the
    model's query heads on this rank and the settings; ``attention="fa3"`` when a layer uses it
    (layers with the PV skip run the plan's Triton chunks). ``impls``: the builder's layers
    (none known: the model's geometry alone)."""
    if not cfg.sparse_possible(vllm_config.model_config.max_model_len):
        return None
    sparse = [i for i in impls if not i.dense_layer]
    if impls and not sparse:
        return None
    num_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
    geometry = {(i.num_heads, i.num_kv_heads, i.head_size) for i in sparse}
    if geometry - {(num_heads, spec.num_kv_heads, spec.head_size)}:
        raise ValueError(
            f"SPARGE: the sparse layers of one KV-cache group differ in their attention geometry "
            f"(query heads, KV heads, head size: {sorted(geometry)}; the model has {num_heads} "
            f"query heads a rank, the cache {spec.num_kv_heads} KV heads of {spec.head_size}): "
            "one prefill plan serves every layer of a step. Fix: serve this model with another "
            "backend.")
    if sparse:
        fa3 = any(i.fa3_attention for i in sparse)
    else:
        fa3 = fa3_configured(cfg, spec.head_size)
    return dict(num_heads=num_heads, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_size,
                dtype=compute_dtype(vllm_config, spec), page_size=spec.block_size, device=device,
                topk=cfg.topk, map_budget=cfg.map_budget, attention="fa3" if fa3 else "triton",
                fp8_dot=fp8_products(vllm_config, cfg, sparse))


def sparse_scratch_bytes(vllm_config: VllmConfig | None, runtime: SpargeRuntime | None,
                         num_heads: int, num_kv_heads: int, head_size: int) -> int:
    """Most device memory one layer's sparse prefill can allocate in a step (0 if none can
    run): the predictor's buffers and block map of the step's largest sparse sub-batch, in
    head chunks under ``map_budget`` (where layers attend through FA3, the larger of the FA3
    path's, with its virtual block tables, and the Triton kernel's, which layers with the PV skip
    run), plus the gathered q/out rows."""
    vc, rt = vllm_config, runtime
    if (vc is None or rt is None or not rt.config.sparse_possible(vc.model_config.max_model_len)
            or not bool(rt.thresholds.is_sparse.any())):  # e.g. no thresholds: every layer dense
        return 0
    max_len = vc.model_config.max_model_len
    from sparge_serve.kernels import prefill_scratch_bytes

    tokens = vc.scheduler_config.max_num_batched_tokens
    reqs = max(1, min(vc.scheduler_config.max_num_seqs,
                      tokens // max(rt.config.min_sparse_query_len, 2)))
    rows = 2 * tokens * num_heads * head_size * 2  # q gather + out, 16-bit
    pages = [None]
    if fa3_configured(rt.config, head_size):
        pages.append(vc.cache_config.block_size or PREFERRED_PAGE_SIZE)
    fp8_dot = fp8_attention_on(vc, rt.config)  # its K-major V copy
    return rows + max(prefill_scratch_bytes(num_heads, num_kv_heads, head_size, reqs, tokens,
                                            max_len, fa3_page_size=page,
                                            map_budget=rt.config.map_budget, fp8_dot=fp8_dot)
                      for page in pages)


@dataclass(frozen=True)
class LayerThresholds:
    """One layer's thresholds on its device, for this tensor-parallel rank's query heads."""

    index: int  # global layer index (pipeline-parallel safe)
    dense: bool  # every request runs dense: mode dense, a dense_layers entry, all heads dense
    simthreshd1: torch.Tensor  # [num_heads] fp32 device
    cdfthreshd: torch.Tensor  # [num_heads] fp32 device
    pvthreshd: torch.Tensor  # [num_heads] fp32 device
    pv_skip: bool  # host: any head of the layer uses the PV skip (pvthreshd < PV_SKIP_OFF)


def _layer_index(runtime: SpargeRuntime, layer_name: str) -> tuple[int | None, str | None]:
    """The global layer index in ``layer_name`` and None, or None and why there is none."""
    from vllm.model_executor.models.utils import extract_layer_index

    try:
        index = extract_layer_index(layer_name)
    except (AssertionError, ValueError):
        return None, f"cannot read a layer index from the name {layer_name!r}"
    num_layers = runtime.thresholds.num_layers
    if index >= num_layers:
        return None, (f"layer index {index} is beyond the thresholds' {num_layers} layers "
                      "(e.g. a speculative-decoding draft layer)")
    return index, None


def window_layer_index(runtime: SpargeRuntime, layer_name: str) -> int | None:
    """The global index of the sliding-window layer ``layer_name`` (its prefill tokens are
    counted as dense under it), or None (not counted): no thresholds are read for it."""
    return _layer_index(runtime, layer_name)[0]


def layer_thresholds(runtime: SpargeRuntime, layer_name: str, num_heads: int,
                     device: torch.device | str, vllm_config: VllmConfig | None,
                     tp: tuple[int, int] | None = None) -> LayerThresholds | None:
    """The thresholds of the layer named ``layer_name`` with ``num_heads`` query heads on this
    rank (``tp``: (rank, size), default this process's), copied to ``device``; None (with a
    warning) when the name gives no layer of the thresholds: the layer then runs dense."""
    index, reason = _layer_index(runtime, layer_name)
    if reason is not None:
        logger.warning("SPARGE: layer %s runs dense: %s", layer_name, reason)
        return None
    cfg, th = runtime.config, runtime.thresholds
    rank, size = tp if tp is not None else tp_rank_and_size(vllm_config)
    local = runtime.for_rank(rank, size)
    if local.num_heads != num_heads:
        raise ValueError(
            f"SPARGE: layer {layer_name} has {num_heads} query heads on this rank but "
            f"the thresholds give {local.num_heads} per rank ({th.num_heads} over {size} "
            "tensor-parallel ranks). Fix: use the thresholds file of this model.")
    # NOTE: copies (own allocations, 16-byte aligned on any device): kernels are specialised
    # on pointer alignment, and the warm-up compiles for aligned threshold vectors.
    # pv_skip is read from the CPU thresholds, so the kernel launch never reads pvthreshd back
    # from the GPU.
    return LayerThresholds(
        index=index,
        dense=not cfg.enabled or cfg.is_dense_layer(index) or local.layer_is_dense(index),
        simthreshd1=local.simthreshd1[index].to(device, copy=True),
        cdfthreshd=local.cdfthreshd[index].to(device, copy=True),
        pvthreshd=local.pvthreshd[index].to(device, copy=True),
        pv_skip=bool((local.pvthreshd[index] < PV_SKIP_OFF).any()))
