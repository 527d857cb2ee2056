"""Calibration capture hook: an explicit, process-local sink for the backend's sparse-path prefills.

The calibration tool (``sparge-calibrate --driver vllm``) installs a sink before it runs prompts and
removes it afterwards; nothing else does, and no environment variable switches it on. The sink is
per process: with tensor parallel size 1 the driver installs it in its own process (the engine runs
there), with more the worker extension ``sparge_serve.backend.capture_worker`` installs one in each
GPU worker. While a sink is installed, the backend reports the Q/K/V of every prefill it would send
to the sparse path::

    from sparge_serve.backend import capture
    if capture.get_sink() is not None:                       # cheap check, once per forward
        capture.emit_prefill(layer_idx, q, key_cache, value_cache, batch, scale, layer_name)

``emit_prefill`` slices the varlen batch per request, gathers each request's context from the paged
cache and calls ``sink(layer_idx, q, k, v, info)`` with ``q [Lq, Hq, D]`` (the request's new tokens)
and ``k, v [Lk, Hkv, D]`` (its whole context, the new tokens included, post-RoPE, local heads of this
tensor-parallel rank), all on the GPU in the cache dtype, and a :class:`CaptureInfo`. It synchronises
with the host (calibration only; never installed while serving). While capturing, the backend should
compute *dense* attention for these prefills so every layer sees the activations of the dense model.

Imports only torch and the block geometry (no vLLM), so it is cheap to import from the backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from sparge_serve.kernels.geometry import PrefillBatch, num_blocks

__all__ = [
    "CaptureInfo",
    "CaptureSink",
    "clear_sink",
    "emit_prefill",
    "get_sink",
    "set_sink",
    "sink_installed",
]


@dataclass(frozen=True)
class CaptureInfo:
    """What a sink learns about one captured prefill besides its tensors."""

    layer_name: str  # vLLM's attention layer name, e.g. "model.layers.3.self_attn.attn"
    request: int  # index of the request within this batch
    query_len: int  # new tokens (rows of q)
    seq_len: int  # context length including the new tokens (rows of k, v)
    scale: float  # the layer's softmax scale


CaptureSink = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, CaptureInfo], None]

_sink: CaptureSink | None = None


def set_sink(fn: CaptureSink | None) -> None:
    """Install ``fn`` (or remove the sink with ``None``)."""
    global _sink
    _sink = fn


def get_sink() -> CaptureSink | None:
    return _sink


def clear_sink() -> None:
    set_sink(None)


@contextlib.contextmanager
def sink_installed(fn: CaptureSink) -> Iterator[None]:
    """``with sink_installed(fn): ...`` installs ``fn`` and restores the previous sink on exit."""
    previous = _sink
    set_sink(fn)
    try:
        yield
    finally:
        set_sink(previous)


def emit_prefill(
    layer_idx: int,
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    batch: PrefillBatch,
    scale: float,
    layer_name: str = "",
) -> None:
    """Report every request of a prefill batch to the installed sink (no-op without one).

    Arguments are exactly those of ``sparge_paged_prefill``: ``q [num_tokens, Hq, D]`` (the rows of
    this batch, ``batch.query_start_loc`` offsets), caches ``[num_pages, page_size, Hkv, D]``.
    """
    sink = _sink
    if sink is None:
        return
    starts = batch.query_start_loc.tolist()  # NOTE: host sync; calibration only
    seq_lens = batch.seq_lens.tolist()
    page = key_cache.shape[1]
    for r, seq_len in enumerate(seq_lens):
        pages = batch.block_table[r, : num_blocks(seq_len, page)].long()
        k = key_cache[pages].flatten(0, 1)[:seq_len]
        v = value_cache[pages].flatten(0, 1)[:seq_len]
        qr = q[starts[r] : starts[r + 1]]
        info = CaptureInfo(layer_name, r, qr.shape[0], seq_len, float(scale))
        sink(layer_idx, qr, k, v, info)
