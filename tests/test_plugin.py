"""Plugin registration: entry point, CUSTOM + SPARGE alias, --attention-backend, LLM(...) kwargs,
the legacy VLLM_ATTENTION_BACKEND variable (no unknown-variable warning)."""

from __future__ import annotations

import json
import logging
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


@pytest.fixture
def vllm_log(caplog):
    """vLLM's loggers do not propagate to the root logger: attach caplog's handler to 'vllm'."""
    log = logging.getLogger("vllm")
    log.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG, logger="vllm")
    yield caplog
    log.removeHandler(caplog.handler)


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
