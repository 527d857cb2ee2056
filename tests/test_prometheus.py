"""A real Prometheus (Debian package ``prometheus``) scrapes a target serving sparge_* series (from
worker files, through SpargeCollector) and fake vllm:* series; every PromQL expression of the
shipped Grafana dashboard must evaluate without error and return finite data. Also
``promtool check config`` on the shipped Prometheus configuration."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from sparge_serve.metrics import FallbackReason, SpargeCollector, SpargeStats

DOCKER = Path(__file__).resolve().parents[1] / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "sparge.json"
MODEL = "org/Model-1.5b"
LAYERS = 4
# Grafana's built-in variables, as Grafana would expand them for a short time range; a
# multi-value variable is regex-escaped with a doubled backslash inside the PromQL string.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1s", "$__range": "5m",
                "$model_name": re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", MODEL)}

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Prometheus is not installed (Debian: apt-get install prometheus; .ci/run does)")


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q)
            assert m, f"variable {var['name']}: unexpected query {q!r}"
            out.append((f"variable {var['name']}", m.group(1)))
    return out


def expand(expr: str) -> str:
    for k in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(k, GRAFANA_VARS[k])
    assert "$" not in expr, f"unexpanded variable in {expr}"
    return expr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def wait_for(what: str, cond, proc, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prometheus exited with {proc.returncode}"
        try:
            got = cond()
        except OSError:
            got = None
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class FakeServer:
    """What vLLM's /metrics would serve: sparge_* from worker files plus vllm:* series."""

    def __init__(self, files_dir: Path) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(SpargeCollector(str(files_dir)))
        r, labels = self.registry, ["model_name", "engine"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "ttft", labels, registry=r,
                              buckets=[0.1, 0.5, 1.0, 5.0, 20.0])
        self.prompt = Counter("vllm:prompt_tokens", "prompt", labels, registry=r)
        self.gen = Counter("vllm:generation_tokens", "gen", labels, registry=r)
        self.kv = Gauge("vllm:kv_cache_usage_perc", "kv", labels, registry=r)
        self.running = Gauge("vllm:num_requests_running", "running", labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "waiting", labels, registry=r)
        self.stats = SpargeStats(LAYERS, "cpu", MODEL, sink_dir=str(files_dir),
                                 start_writer=False, sample_every=1)
        self.stats.set_thresholds_info(file="/thresholds/t.safetensors", sha256="0" * 64,
                                       l1="0.08", pv_l1="0.09", created="2026-01-01")
        self.step = 0

    def forward(self) -> None:
        """One prefill step of a 32K prompt: every metric moves."""
        self.step += 1
        s = self.stats
        for layer in range(LAYERS):
            if layer == 0:  # a dense layer
                s.count_prefill(layer, 0, 32768)
                s.count_fallback(FallbackReason.DENSE_LAYER)
                continue
            timing = s.start_timing()
            s.kernel_stats(layer).add_(torch.tensor([1000, 300 + 10 * layer, 40]))
            s.count_prefill(layer, 32000, 768)
            timing.predictor_done()
            timing.done()
        s.count_fallback(FallbackReason.SHORT_PROMPT, 2)
        s.maybe_flush()
        s.maybe_flush()
        s.write()
        lab = (MODEL, "0")
        self.ttft.labels(*lab).observe(0.3 * self.step)
        self.prompt.labels(*lab).inc(32768)
        self.gen.labels(*lab).inc(128)
        self.kv.labels(*lab).set(0.25 * self.step)
        self.running.labels(*lab).set(1)
        self.waiting.labels(*lab).set(self.step)


@pytest.fixture
def prometheus(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    fake = FakeServer(files)
    fake.forward()
    http, thread = start_http_server(0, addr="127.0.0.1", registry=fake.registry)
    target = f"127.0.0.1:{http.server_port}"
    # The shipped configuration (its vllm job, relabelling included), pointed at the test target.
    shipped = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in shipped["scrape_configs"] if j["job_name"] == "vllm")
    job["static_configs"] = [{"targets": [target]}]
    shipped["global"].update(scrape_interval="1s", scrape_timeout="1s")
    shipped["scrape_configs"] = [job]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(shipped))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc, port, fake
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        http.shutdown()
        http.server_close()
        thread.join(5)


def test_every_dashboard_query_returns_data(prometheus):
    proc, port, fake = prometheus
    queries = dashboard_queries()
    assert len(queries) >= 20

    def scraped_step(step: int):
        res = api(port, "/api/v1/query",
                  query='max(sparge_dense_fallbacks_total{reason="dense_layer"})')  # 1 a step
        vals = res["data"]["result"]
        return bool(vals) and float(vals[0]["value"][1]) >= step

    wait_for("the first scrape", lambda: scraped_step(1), proc)
    fake.forward()  # counters move between two scrapes, so rate() and quantiles have data
    wait_for("a scrape of the second step", lambda: scraped_step(2), proc)

    problems = []
    for where, expr in queries:
        q = expand(expr)
        try:
            res = api(port, "/api/v1/query", query=q)
        except urllib.error.HTTPError as e:  # 400 = PromQL error, with the message in the body
            problems.append(f"{where}: HTTP {e.code} {e.read()[:300]!r} for {q}")
            continue
        result = res["data"]["result"]
        if res["status"] != "success" or not result:
            problems.append(f"{where}: no data for {q}")
            continue
        values = [float(r["value"][1]) for r in result]
        if not all(math.isfinite(v) for v in values):
            problems.append(f"{where}: non-finite {values} for {q}")
    assert not problems, "\n".join(problems)

    # Spot-check a value against the data: sparsity of layer 1 = 1 - 310/1000.
    res = api(port, "/api/v1/query", query=expand(
        '1 - sum by (layer) (rate(sparge_attention_blocks_computed_total{layer="1"}[1m]))'
        ' / sum by (layer) (rate(sparge_attention_blocks_valid_total{layer="1"}[1m]))'))
    assert float(res["data"]["result"][0]["value"][1]) == pytest.approx(0.69)


def test_promtool_accepts_shipped_config():
    res = subprocess.run(["promtool", "check", "config", str(DOCKER / "prometheus" /
                                                              "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr
