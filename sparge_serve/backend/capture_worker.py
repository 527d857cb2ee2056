"""Calibration capture inside vLLM's GPU workers, for tensor parallelism > 1.

With tensor parallelism every GPU worker is its own process, so a sink installed in the calibration
driver's process (``sparge_serve.backend.capture``) sees nothing. ``sparge-calibrate --driver vllm
--tensor-parallel-size N`` builds the engine with ``worker_extension_cls=EXTENSION`` instead: vLLM
mixes :class:`CaptureWorkerExtension` into every worker, and the driver calls it through
``LLM.collective_rpc`` (method names and plain arguments only, nothing pickled by us)::

    llm.collective_rpc("sparge_capture_start", args=(out_dir,))   # each worker installs a sink
    llm.collective_rpc("sparge_capture_set_prompt", args=(p,))    # before generating prompt p
    summaries = llm.collective_rpc("sparge_capture_stop")         # sinks removed; one dict a rank

Each worker's sink (:class:`RankWriter`) writes every captured sample, one safetensors file each
(never pickle), to ``out_dir/rank{R}/L{layer}-P{prompt}-C{chunk}.safetensors`` (``R`` = the
worker's tensor-parallel rank; ``chunk`` numbers the prefill chunks of one (layer, prompt), from 0):

- tensors ``q [Lq, Hq/tp, D]`` and ``k``, ``v [Lk, Hkv/tp, D]``: this rank's heads (query heads
  ``[R*Hq/tp, (R+1)*Hq/tp)``, KV heads likewise), post-RoPE, in the cache dtype, on the CPU;
- string metadata ``layer``, ``prompt``, ``chunk``, ``rank``, ``tp_size``, ``layer_name`` and
  ``scale`` (``repr`` of the float, exact).

The driver merges the ranks' files (``sparge_calibrate.vllm_driver.merge_rank_captures``).
Imports only the standard library at import time (vLLM resolves the extension in every worker at
start-up); torch, safetensors and the capture hook are imported when a method runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "EXTENSION",
    "CaptureWorkerExtension",
    "RankWriter",
    "parse_sample_name",
    "rank_dir",
    "read_sample",
    "sample_name",
]

EXTENSION = "sparge_serve.backend.capture_worker.CaptureWorkerExtension"

_SAMPLE = re.compile(r"^L(\d+)-P(\d+)-C(\d+)\.safetensors$")


def rank_dir(out_dir: str, rank: int) -> str:
    """The directory rank ``rank`` writes its samples to."""
    return os.path.join(out_dir, f"rank{rank}")


def sample_name(layer: int, prompt: int, chunk: int) -> str:
    return f"L{layer:04d}-P{prompt:06d}-C{chunk:03d}.safetensors"


def parse_sample_name(name: str) -> tuple[int, int, int] | None:
    """``(layer, prompt, chunk)`` of a sample file name, or ``None`` for any other name."""
    m = _SAMPLE.match(name)
    return None if m is None else (int(m.group(1)), int(m.group(2)), int(m.group(3)))


def read_sample(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """``({"q", "k", "v"} CPU tensors, metadata)`` of one sample file."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


class RankWriter:
    """Capture sink of one tensor-parallel rank: writes each sample to ``rank_dir(out_dir, rank)``.

    A write error is recorded (first one only; later samples are dropped) and reported by
    :meth:`summary` rather than raised.
    """

    def __init__(self, out_dir: str, rank: int, tp_size: int,
                 layers: Sequence[int] | None = None) -> None:
        self.rank, self.tp_size = int(rank), int(tp_size)
        self.keep = None if layers is None else frozenset(int(i) for i in layers)  # None: all
        self.dir = rank_dir(out_dir, self.rank)
        os.makedirs(self.dir, exist_ok=True)
        if os.listdir(self.dir):
            raise RuntimeError(f"capture directory {self.dir} is not empty; the capture needs an "
                               "empty directory (remove the old capture or pick another one)")
        self.prompt = -1
        self.samples_per_layer: dict[int, int] = {}
        self.bytes = 0
        self.error: str | None = None
        self._chunks: dict[tuple[int, int], int] = {}

    def set_prompt(self, prompt: int) -> None:
        """Attach the samples that follow to prompt ``prompt`` (the driver's prompt index)."""
        self.prompt = int(prompt)

    def __call__(self, layer_idx: int, q, k, v, info) -> None:
        # NOTE: problems are recorded, not raised: an exception here would abort the worker's
        # forward pass and the engine would die with a message that does not say why.
        if self.error is not None or (self.keep is not None and int(layer_idx) not in self.keep):
            return
        if self.prompt < 0:
            self.error = (f"rank {self.rank}: a prefill was captured before "
                          "sparge_capture_set_prompt (the driver must set the prompt index first)")
            return
        from safetensors.torch import save_file

        key = (int(layer_idx), self.prompt)
        chunk = self._chunks.get(key, 0)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in (("q", q), ("k", k),
                                                                           ("v", v))}
        meta = {"layer": str(key[0]), "prompt": str(self.prompt), "chunk": str(chunk),
                "rank": str(self.rank), "tp_size": str(self.tp_size),
                "layer_name": str(info.layer_name), "scale": repr(float(info.scale))}
        path = os.path.join(self.dir, sample_name(key[0], self.prompt, chunk))
        try:
            save_file(tensors, path, metadata=meta)
        except OSError as e:
            self.error = f"rank {self.rank}: writing {path} failed ({e})"
            return
        self._chunks[key] = chunk + 1
        self.samples_per_layer[key[0]] = self.samples_per_layer.get(key[0], 0) + 1
        self.bytes += sum(t.numel() * t.element_size() for t in tensors.values())

    def summary(self) -> dict[str, Any]:
        """What this rank wrote: ``rank``, ``tp_size``, ``dir``, ``samples_per_layer`` (layer
        index as a string -> sample count), ``bytes`` (tensor data) and ``error`` (or ``None``)."""
        return {"rank": self.rank, "tp_size": self.tp_size, "dir": self.dir,
                "samples_per_layer": {str(k): n for k, n in sorted(self.samples_per_layer.items())},
                "bytes": self.bytes, "error": self.error}


class CaptureWorkerExtension:
    """Mixed into every vLLM GPU worker (``LLM(worker_extension_cls=EXTENSION)``); its methods are
    called with ``LLM.collective_rpc(name, args=...)`` and run in each worker process."""

    def sparge_capture_start(self, out_dir: str, layers: Sequence[int] | None = None) -> None:
        """Install a :class:`RankWriter` sink writing under ``out_dir/rank{R}`` (``layers``
        only, if given)."""
        from sparge_serve.backend import capture

        if capture.get_sink() is not None:
            raise RuntimeError("a capture sink is already installed in this worker; call "
                               "sparge_capture_stop first")
        rank, size = self._sparge_tp_rank_and_size()
        self._sparge_writer = RankWriter(out_dir, rank, size, layers)
        capture.set_sink(self._sparge_writer)

    def sparge_capture_set_prompt(self, prompt: int) -> None:
        """Attach the following captures to prompt ``prompt``."""
        self._sparge_active().set_prompt(prompt)

    def sparge_capture_stop(self) -> dict[str, Any]:
        """Remove the sink; return its :meth:`RankWriter.summary`."""
        from sparge_serve.backend import capture

        writer = self._sparge_active()
        capture.clear_sink()
        self._sparge_writer = None
        return writer.summary()

    def _sparge_active(self) -> RankWriter:
        writer = getattr(self, "_sparge_writer", None)
        if writer is None:
            raise RuntimeError("no capture is running in this worker; call sparge_capture_start "
                               "first")
        return writer

    def _sparge_tp_rank_and_size(self) -> tuple[int, int]:
        from vllm.distributed.parallel_state import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
