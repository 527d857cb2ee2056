"""docker/: the compose file validates (``docker compose config``, or docker-compose v1), needs the
Grafana password from the environment, and wires the pieces together; the dashboard JSON is valid
and every panel and query uses the datasource variable. No Docker engine is needed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"
COMPOSE = DOCKER / "compose.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "sparge.json"
DS_REF = {"type": "prometheus", "uid": "${datasource}"}
REQUIRED_ENV = {"MODEL_DIR": "/srv/models/m", "THRESHOLDS_FILE": "/srv/t.safetensors",
                "GRAFANA_ADMIN_PASSWORD": "not-a-default"}


def compose_cmd() -> list[str] | None:
    """`docker compose` (v2 plugin) if present, else `docker-compose` (v1), else None."""
    if shutil.which("docker"):
        res = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if res.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def run_config(env_overrides: dict[str, str | None]) -> subprocess.CompletedProcess:
    cmd = compose_cmd()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed "
                    "(Debian: apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items()
           if k not in REQUIRED_ENV and not k.startswith("COMPOSE_")}
    for k, v in {**REQUIRED_ENV, **env_overrides}.items():
        if v is not None:
            env[k] = v
    return subprocess.run([*cmd, "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                          env=env, timeout=60, cwd=DOCKER)


def test_compose_config_validates_and_wires_services():
    res = run_config({})
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    services = cfg["services"]
    assert set(services) == {"vllm", "prometheus", "grafana"}

    vllm = services["vllm"]
    assert vllm["environment"]["VLLM_ATTENTION_BACKEND"] == "SPARGE"
    thresholds = vllm["environment"]["SPARGE_THRESHOLDS"]
    mounts = {str(v).split(":")[1]: v for v in vllm["volumes"]} if isinstance(
        vllm["volumes"][0], str) else {v["target"]: v for v in vllm["volumes"]}
    th_mount = mounts[thresholds]
    model_mount = mounts["/models/model"]
    for m in (th_mount, model_mount):  # read-only, from the host paths given in the environment
        assert (m.endswith(":ro") if isinstance(m, str) else m.get("read_only")), m
    assert REQUIRED_ENV["THRESHOLDS_FILE"] in str(th_mount)
    assert vllm["command"][0] == "/models/model"
    assert vllm["ipc"] == "host"
    gpu = vllm["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "/health" in " ".join(vllm["healthcheck"]["test"])
    assert _seconds(vllm["healthcheck"]["start_period"]) >= 600  # model load + compile + graphs

    for name in ("prometheus", "grafana"):
        assert services[name]["healthcheck"]["test"], name
    prom_mounts = " ".join(str(v) for v in services["prometheus"]["volumes"])
    assert "prometheus.yml" in prom_mounts
    grafana = services["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "not-a-default"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def _seconds(value) -> float:
    if isinstance(value, (int, float)):  # docker compose v2 prints nanoseconds
        return value / 1e9 if value > 1e6 else value
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", str(value)):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}[unit]
    return total


@pytest.mark.parametrize("missing", ["GRAFANA_ADMIN_PASSWORD", "MODEL_DIR", "THRESHOLDS_FILE"])
def test_compose_refuses_missing_required_settings(missing):
    res = run_config({missing: None})
    assert res.returncode != 0
    assert missing in res.stderr  # the error names what to set


def test_dashboard_panels_use_datasource_variable():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model_name"]["datasource"] == DS_REF
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["datasource"] == DS_REF, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS_REF, p["title"]
            if "sparge_" in t["expr"] or "vllm:" in t["expr"]:
                assert 'model_name=~"$model_name"' in t["expr"], (p["title"], t["expr"])
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in ("sparsity", "per layer", "prompt tokens", "p50/p95/p99", "predictor",
                  "fallbacks", "thresholds", "time to first token", "throughput", "kv-cache"):
        assert topic in titles, topic
    assert any(p["type"] == "heatmap" for p in panels)


def test_grafana_provisioning_matches_compose_mounts():
    ds = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/sparge.yaml").read_text())
    dash_path = prov["providers"][0]["options"]["path"]
    compose = yaml.safe_load(COMPOSE.read_text())
    grafana_mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{dash_path}:ro" in grafana_mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana_mounts
    prom = yaml.safe_load((DOCKER / "prometheus/prometheus.yml").read_text())
    targets = [t for j in prom["scrape_configs"] for s in j["static_configs"]
               for t in s["targets"]]
    assert "vllm:8000" in targets


def test_dockerfile_extends_vllm_image_and_serves():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM vllm/vllm-openai:v0\.26\.0$", text, re.M)
    assert re.search(r"pip install .*--no-deps", text)
    assert re.search(r'^ENTRYPOINT \["vllm", "serve"\]$', text, re.M)
    for path in re.findall(r"^COPY (.+) /opt/", text, re.M):
        for src in path.split():
            assert (DOCKER.parent / src).exists(), src
