"""SpargeAttn prefill kernels over vLLM's paged KV cache (torch + triton only; never imports vLLM).

See docs/DESIGN.md for the exact semantics and ``sparge_serve.reference`` for the oracle.
"""

from sparge_serve.kernels.attention import sparge_paged_prefill, sparse_paged_attention
from sparge_serve.kernels.chunks import MAP_BUDGET, prefill_scratch_bytes
from sparge_serve.kernels.geometry import BLKK, BLKQ, PV_SKIP_OFF, PrefillBatch, num_blocks
from sparge_serve.kernels.predictor import (
    MAX_KEY_BLOCKS,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    BlockMap,
    predict_block_map,
)

__all__ = [
    "BLKK",
    "BLKQ",
    "MAP_BUDGET",
    "MAX_KEY_BLOCKS",
    "PV_SKIP_OFF",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "BlockMap",
    "PrefillBatch",
    "num_blocks",
    "predict_block_map",
    "prefill_scratch_bytes",
    "sparge_paged_prefill",
    "sparse_paged_attention",
]
