"""The export path: per-process metric files, the collector that merges them, the bridge that
routes them to vLLM's ``/metrics``, and the private directory they live in.

See the package docstring (``sparge_serve.metrics``) for how worker counters reach the API
server's ``/metrics`` in both of vLLM's registry modes.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import glob
import logging
import multiprocessing
import os
import secrets
import shutil
import stat
import tempfile
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

from sparge_serve.metrics.series import (
    ATTENTION_HISTOGRAM,
    BLOCK_COUNTERS,
    FALLBACKS,
    PATHS,
    PREDICTOR_HISTOGRAM,
    THRESHOLDS_INFO,
    TIME_BUCKETS,
    TOKENS,
    FallbackReason,
)

# NOTE: a child of vLLM's "vllm" logger so that our lines use vLLM's handler and level.
logger = logging.getLogger(f"vllm.{__name__}")

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


def default_sink_dir() -> str | None:
    """Where this process's files go: ``PROMETHEUS_MULTIPROC_DIR`` when set (vLLM then serves a
    MultiProcessCollector over it), else the bridge's private directory, else nowhere."""
    for var in ("PROMETHEUS_MULTIPROC_DIR", METRICS_DIR_ENV):
        d = os.environ.get(var)
        if d and os.path.isdir(d):
            return d
    return None


class MetricFileWriter:
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
             for name, doc in BLOCK_COUNTERS]
            for layer in range(num_layers)
        ]
        name, doc = TOKENS
        self._token_keys = [
            [_key(name, name + "_total", {**m, "layer": str(layer), "path": p}, doc)
             for p in PATHS]
            for layer in range(num_layers)
        ]
        name, doc = FALLBACKS
        self._fallback_keys = {
            r: _key(name, name + "_total", {**m, "reason": r.value}, doc) for r in FallbackReason}
        self._hist_keys = {}
        for which, (name, doc) in (("attention_hist", ATTENTION_HISTOGRAM),
                                   ("predictor_hist", PREDICTOR_HISTOGRAM)):
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
            name, doc = THRESHOLDS_INFO
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
    marker is there and unlocked (``_remove_stale_dirs``); never anything by its name or pid. A
    child started by ``multiprocessing`` (engine core, workers, extra API servers) uses the
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
