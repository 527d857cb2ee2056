"""Argument checks of the kernels' public entry points, for direct callers.

Each bad argument raises ``ValueError`` naming the argument, before any kernel launches (a launch
fails these tests). Tiny CPU tensors: the checks of values held in tensors (offsets, lengths,
page ids, thresholds) read CPU tensors without a sync, so they all run here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sparge_serve.kernels import (
    BlockMap,
    PrefillBatch,
    predict_block_map,
    sparge_paged_prefill,
    sparse_paged_attention,
)
from sparge_serve.kernels.fa3 import fa3_sparse_attention
from sparge_serve.kernels.launch import Launcher
from tests.kernel_inputs import PagedCase, head_vec, make_paged_case

REQS = [(20, 40), (5, 30)]
HQ = 2
ENTRY_POINTS = ["predict", "attention", "prefill", "fa3"]


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    """Every check must fire before the first kernel launch."""

    def launched(self, grid, args, kwargs):
        raise AssertionError(f"{self.fn.__name__} launched before the arguments were checked")

    monkeypatch.setattr(Launcher, "run", launched)


def _case(page: int = 16) -> PagedCase:
    return make_paged_case(REQS, HQ, 1, 64, page, torch.bfloat16, "cpu", structured=False)


def _block_map(batch: PrefillBatch, heads: int = HQ, width: int = 16,
               dtype=torch.int16) -> BlockMap:
    """A block map of ``batch``'s rows, made by hand (no kernel)."""
    nqb = -(-batch.max_query_len // 128)
    count = torch.ones(batch.num_reqs, heads, nqb, dtype=torch.int32)
    return BlockMap(torch.zeros(batch.num_reqs, heads, nqb, width, dtype=dtype), count, count)


def _fail_attn(*args):
    raise AssertionError("FA3 ran before the arguments were checked")


def _call(entry: str, case: PagedCase, *, batch=None, scale=None, sim=0.5, cdf=0.5, pv=50.0,
          out=None, bm=None, **kw):
    """``entry`` (one of :data:`ENTRY_POINTS`) on ``case`` with the given arguments replaced."""
    batch = case.batch if batch is None else batch
    scale = case.scale if scale is None else scale
    ths = [head_vec(x, HQ) if isinstance(x, float) else x for x in (sim, cdf, pv)]
    out = torch.empty_like(case.q) if out is None else out
    args = (case.q, case.key_cache)
    if entry == "predict":
        return predict_block_map(*args, batch, scale, ths[0], ths[1], **kw)
    if entry == "prefill":
        return sparge_paged_prefill(*args, case.value_cache, batch, scale, *ths, out, **kw)
    bm = _block_map(case.batch) if bm is None else bm
    if entry == "attention":
        return sparse_paged_attention(*args, case.value_cache, batch, bm, scale, ths[2], out,
                                      **kw)
    return fa3_sparse_attention(*args, case.value_cache, batch, bm, scale, out,
                                attn_fn=_fail_attn, **kw)


def _replace(batch: PrefillBatch, **changes) -> PrefillBatch:
    return dataclasses.replace(batch, **changes)


# --------------------------------------------------------------------------------------------
# batch metadata: every entry point checks it
# --------------------------------------------------------------------------------------------

I32 = dict(dtype=torch.int32)
BATCH_CASES = {
    # name: (batch -> bad batch, the message's pattern)
    "qsl_dtype": (lambda b: _replace(b, query_start_loc=b.query_start_loc.long()),
                  r"batch\.query_start_loc must be a 1-D int32 tensor, got torch\.int64"),
    "seq_lens_device": (lambda b: _replace(b, seq_lens=torch.empty(2, device="meta", **I32)),
                        r"batch\.seq_lens is on meta, q on cpu"),
    "block_table_dims": (lambda b: _replace(b, block_table=b.block_table[0]),
                         r"batch\.block_table must be a 2-D int32 tensor"),
    "seq_lens_strided": (lambda b: _replace(b, seq_lens=torch.stack([b.seq_lens] * 2, 1)[:, 0]),
                         r"batch\.seq_lens must be contiguous"),
    "qsl_length": (lambda b: _replace(b, query_start_loc=b.query_start_loc[:2]),
                   r"query_start_loc must have 3 entries and block_table 2 rows; got 2 and 2"),
    "block_table_rows": (lambda b: _replace(b, block_table=b.block_table[:1]),
                         r"query_start_loc must have 3 entries and block_table 2 rows; got 3 "
                         r"and 1"),
    "empty": (lambda b: _replace(b, query_start_loc=b.query_start_loc[:1],
                                 seq_lens=b.seq_lens[:0], block_table=b.block_table[:0]),
              r"batch\.seq_lens is empty"),
    "max_query_len_type": (lambda b: _replace(b, max_query_len=20.0),
                           r"batch\.max_query_len must be a host int >= 1 .*got 20\.0"),
    "max_seq_len_zero": (lambda b: _replace(b, max_seq_len=0),
                         r"batch\.max_seq_len must be a host int >= 1 .*got 0"),
    "qsl_decreasing": (lambda b: _replace(b, query_start_loc=torch.tensor([0, 20, 15], **I32)),
                       r"batch\.query_start_loc decreases at request 1 \(20 -> 15\): offsets "
                       r"must be non-decreasing"),
    "qsl_negative": (lambda b: _replace(b, query_start_loc=torch.tensor([-1, 19, 24], **I32)),
                     r"batch\.query_start_loc\[0\] is -1: offsets into q start at 0"),
    "qsl_past_q": (lambda b: _replace(b, query_start_loc=torch.tensor([0, 20, 26], **I32),
                                      max_query_len=20),
                   r"batch\.query_start_loc ends at 26 but q has 25 rows"),
    "rows_mismatch": (lambda b: _replace(b, rows=(0, 24)),
                      r"batch\.rows is \(0, 24\) but batch\.query_start_loc spans rows "
                      r"\(0, 25\)"),
    "max_query_len_understated": (lambda b: _replace(b, max_query_len=19),
                                  r"batch\.max_query_len 19 is less than request 0's query_len "
                                  r"20"),
    "max_seq_len_understated": (lambda b: _replace(b, max_seq_len=39),
                                r"batch\.max_seq_len 39 is less than request 0's seq_len 40"),
    "query_longer_than_context": (lambda b: _replace(b, seq_lens=torch.tensor([40, 4], **I32)),
                                  r"request 1's query_len 5 exceeds its seq_len 4"),
    "block_table_too_narrow": (lambda b: _replace(b, block_table=b.block_table[:, :2]),
                               r"request 0's seq_len 40 needs 3 pages of 16 tokens, but "
                               r"batch\.block_table has 2 columns"),
}


def _bad_page(batch: PrefillBatch, value: int) -> PrefillBatch:
    table = batch.block_table.clone()
    table[1, 1] = value
    return _replace(batch, block_table=table)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name", list(BATCH_CASES))
def test_bad_batch_raises(name, entry):
    case = _case()
    mutate, match = BATCH_CASES[name]
    with pytest.raises(ValueError, match=match):
        _call(entry, case, batch=mutate(case.batch))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("page_id", ["num_pages", -1])
def test_page_id_outside_the_cache_raises(page_id, entry):
    """A used block-table entry that is no page of the cache (the kernels would read outside
    it); entries past a request's pages are never read, so they may hold anything."""
    case = _case()
    num_pages = case.key_cache.shape[0]
    value = num_pages if page_id == "num_pages" else page_id
    with pytest.raises(ValueError, match=rf"batch\.block_table\[1, 1\] = {value} is no page of "
                                         rf"the KV cache \(key_cache has {num_pages} pages"):
        _call(entry, case, batch=_bad_page(case.batch, value))


def test_unused_block_table_entries_are_not_checked():
    """Columns past a request's pages (request 1: 30 tokens, two 16-token pages) are free: the
    check reaches the launch."""
    case = _case()
    table = case.batch.block_table.clone()
    table[1, 2:] = -7
    with pytest.raises(AssertionError, match="launched before"):
        _call("predict", case, batch=_replace(case.batch, block_table=table))


def test_batch_must_be_a_prefill_batch():
    case = _case()
    with pytest.raises(ValueError, match="batch must be a PrefillBatch, got tuple"):
        _call("prefill", case, batch=tuple(dataclasses.astuple(case.batch)))


# --------------------------------------------------------------------------------------------
# scale, out, caches
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("scale,match", [
    (0.0, r"scale must be finite and > 0 .*got 0\.0"),
    (-0.125, r"scale must be finite and > 0 .*got -0\.125"),
    (float("nan"), r"scale must be finite and > 0 .*got nan"),
    (float("inf"), r"scale must be finite and > 0 .*got inf"),
    (object(), r"scale must be a number .*got object"),
], ids=["zero", "negative", "nan", "inf", "object"])
def test_bad_scale_raises(scale, match, entry):
    case = _case()
    with pytest.raises(ValueError, match=match):
        _call(entry, case, scale=scale)


OUT_CASES = {
    "dtype": (lambda q: torch.empty(q.shape, dtype=torch.float32),
              r"out dtype torch\.float32 differs from q dtype torch\.bfloat16"),
    "shape": (lambda q: torch.empty(3, HQ, 64, dtype=q.dtype), r"out must have q's shape"),
    "head_dim_stride": (lambda q: torch.empty(q.shape[0], HQ, 128, dtype=q.dtype)[..., ::2],
                        r"out must have q's shape .* contiguous in head_dim"),
    "device": (lambda q: torch.empty(q.shape, dtype=q.dtype, device="meta"),
               r"out is on meta, q on cpu"),
}


@pytest.mark.parametrize("entry", ["attention", "prefill", "fa3"])
@pytest.mark.parametrize("name", list(OUT_CASES))
def test_bad_out_raises(name, entry):
    case = _case()
    make, match = OUT_CASES[name]
    with pytest.raises(ValueError, match=match):
        _call(entry, case, out=make(case.q))


@pytest.mark.parametrize("entry", ["attention", "prefill", "fa3"])
def test_caches_of_different_shapes_raise(entry):
    case = _case()
    case.value_cache = case.value_cache[:-1]
    with pytest.raises(ValueError, match=r"value_cache shape \(\d+, 16, 1, 64\) differs from "
                                         r"key_cache shape"):
        _call(entry, case)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_cache_on_another_device_raises(entry):
    case = _case()
    case.key_cache = torch.empty(case.key_cache.shape, dtype=case.key_cache.dtype, device="meta")
    with pytest.raises(ValueError, match="key_cache is on meta, q on cpu"):
        _call(entry, case)


# --------------------------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------------------------

THRESHOLD_CASES = [
    # (argument, value, the message's pattern)
    ("sim", 1.5, r"simthreshd1\[0\] = 1\.5 is out of range: it must be in \[-1, 1\]"),
    ("sim", -2.0, r"simthreshd1\[0\] = -2 is out of range"),
    ("cdf", 1.5, r"cdfthreshd\[0\] = 1\.5 is out of range: it must be in \[0, 1\]"),
    ("cdf", -0.1, r"cdfthreshd\[0\] = -0\.1 is out of range"),
    ("pv", -1.0, r"pvthreshd\[0\] = -1 is out of range: it must be >= 0"),
    ("pv", float("nan"), r"pvthreshd contains NaN or inf"),
    ("cdf", float("inf"), r"cdfthreshd contains NaN or inf"),
]


# (argument, entry point): predict_block_map takes no pvthreshd, sparse_paged_attention only it
THRESHOLD_ARGS = [("sim", "predict"), ("cdf", "predict"), ("pv", "attention"),
                  ("sim", "prefill"), ("cdf", "prefill"), ("pv", "prefill")]


@pytest.mark.parametrize("arg,value,match,entry", [
    (arg, value, match, entry) for arg, value, match in THRESHOLD_CASES
    for a, entry in THRESHOLD_ARGS if a == arg])
def test_threshold_out_of_range_raises(arg, value, match, entry):
    case = _case()
    bad = torch.tensor([value, 0.5], dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        _call(entry, case, **{arg: bad})


def test_top_k_mode_takes_any_finite_cdfthreshd():
    """Top-k selection never reads cdfthreshd: out of range is no error there (still finite)."""
    case = _case()
    with pytest.raises(AssertionError, match="launched before"):
        _call("prefill", case, cdf=-1.0, topk=0.5)
    with pytest.raises(ValueError, match="cdfthreshd contains NaN or inf"):
        _call("prefill", case, cdf=float("nan"), topk=0.5)


def test_threshold_bounds_are_accepted():
    """The ends of each range pass the checks (the call reaches its first launch)."""
    case = _case()
    for sim, cdf, pv in ((-1.0, 0.0, 0.0), (1.0, 1.0, 1e6)):
        with pytest.raises(AssertionError, match="launched before"):
            _call("prefill", case, sim=sim, cdf=cdf, pv=pv)


@pytest.mark.parametrize("arg,entry", THRESHOLD_ARGS)
def test_threshold_per_head_length_raises(arg, entry):
    name = {"sim": "simthreshd1", "cdf": "cdfthreshd", "pv": "pvthreshd"}[arg]
    with pytest.raises(ValueError, match=rf"{name} must be a float32 tensor of shape \(2,\)"):
        _call(entry, _case(), **{arg: head_vec(0.5, 3)})


def test_threshold_on_another_device_raises():
    with pytest.raises(ValueError, match="cdfthreshd is on meta, expected cpu"):
        _call("predict", _case(), cdf=torch.empty(HQ, device="meta"))


def test_topk_out_of_range_raises():
    with pytest.raises(ValueError, match=r"topk must be in \(0, 1\], got nan"):
        _call("prefill", _case(), topk=float("nan"))


# --------------------------------------------------------------------------------------------
# block maps and the FA3 path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["attention", "fa3"])
def test_block_map_without_its_table_raises(entry):
    """A map of counts only (a head-chunked call's)."""
    case = _case()
    bm = _block_map(case.batch)
    with pytest.raises(ValueError, match=r"block_map has no (lut|mask) .*predict_block_map"):
        _call(entry, case, bm=BlockMap(None, bm.count, bm.n_valid))


@pytest.mark.parametrize("entry", ["attention", "fa3"])
def test_block_map_of_other_rows_raises(entry):
    case = _case()
    other = _replace(case.batch, query_start_loc=case.batch.query_start_loc[:2],
                     seq_lens=case.batch.seq_lens[:1], block_table=case.batch.block_table[:1])
    with pytest.raises(ValueError, match=r"block_map was predicted for a different batch or "
                                         r"heads: its count has rows \(1, 2, 1\), this call .* "
                                         r"\(2, 2, 1\)"):
        _call(entry, case, bm=_block_map(other))
    with pytest.raises(ValueError, match=r"block_map was predicted for a different batch or "
                                         r"heads"):
        _call(entry, case, bm=_block_map(case.batch, heads=1))


def test_block_map_too_narrow_or_of_another_dtype_raises():
    case = _case()
    long_batch = _replace(case.batch, max_seq_len=64 * 20)  # 20 key blocks: rows of >= 20
    with pytest.raises(ValueError, match=r"block_map\.lut must be \[R, Hq, NQB, >= 20\]"):
        _call("attention", case, batch=long_batch, bm=_block_map(case.batch, width=16))
    with pytest.raises(ValueError, match=r"block_map\.lut must be a contiguous torch\.int16"):
        _call("attention", case, bm=_block_map(case.batch, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"block_map must be a BlockMap"):
        _call("attention", case, bm=(1, 2, 3))


def test_fa3_needs_pages_dividing_the_key_block():
    case = _case(page=128)
    with pytest.raises(ValueError, match=r"page size dividing the key block \(64\); got "
                                         r"128-token pages"):
        _call("fa3", case)
    with pytest.raises(ValueError, match=r"page size dividing the key block \(64\); got "
                                         r"128-token pages"):
        _call("prefill", case, attention="fa3", pv_skip=False)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_check_finite_false_reads_no_device_values(entry):
    """``check_finite=False`` (the backend's calls) reads no value of a device tensor, so it
    never synchronises: with every tensor on the meta device (whose values cannot be read) the
    call reaches its first launch, even with a batch the value checks would refuse."""
    case = _case()
    meta = {f.name: getattr(case, f.name).to("meta") for f in dataclasses.fields(case)
            if isinstance(getattr(case, f.name), torch.Tensor)}
    batch = _replace(case.batch, **{name: getattr(case.batch, name).to("meta")
                                    for name in ("query_start_loc", "seq_lens", "block_table")},
                     max_query_len=1)  # understated: only the value checks could tell
    meta_case = PagedCase(**meta, batch=batch, scale=case.scale)
    ths = {arg: head_vec(0.5, HQ).to("meta") for arg in ("sim", "cdf")}
    ths["pv"] = head_vec(50.0, HQ).to("meta")
    bm = _block_map(batch)
    bm = BlockMap(*(t.to("meta") for t in (bm.lut, bm.count, bm.n_valid)))
    kw = dict(check_finite=False)
    if entry in ("attention", "prefill"):
        kw["pv_skip"] = False
    with pytest.raises(AssertionError, match="launched before"):
        _call(entry, meta_case, out=torch.empty_like(meta_case.q), bm=bm, **ths, **kw)
