"""The hot path: per-process ``sparge_*`` counters, sampled timings and their suspension.

A worker's backend adds into one :class:`SpargeStats` (``get_sparge_stats``); the plugin wraps
vLLM's start-up and dummy runs in ``metrics_suspended()``. See the package docstring
(``sparge_serve.metrics``) for the call sites, the sync hazards and what suspension drops.
"""

from __future__ import annotations

import atexit
import bisect
import collections
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sparge_serve.metrics.export import MetricFileWriter, default_sink_dir
from sparge_serve.metrics.series import THRESHOLDS_INFO_LABELS, TIME_BUCKETS, FallbackReason

if TYPE_CHECKING:
    import torch

# NOTE: a child of vLLM's "vllm" logger so that our lines use vLLM's handler and level.
logger = logging.getLogger(f"vllm.{__name__}")


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
        self._writer: MetricFileWriter | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._write_lock = threading.Lock()
        self.write_interval_s = float(write_interval_s)
        if sink_dir is not None:
            self._writer = MetricFileWriter(sink_dir, self.model_name, num_layers, self.pid)
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
