"""The backend's calibration capture sink (``sparge_serve.backend.capture``), the tensor-parallel
worker extension (``sparge_serve.backend.capture_worker``) and the vLLM driver's plumbing and
per-rank merge, on CPU tensors. The real vLLM engine is GPU-only: here a stand-in that calls the
hook exactly as the backend does (per rank, with a worker extension instance per rank, under
tensor parallelism) checks the driver's side of the contract, nothing more; the real tp=2 engine
is tests/gpu/test_calibrate_tp_gpu.py."""

from __future__ import annotations

import importlib
import json
import os
import sys
import types

import pytest
import torch

from sparge_serve.backend import capture
from sparge_serve.kernels.geometry import PrefillBatch


def test_emit_prefill_slices_requests_from_the_paged_cache():
    torch.manual_seed(0)
    page, hq, hkv, d = 16, 4, 2, 8
    # request 0: full prefill of 40 tokens; request 1: a 20-token chunk at the end of 70 tokens
    seq_lens, query_lens = [40, 70], [40, 20]
    ks = [torch.randn(n, hkv, d) for n in seq_lens]
    vs = [torch.randn(n, hkv, d) for n in seq_lens]
    num_pages = 12
    perm = torch.randperm(num_pages).tolist()  # pages deliberately not contiguous
    table = torch.zeros(2, 6, dtype=torch.int32)
    kc, vc = torch.zeros(num_pages, page, hkv, d), torch.zeros(num_pages, page, hkv, d)
    used = 0
    for r, n in enumerate(seq_lens):
        for p in range(-(-n // page)):
            pid = perm[used]
            used += 1
            table[r, p] = pid
            rows = slice(p * page, min((p + 1) * page, n))
            kc[pid, : rows.stop - rows.start] = ks[r][rows]
            vc[pid, : rows.stop - rows.start] = vs[r][rows]
    q = torch.randn(sum(query_lens), hq, d)
    batch = PrefillBatch(torch.tensor([0, 40, 60], dtype=torch.int32),
                         torch.tensor(seq_lens, dtype=torch.int32), table, 40, 70)
    got = []
    capture.emit_prefill(3, q, kc, vc, batch, 0.5, "x")  # no sink: a no-op
    with capture.sink_installed(lambda *a: got.append(a)):
        assert capture.get_sink() is not None
        capture.emit_prefill(3, q, kc, vc, batch, 0.5, "model.layers.3.self_attn.attn")
    assert capture.get_sink() is None
    assert len(got) == 2
    for r, (layer, qr, k, v, info) in enumerate(got):
        assert layer == 3 and info.request == r and info.scale == 0.5
        assert (info.query_len, info.seq_len) == (query_lens[r], seq_lens[r])
        assert torch.equal(qr, q[[0, 40][r] : [40, 60][r]])
        assert torch.equal(k, ks[r]) and torch.equal(v, vs[r])


def test_sink_registry_restores_previous():
    def outer(*_):
        return None

    def inner(*_):
        return None

    capture.set_sink(outer)
    try:
        with capture.sink_installed(inner):
            assert capture.get_sink() is inner
        assert capture.get_sink() is outer
    finally:
        capture.clear_sink()
    assert capture.get_sink() is None


# ------------------------------------------------------------------------------------------------
# vLLM driver plumbing against a stand-in engine (the real one is GPU-only and not exercised here)
# ------------------------------------------------------------------------------------------------

LAYERS, HQ, HKV, D = 3, 4, 2, 64


def _model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": HQ * D, "num_attention_heads": HQ,
        "num_key_value_heads": HKV, "head_dim": D, "num_hidden_layers": LAYERS,
        "vocab_size": 100, "intermediate_size": 256}))
    return str(tmp_path)


def _qkv(ids, layer):
    g = torch.Generator().manual_seed(1000 * layer + len(ids))
    n = len(ids)
    return (torch.randn(n, HQ, D, generator=g), torch.randn(n, HKV, D, generator=g),
            torch.randn(n, HKV, D, generator=g))


class _StandInLLM:
    """Does what the SPARGE backend does per layer while a sink is installed (see
    ``sparge_serve.backend.sparge_attn``): ``capture.emit_prefill`` with the sparse sub-batch over
    the paged cache. Prompts longer than ``chunk`` are prefilled in two chunks.

    With ``tensor_parallel_size`` N > 1 it stands in for N worker processes: one instance of the
    ``worker_extension_cls`` per rank, each with its own sink (a worker's process-global sink),
    ``collective_rpc`` calling the named method on every rank, and each rank's forward reporting
    its slice of the heads."""

    kwargs: dict = {}
    chunk = 10**9
    skip_layer = None  # layer not reported (by every rank, or by rank skip_rank only)
    skip_rank = None

    def __init__(self, **kwargs):
        type(self).kwargs = kwargs
        self.tp = kwargs.get("tensor_parallel_size", 1)
        self.workers, self.sinks = [], []
        if self.tp > 1:
            module, _, name = kwargs["worker_extension_cls"].rpartition(".")
            cls = getattr(importlib.import_module(module), name)
            for r in range(self.tp):
                worker = cls()
                worker._sparge_tp_rank_and_size = lambda r=r: (r, self.tp)
                self.workers.append(worker)
                self.sinks.append(None)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        assert isinstance(method, str)  # never a callable (that needs insecure serialization)
        out = []
        for r, worker in enumerate(self.workers):
            capture.set_sink(self.sinks[r])
            out.append(getattr(worker, method)(*args, **(kwargs or {})))
            self.sinks[r] = capture.get_sink()
        capture.clear_sink()
        return out

    def generate(self, prompts, params, use_tqdm=True):
        (prompt,) = prompts
        ids = prompt["prompt_token_ids"]
        if self.tp == 1:
            self._forward(ids, 0)
            return
        for r in range(self.tp):
            capture.set_sink(self.sinks[r])
            self._forward(ids, r)
        capture.clear_sink()

    def _forward(self, ids, rank):
        page = 16
        hq, hkv = HQ // self.tp, HKV // self.tp
        for layer in range(LAYERS):
            if layer == self.skip_layer and self.skip_rank in (None, rank):
                continue
            q, k, v = _qkv(ids, layer)
            q, k, v = (q[:, rank * hq:(rank + 1) * hq], k[:, rank * hkv:(rank + 1) * hkv],
                       v[:, rank * hkv:(rank + 1) * hkv])
            pages = -(-len(ids) // page)
            kc = torch.zeros(pages * page, hkv, D)
            vc = torch.zeros_like(kc)
            kc[: len(ids)], vc[: len(ids)] = k, v
            kc, vc = kc.view(pages, page, hkv, D), vc.view(pages, page, hkv, D)
            table = torch.arange(pages, dtype=torch.int32)[None]
            bounds = [0, min(self.chunk, len(ids)), len(ids)]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                if a == b:
                    continue
                batch = PrefillBatch(torch.tensor([0, b - a], dtype=torch.int32),
                                     torch.tensor([b], dtype=torch.int32), table, b - a, b)
                capture.emit_prefill(layer, q[a:b], kc, vc, batch, D ** -0.5,
                                     f"model.layers.{layer}.self_attn.attn")


@pytest.fixture
def stand_in_vllm(monkeypatch):
    fake = types.ModuleType("vllm")
    fake.LLM = _StandInLLM
    fake.SamplingParams = lambda **kw: kw
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.delenv("SPARGE_MODE", raising=False)
    monkeypatch.delenv("SPARGE_MIN_SPARSE_LEN", raising=False)
    monkeypatch.delenv("SPARGE_MIN_SPARSE_QUERY_LEN", raising=False)
    monkeypatch.setattr(_StandInLLM, "chunk", 10**9)
    monkeypatch.setattr(_StandInLLM, "skip_layer", None)
    monkeypatch.setattr(_StandInLLM, "skip_rank", None)
    return _StandInLLM


def test_vllm_driver_collects_every_layer_and_chunk(stand_in_vllm, tmp_path):
    from sparge_calibrate.vllm_driver import capture_vllm

    prompts = [list(range(40)), list(range(70))]
    stand_in_vllm.chunk = 50  # the second prompt arrives as chunks of 50 + 20 queries
    cap = capture_vllm(_model_dir(tmp_path), prompts)
    kw = stand_in_vllm.kwargs
    assert kw["attention_backend"] == "SPARGE" and kw["enforce_eager"] is True
    assert kw["additional_config"] == {"sparge": {"thresholds": "untuned", "min_sparse_len": 1,
                                                  "min_sparse_query_len": 1}}
    assert kw["tensor_parallel_size"] == 1 and kw["max_num_seqs"] == 1
    assert capture.get_sink() is None
    assert cap.scales == [pytest.approx(D ** -0.5)] * LAYERS and cap.num_tokens == [40, 70]
    for layer in range(LAYERS):
        assert [(s.q.shape[0], s.k.shape[0]) for s in cap.layers[layer]] == [
            (40, 40), (50, 50), (20, 70)]
        q, k, v = _qkv(prompts[1], layer)
        chunk = cap.layers[layer][2]
        assert torch.equal(chunk.q, q[50:]) and torch.equal(chunk.k, k) and torch.equal(chunk.v, v)


def test_vllm_driver_errors(stand_in_vllm, tmp_path, monkeypatch):
    from sparge_calibrate.vllm_driver import capture_vllm

    model = _model_dir(tmp_path)
    stand_in_vllm.skip_layer = 1  # a backend that does not report a layer
    with pytest.raises(RuntimeError, match=r"layers \[1\] were not captured"):
        capture_vllm(model, [list(range(40))])
    with pytest.raises(ValueError, match="at least 1, got 0"):
        capture_vllm(model, [list(range(40))], tensor_parallel_size=0)
    with pytest.raises(ValueError, match="exceeds the model's 2 KV heads.*not support"):
        capture_vllm(model, [list(range(40))], tensor_parallel_size=4)
    with pytest.raises(ValueError, match="pipeline parallelism"):
        capture_vllm(model, [list(range(40))], tensor_parallel_size=2, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="capture_dir is used with tensor_parallel_size > 1"):
        capture_vllm(model, [list(range(40))], capture_dir=str(tmp_path / "c"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="must be an empty directory"):
        capture_vllm(model, [list(range(40))], tensor_parallel_size=2,
                     capture_dir=str(tmp_path / "full"))
    monkeypatch.setenv("SPARGE_MODE", "dense")
    with pytest.raises(ValueError, match="unset SPARGE_MODE"):
        capture_vllm(model, [list(range(40))])
    monkeypatch.delenv("SPARGE_MODE")
    monkeypatch.setenv("SPARGE_THRESHOLDS", "t.safetensors")  # would leave its dense layers out
    with pytest.raises(ValueError, match="unset SPARGE_THRESHOLDS"):
        capture_vllm(model, [list(range(40))])
    monkeypatch.delenv("SPARGE_THRESHOLDS")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(ValueError, match="engine in this process"):
        capture_vllm(model, [list(range(40))])


# ------------------------------------------------------------------------------------------------
# tensor parallelism: the worker extension's sink, the merge, and the driver against stand-ins
# ------------------------------------------------------------------------------------------------


def test_vllm_driver_tensor_parallel_merges_to_global_head_order(stand_in_vllm, tmp_path,
                                                                  monkeypatch):
    """tp=2 through the worker extension and the merge gives exactly the tp=1 capture."""
    from sparge_calibrate.vllm_driver import capture_vllm
    from sparge_serve.backend.capture_worker import EXTENSION

    model = _model_dir(tmp_path)
    prompts = [list(range(40)), list(range(70))]
    stand_in_vllm.chunk = 50  # the second prompt arrives as chunks of 50 + 20 queries
    ref = capture_vllm(model, prompts)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")  # set by the tp=1 run
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    done = []
    cap = capture_vllm(model, prompts, tensor_parallel_size=2, on_prompt=done.append)
    kw = stand_in_vllm.kwargs
    assert kw["tensor_parallel_size"] == 2 and kw["worker_extension_cls"] == EXTENSION
    assert kw["distributed_executor_backend"] == "mp" and kw["max_num_seqs"] == 1
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ  # left to vLLM
    assert capture.get_sink() is None and done == [0, 1]
    assert os.listdir(tmp) == []  # the temporary capture directory is gone
    assert cap.scales == ref.scales and cap.num_tokens == ref.num_tokens == [40, 70]
    for layer in range(LAYERS):
        assert len(cap.layers[layer]) == len(ref.layers[layer]) == 3
        for got, want in zip(cap.layers[layer], ref.layers[layer], strict=True):
            assert got.q.shape == (want.q.shape[0], HQ, D) and got.k.shape[1] == HKV
            assert all(torch.equal(getattr(got, n), getattr(want, n)) for n in "qkv")

    kept = tmp_path / "kept"  # a capture_dir is kept, one directory per rank
    capture_vllm(model, prompts, tensor_parallel_size=2, capture_dir=str(kept))
    assert sorted(os.listdir(kept)) == ["rank0", "rank1"]
    assert len(os.listdir(kept / "rank1")) == LAYERS * 3


@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_driver_captures_only_the_layers_asked_for(tp, stand_in_vllm, tmp_path,
                                                        monkeypatch):
    """``layers=`` (the CLI's --layers-per-pass): those layers' samples, exactly as in a full
    capture; the other layers' lists stay empty."""
    from sparge_calibrate.vllm_driver import capture_vllm

    model = _model_dir(tmp_path)
    prompts = [list(range(40)), list(range(70))]
    stand_in_vllm.chunk = 50
    full = capture_vllm(model, prompts)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    part = capture_vllm(model, prompts, tensor_parallel_size=tp, layers=[1])
    assert part.layers[0] == [] and part.layers[2] == [] and part.scales[1] == full.scales[1]
    assert len(part.layers[1]) == 3
    for got, want in zip(part.layers[1], full.layers[1], strict=True):
        assert all(torch.equal(getattr(got, n), getattr(want, n)) for n in "qkv")


def test_vllm_driver_tensor_parallel_missing_layer_on_one_rank(stand_in_vllm, tmp_path):
    from sparge_calibrate.vllm_driver import capture_vllm

    stand_in_vllm.skip_layer, stand_in_vllm.skip_rank = 2, 1
    with pytest.raises(RuntimeError, match=r"rank 1 lacks samples.*\(2, 0, 0\)"):
        capture_vllm(_model_dir(tmp_path), [list(range(40))], tensor_parallel_size=2)
    stand_in_vllm.skip_rank = None  # no rank reports layer 2
    with pytest.raises(RuntimeError, match=r"layers \[2\] were not captured for every prompt"):
        capture_vllm(_model_dir(tmp_path), [list(range(40))], tensor_parallel_size=2)


def _worker(rank, tp):
    from sparge_serve.backend.capture_worker import CaptureWorkerExtension

    w = CaptureWorkerExtension()  # a plain instance: what vLLM mixes into each worker
    w._sparge_tp_rank_and_size = lambda: (rank, tp)
    return w


def _emit(layer, q, k, v, scale=D ** -0.5):
    """A fake backend forward: one request, its k/v as a one-page cache."""
    n = k.shape[0]
    batch = PrefillBatch(torch.tensor([0, q.shape[0]], dtype=torch.int32),
                         torch.tensor([n], dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                         q.shape[0], n)
    capture.emit_prefill(layer, q, k[None], v[None], batch, scale, f"model.layers.{layer}.attn")


def _write_split(out_dir, tp, samples, dtype=torch.bfloat16):
    """Run the worker-side sink of every rank over ``samples`` [(layer, prompt, q, k, v)] holding
    all heads; each rank sees its slice of the heads, as under tensor parallelism."""
    summaries = []
    for r in range(tp):
        w = _worker(r, tp)
        w.sparge_capture_start(str(out_dir))
        for layer, prompt, q, k, v in samples:
            w.sparge_capture_set_prompt(prompt)
            hq, hkv = q.shape[1] // tp, k.shape[1] // tp
            _emit(layer, *(t[:, r * h:(r + 1) * h].to(dtype) for t, h in ((q, hq), (k, hkv),
                                                                         (v, hkv))))
        summaries.append(w.sparge_capture_stop())
        assert capture.get_sink() is None
    return summaries


def _samples(prompts=(0, 1), layers=LAYERS, hq=HQ, hkv=HKV, chunked=True):
    """(layer, prompt, q, k, v) with all heads; prompt 1 in two chunks when ``chunked``."""
    out = []
    for p in prompts:
        for layer in range(layers):
            g = torch.Generator().manual_seed(100 * layer + p)
            n = 40 + 30 * p
            k, v = torch.randn(n, hkv, D, generator=g), torch.randn(n, hkv, D, generator=g)
            q = torch.randn(n, hq, D, generator=g)
            if p == 1 and chunked:
                out.append((layer, p, q[:50], k[:50], v[:50]))
            out.append((layer, p, q[50:] if p == 1 and chunked else q, k, v))
    return out


@pytest.mark.parametrize("tp,hq,hkv", [(2, 4, 2), (2, 8, 4), (4, 8, 4)])
def test_merge_rank_captures_restores_global_head_order(tmp_path, tp, hq, hkv):
    from sparge_calibrate.vllm_driver import merge_rank_captures

    samples = _samples(hq=hq, hkv=hkv)
    summaries = _write_split(tmp_path, tp, samples)
    assert [s["rank"] for s in summaries] == list(range(tp))
    assert all(s["samples_per_layer"] == {str(i): 3 for i in range(LAYERS)} for s in summaries)
    assert all(s["error"] is None and s["bytes"] > 0 for s in summaries)
    cap = merge_rank_captures(str(tmp_path), tp_size=tp, num_layers=LAYERS, num_prompts=2,
                              num_heads=hq, num_kv_heads=hkv, num_tokens=[40, 70])
    assert cap.scales == [D ** -0.5] * LAYERS and cap.num_tokens == [40, 70]
    for layer in range(LAYERS):
        want = [s for s in samples if s[0] == layer]  # prompt order, then chunk order
        assert len(cap.layers[layer]) == len(want) == 3
        for got, (_, _, q, k, v) in zip(cap.layers[layer], want, strict=True):
            for name, t in (("q", q), ("k", k), ("v", v)):
                assert torch.equal(getattr(got, name), t.to(torch.bfloat16)), name


def test_worker_sink_files_and_errors(tmp_path):
    from sparge_serve.backend.capture_worker import parse_sample_name, read_sample

    w = _worker(1, 2)
    with pytest.raises(RuntimeError, match="call sparge_capture_start first"):
        w.sparge_capture_set_prompt(0)
    w.sparge_capture_start(str(tmp_path))
    try:
        with pytest.raises(RuntimeError, match="already installed"):
            _worker(0, 2).sparge_capture_start(str(tmp_path))
        q, k = torch.randn(10, 2, D), torch.randn(12, 1, D)
        _emit(3, q, k, k + 1, scale=0.1)  # before any prompt index: recorded, not raised
        assert w._sparge_writer.error is not None
        w._sparge_writer.error = None
        w.sparge_capture_set_prompt(7)
        _emit(3, q, k, k + 1, scale=0.1)
        _emit(3, q[5:], k, k + 1, scale=0.1)
    finally:
        summary = w.sparge_capture_stop()
    assert summary["samples_per_layer"] == {"3": 2} and summary["error"] is None
    names = sorted(os.listdir(tmp_path / "rank1"))
    assert [parse_sample_name(n) for n in names] == [(3, 7, 0), (3, 7, 1)]
    tensors, meta = read_sample(str(tmp_path / "rank1" / names[1]))
    assert torch.equal(tensors["q"], q[5:]) and torch.equal(tensors["v"], k + 1)
    assert float(meta["scale"]) == 0.1 and (meta["rank"], meta["tp_size"]) == ("1", "2")
    assert meta["layer_name"] == "model.layers.3.attn"
    with pytest.raises(RuntimeError, match="is not empty"):  # never mixes two captures
        _worker(1, 2).sparge_capture_start(str(tmp_path))
    assert capture.get_sink() is None


def test_worker_sink_records_write_errors(tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    w = _worker(0, 2)
    w.sparge_capture_start(str(tmp_path))
    w.sparge_capture_set_prompt(0)
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    _emit(0, torch.randn(4, 2, D), torch.randn(4, 1, D), torch.randn(4, 1, D))
    summary = w.sparge_capture_stop()
    assert "rank 0: writing" in summary["error"] and "No space left" in summary["error"]
    assert summary["samples_per_layer"] == {}


def _merge(path, tp=2, **kw):
    from sparge_calibrate.vllm_driver import merge_rank_captures

    args = dict(tp_size=tp, num_layers=LAYERS, num_prompts=2, num_heads=HQ, num_kv_heads=HKV)
    return merge_rank_captures(str(path), **{**args, **kw})


def test_merge_errors(tmp_path):
    import shutil

    from safetensors.torch import save_file

    from sparge_serve.backend.capture_worker import read_sample, sample_name

    base = tmp_path / "base"
    _write_split(base, 2, _samples())

    def case(name):
        d = tmp_path / name
        shutil.copytree(base, d)
        return d

    d = case("no_rank")
    shutil.rmtree(d / "rank1")
    with pytest.raises(RuntimeError, match=r"rank 1 wrote no captures .*rank1 does not exist"):
        _merge(d)
    with pytest.raises(RuntimeError, match="rank 2 wrote no captures"):
        _merge(base, tp=3, num_heads=6, num_kv_heads=3)
    d = case("missing_sample")
    os.remove(d / "rank1" / sample_name(2, 1, 1))
    with pytest.raises(RuntimeError, match=r"rank 1 lacks samples .*\[\(2, 1, 1\)\]"):
        _merge(d)
    d = case("extra_sample")
    shutil.copy(d / "rank0" / sample_name(0, 0, 0), d / "rank0" / sample_name(0, 0, 1))
    with pytest.raises(RuntimeError, match=r"rank 1 has extra samples|rank 1 lacks samples"):
        _merge(d)
    d = case("missing_prompt")  # prompt 1 of layer 0 lost on every rank
    for r in (0, 1):
        for c in (0, 1):
            os.remove(d / f"rank{r}" / sample_name(0, 1, c))
    with pytest.raises(RuntimeError, match=r"layers \[0\] were not captured for every prompt"):
        _merge(d)
    with pytest.raises(RuntimeError, match="unknown layers or prompts"):
        _merge(base, num_prompts=1)
    d = case("stray")
    (d / "rank0" / "notes.txt").write_text("")
    with pytest.raises(RuntimeError, match=r"not capture samples: \['notes.txt'\]"):
        _merge(d)
    with pytest.raises(RuntimeError, match=r"expected q \[Lq, 1, D\] and k, v \[Lk >= Lq, 1, D\]"):
        _merge(base, num_heads=2, num_kv_heads=2)  # a geometry the capture does not have
    d = case("scale")
    path = d / "rank1" / sample_name(1, 0, 0)
    tensors, meta = read_sample(str(path))
    save_file(tensors, str(path), metadata={**meta, "scale": "0.5"})
    with pytest.raises(RuntimeError, match="layer 1, prompt 0, chunk 0: the ranks report missing "
                       "or different softmax scales"):
        _merge(d)
    d = case("length")
    save_file({**tensors, "q": tensors["q"][:-1].contiguous()},
              str(d / "rank1" / sample_name(1, 0, 0)), metadata=meta)
    with pytest.raises(RuntimeError, match="rank 1 has q .*rank 0 has q"):
        _merge(d)
