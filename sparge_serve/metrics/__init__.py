"""Prometheus metrics of the SPARGE backend: GPU counters, asynchronous read-back, export.

What an operator reads (every series carries ``model_name``, vLLM's served model name, the same
label vLLM puts on its ``vllm:*`` series; ratios are left to PromQL)::

    sparge_attention_blocks_valid_total{model_name, layer}     counter  causally valid (query block,
        key block) pairs the sparse prefill path saw, summed over this layer's query heads.
    sparge_attention_blocks_computed_total{model_name, layer}  counter  of those, the pairs kept by the
        stage-1 predictor (QK^T computed).   Sparsity = 1 - computed / valid.
    sparge_pv_blocks_skipped_total{model_name, layer}          counter  of the computed pairs, those
        whose exp / row-sum / P.V the stage-2 PV-skip test skipped.
    sparge_prompt_tokens_total{model_name, layer, path}        counter  prompt (prefill) tokens whose
        attention in this layer ran on path="sparse" (the SpargeAttn kernels) or path="dense" (a
        fallback). NOTE: one count per token *per layer*; tokens/s = rate / number of layers.
    sparge_dense_fallbacks_total{model_name, reason}           counter  prefill attention calls (one
        per request chunk and layer) that ran dense instead of sparse, by ``FallbackReason``.
    sparge_sparse_attention_seconds{model_name}                histogram GPU time of one layer's
        sparse prefill attention call (predictor + attention kernel), sampled (CUDA events, one
        call in ``sample_every``), so ``_count`` counts samples, not calls.
    sparge_predictor_seconds{model_name}                       histogram GPU time of the stage-1
        predictor inside the same sampled calls.
    sparge_thresholds_info{model_name, file, sha256, l1, pv_l1, created}  gauge = 1: the thresholds
        file in use.

GPU side (a worker process, hot path)::

    stats = get_sparge_stats(num_layers, device, model_name, tp_rank=tp_rank)   # lazily, once
    stats.maybe_flush()                            # once per step, e.g. in the builder's build()
    sparge_paged_prefill(..., stats=stats.kernel_stats(layer))   # kernels atomically add [3] int64
    stats.count_prefill(layer, sparse_tokens, dense_tokens)      # host ints the builder computed
    stats.count_fallback(FallbackReason.SHORT_PROMPT, n_requests)
    timing = stats.start_timing()                  # None unless this sparse call is sampled
    ...predictor...;  timing and timing.predictor_done()
    ...attention...;  timing and timing.done()

NOTE (sync hazards): nothing here waits for the GPU. ``maybe_flush`` issues a non-blocking copy of
the counters into pinned host memory followed by a CUDA event, and reads that copy only in a later
call once ``event.query()`` says it completed; timing events are read the same way. Every CUDA call
happens on the thread that runs the model (a CUDA call from another thread would break vLLM's
CUDA-graph captures), so block counters and timings become visible one or two steps after the GPU
produced them: the last prefill before an idle period shows up with the next step.
Token and fallback counts are host integers (the backend knows them from the batch on the host;
adding them on the device would cost one kernel launch per layer).

Start-up and dummy runs are not counted. vLLM runs the model on made-up batches before (and, with
data parallelism, between) real steps: the memory-profiling run, compile warm-ups, the V2 runner's
kernel warm-up (whole ``execute_model`` steps on fake prefill/decode requests), CUDA-graph capture,
idle-rank dummy batches. Their metadata goes through the backend's builder like a real prefill's.
The plugin (``sparge_serve.plugin``) wraps those vLLM entry points in ``metrics_suspended()``;
while suspended (a per-process, nestable state), SpargeStats

- adds token and fallback counts into throw-away host counters (the hot path writes through a
  reference that is swapped at suspend/resume: no per-call cost);
- takes no timing samples and starts no device -> host copy (a flag test per sampled call / step);
- lets the kernels add into the real device block counters, but snapshots them on suspend
  (``blocks.clone()``) and copies the snapshot back on resume: two tiny device ops on the model
  thread's current stream, ordered after the suspended work, no host sync. Restoring (rather than
  zeroing) keeps real counts from before a dummy run, and the counters keep their address (safe
  should a sparse launch ever be captured in a CUDA graph).

Nothing exported ever includes suspended work, so the exported counters never go down.

Export path (how worker counters reach vLLM's own ``/metrics``): vLLM 0.26 serves the global
``prometheus_client.REGISTRY`` on the API server's port unless ``PROMETHEUS_MULTIPROC_DIR`` is set,
in which case it serves a ``MultiProcessCollector`` over that directory. The GPU workers are other
processes (the engine core with TP 1, its children with TP > 1). ``install_metrics_bridge()``, run by
the plugin in every process before any worker exists, makes the first (top-level) process create a
private directory and publish it in ``_SPARGE_METRICS_DIR`` (children inherit it), and registers a
``SpargeCollector`` over that directory into the global registry. The directory carries an owner
marker whose lock the creating process holds until it exits; it is removed by its creator at exit,
or, after a crash, by a later process that finds the marker unlocked. Nothing else in the
temporary directory is ever removed, whatever its name. Each worker's stats are written by
a background thread (pure Python, no CUDA) once per ``write_interval_s`` into per-process files in
prometheus_client's multiprocess format (``counter_sparge-<pid>.db``, ...); the collector merges
them (counters and histograms summed over processes) at scrape time. When ``PROMETHEUS_MULTIPROC_DIR``
is set in a worker (vLLM with ``--api-server-count > 1``, or set by the user), the files go there
instead and vLLM's own ``MultiProcessCollector`` serves them. prometheus_client's global storage
mode is never changed. With TP > 1, token and fallback counts come from TP rank 0 only (every rank
sees the same tokens); block counts and timings from every rank (each rank owns its heads).
Not covered: workers that ``multiprocessing`` did not start (Ray executor, other nodes): they
write into their own directory, which no API server reads.

Modules: ``series`` (the series' names, HELP texts, labels and buckets), ``stats`` (the hot path:
``SpargeStats``, timing samples, suspension), ``export`` (metric files, ``SpargeCollector``, the
bridge and its private directory). The public names are imported from this package.
"""

from sparge_serve.metrics.export import (
    METRICS_DIR_ENV,
    SpargeCollector,
    default_sink_dir,
    install_metrics_bridge,
    sha256_file,
)
from sparge_serve.metrics.series import THRESHOLDS_INFO_LABELS, TIME_BUCKETS, FallbackReason
from sparge_serve.metrics.stats import (
    SpargeStats,
    TimingSample,
    get_sparge_stats,
    metrics_suspended,
    metrics_suspended_now,
    resume_metrics,
    suspend_metrics,
)

__all__ = [
    "METRICS_DIR_ENV",
    "THRESHOLDS_INFO_LABELS",
    "TIME_BUCKETS",
    "FallbackReason",
    "SpargeCollector",
    "SpargeStats",
    "TimingSample",
    "default_sink_dir",
    "get_sparge_stats",
    "install_metrics_bridge",
    "metrics_suspended",
    "metrics_suspended_now",
    "resume_metrics",
    "sha256_file",
    "suspend_metrics",
]
