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
4. checks the sparge settings in the front end (:func:`check_sparge_config`, run by the same
   ``EngineArgs.create_engine_config`` wrapper once vLLM has built its configuration, when the
   SPARGE backend is selected): a bad option or thresholds file fails ``vllm serve`` / ``LLM(...)``
   in its first seconds, with the error the engine would raise after loading the model; a
   ``max_model_len`` below ``min_sparse_len`` (sparse mode) logs one warning naming the settings
   that would let the sparse path run;
5. installs the metrics bridge (``sparge_serve.metrics.install_metrics_bridge``) so that worker
   counters reach vLLM's ``/metrics``;
6. keeps vLLM's start-up and dummy runs out of the ``sparge_*`` metrics: the worker's and model
   runners' warm-up entry points (``STARTUP_ENTRY_POINTS``: memory profiling, compile and kernel
   warm-up, CUDA-graph capture, data-parallel dummy batches) run inside
   ``sparge_serve.metrics.metrics_suspended()``. The modules are not imported here (they are heavy
   and the API server never needs them): a module already imported is patched at once, the others
   by a post-import hook when the worker imports them. Idempotent; a missing class or method is
   logged at debug level and skipped;
7. warns when the installed vLLM is not the version this package is built against.
"""

from __future__ import annotations

import functools
import importlib.abc
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

BACKEND_NAME = "SPARGE"
BACKEND_CLASS = "sparge_serve.backend.sparge_attn.SpargeAttentionBackend"
LEGACY_ENV_VAR = "VLLM_ATTENTION_BACKEND"
SUPPORTED_VLLM_VERSION = "0.26.0"

_WRAPPED_MARK = "__sparge_legacy_env_wrapper__"
_SUSPEND_MARK = "__sparge_metrics_suspended__"
_version_checked = False

# (module, class, methods) run inside metrics_suspended(): vLLM 0.26's GPU worker, its V2 model
# runner (vllm/v1/worker/gpu) and its V1 model runner. Nested calls (capture_model -> _dummy_run)
# only deepen the suspension. The worker methods cover what the runners' do not: the V2 kernel
# warm-up (compile_or_warm_up_model -> warmup_kernels) runs whole execute_model steps on fake
# requests. At serving time only data-parallel idle-rank dummy batches pass here (_dummy_run /
# execute_dummy_batch: two tiny device copies each); real steps never do.
_RUNNER_METHODS = ("profile_run", "profile_cudagraph_memory", "capture_model", "_dummy_run")
STARTUP_ENTRY_POINTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("vllm.v1.worker.gpu_worker", "Worker",
     ("determine_available_memory", "compile_or_warm_up_model", "execute_dummy_batch")),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", _RUNNER_METHODS),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", _RUNNER_METHODS),
)


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
    _install_startup_guards(logger)
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


def _install_startup_guards(logger) -> None:
    try:
        from sparge_serve.metrics import metrics_suspended
    except ImportError:
        return  # _install_metrics_bridge already warned
    for module_name, class_name, methods in STARTUP_ENTRY_POINTS:
        _when_imported(module_name, functools.partial(
            _guard_class, class_name=class_name, methods=methods, suspended=metrics_suspended))


def _guard_class(module: Any, class_name: str, methods: tuple[str, ...],
                 suspended: Callable[[], Any]) -> list[str]:
    """Wrap ``module.class_name``'s ``methods`` in ``suspended()``; returns the names wrapped now
    (already wrapped ones are skipped: idempotent). Never raises."""
    logger = _logger()
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        logger.debug("sparge_serve: %s.%s not found; its start-up runs are not excluded from "
                     "the sparge_* metrics", getattr(module, "__name__", module), class_name)
        return []
    wrapped = []
    for name in methods:
        original = getattr(cls, name, None)
        if not callable(original):
            logger.debug("sparge_serve: %s.%s has no method %s; not excluded from the sparge_* "
                         "metrics", cls.__module__, class_name, name)
            continue
        if getattr(original, _SUSPEND_MARK, False):
            continue
        setattr(cls, name, _suspending(original, suspended))
        wrapped.append(name)
    if wrapped:
        logger.debug("sparge_serve: sparge_* metrics suspended during %s.%s.{%s}",
                     cls.__module__, class_name, ",".join(wrapped))
    return wrapped


def _suspending(original: Callable[..., Any], suspended: Callable[[], Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with suspended():
            return original(*args, **kwargs)

    setattr(wrapper, _SUSPEND_MARK, True)
    return wrapper


# ---- post-import hooks (no dependency; the pattern of wrapt's "when imported") -----------------

_HOOKS: dict[str, list[Callable[[Any], Any]]] = {}
_HOOKS_LOCK = threading.RLock()


def _when_imported(module_name: str, hook: Callable[[Any], Any]) -> None:
    """Run ``hook(module)`` now if ``module_name`` is imported, else right after its import."""
    with _HOOKS_LOCK:
        module = sys.modules.get(module_name)
        if module is None:
            _HOOKS.setdefault(module_name, []).append(hook)
            if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
                sys.meta_path.insert(0, _PostImportFinder())
            return
    _run_hook(hook, module)


def _run_hook(hook: Callable[[Any], Any], module: Any) -> None:
    try:
        hook(module)
    except Exception as e:  # never break vLLM's import
        _logger().warning("sparge_serve: post-import hook for %s failed: %s",
                          getattr(module, "__name__", module), e)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a module with pending hooks it asks the other finders for the
    spec and wraps its loader so the hooks run once the module has executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec  # a namespace package or an old-style loader: no hook
        spec.loader = _HookedLoader(spec.loader, fullname)
        return spec


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, fullname: str) -> None:
        self._loader, self._fullname = loader, fullname

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        # The module's own loader again (get_source for tracebacks, resources, reloads).
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        with _HOOKS_LOCK:
            hooks = _HOOKS.pop(self._fullname, [])
        for hook in hooks:
            _run_hook(hook, module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


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
        vllm_config = original(self, *args, **kwargs)
        check_sparge_config(vllm_config)
        return vllm_config

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


def uses_sparge(vllm_config: Any) -> bool:
    """Whether ``vllm_config`` selects the SPARGE backend (``attention_config.backend`` or one of
    its ``backend_per_kind`` entries is the CUSTOM slot, filled with this package's backend)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    custom = AttentionBackendEnum.CUSTOM
    ac = getattr(vllm_config, "attention_config", None)
    if ac is None or not custom.is_overridden() or custom.get_path() != BACKEND_CLASS:
        return False
    chosen = [ac.backend, *(getattr(ac, "backend_per_kind", None) or {}).values()]
    return any(b is custom for b in chosen)


def check_sparge_config(vllm_config: Any) -> None:
    """Check the sparge settings and thresholds file of ``vllm_config`` in the front end.

    Runs when ``EngineArgs.create_engine_config`` has built the configuration (in the API server
    of ``vllm serve``, or the process of ``LLM(...)``), before any engine process starts and any
    weight loads; does nothing unless the SPARGE backend is selected. It parses the settings
    (``SpargeConfig.from_vllm_config``), checks ``dense_layers`` against the model's layer count
    and loads and validates the thresholds file against the model's geometry, raising the same
    ``ValueError`` / ``ThresholdsError`` the backend would raise in the worker. With sparse mode
    and ``max_model_len < min_sparse_len`` it logs one warning: the sparse path can never run.
    Imports torch and safetensors (on first use), not the kernels.
    """
    if not uses_sparge(vllm_config):
        return
    from sparge_serve.config import DEFAULT_MIN_SPARSE_LEN, ENV_VARS, SpargeConfig
    from sparge_serve.thresholds import load_thresholds, model_geometry_of

    logger = _logger()
    cfg = SpargeConfig.from_vllm_config(vllm_config)
    cache_config = getattr(vllm_config, "cache_config", None)
    if cache_config is not None:
        cfg.check_kv_cache_dtype(cache_config.cache_dtype)
    mc = vllm_config.model_config
    try:
        geo = model_geometry_of(mc)
    except Exception as e:  # an unusual model config: the engine checks the file when it loads
        logger.warning("sparge_serve: cannot read the model's attention geometry in the front end "
                       "(%s: %s); the thresholds file is checked when the engine loads it",
                       type(e).__name__, e)
    else:
        cfg.check_num_layers(geo.num_layers)
        if cfg.thresholds_file:
            load_thresholds(cfg.thresholds_file, expect=geo)
    max_len = mc.max_model_len
    if cfg.enabled and not cfg.sparse_possible(max_len):
        logger.warning(
            "SPARGE: max_model_len = %d is below min_sparse_len = %d, so the sparse prefill path "
            "can never run: every request runs dense attention. To let it run, lower "
            "min_sparse_len (--additional-config '{\"sparge\": {\"min_sparse_len\": %d}}' or "
            "%s=%d; the default, %d, is where the sparse path starts to beat dense on H200) or "
            "raise --max-model-len to %d or more.",
            max_len, cfg.min_sparse_len, max_len, ENV_VARS["min_sparse_len"], max_len,
            DEFAULT_MIN_SPARSE_LEN, cfg.min_sparse_len)
