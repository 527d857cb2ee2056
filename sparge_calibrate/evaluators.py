"""Error oracles for the search: the PyTorch reference (CPU) and the serving kernels (CUDA).

Both implement :class:`sparge_calibrate.search.Evaluator`. The kernel evaluator is what calibration
should use on a GPU: errors are measured with the same kernels that serve. The reference
is the CPU fallback (it loops over heads and query blocks in Python: fine for small models, e.g.
Gemma 3 270M at 32K tokens in under an hour on two cores, and for CI).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparge_serve.kernels.geometry import PrefillBatch, num_blocks
from sparge_serve.reference import (
    block_sparse_attention_ref,
    dense_causal_attention_ref,
    predict_block_map_ref,
)

from .search import Evaluation, Sample, output_errors

__all__ = ["KernelEvaluator", "ReferenceEvaluator", "dense_attention", "make_evaluator"]

logger = logging.getLogger(__name__)

PAGE_SIZE = 64
"""Page size of the kernel evaluator's KV cache: one key block (``BLKK``) per page, a dense layout,
so the attention kernel can load key blocks with TMA on Hopper. The computed attention is the same
for every page size; only the load path differs."""


def _stack(rows: list[tuple[torch.Tensor, ...]]) -> Evaluation:
    """Rows of per-sample ``(l1, cosine, rmse, kept, valid[, pv_skipped])`` -> an Evaluation."""
    cols = list(zip(*rows, strict=True))
    l1, cos, rmse = (torch.stack(c).float().cpu() for c in cols[:3])
    kept, valid = (torch.stack(c).long().cpu() for c in cols[3:5])
    pv = torch.stack(cols[5]).long().cpu() if len(cols) > 5 else None
    return Evaluation(l1, cos, rmse, kept, valid, pv)


# ------------------------------------------------------------------------------------------------
# reference (CPU)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RefLayer:
    samples: list[Sample]  # fp32, CPU
    refs: list[torch.Tensor]  # dense outputs [Lq, Hq, D] fp32
    scale: float


class ReferenceEvaluator:
    """``sparge_serve.reference`` in fp32 on the CPU.

    Stage 1 runs once per sample for all heads (``predict_block_map_ref`` takes per-head threshold
    vectors); stage 2 runs on single-head slices so the PV-skip count is known per head.
    """

    name = "reference"

    def prepare(self, samples: Sequence[Sample], scale: float) -> _RefLayer:
        fp = [Sample(*(t.detach().float().cpu() for t in (s.q, s.k, s.v))) for s in samples]
        refs = [dense_causal_attention_ref(s.q, s.k, s.v, scale) for s in fp]
        return _RefLayer(fp, refs, float(scale))

    def _run(self, s: Sample, scale, sim, cdf, pv):
        keep, valid = predict_block_map_ref(s.q, s.k, scale, sim, cdf)
        hq, hkv = s.q.shape[1], s.k.shape[1]
        group = hq // hkv
        out = torch.empty(s.q.shape, dtype=torch.float32)
        skipped = torch.zeros(hq, dtype=torch.int64)
        for h in range(hq):
            kv = slice(h // group, h // group + 1)
            o, n = block_sparse_attention_ref(
                s.q[:, h : h + 1], s.k[:, kv], s.v[:, kv], keep[h : h + 1], scale, pv[h : h + 1]
            )
            out[:, h] = o[:, 0]
            skipped[h] = n
        kept = keep.flatten(1).sum(1)
        return out, kept, torch.full((hq,), int(valid.sum())), skipped

    def evaluate(self, prepared: _RefLayer, simthreshd1, cdfthreshd, pvthreshd) -> Evaluation:
        rows = []
        for s, ref in zip(prepared.samples, prepared.refs, strict=True):
            out, kept, valid, skipped = self._run(
                s, prepared.scale, simthreshd1, cdfthreshd, pvthreshd
            )
            rows.append((*output_errors(out, ref), kept, valid, skipped))
        return _stack(rows)

    def sparse_attention(self, sample: Sample, scale, simthreshd1, cdfthreshd, pvthreshd):
        s = Sample(*(t.detach().float().cpu() for t in (sample.q, sample.k, sample.v)))
        out, kept, valid, _ = self._run(s, float(scale), simthreshd1, cdfthreshd, pvthreshd)
        return out.to(sample.q.dtype).to(sample.q.device), kept, valid


# ------------------------------------------------------------------------------------------------
# serving kernels (CUDA)
# ------------------------------------------------------------------------------------------------


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense bottom-right-causal attention in fp32 on q's device, ``[Lq, Hq, D]``.

    fp32 SDPA with a lower-right causal bias (memory-efficient kernel on CUDA), one KV group at a
    time with K/V materialised per group (no stride-0 expand), so memory stays bounded at long
    contexts. Same result as ``dense_causal_attention_ref``.
    """
    from torch.nn.attention.bias import causal_lower_right

    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    bias = causal_lower_right(lq, lk)
    for g in range(hkv):
        qg = q[:, g * group : (g + 1) * group].float().transpose(0, 1)[None]  # [1, G, Lq, D]
        kg, vg = (t[:, g].float()[None, None].expand(1, group, lk, -1).contiguous() for t in (k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, attn_mask=bias, scale=scale)
        out[:, g * group : (g + 1) * group] = o[0].transpose(0, 1)
    return out


@dataclass(frozen=True)
class _KernelLayer:
    q: torch.Tensor  # [sum Lq, Hq, D] model dtype, CUDA
    key_cache: torch.Tensor  # [S * pages, PAGE_SIZE, Hkv, D]: sample s owns pages s*pages...
    value_cache: torch.Tensor
    batch: PrefillBatch
    refs: list[torch.Tensor]  # dense fp32 outputs per sample, CUDA
    bounds: list[tuple[int, int]]  # rows of each sample in q
    scale: float


class KernelEvaluator:
    """``sparge_serve.kernels.sparge_paged_prefill`` on CUDA: the kernels that serve.

    All samples of a layer form one varlen batch over a paged cache (contiguous pages of
    ``PAGE_SIZE`` per sample; a fixed page size compiles the kernels once, whatever the lengths),
    so one step is one kernel launch pair. PV skips are only counted per layer by the
    kernels, so ``pv_skipped`` is None.
    """

    name = "kernels"

    def __init__(self, device: str | torch.device = "cuda", dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        # NOTE: CPU tensors only run under Triton's interpreter (TRITON_INTERPRET=1: tests)
        interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("the kernel evaluator needs a CUDA GPU; use ReferenceEvaluator")
        if self.device.type == "cpu" and not interpret:
            raise RuntimeError("the kernel evaluator runs on CUDA (or on the CPU under "
                               "TRITON_INTERPRET=1, for tests); use ReferenceEvaluator")
        from sparge_serve import kernels  # triton; imported only here

        if not hasattr(kernels, "sparge_paged_prefill"):
            raise ImportError("sparge_serve.kernels has no sparge_paged_prefill")
        self._kernels = kernels
        self.dtype = dtype

    def _dtype(self, t: torch.Tensor) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return t.dtype if t.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16

    def _paged(self, samples: Sequence[Sample]):
        dev = self.device
        dtype = self._dtype(samples[0].q)
        lens_q = [s.q.shape[0] for s in samples]
        lens_k = [s.k.shape[0] for s in samples]
        _, hkv, d = samples[0].k.shape
        pages = num_blocks(max(lens_k), PAGE_SIZE)
        kc = torch.zeros(len(samples), pages * PAGE_SIZE, hkv, d, dtype=dtype, device=dev)
        vc = torch.zeros_like(kc)
        for i, s in enumerate(samples):
            kc[i, : lens_k[i]] = s.k.to(dev, dtype)
            vc[i, : lens_k[i]] = s.v.to(dev, dtype)
        q = torch.cat([s.q.to(dev, dtype) for s in samples]).contiguous()
        starts = [0]
        for n in lens_q:
            starts.append(starts[-1] + n)
        i32 = dict(dtype=torch.int32, device=dev)
        batch = PrefillBatch(
            query_start_loc=torch.tensor(starts, **i32),
            seq_lens=torch.tensor(lens_k, **i32),
            block_table=torch.arange(len(samples) * pages, **i32).view(len(samples), pages),
            max_query_len=max(lens_q),
            max_seq_len=max(lens_k),
        )
        bounds = list(zip(starts[:-1], starts[1:], strict=True))
        shape = (len(samples) * pages, PAGE_SIZE, hkv, d)
        return q, kc.view(shape), vc.view(shape), batch, bounds, kc, vc

    def prepare(self, samples: Sequence[Sample], scale: float) -> _KernelLayer:
        q, kc, vc, batch, bounds, k_rows, v_rows = self._paged(samples)
        # NOTE: the reference is fp32 dense attention on the *rounded* (model-dtype) inputs the
        # kernels see, so the measured error is the kernels' total error, rounding included.
        refs = [
            dense_attention(q[a:b], k_rows[i, : s.k.shape[0]], v_rows[i, : s.k.shape[0]], scale)
            for i, (s, (a, b)) in enumerate(zip(samples, bounds, strict=True))
        ]
        return _KernelLayer(q, kc, vc, batch, refs, bounds, float(scale))

    def _launch(self, layer: _KernelLayer, sim, cdf, pv):
        dev = self.device
        th = [t.to(dev, torch.float32).contiguous() for t in (sim, cdf, pv)]
        out = torch.empty_like(layer.q)
        bm = self._kernels.sparge_paged_prefill(
            layer.q, layer.key_cache, layer.value_cache, layer.batch, layer.scale, *th, out
        )
        # rows past a request's query never ran (count 0): do not count their n_valid
        n_valid = torch.where(bm.count > 0, bm.n_valid, 0)
        return out, bm.count.sum(-1), n_valid.sum(-1)  # [R, Hq] each

    def evaluate(self, prepared: _KernelLayer, simthreshd1, cdfthreshd, pvthreshd) -> Evaluation:
        out, kept, valid = self._launch(prepared, simthreshd1, cdfthreshd, pvthreshd)
        rows = [
            (*output_errors(out[a:b], ref), kept[i], valid[i])
            for i, ((a, b), ref) in enumerate(zip(prepared.bounds, prepared.refs, strict=True))
        ]
        return _stack(rows)

    def sparse_attention(self, sample: Sample, scale, simthreshd1, cdfthreshd, pvthreshd):
        q, kc, vc, batch, bounds, _, _ = self._paged([sample])
        layer = _KernelLayer(q, kc, vc, batch, [], bounds, float(scale))
        out, kept, valid = self._launch(layer, simthreshd1, cdfthreshd, pvthreshd)
        return out.to(sample.q.dtype).to(sample.q.device), kept[0].cpu(), valid[0].cpu()


def make_evaluator(device: str) -> ReferenceEvaluator | KernelEvaluator:
    """The kernels on ``cuda`` when importable (else the reference, with a warning); the reference
    on ``cpu``."""
    if device == "cpu":
        return ReferenceEvaluator()
    try:
        return KernelEvaluator(device)
    except (ImportError, RuntimeError) as e:
        logger.warning(
            "serving kernels unavailable (%s); measuring errors with the CPU reference (slow)", e
        )
        return ReferenceEvaluator()

