"""Block geometry and batch description shared by the kernels, the reference and the backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLKQ = 128
"""Query rows per query block (also the attention kernel's tile height)."""
BLKK = 64
"""Keys per key block (also the attention kernel's tile width)."""
PV_SKIP_OFF = 50.0
"""A ``pvthreshd`` at or above this disables the stage-2 PV skip."""
BATCH_PTRS = ["bt_ptr", "qsl_ptr", "seq_lens_ptr", "sim_ptr", "cdf_ptr", "pv_ptr", "stats_ptr",
              "count_ptr", "nvalid_ptr"]
"""Kernel pointer arguments never specialised on 16-byte alignment (``do_not_specialize_on_alignment``).

They point into caller-provided batch metadata, per-head thresholds and block counters (a layer's
row of the metrics' ``[layers, 3]`` int64 counters), which a step may pass as slices at any
4-byte offset (a mixed batch's sparse requests are a slice of vLLM's block table,
``query_start_loc`` and ``seq_lens``; a head chunk's block counts are a slice of the call's). Specialising on their alignment made serving compile a second
variant of every kernel after the start-up warm-up (seen in vLLM's JIT monitor on an H200); they
are read (counters: added to) with scalar accesses, so alignment buys nothing. Names a kernel lacks are ignored.
"""


def num_blocks(length: int, blk: int) -> int:
    return -(-length // blk)


@dataclass(frozen=True)
class PrefillBatch:
    """A variable-length batch of prefill requests over vLLM's paged KV cache.

    NOTE: queries of request ``r`` are the last ``query_len`` positions of its ``seq_len``-long
    context (bottom-right causal alignment; covers chunked prefill and prefix-cache hits).
    """

    query_start_loc: torch.Tensor  # [R + 1] int32: offsets of each request's new tokens in q/out
    seq_lens: torch.Tensor  # [R] int32: context length including the new tokens
    block_table: torch.Tensor  # [R, max_pages] int32: page ids of each request's context
    max_query_len: int  # host bound on every query_len (sizes grids; no device sync)
    max_seq_len: int  # host bound on every seq_len

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]
