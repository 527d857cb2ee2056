"""SpargeAttn prefill kernels over vLLM's paged KV cache (torch + triton only; never imports vLLM)."""

from sparge_serve.kernels.geometry import BLKK, BLKQ, PV_SKIP_OFF, PrefillBatch, num_blocks

__all__ = ["BLKK", "BLKQ", "PV_SKIP_OFF", "PrefillBatch", "num_blocks"]
