"""Plugin registration: entry point, CUSTOM + SPARGE alias, --attention-backend, LLM(...) kwargs,
the legacy VLLM_ATTENTION_BACKEND variable (no unknown-variable warning)."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest

import sparge_serve.plugin as plugin

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
    "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 4, "vocab_size": 1000, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "head_dim": 64,
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(path)


@pytest.fixture
def no_bridge(monkeypatch):
    """register() without the metrics bridge's process-wide side effects (tested in test_metrics)."""
    import sparge_serve.metrics as metrics

    calls = []
    monkeypatch.setattr(metrics, "install_metrics_bridge", lambda *a, **k: calls.append(1))
    return calls


@pytest.fixture
def engine_config(monkeypatch, tiny_model, no_bridge):
    """EngineArgs(...).create_engine_config() on this CPU machine (platform made to say "cpu")."""
    from vllm.platforms import current_platform

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(current_platform, "device_type", "cpu", raising=False)
    plugin.register()

    def make(**kwargs):
        from vllm.engine.arg_utils import EngineArgs

        args = EngineArgs(model=tiny_model, skip_tokenizer_init=True, **kwargs)
        return args, args.create_engine_config()

    return make


def test_entry_point_is_discovered():
    eps = [ep for ep in entry_points(group="vllm.general_plugins")
           if ep.value == "sparge_serve.plugin:register"]
    assert len(eps) == 1, "install the package (editable) so its entry point is registered"
    assert eps[0].load() is plugin.register


def test_register_is_idempotent_and_aliases(no_bridge):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    plugin.register()
    assert AttentionBackendEnum.CUSTOM.get_path() == plugin.BACKEND_CLASS
    assert AttentionBackendEnum["SPARGE"] is AttentionBackendEnum.CUSTOM
    # An alias, not a member: iteration and pickling by value are unchanged.
    assert "SPARGE" not in [m.name for m in AttentionBackendEnum]
    assert AttentionBackendEnum(None) is AttentionBackendEnum.CUSTOM
    assert len(no_bridge) == 2


def test_backend_class_resolves_and_names_itself(no_bridge):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    cls = AttentionBackendEnum.CUSTOM.get_class()
    assert cls.__name__ == "SpargeAttentionBackend"
    # vLLM's Attention layer does AttentionBackendEnum[backend.get_name()].
    assert AttentionBackendEnum[cls.get_name()] is AttentionBackendEnum.CUSTOM


def test_attention_config_parses_sparge(no_bridge):
    from vllm.config.attention import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    for name in ("SPARGE", "sparge"):
        assert AttentionConfig.validate_backend_before(name) is AttentionBackendEnum.CUSTOM
    assert AttentionConfig(backend="SPARGE").backend is AttentionBackendEnum.CUSTOM


def test_cli_attention_backend(engine_config, tiny_model):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", tiny_model, "--attention-backend", "SPARGE",
                              "--skip-tokenizer-init"])
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args.attention_backend == "SPARGE"
    assert engine_args.create_engine_config().attention_config.backend is (
        AttentionBackendEnum.CUSTOM)


def test_llm_kwarg_attention_backend(engine_config):
    # LLM(model, attention_backend="SPARGE") builds EngineArgs(attention_backend="SPARGE").
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    _, cfg = engine_config(attention_backend="SPARGE")
    assert cfg.attention_config.backend is AttentionBackendEnum.CUSTOM


def test_legacy_env_var_selects_sparge_without_warning(engine_config, monkeypatch, vllm_log):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "SPARGE")
    _, cfg = engine_config()
    assert cfg.attention_config.backend is AttentionBackendEnum.CUSTOM
    assert "Unknown vLLM environment variable" not in vllm_log.text
    assert "VLLM_ATTENTION_BACKEND=SPARGE selects" in vllm_log.text


def test_explicit_backend_beats_env_var(engine_config, monkeypatch, vllm_log):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "SPARGE")
    _, cfg = engine_config(attention_backend="FLASH_ATTN")
    assert cfg.attention_config.backend is AttentionBackendEnum.FLASH_ATTN
    assert "ignoring VLLM_ATTENTION_BACKEND" in vllm_log.text


def test_env_var_unknown_backend_is_vllms_error(engine_config, monkeypatch):
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "NOPE")
    with pytest.raises(ValueError, match="Unknown attention backend: 'NOPE'"):
        engine_config()


def test_no_env_var_means_auto(engine_config, monkeypatch):
    monkeypatch.delenv("VLLM_ATTENTION_BACKEND", raising=False)
    _, cfg = engine_config()
    assert cfg.attention_config.backend is None


# ---- front-end checks (check_sparge_config, run by the create_engine_config wrapper) ----------


def _warnings(log, text):
    return [r for r in dict.fromkeys(log.records)
            if r.levelname == "WARNING" and text in r.getMessage()]


def test_front_end_refuses_bad_settings_and_files(engine_config, tmp_path):
    from sparge_serve.thresholds import Thresholds, ThresholdsError, save_thresholds

    def make(**sparge):
        return engine_config(attention_backend="SPARGE", additional_config={"sparge": sparge})

    with pytest.raises(ValueError, match=r"`mode` \(additional_config\) = 'off'"):
        make(mode="off")
    with pytest.raises(ValueError, match=r"`dense_layers`.*layer\(s\) \[9\].*4 layers"):
        make(dense_layers=[9])
    with pytest.raises(ThresholdsError, match="missing.safetensors: no such file"):
        make(thresholds=str(tmp_path / "missing.safetensors"))
    wrong = tmp_path / "wrong.safetensors"
    save_thresholds(wrong, Thresholds.defaults(4, 4, 1, 64))
    with pytest.raises(ThresholdsError, match=r"num_kv_heads = 1 in the file.*num_kv_heads = 2"):
        make(thresholds=str(wrong))
    with pytest.raises(ValueError, match=r"top level of additional_config"):
        engine_config(attention_backend="SPARGE", additional_config={"mode": "dense"})
    good = tmp_path / "good.safetensors"
    save_thresholds(good, Thresholds.defaults(4, 4, 2, 64))
    _, cfg = make(thresholds=str(good))
    assert cfg.additional_config["sparge"]["thresholds"] == str(good)


def test_front_end_leaves_other_backends_alone(engine_config, tmp_path):
    bad = {"sparge": {"thresholds": str(tmp_path / "missing")}, "mode": "x"}
    engine_config(additional_config=bad)  # automatic selection: not ours to check
    engine_config(attention_backend="FLASH_ATTN", additional_config=bad)


def test_uses_sparge_per_kind(engine_config):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    _, cfg = engine_config(attention_backend="FLASH_ATTN")
    assert not plugin.uses_sparge(cfg)
    cfg.attention_config.backend_per_kind = {"full_attention": AttentionBackendEnum.CUSTOM}
    assert plugin.uses_sparge(cfg)


def test_front_end_warns_once_when_sparse_can_never_run(engine_config, vllm_log):
    text = "so the sparse prefill path can never run"
    engine_config(attention_backend="SPARGE")  # 4096-token model, default 32768 minimum
    (record,) = _warnings(vllm_log, text)
    msg = record.getMessage()
    assert "max_model_len = 4096 is below min_sparse_len = 32768" in msg
    assert """--additional-config '{"sparge": {"min_sparse_len": 4096}}'""" in msg
    assert "SPARGE_MIN_SPARSE_LEN=4096" in msg and "--max-model-len to 32768" in msg
    vllm_log.clear()
    engine_config(attention_backend="SPARGE", additional_config={"sparge": {"mode": "dense"}})
    engine_config(attention_backend="SPARGE",
                  additional_config={"sparge": {"min_sparse_len": 4096}})
    engine_config(attention_backend="FLASH_ATTN")
    assert not _warnings(vllm_log, text)


def test_wrapper_installed_once(no_bridge):
    from vllm.engine.arg_utils import EngineArgs

    plugin.register()
    first = EngineArgs.create_engine_config
    plugin.register()
    assert EngineArgs.create_engine_config is first
    assert getattr(first, "__sparge_legacy_env_wrapper__", False)
    import vllm.envs as envs

    assert "VLLM_ATTENTION_BACKEND" in envs.environment_variables


def test_version_warning(monkeypatch, vllm_log, no_bridge):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    monkeypatch.setattr(plugin, "_version_checked", False)
    plugin.register()
    assert "built and tested against vLLM 0.26.0 but vLLM 0.99.0 is installed" in vllm_log.text


# ---- vLLM start-up / dummy runs are kept out of the sparge_* metrics ---------------------------

@pytest.fixture
def not_suspended(monkeypatch):
    import sparge_serve.metrics as metrics
    import sparge_serve.metrics.stats as metrics_stats

    monkeypatch.setattr(metrics_stats, "_SUSPEND_DEPTH", 0)
    monkeypatch.setattr(metrics_stats, "_STATS", None)
    yield metrics
    assert not metrics.metrics_suspended_now()


def test_guard_suspends_metrics_is_idempotent_and_skips_missing(not_suspended, vllm_log):
    import types

    metrics = not_suspended
    seen = []

    class Runner:
        def profile_run(self, n, *, tag=""):
            seen.append((metrics.metrics_suspended_now(), n, tag))
            return n * 2

        def capture_model(self):
            self.profile_run(0)  # nested: still suspended, then resumed once by the outer call
            seen.append(metrics.metrics_suspended_now())
            raise RuntimeError("capture failed")

    mod = types.ModuleType("fake_runner_mod")
    mod.Runner = Runner
    methods = ("profile_run", "capture_model", "no_such_method")
    wrapped = plugin._guard_class(mod, "Runner", methods, metrics.metrics_suspended)
    assert wrapped == ["profile_run", "capture_model"]
    assert "has no method no_such_method" in vllm_log.text
    first = Runner.profile_run
    assert plugin._guard_class(mod, "Runner", methods, metrics.metrics_suspended) == []
    assert Runner.profile_run is first and first.__name__ == "profile_run"

    assert Runner().profile_run(3, tag="x") == 6
    assert seen == [(True, 3, "x")] and not metrics.metrics_suspended_now()
    with pytest.raises(RuntimeError, match="capture failed"):
        Runner().capture_model()
    assert seen[1:] == [(True, 0, ""), True] and not metrics.metrics_suspended_now()
    assert plugin._guard_class(mod, "NoSuchClass", methods, metrics.metrics_suspended) == []


def test_post_import_hook(tmp_path, monkeypatch):
    import importlib
    import sys

    name = "sparge_test_post_import_mod"
    (tmp_path / f"{name}.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    calls = []
    plugin._when_imported(name, lambda m: calls.append(m.VALUE))
    plugin._when_imported(name, lambda m: 1 / 0)  # a failing hook is logged, not raised
    assert calls == [] and name in plugin._HOOKS
    mod = importlib.import_module(name)
    assert calls == [41] and name not in plugin._HOOKS
    assert not isinstance(mod.__loader__, plugin._HookedLoader)  # the module's own loader
    assert mod.__spec__.loader is mod.__loader__
    plugin._when_imported(name, lambda m: calls.append(m.VALUE + 1))  # already imported: now
    assert calls == [41, 42]


def test_register_guards_vllm_worker_and_runners(no_bridge, not_suspended):
    """In this process (vLLM's modules imported before or after register(), depending on the test
    order): the real classes get wrapped, once; a wrapped Worker method suspends the metrics."""
    import importlib

    plugin.register()
    classes = [getattr(importlib.import_module(m), c) for m, c, _ in plugin.STARTUP_ENTRY_POINTS]
    plugin.register()
    for cls, (_, _, methods) in zip(classes, plugin.STARTUP_ENTRY_POINTS, strict=True):
        for name in methods:
            fn = getattr(cls, name)
            assert getattr(fn, "__sparge_metrics_suspended__", False), (cls, name)
            assert not getattr(fn.__wrapped__, "__sparge_metrics_suspended__", False)
    worker_cls = classes[0]
    seen = []

    class FakeRunner:
        def _dummy_run(self, num_tokens, uniform_decode=False):
            seen.append((not_suspended.metrics_suspended_now(), num_tokens, uniform_decode))

    fake_worker = type("FakeWorker", (), {"model_runner": FakeRunner()})()
    worker_cls.execute_dummy_batch(fake_worker)
    assert seen == [(True, 1, True)]


def test_register_before_import_guards_real_worker(tmp_path):
    """The production order: register() (vLLM loads plugins in the worker process) runs before
    the worker module is imported; the post-import hook wraps it."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import sparge_serve.plugin as p\n"
        "p.register()\n"
        "assert 'vllm.v1.worker.gpu_worker' not in sys.modules\n"
        "from vllm.v1.worker.gpu_worker import Worker\n"
        "from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2\n"
        "from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1\n"
        "for cls, (_, _, names) in zip((Worker, V2, V1), p.STARTUP_ENTRY_POINTS):\n"
        "    for n in names:\n"
        "        assert getattr(getattr(cls, n), '__sparge_metrics_suspended__', False), n\n"
        "print('GUARDED')\n")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("_SPARGE_METRICS_DIR", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "GUARDED" in r.stdout, r.stderr[-3000:]
