"""Shared test setup.

Without CUDA, Triton kernels run under Triton's CPU interpreter; the variable must be set before any
kernel module is imported. Tests marked ``gpu`` skip cleanly without CUDA.

Under pytest-xdist (the README's ``-n 2``) each worker runs torch on one CPU thread (and so do the
processes it starts): with torch's own intra-op threads on top, two workers oversubscribe a
2-core machine, whose OpenMP threads then spin waiting on each other (the calibration tests took
ten times the CPU time).
"""

import logging
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine, see README)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """Where kernel tests run: the GPU if there is one, else the CPU under TRITON_INTERPRET=1."""
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def vllm_log(caplog):
    """vLLM's loggers do not propagate to the root logger: attach caplog's handler to 'vllm'."""
    log = logging.getLogger("vllm")
    log.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG, logger="vllm")
    yield caplog
    log.removeHandler(caplog.handler)


@pytest.fixture
def fresh_backend_state(monkeypatch):
    """No cached backend runtime or metrics object, no SPARGE_* settings in the environment, no
    metric files: the backend starts as in a new process."""
    import sparge_serve.backend.runtime as runtime
    import sparge_serve.metrics as metrics
    import sparge_serve.metrics.stats as metrics_stats

    monkeypatch.setattr(runtime, "_RUNTIMES", {})
    monkeypatch.setattr(metrics_stats, "_STATS", None)
    for var in ("SPARGE_THRESHOLDS", "SPARGE_MIN_SPARSE_LEN", "SPARGE_MODE",
                "SPARGE_DENSE_LAYERS", metrics.METRICS_DIR_ENV, "PROMETHEUS_MULTIPROC_DIR"):
        monkeypatch.delenv(var, raising=False)
