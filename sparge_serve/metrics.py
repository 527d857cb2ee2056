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
"""

from __future__ import annotations

import atexit
import bisect
import collections
import contextlib
import enum
import fcntl
import glob
import logging
import math
import multiprocessing
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    import torch

# NOTE: a child of vLLM's "vllm" logger so that our lines use vLLM's handler and level.
logger = logging.getLogger(f"vllm.{__name__}")

__all__ = [
    "FallbackReason",
    "SpargeCollector",
    "SpargeStats",
    "TIME_BUCKETS",
    "TimingSample",
    "get_sparge_stats",
    "install_metrics_bridge",
    "metrics_suspended",
    "resume_metrics",
    "suspend_metrics",
]

# Set by the top-level process in install_metrics_bridge(); inherited by engine core and workers.
# Internal: users do not set it.
METRICS_DIR_ENV = "_SPARGE_METRICS_DIR"
_DIR_PREFIX = "sparge-metrics-"
# The owner marker in every directory the bridge creates: "<magic> <random token> <pid>", locked
# (flock) by the creating process for its whole life. Only a directory whose marker is there and
# unlocked is ever removed by another process; a name that merely looks like ours never is.
_MARKER = ".sparge-metrics-owner"
_MARKER_MAGIC = "sparge-metrics-dir-v1"
# File names are "<type>_sparge-<pid>.db": the "<type>" and (gauges) "<mode>" parts are what
# MultiProcessCollector parses; no "_" after them, and never the name prometheus_client itself
# uses for a process ("<type>_<pid>.db"), so our writer and a multiprocess-mode prometheus_client
# in the same process never share a file.
_FILE_TAG = "sparge-"

# Seconds; one layer's attention call for a short prompt is ~1e-4 s, a 128K prefill layer ~1 s.
TIME_BUCKETS: tuple[float, ...] = (
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5,
    math.inf,
)


class FallbackReason(enum.StrEnum):
    """Why a prefill attention call ran dense (the ``reason`` label; a closed set)."""

    SHORT_PROMPT = "short_prompt"  # the request's context is below the sparse minimum length
    DENSE_LAYER = "dense_layer"  # every head of this layer is dense in the thresholds file
    MODE_DENSE = "mode_dense"  # the configuration forces dense attention
    UNSUPPORTED = "unsupported"  # a feature the sparse kernels do not handle (logged once)


THRESHOLDS_INFO_LABELS: tuple[str, ...] = ("file", "sha256", "l1", "pv_l1", "created")

# name, HELP. Counters are named without "_total" here, as prometheus_client stores them.
_BLOCK_COUNTERS = (
    ("sparge_attention_blocks_valid",
     "Causally valid (query block, key block) pairs seen by the sparse prefill path, "
     "summed over query heads."),
    ("sparge_attention_blocks_computed",
     "Valid (query block, key block) pairs kept by the SpargeAttn predictor (QK^T computed)."),
    ("sparge_pv_blocks_skipped",
     "Computed (query block, key block) pairs whose softmax and P.V were skipped by the PV test."),
)
_TOKENS = ("sparge_prompt_tokens",
           "Prompt tokens whose attention in this layer ran on the sparse or the dense path "
           "(one count per token per layer).")
_FALLBACKS = ("sparge_dense_fallbacks",
              "Prefill attention calls (one per request chunk and layer) that ran dense instead "
              "of sparse, by reason.")
_ATTN_HIST = ("sparge_sparse_attention_seconds",
              "GPU time of one layer's sparse prefill attention call (predictor + kernel), "
              "sampled.")
_PRED_HIST = ("sparge_predictor_seconds",
              "GPU time of the SpargeAttn block predictor within the sampled sparse calls.")
_INFO = ("sparge_thresholds_info", "The SpargeAttn thresholds file in use (value 1).")
_PATHS = ("sparse", "dense")


# --------------------------------------------------------------------------------------------
# Host-side stand-ins for CUDA events, so CPU tensors (tests, CPU-only tools) take the same path.

class _HostEvent:
    __slots__ = ("t", "timing")

    def __init__(self, timing: bool) -> None:
        self.t = 0.0
        self.timing = timing

    def record(self, stream: Any = None) -> None:
        if self.timing:
            self.t = time.perf_counter()

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _HostEvent) -> float:
        return (end.t - self.t) * 1e3  # milliseconds, like torch.cuda.Event


class TimingSample:
    """Events of one sampled sparse attention call; returned by ``SpargeStats.start_timing``."""

    __slots__ = ("_stats", "start", "mid", "end", "has_mid")

    def __init__(self, stats: SpargeStats, start: Any, mid: Any, end: Any) -> None:
        self._stats = stats
        self.start, self.mid, self.end = start, mid, end
        self.has_mid = False

    def predictor_done(self) -> None:
        """Call after the predictor's launch (optional; without it no predictor time is kept)."""
        self.mid.record()
        self.has_mid = True

    def done(self) -> None:
        """Call after the attention kernel's launch. The times are read in a later maybe_flush()."""
        self.end.record()
        self._stats._pending.append(self)


class _HostHistogram:
    """Non-cumulative bucket counts + sum, as prometheus_client's multiprocess files store them."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


# --------------------------------------------------------------------------------------------

class SpargeStats:
    """Per-process SpargeAttn counters: device block counters, host token/fallback counters,
    sampled CUDA-event timings, and their export. See the module docstring for the call sites.

    Args:
        num_layers: number of attention layers of the model (layer indices are global,
            ``0 <= layer < num_layers``, also with pipeline parallelism).
        device: where the kernels run; a CPU device works too (tests).
        model_name: the ``model_name`` label (vLLM's served model name).
        tp_rank: tensor-parallel rank; only rank 0 exports token and fallback counts.
        sample_every: time one sparse attention call in this many (>= 1).
        max_pending_samples: timing samples in flight at most; more are not taken.
        sink_dir: directory of the per-process metric files; ``"auto"`` picks
            ``PROMETHEUS_MULTIPROC_DIR`` or the bridge's directory (or none: nothing is written);
            ``None`` writes nothing (read ``snapshot()``).
        write_interval_s: how often the background thread writes the files.
        copy_interval_s: minimum wall-clock time between two device -> host counter copies
            (at most one copy is in flight anyway, and none is made when nothing changed).
        start_writer: start the background writer thread (tests call ``write()`` instead).
    """

    def __init__(
        self,
        num_layers: int,
        device: torch.device | str,
        model_name: str,
        *,
        tp_rank: int = 0,
        sample_every: int = 16,
        max_pending_samples: int = 32,
        sink_dir: str | None = "auto",
        write_interval_s: float = 1.0,
        copy_interval_s: float = 0.0,
        start_writer: bool = True,
    ) -> None:
        import torch

        if num_layers < 1:
            raise ValueError(f"SpargeStats: num_layers must be >= 1, got {num_layers}")
        if sample_every < 1:
            raise ValueError(f"SpargeStats: sample_every must be >= 1, got {sample_every}; "
                             "use a large value to sample rarely")
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.model_name = str(model_name)
        self.tp_rank = int(tp_rank)
        self.sample_every = int(sample_every)
        self.copy_interval_s = float(copy_interval_s)
        self.pid = os.getpid()
        self._torch = torch
        self._is_cuda = self.device.type == "cuda"

        # NOTE: layout [num_layers, 3] = (valid, kept/computed, pv_skipped), int64, on the kernels'
        # device; the kernels atomically add into row `layer` (kernel_stats(layer)).
        self.blocks = torch.zeros((num_layers, 3), dtype=torch.int64, device=self.device)
        # Views made once: indexing a tensor costs microseconds per call on the hot path.
        self._block_rows = list(self.blocks.unbind(0))
        self._host_copy = torch.zeros((num_layers, 3), dtype=torch.int64,
                                      pin_memory=self._is_cuda)
        self._copy_event = self._new_event(timing=False)
        self._copy_in_flight = False
        self._last_copy = -math.inf
        self._dirty = False
        # Published by the model thread, read by the writer thread (reference swap is atomic).
        self._blocks_read: list[list[int]] = [[0, 0, 0] for _ in range(num_layers)]

        self._tokens = [[0, 0] for _ in range(num_layers)]  # [layer][sparse, dense]
        self._fallbacks = dict.fromkeys(FallbackReason, 0)
        # Where count_prefill / count_fallback add: the exported counters above, or throw-away
        # ones while suspended (start-up / dummy runs; see suspend()).
        self._tokens_in = self._tokens
        self._fallbacks_in = self._fallbacks
        self._suspend_depth = 0
        self._saved_blocks: torch.Tensor | None = None
        self._info: dict[str, str] | None = None

        self._hist_lock = threading.Lock()
        self._attn_hist = _HostHistogram(TIME_BUCKETS)
        self._pred_hist = _HostHistogram(TIME_BUCKETS)
        # NOTE: the first sparse call is sampled, then one in `sample_every`: a server that has
        # seen only a few long prompts (a handful of layer calls) still reports a latency.
        self._until_sample = 1
        self._free: list[TimingSample] = [
            TimingSample(self, *(self._new_event(timing=True) for _ in range(3)))
            for _ in range(max_pending_samples)
        ]
        self._pending: collections.deque[TimingSample] = collections.deque()

        if sink_dir == "auto":
            sink_dir = default_sink_dir()
        self.sink_dir = sink_dir
        self._writer: _MetricFileWriter | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._write_lock = threading.Lock()
        self.write_interval_s = float(write_interval_s)
        if sink_dir is not None:
            self._writer = _MetricFileWriter(sink_dir, self.model_name, num_layers, self.pid)
            atexit.register(self._write_at_exit)
            if start_writer:
                self._thread = threading.Thread(
                    target=self._write_loop, name="sparge-metrics-writer", daemon=True)
                self._thread.start()

    def _new_event(self, timing: bool) -> Any:
        if self._is_cuda:
            return self._torch.cuda.Event(enable_timing=timing)
        return _HostEvent(timing)

    # ---- hot path (model thread) -----------------------------------------------------------

    def kernel_stats(self, layer: int) -> torch.Tensor:
        """The ``[3]`` int64 device view the kernels add into for ``layer`` (pass as ``stats=``)."""
        self._dirty = True
        return self._block_rows[layer]

    def count_prefill(self, layer: int, sparse_tokens: int, dense_tokens: int) -> None:
        """Prompt tokens of this step whose attention in ``layer`` ran sparse / dense."""
        row = self._tokens_in[layer]
        row[0] += sparse_tokens
        row[1] += dense_tokens

    def count_fallback(self, reason: FallbackReason, n: int = 1) -> None:
        """``n`` prefill attention calls (request chunk x layer) that ran dense for ``reason``."""
        self._fallbacks_in[reason] += n  # KeyError for a reason outside FallbackReason

    def start_timing(self) -> TimingSample | None:
        """Call at the start of every sparse attention call; returns a sample one call in
        ``sample_every`` (else ``None``). Never samples while a CUDA graph is being captured."""
        self._until_sample -= 1
        if self._until_sample > 0:
            return None
        self._until_sample = self.sample_every
        if self._suspend_depth:
            return None  # a start-up / dummy run: not timed
        if not self._free:
            return None  # too many samples in flight: the GPU is far behind; skip
        if self._is_cuda and self._torch.cuda.is_current_stream_capturing():
            return None
        sample = self._free.pop()
        sample.has_mid = False
        sample.start.record()
        return sample

    def maybe_flush(self) -> None:
        """Once per step (e.g. from the metadata builder). Cheap: a few attribute tests when idle;
        reads completed copies / timing events, and starts a new counter copy if counters changed.
        Never blocks on the GPU."""
        if not (self._copy_in_flight or self._dirty or self._pending) or self._suspend_depth:
            return  # NOTE: nothing is read or copied while suspended (see suspend())
        # NOTE: no event query or copy inside a CUDA-graph capture (both are illegal there).
        if self._is_cuda and self._torch.cuda.is_current_stream_capturing():
            return
        self.poll()
        if self._pending:
            self._drain_timings()

    def poll(self) -> bool:
        """Read the last counter copy if its event completed; start a new non-blocking copy if the
        counters may have changed. Returns True when a new copy was read."""
        got = False
        if self._copy_in_flight:
            if not self._copy_event.query():
                return False
            # NOTE: the event completed, so the pinned buffer holds the copy. Publish a Python copy:
            # the next device copy reuses the buffer while the writer thread may still read it.
            self._blocks_read = self._host_copy.tolist()
            self._copy_in_flight = False
            got = True
        if self._dirty:
            if self.copy_interval_s > 0.0:
                now = time.monotonic()
                if now - self._last_copy < self.copy_interval_s:
                    return got
                self._last_copy = now
            if self._suspend_depth or (
                    self._is_cuda and self._torch.cuda.is_current_stream_capturing()):
                return got  # a copy now could publish counts of suspended work
            self._dirty = False
            # Same stream as the kernels: ordered after every add enqueued so far. (Adds on
            # another stream may race with the copy; the counters only grow, so such a read is
            # merely stale.)
            self._host_copy.copy_(self.blocks, non_blocking=True)
            self._copy_event.record()
            self._copy_in_flight = True
        return got

    def _drain_timings(self) -> None:
        pending = self._pending
        observed = []
        while pending and pending[0].end.query():
            s = pending.popleft()
            attn = s.start.elapsed_time(s.end) * 1e-3
            pred = s.start.elapsed_time(s.mid) * 1e-3 if s.has_mid else None
            observed.append((attn, pred))
            self._free.append(s)
        if observed:
            with self._hist_lock:
                for attn, pred in observed:
                    self._attn_hist.observe(attn)
                    if pred is not None:
                        self._pred_hist.observe(pred)

    # ---- start-up / dummy runs ------------------------------------------------------------------

    @property
    def suspended(self) -> bool:
        return self._suspend_depth > 0

    def suspend(self) -> None:
        """Stop counting until the matching ``resume()`` (nestable): everything recorded meanwhile
        (tokens, fallbacks, kernel block counts, timings) is dropped. Call on the model thread,
        outside a CUDA-graph capture; enqueues one small device copy, never waits for the GPU.
        Usually called through ``suspend_metrics()`` / ``metrics_suspended()``."""
        self._suspend_depth += 1
        if self._suspend_depth > 1:
            return
        self._tokens_in = [[0, 0] for _ in range(self.num_layers)]
        self._fallbacks_in = dict.fromkeys(FallbackReason, 0)
        # Stream-ordered after every kernel enqueued so far, before any enqueued while suspended.
        self._saved_blocks = None if self._capturing() else self.blocks.clone()

    def resume(self) -> None:
        """End one ``suspend()``; the outermost one puts the device block counters back to their
        values at ``suspend()`` (stream-ordered after the suspended kernels; no host sync) and
        counting resumes. Without a pending ``suspend()``: nothing."""
        if self._suspend_depth == 0:
            return
        self._suspend_depth -= 1
        if self._suspend_depth:
            return
        saved, self._saved_blocks = self._saved_blocks, None
        if saved is not None:
            if self._capturing():
                logger.warning("sparge metrics: resumed inside a CUDA-graph capture; block "
                               "counts of the suspended work are kept")
            else:
                self.blocks.copy_(saved)
        self._tokens_in = self._tokens
        self._fallbacks_in = self._fallbacks
        self._dirty = True  # the next maybe_flush() publishes the restored counters

    def _capturing(self) -> bool:
        return self._is_cuda and self._torch.cuda.is_current_stream_capturing()

    # ---- configuration ------------------------------------------------------------------------

    def set_thresholds_info(self, **labels: Any) -> None:
        """Labels of ``sparge_thresholds_info``: any of ``THRESHOLDS_INFO_LABELS`` (missing ones
        are exported as ""), e.g. ``file=path, sha256=thresholds.sha256, l1="0.08", ...``: the
        digest of the bytes the thresholds were loaded from, not of the file as it is now."""
        unknown = set(labels) - set(THRESHOLDS_INFO_LABELS)
        if unknown:
            raise ValueError(f"set_thresholds_info: unknown labels {sorted(unknown)}; "
                             f"allowed: {THRESHOLDS_INFO_LABELS}")
        self._info = {k: str(labels.get(k, "")) for k in THRESHOLDS_INFO_LABELS}

    # ---- export ---------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Host view of everything exported (block counters as of the last completed copy)."""
        with self._hist_lock:
            attn = (list(self._attn_hist.counts), self._attn_hist.sum)
            pred = (list(self._pred_hist.counts), self._pred_hist.sum)
        export_requests = self.tp_rank == 0
        return {
            "blocks": [list(r) for r in self._blocks_read],
            "tokens": [list(r) for r in self._tokens] if export_requests else None,
            "fallbacks": dict(self._fallbacks) if export_requests else None,
            "attention_hist": attn,
            "predictor_hist": pred,
            "info": dict(self._info) if self._info is not None else None,
        }

    def write(self) -> None:
        """Write the current snapshot into this process's metric files (the writer thread calls
        this every ``write_interval_s``)."""
        if self._writer is None or os.getpid() != self.pid:
            return
        with self._write_lock:
            try:
                self._writer.write(self.snapshot())
            except OSError as e:  # e.g. the directory was removed at shutdown
                logger.warning("sparge metrics: cannot write to %s (%s); export stopped",
                               self.sink_dir, e)
                self._writer = None

    def _write_loop(self) -> None:
        while not self._stop.wait(self.write_interval_s):
            self.write()

    def _write_at_exit(self) -> None:
        if os.getpid() == self.pid:
            self.write()

    def close(self) -> None:
        """Stop the writer thread after a last write, and close the files."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.write()
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        atexit.unregister(self._write_at_exit)


class _MetricFileWriter:
    """Writes a SpargeStats snapshot as prometheus_client multiprocess files of one process."""

    def __init__(self, directory: str, model_name: str, num_layers: int, pid: int) -> None:
        self.directory = directory
        tag = f"{_FILE_TAG}{pid}.db"
        self._files = {
            "counter": MmapedDict(os.path.join(directory, f"counter_{tag}")),
            "histogram": MmapedDict(os.path.join(directory, f"histogram_{tag}")),
            "gauge": MmapedDict(os.path.join(directory, f"gauge_max_{tag}")),
        }
        self._last: dict[str, float] = {}
        m = {"model_name": model_name}
        # Keys made once: json-encoding hundreds of keys per write would cost milliseconds.
        self._block_keys = [
            [_key(name, name + "_total", {**m, "layer": str(layer)}, doc)
             for name, doc in _BLOCK_COUNTERS]
            for layer in range(num_layers)
        ]
        name, doc = _TOKENS
        self._token_keys = [
            [_key(name, name + "_total", {**m, "layer": str(layer), "path": p}, doc)
             for p in _PATHS]
            for layer in range(num_layers)
        ]
        name, doc = _FALLBACKS
        self._fallback_keys = {
            r: _key(name, name + "_total", {**m, "reason": r.value}, doc) for r in FallbackReason}
        self._hist_keys = {}
        for which, (name, doc) in (("attention_hist", _ATTN_HIST), ("predictor_hist", _PRED_HIST)):
            buckets = [_key(name, name + "_bucket", {**m, "le": floatToGoString(b)}, doc)
                       for b in TIME_BUCKETS]
            self._hist_keys[which] = (buckets, _key(name, name + "_sum", m, doc))
        self._model_name = model_name

    def write(self, snap: dict[str, Any]) -> None:
        put = self._put
        for keys, row in zip(self._block_keys, snap["blocks"], strict=True):
            for key, value in zip(keys, row, strict=True):
                put("counter", key, value)
        if snap["tokens"] is not None:
            for keys, row in zip(self._token_keys, snap["tokens"], strict=True):
                for key, value in zip(keys, row, strict=True):
                    put("counter", key, value)
        if snap["fallbacks"] is not None:
            for reason, value in snap["fallbacks"].items():
                put("counter", self._fallback_keys[reason], value)
        for which, (bucket_keys, sum_key) in self._hist_keys.items():
            counts, total = snap[which]
            for key, value in zip(bucket_keys, counts, strict=True):
                put("histogram", key, value)
            put("histogram", sum_key, total)
        if snap["info"] is not None:
            name, doc = _INFO
            labels = {"model_name": self._model_name, **snap["info"]}
            put("gauge", _key(name, name, labels, doc), 1.0)

    def _put(self, typ: str, key: str, value: float) -> None:
        value = float(value)
        if self._last.get(key) != value:
            self._files[typ].write_value(key, value, 0.0)
            self._last[key] = value

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def _key(metric: str, sample: str, labels: dict[str, str], doc: str) -> str:
    return mmap_key(metric, sample, list(labels), list(labels.values()), doc)


# --------------------------------------------------------------------------------------------
# Per-process singleton used by the backend.

_STATS: SpargeStats | None = None
_STATS_LOCK = threading.Lock()


def get_sparge_stats(
    num_layers: int, device: torch.device | str, model_name: str, *, tp_rank: int = 0,
    **kwargs: Any,
) -> SpargeStats:
    """This process's SpargeStats, created on first call (later calls return the same object;
    a different ``num_layers``/``device``/``model_name`` is a programming error)."""
    global _STATS
    with _STATS_LOCK:
        s = _STATS
        if s is not None and s.pid == os.getpid():
            import torch

            if (s.num_layers, s.device, s.model_name) != (
                    num_layers, torch.device(device), str(model_name)):
                raise ValueError(
                    "get_sparge_stats: this process already counts for "
                    f"({s.num_layers} layers, {s.device}, {s.model_name!r}); got "
                    f"({num_layers}, {device}, {model_name!r}). One model per process.")
            return s
        _STATS = SpargeStats(num_layers, device, model_name, tp_rank=tp_rank, **kwargs)
        if _suspend_depth_here():
            _STATS.suspend()  # created inside a start-up run (e.g. vLLM's profiling KV cache)
        return _STATS


# Per-process suspension (start-up / dummy runs). The plugin wraps vLLM's warm-up entry points in
# metrics_suspended(); the state also applies to a SpargeStats created while it holds.
_SUSPEND_DEPTH = 0
_SUSPEND_PID = -1


def _suspend_depth_here() -> int:
    return _SUSPEND_DEPTH if os.getpid() == _SUSPEND_PID else 0


def suspend_metrics() -> None:
    """Drop every ``sparge_*`` count this process records until the matching
    ``resume_metrics()`` (nestable, per process; see ``SpargeStats.suspend``). Call on the thread
    that runs the model, outside CUDA-graph captures. Never waits for the GPU."""
    global _SUSPEND_DEPTH, _SUSPEND_PID
    with _STATS_LOCK:
        pid = os.getpid()
        depth = _suspend_depth_here()
        _SUSPEND_DEPTH, _SUSPEND_PID = depth + 1, pid
        s = _STATS
        if depth == 0 and s is not None and s.pid == pid:
            s.suspend()


def resume_metrics() -> None:
    """End one ``suspend_metrics()``; the outermost one resumes counting."""
    global _SUSPEND_DEPTH
    with _STATS_LOCK:
        depth = _suspend_depth_here()
        if depth == 0:
            logger.debug("sparge metrics: resume_metrics() without suspend_metrics()")
            return
        _SUSPEND_DEPTH = depth - 1
        s = _STATS
        if depth == 1 and s is not None and s.pid == os.getpid():
            s.resume()


@contextlib.contextmanager
def metrics_suspended() -> Iterator[None]:
    """``with metrics_suspended(): ...`` = ``suspend_metrics()`` ... ``resume_metrics()``."""
    suspend_metrics()
    try:
        yield
    finally:
        resume_metrics()


def metrics_suspended_now() -> bool:
    """Whether this process's counting is suspended."""
    return _suspend_depth_here() > 0


def default_sink_dir() -> str | None:
    """Where this process's files go: ``PROMETHEUS_MULTIPROC_DIR`` when set (vLLM then serves a
    MultiProcessCollector over it), else the bridge's private directory, else nowhere."""
    for var in ("PROMETHEUS_MULTIPROC_DIR", METRICS_DIR_ENV):
        d = os.environ.get(var)
        if d and os.path.isdir(d):
            return d
    return None


# --------------------------------------------------------------------------------------------
# API-server side.

class SpargeCollector:
    """Collects the ``sparge_*`` families from the worker files in ``path`` (summed over
    processes). Registered in the global registry by ``install_metrics_bridge``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.registries: weakref.WeakSet[CollectorRegistry] = weakref.WeakSet()

    def describe(self) -> Iterable[Metric]:
        # Nothing: the families exist only once workers wrote them; also keeps the registry from
        # calling collect() at registration.
        return []

    def collect(self) -> Iterator[Metric]:
        files = sorted(glob.glob(os.path.join(self.path, f"*_{_FILE_TAG}*.db")))
        try:
            yield from MultiProcessCollector.merge(files, accumulate=True)
            return
        except Exception as e:  # a file removed or being extended under us: skip the bad one
            logger.debug("sparge metrics: merge failed (%s); retrying file by file", e)
        good = []
        for f in files:
            try:
                list(MmapedDict.read_all_values_from_file(f))
                good.append(f)
            except Exception as e:
                logger.warning("sparge metrics: skipping unreadable %s (%s)", f, e)
        yield from MultiProcessCollector.merge(good, accumulate=True)


class _Bridge:
    def __init__(self, path: str, pid: int, owner: bool, collector: SpargeCollector) -> None:
        self.path, self.pid, self.owner, self.collector = path, pid, owner, collector


class _OwnedDir:
    """A directory this process created: its path, the creating pid, the marker's token and the
    marker's file descriptor (which holds the lock until the process exits)."""

    def __init__(self, path: str, pid: int, token: str, fd: int) -> None:
        self.path, self.pid, self.token, self.fd = path, pid, token, fd


_BRIDGE: _Bridge | None = None
_BRIDGE_LOCK = threading.Lock()


def install_metrics_bridge(registry: CollectorRegistry | None = None) -> str | None:
    """Route the worker processes' counters to this process's Prometheus registry.

    Call it from the plugin entry point (``sparge_serve.plugin.register``), which vLLM runs in
    every process (API server, engine core, workers) before the workers start. Idempotent,
    cheap (no torch, no CUDA). Never raises: on failure it logs a warning and returns None.

    A top-level process (not started by ``multiprocessing``: ``vllm serve``, a script using
    ``LLM``) creates a private directory ``<tmp>/sparge-metrics-<pid>-<random>`` holding an owner
    marker (a random token, locked with ``flock`` for the life of the process), exports it in
    ``_SPARGE_METRICS_DIR`` for its children and removes it at exit. Before creating it, it
    removes the directories of earlier processes that died without cleaning up: only those whose
    marker is there and unlocked (``_remove_stale_dirs``); never anything by its name or pid. A child started by ``multiprocessing`` (engine core, workers, extra API servers) uses the
    inherited directory. Every process registers a ``SpargeCollector`` over the directory into
    ``registry`` (default: the global ``REGISTRY``, which vLLM serves on ``/metrics``).
    Returns the directory.
    """
    global _BRIDGE
    registry = REGISTRY if registry is None else registry
    with _BRIDGE_LOCK:
        pid = os.getpid()
        b = _BRIDGE
        if b is not None and b.pid == pid:
            _register_once(registry, b.collector)
            return b.path
        try:
            inherited = os.environ.get(METRICS_DIR_ENV)
            is_child = multiprocessing.parent_process() is not None
            if is_child and inherited and os.path.isdir(inherited):
                path, owner = inherited, False
            else:
                owned = _make_private_dir(pid)
                path, owner = owned.path, True
                os.environ[METRICS_DIR_ENV] = path
                atexit.register(_remove_private_dir, owned)
        except OSError as e:
            logger.warning("sparge metrics: no metrics directory (%s); sparge_* series will not "
                           "be exported. Set TMPDIR to a writable directory to fix this.", e)
            return None
        collector = b.collector if b is not None else SpargeCollector(path)
        collector.path = path
        _register_once(registry, collector)
        _BRIDGE = _Bridge(path, pid, owner, collector)
        logger.debug("sparge metrics: %s directory %s", "created" if owner else "using", path)
        return path


def _register_once(registry: CollectorRegistry, collector: SpargeCollector) -> None:
    # NOTE: the collector object survives fork(), and so does its registration.
    if registry not in collector.registries:
        registry.register(collector)
        collector.registries.add(registry)


def _make_private_dir(pid: int) -> _OwnedDir:
    """Create this process's directory ``<tmp>/sparge-metrics-<pid>-<random>`` with its owner
    marker, after removing the stale directories of earlier processes (``_remove_stale_dirs``)."""
    base = tempfile.gettempdir()
    _remove_stale_dirs(base)
    path = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{pid}-", dir=base)
    try:
        fd = os.open(os.path.join(path, _MARKER), os.O_WRONLY | os.O_CREAT | os.O_EXCL
                     | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        os.rmdir(path)  # empty: nothing but what mkdtemp just made
        raise
    try:
        # Locked before the token is written: a scanner that reads the token finds the lock held.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        token = secrets.token_hex(16)
        os.write(fd, f"{_MARKER_MAGIC} {token} {pid}\n".encode())
    except OSError:
        os.close(fd)
        os.unlink(os.path.join(path, _MARKER))
        os.rmdir(path)
        raise
    return _OwnedDir(path, pid, token, fd)


def _read_marker(path: str) -> tuple[int, str] | None:
    """Open ``path``'s owner marker: (its file descriptor, its token), or None when ``path`` is
    not a directory this package created (no marker, a link, or other content)."""
    try:
        fd = os.open(os.path.join(path, _MARKER), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        text = os.read(fd, 256).decode("ascii", "replace") if stat.S_ISREG(st.st_mode) else ""
    except OSError:
        text = ""
    parts = text.split()
    if len(parts) != 3 or parts[0] != _MARKER_MAGIC or len(parts[1]) != 32:
        os.close(fd)
        return None
    return fd, parts[1]


def _remove_stale_dirs(base: str) -> list[str]:
    """Remove the directories earlier processes created and did not remove (killed servers).

    A directory is removed only when it carries this package's owner marker and the marker's lock
    is free: the creating process holds that lock for its whole life (and so do processes it
    forked), whatever its pid or PID namespace. Anything else, a user's ``sparge-metrics-*``
    directory included, is left alone. Returns the removed paths.
    """
    uid = os.getuid()
    removed = []
    for d in glob.glob(os.path.join(glob.escape(base), _DIR_PREFIX + "*")):
        try:
            st = os.lstat(d)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            continue  # a link, a file, or another user's
        marker = _read_marker(d)
        if marker is None:
            continue  # not made by this package
        fd, _ = marker
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its owner (or a process it forked) is alive
        try:
            shutil.rmtree(d)
            removed.append(d)
            logger.debug("sparge metrics: removed %s, left by a process that exited", d)
        except OSError as e:
            logger.warning("sparge metrics: cannot remove the stale directory %s (%s); remove it "
                           "by hand", d, e)
        finally:
            os.close(fd)
    return removed


def _remove_private_dir(owned: _OwnedDir) -> None:
    """Remove the directory this process created, if its marker still holds our token."""
    # NOTE: atexit handlers survive fork(); only the creating process removes the directory.
    if os.getpid() != owned.pid:
        return
    try:
        if not os.path.lexists(owned.path):
            return  # already gone: nothing of ours to remove
        marker = _read_marker(owned.path)
        if marker is None or marker[1] != owned.token:
            logger.warning("sparge metrics: %s is no longer the directory this process created "
                           "(its owner marker changed); leaving it", owned.path)
            if marker is not None:
                os.close(marker[0])
            return
        os.close(marker[0])
        shutil.rmtree(owned.path, ignore_errors=True)
    finally:
        if owned.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(owned.fd)
            owned.fd = -1  # never close a number the process may have reused


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a whole file (the thresholds file's digest comes with the loaded object:
    ``Thresholds.sha256``)."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
