"""Pure-PyTorch oracle of sparge_serve's exact SpargeAttn semantics (docs/DESIGN.md).

Readable and slow: it loops over requests and works in fp32. It is the reference for every kernel
test and the error oracle of calibration on CPU. It is never used for serving.

Shapes: a request's new queries ``q [Lq, Hq, D]`` are the *last* ``Lq`` positions of a context of
``Lk`` keys ``k, v [Lk, Hkv, D]`` (bottom-right causal alignment). Query blocks of ``BLKQ`` rows
start at the first new token; key blocks of ``BLKK`` keys are absolute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparge_serve.kernels.geometry import (
    BLKK,
    BLKQ,
    PV_SKIP_OFF,
    PrefillBatch,
    num_blocks,
)

__all__ = [
    "SpargeResult",
    "block_masks",
    "block_sparse_attention_ref",
    "dense_causal_attention_ref",
    "gather_paged_kv",
    "paged_prefill_ref",
    "predict_block_map_ref",
    "sparge_attention_ref",
    "tail_blocks",
]

_EPS = 1e-6
_LOG2E = math.log2(math.e)


def _as_head_vector(x: torch.Tensor | float, num_heads: int) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float32).flatten().cpu()
    if t.numel() == 1:
        t = t.expand(num_heads)
    if t.numel() != num_heads:
        raise ValueError(f"expected {num_heads} per-head thresholds, got {t.numel()}")
    return t.to(torch.float32)


def block_masks(lq: int, lk: int, blkq: int = BLKQ, blkk: int = BLKK):
    """Block-level validity and diagonal masks, ``[NQB, NKB]`` bool each.

    Query block ``b`` covers absolute positions ``[first, last]``; key block ``j`` is valid iff
    ``j*blkk <= last`` and diagonal iff valid and ``(j+1)*blkk - 1 >= first``: it holds a
    position at or after the first query's, so the block of the first query's own token is
    diagonal (forced in stage 1, never PV-skipped in stage 2).
    """
    nqb, nkb = num_blocks(lq, blkq), num_blocks(lk, blkk)
    ctx = lk - lq
    b = torch.arange(nqb)
    first = ctx + b * blkq
    last = ctx + torch.clamp((b + 1) * blkq, max=lq) - 1
    j = torch.arange(nkb)
    valid = (j[None, :] * blkk) <= last[:, None]
    diag = valid & ((j[None, :] + 1) * blkk - 1 >= first[:, None])
    return valid, diag


def tail_blocks(lq: int, blkq: int = BLKQ) -> torch.Tensor:
    """``[NQB]`` bool: the query blocks holding one of the last ``blkq`` queries (the last block,
    and the one before it when the last is partial). Stage 1 keeps every valid key block of their
    rows: their outputs make the token sampled after a prefill, where one skipped block can drop
    the one far token an answer copies (retrieval), for at most two query blocks a request."""
    return (torch.arange(num_blocks(lq, blkq)) + 2) * blkq > lq


def _block_pool_and_sim(x: torch.Tensor, blk: int):
    """Mean-pool ``x [L, H, D]`` (fp32) over blocks of ``blk`` real rows; self-similarity per block.

    Returns pooled ``[H, NB, D]`` and sim ``[H, NB]`` where sim = ||mean_i x_i/|x_i|||^2.
    """
    length, heads, dim = x.shape
    nb = num_blocks(length, blk)
    pad = nb * blk - length
    xp = torch.cat([x, x.new_zeros(pad, heads, dim)]) if pad else x
    xb = xp.view(nb, blk, heads, dim).permute(2, 0, 1, 3)  # [H, NB, blk, D]
    rows = torch.full((nb,), blk, dtype=torch.float32)
    if pad:
        rows[-1] = blk - pad
    pooled = xb.sum(2) / rows[None, :, None]
    unit = xb / xb.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    sim = ((unit.sum(2) / rows[None, :, None]) ** 2).sum(-1)
    return pooled, sim


def predict_block_map_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    simthreshd1,
    cdfthreshd,
    topk: float | None = None,
    blkq: int = BLKQ,
    blkk: int = BLKK,
):
    """Stage 1 for one request. Returns ``keep [Hq, NQB, NKB]`` and ``valid [NQB, NKB]`` (bool)."""
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    if lq > lk:
        raise ValueError(f"query_len {lq} exceeds context length {lk}")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    group = hq // hkv
    sim_t = _as_head_vector(simthreshd1, hq)
    cdf_t = _as_head_vector(cdfthreshd, hq)
    q32, k32 = q.detach().float().cpu(), k.detach().float().cpu()

    valid, diag = block_masks(lq, lk, blkq, blkk)
    nqb, nkb = valid.shape

    mu = k32.mean(0, keepdim=True)
    pk, ksim = _block_pool_and_sim(k32 - mu, blkk)  # [Hkv, NKB, D], [Hkv, NKB]
    pq, qsim = _block_pool_and_sim(q32, blkq)  # [Hq, NQB, D], [Hq, NQB]
    pk = pk.repeat_interleave(group, 0)
    ksim = ksim.repeat_interleave(group, 0)

    q_similar = qsim > sim_t[:, None]  # [Hq, NQB]
    k_similar = ksim > sim_t[:, None]  # [Hq, NKB]

    scores = torch.einsum("hbd,hjd->hbj", pq, pk) * scale
    allowed = valid[None] & k_similar[:, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    any_allowed = allowed.any(-1, keepdim=True)
    probs = torch.softmax(torch.where(any_allowed, scores, torch.zeros_like(scores)), dim=-1)
    probs = torch.where(allowed, probs, torch.zeros_like(probs))

    if topk is not None:
        if not 0.0 < topk <= 1.0:
            raise ValueError(f"topk must be in (0, 1], got {topk}")
        n_valid = valid.sum(-1)  # [NQB]
        n_keep = torch.clamp(torch.floor(topk * n_valid.float() + 0.5), min=1).long()
        # rank by probability descending, lower index first on ties; invalid blocks last
        key = torch.where(valid[None], probs, torch.full_like(probs, -1.0))
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(nkb).expand_as(order).contiguous())
        selected = (rank < n_keep[None, :, None]) & valid[None]
    else:
        # mass of every block at least as probable as j; tie-consistent, sort-free
        p64 = probs.double()
        desc = torch.sort(p64, dim=-1, descending=True).values
        csum = torch.cumsum(desc, dim=-1)
        asc = torch.flip(desc, dims=[-1]).contiguous()
        n_ge = nkb - torch.searchsorted(asc, p64.contiguous(), right=False)  # #{i: P_i >= P_j}
        mass_ge = torch.gather(csum, -1, (n_ge - 1).clamp_min(0))
        pmax = probs.max(-1, keepdim=True).values
        selected = (mass_ge <= cdf_t[:, None, None].double()) | (probs == pmax)
        selected &= allowed
        keep_all = (cdf_t >= 1.0)[:, None, None]
        selected = torch.where(keep_all, valid[None].expand_as(selected), selected)

    forced = (
        (~q_similar)[:, :, None]
        | (~k_similar)[:, None, :]
        | diag[None]
        | (torch.arange(nkb) == 0)[None, None, :]
        | tail_blocks(lq, blkq)[None, :, None]
    )
    keep = (selected | forced) & valid[None]
    return keep, valid


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
    pvthreshd=PV_SKIP_OFF,
    blkq: int = BLKQ,
    blkk: int = BLKK,
):
    """Stage 2 for one request: attention over kept blocks with the PV-skip filter.

    Returns ``out`` fp32 ``[Lq, Hq, D]`` and the number of PV-skipped (head, q-block, k-block)
    triples. A head without the PV skip takes one softmax over a query block's kept keys; a head
    with it walks the kept blocks in order with an online softmax, as the kernel does, since a
    block's skip depends on the running row maximum.
    """
    lq, hq, dim = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    pv_t = _as_head_vector(pvthreshd, hq)
    q32, k32, v32 = (t.detach().float().cpu() for t in (q, k, v))
    valid, diag = block_masks(lq, lk, blkq, blkk)
    nqb, nkb = valid.shape
    ctx = lk - lq
    out = torch.zeros(lq, hq, dim)
    skipped = 0
    qk_scale = scale * _LOG2E
    in_block = torch.arange(blkk)
    for h in range(hq):
        kh, vh = k32[:, h // group], v32[:, h // group]
        for b in range(nqb):
            r0, r1 = b * blkq, min((b + 1) * blkq, lq)
            qpos = ctx + torch.arange(r0, r1)
            qb = q32[r0:r1, h]
            if pv_t[h] >= PV_SKIP_OFF and bool(keep[h, b].any()):
                rows = (torch.nonzero(keep[h, b]).flatten()[:, None] * blkk + in_block).flatten()
                rows = rows[rows < lk]
                s = (qb @ kh[rows].T) * qk_scale
                s = s.masked_fill(rows[None, :] > qpos[:, None], float("-inf"))
                p = torch.exp2(s - s.max(-1, keepdim=True).values)
                out[r0:r1, h] = (p @ vh[rows]) / p.sum(-1, keepdim=True)
                continue
            m = torch.full((r1 - r0,), float("-inf"))
            lsum = torch.zeros(r1 - r0)
            acc = torch.zeros(r1 - r0, dim)
            first = True
            for j in torch.nonzero(keep[h, b]).flatten().tolist():
                c0, c1 = j * blkk, min((j + 1) * blkk, lk)
                kpos = torch.arange(c0, c1)
                s = (qb @ kh[c0:c1].T) * qk_scale
                s = s.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
                m_loc = s.max(-1).values
                may_skip = not first and not bool(diag[b, j]) and pv_t[h] < PV_SKIP_OFF
                if may_skip and bool((m_loc - m <= -pv_t[h]).all()):
                    skipped += 1
                    continue
                first = False
                m_new = torch.maximum(m, m_loc)
                alpha = torch.exp2(m - m_new)
                p = torch.exp2(s - m_new[:, None])
                lsum = lsum * alpha + p.sum(-1)
                acc = acc * alpha[:, None] + p @ vh[c0:c1]
                m = m_new
            out[r0:r1, h] = acc / lsum[:, None]
    return out, skipped


@dataclass(frozen=True)
class SpargeResult:
    out: torch.Tensor  # [Lq, Hq, D] fp32
    keep: torch.Tensor  # [Hq, NQB, NKB] bool
    valid: torch.Tensor  # [NQB, NKB] bool
    pv_skipped: int

    @property
    def sparsity(self) -> float:
        """Fraction of valid (head, q-block, k-block) pairs not computed."""
        total = self.valid.sum().item() * self.keep.shape[0]
        return 1.0 - self.keep.sum().item() / max(total, 1)


def sparge_attention_ref(
    q, k, v, scale, simthreshd1, cdfthreshd, pvthreshd=PV_SKIP_OFF, topk=None,
    blkq: int = BLKQ, blkk: int = BLKK,
) -> SpargeResult:
    """Both stages for one request."""
    keep, valid = predict_block_map_ref(q, k, scale, simthreshd1, cdfthreshd, topk, blkq, blkk)
    out, skipped = block_sparse_attention_ref(q, k, v, keep, scale, pvthreshd, blkq, blkk)
    return SpargeResult(out, keep, valid, skipped)


_DENSE_ROWS = 1024  # queries per chunk: bounds the fp32 [Hq, rows, Lk] scores at long contexts


def dense_causal_attention_ref(q, k, v, scale) -> torch.Tensor:
    """Dense bottom-right-causal attention in fp32, ``[Lq, Hq, D]``, a chunk of queries at a time
    against the keys they see (a 32K prompt's full score matrix would be 4 GB a head)."""
    lq, hq, dim = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    q32 = q.detach().float().cpu().transpose(0, 1)
    k32 = k.detach().float().cpu().repeat_interleave(group, 1).transpose(0, 1)
    v32 = v.detach().float().cpu().repeat_interleave(group, 1).transpose(0, 1)
    out = torch.empty(hq, lq, dim)
    for r0 in range(0, lq, _DENSE_ROWS):
        r1 = min(r0 + _DENSE_ROWS, lq)
        seen = lk - lq + r1  # keys up to the chunk's last query
        s = (q32[:, r0:r1] @ k32[:, :seen].transpose(1, 2)) * scale
        qpos = torch.arange(lk - lq + r0, lk - lq + r1)
        s = s.masked_fill(torch.arange(seen)[None, :] > qpos[:, None], float("-inf"))
        out[:, r0:r1] = torch.softmax(s, -1) @ v32[:, :seen]
    return out.transpose(0, 1)


def gather_paged_kv(key_cache, value_cache, block_table_row, seq_len: int):
    """Contiguous ``k, v [seq_len, Hkv, D]`` of one request from vLLM's paged cache."""
    page = key_cache.shape[1]
    pages = block_table_row[: num_blocks(seq_len, page)].long().cpu()
    k = key_cache.cpu()[pages].flatten(0, 1)[:seq_len]
    v = value_cache.cpu()[pages].flatten(0, 1)[:seq_len]
    return k, v


def paged_prefill_ref(
    q, key_cache, value_cache, batch: PrefillBatch, scale, simthreshd1, cdfthreshd,
    pvthreshd=PV_SKIP_OFF, topk=None,
):
    """Reference of ``sparge_paged_prefill`` for a varlen batch over the paged cache.

    Returns ``out`` fp32 ``[num_tokens, Hq, D]`` (rows of other requests are zero), the per-request
    keep masks, and ``stats = [valid_blocks, kept_blocks, pv_skipped_blocks]`` (int64).
    """
    qsl = batch.query_start_loc.cpu().tolist()
    seq_lens = batch.seq_lens.cpu().tolist()
    out = torch.zeros(q.shape, dtype=torch.float32)
    stats = torch.zeros(3, dtype=torch.int64)
    keeps = []
    for r, seq_len in enumerate(seq_lens):
        k, v = gather_paged_kv(key_cache, value_cache, batch.block_table[r], seq_len)
        qr = q[qsl[r] : qsl[r + 1]]
        res = sparge_attention_ref(qr, k, v, scale, simthreshd1, cdfthreshd, pvthreshd, topk)
        out[qsl[r] : qsl[r + 1]] = res.out
        stats += torch.tensor(
            [res.valid.sum().item() * q.shape[1], res.keep.sum().item(), res.pv_skipped]
        )
        keeps.append(res.keep)
    return out, keeps, stats
