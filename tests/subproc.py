"""Subprocesses of the GPU tests (engines, servers, captures) whose logs survive a hang.

A child's output goes straight to a file (in ``$SPARGE_TEST_LOG_DIR`` when set, the GPU machine's
result folder), never through a pipe that dies with a killed pytest. The child runs in its own
process group with ``PYTHONFAULTHANDLER=1``; on a timeout the whole group gets SIGABRT first, so
every Python process in it (vLLM's workers too) writes its threads' stacks into the log before it
dies: a hang then says where it hung.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def log_path(name: str, fallback_dir: Path) -> Path:
    """Where the log of child ``name`` goes: ``$SPARGE_TEST_LOG_DIR/name.log`` or the fallback."""
    log_dir = Path(os.environ.get("SPARGE_TEST_LOG_DIR") or fallback_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir / f"{name}.log"


def timeout_s(default: float) -> float:
    """A child's time limit: ``$SPARGE_TEST_CHILD_TIMEOUT`` (seconds) or the test's default."""
    return float(os.environ.get("SPARGE_TEST_CHILD_TIMEOUT") or default)


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in a new process group, stdout and stderr into ``log``."""
    with log.open("w") as f:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def group_running(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, which wait only to be reaped,
    do not count; without ``/proc``, whether any process of the group exists)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # fields after the command's closing parenthesis: state, ppid, pgrp, ...
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 60) -> None:
    """Signal the child's whole group, give every process in it up to ``grace`` seconds to end
    (a worker still writing its stacks when its parent has died included), then kill what is
    left."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    while time.monotonic() < deadline and group_running(proc.pid):
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    """Poll ``url`` (a server's health endpoint) until it answers. A server that exits raises
    ``AssertionError`` with its log's tail; one that does not answer within ``timeout`` seconds is
    stopped with SIGABRT first, so that every process in it writes its stacks into ``log``."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, tail(log)
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                stop(proc, signal.SIGABRT, grace=30)
                raise AssertionError(f"the server did not answer {url} within {timeout:.0f} s; "
                                     f"stacks and log in {log}") from None
            time.sleep(2)


def run_logged(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> None:
    """Run ``cmd`` to the end; raise ``AssertionError`` with the log's tail if it fails or hangs."""
    proc = start(cmd, env, log)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop(proc, signal.SIGABRT, grace=30)  # faulthandler: every process dumps its stacks
        raise AssertionError(f"{' '.join(cmd[-3:])} hung: killed after {timeout:.0f} s; "
                             f"stacks and log in {log}:\n{tail(log)}") from None
    finally:
        stop(proc, grace=10)  # leftovers of the group (a worker that outlived its parent)
    if rc != 0:
        raise AssertionError(f"{' '.join(cmd[-3:])} failed (rc {rc}); log {log}:\n{tail(log)}")


# NOTE: the lent GPU machines have NVLink multicast switched off (and using it can take a shared
# host's GPUs out of service). vLLM 0.26's all-reduce + RMSNorm fusion auto-selects FlashInfer's
# "mnnvl" all-reduce, which needs multicast: on a 2-GPU H200 it crashed the workers with an illegal
# memory access in the profiling run. Multi-GPU tests therefore keep every collective on NCCL (which
# honours NCCL_NVLS_ENABLE=0): no fused all-reduce, no custom all-reduce. What they test, our
# backend's per-rank head slicing, does not depend on how vLLM all-reduces.
NCCL_ONLY_ENGINE_ARGS = {"disable_custom_all_reduce": True,
                         "compilation_config": {"pass_config": {"fuse_allreduce_rms": False}}}
# Multi-GPU engines spawn their workers: with a forked worker, CUDA "cannot re-initialize".
MULTI_GPU_ENV = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
NCCL_ONLY_SERVE_FLAGS = ["--disable-custom-all-reduce",
                         "--compilation-config", '{"pass_config": {"fuse_allreduce_rms": false}}']
