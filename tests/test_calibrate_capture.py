"""The backend's calibration capture sink (``sparge_serve.backend.capture``) and the vLLM driver's
plumbing against it, on CPU tensors. The real vLLM engine is GPU-only: here a stand-in that calls
the hook exactly as the backend does checks the driver's side of the contract, nothing more."""

from __future__ import annotations

import json
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
    the paged cache. Prompts longer than ``chunk`` are prefilled in two chunks."""

    kwargs: dict = {}
    chunk = 10**9
    skip_layer = None

    def __init__(self, **kwargs):
        type(self).kwargs = kwargs

    def generate(self, prompts, params, use_tqdm=True):
        (prompt,) = prompts
        ids = prompt["prompt_token_ids"]
        page = 16
        for layer in range(LAYERS):
            if layer == self.skip_layer:
                continue
            q, k, v = _qkv(ids, layer)
            pages = -(-len(ids) // page)
            kc = torch.zeros(pages * page, HKV, D)
            vc = torch.zeros_like(kc)
            kc[: len(ids)], vc[: len(ids)] = k, v
            kc, vc = kc.view(pages, page, HKV, D), vc.view(pages, page, HKV, D)
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
    return _StandInLLM


def test_vllm_driver_collects_every_layer_and_chunk(stand_in_vllm, tmp_path):
    from sparge_calibrate.vllm_driver import capture_vllm

    prompts = [list(range(40)), list(range(70))]
    stand_in_vllm.chunk = 50  # the second prompt arrives as chunks of 50 + 20 queries
    cap = capture_vllm(_model_dir(tmp_path), prompts)
    kw = stand_in_vllm.kwargs
    assert kw["attention_backend"] == "SPARGE" and kw["enforce_eager"] is True
    assert kw["additional_config"] == {"sparge": {"min_sparse_len": 1, "min_sparse_query_len": 1}}
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
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        capture_vllm(model, [list(range(40))], tensor_parallel_size=2)
    monkeypatch.setenv("SPARGE_MODE", "dense")
    with pytest.raises(ValueError, match="unset SPARGE_MODE"):
        capture_vllm(model, [list(range(40))])
    monkeypatch.delenv("SPARGE_MODE")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(ValueError, match="engine in this process"):
        capture_vllm(model, [list(range(40))])
