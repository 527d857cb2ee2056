"""The SPARGE attention backend: SpargeAttn block-sparse prefill, FlashAttention for the rest.

Select it with ``--attention-backend SPARGE`` (or ``LLM(attention_backend="SPARGE")``, or the
legacy ``VLLM_ATTENTION_BACKEND=SPARGE``); settings come from ``--additional-config
'{"sparge": {...}}'`` (see :mod:`sparge_serve.config`).

Modules:

- :mod:`~sparge_serve.backend.sparge_attn`: the backend, its metadata, metadata builder and impl
  (the classes vLLM instantiates);
- :mod:`~sparge_serve.backend.capabilities`: vLLM's capability hooks and the unsupported-feature
  checks, as reasons vLLM prints;
- :mod:`~sparge_serve.backend.runtime`: per-process state (settings and thresholds, a layer's
  thresholds on this tensor-parallel rank, metrics, kernel warm-up, scratch reservation);
- :mod:`~sparge_serve.backend.split`: the host-side split of a step into the sparse sub-batch and
  the rest, and the step's metric counts;
- :mod:`~sparge_serve.backend.capture` / :mod:`~sparge_serve.backend.capture_worker`: the
  calibration tap (``sparge-calibrate --driver vllm``).

How a step runs:

- The KV cache layout is FlashAttention's (same shape, stride order and page sizes), so the KV
  write is ``reshape_and_cache_flash`` and decode / short prefills go to
  ``vllm.vllm_flash_attn.flash_attn_varlen_func`` (FA3 on Hopper), or to vLLM's Triton
  ``unified_attention`` where FlashAttention is unavailable.
- The metadata builder (once per step, host data only) picks the *sparse sub-batch*: requests
  with ``query_len > 1`` (beyond spec-decode verification lengths) whose context ``seq_len >=
  min_sparse_len`` — long prefills, chunked-prefill chunks and prefix-cache hits alike. For the
  dense call their ``seq_lens`` are set to 0, so FlashAttention does no work for them (it writes
  zeros, which the sparse kernel then overwrites). It also plans the sub-batch's sparse prefill
  once for every layer of the step (``sparge_serve.kernels.plan.plan_prefill``: head chunks,
  launch parameters, buffers; carried in the metadata as ``plan``).
- The impl runs the dense call for the other requests and, for the sparse sub-batch,
  ``sparge_serve.kernels.prefill.run_prefill`` on the step's plan (launches only) with this
  layer's per-head thresholds (global layer index from the layer name: pipeline-parallel safe;
  heads of this tensor-parallel rank via ``Thresholds.for_rank``). Layers in ``dense_layers``,
  layers whose heads were all calibrated dense, ``mode: dense``, and the layers of a
  speculative-decoding draft model (built under one of vLLM's proposer model tags; their
  thresholds are never loaded) run the whole batch dense.
- Start-up: the builder compiles the sparse kernels for every context-length bucket the sparse
  path can see (``sparge_serve.kernels.warmup``), so no request pays a Triton compile; vLLM's
  profiling forward allocates the sparse path's worst-case scratch
  (``SpargeAttentionImpl.sparse_scratch_bytes``), so the KV cache is sized with room for it.
- CUDA graphs: full graphs only for pure ``query_len == 1`` decode batches; mixed and prefill
  batches run attention eagerly (piecewise mode), where the split is rebuilt every step.

Statistics go to the process's ``sparge_serve.metrics.SpargeStats``: the kernels add block counts
into its per-layer device rows (``kernel_stats(layer)``); each layer adds the step's prompt-token
and dense-fallback counts, host integers the builder computed (``count_prefill``,
``count_fallback``); the builder calls ``maybe_flush()`` once per step. Nothing here synchronises
with the GPU. vLLM's start-up and dummy runs (memory profiling, warm-ups, CUDA-graph capture) build
metadata here like real prefills; they are not counted because the plugin runs them with the
metrics suspended (``sparge_serve.metrics.metrics_suspended``), which this package need not know.

Calibration: while ``sparge_serve.backend.capture`` has a sink installed (``sparge-calibrate
--driver vllm`` only), every layer reports its sparse sub-batch through ``capture.emit_prefill`` and
computes it dense.

Nothing is imported here: ``sparge_serve.plugin`` names the backend class by string.
"""
