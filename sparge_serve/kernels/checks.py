"""Argument checks of the kernels' public entry points (``ValueError`` before any launch).

The checks are for direct callers of ``predict_block_map``, ``sparse_paged_attention``,
``sparge_paged_prefill`` and ``fa3_sparse_attention`` (docs/DESIGN.md, "Argument checks"). The
planned path checks its settings once per step (``plan.plan_prefill``) and nothing per layer
(``prefill.run_prefill``): the backend validates its thresholds at load and builds its batches
itself.
"""

from __future__ import annotations

import math
import numbers

import torch

from sparge_serve.kernels.geometry import (
    BLKK,
    BLKQ,
    MAX_KEY_BLOCKS,
    PV_SKIP_OFF,
    SUPPORTED_HEAD_DIMS,
    BlockMap,
    KVScales,
    PrefillBatch,
    mask_words,
    num_blocks,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
"""The model dtypes the kernels compute in (query, output, unquantised KV cache)."""
FP8_DTYPE = torch.float8_e4m3fn
"""The fp8 format the kernels read from a quantised KV cache (vLLM's ``--kv-cache-dtype fp8`` /
``fp8_e4m3``) and from a query the attention layer quantised, with :class:`KVScales`."""
_DTYPES_RULE = ("float16 or bfloat16, or float8_e4m3fn (vLLM's fp8 / fp8_e4m3 KV cache) with "
                "scales=KVScales(k_scale, v_scale)")


# NOTE: the checks that read the values of tensors (thresholds, batch offsets, lengths, page ids)
# read them on the host: free for CPU tensors, a device synchronisation for device tensors, which
# ``check_finite=False`` skips together with the rest of the batch checks.


def _on_host(t: torch.Tensor, check_values: bool) -> torch.Tensor | None:
    """``t``'s values on the host: itself on the CPU, a copy (a sync) with ``check_values``, else
    ``None`` (its value checks are skipped)."""
    if t.device.type == "cpu":
        return t
    return t.cpu() if check_values else None


def check_paged_inputs(q: torch.Tensor, key_cache: torch.Tensor, value_cache=None,
                       scales: KVScales | None = None, check_values: bool = True) -> None:
    """Raise ``ValueError`` (before any launch) for layouts/dtypes the kernels do not support:
    ``q`` and the caches in one model dtype, or fp8 caches (and optionally an fp8 ``q``) with
    their :class:`KVScales` (:func:`check_scales`)."""
    for name, t in (("q", q), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
    if q.dtype not in (*SUPPORTED_DTYPES, FP8_DTYPE):
        raise ValueError(f"q dtype {q.dtype} unsupported; supported: {_DTYPES_RULE}")
    head_dim = q.shape[2]
    check_head_dim(head_dim)
    caches = [key_cache] if value_cache is None else [key_cache, value_cache]
    for name, c in zip(("key_cache", "value_cache"), caches, strict=False):
        if c.dim() != 4 or c.shape[3] != head_dim:
            raise ValueError(
                f"{name} must be [num_pages, page_size, num_kv_heads, {head_dim}] (vLLM's "
                f"FlashAttention layout), got shape {tuple(c.shape)}"
            )
        if c.dtype not in (*SUPPORTED_DTYPES, FP8_DTYPE):
            raise ValueError(f"{name} dtype {c.dtype} unsupported; supported: {_DTYPES_RULE}")
        if c.dtype != FP8_DTYPE and q.dtype == FP8_DTYPE:
            raise ValueError(f"q is float8_e4m3fn but {name} is {c.dtype}: an fp8 query comes "
                             "with an fp8 KV cache")
        if c.dtype != FP8_DTYPE and c.dtype != q.dtype:
            raise ValueError(f"{name} dtype {c.dtype} differs from q dtype {q.dtype}: an "
                             "unquantised cache holds the model's dtype")
        if c.stride(3) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride {c.stride(3)})")
        if c.device != q.device:
            raise ValueError(f"{name} is on {c.device}, q on {q.device}")
    if value_cache is not None and value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache shape {tuple(value_cache.shape)} differs from key_cache "
                         f"shape {tuple(key_cache.shape)}: pass one layer's K and V caches")
    if value_cache is not None and value_cache.dtype != key_cache.dtype:
        raise ValueError(f"value_cache dtype {value_cache.dtype} differs from key_cache dtype "
                         f"{key_cache.dtype}")
    if q.stride(2) != 1:
        raise ValueError("q must be contiguous in head_dim")
    if q.shape[1] % key_cache.shape[2]:
        raise ValueError(
            f"{q.shape[1]} query heads are not a multiple of {key_cache.shape[2]} KV heads"
        )
    check_scales(q, key_cache, scales, check_values)


def check_scales(q: torch.Tensor, key_cache: torch.Tensor, scales: KVScales | None,
                 check_values: bool = True) -> None:
    """``ValueError`` unless ``scales`` matches the dtypes: :class:`KVScales` exactly when the
    cache is fp8, with a ``q_scale`` exactly when ``q`` is; each a one-element fp32 tensor on
    ``q``'s device, finite and > 0 (the values: read on the host for CPU tensors always, for
    device tensors with ``check_values``, a sync)."""
    fp8_cache, fp8_q = key_cache.dtype == FP8_DTYPE, q.dtype == FP8_DTYPE
    if scales is None:
        if fp8_cache:
            raise ValueError("key_cache is float8_e4m3fn: pass its dequantisation scales, "
                             "scales=KVScales(k_scale, v_scale) (vLLM's layer._k_scale and "
                             "layer._v_scale)")
        if fp8_q:
            raise ValueError("q is float8_e4m3fn: pass scales=KVScales(k_scale, v_scale, "
                             "q_scale) with an fp8 KV cache")
        return
    if not isinstance(scales, KVScales):
        raise ValueError(f"scales must be a KVScales, got {type(scales).__name__}")
    if not fp8_cache:
        raise ValueError(f"scales are for fp8 KV caches; key_cache is {key_cache.dtype}: pass "
                         "scales=None")
    if fp8_q != (scales.q_scale is not None):
        raise ValueError("scales.q_scale must be given exactly when q is float8_e4m3fn (a query "
                         f"the attention layer quantised); q is {q.dtype}")
    for name in ("k_scale", "v_scale", "q_scale"):
        t = getattr(scales, name)
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.float32:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t)
            raise ValueError(f"scales.{name} must be a one-element float32 tensor, got {got}")
        if t.device != q.device:
            raise ValueError(f"scales.{name} is on {t.device}, q on {q.device}")
        value = _on_host(t, check_values)
        if value is not None and not (math.isfinite(float(value)) and float(value) > 0):
            raise ValueError(f"scales.{name} is {float(value):g}: a dequantisation scale is "
                             "finite and > 0")


def check_out_and_layout(q, key_cache, value_cache, out) -> None:
    """``ValueError`` for an ``out`` unlike ``q`` (shape, dtype, device, unit stride in head_dim)
    or K and V caches of different layouts."""
    if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.stride(2) != 1:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out must have q's shape {tuple(q.shape)} and be contiguous in "
                         f"head_dim, got {got}")
    if q.dtype == FP8_DTYPE:
        if out.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"out dtype {out.dtype} unsupported for an fp8 q: the output is in "
                             "the model's dtype (float16 or bfloat16)")
    elif out.dtype != q.dtype:
        raise ValueError(f"out dtype {out.dtype} differs from q dtype {q.dtype}: allocate out "
                         "like q (torch.empty_like(q))")
    if out.device != q.device:
        raise ValueError(f"out is on {out.device}, q on {q.device}: allocate out on q's device")
    if key_cache.stride() != value_cache.stride():
        raise ValueError("key_cache and value_cache must share one layout (strides)")


def check_scale(scale) -> None:
    """``ValueError`` unless ``scale`` (the softmax scale) is a finite number > 0."""
    try:
        value = float(scale)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"scale must be a number (the softmax scale, usually head_dim ** -0.5), "
                         f"got {type(scale).__name__}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"scale must be finite and > 0 (the softmax scale, usually head_dim ** "
                         f"-0.5), got {value}")


THRESHOLD_RANGES = {
    "simthreshd1": (-1.0, 1.0, "in [-1, 1] (1: no block is similar, every block is kept)"),
    "cdfthreshd": (0.0, 1.0, "in [0, 1] (1: every block is kept; 0: only the forced blocks and "
                             "the most probable one)"),
    "pvthreshd": (0.0, math.inf, f">= 0 ({PV_SKIP_OFF:g} or more turns the PV skip off)"),
}
"""Valid values of each per-head threshold: ``(low, high, rule)``, both ends included."""


def check_head_thresholds(name: str, t: torch.Tensor, num_heads: int, device, check_finite: bool,
                          check_range: bool = True):
    """Per-head thresholds must be fp32 ``[num_heads]`` on the kernels' device, finite and (with
    ``check_range``) in their :data:`THRESHOLD_RANGES` range (values: on CPU tensors always, on
    device tensors with ``check_finite``, a host sync)."""
    if not isinstance(t, torch.Tensor) or t.shape != (num_heads,) or t.dtype != torch.float32:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        dtype = t.dtype if isinstance(t, torch.Tensor) else None
        raise ValueError(
            f"{name} must be a float32 tensor of shape ({num_heads},) (one value per local query "
            f"head), got {shape} {dtype}"
        )
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    # NOTE: a host sync for device tensors; the backend validates its thresholds once at load
    # and passes False.
    values = _on_host(t, check_finite)
    if values is None:
        return
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contains NaN or inf: recalibrate or fix the thresholds file")
    lo, hi, rule = THRESHOLD_RANGES[name]
    bad = torch.nonzero((values < lo) | (values > hi)).flatten()
    if check_range and bad.numel():
        h = int(bad[0])
        raise ValueError(f"{name}[{h}] = {float(values[h]):g} is out of range: it must be {rule}; "
                         "recalibrate or fix the thresholds file")


def _check_bound(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"batch.{name} must be a host int >= 1 (a bound on every request's "
                         f"{name[4:]}), got {value!r}")


def check_batch(q: torch.Tensor, key_cache: torch.Tensor, batch: PrefillBatch,
                check_values: bool = True) -> None:
    """``ValueError`` (before any launch) for batch metadata the kernels would misread: wrong
    dtypes, devices or shapes, and (reading the values on the host) offsets outside ``q``, a
    ``max_query_len`` or ``max_seq_len`` below some request's length (rows past it would never
    be computed), a ``query_len`` above its ``seq_len``, or block-table entries that are no page
    of the cache.

    Runs for CPU tensors, and for device tensors with ``check_values`` (a host sync). Without it
    a device batch is not checked at all: the backend builds its batches itself, and the checks
    cost host time on every layer call (about 14 us on a 2-core CPU host).
    """
    if not check_values and q.device.type != "cpu":
        return
    if not isinstance(batch, PrefillBatch):
        raise ValueError(f"batch must be a PrefillBatch, got {type(batch).__name__}")
    metadata = (("query_start_loc", batch.query_start_loc, 1), ("seq_lens", batch.seq_lens, 1),
                ("block_table", batch.block_table, 2))
    for name, t, dims in metadata:
        if not isinstance(t, torch.Tensor) or t.dim() != dims or t.dtype != torch.int32:
            got = (f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor)
                   else type(t).__name__)
            raise ValueError(f"batch.{name} must be a {dims}-D int32 tensor, got {got}")
        if t.device != q.device:
            raise ValueError(f"batch.{name} is on {t.device}, q on {q.device}: the batch "
                             "metadata must live on q's device")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"batch.{name} must be contiguous in its last dimension, got "
                             f"stride {t.stride(-1)}")
    nreq = batch.seq_lens.shape[0]
    if nreq < 1:
        raise ValueError("batch.seq_lens is empty: a batch needs at least one request")
    if batch.query_start_loc.shape[0] != nreq + 1 or batch.block_table.shape[0] != nreq:
        raise ValueError(f"batch has {nreq} seq_lens, so query_start_loc must have {nreq + 1} "
                         f"entries and block_table {nreq} rows; got "
                         f"{batch.query_start_loc.shape[0]} and {batch.block_table.shape[0]}")
    _check_bound("max_query_len", batch.max_query_len)
    _check_bound("max_seq_len", batch.max_seq_len)

    # the values (on the host: a copy of device tensors, a sync)
    qsl, seq = batch.query_start_loc.cpu().long(), batch.seq_lens.cpu().long()
    q_lens = qsl[1:] - qsl[:-1]
    if qsl[0] < 0:
        raise ValueError(f"batch.query_start_loc[0] is {int(qsl[0])}: offsets into q start at 0 "
                         "or later")
    down = torch.nonzero(q_lens < 0).flatten()
    if down.numel():
        r = int(down[0])
        raise ValueError(f"batch.query_start_loc decreases at request {r} ({int(qsl[r])} -> "
                         f"{int(qsl[r + 1])}): offsets must be non-decreasing")
    if qsl[-1] > q.shape[0]:
        raise ValueError(f"batch.query_start_loc ends at {int(qsl[-1])} but q has {q.shape[0]} "
                         "rows: pass the q (and out) that these offsets index")
    if batch.rows is not None and tuple(batch.rows) != (int(qsl[0]), int(qsl[-1])):
        raise ValueError(f"batch.rows is {batch.rows} but batch.query_start_loc spans rows "
                         f"({int(qsl[0])}, {int(qsl[-1])}): pass those (or rows=None)")
    r = int(q_lens.argmax())
    if q_lens[r] > batch.max_query_len:
        raise ValueError(f"batch.max_query_len {batch.max_query_len} is less than request {r}'s "
                         f"query_len {int(q_lens[r])}: rows past it would never be computed; "
                         "pass the longest query_len (or more)")
    short = torch.nonzero(seq < q_lens).flatten()
    if short.numel():
        r = int(short[0])
        raise ValueError(f"request {r}'s query_len {int(q_lens[r])} exceeds its seq_len "
                         f"{int(seq[r])}: batch.seq_lens counts the whole context, the new "
                         "tokens included")
    r = int(seq.argmax())
    if seq[r] > batch.max_seq_len:
        raise ValueError(f"batch.max_seq_len {batch.max_seq_len} is less than request {r}'s "
                         f"seq_len {int(seq[r])}: pass the longest seq_len (or more)")
    num_pages, page = key_cache.shape[0], key_cache.shape[1]
    pages = (seq + page - 1) // page
    r = int(pages.argmax())
    if pages[r] > batch.block_table.shape[1]:
        raise ValueError(f"request {r}'s seq_len {int(seq[r])} needs {int(pages[r])} pages of "
                         f"{page} tokens, but batch.block_table has {batch.block_table.shape[1]} "
                         "columns")
    table = batch.block_table.cpu()
    used = torch.arange(table.shape[1])[None, :] < pages[:, None]
    bad = torch.nonzero(used & ((table < 0) | (table >= num_pages)))
    if bad.numel():
        r, c = (int(x) for x in bad[0])
        raise ValueError(f"batch.block_table[{r}, {c}] = {int(table[r, c])} is no page of the "
                         f"KV cache (key_cache has {num_pages} pages: ids 0..{num_pages - 1})")


def check_block_map(bm: BlockMap, batch: PrefillBatch, num_heads: int, device,
                    block_n: int = BLKK, as_mask: bool | None = None) -> None:
    """``ValueError`` (before any launch) unless ``bm`` is a block map of ``batch``'s rows for
    ``num_heads`` query heads on ``device``, with key blocks of ``block_n``: as lists
    (``as_mask=False``: :attr:`BlockMap.lut`), bit sets (``True``: :attr:`BlockMap.mask`) or
    either (``None``)."""
    if not isinstance(bm, BlockMap):
        raise ValueError(f"block_map must be a BlockMap (predict_block_map's), got "
                         f"{type(bm).__name__}")
    if as_mask is None:
        as_mask = bm.mask is not None
    table, kind = (bm.mask, "mask") if as_mask else (bm.lut, "lut")
    if table is None:
        raise ValueError(f"block_map has no {kind} (head-chunked calls keep only the counts): "
                         f"make it with predict_block_map(as_mask={as_mask})")
    rows = (batch.num_reqs, num_heads, num_blocks(batch.max_query_len, BLKQ))
    nkb = num_blocks(batch.max_seq_len, block_n)
    width = mask_words(nkb) if as_mask else nkb
    dtype = torch.int32 if as_mask else torch.int16
    for name, t, want in (("count", bm.count, torch.int32), (kind, table, dtype)):
        if tuple(t.shape[:3]) != rows:
            raise ValueError(f"block_map was predicted for a different batch or heads: its {name} "
                             f"has rows {tuple(t.shape[:3])}, this call (requests, heads, query "
                             f"blocks) {rows}")
        if t.dtype != want or t.device != device or not t.is_contiguous():
            raise ValueError(f"block_map.{name} must be a contiguous {want} tensor on {device}, "
                             f"got {t.dtype} on {t.device} (contiguous: {t.is_contiguous()})")
    if bm.count.dim() != 3 or table.dim() != 4 or table.shape[3] < width:
        raise ValueError(f"block_map.{kind} must be [R, Hq, NQB, >= {width}] for contexts of "
                         f"{batch.max_seq_len} tokens in key blocks of {block_n}, got shape "
                         f"{tuple(table.shape)} (count: {tuple(bm.count.shape)}): predict it "
                         "for this batch")


def check_group(group: int | None, num_heads: int, num_kv_heads: int) -> int:
    """Query heads per KV head for (slices of) ``num_heads`` and ``num_kv_heads`` heads:
    ``group`` (``ValueError`` unless the slices pair up under it), or ``Hq // Hkv``."""
    if group is None:
        return num_heads // num_kv_heads
    if group < 1 or not (num_heads == group * num_kv_heads or (
            num_kv_heads == 1 and num_heads < group and group % num_heads == 0)):
        raise ValueError(f"{num_heads} query heads and {num_kv_heads} KV heads are no head chunk "
                         f"of a layer with {group} query heads per KV head")
    return group


def stats_buffer(stats: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The block counters the kernels add into: ``stats`` (int64 ``[3]``: valid, kept and
    PV-skipped key blocks) after checking it, or a fresh zeroed one to discard."""
    if stats is None:
        return torch.zeros(3, dtype=torch.int64, device=device)
    if stats.dtype != torch.int64 or stats.shape != (3,) or stats.stride(0) != 1 or (
            stats.device != device):
        raise ValueError(f"stats must be a contiguous int64 [3] tensor on {device}; got "
                         f"{stats.dtype} {tuple(stats.shape)} strides {stats.stride()} on "
                         f"{stats.device}")
    return stats


def check_predictor_args(q, key_cache, batch, scale, simthreshd1, cdfthreshd, topk,
                         check_finite, scales: KVScales | None = None):
    """``ValueError`` (before any launch) for bad stage-1 arguments."""
    check_paged_inputs(q, key_cache, None, scales, check_finite)
    check_batch(q, key_cache, batch, check_finite)
    check_scale(scale)
    check_head_thresholds("simthreshd1", simthreshd1, q.shape[1], q.device, check_finite)
    # NOTE: top-k mode never reads cdfthreshd: any finite value passes
    check_head_thresholds("cdfthreshd", cdfthreshd, q.shape[1], q.device, check_finite,
                          check_range=topk is None)
    check_topk(topk)
    check_context_len(batch.max_seq_len)


def check_head_dim(head_dim: int) -> None:
    """``ValueError`` unless the kernels compile for ``head_dim``."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} unsupported; supported: {SUPPORTED_HEAD_DIMS}")


def check_topk(topk: float | None) -> None:
    """``ValueError`` unless ``topk`` is ``None`` (CDF selection) or in (0, 1]."""
    if topk is not None and not 0.0 < topk <= 1.0:
        raise ValueError(f"topk must be in (0, 1], got {topk}")


def check_context_len(max_seq_len: int) -> None:
    """``ValueError`` for contexts beyond the predictor's :data:`MAX_KEY_BLOCKS` key blocks."""
    if num_blocks(max_seq_len, BLKK) > MAX_KEY_BLOCKS:
        raise ValueError(
            f"context of {max_seq_len} tokens exceeds the predictor's limit of "
            f"{MAX_KEY_BLOCKS * BLKK}; serve such prompts dense (min_sparse_len / mode=dense)"
        )


def check_fp8_dot(q: torch.Tensor, key_cache: torch.Tensor) -> None:
    """``ValueError`` unless ``q`` and the cache are fp8 (what ``fp8_dot`` multiplies)."""
    if q.dtype != FP8_DTYPE or key_cache.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_dot needs an fp8 query and KV cache (float8_e4m3fn, with their "
                         f"scales); got q {q.dtype}, key_cache {key_cache.dtype}")
