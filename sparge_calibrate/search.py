"""Per-head threshold search over captured Q/K/V (docs/METHOD.md, "Calibration").

Independent of how Q/K/V were captured (transformers, vLLM, synthetic): the input of one layer is a
list of :class:`Sample` (``q [Lq, Hq, D]`` = the last ``Lq`` positions of a context of ``Lk`` keys
``k, v [Lk, Hkv, D]``, GQA kept) and the layer's softmax scale. Errors are measured by an
:class:`Evaluator` against dense attention on the same Q/K/V; two implementations ship in
``sparge_calibrate.evaluators`` (the CPU reference and the serving kernels on CUDA).

Two allocations of a budget share this module's types, the PV search and the final measurement
(:func:`finish_layer`): ``model`` (the default, ``allocate.py``) bounds the mean error of the
heads sharing a budget; ``head`` (:func:`search_layer`, below) bounds every head's error.

The per-head search (all heads of a layer in *lockstep*: one evaluator call per step evaluates
every head with its own thresholds, since heads are independent in both stages):

1. for each ``simthreshd1`` of a grid, bisect the *smallest* ``cdfthreshd`` (= the sparsest setting;
   a larger cdfthreshd keeps more blocks) whose error <= ``l1`` (on ``-log10(1 - cdf)``, see
   ``CDF_U_MAX``); keep the grid point with the highest block sparsity (ties: lower error);
2. heads whose best sparsity is below ``sparsity_floor`` are marked dense: ``simthreshd1 = 1``,
   ``cdfthreshd = 1``, ``pvthreshd = 50`` (PV skip off -- the original kept the PV threshold); so
   is every head of a layer whose heads together (dense ones at 0) skip less than
   ``layer_sparsity_floor``: the sparse path's fixed cost per layer would outweigh what it skips;
3. for the sparse heads, bisect the smallest ``pvthreshd`` in ``[0, 50)`` whose error with the
   stage-1 setting <= ``pv_l1`` (> ``l1``); 50 (off) if none.

A setting "passes" when the per-head error aggregated over samples (``quantile`` 1.0 = the worst
sample, the default) is within budget. Bisection assumes the error is non-increasing in
``cdfthreshd`` and ``pvthreshd``; it only ever moves to settings it has *measured* as passing, so the
result meets the budget on the calibration samples even where that assumption fails (it may then
just miss a sparser setting).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from sparge_serve.kernels.geometry import BLKK, BLKQ, PV_SKIP_OFF
from sparge_serve.reference import block_masks, tail_blocks

from .prompts import MIN_PROMPT_TOKENS

__all__ = [
    "ALLOCATIONS", "CDF_U_MAX", "DEFAULT_SIM_GRID", "ERROR_RULES", "Evaluation", "Evaluator",
    "LayerBudget", "LayerResult", "Runner", "Sample", "SearchConfig", "aggregate_errors",
    "below_layer_floor", "cdf_from_u", "check_samples", "dense_layer_result", "finish_layer",
    "output_errors", "search_layer", "search_layers", "skippable_blocks", "sparsity",
    "stack_results",
]

ALLOCATIONS = ("model", "head")
"""How a budget bounds the heads' errors: their mean over the heads sharing it (``model``,
``allocate.py``) or each head's (``head``, :func:`search_layer`)."""
ERROR_RULES = ("l1", "cosine", "rmse")
"""``l1``: sum|O - O_ref| / sum|O_ref|; ``cosine``: 1 - cos(O, O_ref); ``rmse``: ||O - O_ref|| /
||O_ref|| (relative RMSE). Per head, over all tokens and channels of a sample."""

logger = logging.getLogger(__name__)

# NOTE: block self-similarity is ||mean of unit vectors||^2, always in [0, 1]: every threshold < 0
# means "every block similar" (one grid point stands for all of them) and 1 means "no block
# similar" (= dense, useless as a candidate). The grid is dense where the choice matters.
DEFAULT_SIM_GRID = (-1.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class Sample:
    """One captured prefill of one layer: ``q`` holds the last ``Lq`` positions of the context."""

    q: torch.Tensor  # [Lq, Hq, D]
    k: torch.Tensor  # [Lk, Hkv, D] (GQA: Hq % Hkv == 0, no repeat-KV)
    v: torch.Tensor  # [Lk, Hkv, D]


@dataclass(frozen=True)
class Evaluation:
    """Per (sample, head) outcome of one sparse-attention run against the dense reference."""

    l1: torch.Tensor  # [S, H] fp32: relative L1 error
    cosine: torch.Tensor  # [S, H] fp32: 1 - cosine similarity
    rmse: torch.Tensor  # [S, H] fp32: relative RMSE
    kept: torch.Tensor  # [S, H] int64: kept (q-block, k-block) pairs
    valid: torch.Tensor  # [S, H] int64: causally valid pairs
    pv_skipped: torch.Tensor | None  # [S, H] int64 PV-skipped pairs, None if not counted per head

    def error(self, rule: str) -> torch.Tensor:
        if rule not in ERROR_RULES:
            raise ValueError(f"unknown error rule {rule!r}; choose one of {ERROR_RULES}")
        return getattr(self, rule)


class Evaluator(Protocol):
    """Measures sparse attention against dense attention (plan/run split, like vLLM build/forward).

    ``prepare`` does everything that depends only on the layer's samples once (dense reference
    output, device copies); ``evaluate`` runs both SpargeAttn stages with per-head thresholds
    (fp32 ``[Hq]`` tensors, CPU) on every sample. ``sparse_attention`` runs one prefill (used by the
    quality report).
    """

    name: str

    def prepare(self, samples: Sequence[Sample], scale: float) -> Any: ...

    def evaluate(
        self,
        prepared: Any,
        simthreshd1: torch.Tensor,
        cdfthreshd: torch.Tensor,
        pvthreshd: torch.Tensor,
    ) -> Evaluation: ...

    def sparse_attention(
        self,
        sample: Sample,
        scale: float,
        simthreshd1: torch.Tensor,
        cdfthreshd: torch.Tensor,
        pvthreshd: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``out [Lq, Hq, D]`` (q's dtype and device), ``kept [Hq]`` and ``valid [Hq]``."""
        ...


@dataclass(frozen=True)
class LayerBudget:
    """Error budgets of one layer: stage 1 (block selection) and stage 1 + 2 (with PV skip)."""

    l1: float
    pv_l1: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.l1) and self.l1 > 0):
            raise ValueError(f"l1 budget must be a positive number, got {self.l1}")
        if not (math.isfinite(self.pv_l1) and self.pv_l1 > self.l1):
            raise ValueError(
                f"pv_l1 budget ({self.pv_l1}) must exceed l1 ({self.l1}): the PV skip adds error "
                "on top of the block selection"
            )


@dataclass(frozen=True)
class SearchConfig:
    sim_grid: tuple[float, ...] = DEFAULT_SIM_GRID
    cdf_steps: int = 10  # bisection steps on -log10(1 - cdfthreshd) in [0, 6]: resolution 0.006
    pv_steps: int = 8  # bisection steps on pvthreshd in [0, 50): resolution ~0.2 (0 = PV skip off)
    sparsity_floor: float = 0.1  # heads with less block sparsity than this are marked dense
    # a layer whose mean block sparsity over its heads is below this is marked dense
    layer_sparsity_floor: float = 0.1
    rule: str = "l1"  # which of ERROR_RULES the budgets bound
    quantile: float = 1.0  # aggregate over samples: 1.0 = every sample within budget
    # "model": the budget bounds the mean error of the heads sharing it (allocate.py); "head":
    # it bounds every head's error (search_layer)
    allocation: str = "model"
    cdf_points: int = 16  # "model": cdfthreshd grid points per simthreshd1 (allocate.cdf_grid)

    def __post_init__(self) -> None:
        if self.rule not in ERROR_RULES:
            raise ValueError(f"unknown error rule {self.rule!r}; choose one of {ERROR_RULES}")
        if not self.sim_grid or any(not -1.0 <= s <= 1.0 for s in self.sim_grid):
            raise ValueError(f"sim_grid must be non-empty values in [-1, 1], got {self.sim_grid}")
        if self.cdf_steps < 1 or self.pv_steps < 0 or self.cdf_points < 2:
            raise ValueError("cdf_steps must be >= 1, cdf_points >= 2 and pv_steps >= 0")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose one of "
                             f"{ALLOCATIONS}")
        for name in ("sparsity_floor", "layer_sparsity_floor"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {self.quantile}")

    @property
    def grid_evaluations(self) -> int:
        """Evaluator calls of one layer's grid ("model", shared by every budget)."""
        return len(self.sim_grid) * self.cdf_points

    @property
    def search_evaluations(self) -> int:
        """Evaluator calls of one layer's per-head search ("head", per budget), PV search and
        final measurement included."""
        return len(self.sim_grid) * self.cdf_steps + self.pv_steps + 1

    @property
    def evaluations_per_layer(self) -> int:
        """Evaluator calls per layer and budget of this allocation ("model": the grid, then the
        PV search and its final measurement, if on)."""
        if self.allocation == "model":
            return self.grid_evaluations + (self.pv_steps + 1) * (self.pv_steps > 0)
        return self.search_evaluations


@dataclass(frozen=True)
class LayerResult:
    """Calibrated thresholds of one layer and how they perform on the calibration samples."""

    simthreshd1: torch.Tensor  # [H] fp32
    cdfthreshd: torch.Tensor  # [H] fp32
    pvthreshd: torch.Tensor  # [H] fp32 (>= 50 = PV skip off)
    is_sparse: torch.Tensor  # [H] bool
    sparsity: torch.Tensor  # [H] fp32: fraction of valid blocks not computed (stage 1), all samples
    pv_skip: torch.Tensor | None  # [H] fp32: fraction of valid blocks PV-skipped, if counted
    error: torch.Tensor  # [H] fp32: final error (``rule``) aggregated over samples
    sample_errors: torch.Tensor  # [S, H] fp32: final error per sample
    budget: LayerBudget
    rule: str
    evaluations: int = field(default=0, compare=False)
    window: bool = False  # a sliding-window layer: served dense, recorded dense, not searched
    floored: bool = False  # calibrated dense: its heads together skip less than the layer floor

    @property
    def num_heads(self) -> int:
        return int(self.simthreshd1.shape[0])


def output_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-head ``(l1, cosine, rmse)`` of ``out`` against ``ref`` (both ``[Lq, H, D]``), fp32."""
    out, ref = out.float(), ref.float()
    diff = out - ref
    tiny = torch.finfo(torch.float32).tiny
    l1 = diff.abs().sum((0, 2)) / ref.abs().sum((0, 2)).clamp_min(tiny)
    dot = (out * ref).sum((0, 2))
    norms = out.norm(dim=2).pow(2).sum(0).sqrt() * ref.norm(dim=2).pow(2).sum(0).sqrt()
    cosine = 1.0 - dot / norms.clamp_min(tiny)
    rmse = diff.pow(2).sum((0, 2)).sqrt() / ref.pow(2).sum((0, 2)).sqrt().clamp_min(tiny)
    return l1, cosine, rmse


def aggregate_errors(errors: torch.Tensor, quantile: float) -> torch.Tensor:
    """``[S, H]`` -> ``[H]``: the worst sample (1.0) or the ``quantile`` (rounded up to a sample)."""
    if quantile >= 1.0:
        return errors.max(0).values
    return torch.quantile(errors, quantile, dim=0, interpolation="higher")


def skippable_blocks(lq: int, lk: int) -> int:
    """Valid (q-block, k-block) pairs that are neither the sink, nor diagonal, nor in a row of the
    last ``BLKQ`` queries: all sparsity can come from. Zero for a full prefill of fewer than
    ``3 * BLKQ`` tokens."""
    valid, diag = block_masks(lq, lk, BLKQ, BLKK)
    free = valid & ~diag
    free[:, 0] = False
    free[tail_blocks(lq, BLKQ)] = False
    return int(free.sum())


def check_samples(samples: Sequence[Sample]) -> tuple[int, int, int]:
    """Validate one layer's samples; returns ``(Hq, Hkv, D)``."""
    if not samples:
        raise ValueError("no samples: capture at least one prefill of this layer")
    geo = None
    for i, s in enumerate(samples):
        if s.q.dim() != 3 or s.k.dim() != 3 or s.k.shape != s.v.shape:
            raise ValueError(
                f"sample {i}: expected q [Lq, Hq, D], k and v [Lk, Hkv, D], got "
                f"{tuple(s.q.shape)}, {tuple(s.k.shape)}, {tuple(s.v.shape)}"
            )
        lq, hq, d = s.q.shape
        lk, hkv, dk = s.k.shape
        if d != dk or hq % hkv:
            raise ValueError(f"sample {i}: q heads {hq} / KV heads {hkv}, head dims {d} / {dk}")
        if not 0 < lq <= lk:
            raise ValueError(f"sample {i}: query length {lq} must be in [1, context length {lk}]")
        if geo is None:
            geo = (hq, hkv, d)
        elif geo != (hq, hkv, d):
            raise ValueError(f"sample {i}: geometry {(hq, hkv, d)} differs from sample 0's {geo}")
    if not any(skippable_blocks(s.q.shape[0], s.k.shape[0]) for s in samples):
        raise ValueError(
            f"every sample is too short to calibrate: with query blocks of {BLKQ} and key blocks of "
            f"{BLKK} every block is forced (sink, diagonal or the last {BLKQ} queries' rows); use "
            f"prompts of at least {MIN_PROMPT_TOKENS} tokens (three query blocks)"
        )
    return geo


CDF_U_MAX = 6.0
"""cdfthreshd is bisected on ``u = -log10(1 - cdf)`` in ``[0, CDF_U_MAX]`` (cdf up to 1 - 1e-6):
the keep set of a head with a peaked block distribution only changes in the last decimals below 1,
where a linear bisection has no resolution; beyond 1 - 1e-6 fp32 mass sums are noise."""


def cdf_from_u(u: torch.Tensor) -> torch.Tensor:
    # NOTE: evaluated and stored as the same fp32 value (what the file holds is what was measured)
    return (1.0 - torch.pow(10.0, -u)).clamp(min=1e-6).to(torch.float32)


def sparsity(ev: Evaluation) -> torch.Tensor:
    kept, valid = ev.kept.sum(0).double(), ev.valid.sum(0).double()
    return (1.0 - kept / valid.clamp_min(1)).float()


class Runner:
    """Runs the evaluator with per-head thresholds, counting calls for ``on_step(done, total)``;
    returns the evaluation and its errors aggregated over samples (``config``'s rule and
    quantile)."""

    def __init__(self, evaluator: Evaluator, prepared: Any, config: SearchConfig, total: int,
                 on_step: Callable[[int, int], None] | None = None):
        self.evaluator, self.prepared, self.config = evaluator, prepared, config
        self.total, self.on_step, self.done = total, on_step, 0

    def __call__(self, sim: torch.Tensor, cdf: torch.Tensor,
                 pv: torch.Tensor) -> tuple[Evaluation, torch.Tensor]:
        ev = self.evaluator.evaluate(self.prepared, sim, cdf, pv)
        self.skip(1)
        return ev, aggregate_errors(ev.error(self.config.rule), self.config.quantile)

    def skip(self, steps: int) -> None:
        """Count ``steps`` calls that need not run (progress stays proportional)."""
        self.done += steps
        if steps and self.on_step is not None:
            self.on_step(self.done, self.total)


def search_layer(
    samples: Sequence[Sample],
    scale: float,
    evaluator: Evaluator,
    budget: LayerBudget,
    config: SearchConfig | None = None,
    on_step: Callable[[int, int], None] | None = None,
    prepared: Any = None,
) -> LayerResult:
    """Calibrate every head of one layer (see the module docstring). ``on_step(done, total)`` is
    called after each evaluator call; ``prepared``: ``evaluator.prepare(samples, scale)`` when
    the caller searches the same samples at several budgets (made here otherwise)."""
    config = config or SearchConfig()
    num_heads, _, _ = check_samples(samples)
    if prepared is None:
        prepared = evaluator.prepare(samples, scale)
    run = Runner(evaluator, prepared, config, config.search_evaluations, on_step)
    f32 = dict(dtype=torch.float32)
    ones = torch.ones(num_heads, **f32)
    pv_off = torch.full((num_heads,), PV_SKIP_OFF, **f32)

    # ---- stage 1: simthreshd1 grid x cdfthreshd bisection -------------------------------------
    # the dense setting (cdf 1) passes by construction: it is every head's starting point
    best_sim, best_cdf = ones.clone(), ones.clone()
    best_sp, best_err = torch.zeros(num_heads, **f32), torch.zeros(num_heads, **f32)
    for s in config.sim_grid:
        sim = torch.full((num_heads,), float(s), **f32)
        # bisect u = -log10(1 - cdf) in [0, CDF_U_MAX]; u = inf (cdf = 1, dense) passes
        lo = torch.zeros(num_heads, dtype=torch.float64)
        hi = torch.full((num_heads,), math.inf, dtype=torch.float64)
        hi_cdf = ones.clone()
        hi_sp, hi_err = torch.zeros(num_heads, **f32), torch.zeros(num_heads, **f32)
        for _ in range(config.cdf_steps):
            mid = (lo + hi.clamp(max=CDF_U_MAX)) / 2
            cdf = cdf_from_u(mid)
            ev, err = run(sim, cdf, pv_off)
            ok = err <= budget.l1
            hi = torch.where(ok, mid, hi)
            lo = torch.where(ok, lo, mid)
            hi_cdf = torch.where(ok, cdf, hi_cdf)
            hi_sp = torch.where(ok, sparsity(ev), hi_sp)
            hi_err = torch.where(ok, err, hi_err)
        better = (hi_sp > best_sp) | ((hi_sp == best_sp) & (hi_err < best_err))
        best_sim = torch.where(better, sim, best_sim)
        best_cdf = torch.where(better, hi_cdf, best_cdf)
        best_sp = torch.where(better, hi_sp, best_sp)
        best_err = torch.where(better, hi_err, best_err)

    # ---- dense marking (PV reset included) ------------------------------------------------------
    is_sparse = (best_sp >= config.sparsity_floor) & (best_sp > 0)
    floored = bool(is_sparse.any()) and below_layer_floor(best_sp, is_sparse, config)
    if floored:
        logger.info("%d sparse heads skip %.1f%% of the layer's blocks, below the layer floor "
                    "%g: the layer is calibrated dense", int(is_sparse.sum()),
                    100 * float(torch.where(is_sparse, best_sp, 0.0).mean()),
                    config.layer_sparsity_floor)
        is_sparse = torch.zeros_like(is_sparse)
    return finish_layer(run, torch.where(is_sparse, best_sim, ones),
                        torch.where(is_sparse, best_cdf, ones), is_sparse,
                        torch.full((num_heads,), budget.pv_l1, **f32), budget, floored)


def below_layer_floor(head_sparsity: torch.Tensor, is_sparse: torch.Tensor,
                      config: SearchConfig) -> bool:
    """Whether the sparse heads together (dense ones at 0) skip less than the layer floor."""
    # NOTE: measured (docs/PERFORMANCE.md, "End to end at real models' geometries"): with every
    # block kept the sparse path costs 5-8% of a layer's attention time (the predictor, the kept
    # blocks' tables); a layer breaks even at about 12% block sparsity at 32K, 6% at 128K
    return float(torch.where(is_sparse, head_sparsity, 0.0).mean()) < config.layer_sparsity_floor


def finish_layer(run: Runner, sim: torch.Tensor, cdf: torch.Tensor, is_sparse: torch.Tensor,
                 pv_budget: torch.Tensor, budget: LayerBudget, floored: bool) -> LayerResult:
    """Stage 2 (the smallest ``pvthreshd`` per sparse head whose error stays within its
    ``pv_budget``) and the final measurement of the chosen setting, as a :class:`LayerResult`.
    ``sim``/``cdf``: the stage-1 setting (1 for dense heads)."""
    config, num_heads = run.config, int(sim.shape[0])
    pv_off = torch.full((num_heads,), PV_SKIP_OFF, dtype=torch.float32)
    lo, hi = torch.zeros(num_heads, dtype=torch.float32), pv_off.clone()
    pv_steps = config.pv_steps if bool(is_sparse.any()) else 0
    run.skip(config.pv_steps - pv_steps)  # no sparse head: nothing to search
    for _ in range(pv_steps):
        mid = (lo + hi) / 2
        _, err = run(sim, cdf, torch.where(is_sparse, mid, pv_off))
        ok = (err <= pv_budget) & is_sparse
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    pv = torch.where(is_sparse, hi, pv_off)

    ev, err = run(sim, cdf, pv)
    over = is_sparse & (err > pv_budget)
    if bool(over.any()):
        raise RuntimeError(
            f"evaluator {run.evaluator.name!r} is not deterministic: heads "
            f"{torch.nonzero(over).flatten().tolist()} exceed their budget with settings measured "
            "as passing; calibrate with a deterministic evaluator"
        )
    # dense heads were never measured: their error is the evaluator's own floor (rounding)
    floor = (~is_sparse) & (err > budget.l1)
    if bool(floor.any()):
        logger.warning(
            "dense heads %s have error %.3g without skipping anything (the %s evaluator's "
            "rounding), above the l1 budget %g: the budget is too tight to skip any block",
            torch.nonzero(floor).flatten().tolist(), float(err[floor].max()), run.evaluator.name,
            budget.l1,
        )
    valid = ev.valid.sum(0).double().clamp_min(1)
    pv_skip = None if ev.pv_skipped is None else (ev.pv_skipped.sum(0) / valid).float()
    return LayerResult(
        simthreshd1=sim,
        cdfthreshd=cdf,
        pvthreshd=pv,
        is_sparse=is_sparse,
        sparsity=sparsity(ev),
        pv_skip=pv_skip,
        error=err,
        sample_errors=ev.error(config.rule).float(),
        budget=budget,
        rule=config.rule,
        evaluations=run.done,
        floored=floored,
    )


def search_layers(
    layer_samples: Sequence[Sequence[Sample]],
    scales: Sequence[float],
    evaluator: Evaluator,
    budgets: Sequence[LayerBudget],
    config: SearchConfig | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
) -> list[LayerResult]:
    """:func:`search_layer` for every layer; ``on_step(layer, done, total)`` reports progress."""
    if not len(layer_samples) == len(scales) == len(budgets):
        raise ValueError(
            f"{len(layer_samples)} layers of samples, {len(scales)} scales, {len(budgets)} budgets"
        )
    results = []
    for i, (samples, scale, budget) in enumerate(zip(layer_samples, scales, budgets, strict=True)):
        step = None if on_step is None else (lambda d, t, i=i: on_step(i, d, t))
        results.append(search_layer(samples, scale, evaluator, budget, config, step))
    return results


def dense_layer_result(num_heads: int, budget: LayerBudget, rule: str,
                       window: bool = False) -> LayerResult:
    """A layer written dense without a search (every head: simthreshd1 1, cdfthreshd 1, pvthreshd
    PV_SKIP_OFF, is_sparse 0), e.g. a sliding-window layer (``window``), which the backend serves
    dense with its window."""
    f32 = dict(dtype=torch.float32)
    zeros = torch.zeros(num_heads, **f32)
    return LayerResult(
        simthreshd1=torch.ones(num_heads, **f32),
        cdfthreshd=torch.ones(num_heads, **f32),
        pvthreshd=torch.full((num_heads,), PV_SKIP_OFF, **f32),
        is_sparse=torch.zeros(num_heads, dtype=torch.bool),
        sparsity=zeros,
        pv_skip=None,
        error=zeros.clone(),
        sample_errors=torch.zeros(0, num_heads, **f32),
        budget=budget,
        rule=rule,
        window=window,
    )


def stack_results(results: Sequence[LayerResult]) -> dict[str, torch.Tensor]:
    """``[num_layers, num_heads]`` tensors in the thresholds file's dtypes."""
    return {
        "simthreshd1": torch.stack([r.simthreshd1 for r in results]).float(),
        "cdfthreshd": torch.stack([r.cdfthreshd for r in results]).float(),
        "pvthreshd": torch.stack([r.pvthreshd for r in results]).float(),
        "is_sparse": torch.stack([r.is_sparse for r in results]).to(torch.uint8),
    }
