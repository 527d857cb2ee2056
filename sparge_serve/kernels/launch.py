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
launcher directly. Launch hooks (profilers), the interpreter (``TRITON_INTERPRET=1``) and
``SPARGE_FAST_LAUNCH=0`` (or ``false``/``no``/``off``; should a Triton other than the pinned 3.6
change its internals) take the plain path.
"""

from __future__ import annotations

import os

import torch
from triton import knobs
from triton.runtime import driver

from sparge_serve.config import env_flag

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# NOTE: sparge_serve.config imports neither vLLM nor torch: one boolean parser for every SPARGE_*
# flag (1/0, true/false, yes/no, on/off; anything else raises, naming the variable).
FAST = env_flag("SPARGE_FAST_LAUNCH", default=True)


def _hooked() -> bool:
    """Whether a launch hook is set (a profiler's). NOTE: Triton 3.6's hooks are chains, never
    None, empty unless one is added; a plain hook (older Tritons) counts when not None."""
    hooks = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


class Launcher:
    """``Launcher(fn)[grid](*args, **kwargs)``: as ``fn[grid](*args, **kwargs)``."""

    def __init__(self, fn):
        self.fn = fn
        self._compiled: dict[tuple, object] = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def run(self, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        if _INTERPRET or not FAST or _hooked():
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
