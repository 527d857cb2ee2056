"""Metrics under load (GPU): ``vllm serve`` with the SPARGE backend driven by ``vllm bench serve``.

A random-dataset load of long prompts (at least 200 requests, 8 at a time) goes through the real
HTTP front end while ``/metrics`` is scraped every second. Checked during and after the load:
every ``sparge_*`` counter is monotone, no request fails, the server logs no error, and the
prompt tokens the backend counted equal vLLM's own count times the number of layers. The cost of
the metrics path per step is measured by ``benchmarks/metrics_overhead.py``.

    SPARGE_TEST_MODEL=models/sparge-tiny-code python3 -m pytest -q -m gpu tests/gpu/test_metrics_soak.py
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests import subproc

MODEL = os.environ.get("SPARGE_TEST_MODEL")
THRESHOLDS = Path(__file__).resolve().parents[2] / "models/sparge-tiny-code-run/thresholds.safetensors"
NUM_PROMPTS = 240
CONCURRENCY = 8
INPUT_LEN = 8192  # random lengths of 4096-12288 tokens (range ratio 0.5)
MIN_SPARSE_LEN = 6144  # about three prompts in four take the sparse path


def _get(url: str, timeout: float = 30) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _samples(text: str) -> dict[str, float]:
    """Every ``sparge_*`` counter sample (name + sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("sparge_") and (s.name.endswith("_total")
                                                 or s.name.endswith("_count")
                                                 or s.name.endswith("_sum")):
                out[s.name + json.dumps(sorted(s.labels.items()))] = s.value
    return out


def _total(text: str, name: str, **labels: str) -> float:
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == name
               and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.gpu
def test_metrics_monotone_under_bench_serve_load(tmp_path, record_property):
    if not MODEL:
        pytest.skip("set SPARGE_TEST_MODEL to a local Llama-style model dir")
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    cfg = json.loads((Path(MODEL) / "config.json").read_text())
    num_layers = cfg["num_hidden_layers"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SPARGE_MIN_SPARSE_LEN": str(MIN_SPARSE_LEN),
           "SPARGE_THRESHOLDS": str(THRESHOLDS)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = subproc.log_path("soak_serve", tmp_path)
    server = subproc.start(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", MODEL,
         "--attention-backend", "SPARGE", "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", "soak", "--no-enable-prefix-caching",
         "--max-model-len", str(2 * INPUT_LEN), "--gpu-memory-utilization", "0.6"],
        env, log)
    scrapes: list[dict[str, float]] = []
    scrape_errors: list[str] = []
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            try:
                scrapes.append(_samples(_get(f"{base}/metrics")))
            except (urllib.error.URLError, OSError) as e:
                scrape_errors.append(repr(e))
            stop.wait(1.0)

    try:
        subproc.wait_healthy(server, f"{base}/health", log, subproc.timeout_s(600))
        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        bench_log = subproc.log_path("soak_bench", tmp_path)
        subproc.run_logged(
            [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve",
             "--backend", "vllm", "--base-url", base, "--model", "soak", "--tokenizer", MODEL,
             "--dataset-name", "random", "--random-input-len", str(INPUT_LEN),
             "--random-output-len", "32", "--random-range-ratio", "0.5",
             "--num-prompts", str(NUM_PROMPTS), "--max-concurrency", str(CONCURRENCY),
             "--ignore-eos", "--seed", "0", "--save-result", "--result-dir", str(tmp_path),
             "--result-filename", "bench.json"],
            env, bench_log, timeout=subproc.timeout_s(600))
        time.sleep(3)  # counters reach /metrics a step or two late (asynchronous read-back)
        stop.set()
        scraper.join(10)
        final_text = _get(f"{base}/metrics")
        scrapes.append(_samples(final_text))
    finally:
        stop.set()
        subproc.stop(server)

    bench = json.loads((tmp_path / "bench.json").read_text())
    record_property("bench", json.dumps({k: bench.get(k) for k in (
        "completed", "failed", "request_throughput", "mean_ttft_ms", "p99_ttft_ms",
        "mean_tpot_ms")}))
    record_property("scrapes", len(scrapes))
    assert bench["failed"] == 0 and bench["completed"] == NUM_PROMPTS, bench.get("errors", [])[:5]
    assert len(scrapes) >= 10 and not scrape_errors, (len(scrapes), scrape_errors[:3])
    for before, after in zip(scrapes, scrapes[1:], strict=False):
        went_down = {k: (v, after.get(k)) for k, v in before.items()
                     if after.get(k, -1.0) < v}
        assert not went_down, f"sparge_* counters decreased or vanished: {went_down}"
    lines = log.read_text(errors="replace").splitlines()
    # NOTE: vLLM logs some optional imports' tracebacks at WARNING level: only ERROR lines and
    # uncaught tracebacks count
    errors = [ln for ln in lines if " ERROR " in ln or ln.startswith("Traceback")]
    assert not errors, errors[:10]
    # every prompt token counted once per layer, on one of the two paths
    sparse = _total(final_text, "sparge_prompt_tokens_total", path="sparse")
    dense = _total(final_text, "sparge_prompt_tokens_total", path="dense")
    assert sparse + dense == _total(final_text, "vllm:prompt_tokens_total") * num_layers
    assert sparse > dense > 0
    valid = _total(final_text, "sparge_attention_blocks_valid_total")
    computed = _total(final_text, "sparge_attention_blocks_computed_total")
    record_property("block_sparsity", 1 - computed / valid)
    assert 0 < computed < valid
