"""vLLM configuration on this CPU machine for the backend tests: an engine config with the SPARGE
backend (the platform made to say "cpu", no metrics bridge, no hub) and the backend's start-up
checks of a layer configuration."""

from __future__ import annotations

import pytest
import torch

import sparge_serve.plugin as plugin


def cpu_engine_config(model_dir, block_size: int):
    """``EngineArgs(model_dir, SPARGE).create_engine_config()`` as the API server runs it."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    import sparge_serve.metrics as metrics

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(current_platform, "device_type", "cpu", raising=False)
        mp.setattr(metrics, "install_metrics_bridge", lambda *a, **k: None)
        plugin.register()
        return EngineArgs(model=str(model_dir), skip_tokenizer_init=True,
                          attention_backend="SPARGE", block_size=block_size).create_engine_config()


def validation_reasons(vllm_config, **layer) -> list[str]:
    """The SPARGE backend's reasons to refuse a layer configuration (``head_size`` and what
    differs from a bf16 decoder layer) on a Hopper GPU; none: []."""
    from vllm.config import set_current_vllm_config
    from vllm.platforms.interface import DeviceCapability

    from sparge_serve.backend.sparge_attn import SpargeAttentionBackend

    args = dict(dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=None,
                use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
                use_per_head_quant_scales=False, attn_type="decoder", has_sliding_window=False)
    args.update(layer)
    with set_current_vllm_config(vllm_config):
        return SpargeAttentionBackend.validate_configuration(
            device_capability=DeviceCapability(9, 0), **args)


def sparge_setter(vllm_config, monkeypatch, **defaults):
    """``set_(**settings)``: puts the sparge settings (over ``defaults``) into ``vllm_config``'s
    ``additional_config`` for one test and returns the config; called once with none."""

    defaults = {"thresholds": "untuned", **defaults}  # every layer may take the sparse path

    def set_(**settings):
        monkeypatch.setattr(vllm_config, "additional_config", {"sparge": {**defaults, **settings}})
        return vllm_config

    set_()
    return set_
