"""Model-wide allocation of the error budget over heads (``--allocation model``, the default).

The per-head search (``search.search_layer``, ``--allocation head``) holds every head to the
same error. Heads differ in what a unit of error buys: a head whose attention is concentrated
skips most of its blocks for little error, a diffuse one pays a lot for a few blocks. Here the
budget bounds the *mean* error over the heads of the layers that share it (dense heads count 0),
and each head takes the setting that maximises ``sparsity - price * error``, with one ``price``
for all of them: the allocation that skips the most blocks for that mean error (a Lagrangian
relaxation over each head's measured points). Measured on SmolLM2-135M at 4K, at equal block
sparsity it costs a half to two thirds of the per-head search's held-out perplexity rise
(docs/PERFORMANCE.md).

1. :func:`layer_curves`: every head of a layer measured at every point of a grid
   (``simthreshd1`` in ``sim_grid`` x ``cdfthreshd`` at ``cdf_points`` values of
   ``u = -log10(1 - cdf)`` in ``[CDF_U_GRID_MIN, CDF_U_GRID_MAX]``): one evaluator call per
   point for all heads, independent of the budget, so every candidate budget reuses it;
2. :func:`allocate`: per group of layers with the same ``l1`` budget, the price at which the
   group's mean error meets the budget (bisection; the error can only fall as the price rises).
   Points skipping less than ``sparsity_floor`` are not candidates (the head stays dense), and a
   layer whose heads together skip less than ``layer_sparsity_floor`` is made dense, its share
   of the budget going to the other layers;
3. :func:`layer_result`: the chosen points as a :class:`~.search.LayerResult`; with the PV
   search on, each sparse head then gets the smallest ``pvthreshd`` that adds at most
   ``pv_l1 - l1`` to its own error (``search.finish_layer``), which needs the layer's samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sparge_serve.kernels.geometry import PV_SKIP_OFF

from .search import (
    Evaluator,
    LayerBudget,
    LayerResult,
    Runner,
    Sample,
    SearchConfig,
    below_layer_floor,
    cdf_from_u,
    check_samples,
    finish_layer,
    sparsity,
)

__all__ = ["CDF_U_GRID_MAX", "CDF_U_GRID_MIN", "Choice", "LayerCurves", "allocate",
           "allocate_group", "at_points", "cdf_grid", "layer_curves", "layer_result",
           "point_settings"]

CDF_U_GRID_MIN = 0.25
CDF_U_GRID_MAX = 4.5
"""The ``u = -log10(1 - cdfthreshd)`` range of the grid: cdfthreshd 0.44 to 0.99997. The per-head
search's choices on SmolLM2 and Gemma 3 (4K-32K, l1 0.005-0.1) lie between u 0.9 and 4.2."""


def cdf_grid(points: int) -> torch.Tensor:
    """``points`` cdfthreshd values, evenly spaced in ``u`` (fp32, as stored in the file)."""
    u = torch.linspace(CDF_U_GRID_MIN, CDF_U_GRID_MAX, points, dtype=torch.float64)
    return cdf_from_u(u)


@dataclass(frozen=True)
class LayerCurves:
    """Every head of one layer measured at every grid point ``p`` (stage 1, PV skip off)."""

    sim: torch.Tensor  # [P] fp32 simthreshd1 of each point
    cdf: torch.Tensor  # [P] fp32 cdfthreshd of each point
    sparsity: torch.Tensor  # [P, H] fp32 fraction of valid blocks skipped, over all samples
    error: torch.Tensor  # [P, H] fp32 error aggregated over samples (rule, quantile)
    sample_errors: torch.Tensor  # [P, S, H] fp32 error per sample

    @property
    def num_heads(self) -> int:
        return int(self.sparsity.shape[1])


def layer_curves(samples: Sequence[Sample], scale: float, evaluator: Evaluator,
                 config: SearchConfig, on_step: Callable[[int, int], None] | None = None,
                 prepared: Any = None) -> LayerCurves:
    """Measure every head of one layer at every grid point (one evaluator call a point)."""
    num_heads, _, _ = check_samples(samples)
    if prepared is None:
        prepared = evaluator.prepare(samples, scale)
    run = Runner(evaluator, prepared, config, config.grid_evaluations, on_step)
    pv_off = torch.full((num_heads,), PV_SKIP_OFF, dtype=torch.float32)
    grid = cdf_grid(config.cdf_points).tolist()
    sims, cdfs, sps, errs, sample_errs = [], [], [], [], []
    for s in config.sim_grid:
        for c in grid:
            sim = torch.full((num_heads,), float(s), dtype=torch.float32)
            cdf = torch.full((num_heads,), c, dtype=torch.float32)
            ev, err = run(sim, cdf, pv_off)
            sims.append(float(s))
            cdfs.append(c)
            sps.append(sparsity(ev))
            errs.append(err)
            sample_errs.append(ev.error(config.rule).float())
    return LayerCurves(torch.tensor(sims, dtype=torch.float32),
                       torch.tensor(cdfs, dtype=torch.float32), torch.stack(sps),
                       torch.stack(errs).float(), torch.stack(sample_errs))


@dataclass(frozen=True)
class Choice:
    """Each head's grid point in one layer (-1: dense) and whether the layer floor made it
    dense."""

    point: torch.Tensor  # [H] int64
    floored: bool = False


def _pick(curves: LayerCurves, price: float, floor: float) -> torch.Tensor:
    """Each head's best point at ``price`` (-1 = dense, whose score is 0)."""
    score = curves.sparsity - price * curves.error
    score = torch.where(curves.sparsity >= max(floor, 1e-9), score, -math.inf)
    best, point = score.max(0)
    return torch.where(best > 0, point, -1)


def point_settings(curves: LayerCurves, point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(simthreshd1, cdfthreshd)`` ``[H]`` at each head's point, 1 (dense) where it is -1."""
    dense = point < 0
    return (torch.where(dense, 1.0, curves.sim[point.clamp_min(0)]),
            torch.where(dense, 1.0, curves.cdf[point.clamp_min(0)]))


def at_points(point: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values [P, ..., H]`` at each head's point (``[..., H]``), 0 for dense heads."""
    got = values.gather(0, point.clamp_min(0).expand(values.shape[1:])[None])[0]
    return torch.where(point >= 0, got, 0.0)


def allocate_group(curves: Sequence[LayerCurves], l1: float,
                    config: SearchConfig) -> list[Choice]:
    heads = sum(c.num_heads for c in curves)
    floored = [False] * len(curves)

    def choose(price: float) -> list[torch.Tensor]:
        return [torch.full((c.num_heads,), -1) if f else _pick(c, price, config.sparsity_floor)
                for c, f in zip(curves, floored, strict=True)]

    def mean_error(points: list[torch.Tensor]) -> float:
        return sum(float(at_points(p, c.error).sum()) for c, p in zip(curves, points,
                                                                   strict=True)) / heads

    while True:
        # the smallest price (the most sparsity) whose mean error meets the budget, on a log scale
        lo, hi = -12.0, 12.0  # log10(price); at 10^12 every head is dense (error 0)
        if mean_error(choose(10.0**lo)) <= l1:
            hi = lo
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if mean_error(choose(10.0**mid)) <= l1 else (mid, hi)
        points = choose(10.0**hi)
        newly = [i for i, (c, p) in enumerate(zip(curves, points, strict=True))
                 if not floored[i] and bool((p >= 0).any())
                 and below_layer_floor(at_points(p, c.sparsity), p >= 0, config)]
        if not newly:
            return [Choice(p, f) for p, f in zip(points, floored, strict=True)]
        for i in newly:  # dense now: their share of the budget goes to the other layers
            floored[i] = True


def allocate(curves: Sequence[LayerCurves], budgets: Sequence[LayerBudget],
             config: SearchConfig) -> list[Choice]:
    """Each layer's :class:`Choice`: the layers sharing an ``l1`` budget hold their mean error
    (over all their heads, dense ones at 0) within it, with the most blocks skipped."""
    if len(curves) != len(budgets):
        raise ValueError(f"{len(curves)} layers of curves, {len(budgets)} budgets")
    out: list[Choice | None] = [None] * len(curves)
    for l1 in sorted({b.l1 for b in budgets}):
        group = [i for i, b in enumerate(budgets) if b.l1 == l1]
        for i, choice in zip(group, allocate_group([curves[i] for i in group], l1, config),
                             strict=True):
            out[i] = choice
    return out  # type: ignore[return-value]


def layer_result(curves: LayerCurves, choice: Choice, budget: LayerBudget, config: SearchConfig,
                 run: Runner | None = None) -> LayerResult:
    """The chosen points as a :class:`LayerResult`. With ``config.pv_steps`` and a sparse head,
    ``run`` (a :class:`~.search.Runner` over this layer's samples) runs the PV search and the
    final measurement; otherwise the result comes from the curves, with no evaluator call."""
    point, h = choice.point, curves.num_heads
    is_sparse = point >= 0
    f32 = dict(dtype=torch.float32)
    sim, cdf = point_settings(curves, point)
    error = at_points(point, curves.error)
    if config.pv_steps and bool(is_sparse.any()):
        if run is None:
            raise ValueError("the PV search needs the layer's samples: pass run")
        # each sparse head may add the budgets' margin to its own stage-1 error
        return finish_layer(run, sim, cdf, is_sparse, error + (budget.pv_l1 - budget.l1),
                            budget, choice.floored)
    return LayerResult(
        simthreshd1=sim, cdfthreshd=cdf, pvthreshd=torch.full((h,), PV_SKIP_OFF, **f32),
        is_sparse=is_sparse, sparsity=at_points(point, curves.sparsity), pv_skip=None,
        error=error, sample_errors=at_points(point, curves.sample_errors), budget=budget,
        rule=config.rule, evaluations=config.grid_evaluations, floored=choice.floored,
    )
