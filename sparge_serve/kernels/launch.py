"""Kernel launches without most of Triton's per-launch Python.

``kernel[grid](*args)`` costs 20-24 µs of host time per launch in Triton 3.6 (41 µs with TMA
descriptors; H200 host, ``benchmarks/results/host_overhead_profile.txt``), of which the compiled
kernel's own launcher is 6-11 µs: the rest is ``JITFunction.run`` binding and specialising the
arguments, re-reading knobs, the device and the stream, building a string cache key, checking
globals and calling the (empty) launch-hook chains. A head-chunked prefill launches 3-4 kernels a
chunk, 16 chunks a 32K call. Through this module a launch costs 12-19 µs (34 with descriptors).

:func:`launch` (``launch(kernel, grid)(*args)`` for ``kernel[grid](*args)``) keeps a
:class:`Launcher` per ``@triton.jit`` function: each launch still runs Triton's own binder (the
argument specialisation: dtypes, 16-byte alignment, integer values that the kernel specialises
on), so it selects exactly the variant ``JITFunction.run`` would; the first launch of each
variant goes through ``JITFunction.run`` (compiling it), later ones call that compiled kernel's
launcher directly.

The plain ``kernel[grid](*args)`` path is taken (:func:`fast_path`) when the fast one is off
(:func:`set_fast_launch`; the backend sets it once per process from ``SpargeConfig.fast_launch``,
env ``SPARGE_FAST_LAUNCH``), under the interpreter (``TRITON_INTERPRET=1``), while a launch hook
is set (profilers), and when Triton's internals are not the ones this module re-implements
(:func:`internals_problem`: another Triton than the pinned 3.6 may move them; logged once).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os

import torch
import triton
from triton import knobs
from triton.runtime import driver

# NOTE: a child of vLLM's "vllm" logger, as sparge_serve.config's
logger = logging.getLogger(f"vllm.{__name__}")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether Triton's CPU interpreter runs the kernels (``TRITON_INTERPRET=1``)."""
FAST = True
"""Whether launches may take the fast path (:func:`set_fast_launch`)."""

# What the fast path re-implements of Triton 3.6's JITFunction.run: the binder it calls, the
# compiled kernel's launcher and its argument order. Compared without blanks.
_JIT_RUN_PARAMS = ["self", "args", "grid", "warmup", "kwargs"]
_JIT_RUN_CODE = (
    "stream = driver.active.get_current_stream(device)",
    "kernel_cache, kernel_key_cache, target, backend, binder = self.device_caches[device]",
    "bound_args, specialization, options = binder(*args, **kwargs)",
    "kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, "
    "launch_metadata, knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, "
    "*bound_args.values())",
)


def set_fast_launch(enabled: bool) -> None:
    """Turn the fast path on or off for this process (``SpargeConfig.fast_launch``)."""
    global FAST
    FAST = bool(enabled)


def internals_problem() -> str | None:
    """Why Triton's internals differ from what the fast path expects, or ``None``: the
    signature of ``JITFunction.run`` and its code that the fast path repeats (the stream, the
    binder, the compiled kernel's launcher with its arguments and the launch-hook knobs), and the
    compiled kernel's ``run`` launcher."""
    try:
        from triton.compiler.compiler import CompiledKernel
        from triton.runtime.jit import JITFunction

        params = list(inspect.signature(JITFunction.run).parameters)
        source = "".join(inspect.getsource(JITFunction.run).split())
    except (ImportError, AttributeError, OSError, TypeError, ValueError) as e:
        return f"JITFunction.run cannot be read ({type(e).__name__}: {e})"
    if params != _JIT_RUN_PARAMS:
        return f"JITFunction.run takes {params}, not {_JIT_RUN_PARAMS}"
    for code in _JIT_RUN_CODE:
        if "".join(code.split()) not in source:
            return f"JITFunction.run does not run `{code}`"
    if not isinstance(inspect.getattr_static(CompiledKernel, "run", None), property):
        return "CompiledKernel has no `run` launcher property"
    return None


@functools.cache
def _internals_ok() -> bool:
    problem = internals_problem()
    if problem is not None:
        logger.warning("SPARGE: kernel launches take Triton's own path (JITFunction.run): the "
                       "fast launch path does not know Triton %s (%s)", triton.__version__,
                       problem)
    return problem is None


def _hooked() -> bool:
    """Whether a launch hook is set (a profiler's). NOTE: Triton 3.6's hooks are chains, never
    None, empty unless one is added; a plain hook (older Tritons) counts when not None."""
    hooks = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


def fast_path() -> bool:
    """Whether a launch now takes the fast path: on (:func:`set_fast_launch`), compiled (not the
    interpreter), no launch hook set, and Triton's internals as expected (checked once per
    process; a mismatch is logged once)."""
    return FAST and not INTERPRET and not _hooked() and _internals_ok()


class Launcher:
    """``Launcher(fn)[grid](*args, **kwargs)``: as ``fn[grid](*args, **kwargs)``."""

    def __init__(self, fn):
        self.fn = fn
        self._compiled: dict[tuple, object] = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def run(self, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        if not fast_path():
            self.fn[grid](*args, **kwargs)
            return
        device = torch.cuda.current_device()
        # NOTE: the binder JITFunction.run calls (device_caches[device] is created on first use)
        bound, specialization, options = self.fn.device_caches[device][4](*args, **kwargs)
        key = (device, *specialization, *options.items())
        compiled = self._compiled.get(key)
        if compiled is None:
            self._compiled[key] = self.fn[grid](*args, **kwargs)
            return
        stream = driver.active.get_current_stream(device)
        g = (*grid, 1, 1)
        compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None,
                     None, None, *bound.values())


_LAUNCHERS: dict[object, Launcher] = {}


def launch(fn, grid: tuple[int, ...]):
    """``fn[grid]`` (a ``@triton.jit`` function) through its :class:`Launcher`."""
    launcher = _LAUNCHERS.get(fn)
    if launcher is None:
        launcher = _LAUNCHERS.setdefault(fn, Launcher(fn))
    return launcher[grid]
