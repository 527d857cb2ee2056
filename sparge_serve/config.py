"""The one sparge_serve configuration: ``--additional-config '{"sparge": {...}}'`` + ``SPARGE_*`` env.

Example::

    vllm serve MODEL --attention-backend SPARGE \\
        --additional-config '{"sparge": {"thresholds": "llama.safetensors", "dense_layers": 2}}'
    SPARGE_MODE=dense vllm serve MODEL --attention-backend SPARGE        # kill switch

Keys (all optional):

- ``thresholds``: path of a thresholds file written by ``sparge-calibrate`` (env
  ``SPARGE_THRESHOLDS``), or ``"untuned"``: the published untuned SpargeAttn thresholds for every
  head. Without either, every layer attends densely (one warning): the untuned thresholds skip
  0% (Gemma 3 270M) to 2-11% (SmolLM2-135M, at +0.3-1.3% perplexity) of the real models'
  blocks, where calibrated ones skip 15-68% at +0.1% or less on their held-out prompts
  (docs/PERFORMANCE.md), and at 0% the sparse path costs 4-5% of TTFT; only calibrated
  thresholds make it pay.
- ``min_sparse_len``: a request runs the sparse prefill path only when its context (cached prefix
  plus new tokens) is at least this long (env ``SPARGE_MIN_SPARSE_LEN``).
- ``min_sparse_query_len``: ... and only when it adds at least this many new tokens (env
  ``SPARGE_MIN_SPARSE_QUERY_LEN``): a short chunk on a long context (a follow-up turn after a cached
  prefix) runs dense, since the predictor reads every key twice whatever the query length.
- ``dense_layers``: ``N`` keeps the first N layers dense, a list keeps exactly those (global)
  layer indices dense (env ``SPARGE_DENSE_LAYERS``: ``"2"`` or ``"0,1,5"``).
- ``mode``: ``"sparse"`` (default) or ``"dense"`` — the kill switch: everything runs dense
  FlashAttention (env ``SPARGE_MODE``).
- ``topk``: fixed fraction in (0, 1] of valid key blocks kept per query block instead of the CDF
  rule (benchmarks only).
- ``attention_kernel``: ``"auto"`` (default), ``"triton"`` or ``"fa3"`` (env
  ``SPARGE_ATTENTION_KERNEL``): what attends stage 1's kept blocks. ``"fa3"``: FlashAttention-3
  itself, one sequence per (q-head, query block) row over a virtual paged context of its kept
  key blocks, several query heads a launch where a head has few rows
  (``sparge_serve.kernels.fa3``); over an fp8 KV cache, FA3's fp8 forward. ``"triton"``: the
  Triton block-sparse kernel (every layer, PV skip included). ``"auto"``: FA3 where it serves
  the head size (Hopper, vLLM's vllm_flash_attn), else Triton; with ``fp8_attention``, Triton
  (its fp8 products outrun FA3's fp8 forward over the kept blocks). FA3 has no PV skip: under
  ``auto`` and ``fa3`` layers whose thresholds use it keep the Triton kernel (over either
  cache). Measured on 16K-token chunks (H100, 32 q / 8 KV heads of 128, 32K-128K contexts): the
  FA3 path 0.90-0.93x FA3 dense and 1.59-1.81x at 50% block sparsity where the Triton kernel
  has 0.84x and 1.56-1.59x; end to end 1.43-1.47x FLASH_ATTN's TTFT at 128K and 50%
  (docs/PERFORMANCE.md). On 2K-token chunks of a 32K context both are host-bound.
- ``map_budget``: the sparse prefill's memory bound (env ``SPARGE_MAP_BUDGET``, a number or
  ``none``): a call whose block map (and, with ``fa3``, virtual block tables) would pass this
  fraction of the K/V bytes of its padded shape, and 64 MiB, builds and uses them one head
  chunk at a time (``sparge_serve.kernels.plan``). Default 0.015; ``null`` never splits.
  Each chunk adds its own small launches (at 32K and 80-90% block sparsity, 16 chunks run at
  0.6-0.75x the unchunked speed), hence the 64 MiB floor.
- ``fast_launch``: ``true`` (default) launches the compiled Triton kernels through their own
  launchers, skipping most of ``JITFunction.run``'s Python (12-19 µs a launch instead of 20-24;
  ``sparge_serve.kernels.launch``); ``false`` (env ``SPARGE_FAST_LAUNCH=0``) keeps Triton's own
  launch path. A Triton whose internals differ from the pinned 3.6's takes that path anyway
  (logged once).
- ``fp8_attention``: with ``--kv-cache-dtype fp8``, the Triton attention kernel takes ``P.V`` in
  fp8 too (``P`` rounded to fp8), as FlashAttention-3's fp8 forward does for FLASH_ATTN (env
  ``SPARGE_FP8_ATTENTION``), reading V from a copy of the step's values with the token
  dimension contiguous (made once a layer, the layout Hopper's fp8 ``P.V`` takes). Default
  ``false``: the fp8 V pages converted to the model's dtype for ``P.V`` (more accurate);
  ``Q.K`` of the quantised query and keys is in fp8 either way (each product exact). Layers
  on the FA3 path multiply in fp8 either way; ``true`` under ``auto`` sends every sparse layer
  to the Triton kernel. Measured (H100, 32 q / 8 KV heads of 128, whole prompts): 0.95x /
  1.02-1.06x FA3 bf16 with every block kept and 1.90-1.91x / 2.23-2.32x at 50% block sparsity,
  32K / 128K, where FA3's fp8 forward over the kept blocks has 0.91x / 0.98-1.03x and
  1.42x / 1.94-1.96x; relative L1 against bf16 0.054, as FLASH_ATTN-fp8's 0.053
  (docs/PERFORMANCE.md).

Environment variables override the JSON. Boolean variables (``SPARGE_FAST_LAUNCH``,
``SPARGE_FP8_ATTENTION``) accept
``1``/``0``, ``true``/``false``, ``yes``/``no``, ``on``/``off`` in any case (:func:`parse_bool`);
any other value is refused.

Nothing is ignored silently:

- every problem raises ``ValueError`` naming the key and the fix;
- sparge options at the top level of ``additional_config`` (``{"mode": "dense"}``) or under a
  wrong-case key (``{"SPARGE": {...}}``) are refused with the right form
  (``{"sparge": {"mode": "dense"}}``); top-level keys that are not sparge option names belong to
  vLLM or other plugins and are left alone;
- an unknown ``SPARGE_*`` environment variable (``SPARGE_MODEE``) is logged as a warning naming
  the closest valid one (once per variable and process). The test suite's ``SPARGE_TEST_*``
  variables (:data:`OTHER_ENV_VARS`) are known.

This module imports nothing from vLLM or torch.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

# NOTE: the kernels' geometry module imports neither torch nor Triton
from sparge_serve.kernels.geometry import MAP_BUDGET

ADDITIONAL_CONFIG_KEY = "sparge"

# NOTE: a child of vLLM's "vllm" logger (configured by vLLM when it runs; not imported here) so
# that our lines use vLLM's handler and level.
logger = logging.getLogger(f"vllm.{__name__}")

# NOTE: measured, not guessed (benchmarks/results/e2e.md, docs/PERFORMANCE.md; H100, Llama-3.1-8B
# geometry, the FA3 path): with every block kept the sparse path costs 5-8% of TTFT at 8K-128K; at
# 50% block sparsity it is 1.00x FLASH_ATTN at 8K, 1.03x at 16K and 1.15x at 32K, so a layer breaks
# even at about 30% block sparsity at 16K but 12% at 32K. Contexts below 32K run dense, where
# a thresholds file's sparsity is lowest.
DEFAULT_MIN_SPARSE_LEN = 32768
# NOTE: measured (benchmarks/results/query_len.md, H200): new tokens on a 48K-128K cached context
# pay the predictor's passes over the whole context; at 50% block sparsity the sparse path loses
# at 512 new tokens (0.74-0.85x FA3) and wins from 1024 (1.27x); at 80% it wins from 512 (1.3-1.6x).
DEFAULT_MIN_SPARSE_QUERY_LEN = 1024

# the ``thresholds`` value that runs the published untuned thresholds instead of a file
UNTUNED_THRESHOLDS = "untuned"

MODES = ("sparse", "dense")
ENV_VARS = {
    "thresholds": "SPARGE_THRESHOLDS",
    "min_sparse_len": "SPARGE_MIN_SPARSE_LEN",
    "min_sparse_query_len": "SPARGE_MIN_SPARSE_QUERY_LEN",
    "mode": "SPARGE_MODE",
    "dense_layers": "SPARGE_DENSE_LAYERS",
    "attention_kernel": "SPARGE_ATTENTION_KERNEL",
    "map_budget": "SPARGE_MAP_BUDGET",
    "fast_launch": "SPARGE_FAST_LAUNCH",
    "fp8_attention": "SPARGE_FP8_ATTENTION",
}
# SPARGE_* variables that are not settings of SpargeConfig, and must not be reported as unknown.
OTHER_ENV_VARS = {
    "SPARGE_TEST_MODEL": "the model of the GPU tests",
    "SPARGE_TEST_LOG_DIR": "where the tests' child processes log",
    "SPARGE_TEST_CHILD_TIMEOUT": "time limit of the tests' child processes",
    "SPARGE_TEST_REPORT": "where the GPU engine test writes its report",
}
ENV_PREFIX = "SPARGE_"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
ATTENTION_KERNELS = ("auto", "triton", "fa3")
BOOLEANS = {
    "fast_launch": ("the compiled kernels' own launchers, the default",
                    "Triton's JITFunction launches"),
    "fp8_attention": ("fp8 products in the sparse attention kernel (an fp8 KV cache)",
                      "products in the model's dtype, the default"),
}
"""The boolean settings: what true and false select (for the error messages)."""
_EXAMPLE = """--additional-config '{"sparge": {"thresholds": "PATH", "min_sparse_len": 32768}}'"""


def _bad(key: str, source: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"sparge config: `{key}` ({source}) {problem}. Fix: {fix}.")


def parse_bool(text: str, var: str) -> bool:
    """The boolean value of environment variable ``var`` = ``text``: ``1``/``0``, ``true``/
    ``false``, ``yes``/``no``, ``on``/``off`` (any case, surrounding blanks ignored). Anything
    else raises ValueError naming the variable and the accepted spellings."""
    flag = text.strip().lower()
    if flag in TRUE_WORDS:
        return True
    if flag in FALSE_WORDS:
        return False
    raise ValueError(f"sparge config: environment variable {var}={text!r} is not a boolean. "
                     f"Fix: set {var} to one of {'/'.join(TRUE_WORDS)} (on) or "
                     f"{'/'.join(FALSE_WORDS)} (off), any case.")


def env_flag(var: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    """``parse_bool`` of ``env[var]`` (default ``os.environ``); ``default`` when unset or blank."""
    text = (os.environ if env is None else env).get(var)
    if text is None or not text.strip():
        return default
    return parse_bool(text, var)


_WARNED_ENV: set[str] = set()


def check_env(env: Mapping[str, str] | None = None) -> None:
    """Warn (once per variable and process) about ``SPARGE_*`` variables that nothing reads,
    naming the closest valid name."""
    env = os.environ if env is None else env
    known = sorted({*ENV_VARS.values(), *OTHER_ENV_VARS})
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in known or var in _WARNED_ENV:
            continue
        _WARNED_ENV.add(var)
        # NOTE: compared without the common prefix, which would make every name look close.
        names = {k[len(ENV_PREFIX):]: k for k in known}
        close = difflib.get_close_matches(var[len(ENV_PREFIX):], list(names), n=1)
        hint = (f"did you mean {names[close[0]]}?" if close
                else f"the sparge variables are {', '.join(sorted(ENV_VARS.values()))}")
        logger.warning("sparge config: unknown environment variable %s is ignored; %s",
                       var, hint)


def _misplaced(additional: Mapping[str, Any], options: set[str]) -> ValueError | None:
    """The error for sparge options outside ``additional_config["sparge"]``, or None."""
    wrong_case = sorted(str(k) for k in additional
                        if isinstance(k, str) and k != ADDITIONAL_CONFIG_KEY
                        and k.strip().lower() == ADDITIONAL_CONFIG_KEY)
    top = sorted(str(k) for k in additional if k in options)
    if not wrong_case and not top:
        return None
    moved: dict[str, Any] = {}
    for k in wrong_case:
        if isinstance(additional[k], Mapping):
            moved.update(additional[k])
    moved.update({k: additional[k] for k in top})
    if isinstance(additional.get(ADDITIONAL_CONFIG_KEY), Mapping):
        moved = {**additional[ADDITIONAL_CONFIG_KEY], **moved}
    try:
        right = json.dumps({ADDITIONAL_CONFIG_KEY: moved})
    except (TypeError, ValueError):
        right = json.dumps({ADDITIONAL_CONFIG_KEY: {k: "..." for k in moved}})
    if wrong_case:
        problem = (f"additional_config key(s) {wrong_case} are not {ADDITIONAL_CONFIG_KEY!r} "
                   "(keys are case-sensitive), so the sparge settings in them would be ignored")
    else:
        problem = (f"sparge option(s) {top} are at the top level of additional_config, where "
                   "they would be ignored (the sparge settings live under the "
                   f"{ADDITIONAL_CONFIG_KEY!r} key)")
    return ValueError(f"sparge config: {problem}. Fix: pass --additional-config '{right}'.")


@dataclass(frozen=True)
class SpargeConfig:
    """Validated, immutable sparge_serve settings (see the module docstring for every key)."""

    thresholds: str | None = None
    min_sparse_len: int = DEFAULT_MIN_SPARSE_LEN
    min_sparse_query_len: int = DEFAULT_MIN_SPARSE_QUERY_LEN
    dense_layers: int | tuple[int, ...] = 0  # first N layers dense, or explicit global indices
    mode: Literal["sparse", "dense"] = "sparse"
    topk: float | None = None
    attention_kernel: Literal["auto", "triton", "fa3"] = "auto"
    map_budget: float | None = MAP_BUDGET
    fast_launch: bool = True
    fp8_attention: bool = False

    def __post_init__(self) -> None:
        # Validate here too, so that direct construction is as safe as parsing.
        for key in self.__dataclass_fields__:
            object.__setattr__(self, key, _check(key, getattr(self, key), "SpargeConfig()"))

    @property
    def thresholds_file(self) -> str | None:
        """The thresholds file to load (None: the untuned thresholds, or none at all)."""
        return None if self.thresholds == UNTUNED_THRESHOLDS else self.thresholds

    @property
    def enabled(self) -> bool:
        """False when the kill switch (``mode: dense``) is on."""
        return self.mode == "sparse"

    def sparse_possible(self, max_model_len: int) -> bool:
        """Whether any request of a model with this context limit can take the sparse path."""
        return self.enabled and max_model_len >= self.min_sparse_len

    def is_dense_layer(self, layer: int) -> bool:
        """Whether global layer ``layer`` is kept dense by ``dense_layers``."""
        if isinstance(self.dense_layers, int):
            return layer < self.dense_layers
        return layer in self.dense_layers

    def fa3_attention(self, fa3_available: bool) -> bool:
        """Whether layers without the PV skip attend through FlashAttention-3: ``fa3``, or
        ``auto`` where FA3 serves the layer (``fa3_available``) unless ``fp8_attention`` asks
        for the Triton kernel's fp8 products (faster than FA3's fp8 forward over the kept
        blocks: docs/PERFORMANCE.md, "fp8 KV cache")."""
        if self.attention_kernel == "auto":
            return fa3_available and not self.fp8_attention
        return self.attention_kernel == "fa3"

    def check_num_layers(self, num_layers: int) -> None:
        """Raise if explicit ``dense_layers`` name layers the model does not have."""
        if isinstance(self.dense_layers, tuple):
            bad = [i for i in self.dense_layers if i >= num_layers]
            if bad:
                raise _bad("dense_layers", "config", f"names layer(s) {bad} but the model has "
                           f"{num_layers} layers (0..{num_layers - 1})",
                           "use global layer indices below the model's layer count")

    def check_kv_cache_dtype(self, cache_dtype: str) -> None:
        """Raise if the settings cannot serve a KV cache of vLLM's ``cache_dtype``:
        ``fp8_attention`` needs an fp8 one."""
        fp8 = str(cache_dtype).startswith("fp8")
        if self.fp8_attention and not fp8:
            raise _bad("fp8_attention", "config", f"is true but the KV cache is not fp8 "
                       f"(--kv-cache-dtype {cache_dtype})",
                       "serve with --kv-cache-dtype fp8, or drop fp8_attention")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(self.dense_layers, tuple):
            d["dense_layers"] = list(self.dense_layers)
        return d

    # ---- parsing -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None,
                  env: Mapping[str, str] | None = None) -> SpargeConfig:
        """Parse the ``"sparge"`` dict of ``additional_config`` and apply ``SPARGE_*`` overrides.

        ``env`` defaults to ``os.environ`` (pass ``{}`` to ignore the environment). Unknown
        ``SPARGE_*`` variables in it are logged (:func:`check_env`).
        """
        env = os.environ if env is None else env
        check_env(env)
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ValueError(f"sparge config: additional_config[{ADDITIONAL_CONFIG_KEY!r}] must be "
                             f"a JSON object, got {type(raw).__name__} {raw!r}. Fix: pass e.g. "
                             f"{_EXAMPLE}.")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(str(k) for k in raw if k not in known)
        if unknown:
            raise ValueError(f"sparge config: unknown key(s) {unknown} in additional_config"
                             f"[{ADDITIONAL_CONFIG_KEY!r}]. Fix: use only {sorted(known)} "
                             f"(e.g. {_EXAMPLE}).")
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for key, value in raw.items():
            values[key] = value
            sources[key] = "additional_config"
        for key, var in ENV_VARS.items():
            text = env.get(var)
            if text is None or text.strip() == "":
                continue
            values[key] = _parse_env(key, var, text.strip())
            sources[key] = f"env {var}"
        return cls(**{key: _check(key, value, sources[key]) for key, value in values.items()})

    @classmethod
    def from_vllm_config(cls, vllm_config: Any,
                         env: Mapping[str, str] | None = None) -> SpargeConfig:
        """Read ``vllm_config.additional_config["sparge"]`` (+ env overrides).

        Raises ValueError when sparge options sit at the top level of ``additional_config`` or
        under a wrong-case ``"sparge"`` key, showing the right form.
        """
        additional = getattr(vllm_config, "additional_config", None) or {}
        if not isinstance(additional, Mapping):
            raise ValueError("sparge config: vLLM's additional_config is not a dict "
                             f"({type(additional).__name__}). Fix: pass {_EXAMPLE}.")
        error = _misplaced(additional, set(cls.__dataclass_fields__))
        if error is not None:
            raise error
        return cls.from_dict(additional.get(ADDITIONAL_CONFIG_KEY), env)


def _parse_env(key: str, var: str, text: str) -> Any:
    source = f"env {var}"
    if key in ("thresholds", "mode", "attention_kernel"):
        return text
    if key in ("min_sparse_len", "min_sparse_query_len"):
        try:
            return int(text)
        except ValueError:
            example = (DEFAULT_MIN_SPARSE_LEN if key == "min_sparse_len"
                       else DEFAULT_MIN_SPARSE_QUERY_LEN)
            raise _bad(key, source, f"= {text!r} is not an integer",
                       f"set {var} to a token count, e.g. {var}={example}") from None
    if key == "dense_layers":
        try:
            if text.startswith("["):
                return json.loads(text)
            parts = [p.strip() for p in text.split(",")]
            if len(parts) == 1:
                return int(parts[0])
            return [int(p) for p in parts]
        except ValueError:
            raise _bad(key, source, f"= {text!r} is neither a layer count nor a list of layer "
                       "indices", f"set {var}=2 (first two layers dense) or {var}=0,1,5") from None
    if key in BOOLEANS:
        try:
            return parse_bool(text, var)
        except ValueError:
            on, off = BOOLEANS[key]
            raise _bad(key, source, f"= {text!r} is not a boolean",
                       f"set {var}=1 ({on}) or {var}=0 ({off}); {'/'.join(TRUE_WORDS)} and "
                       f"{'/'.join(FALSE_WORDS)} are accepted, any case") from None
    if key == "map_budget":
        if text.lower() in ("none", "null"):
            return None
        try:
            return float(text)
        except ValueError:
            raise _bad(key, source, f"= {text!r} is not a number",
                       f"set {var} to a fraction of the K/V bytes, e.g. {var}=0.015, or "
                       f"{var}=none for no bound") from None
    raise AssertionError(key)  # pragma: no cover - ENV_VARS and this function list the same keys


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(key: str, value: Any, source: str) -> Any:
    """Validate one setting; return its normalised value or raise ValueError naming the fix."""
    if key == "thresholds":
        if value is None:
            return None
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise _bad(key, source, f"= {value!r} is not a file path",
                       'pass the path of a thresholds .safetensors file, e.g. "thresholds": '
                       f'"/models/llama.sparge.safetensors", or "{UNTUNED_THRESHOLDS}"')
        if value == UNTUNED_THRESHOLDS and os.path.exists(value):
            raise _bad(key, source, f"= {value!r} names the untuned thresholds, and a file of "
                       "that name is in the working directory too",
                       f'pass "./{value}" for the file')
        return os.fspath(value)
    if key in ("min_sparse_len", "min_sparse_query_len"):
        if not _is_int(value) or value < 1:
            example = (DEFAULT_MIN_SPARSE_LEN if key == "min_sparse_len"
                       else DEFAULT_MIN_SPARSE_QUERY_LEN)
            raise _bad(key, source, f"= {value!r} is not a positive integer",
                       f"use a length in tokens, e.g. {example}")
        return value
    if key == "dense_layers":
        if _is_int(value):
            if value < 0:
                raise _bad(key, source, f"= {value} is negative",
                           "use N >= 0 (first N layers dense) or a list of layer indices")
            return value
        if isinstance(value, (list, tuple)):
            if not all(_is_int(i) and i >= 0 for i in value):
                raise _bad(key, source, f"= {list(value)!r} holds something other than "
                           "non-negative integers", "list global layer indices, e.g. [0, 1, 31]")
            return tuple(sorted(set(value)))
        raise _bad(key, source, f"= {value!r} is neither an integer nor a list",
                   "use N (first N layers dense) or a list of layer indices, e.g. [0, 1]")
    if key == "mode":
        if value not in MODES:
            raise _bad(key, source, f"= {value!r} is not one of {list(MODES)}",
                       '"sparse" (default) or "dense" (kill switch: everything runs dense)')
        return value
    if key == "topk":
        return _optional_fraction(key, value, source, "use the fraction of valid key blocks to "
                                  "keep, e.g. 0.5, or leave it out")
    if key in BOOLEANS:
        if not isinstance(value, bool):
            on, off = BOOLEANS[key]
            raise _bad(key, source, f"= {value!r} is not a boolean",
                       f"use true ({on}) or false ({off})")
        return value
    if key == "attention_kernel":
        if value not in ATTENTION_KERNELS:
            raise _bad(key, source, f"= {value!r} is not one of {list(ATTENTION_KERNELS)}",
                       '"auto" (default), "triton" (the Triton kernel) or "fa3" '
                       "(FlashAttention-3 over the kept blocks)")
        return value
    if key == "map_budget":
        return _optional_fraction(key, value, source, "use a fraction of the K/V bytes, e.g. "
                                  f"{MAP_BUDGET}, or null (no bound: the whole block "
                                  "map at once)")
    raise AssertionError(key)  # pragma: no cover - callers pass dataclass field names only


def _optional_fraction(key: str, value: Any, source: str, fix: str) -> float | None:
    """``None``, or ``value`` as a float in (0, 1]; else ValueError naming ``fix``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise _bad(key, source, f"= {value!r} is not a number in (0, 1]", fix)
    return float(value)
