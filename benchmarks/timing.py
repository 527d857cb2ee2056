"""GPU timing shared by the benchmarks: one callable's median (:func:`bench`), and several
callables timed in turns (:func:`interleaved`), which is how a speed-up over a baseline is
measured.

A GPU's clock drifts over a run: a long run at full tensor throughput heats it, and its power
limit then lowers the clock. On an H100 at 128K tokens, calls that take FLASH_ATTN's time when
timed in turns with it measured 3-7% slower than it when each was timed after the other, a
minute into the run (``benchmarks/results/fa3_dense_call_sequential.md`` against
``fa3_dense_call.md``). A baseline timed once at the start of a run and a
row timed minutes later compare a cool GPU with a hot one; timed in turns, both see the same
clocks. Within milliseconds the clock also follows the running kernel's power draw, so one call
straight after another function's is no measure either: at 32K on an H100, single calls in turns
took 13.0 ms for FA3 bf16 and 15.1 ms for FLASH_ATTN-fp8, against 13.9 and 13.3 ms back to
back. So a turn is a block of calls, and only its second half is timed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch
import triton


def bench(fn) -> float:
    """Median ms of ``fn`` (triton's ``do_bench``: L2 flushed before each call)."""
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def interleaved(fns: dict[str, Callable[[], object]], budget_ms: float = 5000.0,
                min_rounds: int = 9, max_rounds: int = 50, block_ms: float = 150.0,
                timer: Callable[[Callable[[], object], int], list[float]] | None = None,
                ) -> dict[str, float]:
    """Median ms of a call of each of ``fns``, timed in turns: each round runs every one of
    them in order, each as a block of calls back to back (``block_ms``, 2 calls at least). A
    block's first half is untimed-over: it brings the GPU's clock to that function's steady
    state (its power draw sets the clock within milliseconds, so a call straight after another
    function's runs at that one's clock); its second half's median is the block's time. The
    result is each function's median over the rounds, so that a drift of the clock over the
    rounds (heat) falls alike on all of them. As many rounds as fit ``budget_ms`` (by a first
    estimate: the second of two calls of each), at least ``min_rounds`` and at most
    ``max_rounds``.
    ``timer(fn, n)``: the ms of each of ``n`` calls of ``fn`` run back to back (default
    :func:`cuda_calls_ms`)."""
    timer = timer or cuda_calls_ms
    for fn in fns.values():  # compiles and caches warm
        fn()
    estimate = {name: max(timer(fn, 2)[1], 1e-3) for name, fn in fns.items()}
    calls = {name: max(2, math.ceil(block_ms / t)) for name, t in estimate.items()}
    one_round = sum(calls[name] * t for name, t in estimate.items())
    rounds = int(min(max_rounds, max(min_rounds, budget_ms // one_round)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            block = timer(fn, calls[name])
            times[name].append(statistics.median(block[len(block) // 2:]))
    return {name: statistics.median(t) for name, t in times.items()}


_FLUSH: list[torch.Tensor] = []


def cuda_calls_ms(fn: Callable[[], object], n: int) -> list[float]:
    """ms of each of ``n`` calls of ``fn`` run back to back on the GPU (as a layer's host work
    overlaps the GPU's in serving, the host issues a call while the GPU runs the one before),
    each after L2 is flushed (256 MiB written) and between CUDA events; one synchronisation
    at the end."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.int8, device="cuda"))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]
    for start, end in events:
        _FLUSH[0].zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]
