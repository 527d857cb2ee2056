"""sparge_serve.metrics: exposition of known counters, multi-process merge, the bridge to vLLM's
/metrics (both of vLLM's registry modes). CPU only."""

from __future__ import annotations

import math
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import sparge_serve.metrics.export as metrics_export
import sparge_serve.metrics.stats as metrics_stats
from sparge_serve import metrics
from sparge_serve.metrics import (
    METRICS_DIR_ENV,
    TIME_BUCKETS,
    FallbackReason,
    SpargeCollector,
    SpargeStats,
    install_metrics_bridge,
)

MODEL = "org/model-7b"
# (layer, valid, computed, pv_skipped) the "kernels" add, in two forwards.
BLOCK_ADDS = [(0, 10, 6, 2), (2, 20, 5, 1), (0, 4, 4, 0)]
TOKENS = [(0, 100, 28), (1, 0, 128), (2, 100, 28)]  # (layer, sparse, dense)
FALLBACKS = [(FallbackReason.SHORT_PROMPT, 2), (FallbackReason.DENSE_LAYER, 1),
             ("short_prompt", 1)]
# perf_counter values read by the host "events": start, predictor end, attention end (binary
# fractions, so the differences are exact): attention 7.8 ms, predictor 1.95 ms.
CLOCK = [1.0, 1.0 + 2**-9, 1.0 + 2**-7]
ATTN_S, PRED_S = 2**-7, 2**-9


def scrape(collector_dir: str) -> dict[str, dict[tuple, float]]:
    """Text exposition of the collector, parsed back: {sample name: {sorted labels: value}}."""
    registry = CollectorRegistry()
    registry.register(SpargeCollector(collector_dir))
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def lab(**kw: str) -> tuple:
    return tuple(sorted({"model_name": MODEL, **kw}.items()))


def feed(stats: SpargeStats) -> None:
    for layer, *vals in BLOCK_ADDS:
        stats.kernel_stats(layer).add_(torch.tensor(vals))
    for layer, s, d in TOKENS:
        stats.count_prefill(layer, s, d)
    for reason, n in FALLBACKS:
        stats.count_fallback(reason, n)


def test_exposition_known_batch(tmp_path, monkeypatch):
    stats = SpargeStats(3, "cpu", MODEL, sink_dir=str(tmp_path), start_writer=False,
                        sample_every=2)
    stats.set_thresholds_info(file="/t/th.safetensors", sha256="ab" * 32, l1="0.08",
                              pv_l1="0.09")
    feed(stats)
    clock = iter(CLOCK)
    monkeypatch.setattr(metrics_stats.time, "perf_counter", lambda: next(clock))
    sample = stats.start_timing()  # the first call is always sampled
    assert stats.start_timing() is None  # sample_every=2: then one call in two
    sample.predictor_done()
    sample.done()

    stats.maybe_flush()  # starts the counter copy
    stats.write()
    before = scrape(str(tmp_path))
    # The device copy is read only by a later flush: no block counts yet, host counts already.
    assert before["sparge_attention_blocks_valid_total"][lab(layer="0")] == 0
    assert before["sparge_prompt_tokens_total"][lab(layer="1", path="dense")] == 128

    stats.maybe_flush()
    stats.write()
    got = scrape(str(tmp_path))

    exp_blocks = {0: (14, 10, 2), 1: (0, 0, 0), 2: (20, 5, 1)}
    for layer, (valid, computed, skipped) in exp_blocks.items():
        assert got["sparge_attention_blocks_valid_total"][lab(layer=str(layer))] == valid
        assert got["sparge_attention_blocks_computed_total"][lab(layer=str(layer))] == computed
        assert got["sparge_pv_blocks_skipped_total"][lab(layer=str(layer))] == skipped
    for layer, s, d in TOKENS:
        assert got["sparge_prompt_tokens_total"][lab(layer=str(layer), path="sparse")] == s
        assert got["sparge_prompt_tokens_total"][lab(layer=str(layer), path="dense")] == d
    assert got["sparge_dense_fallbacks_total"] == {
        lab(reason="short_prompt"): 3, lab(reason="dense_layer"): 1,
        lab(reason="mode_dense"): 0, lab(reason="unsupported"): 0}

    attn = got["sparge_sparse_attention_seconds_bucket"]
    assert len(attn) == len(TIME_BUCKETS)
    for bound in TIME_BUCKETS:  # cumulative buckets
        le = "+Inf" if math.isinf(bound) else repr(bound)
        assert attn[lab(le=le)] == (1 if bound >= ATTN_S else 0), le
    assert got["sparge_sparse_attention_seconds_count"][lab()] == 1
    assert got["sparge_sparse_attention_seconds_sum"][lab()] == ATTN_S
    assert got["sparge_predictor_seconds_bucket"][lab(le="0.0025")] == 1
    assert got["sparge_predictor_seconds_bucket"][lab(le="0.001")] == 0
    assert got["sparge_predictor_seconds_sum"][lab()] == PRED_S

    assert got["sparge_thresholds_info"] == {
        lab(file="/t/th.safetensors", sha256="ab" * 32, l1="0.08", pv_l1="0.09", created=""): 1}
    stats.close()


def test_forward_pass_exports_kernel_counts(tmp_path, device):
    """The real kernels (Triton's CPU interpreter without a GPU) add into kernel_stats(layer);
    the exported series equal the reference's counts for that batch."""
    from sparge_serve.kernels import sparge_paged_prefill
    from sparge_serve.reference import paged_prefill_ref
    from tests.kernel_inputs import head_vec, make_paged_case

    case = make_paged_case([(260, 500), (70, 70)], 4, 2, 64, 16, device=device)
    sim, cdf, pv, topk = head_vec(-1.0, 4, device), head_vec(0.9, 4, device), head_vec(
        50.0, 4, device), 0.25
    stats = SpargeStats(3, device, MODEL, sink_dir=str(tmp_path), start_writer=False)
    out = torch.empty_like(case.q)
    sparge_paged_prefill(case.q, case.key_cache, case.value_cache, case.batch, case.scale,
                         sim, cdf, pv, out, topk=topk, stats=stats.kernel_stats(2))
    stats.maybe_flush()
    stats.maybe_flush()
    stats.write()
    _, _, ref = paged_prefill_ref(case.q, case.key_cache, case.value_cache, case.batch,
                                  case.scale, sim.cpu(), cdf.cpu(), pv.cpu(), topk)
    got = scrape(str(tmp_path))
    valid, kept, skipped = ref.tolist()
    assert 0 < kept < valid
    assert got["sparge_attention_blocks_valid_total"][lab(layer="2")] == valid
    assert got["sparge_attention_blocks_computed_total"][lab(layer="2")] == kept
    assert got["sparge_pv_blocks_skipped_total"][lab(layer="2")] == skipped == 0
    assert got["sparge_attention_blocks_valid_total"][lab(layer="0")] == 0
    stats.close()


def test_counters_accumulate_and_rank_nonzero_exports_no_tokens(tmp_path):
    stats = SpargeStats(2, "cpu", MODEL, tp_rank=1, sink_dir=str(tmp_path), start_writer=False)
    for expected in (8, 16):
        stats.kernel_stats(1).add_(torch.tensor([8, 4, 1]))
        stats.count_prefill(1, 64, 0)
        stats.count_fallback(FallbackReason.MODE_DENSE)
        stats.maybe_flush()
        stats.maybe_flush()
        stats.write()
        got = scrape(str(tmp_path))
        assert got["sparge_attention_blocks_valid_total"][lab(layer="1")] == expected
    # Every TP rank sees the same tokens: only rank 0 exports them (and fallbacks).
    assert "sparge_prompt_tokens_total" not in got
    assert "sparge_dense_fallbacks_total" not in got
    stats.close()


def test_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="sample_every"):
        SpargeStats(2, "cpu", MODEL, sample_every=0, sink_dir=None)
    stats = SpargeStats(2, "cpu", MODEL, sink_dir=None)
    with pytest.raises(KeyError):
        stats.count_fallback("no_such_reason")
    with pytest.raises(ValueError, match="unknown labels"):
        stats.set_thresholds_info(request_id="x")


def test_timing_sampling_and_pending_limit():
    stats = SpargeStats(1, "cpu", MODEL, sink_dir=None, sample_every=3, max_pending_samples=2)
    taken = [stats.start_timing() for _ in range(12)]
    sampled = [i for i, t in enumerate(taken) if t is not None]
    assert sampled == [0, 3]  # the first, then one in three; then the pool of 2 is empty
    for t in taken:
        if t is not None:
            t.done()
    stats.maybe_flush()
    assert sum(stats.snapshot()["attention_hist"][0]) == 2
    assert sum(stats.snapshot()["predictor_hist"][0]) == 0  # predictor_done() was not called
    # refilled; the one-in-three cadence went on while the pool was empty (calls 6 and 9)
    assert [stats.start_timing() is not None for _ in range(3)] == [True, False, False]


# ---- start-up / dummy runs (suspension) --------------------------------------------------------

def _exported(stats: SpargeStats, tmp_path) -> dict[str, dict[tuple, float]]:
    stats.maybe_flush()  # starts the device -> host copy (if allowed) ...
    stats.maybe_flush()  # ... and reads it (host "events" complete at once)
    stats.write()
    return scrape(str(tmp_path))


def _nonzero(got: dict[str, dict[tuple, float]]) -> dict[str, dict[tuple, float]]:
    return {name: {k: v for k, v in series.items() if v} for name, series in got.items()}


def test_counts_recorded_while_suspended_are_dropped(tmp_path):
    stats = SpargeStats(4, "cpu", MODEL, sink_dir=str(tmp_path), start_writer=False,
                        sample_every=1)
    feed(stats)
    real = _nonzero(_exported(stats, tmp_path))
    assert real["sparge_attention_blocks_valid_total"][lab(layer="0")] == 14
    before = stats.snapshot()
    blocks_before = stats.blocks.clone()

    stats.suspend()
    assert stats.suspended
    feed(stats)  # a warm-up batch: kernels, tokens, fallbacks ...
    assert stats.start_timing() is None  # ... and no timing sample
    stats.kernel_stats(3).add_(torch.tensor([7, 7, 7]))
    # Exported values never include suspended work (counters must not go up, then down).
    assert _nonzero(_exported(stats, tmp_path)) == real
    stats.resume()
    assert not stats.suspended

    assert torch.equal(stats.blocks, blocks_before)  # the device counters were put back
    assert _nonzero(_exported(stats, tmp_path)) == real
    assert stats.snapshot() == before
    # Counting goes on from the real values.
    feed(stats)
    t = stats.start_timing()
    assert t is not None
    t.done()
    got = _exported(stats, tmp_path)
    assert got["sparge_attention_blocks_valid_total"][lab(layer="0")] == 28
    assert got["sparge_prompt_tokens_total"][lab(layer="0", path="sparse")] == 200
    assert got["sparge_dense_fallbacks_total"][lab(reason="short_prompt")] == 6
    assert got["sparge_sparse_attention_seconds_count"][lab()] == 1
    stats.close()


def test_suspension_nests_and_spares_samples_in_flight(tmp_path):
    stats = SpargeStats(1, "cpu", MODEL, sink_dir=None, sample_every=1)
    t = stats.start_timing()  # a real call, sampled before the suspension
    t.done()
    stats.suspend()
    stats.suspend()
    stats.resume()
    assert stats.suspended  # the inner resume() does not end the outer suspend()
    stats.count_prefill(0, 5, 5)
    stats.kernel_stats(0).add_(torch.tensor([1, 1, 1]))
    stats.maybe_flush()
    assert sum(stats.snapshot()["attention_hist"][0]) == 0  # not read while suspended
    stats.resume()
    stats.resume()  # unmatched: nothing
    stats.maybe_flush()
    stats.maybe_flush()
    snap = stats.snapshot()
    assert snap["tokens"] == [[0, 0]] and snap["blocks"] == [[0, 0, 0]]
    assert sum(snap["attention_hist"][0]) == 1  # the real sample is kept


@pytest.fixture
def fresh_stats(monkeypatch):
    """The per-process SpargeStats and suspension state, reset for one test."""
    monkeypatch.setattr(metrics_stats, "_STATS", None)
    monkeypatch.setattr(metrics_stats, "_SUSPEND_DEPTH", 0)
    yield
    assert not metrics.metrics_suspended_now()


def test_process_suspension_covers_existing_and_new_stats(fresh_stats):
    stats = metrics.get_sparge_stats(2, "cpu", MODEL, sink_dir=None)
    stats.count_prefill(0, 10, 0)
    with metrics.metrics_suspended():
        assert stats.suspended and metrics.metrics_suspended_now()
        with metrics.metrics_suspended():  # nested (capture_model -> _dummy_run)
            stats.count_prefill(0, 99, 99)
        assert stats.suspended
        stats.count_fallback(FallbackReason.SHORT_PROMPT, 3)
    assert not stats.suspended
    assert stats.snapshot()["tokens"] == [[10, 0], [0, 0]]
    assert stats.snapshot()["fallbacks"][FallbackReason.SHORT_PROMPT] == 0
    metrics.resume_metrics()  # unmatched: nothing
    assert not stats.suspended

    # A SpargeStats created inside a start-up run (vLLM's profiling KV cache builds the backend
    # there) starts suspended and drops that run's counts.
    metrics_stats._STATS = None
    with pytest.raises(RuntimeError, match="boom"), metrics.metrics_suspended():
        new = metrics.get_sparge_stats(2, "cpu", MODEL, sink_dir=None)
        assert new.suspended
        feed_layers = [(0, 1, 2), (1, 3, 4)]
        for layer, s, d in feed_layers:
            new.count_prefill(layer, s, d)
        new.kernel_stats(1).add_(torch.tensor([5, 5, 5]))
        raise RuntimeError("boom")  # an exception still resumes
    assert not new.suspended
    assert new.snapshot()["tokens"] == [[0, 0], [0, 0]]
    assert new.blocks.sum().item() == 0


def test_sha256_file(tmp_path):
    import hashlib

    p = tmp_path / "f.bin"
    p.write_bytes(bytes(range(256)) * 5000)
    assert metrics.sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()


# ---- the bridge --------------------------------------------------------------------------------

@pytest.fixture
def fresh_bridge(tmp_path, monkeypatch):
    """install_metrics_bridge() as in a new top-level process, with its temp dir in tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(metrics_export, "_BRIDGE", None)
    monkeypatch.setenv(METRICS_DIR_ENV, "")  # restored (unset) after the test
    monkeypatch.delenv(METRICS_DIR_ENV)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    return tmp_path


def _stale_dir(base: Path) -> str:
    """A directory the bridge created for a process that has exited (its marker lock is free)."""
    owned = metrics_export._make_private_dir(999_999_999)
    assert os.path.dirname(owned.path) == str(base)
    Path(owned.path, "counter_sparge-1.db").write_bytes(b"")
    os.close(owned.fd)  # what the owner's exit does to its lock
    return owned.path


def test_bridge_top_level_creates_dir_and_removes_stale(fresh_bridge):
    stale = _stale_dir(fresh_bridge)
    registry = CollectorRegistry()
    path = install_metrics_bridge(registry)
    assert path is not None and os.path.isdir(path)
    assert os.environ[METRICS_DIR_ENV] == path
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # never switch prometheus_client's mode
    assert not os.path.exists(stale)
    assert install_metrics_bridge(registry) == path  # idempotent: registered once
    stats = SpargeStats(1, "cpu", MODEL, start_writer=False)
    stats.count_prefill(0, 3, 0)
    stats.write()
    text = generate_latest(registry).decode()
    assert text.count('sparge_prompt_tokens_total{layer="0"') == 2  # sparse + dense, not 4
    stats.close()


def test_stale_scan_spares_what_it_did_not_create(fresh_bridge):
    # Names like ours, none with an unlocked marker of ours: a user's results, an old pid's dir
    # without marker, a marker of other content, a link to a user directory, a file.
    user = fresh_bridge / "sparge-metrics-2024-results"
    no_marker = fresh_bridge / "sparge-metrics-999999999-old"
    forged = fresh_bridge / "sparge-metrics-999999998-x"
    target = fresh_bridge / "precious"
    for d in (user, no_marker, forged, target):
        d.mkdir()
        (d / "data.csv").write_text("1,2\n")
    (forged / metrics_export._MARKER).write_text("not ours\n")
    (fresh_bridge / "sparge-metrics-1-link").symlink_to(target)
    (fresh_bridge / "sparge-metrics-3-file").write_text("x")
    stale = _stale_dir(fresh_bridge)
    assert metrics_export._remove_stale_dirs(str(fresh_bridge)) == [stale]
    for d in (user, no_marker, forged, target):
        assert (d / "data.csv").read_text() == "1,2\n"
    assert (fresh_bridge / "sparge-metrics-1-link").is_symlink()
    assert (fresh_bridge / "sparge-metrics-3-file").exists()


def test_stale_scan_spares_a_live_owner_whatever_its_pid(fresh_bridge):
    # Another PID namespace (a container sharing /tmp): the owner's pid in the name is not a live
    # process here, but the owner holds its marker's lock.
    other = metrics_export._make_private_dir(1)
    dead_pid = metrics_export._make_private_dir(999_999_999)
    try:
        assert metrics_export._remove_stale_dirs(str(fresh_bridge)) == []
        assert os.path.isdir(other.path) and os.path.isdir(dead_pid.path)
    finally:
        for owned in (other, dead_pid):
            os.close(owned.fd)
    assert sorted(metrics_export._remove_stale_dirs(str(fresh_bridge))) == sorted(
        [other.path, dead_pid.path])


def test_own_dir_removed_at_exit_only_if_still_ours(fresh_bridge):
    owned = metrics_export._make_private_dir(os.getpid())
    Path(owned.path, "counter_sparge-7.db").write_bytes(b"")
    metrics_export._remove_private_dir(owned)
    assert not os.path.exists(owned.path)

    # The directory was replaced under its name: the exit leaves the replacement alone.
    owned = metrics_export._make_private_dir(os.getpid())
    other = metrics_export._make_private_dir(os.getpid())
    os.close(other.fd)
    os.replace(os.path.join(other.path, metrics_export._MARKER),
               os.path.join(owned.path, metrics_export._MARKER))
    metrics_export._remove_private_dir(owned)
    assert os.path.isdir(owned.path)


def test_own_dir_already_gone_is_quiet(fresh_bridge, vllm_log):
    owned = metrics_export._make_private_dir(os.getpid())
    Path(owned.path, metrics_export._MARKER).unlink()
    metrics_export._remove_private_dir(owned)  # marker gone, directory there: not provably ours
    assert os.path.isdir(owned.path) and "no longer the directory" in vllm_log.text
    vllm_log.clear()
    os.rmdir(owned.path)
    metrics_export._remove_private_dir(owned)
    assert "no longer the directory" not in vllm_log.text


def _worker(rank: int, done, model: str) -> None:
    # What a vLLM worker process does: the plugin installs the bridge, the backend counts.
    path = install_metrics_bridge()
    assert path == os.environ[METRICS_DIR_ENV]
    assert metrics.default_sink_dir() == path
    stats = metrics.get_sparge_stats(4, "cpu", model, tp_rank=rank, write_interval_s=0.05)
    stats.kernel_stats(3).add_(torch.tensor([100 + rank, 50, 7]))
    stats.count_prefill(3, 1000, 24)
    stats.count_fallback(FallbackReason.SHORT_PROMPT, 5)
    stats.maybe_flush()
    stats.maybe_flush()
    done.wait(60)  # the writer thread exports while we wait (no explicit write)


def test_two_worker_processes_are_summed(fresh_bridge):
    registry = CollectorRegistry()
    path = install_metrics_bridge(registry)
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Event()
    procs = [ctx.Process(target=_worker, args=(rank, done, MODEL)) for rank in (0, 1)]
    for p in procs:
        p.start()
    want = {("sparge_attention_blocks_valid_total", lab(layer="3")): 201,
            ("sparge_attention_blocks_computed_total", lab(layer="3")): 100,
            ("sparge_pv_blocks_skipped_total", lab(layer="3")): 14,
            ("sparge_prompt_tokens_total", lab(layer="3", path="sparse")): 1000,
            ("sparge_prompt_tokens_total", lab(layer="3", path="dense")): 24,
            ("sparge_dense_fallbacks_total", lab(reason="short_prompt")): 5}
    got: dict = {}
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            assert all(p.exitcode in (None, 0) for p in procs)
            text = generate_latest(registry).decode()  # the registry the bridge registered into
            got = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
            if all(got.get(k) == v for k, v in want.items()):
                break
            time.sleep(0.1)
    finally:
        done.set()
        for p in procs:
            p.join(30)
    assert {k: got.get(k) for k in want} == want
    assert [p.exitcode for p in procs] == [0, 0]
    assert len([f for f in os.listdir(path) if f.startswith("counter_")]) == 2


# ---- vLLM's /metrics ---------------------------------------------------------------------------

def test_vllm_metrics_endpoint_serves_sparge_series(fresh_bridge, monkeypatch):
    """Build /metrics exactly as vLLM 0.26's API server does and scrape it: sparge_* from the
    worker files next to vllm:* from the global registry, in both of vLLM's registry modes."""
    pytest.importorskip("vllm")
    from fastapi import FastAPI
    from prometheus_client import REGISTRY
    from starlette.testclient import TestClient
    from vllm.entrypoints.serve.instrumentator.metrics import attach_router
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group
    from vllm.v1.metrics.prometheus import unregister_vllm_metrics

    # What vLLM does in the API server while parsing `vllm serve` arguments: run our entry point.
    load_plugins_by_group(DEFAULT_PLUGINS_GROUP)["sparge"]()
    assert metrics_export._BRIDGE is not None, "plugin.register() did not install the metrics bridge"
    path = metrics_export._BRIDGE.path
    assert os.environ[METRICS_DIR_ENV] == path
    collector = metrics_export._BRIDGE.collector
    vllm_counter = Counter("vllm:sparge_test_requests", "test", registry=REGISTRY)
    try:
        stats = SpargeStats(2, "cpu", MODEL, start_writer=False)  # LLM-in-one-process case
        assert stats.sink_dir == path
        stats.kernel_stats(1).add_(torch.tensor([9, 3, 1]))
        stats.maybe_flush()
        stats.maybe_flush()
        stats.write()
        vllm_counter.inc(2)

        app = FastAPI()
        attach_router(app)
        text = TestClient(app).get("/metrics").text
        assert f'sparge_attention_blocks_valid_total{{layer="1",model_name="{MODEL}"}} 9.0' in text
        assert "vllm:sparge_test_requests_total 2.0" in text

        unregister_vllm_metrics()  # what vLLM's stat logger does at start: ours survive
        text = TestClient(app).get("/metrics").text
        assert "sparge_attention_blocks_valid_total" in text
        assert "vllm:sparge_test_requests_total" not in text

        # --api-server-count > 1: vLLM serves a MultiProcessCollector over
        # PROMETHEUS_MULTIPROC_DIR; workers that see it write there instead.
        mp_dir = fresh_bridge / "prom_mp"
        mp_dir.mkdir()
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(mp_dir))
        mp_stats = SpargeStats(2, "cpu", "other", start_writer=False)
        assert mp_stats.sink_dir == str(mp_dir)
        mp_stats.count_prefill(0, 5, 6)
        mp_stats.write()
        app2 = FastAPI()
        attach_router(app2)
        text = TestClient(app2).get("/metrics").text
        assert 'sparge_prompt_tokens_total{layer="0",model_name="other",path="dense"} 6.0' in text
        assert 'model_name="org/model-7b"' not in text  # the private dir is not served then
        stats.close()
        mp_stats.close()
    finally:
        REGISTRY.unregister(collector)
        if vllm_counter in REGISTRY._collector_to_names:
            REGISTRY.unregister(vllm_counter)


# ---- GPU: a real `vllm serve` ------------------------------------------------------------------

SERVE_MODEL = os.environ.get("SPARGE_TEST_MODEL")
SERVE_PROMPT_LENS = [1024, 4096, 8192]  # the first stays below min_sparse_len: a dense fallback
SERVE_MIN_SPARSE_LEN = 2048


def _http(url: str, body: dict | None = None, timeout: float = 600) -> bytes:
    import json
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def _totals(text: str) -> dict[str, float]:
    """Sample name (+ path label for prompt tokens) -> value summed over the other labels."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + (f"/{s.labels['path']}" if "path" in s.labels else "")
            out[key] = out.get(key, 0.0) + s.value
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_serve_exports_sparge_metrics(tp, tmp_path):
    """`vllm serve` with the SPARGE backend: after a few requests, /metrics (the API server's,
    same port as vllm:*) carries sparge_* series consistent with the prompts sent."""
    import json
    import socket
    import sys

    from tests import subproc

    if not SERVE_MODEL:
        pytest.skip("set SPARGE_TEST_MODEL to a local Llama-style model dir")
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs")
    cfg = json.loads((Path(SERVE_MODEL) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    num_layers, vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_ATTENTION_BACKEND": "SPARGE",
           "SPARGE_MIN_SPARSE_LEN": str(SERVE_MIN_SPARSE_LEN), "SPARGE_THRESHOLDS": "untuned"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop(METRICS_DIR_ENV, None)
    log = subproc.log_path(f"serve_tp{tp}", tmp_path)
    server = subproc.start(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", SERVE_MODEL,
         "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "sparge-test",
         "--tensor-parallel-size", str(tp), "--no-enable-prefix-caching",
         "--max-model-len", str(max(SERVE_PROMPT_LENS) + 64), "--gpu-memory-utilization", "0.6",
         "--max-num-batched-tokens", str(2 * max(SERVE_PROMPT_LENS)),  # one chunk per prompt
         *(subproc.NCCL_ONLY_SERVE_FLAGS if tp > 1 else [])],
        env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        subproc.wait_healthy(server, f"{base}/health", log, subproc.timeout_s(600))
        g = torch.Generator().manual_seed(0)
        for n in SERVE_PROMPT_LENS:  # one at a time: deterministic chunking for the TP compare
            ids = torch.randint(100, vocab - 100, (n,), generator=g).tolist()
            _http(f"{base}/v1/completions", {"model": "sparge-test", "prompt": ids,
                                             "max_tokens": 8, "temperature": 0})
        prompt_tokens = sum(SERVE_PROMPT_LENS)
        deadline = time.monotonic() + 60
        while True:  # counters reach /metrics asynchronously (writer interval, GPU read-back)
            text = _http(f"{base}/metrics").decode()
            t = _totals(text)
            tokens = t.get("sparge_prompt_tokens_total/sparse", 0) + t.get(
                "sparge_prompt_tokens_total/dense", 0)
            if tokens == prompt_tokens * num_layers and t.get(
                    "sparge_attention_blocks_valid_total", 0) > 0:
                break
            assert time.monotonic() < deadline, f"sparge_* not consistent with the prompts: {t}"
            time.sleep(0.5)
        assert t["vllm:prompt_tokens_total"] == prompt_tokens  # same endpoint as vllm:*
        assert 'sparge_attention_blocks_valid_total{layer="0",model_name="sparge-test"}' in text
        assert t["sparge_prompt_tokens_total/sparse"] > 0
        assert t["sparge_prompt_tokens_total/dense"] >= 1024 * num_layers
        assert t["sparge_dense_fallbacks_total"] >= num_layers  # the short prompt, every layer
        valid = t["sparge_attention_blocks_valid_total"]
        # exact: each sparse prompt is one chunk; every (query block, key block) pair it can see,
        # for every query head (all ranks together) and layer
        from sparge_serve.reference import block_masks

        heads = cfg["num_attention_heads"]
        assert valid == heads * num_layers * sum(
            int(block_masks(n, n)[0].sum()) for n in SERVE_PROMPT_LENS if n >= SERVE_MIN_SPARSE_LEN)
        assert 0 < t["sparge_attention_blocks_computed_total"] <= valid
        assert t["sparge_pv_blocks_skipped_total"] <= t["sparge_attention_blocks_computed_total"]
        assert t["sparge_sparse_attention_seconds_count"] > 0
    finally:
        subproc.stop(server)
