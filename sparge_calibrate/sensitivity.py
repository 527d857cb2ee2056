"""Layer sensitivity (``--layer-sensitivity``): the model-wide allocation's budget moved between
layers by how much each layer's attention error changes the model's output.

The allocation (``allocate.py``) counts a unit of relative L1 error the same in every layer.
Layers differ: on Gemma 3 270M at 32K, its l1 0.05 allocation served in the last
full-attention layer alone (62% of that layer's blocks skipped) moves the next-token
distribution by 0.0001 nats of mean KL against dense, in the first alone (50% skipped) by 0.004
(docs/PERFORMANCE.md). Per candidate budget (``apply``):

1. the candidate's allocation is served one searched layer at a time, every other layer dense,
   through the model on calibration prompts: each layer's mean KL against dense, ``kl_l`` (one
   pass per sparse layer and candidate, and one dense pass for all);
2. each layer's KL is modelled as ``c_l * e_l ** 2``, ``e_l`` its heads' mean error (dense heads
   0): a small change of the attention output moves the logits linearly, the KL quadratically.
   The fit is the candidate's own: fitted at one budget, the model misjudges a budget twice as
   large (SmolLM2 at 4K);
3. every layer takes a point of its *frontier* (the allocation within the layer alone at budgets
   from ``l1 / LAYER_BUDGET_RANGE`` to ``l1 * LAYER_BUDGET_RANGE``, its unweighted choice, or
   dense) so that the layers together skip the most blocks while their modelled KL stays within
   that of the unweighted allocation (one price over all layers, as in ``allocate.py``);
4. the moved and the unweighted allocation are each served in every layer at once on the same
   prompts (two passes per candidate): the moved one is kept only if its measured KL is at most
   the unweighted one's, which checks the model's two assumptions (quadratic, and additive over
   layers) where they are used.

The held-out report (``--report``) measures what the file costs on other text. The written
file records each layer's moved budget (``l1_budget``, ``pv_l1_budget``, the PV margin scaled
with it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .allocate import Choice, LayerCurves, allocate_group, at_points, point_settings
from .search import LayerBudget, SearchConfig

__all__ = ["LADDER_POINTS", "LAYER_BUDGET_RANGE", "Frontier", "Moved", "apply", "coefficients",
           "frontier", "layer_settings", "model_settings", "reweight"]

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


def model_settings(curves: dict[int, LayerCurves], choices: dict[int, Choice],
                   num_layers: int) -> Setting:
    """``(sim, cdf, pv)`` ``[num_layers, num_heads]`` serving ``choices`` in their layers, every
    other layer dense (PV skip off)."""
    from sparge_serve.kernels.geometry import PV_SKIP_OFF

    h = next(iter(curves.values())).num_heads
    sim, cdf = torch.ones(num_layers, h), torch.ones(num_layers, h)
    for i, choice in choices.items():
        sim[i], cdf[i] = point_settings(curves[i], choice.point)
    return sim, cdf, torch.full((num_layers, h), PV_SKIP_OFF)


def layer_settings(curves: dict[int, LayerCurves], choices: dict[int, Choice],
                   num_layers: int) -> dict[int, Setting]:
    """Per searched layer with a sparse head: the settings serving that layer's choice alone."""
    return {i: model_settings(curves, {i: c}, num_layers) for i, c in choices.items()
            if bool((c.point >= 0).any())}


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


@dataclass(frozen=True)
class Moved:
    """What ``apply`` measured for one candidate (KLs in nats, on the calibration prompts)."""

    layer_kl: dict[int, float]  # each sparse layer's KL served alone
    unweighted_kl: float  # the unweighted allocation in every layer (nan: nothing to compare)
    moved_kl: float  # the moved allocation in every layer (nan: not measured)
    kept: bool  # the moved budgets were written


def apply(measure_kl: Callable[[dict[str, Setting]], dict[str, float]], names: Sequence[str],
          curves: dict[int, LayerCurves], choices: list[dict[int, Choice]],
          budgets: list[dict[int, LayerBudget]], config: SearchConfig,
          num_layers: int) -> list[Moved]:
    """Move every candidate's budget between layers (module docstring), ``choices`` and
    ``budgets`` in place. ``measure_kl``: named settings to their mean KL against dense (e.g.
    ``hf_driver.quality_report``), called twice: every layer alone, then the checks."""
    alone = {}
    for name, choice in zip(names, choices, strict=True):
        for i, s in layer_settings(curves, choice, num_layers).items():
            alone[f"{name} layer {i}"] = s
    got = measure_kl(alone) if alone else {}
    moved, checks = [], {}
    for name, choice, budget in zip(names, choices, budgets, strict=True):
        kl = {i: got[f"{name} layer {i}"] for i in curves if f"{name} layer {i}" in got}
        coeff = coefficients(kl, curves, choice)
        new = reweight(curves, budget, choice, coeff, config) if coeff else (choice, budget)
        moved.append((kl, *new))
        if any(not torch.equal(new[0][i].point, choice[i].point) for i in curves):
            checks[f"{name} unweighted"] = model_settings(curves, choice, num_layers)
            checks[f"{name} moved"] = model_settings(curves, new[0], num_layers)
    checked = measure_kl(checks) if checks else {}
    out = []
    for k, (name, (kl, new_choice, new_budget)) in enumerate(zip(names, moved, strict=True)):
        before = checked.get(f"{name} unweighted", math.nan)
        after = checked.get(f"{name} moved", math.nan)
        kept = after <= before  # nan (nothing moved) compares false
        if kept:
            choices[k], budgets[k] = new_choice, new_budget
        out.append(Moved(kl, before, after, kept))
    return out
