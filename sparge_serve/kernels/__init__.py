"""SpargeAttn prefill kernels over vLLM's paged KV cache (torch + Triton; never imports vLLM
except ``fa3``, the FlashAttention-3 attention path, loaded only where it runs).

See docs/DESIGN.md for the exact semantics and ``sparge_serve.reference`` for the oracle.

Modules: ``geometry`` (constants, the batch and block-map descriptions; no torch), ``checks``
(the entry points' argument checks), ``pooling`` and ``predictor`` (stage 1), ``attention``
and ``softmax`` (stage 2), ``plan`` (head chunks), ``prefill`` (both stages), ``launch``, ``warmup`` and
``fa3`` (stage 2 through FlashAttention-3). The names below are imported on first use, so that
``sparge_serve.kernels.geometry`` loads without torch or Triton.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "BLKK": "geometry",
    "BLKQ": "geometry",
    "MAP_BUDGET": "geometry",
    "MAX_KEY_BLOCKS": "geometry",
    "PV_SKIP_OFF": "geometry",
    "SUPPORTED_HEAD_DIMS": "geometry",
    "BlockMap": "geometry",
    "KVScales": "geometry",
    "PrefillBatch": "geometry",
    "num_blocks": "geometry",
    "FP8_DTYPE": "checks",
    "SUPPORTED_DTYPES": "checks",
    "predict_block_map": "predictor",
    "sparse_paged_attention": "attention",
    "prefill_scratch_bytes": "plan",
    "sparge_paged_prefill": "prefill",
}

__all__ = [
    "BLKK",
    "BLKQ",
    "FP8_DTYPE",
    "MAP_BUDGET",
    "MAX_KEY_BLOCKS",
    "PV_SKIP_OFF",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "BlockMap",
    "KVScales",
    "PrefillBatch",
    "num_blocks",
    "predict_block_map",
    "prefill_scratch_bytes",
    "sparge_paged_prefill",
    "sparse_paged_attention",
]

if TYPE_CHECKING:
    from sparge_serve.kernels.attention import sparse_paged_attention
    from sparge_serve.kernels.checks import FP8_DTYPE, SUPPORTED_DTYPES
    from sparge_serve.kernels.geometry import (
        BLKK,
        BLKQ,
        MAP_BUDGET,
        MAX_KEY_BLOCKS,
        PV_SKIP_OFF,
        SUPPORTED_HEAD_DIMS,
        BlockMap,
        KVScales,
        PrefillBatch,
        num_blocks,
    )
    from sparge_serve.kernels.plan import prefill_scratch_bytes
    from sparge_serve.kernels.predictor import predict_block_map
    from sparge_serve.kernels.prefill import sparge_paged_prefill


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
