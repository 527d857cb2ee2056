"""The host-side split of one step into the sparse sub-batch and the rest (no GPU sync).

The metadata builder classifies the step's requests from host arrays (:func:`split_requests`):
prefill rows (``query_len`` beyond a (spec-)decode's), and of those the ones whose context is
long enough for the sparse path (``select_sparse_requests``) and within the predictor's limit.
:class:`StepSplits` computes that classification and its metric counts once for all the KV cache
groups of a step. :func:`sparse_sub_batch` then describes the sparse requests over the step's
device tensors: views when they are one contiguous run of rows, gathered copies otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.logger import init_logger

if TYPE_CHECKING:
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from sparge_serve.config import SpargeConfig
    from sparge_serve.kernels import PrefillBatch

# NOTE: a child of vLLM's "vllm" logger so that our lines use vLLM's handler and level.
logger = init_logger(f"vllm.{__name__}")


@dataclass
class SparsePrefill:
    """The step's sparse sub-batch (built once per step, shared by every layer)."""

    batch: PrefillBatch  # query_start_loc [R+1] int32, seq_lens [R] int32, block_table [R, P] int32
    token_index: torch.Tensor | None  # [num_tokens] int64 device: rows of q/out of the sparse
    # requests, in sub-batch order; None when those rows are one contiguous run, in which case
    # batch.query_start_loc holds absolute offsets into the step's q/out and nothing is copied.
    req_index: np.ndarray  # [R] int64 host: the sparse requests' rows in the step's batch
    num_tokens: int  # host: new tokens of the sparse requests



def select_sparse_requests(query_start_loc: np.ndarray, seq_lens: np.ndarray,
                           min_sparse_len: int, max_decode_query_len: int = 1,
                           min_sparse_query_len: int = 1) -> np.ndarray:
    """Bool mask ``[num_reqs]`` of the requests that take the sparse prefill path.

    ``query_start_loc`` ``[num_reqs + 1]`` and ``seq_lens`` ``[num_reqs]`` are host arrays; a
    request qualifies iff ``query_len > max_decode_query_len`` (a prefill / chunked prefill /
    prefix-hit extension, not a (spec-)decode), ``query_len >= min_sparse_query_len`` and
    ``seq_len >= min_sparse_len``.
    """
    query_lens = query_start_loc[1:] - query_start_loc[:-1]  # np.diff: 4x the host time
    return ((query_lens > max_decode_query_len) & (query_lens >= min_sparse_query_len)
            & (seq_lens >= min_sparse_len))


@dataclass(frozen=True)
class RequestSplit:
    """The step's requests, classified on the host (every array has one row per request)."""

    query_start_loc: np.ndarray  # [num_reqs + 1] int64 host
    query_lens: np.ndarray  # [num_reqs] int64 host: new tokens
    prompt: np.ndarray  # [num_reqs] bool host: prefill rows (query_len beyond a (spec-)decode's)
    seq_lens: np.ndarray | None  # [num_reqs] int32 host; None: the step has no host copy
    eligible: np.ndarray | None  # [num_reqs] bool host: long prefills within the predictor's
    # limit, whatever the mode; None without host seq_lens
    too_long: np.ndarray | None  # [num_reqs] bool host: beyond the predictor's limit
    sparse: np.ndarray | None  # [num_reqs] bool host: on the sparse path; None: no request is


def split_requests(qsl: np.ndarray, seq_lens: np.ndarray | None, cfg: SpargeConfig,
                   max_decode_query_len: int, max_sparse_seq_len: int) -> RequestSplit | None:
    """Classify the step's requests from ``qsl`` (``query_start_loc`` ``[num_reqs + 1]`` int64
    host) and ``seq_lens`` (``[num_reqs]`` host, None where the step has no host copy); None
    when the step has no prefill row."""
    query_lens = qsl[1:] - qsl[:-1]
    prompt = query_lens > max_decode_query_len
    if not prompt.any():
        return None
    eligible = too_long = None
    if seq_lens is not None:
        eligible = select_sparse_requests(qsl, seq_lens, cfg.min_sparse_len, max_decode_query_len,
                                          cfg.min_sparse_query_len)
        too_long = eligible & (seq_lens > max_sparse_seq_len)
        if too_long.any():
            eligible = eligible & ~too_long
            logger.warning_once("SPARGE: contexts longer than %d tokens run dense (the "
                                "predictor's limit)", max_sparse_seq_len)
    sparse = eligible if cfg.enabled and eligible is not None and eligible.any() else None
    return RequestSplit(query_start_loc=qsl, query_lens=query_lens, prompt=prompt,
                        seq_lens=seq_lens, eligible=eligible, too_long=too_long, sparse=sparse)


class StepSplits:
    """The step's :class:`RequestSplit` and :class:`StepCounts`, computed once for all the
    metadata builders of the step.

    vLLM builds the metadata of each KV cache group from the same host arrays (Gemma 3: a full
    attention group and five sliding-window groups, six builds a step), and the split is a pure
    function of their contents and the builder's settings. The last one is kept, keyed by copies
    of the arrays' bytes, never by the arrays' identity: a runner that refills its buffers in
    place is never handed another step's split.
    """

    def __init__(self) -> None:
        # (key, split, counts), replaced whole: a reader never pairs one step's key with
        # another's split
        self._last: tuple[tuple, RequestSplit | None, StepCounts | None] | None = None

    def classify(self, cam: CommonAttentionMetadata, cfg: SpargeConfig,
                 max_decode_query_len: int, max_sparse_seq_len: int, reasons: Any = None
                 ) -> tuple[RequestSplit | None, StepCounts | None]:
        """The step's split (None without a prefill row) and, given ``reasons``
        (``sparge_serve.metrics.FallbackReason``: the metrics are on), its counts."""
        num_reqs = cam.num_reqs
        qsl = cam.query_start_loc_cpu.numpy()[: num_reqs + 1]
        seq_cpu = cam.seq_lens_cpu_upper_bound
        if seq_cpu is None:
            seq_cpu = cam._seq_lens_cpu  # exact host copy where the runner kept one
        # NOTE: seq_lens_cpu_upper_bound is exact for prefill rows, the only ones used here.
        seq = None if seq_cpu is None else seq_cpu.numpy()[:num_reqs]
        key = (cfg, max_decode_query_len, max_sparse_seq_len, qsl.dtype.str, qsl.tobytes(),
               None if seq is None else (seq.dtype.str, seq.tobytes()))
        last = self._last
        if last is None or last[0] != key:
            # copies: the split outlives the runner's buffers' contents
            split = split_requests(qsl.astype(np.int64), None if seq is None else seq.copy(),
                                   cfg, max_decode_query_len, max_sparse_seq_len)
            last = self._last = (key, split, None)
        _, split, counts = last
        if reasons is None or split is None:
            return split, None
        if counts is None:
            counts = step_counts(split, cfg.enabled, reasons)
            self._last = (key, split, counts)
        return split, counts


def sparse_sub_batch(cam: CommonAttentionMetadata, split: RequestSplit, req_index: np.ndarray
                     ) -> tuple[PrefillBatch, torch.Tensor | None, torch.Tensor]:
    """The sparse requests of ``split``, at rows ``req_index`` (``[R]`` int64 host, ascending,
    R >= 1) of the step, over the step's device tensors: ``(batch, token_index, dense_seq_lens)``.

    ``token_index`` (``[num_tokens]`` int64 device) gives the rows of q/out of the sparse requests
    in sub-batch order; it is None when those rows are one contiguous run, in which case
    ``batch.query_start_loc`` holds absolute offsets into the step's q/out and nothing is copied.
    ``dense_seq_lens`` (``[num_reqs]`` int32 device) is the step's ``seq_lens`` with 0 for the
    sparse requests.
    """
    from sparge_serve.kernels import PrefillBatch

    qsl, query_lens = split.query_start_loc, split.query_lens
    num_sparse = len(req_index)
    sparse_qlens = query_lens[req_index]
    num_tokens = int(sparse_qlens.sum())
    max_query_len = int(sparse_qlens.max())
    max_seq_len = int(split.seq_lens[req_index].max())
    first, last = int(req_index[0]), int(req_index[-1])
    if last - first + 1 == num_sparse:
        # One contiguous run of requests: views only, absolute token offsets.
        batch = PrefillBatch(
            query_start_loc=cam.query_start_loc[first : last + 2],
            seq_lens=cam.seq_lens[first : last + 1],
            block_table=cam.block_table_tensor[first : last + 1],
            max_query_len=max_query_len, max_seq_len=max_seq_len,
            rows=(int(qsl[first]), int(qsl[last + 1])))
        dense_seq_lens = cam.seq_lens.clone()
        dense_seq_lens[first : last + 1] = 0
        return batch, None, dense_seq_lens
    device = cam.seq_lens.device
    sub_qsl = np.zeros(num_sparse + 1, dtype=np.int32)
    np.cumsum(sparse_qlens, out=sub_qsl[1:])
    # token i of the k-th sparse request sits at qsl[req_index[k]] + i
    tokens = (np.repeat(qsl[req_index] - sub_qsl[:-1], sparse_qlens)
              + np.arange(num_tokens, dtype=np.int64))
    req_index_dev = torch.from_numpy(req_index).to(device, non_blocking=True)
    batch = PrefillBatch(
        query_start_loc=torch.from_numpy(sub_qsl).to(device, non_blocking=True),
        seq_lens=cam.seq_lens.index_select(0, req_index_dev),
        block_table=cam.block_table_tensor.index_select(0, req_index_dev),
        max_query_len=max_query_len, max_seq_len=max_seq_len, rows=(0, num_tokens))
    token_index = torch.from_numpy(tokens).to(device, non_blocking=True)
    return batch, token_index, cam.seq_lens.index_fill(0, req_index_dev, 0)


@dataclass(frozen=True)
class StepCounts:
    """Host-side counts of one step for ``sparge_serve.metrics`` (each layer adds them)."""

    sparse_tokens: int  # prompt tokens of the requests on the sparse path
    dense_tokens: int  # prompt tokens of the other prefill requests (query_len > 1)
    sparse_reqs: int  # requests on the sparse path (a dense layer runs them dense)
    fallbacks: tuple[tuple[Any, int], ...]  # (FallbackReason, requests) dense in every layer
    dense_layer_reason: Any  # FallbackReason for sparse requests run by a dense layer

    def add_to(self, stats: Any, layer: int, ran_sparse: bool) -> None:
        """Add the step's counts of global layer ``layer`` to ``stats`` (``SpargeStats``): its
        prompt tokens by path and the dense fallbacks (the sparse requests too when the layer
        ran them dense)."""
        if ran_sparse:
            stats.count_prefill(layer, self.sparse_tokens, self.dense_tokens)
        else:
            stats.count_prefill(layer, 0, self.sparse_tokens + self.dense_tokens)
            if self.sparse_reqs:
                stats.count_fallback(self.dense_layer_reason, self.sparse_reqs)
        for reason, n in self.fallbacks:
            stats.count_fallback(reason, n)


def step_counts(split: RequestSplit, enabled: bool, reasons: Any) -> StepCounts:
    """The step's host counts for the metrics (``reasons``: ``sparge_serve.metrics.FallbackReason``;
    ``enabled``: the sparse mode is on)."""
    R, mask, query_lens = reasons, split.sparse, split.query_lens
    num_sparse_tokens = int(query_lens[mask].sum()) if mask is not None else 0
    fallbacks = []
    if split.eligible is None:
        fallbacks.append((R.UNSUPPORTED, int(split.prompt.sum())))
    else:
        fallbacks.append((R.UNSUPPORTED, int(split.too_long.sum())))
        fallbacks.append((R.SHORT_PROMPT,
                          int((split.prompt & ~split.eligible & ~split.too_long).sum())))
        if not enabled:
            fallbacks.append((R.MODE_DENSE, int(split.eligible.sum())))
    return StepCounts(
        sparse_tokens=num_sparse_tokens,
        dense_tokens=int(query_lens[split.prompt].sum()) - num_sparse_tokens,
        sparse_reqs=int(mask.sum()) if mask is not None else 0,
        fallbacks=tuple((r, n) for r, n in fallbacks if n),
        dense_layer_reason=R.DENSE_LAYER)
