"""Flash-attention steps of the sparse attention kernel (``attention._attend_row``).

One step folds a key block's raw scores ``q.k`` and values into a row tile's running max ``m``,
row sum ``l`` and fp32 accumulator: the online softmax (:func:`_online_softmax_update`), or with
FlashAttention-4's conditional rescaling (:func:`_lazy_softmax_update`, ``attention.LAZY_RESCALE``).
``UPCAST`` (Triton's CPU interpreter) runs the products in fp32 from the operands' values, and
rounds P as the GPU does (:func:`_rounded_p`). ``KEY_ORDER``: the values' keys lie in
:func:`~sparge_serve.kernels.pooling.key_order` (V from its K-major copy), and P's are put in it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sparge_serve.kernels.pooling import key_order


@triton.jit
def _rounded_p(p, dtype):
    """``P`` (fp32, >= 0) rounded to ``dtype`` as the GPU rounds it, back in fp32: the
    interpreter's own fp32 -> fp8 e4m3 cast loses the carry of a rounded-up mantissa (0.4964
    becomes 0.25), so fp8 is rounded here, to nearest (normal numbers: 3 mantissa bits, ties to
    even; below 2**-6: multiples of 2**-9, ties up)."""
    if dtype == tl.float8e4nv:
        bits = p.to(tl.int32, bitcast=True)
        normal = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
        return tl.where(p < 0.015625, tl.floor(p * 512.0 + 0.5) / 512.0,
                        normal.to(tl.float32, bitcast=True))
    return p.to(dtype).to(tl.float32)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """``tl.dot``; ``UPCAST``: of the operands in fp32 (exact), as Triton 3.6's interpreter
    computes a bf16 ``tl.dot`` wrongly (it multiplies the raw bits)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _online_softmax_update(acc, l_i, m_i, qk, qk_scale, v, UPCAST: tl.constexpr,
                           KEY_ORDER: tl.constexpr = False):
    """One flash-attention step with raw scores ``qk`` (``q.k``; ``qk * qk_scale`` is the log2
    domain) and values ``v``.

    NOTE: scale and max-subtraction fuse into one FMA per score, and ``P.V`` accumulates into
    ``acc`` in the matrix unit (no separate tile add), as in Triton's fused-attention tutorial.
    """
    m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return _pv_acc(p, v, acc * alpha[:, None], UPCAST, KEY_ORDER), l_i, m_new


@triton.jit
def _pv_acc(p, v, acc, UPCAST: tl.constexpr, KEY_ORDER: tl.constexpr = False):
    """``acc + P.V`` in the matrix unit (``p`` rounded to ``v``'s dtype, as FlashAttention)."""
    if UPCAST:
        p = _rounded_p(p, v.dtype)
        v = v.to(tl.float32)
    else:
        p = p.to(v.dtype)
    if KEY_ORDER:
        p = key_order(p)
    return tl.dot(p, v, acc)


@triton.jit
def _lazy_softmax_update(acc, l_i, m_i, qk, qk_scale, v, LAZY: tl.constexpr,
                         UPCAST: tl.constexpr, KEY_ORDER: tl.constexpr = False):
    """``_online_softmax_update`` with FlashAttention-4's conditional rescaling (PV skip off;
    :data:`LAZY_RESCALE`): the running max moves, and ``acc``/``l_i`` are rescaled, only
    when some row's block max exceeds it by more than ``LAZY`` (log2 units). Otherwise the scores
    are exponentiated against the stale max (``p <= 2**LAZY``): the same result after the final
    ``acc / l_i``, up to rounding, with most blocks spared the ``[M, D]`` rescale."""
    m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
    if tl.max(m_new - m_i, axis=0) > LAZY:  # program-uniform; always on the first block (-inf)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha
        acc = acc * alpha[:, None]
        m_i = m_new
    p = tl.exp2(qk * qk_scale - m_i[:, None])
    l_i += tl.sum(p, axis=1)
    return _pv_acc(p, v, acc, UPCAST, KEY_ORDER), l_i, m_i


@triton.jit
def _softmax_step(acc, l_i, m_i, qk, qk_scale, v, LAZY: tl.constexpr, UPCAST: tl.constexpr,
                  KEY_ORDER: tl.constexpr = False):
    """``_lazy_softmax_update`` with ``LAZY`` > 0, else ``_online_softmax_update``."""
    if LAZY > 0:
        return _lazy_softmax_update(acc, l_i, m_i, qk, qk_scale, v, LAZY, UPCAST, KEY_ORDER)
    return _online_softmax_update(acc, l_i, m_i, qk, qk_scale, v, UPCAST, KEY_ORDER)
