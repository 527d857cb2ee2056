"""GPU timing shared by the benchmarks: one callable's median (:func:`bench`), and several
callables timed in turns (:func:`interleaved`), which is how a speed-up over a baseline is
measured.

A GPU's clock drifts over a run: a long run at full tensor throughput heats it, and its power
limit then lowers the clock. On an H100 at 128K tokens, calls that take FLASH_ATTN's time when
timed in turns with it measured 3-7% slower than it when each was timed after the other, a
minute into the run (``fa3_dense_call.py``). A baseline timed once at the start of a run and a
row timed minutes later compare a cool GPU with a hot one; timed in turns, both see the same
clocks.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import triton


def bench(fn) -> float:
    """Median ms of ``fn`` (triton's ``do_bench``: L2 flushed before each call)."""
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def interleaved(fns: dict[str, Callable[[], object]], budget_ms: float = 5000.0,
                min_rounds: int = 7, max_rounds: int = 100,
                timer: Callable[[Callable[[], object]], float] | None = None) -> dict[str, float]:
    """Median ms of each of ``fns``, timed in turns: each round calls every one of them once,
    in order, so that a drift of the GPU's clock over the rounds falls alike on all of them. As
    many rounds as fit ``budget_ms`` of timed calls (by a first estimate: one timed call of
    each), at least ``min_rounds`` and at most ``max_rounds``. ``timer``: ms of one call (default
    :func:`cuda_call_ms`)."""
    timer = timer or cuda_call_ms
    for fn in fns.values():  # compiles and caches warm
        fn()
    first = sum(timer(fn) for fn in fns.values())
    rounds = int(min(max_rounds, max(min_rounds, budget_ms // max(first, 1e-3))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return {name: statistics.median(t) for name, t in times.items()}


_FLUSH: list[torch.Tensor] = []


def cuda_call_ms(fn: Callable[[], object]) -> float:
    """ms of one call of ``fn`` on the GPU, as in a run of calls back to back: an untimed call
    first, so that the GPU is busy while the host issues the timed one (a layer's host work
    overlaps the GPU's, as in serving), then L2 flushed (256 MiB written), then the timed call
    between CUDA events; one synchronisation at the end."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.int8, device="cuda"))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    _FLUSH[0].zero_()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)
