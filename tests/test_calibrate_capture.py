"""The backend's calibration capture sink (``sparge_serve.backend.capture``), on CPU tensors."""

from __future__ import annotations

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
