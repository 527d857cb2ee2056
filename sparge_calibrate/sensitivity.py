"""Layer sensitivity (``--layer-sensitivity``): the model-wide allocation's budget moved between
layers by how much each layer's attention error changes the model's output.

The allocation (``allocate.py``) counts a unit of relative L1 error the same in every layer.
Layers differ: on Gemma 3 270M at 32K, its l1 0.05 allocation served in the last
full-attention layer alone (62% of that layer's blocks skipped) moves the next-token
distribution by 0.0001 nats of mean KL against dense, in the first alone (50% skipped) by 0.004
(docs/PERFORMANCE.md). Here

1. the allocation at a reference budget (the middle candidate) is served one searched layer at
   a time, every other layer dense, through the model on calibration prompts: each layer's mean
   KL against dense, ``kl_l`` (a dense pass and one pass per layer);
2. each layer's KL is modelled as ``c_l * e_l ** 2``, ``e_l`` its heads' mean error (dense heads
   0): a small change of the attention output moves the logits linearly, the KL quadratically;
3. per candidate budget, every layer takes a point of its *frontier* (the allocation within the
   layer alone at budgets from ``l1 / LAYER_BUDGET_RANGE`` to ``l1 * LAYER_BUDGET_RANGE``, its
   unweighted choice, or dense) so that the layers together skip the most blocks while their
   modelled KL stays within that of the unweighted allocation at the same budget (one price
   over all layers, as in ``allocate.py``). The range bounds how far the model is extrapolated;
   the held-out report (``--report``) measures what the file really costs.

The written file records each layer's moved budget (``l1_budget``, ``pv_l1_budget``, the PV
margin scaled with it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .allocate import Choice, LayerCurves, allocate_group, at_points, point_settings
from .search import LayerBudget, SearchConfig

__all__ = ["LADDER_POINTS", "LAYER_BUDGET_RANGE", "Frontier", "coefficients", "frontier",
           "layer_settings", "measure", "middle", "reweight"]

LAYER_BUDGET_RANGE = 4.0
"""How far a layer's budget may move from the candidate's, either way (a factor)."""
LADDER_POINTS = 17
"""Budgets of a layer's frontier, evenly spaced in log over that range (a factor 1.19 apart)."""

Setting = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Frontier:
    """One layer's options for one candidate: each a within-layer allocation."""

    budgets: list[float]  # the layer budget of each option (0.0: dense)
    choices: list[Choice]
    sparsity: torch.Tensor  # [E] fp64 mean block sparsity over the layer's heads (dense 0)
    error: torch.Tensor  # [E] fp64 mean error over the layer's heads (dense 0)


def _mean_at(choice: Choice, values: torch.Tensor) -> float:
    return float(at_points(choice.point, values).double().mean())


def frontier(curves: LayerCurves, l1: float, unweighted: Choice,
             config: SearchConfig) -> Frontier:
    """The options of one layer at candidate budget ``l1``: dense, its unweighted choice (the
    allocation over all layers), and the within-layer allocation at ``LADDER_POINTS`` budgets
    from ``l1 / LAYER_BUDGET_RANGE`` to ``l1 * LAYER_BUDGET_RANGE``."""
    h = curves.num_heads
    budgets = [0.0, l1]
    choices = [Choice(torch.full((h,), -1)), unweighted]
    for b in torch.logspace(-math.log10(LAYER_BUDGET_RANGE), math.log10(LAYER_BUDGET_RANGE),
                            LADDER_POINTS, dtype=torch.float64).tolist():
        budgets.append(l1 * b)
        choices.append(allocate_group([curves], l1 * b, config)[0])
    sp = torch.tensor([_mean_at(c, curves.sparsity) for c in choices], dtype=torch.float64)
    err = torch.tensor([_mean_at(c, curves.error) for c in choices], dtype=torch.float64)
    return Frontier(budgets, choices, sp, err)


def layer_settings(curves: dict[int, LayerCurves], choices: dict[int, Choice],
                   num_layers: int) -> dict[int, Setting]:
    """Per searched layer with a sparse head: ``(sim, cdf, pv)`` ``[num_layers, num_heads]``
    serving that layer's choice alone, every other layer dense (PV skip off)."""
    from sparge_serve.kernels.geometry import PV_SKIP_OFF

    out = {}
    for i, choice in choices.items():
        point = choice.point
        if not bool((point >= 0).any()):
            continue
        h = curves[i].num_heads
        sim, cdf = torch.ones(num_layers, h), torch.ones(num_layers, h)
        sim[i], cdf[i] = point_settings(curves[i], point)
        out[i] = (sim, cdf, torch.full((num_layers, h), PV_SKIP_OFF))
    return out


def coefficients(kl: dict[int, float], curves: dict[int, LayerCurves],
                 choices: dict[int, Choice]) -> dict[int, float]:
    """Each searched layer's ``c_l = kl_l / e_l ** 2`` from its measured KL at ``choices``; a
    layer dense there (nothing measured) takes the largest measured ``c``, the cautious guess.
    Empty when no layer was measured."""
    c = {i: max(kl[i], 1e-12) / max(_mean_at(choices[i], curves[i].error) ** 2,
                                    1e-12) for i in kl}
    if not c:
        return {}
    worst = max(c.values())
    return {i: c.get(i, worst) for i in curves}


def reweight(curves: dict[int, LayerCurves], budgets: dict[int, LayerBudget],
             unweighted: dict[int, Choice], coeff: dict[int, float],
             config: SearchConfig) -> tuple[dict[int, Choice], dict[int, LayerBudget]]:
    """One candidate's choices and layer budgets moved by sensitivity (module docstring): the
    most blocks skipped (heads x sparsity summed over layers) for a modelled KL at most the
    unweighted allocation's. ``budgets``: the candidate's per-layer budgets (every layer's
    frontier is centred on its own)."""
    layers = sorted(curves)
    fronts = {i: frontier(curves[i], budgets[i].l1, unweighted[i], config) for i in layers}
    gain = {i: fronts[i].sparsity * curves[i].num_heads for i in layers}
    cost = {i: coeff[i] * fronts[i].error ** 2 for i in layers}
    limit = sum(float(cost[i][1]) for i in layers) * (1 + 1e-9)

    def pick(price: float) -> dict[int, int]:
        return {i: int((gain[i] - price * cost[i]).argmax()) for i in layers}

    def total(p: dict[int, int], of: dict[int, torch.Tensor]) -> float:
        return sum(float(of[i][p[i]]) for i in layers)

    lo, hi = -12.0, 12.0
    if total(pick(10.0**lo), cost) <= limit:
        hi = lo
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if total(pick(10.0**mid), cost) <= limit else (mid, hi)
    best = pick(10.0**hi)
    if total(best, cost) > limit or total(best, gain) < total({i: 1 for i in layers}, gain):
        best = {i: 1 for i in layers}  # the unweighted allocation, always within the limit
    ratio = {i: budgets[i].pv_l1 / budgets[i].l1 for i in layers}
    out_budgets = {}
    for i in layers:
        b = fronts[i].budgets[best[i]] if best[i] >= 2 else budgets[i].l1
        out_budgets[i] = LayerBudget(b, b * ratio[i])
    return {i: fronts[i].choices[best[i]] for i in layers}, out_budgets


def measure(measure_kl: Callable[[dict[str, Setting]], dict[str, float]],
            curves: dict[int, LayerCurves], choices: dict[int, Choice],
            num_layers: int) -> dict[int, float]:
    """Each searched layer's mean KL against dense with ``choices`` served in it alone
    (``measure_kl``: named settings to their mean KL, e.g. ``hf_driver.quality_report``)."""
    settings = layer_settings(curves, choices, num_layers)
    got = measure_kl({f"layer {i}": s for i, s in settings.items()})
    return {i: got[f"layer {i}"] for i in settings}


def middle(values: Sequence[float]) -> int:
    """Index of the reference candidate: the middle one (the lower of two)."""
    return (len(values) - 1) // 2
