"""vLLM plugin entry point (``vllm.general_plugins`` → ``sparge_serve.plugin:register``).

vLLM calls :func:`register` in every process it starts (front end, engine core, each worker), and
sometimes more than once per process, so it is idempotent, cheap (names the backend class by
string; imports nothing heavy) and never touches CUDA. It

1. fills vLLM's ``AttentionBackendEnum.CUSTOM`` slot with
   ``sparge_serve.backend.sparge_attn.SpargeAttentionBackend``;
2. makes the name ``SPARGE`` look up ``CUSTOM`` (``--attention-backend SPARGE``,
   ``LLM(attention_backend="SPARGE")``, and the backend's ``get_name()``). NOTE: an alias in the
   enum's name map, not a new member: spawned processes unpickle the config (whose backend pickles
   by value as ``CUSTOM``) before plugins load, which a new member would break;
3. brings back the legacy ``VLLM_ATTENTION_BACKEND`` variable (removed from vLLM core, which now
   warns about it): it is declared to ``vllm.envs`` and, when neither ``attention_backend`` nor
   ``attention_config.backend`` was given, selects that backend in ``EngineArgs.create_engine_config``;
4. installs the metrics bridge (``sparge_serve.metrics.install_metrics_bridge``) so that worker
   counters reach vLLM's ``/metrics``;
5. warns when the installed vLLM is not the version this package is built against.
"""

from __future__ import annotations

import functools
import os
from typing import Any

BACKEND_NAME = "SPARGE"
BACKEND_CLASS = "sparge_serve.backend.sparge_attn.SpargeAttentionBackend"
LEGACY_ENV_VAR = "VLLM_ATTENTION_BACKEND"
SUPPORTED_VLLM_VERSION = "0.26.0"

_WRAPPED_MARK = "__sparge_legacy_env_wrapper__"
_version_checked = False


def _logger():
    from vllm.logger import init_logger

    # NOTE: vLLM configures only the "vllm" logger tree (its handler, format and
    # VLLM_LOGGING_LEVEL; propagate=False). A child of it makes our lines show up like vLLM's own.
    return init_logger(f"vllm.{__name__}")


def register() -> None:
    """Register the SPARGE attention backend with vLLM (idempotent)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    logger = _logger()
    _check_vllm_version(logger)

    first_time = AttentionBackendEnum.CUSTOM.is_overridden() is False
    current = AttentionBackendEnum._member_map_.get(BACKEND_NAME)
    if current is not None and current is not AttentionBackendEnum.CUSTOM:
        # Someone else (a future vLLM or another plugin) owns the name: do not hijack it.
        logger.warning("sparge_serve: attention backend name %s is already taken by %s; "
                       "select sparge_serve with --attention-backend CUSTOM instead",
                       BACKEND_NAME, current)
    else:
        AttentionBackendEnum._member_map_[BACKEND_NAME] = AttentionBackendEnum.CUSTOM
    if AttentionBackendEnum.CUSTOM.is_overridden() and (
            AttentionBackendEnum.CUSTOM.get_path() != BACKEND_CLASS):
        logger.warning("sparge_serve: replacing the CUSTOM attention backend %s with %s",
                       AttentionBackendEnum.CUSTOM.get_path(), BACKEND_CLASS)
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_CLASS)

    _install_legacy_env_var()
    _install_metrics_bridge(logger)
    if first_time:
        logger.debug("sparge_serve: registered attention backend %s (CUSTOM slot) -> %s",
                     BACKEND_NAME, BACKEND_CLASS)


def _check_vllm_version(logger) -> None:
    global _version_checked
    if _version_checked:
        return
    _version_checked = True
    try:
        from vllm import __version__ as installed
    except ImportError:  # pragma: no cover - vLLM always has it
        installed = "unknown"
    if str(installed).split("+")[0] != SUPPORTED_VLLM_VERSION:
        logger.warning(
            "sparge_serve was built and tested against vLLM %s but vLLM %s is installed; the "
            "SPARGE backend subclasses vLLM internals that change between releases, so it may "
            "fail or misbehave. Install vllm==%s (or a sparge_serve release made for %s).",
            SUPPORTED_VLLM_VERSION, installed, SUPPORTED_VLLM_VERSION, installed)


def _install_metrics_bridge(logger) -> None:
    # Routes worker-process counters to the API server's /metrics; must run in every process
    # before workers start, which is exactly when vLLM calls register(). Idempotent, never raises.
    try:
        from sparge_serve.metrics import install_metrics_bridge
    except ImportError as e:
        logger.warning("sparge_serve: metrics unavailable (%s); sparge_* series will not be "
                       "exported", e)
        return
    install_metrics_bridge()


def _install_legacy_env_var() -> None:
    import vllm.envs as envs

    # Declaring the variable silences vLLM's "Unknown vLLM environment variable" warning.
    envs.environment_variables.setdefault(LEGACY_ENV_VAR, lambda: os.getenv(LEGACY_ENV_VAR))

    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:  # pragma: no cover - vLLM always has it
        return
    original = EngineArgs.create_engine_config
    if getattr(original, _WRAPPED_MARK, False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args: Any, **kwargs: Any):
        _apply_legacy_env_var(self)
        return original(self, *args, **kwargs)

    setattr(create_engine_config, _WRAPPED_MARK, True)
    EngineArgs.create_engine_config = create_engine_config


def _apply_legacy_env_var(engine_args: Any) -> None:
    """Let ``VLLM_ATTENTION_BACKEND`` choose the backend unless the arguments already did."""
    value = os.environ.get(LEGACY_ENV_VAR, "").strip()
    if not value:
        return
    logger = _logger()
    attention_config = getattr(engine_args, "attention_config", None)
    config_backend = getattr(attention_config, "backend", None)
    if engine_args.attention_backend is not None or config_backend is not None:
        chosen = engine_args.attention_backend or config_backend
        logger.info("sparge_serve: ignoring %s=%s because the attention backend was chosen "
                    "explicitly (%s)", LEGACY_ENV_VAR, value, chosen)
        return
    logger.info("sparge_serve: %s=%s selects the attention backend (legacy variable; "
                "--attention-backend is the current way)", LEGACY_ENV_VAR, value)
    # The string goes through vLLM's own validator (case-insensitive, "auto", clear error for an
    # unknown name), exactly as --attention-backend does.
    engine_args.attention_backend = value
