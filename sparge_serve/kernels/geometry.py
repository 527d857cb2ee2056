"""Block geometry, the kernels' limits and the batch and block-map descriptions.

Every constant of the sparse prefill's geometry is defined here once. The module imports neither
torch nor Triton (annotations only), so ``sparge_serve.config`` and the thresholds file format
read their constants from it without loading the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BLKQ = 128
"""Query rows per query block (also the attention kernel's tile height)."""
BLKK = 64
"""Keys per key block (also the attention kernel's tile width)."""
PV_SKIP_OFF = 50.0
"""A ``pvthreshd`` at or above this disables the stage-2 PV skip."""
MAX_KEY_BLOCKS = 16384
"""Longest context the predictor handles, in key blocks (16384 * 64 = 1M tokens)."""
SUPPORTED_HEAD_DIMS = (64, 128, 256)
"""Head dims the kernels compile for."""
MAP_BUDGET = 0.015
"""Default bound on a head chunk's buffers (pooled keys, block map, FA3 tables), as a fraction of
the K/V bytes of the batch's padded shape (``max_reqs * max_seq_len`` tokens)."""
MIN_BUDGET_BYTES = 64 << 20
"""Default floor of the budget (``map_floor``): chunks never get smaller than this. Each chunk
adds its own small launches (key pooling, select, FA3 tables) that 32K prompts at high sparsity
do not hide (H200, 32K, 16 ``fa3`` chunks: 0.98x the unchunked speed at 50% block sparsity,
0.61-0.95x at 80-90%, ``kernels_virtual.md`` of commit 5299656), so only block maps larger than
this are split: a bound on the worst case (1M-token contexts, or long prompts in one step), not a
cost at typical sizes. ``map_floor=0`` gives the pure fraction."""
BATCH_PTRS = ["bt_ptr", "qsl_ptr", "seq_lens_ptr", "sim_ptr", "cdf_ptr", "pv_ptr", "stats_ptr",
              "count_ptr", "nvalid_ptr"]
"""Kernel pointer arguments never specialised on 16-byte alignment
(``do_not_specialize_on_alignment``).

They point into caller-provided batch metadata, per-head thresholds and block counters (a layer's
row of the metrics' ``[layers, 3]`` int64 counters), which a step may pass as slices at any
4-byte offset (a mixed batch's sparse requests are a slice of vLLM's block table,
``query_start_loc`` and ``seq_lens``; a head chunk's block counts are a slice of the call's).
Specialising on their alignment made serving compile a second variant of every kernel after the
start-up warm-up (seen in vLLM's JIT monitor on an H200); they are read (counters: added to) with
scalar accesses, so alignment buys nothing. Names a kernel lacks are ignored.
"""


def num_blocks(length: int, blk: int) -> int:
    return -(-length // blk)


def key_block_stride(nkb: int) -> int:
    """Row stride of the per-key-block buffers: ``nkb`` rounded up to 16.

    NOTE: aligned rows, and the kernels (which take it as their row stride NKB) compile once for
    every context length.
    """
    return num_blocks(nkb, 16) * 16


def mask_words(nkb_stride: int) -> int:
    """int32 words of a :attr:`BlockMap.mask` row (``nkb_stride``: :func:`key_block_stride`)."""
    return num_blocks(nkb_stride, 32)


def selection_tile(nkb: int) -> int:
    """``NKB_PAD``: the selection's key-block tile for ``nkb`` key blocks (a power of two >= 16)."""
    return max(16, 1 << (max(nkb, 1) - 1).bit_length())


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
    # host [first, end) of the rows of q/out that hold the requests' new tokens, where the caller
    # knows them (the backend does): the FA3 attention path stages exactly those rows when it
    # attends several heads per launch; None: every row of q, the others kept by one more copy
    rows: tuple[int, int] | None = None

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]


@dataclass(frozen=True)
class KVScales:
    """Per-tensor dequantisation scales of an fp8 KV cache (vLLM's ``--kv-cache-dtype fp8``):
    a stored key is ``k * k_scale`` in the model's units, a value ``v * v_scale``, and a query
    quantised by the attention layer (fp8 ``q``) ``q * q_scale``.

    Each is a one-element fp32 tensor on the kernels' device (vLLM's ``layer._k_scale``,
    ``_v_scale``, ``_q_scale``): the kernels read them on the device, so a scale computed on the
    GPU never costs a host synchronisation. ``q_scale`` is ``None`` for a query in the model's
    dtype.
    """

    k_scale: torch.Tensor
    v_scale: torch.Tensor
    q_scale: torch.Tensor | None = None


@dataclass(frozen=True)
class BlockMap:
    """Kept key blocks per (request, q-head, query block) row."""

    # [R, Hq, NQB, NKB_STRIDE] int16: kept key-block ids, ascending, first `count` valid
    # (NKB_STRIDE: the key-block count rounded up to 16, `key_block_stride`); None for a map
    # built one head chunk at a time, or as bit sets
    lut: torch.Tensor | None
    count: torch.Tensor  # [R, Hq, NQB] int32: number of kept key blocks (0 for rows past the query)
    n_valid: torch.Tensor  # [R, Hq, NQB] int32: number of causally valid key blocks of the row
    # [R, Hq, NQB, mask_words(NKB_STRIDE)] int32: the kept key blocks as a bit set (block j is
    # bit j % 32 of word j // 32), the FA3 path's form (`predict_block_map(as_mask=True)`, lut
    # None then): a sixteenth of the list's bytes
    mask: torch.Tensor | None = None
