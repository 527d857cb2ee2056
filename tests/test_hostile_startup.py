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
import torch
from prometheus_client import CollectorRegistry

import sparge_serve.metrics.export as metrics_export
import sparge_serve.metrics.stats as metrics_stats
from sparge_serve import config, metrics
from sparge_serve.config import SpargeConfig

# ---- the metrics bridge never removes what it did not create -----------------------------------


@pytest.fixture
def tmp_base(tmp_path, monkeypatch):
    """A fresh top-level process's view: the temporary directory is tmp_path, no bridge yet."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(metrics_export, "_BRIDGE", None)
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
    live = metrics_export._make_private_dir(999_999_999)
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
    ({"SPARGE_FAST_LAUNCH": "nope"},
     "`fast_launch` (env SPARGE_FAST_LAUNCH) = 'nope' is not a boolean"),
])
def test_unreadable_boolean_is_refused(env, cause):
    with pytest.raises(ValueError) as ei:
        SpargeConfig.from_dict(None, env=env)
    assert cause in str(ei.value)


@pytest.mark.parametrize("value,fast", [("false", False), ("OFF", False), ("no", False),
                                        ("0", False), ("yes", True), ("1", True), ("", True)])
def test_fast_launch_switch_reads_booleans(value, fast):
    cfg = SpargeConfig.from_dict(None, env={"SPARGE_FAST_LAUNCH": value})
    assert cfg.fast_launch is fast


def test_fast_launch_switch_refuses_the_rest():
    with pytest.raises(ValueError, match=r"`fast_launch` \(env SPARGE_FAST_LAUNCH\) = 'maybe' "
                       "is not a boolean"):
        SpargeConfig.from_dict({"fast_launch": True}, env={"SPARGE_FAST_LAUNCH": "maybe"})


# ---- the front end refuses a bad option or file before any engine starts -------------------------

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "models" / "sparge-tiny-code"  # 4 layers, 8 heads, 2 KV heads, head_dim 128
TINY_THRESHOLDS = REPO / "models" / "sparge-tiny-code-run" / "thresholds.safetensors"


@pytest.fixture
def front_end(monkeypatch):
    """``make(**engine_args)``: EngineArgs(TINY_MODEL, SPARGE, ...).create_engine_config() as the
    API server runs it (platform made to say "cpu"; no metrics bridge; no SPARGE_* env)."""
    from vllm.platforms import current_platform

    import sparge_serve.plugin as plugin

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(current_platform, "device_type", "cpu", raising=False)
    monkeypatch.setattr(metrics, "install_metrics_bridge", lambda *a, **k: None)
    monkeypatch.setattr(config, "_WARNED_ENV", set())
    for var in [v for v in os.environ if v.startswith("SPARGE_")]:
        monkeypatch.delenv(var)
    plugin.register()

    def make(sparge=None, **kwargs):
        from vllm.engine.arg_utils import EngineArgs

        if sparge is not None:
            kwargs["additional_config"] = {"sparge": sparge}
        return EngineArgs(model=str(TINY_MODEL), skip_tokenizer_init=True,
                          attention_backend="SPARGE", **kwargs).create_engine_config()

    return make


def _thresholds_file(path: Path, **meta) -> Path:
    """A copy of the shipped tiny-model thresholds with some metadata replaced."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(TINY_THRESHOLDS), framework="pt") as f:
        metadata = {**f.metadata(), **meta}
    save_file(load_file(str(TINY_THRESHOLDS)), str(path), metadata=metadata)
    return path


def test_front_end_refuses_a_bad_thresholds_file(front_end, tmp_path):
    from sparge_serve.thresholds import Thresholds, ThresholdsError, save_thresholds

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ThresholdsError, match=f"{missing}: no such file"):
        front_end({"thresholds": str(missing)})
    other_model = tmp_path / "other.safetensors"
    save_thresholds(other_model, Thresholds.defaults(4, 8, 1, 128))
    with pytest.raises(ThresholdsError, match=r"num_kv_heads = 1 in the file.*num_kv_heads = 2"):
        front_end({"thresholds": str(other_model)})
    nan_budget = _thresholds_file(tmp_path / "nan.safetensors", l1="nan")
    with pytest.raises(ThresholdsError, match=r"nan.safetensors: metadata `l1` = nan"):
        front_end({"thresholds": str(nan_budget)})
    cfg = front_end({"thresholds": str(TINY_THRESHOLDS)})  # the shipped file fits
    assert cfg.additional_config["sparge"]["thresholds"] == str(TINY_THRESHOLDS)


def test_front_end_refuses_misplaced_and_bad_options(front_end, monkeypatch):
    with pytest.raises(ValueError, match=r"sparge option\(s\) \['mode'\] are at the top level"):
        front_end(additional_config={"mode": "dense"})
    with pytest.raises(ValueError, match=r"key\(s\) \['SPARGE'\] are not 'sparge'"):
        front_end(additional_config={"SPARGE": {"mode": "dense"}})
    with pytest.raises(ValueError, match=r"`dense_layers` .*layer\(s\) \[4\] but the model has 4"):
        front_end({"dense_layers": [4]})
    monkeypatch.setenv("SPARGE_FAST_LAUNCH", "maybe")
    with pytest.raises(ValueError, match=r"`fast_launch` \(env SPARGE_FAST_LAUNCH\) = 'maybe'"):
        front_end()


def test_front_end_warns_once_that_sparse_cannot_run(front_end, vllm_log):
    front_end(max_model_len=8192)
    msgs = [r.getMessage() for r in dict.fromkeys(vllm_log.records)
            if "can never run" in r.getMessage()]
    assert len(msgs) == 1
    assert "max_model_len = 8192 is below min_sparse_len = 32768" in msgs[0]
    assert """'{"sparge": {"min_sparse_len": 8192}}'""" in msgs[0]


# ---- the thresholds digest is that of the bytes in use ----------------------------------------


@pytest.mark.parametrize("change", ["replaced", "removed"])
def test_thresholds_digest_is_of_the_bytes_loaded(front_end, tmp_path, monkeypatch, change):
    import hashlib

    import sparge_serve.backend.runtime as rt

    monkeypatch.setattr(rt, "_RUNTIMES", {})
    monkeypatch.setattr(metrics_stats, "_STATS", None)
    path = _thresholds_file(tmp_path / "th.safetensors")
    loaded = hashlib.sha256(path.read_bytes()).hexdigest()
    vc = front_end({"thresholds": str(path)})
    runtime = rt.load_runtime(vc)
    # The file changes between the load and the metrics set-up (an operator's deploy).
    if change == "replaced":
        _thresholds_file(tmp_path / "new.safetensors", created="2031-01-01").replace(path)
    else:
        path.unlink()
    stats = rt.metrics_for(vc, runtime, torch.device("cpu"))
    try:
        assert stats.snapshot()["info"]["sha256"] == loaded  # the sparge_thresholds_info label
        assert runtime.thresholds.sha256 == loaded
    finally:
        stats.close()
