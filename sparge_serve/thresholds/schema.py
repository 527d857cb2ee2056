"""The thresholds' schema: constants, the in-memory :class:`Thresholds` and its validation,
the model geometry a file must match (:class:`ModelGeometry`, :func:`check_geometry`) and the
model-config digest (:func:`config_hash`).

The file format is described in the package docstring (``sparge_serve.thresholds``). Imports
neither vLLM nor the kernels (only ``sparge_serve.kernels.geometry``'s constants).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

# NOTE: the kernels' geometry (the block tile a file records, the PV-skip "off" value); that
# module imports neither torch nor Triton
from sparge_serve.kernels.geometry import BLKK, BLKQ, PV_SKIP_OFF

logger = logging.getLogger(__name__)

FORMAT = "sparge-thresholds"
FORMAT_VERSION = "1"

# Published SpargeAttn defaults for untuned use (docs/METHOD.md, "Calibration"): PV skip off.
DEFAULT_SIMTHRESHD1 = 0.6
DEFAULT_CDFTHRESHD = 0.98

THRESHOLD_TENSORS = ("simthreshd1", "cdfthreshd", "pvthreshd")
TENSOR_NAMES = (*THRESHOLD_TENSORS, "is_sparse")
# Optional per-layer budget tensors (fields of Thresholds of the same names).
# NOTE: optional within format_version 1 (older files lack them), so no version bump; readers that
# predate them refuse such files as having unexpected tensors.
BUDGET_TENSORS = ("l1_budget", "pv_l1_budget")
_GEOMETRY_KEYS = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "blkq", "blkk")
_FIX_RECALIBRATE = "re-run `sparge-calibrate` for this model to write a fresh file"


class ThresholdsError(ValueError):
    """A thresholds file (or in-memory Thresholds) is missing, corrupt or does not fit the model."""


def _err(source: str, problem: str, fix: str) -> ThresholdsError:
    return ThresholdsError(f"thresholds file {source}: {problem}. Fix: {fix}.")


@dataclass(frozen=True)
class ModelGeometry:
    """What a thresholds file must match: the model's attention geometry and the kernel tile.

    ``num_heads``/``num_kv_heads`` are *global* (un-sharded) counts. ``config_hash`` (optional) is
    compared too, but a mismatch only warns: geometry decides whether a file can be used at all.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    blkq: int = BLKQ
    blkk: int = BLKK
    config_hash: str | None = None


def model_geometry_of(model_config: Any, *, blkq: int = BLKQ, blkk: int = BLKK,
                      with_hash: bool = True) -> ModelGeometry:
    """The global attention geometry of a vLLM ``ModelConfig`` (read through its methods: no vLLM
    import), as a thresholds file must match it. ``config_hash`` is None when ``with_hash`` is
    false or the HF config cannot be serialised (the hash check is advisory)."""
    mc = model_config
    digest = None
    if with_hash:
        try:
            digest = config_hash(mc.hf_config.to_dict())
        except Exception:  # a config that cannot be serialised only loses the (advisory) check
            digest = None
    return ModelGeometry(
        num_layers=mc.get_total_num_hidden_layers(),
        num_heads=mc.model_arch_config.total_num_attention_heads,
        num_kv_heads=mc.get_total_num_kv_heads(),
        head_dim=mc.get_head_size(),
        blkq=blkq, blkk=blkk, config_hash=digest,
    )


@dataclass(frozen=True, eq=False)  # eq on tensors is ambiguous: identity semantics
class Thresholds:
    """Per-(layer, head) SpargeAttn thresholds plus the provenance metadata of the file.

    Validated on construction (shapes, dtypes, finite, ranges, dense-head consistency), so a
    ``Thresholds`` object that exists is usable. Tensors live on the CPU; the backend moves the slices
    it needs to the GPU once at startup.
    """

    simthreshd1: torch.Tensor  # [num_layers, num_heads] float32; block similar iff sim > this, in [-1, 1]
    cdfthreshd: torch.Tensor  # [num_layers, num_heads] float32; CDF mass kept, in (0, 1] (1 = dense)
    pvthreshd: torch.Tensor  # [num_layers, num_heads] float32; log2-domain PV-skip margin >= 0 (>= 50 = off)
    is_sparse: torch.Tensor  # [num_layers, num_heads] uint8; 0 = head calibrated dense, 1 = sparse
    num_kv_heads: int  # KV heads of these thresholds' heads (global count before for_rank)
    head_dim: int
    blkq: int = BLKQ
    blkk: int = BLKK
    model: str = ""
    config_hash: str = ""
    l1: float | None = None  # stage-1 relative-L1 budget used by calibration (global)
    pv_l1: float | None = None  # stage-2 budget (global)
    sim_rule: str = ""
    # how the budget bounded the heads: "model" (their mean, allocated) or "head" (each head)
    allocation: str = ""
    num_prompts: int = 0
    prompts_sha256: str = ""
    package_version: str = ""
    created: str = ""
    # [num_layers] float32 per-layer budgets actually used (file tensors l1_budget / pv_l1_budget);
    # both or neither, None in files that predate them. Per layer, so for_rank keeps them whole.
    l1_budget: torch.Tensor | None = None
    pv_l1_budget: torch.Tensor | None = None
    # Head offset of head 0 of this object in the global head order (non-zero after for_rank).
    head_offset: int = 0
    # Hex sha256 of the file bytes these thresholds were parsed from ("" when built in memory).
    sha256: str = ""

    def __post_init__(self) -> None:
        _validate(self, "<in-memory Thresholds>")

    # ---- shape helpers -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.simthreshd1.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.simthreshd1.shape[1])

    @property
    def geometry(self) -> ModelGeometry:
        return ModelGeometry(self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim,
                             self.blkq, self.blkk, self.config_hash or None)

    def layer_is_dense(self, layer: int) -> bool:
        """True if every head of ``layer`` was calibrated dense (the layer can skip the sparse path)."""
        return not bool(self.is_sparse[layer].any())

    # ---- constructors --------------------------------------------------------------------------
    @classmethod
    def defaults(cls, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 simthreshd1: float = DEFAULT_SIMTHRESHD1, cdfthreshd: float = DEFAULT_CDFTHRESHD,
                 pvthreshd: float = PV_SKIP_OFF, model: str = "", config_hash: str = "",
                 blkq: int = BLKQ, blkk: int = BLKK) -> Thresholds:
        """Uniform thresholds for every head (default: the published untuned SpargeAttn setting)."""
        shape = (num_layers, num_heads)
        dense = cdfthreshd >= 1.0 and simthreshd1 >= 1.0 and pvthreshd >= PV_SKIP_OFF
        return cls(
            simthreshd1=torch.full(shape, float(simthreshd1), dtype=torch.float32),
            cdfthreshd=torch.full(shape, float(cdfthreshd), dtype=torch.float32),
            pvthreshd=torch.full(shape, float(pvthreshd), dtype=torch.float32),
            is_sparse=torch.full(shape, 0 if dense else 1, dtype=torch.uint8),
            num_kv_heads=num_kv_heads, head_dim=head_dim, blkq=blkq, blkk=blkk, model=model,
            config_hash=config_hash, sim_rule="uniform-dense" if dense else "uniform-default",
        )

    @classmethod
    def dense(cls, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
              **kwargs: Any) -> Thresholds:
        """Dense-equivalent thresholds (cdf 1, sim 1, PV off): the sparse path must equal dense."""
        return cls.defaults(num_layers, num_heads, num_kv_heads, head_dim, simthreshd1=1.0,
                            cdfthreshd=1.0, pvthreshd=PV_SKIP_OFF, **kwargs)

    # ---- tensor parallelism --------------------------------------------------------------------
    def for_rank(self, tp_rank: int, tp_size: int) -> Thresholds:
        """The thresholds of the query heads tensor-parallel rank ``tp_rank`` of ``tp_size`` owns.

        NOTE: vLLM's QKVParallelLinear gives rank r the contiguous query heads
        ``[r * H/tp, (r+1) * H/tp)``; KV heads are split the same way, or replicated (one per rank)
        when there are fewer KV heads than ranks.
        """
        if tp_size < 1 or not 0 <= tp_rank < tp_size:
            raise ValueError(f"for_rank: need 0 <= tp_rank < tp_size, got tp_rank={tp_rank}, "
                             f"tp_size={tp_size}")
        if tp_size == 1:
            return self
        if self.head_offset != 0 or self.num_heads % tp_size:
            raise ValueError(
                f"for_rank: {self.num_heads} query heads cannot be split over tp_size={tp_size} "
                "(vLLM needs the head count divisible by the tensor-parallel size; "
                "call for_rank on the global thresholds only)")
        if self.num_kv_heads >= tp_size and self.num_kv_heads % tp_size:
            raise ValueError(f"for_rank: {self.num_kv_heads} KV heads cannot be split over "
                             f"tp_size={tp_size}")
        per = self.num_heads // tp_size
        sl = slice(tp_rank * per, (tp_rank + 1) * per)
        return replace(
            self,
            simthreshd1=self.simthreshd1[:, sl].contiguous(),
            cdfthreshd=self.cdfthreshd[:, sl].contiguous(),
            pvthreshd=self.pvthreshd[:, sl].contiguous(),
            is_sparse=self.is_sparse[:, sl].contiguous(),
            num_kv_heads=max(1, self.num_kv_heads // tp_size),
            head_offset=tp_rank * per,
        )

    # ---- (de)serialisation ---------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        """The file's string metadata for these thresholds (format keys + geometry + provenance)."""
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "num_layers": str(self.num_layers), "num_heads": str(self.num_heads)}
        for f in fields(self):
            if f.name in TENSOR_NAMES or f.name in BUDGET_TENSORS or f.name in (
                    "head_offset", "sha256"):
                continue
            value = getattr(self, f.name)
            meta[f.name] = "" if value is None else str(value)
        return meta


def _validate(th: Thresholds, source: str) -> None:
    shape: tuple[int, ...] | None = None
    for name in TENSOR_NAMES:
        t = getattr(th, name)
        want = torch.uint8 if name == "is_sparse" else torch.float32
        if not isinstance(t, torch.Tensor):
            raise _err(source, f"`{name}` is a {type(t).__name__}, not a tensor",
                       f"store `{name}` as a {want} tensor")
        if t.dtype != want:
            raise _err(source, f"tensor `{name}` has dtype {t.dtype}, expected {want}",
                       f"store `{name}` as {want} (thresholds are never kept in the model dtype)")
        if t.dim() != 2 or 0 in t.shape:
            raise _err(source, f"tensor `{name}` has shape {list(t.shape)}, expected a non-empty "
                       "[num_layers, num_heads]", _FIX_RECALIBRATE)
        if shape is None:
            shape = tuple(t.shape)
        elif tuple(t.shape) != shape:
            raise _err(source, f"tensor `{name}` has shape {list(t.shape)} but `simthreshd1` has "
                       f"{list(shape)}", "all four tensors must be [num_layers, num_heads]")
    for name in THRESHOLD_TENSORS:
        t = getattr(th, name)
        bad = ~torch.isfinite(t)
        if bad.any():
            layer, head = (int(i) for i in bad.nonzero()[0])
            raise _err(source, f"tensor `{name}` has {int(bad.sum())} NaN/inf value(s), first at "
                       f"layer {layer}, head {head}", _FIX_RECALIBRATE)
    ranges = {
        "simthreshd1": (lambda t: (t >= -1) & (t <= 1), "in [-1, 1] (1 = no block similar = dense)"),
        "cdfthreshd": (lambda t: (t > 0) & (t <= 1), "in (0, 1] (1 = keep every block)"),
        "pvthreshd": (lambda t: t >= 0, f">= 0 (>= {PV_SKIP_OFF:g} disables the PV skip)"),
    }
    for name, (ok_fn, rule) in ranges.items():
        t = getattr(th, name)
        bad = ~ok_fn(t)
        if bad.any():
            layer, head = (int(i) for i in bad.nonzero()[0])
            raise _err(source, f"tensor `{name}` value {float(t[layer, head]):g} at layer {layer}, "
                       f"head {head} is out of range; it must be {rule}", _FIX_RECALIBRATE)
    if ((th.is_sparse != 0) & (th.is_sparse != 1)).any():
        raise _err(source, "tensor `is_sparse` holds values other than 0 and 1", _FIX_RECALIBRATE)
    # NOTE: a dense head must be exactly dense: the original SpargeAttn kept the PV threshold of
    # heads it marked dense, so a "dense" head could still skip P.V blocks.
    dense = th.is_sparse == 0
    not_dense = dense & ((th.cdfthreshd < 1) | (th.simthreshd1 < 1) | (th.pvthreshd < PV_SKIP_OFF))
    if not_dense.any():
        layer, head = (int(i) for i in not_dense.nonzero()[0])
        raise _err(source, f"head {head} of layer {layer} is marked dense (is_sparse = 0) but has "
                   f"cdfthreshd={float(th.cdfthreshd[layer, head]):g}, "
                   f"simthreshd1={float(th.simthreshd1[layer, head]):g}, "
                   f"pvthreshd={float(th.pvthreshd[layer, head]):g}",
                   f"dense heads need cdfthreshd = 1, simthreshd1 = 1, pvthreshd >= {PV_SKIP_OFF:g}; "
                   + _FIX_RECALIBRATE)
    _validate_budgets(th, source)
    _validate_provenance(th, source)
    for name in ("num_kv_heads", "head_dim", "blkq", "blkk"):
        value = getattr(th, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise _err(source, f"`{name}` = {value!r} is not a positive integer", _FIX_RECALIBRATE)
    if th.head_offset == 0 and th.num_heads % th.num_kv_heads:
        raise _err(source, f"num_heads = {th.num_heads} is not a multiple of num_kv_heads = "
                   f"{th.num_kv_heads}", "the file's geometry is inconsistent; " + _FIX_RECALIBRATE)


def _validate_provenance(th: Thresholds, source: str) -> None:
    """Check the numeric provenance: ``l1`` / ``pv_l1`` None or in (0, 1] with ``pv_l1 > l1``,
    ``num_prompts`` an integer >= 0."""
    for name in ("l1", "pv_l1"):
        value = getattr(th, name)
        if value is None:
            continue
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or not 0 < value <= 1):
            raise _err(source, f"metadata `{name}` = {value!r} is not a number in (0, 1] (the "
                       "relative error budget of the calibration)", _FIX_RECALIBRATE)
    if th.l1 is not None and th.pv_l1 is not None and th.pv_l1 <= th.l1:
        raise _err(source, f"metadata `pv_l1` = {th.pv_l1!r} is not above `l1` = {th.l1!r}; the "
                   "PV budget must exceed the l1 budget (the PV skip adds error on top of the "
                   "block selection)", _FIX_RECALIBRATE)
    n = th.num_prompts
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise _err(source, f"metadata `num_prompts` = {n!r} is not an integer >= 0 (the number "
                   "of calibration prompts)", _FIX_RECALIBRATE)
    if not isinstance(th.sha256, str):
        raise _err(source, f"`sha256` = {th.sha256!r} is not a hex digest string",
                   "leave it empty for thresholds built in memory")


def _validate_budgets(th: Thresholds, source: str) -> None:
    """Check the optional per-layer budgets: both or neither, fp32 ``[num_layers]``, finite, in
    (0, 1], and ``pv_l1_budget > l1_budget`` on every layer."""
    present = {name: getattr(th, name) for name in BUDGET_TENSORS}
    if all(t is None for t in present.values()):
        return
    for name, t in present.items():
        if t is None:
            other = next(n for n in BUDGET_TENSORS if n != name)
            raise _err(source, f"tensor `{other}` is present but `{name}` is not (the per-layer "
                       "budgets come as a pair)", "store both per-layer budget tensors or neither; "
                       + _FIX_RECALIBRATE)
        if not isinstance(t, torch.Tensor):
            raise _err(source, f"`{name}` is a {type(t).__name__}, not a tensor",
                       f"store `{name}` as a {torch.float32} tensor")
        if t.dtype != torch.float32:
            raise _err(source, f"tensor `{name}` has dtype {t.dtype}, expected {torch.float32}",
                       f"store `{name}` as {torch.float32}")
        if list(t.shape) != [th.num_layers]:
            raise _err(source, f"tensor `{name}` has shape {list(t.shape)}, expected [num_layers] = "
                       f"[{th.num_layers}] (one budget per layer)", _FIX_RECALIBRATE)
        bad = ~torch.isfinite(t)
        if bad.any():
            layer = int(bad.nonzero()[0])
            raise _err(source, f"tensor `{name}` has {int(bad.sum())} NaN/inf value(s), first at "
                       f"layer {layer}", _FIX_RECALIBRATE)
        bad = (t <= 0) | (t > 1)
        if bad.any():
            layer = int(bad.nonzero()[0])
            raise _err(source, f"tensor `{name}` value {float(t[layer]):g} at layer {layer} is out "
                       "of range; it must be in (0, 1] (a relative error budget)", _FIX_RECALIBRATE)
    l1, pv = present["l1_budget"], present["pv_l1_budget"]
    bad = pv <= l1
    if bad.any():
        layer = int(bad.nonzero()[0])
        raise _err(source, f"layer {layer} has pv_l1_budget {float(pv[layer]):g} <= l1_budget "
                   f"{float(l1[layer]):g}; the PV budget must exceed the l1 budget on every layer "
                   "(the PV skip adds error on top of the block selection)", _FIX_RECALIBRATE)


def check_geometry(th: Thresholds, expect: ModelGeometry, source: str = "<in-memory>") -> None:
    """Raise ThresholdsError unless ``th`` fits ``expect`` (global geometry and kernel tile)."""
    model = f" (calibrated for {th.model!r})" if th.model else ""
    for key in _GEOMETRY_KEYS:
        got, want = getattr(th, key), getattr(expect, key)
        if got != want:
            what = "kernel block size" if key in ("blkq", "blkk") else "model"
            raise _err(source, f"{key} = {got} in the file{model} but the {what} has {key} = {want}",
                       "use the thresholds file calibrated for this model and this sparge_serve "
                       "version, or " + _FIX_RECALIBRATE)
    if expect.config_hash and th.config_hash and expect.config_hash != th.config_hash:
        logger.warning("thresholds file %s: config_hash %s%s differs from the served model's %s; "
                       "the geometry matches, so it is used, but it may be tuned for another model",
                       source, th.config_hash, model, expect.config_hash)


# Keys of an HF config dict that do not change the model's computation (or vary between tools).
_VOLATILE_CONFIG_KEYS = frozenset({
    "transformers_version", "torch_dtype", "dtype", "use_cache", "return_dict",
    "output_attentions", "output_hidden_states", "architectures", "auto_map",
})


def config_hash(hf_config: Mapping[str, Any]) -> str:
    """A stable sha256 (hex) of an HF config dict (e.g. ``PretrainedConfig.to_dict()``).

    Private keys (``_name_or_path``, ``_attn_implementation``, ...) and keys that do not change the
    computation (``transformers_version``, ``torch_dtype``, ...) are left out, so the same checkpoint
    hashes the same whether read by the calibration tool or by the serving engine.
    """
    def clean(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return {str(k): clean(v) for k, v in obj.items()
                    if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        if isinstance(obj, float) and not math.isfinite(obj):
            return repr(obj)
        return obj

    text = json.dumps(clean(hf_config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
