"""The SPARGE attention backend: SpargeAttn block-sparse prefill, FlashAttention for the rest.

:class:`SpargeAttentionBackend` (FlashAttention's KV cache layout; capability hooks in
:mod:`~sparge_serve.backend.capabilities`), :class:`SpargeAttentionMetadata` (FlashAttention's
metadata plus the step's sparse sub-batch and its prefill plan),
:class:`SpargeAttentionMetadataBuilder` (once per step, no GPU sync: the split of
:mod:`~sparge_serve.backend.split` and ``plan_prefill``) and :class:`SpargeAttentionImpl` (the KV
write, the dense call and the sparse prefill's launches, ``run_prefill``). The
state they share per process is in :mod:`~sparge_serve.backend.runtime`; how a step runs is
described in :mod:`sparge_serve.backend`.

NOTE (CUDA graphs): the sparse/dense split is decided on the host per step, so it must never be
frozen into a full CUDA graph. The builder therefore declares ``UNIFORM_SINGLE_TOKEN_DECODE``:
full graphs only for pure ``query_len == 1`` decode batches (which never take the sparse path);
mixed and prefill batches run attention eagerly (piecewise mode), where the split is rebuilt
every step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from vllm.config import VllmConfig, get_current_vllm_config_or_none, get_layers_from_vllm_config
from vllm.logger import init_logger
from vllm.utils.torch_utils import is_quantized_kv_cache
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
from sparge_serve.backend.capabilities import SpargeCapabilities, check_layer
from sparge_serve.backend.kv_cache import (
    gather_rows,
    kv_cache_writer,
    kv_scales,
    kv_views,
    triton_dense_attention,
)
from sparge_serve.backend.runtime import (
    SpargeRuntime,
    draft_model_tag,
    fa3_serves,
    layer_thresholds,
    load_runtime,
    metrics_for,
    prefill_plan_args,
    sparse_scratch_bytes,
    warm_up_kernels,
    window_layer_index,
)
from sparge_serve.backend.split import (
    SparsePrefill,
    StepCounts,
    StepSplits,
    sparse_sub_batch,
)
from sparge_serve.plugin import BACKEND_NAME

if TYPE_CHECKING:
    from vllm.v1.kv_cache_interface import AttentionSpec

    from sparge_serve.kernels.plan import PrefillPlan

# NOTE: a child of vLLM's "vllm" logger so that our lines use vLLM's handler and level.
logger = init_logger(f"vllm.{__name__}")


class SpargeAttentionBackend(SpargeCapabilities, FlashAttentionBackend):
    """FlashAttention's KV cache layout and capabilities, minus what the sparse path cannot do."""

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


@dataclass
class SpargeAttentionMetadata(FlashAttentionMetadata):
    """FlashAttention's metadata plus the sparse sub-batch.

    When ``sparse`` is set, the inherited ``seq_lens`` ([num_reqs] int32, device) are 0 for the
    sparse requests (the dense call skips them) and ``scheduler_metadata`` matches that; the
    unmodified batch for layers that run everything dense is ``all_dense``.
    """

    sparse: SparsePrefill | None = None
    # The sparse sub-batch's prefill plan (sparge_serve.kernels.plan.plan_prefill), made once per
    # step for every sparse layer of this builder; set iff `sparse` is and a layer runs sparse.
    plan: PrefillPlan | None = None
    # Same batch with every request dense (true seq_lens, no AOT schedule); set iff `sparse` is.
    all_dense: FlashAttentionMetadata | None = None
    # False when every request with new tokens is in `sparse` (the dense call is skipped).
    has_dense: bool = True
    # Host counts for metrics; None when there is nothing to count (decode-only, dummy, draft).
    counts: StepCounts | None = None


class SpargeAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
    """FlashAttention's builder + the per-step sparse sub-batch and its prefill plan (no GPU
    sync)."""

    # See the module docstring: full CUDA graphs only for pure single-token decode batches.
    _cudagraph_support: ClassVar[AttentionCGSupport] = (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)
    # vLLM's GPUModelRunner builds one KV-cache spec's metadata once a step and gives the spec's
    # other groups a copy with their block table and slot mapping (update_block_table; its V2
    # runner builds every group). Only a group that never runs sparse takes part (set in
    # __init__): a sparse sub-batch and its plan carry the block table they were built for.
    supports_update_block_table: bool = False
    # The step's split and counts, shared by the builders of its KV cache groups (this process).
    _step_splits: ClassVar[StepSplits] = StepSplits()

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
        from sparge_serve.kernels.launch import set_fast_launch

        # Longest context the predictor handles; longer prefills run dense ("unsupported").
        self.max_sparse_seq_len = MAX_KEY_BLOCKS * BLKK
        set_fast_launch(self.sparge_config.fast_launch)  # this process's kernel launches
        self.stats = metrics_for(vllm_config, self.runtime, device)
        self._reasons = None
        if self.stats is not None:
            from sparge_serve.metrics import FallbackReason

            self._reasons = FallbackReason
        self._counting = True
        self._warned_no_cpu_seq_lens = False
        # A sliding-window KV cache group (vLLM's SlidingWindowSpec), or one whose every layer is
        # dense (e.g. no thresholds), runs dense: its steps are counted, never split or planned.
        self.never_sparse = getattr(kv_cache_spec, "sliding_window", None) is not None
        from vllm.model_executor.layers.attention import Attention

        layers = {name: layer.impl for name, layer in
                  get_layers_from_vllm_config(vllm_config, Attention).items()
                  if isinstance(layer.impl, SpargeAttentionImpl)}
        bound = {name: layers[name] for name in layer_names if name in layers}
        for name, impl in bound.items():
            impl.bind(name, device, self.stats)
        impls = list(bound.values())
        self.never_sparse |= bool(impls) and all(i.dense_layer for i in impls)
        # e.g. Gemma 3's five sliding-window groups: one build a step where copies are taken
        self.supports_update_block_table = self.never_sparse
        # NOTE: FlashAttention's builder reads the windows for its AOT schedule from
        # FlashAttentionImpl layers only: the same rule over ours (one window: the schedule uses
        # it; several: no AOT schedule)
        windows = {impl.sliding_window for impl in layers.values()}
        if len(windows) == 1:
            self.aot_sliding_window = windows.pop()
        elif windows:
            self.aot_sliding_window, self.aot_schedule = (-1, -1), False
        self._plan_args = prefill_plan_args(vllm_config, self.sparge_config, kv_cache_spec, impls,
                                            device)
        if device.type == "cuda":
            warm_up_kernels(vllm_config, self.runtime, kv_cache_spec, impls, device)

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
        prefill_plan = None
        if self._plan_args is not None:
            from sparge_serve.kernels.plan import plan_prefill

            prefill_plan = plan_prefill(sparse.batch, **self._plan_args)
        return SpargeAttentionMetadata(**vars(md), sparse=sparse, plan=prefill_plan,
                                       all_dense=all_dense, has_dense=has_dense, counts=counts)

    def _plan(self, cam: CommonAttentionMetadata, count: bool
              ) -> tuple[tuple[SparsePrefill, torch.Tensor, bool] | None, StepCounts | None]:
        """Host-side split of the step into the sparse sub-batch and the rest (no GPU sync)."""
        cfg = self.sparge_config
        split, counts = self._step_splits.classify(cam, cfg, self.max_decode_query_len,
                                                   self.max_sparse_seq_len,
                                                   self._reasons if count else None)
        if split is None:
            return None, None
        if split.seq_lens is None and cfg.sparse_possible(cam.max_seq_len) and (
                not self._warned_no_cpu_seq_lens):
            self._warned_no_cpu_seq_lens = True
            logger.warning("SPARGE: a step without a host copy of seq_lens; its long prefills "
                           "run dense (reading seq_lens from the GPU would stall)")
        if split.sparse is None or self.never_sparse:
            return None, counts
        req_index = np.flatnonzero(split.sparse)
        batch, token_index, dense_seq_lens = sparse_sub_batch(cam, split, req_index)
        sparse = SparsePrefill(batch=batch, token_index=token_index, req_index=req_index,
                               num_tokens=int(split.query_lens[req_index].sum()))
        has_dense = bool((split.query_lens[~split.sparse] > 0).any())
        return (sparse, dense_seq_lens, has_dense), counts


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
        check_layer(head_size, alibi_slopes, kv_cache_dtype, logits_soft_cap, attn_type, sinks,
                    unsupported)
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.fp8_cache = is_quantized_kv_cache(kv_cache_dtype)  # read as float8_e4m3fn
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        # FlashAttentionImpl's attributes (read by vLLM tools), as FlashAttention sets them for a
        # causal decoder layer; the features rejected above keep their "off" values.
        self.sliding_window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
        self.logits_soft_cap = 0.0
        self.alibi_slopes = None
        self.sinks = None

        vllm_config = get_current_vllm_config_or_none()
        self._vllm_config = vllm_config
        self.draft_tag = draft_model_tag()  # set: a speculative-decoding draft layer (dense)
        # Settings and thresholds: loaded and validated against the model once per process.
        has_model = (vllm_config is not None and vllm_config.model_config is not None
                     and self.draft_tag is None)
        self.runtime: SpargeRuntime | None = load_runtime(vllm_config) if has_model else None
        self._fa: FlashAttentionImpl | None = None
        if get_flash_attn_version(head_size=head_size) is not None:
            self._fa = FlashAttentionImpl(num_heads, head_size, scale, num_kv_heads, None,
                                          sliding_window, kv_cache_dtype, None, attn_type,
                                          kv_sharing_target_layer_name)
        else:
            logger.info_once("SPARGE: FlashAttention unavailable; dense attention uses vLLM's "
                             "Triton unified_attention")
        # With an fp8 cache the attention layer quantises the query where FlashAttention takes an
        # fp8 one (as for FLASH_ATTN); the sparse kernels read either.
        self.supports_quant_query_input = bool(self._fa is not None
                                               and self._fa.supports_quant_query_input)
        # Set by bind() (from the metadata builder, once the model is loaded).
        self.layer_name: str | None = None
        self.layer_index: int | None = None  # global layer index (None: runs dense, uncounted)
        self.dense_layer = True
        self.fa3_attention = False  # kept blocks attended by FA3 (SpargeConfig.attention_kernel)
        self._simthreshd1: torch.Tensor | None = None  # [num_heads] fp32 device
        self._cdfthreshd: torch.Tensor | None = None  # [num_heads] fp32 device
        self._pvthreshd: torch.Tensor | None = None  # [num_heads] fp32 device
        self.pv_skip = False  # host: any head of this layer with pvthreshd < PV_SKIP_OFF
        self._stats = None  # sparge_serve.metrics.SpargeStats
        self._scratch_reserved = False  # the profiling forward reserved the sparse scratch

    def bind(self, layer_name: str, device: torch.device, stats: Any = None,
             runtime: SpargeRuntime | None = None, tp: tuple[int, int] | None = None) -> None:
        """Attach this layer's thresholds (on ``device``) and the metrics object; idempotent.

        Called by the metadata builder for each of its layers. ``runtime``/``tp`` override the
        process defaults (tests).
        """
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
        if self.windowed:
            logger.info_once("SPARGE: sliding-window layers run dense FlashAttention (window)")
            self.layer_index, self.dense_layer = window_layer_index(runtime, layer_name), True
            return
        bound = layer_thresholds(runtime, layer_name, self.num_heads, device, self._vllm_config,
                                 tp)
        if bound is None:
            self.layer_index, self.dense_layer = None, True
            return
        cfg = runtime.config
        self.layer_index, self.dense_layer = bound.index, bound.dense
        self._simthreshd1, self._cdfthreshd = bound.simthreshd1, bound.cdfthreshd
        self._pvthreshd, self.pv_skip = bound.pvthreshd, bound.pv_skip
        # over an fp8 cache FA3 multiplies the query the layer quantised to fp8
        fa3_available = (self._fa is not None and fa3_serves(self.head_size)
                         and (self.supports_quant_query_input or not self.fp8_cache))
        if cfg.attention_kernel == "fa3" and not fa3_available:
            raise ValueError("SPARGE: attention_kernel \"fa3\" needs FlashAttention 3 (a Hopper "
                             "GPU and vLLM's vllm_flash_attn; over an fp8 KV cache, with the query "
                             "quantised to fp8). Fix: use \"attention_kernel\": \"auto\".")
        fa3 = cfg.fa3_attention(fa3_available)
        # FA3 has no PV skip: such layers keep the Triton kernel (one note per process)
        self.fa3_attention = fa3 and not self.pv_skip
        if fa3 and self.pv_skip:
            logger.info_once("SPARGE: layers whose thresholds use the PV skip keep the Triton "
                             "attention kernel (FlashAttention 3 has no PV skip)")

    # ---- KV cache ------------------------------------------------------------------------------
    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        # Same as FlashAttention: (B, H, N, 2*D) -> K, V views (B, N, H, D); padded tokens are
        # dropped by reshape_and_cache_flash through slot_mapping's length.
        key_cache, value_cache = kv_views(kv_cache, self.head_size, False)
        kv_cache_writer()(key, value, key_cache, value_cache, slot_mapping,
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
            self._sparse(layer, query, kv_cache, sparse, attn_metadata.plan, output)
        counts = attn_metadata.counts
        if counts is not None and self._stats is not None and self.layer_index is not None:
            counts.add_to(self._stats, self.layer_index, run_sparse)
        return output

    @property
    def windowed(self) -> bool:
        """A sliding-window layer: dense FlashAttention with its window, never thresholds (its KV
        cache group, vLLM's SlidingWindowSpec, carries the window in its metadata)."""
        return self.sliding_window != (-1, -1)

    def sparse_scratch_bytes(self) -> int:
        """Most device memory one layer's sparse prefill can allocate in a step (0 if none can
        run; see ``sparge_serve.backend.runtime.sparse_scratch_bytes``)."""
        if self.windowed:
            return 0
        return sparse_scratch_bytes(self._vllm_config, self.runtime, self.num_heads,
                                    self.num_kv_heads, self.head_size)

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
        n = self.sparse_scratch_bytes()
        if n:
            torch.empty(n, dtype=torch.uint8, device=query.device)

    def _emit_capture(self, query: torch.Tensor, kv_cache: torch.Tensor,
                      sparse: SparsePrefill) -> None:
        if self.layer_index is None:
            return
        if self.fp8_cache:
            raise ValueError("SPARGE: calibration captures need an unquantised KV cache; run "
                             "sparge-calibrate without --kv-cache-dtype fp8")
        key_cache, value_cache = kv_views(kv_cache, self.head_size, False)
        batch = sparse.batch
        if sparse.token_index is None:
            q = query
        else:
            q = query.index_select(0, sparse.token_index)
        capture.emit_prefill(self.layer_index, q, key_cache, value_cache, batch, self.scale,
                             self.layer_name or "")

    def _dense(self, layer, query, key, value, kv_cache, md: FlashAttentionMetadata,
               output: torch.Tensor) -> None:
        if self._fa is not None:
            self._fa.forward(layer, query, key, value, kv_cache, md, output)
            return
        key_cache, value_cache = kv_views(kv_cache, self.head_size, self.fp8_cache)
        triton_dense_attention(layer, query, key_cache, value_cache, md, output, self.scale,
                               self.sliding_window)

    def _sparse(self, layer: torch.nn.Module, query: torch.Tensor, kv_cache: torch.Tensor,
                sparse: SparsePrefill, plan: PrefillPlan, output: torch.Tensor) -> None:
        if self._simthreshd1 is None:
            raise RuntimeError(f"SPARGE: layer {self.layer_name or '?'} was never bound to its "
                               "thresholds (SpargeAttentionMetadataBuilder binds its layers)")
        from sparge_serve.kernels.prefill import run_prefill

        key_cache, value_cache = kv_views(kv_cache, self.head_size, self.fp8_cache)
        scales = kv_scales(layer, query) if self.fp8_cache else None
        if sparse.token_index is None:
            q, out = query, output  # batch.query_start_loc holds absolute offsets
        else:
            q = gather_rows(query, sparse.token_index)
            out = torch.empty(q.shape, dtype=output.dtype, device=q.device)
        st = self._stats
        block_stats = st.kernel_stats(self.layer_index) if st is not None else None
        timing = st.start_timing() if st is not None else None
        # NOTE: the step's plan (made by the builder) and launches only: the thresholds were
        # validated at load, the batch built by the builder. The two stages run one head chunk
        # at a time where the block map would pass its memory budget (the predictor time is then
        # not separated).
        run_prefill(plan, q, key_cache, value_cache, self.scale, self._simthreshd1,
                    self._cdfthreshd, self._pvthreshd, out, block_stats, self.pv_skip,
                    None if timing is None else timing.predictor_done, scales=scales)
        if timing is not None:
            timing.done()
        if sparse.token_index is not None:
            output.index_copy_(0, sparse.token_index, out)
