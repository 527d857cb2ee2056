"""Layer sensitivity (``sparge_calibrate.sensitivity``): the budget moved between layers by
measured KL, against brute force over every layer's options on small synthetic curves, and the
settings that serve one layer alone."""

from __future__ import annotations

import pytest
import torch

from sparge_calibrate.allocate import allocate
from sparge_calibrate.search import LayerBudget
from sparge_calibrate.sensitivity import (
    coefficients,
    frontier,
    layer_settings,
    measure,
    reweight,
)
from sparge_serve.kernels.geometry import PV_SKIP_OFF
from tests.test_calibrate_allocate import CONFIG, random_layers


def _setup(seed: int, layers: int = 3, l1: float = 0.02):
    cs = dict(enumerate(random_layers(seed, layers=layers, heads=3, points=6)))
    budgets = {i: LayerBudget(l1, 2 * l1) for i in cs}
    unweighted = dict(zip(cs, allocate(list(cs.values()), list(budgets.values()), CONFIG),
                          strict=True))
    return cs, budgets, unweighted


def _totals(cs, choices, coeff):
    """Heads x sparsity summed over layers, and the modelled KL, of per-layer choices."""
    gain = kl = 0.0
    for i, c in choices.items():
        pt = c.point
        sp = torch.where(pt >= 0, cs[i].sparsity.gather(0, pt.clamp_min(0)[None])[0], 0.0)
        err = torch.where(pt >= 0, cs[i].error.gather(0, pt.clamp_min(0)[None])[0], 0.0)
        gain += float(sp.sum())
        kl += coeff[i] * float(err.double().mean()) ** 2
    return gain, kl


@pytest.mark.parametrize("seed", range(6))
def test_reweight_skips_more_within_the_unweighted_kl(seed):
    cs, budgets, unweighted = _setup(seed)
    coeff = {0: 100.0, 1: 1.0, 2: 0.01}  # layer 0 sensitive, layer 2 nearly free
    choices, moved = reweight(cs, budgets, unweighted, coeff, CONFIG)
    gain, kl = _totals(cs, choices, coeff)
    gain0, kl0 = _totals(cs, unweighted, coeff)
    assert kl <= kl0 * (1 + 1e-6) and gain >= gain0 - 1e-6
    # brute force over the same options: no combination within the limit skips much more (the
    # price's choice lies on the options' convex hull, a small gap to the discrete optimum)
    fronts = [frontier(cs[i], budgets[i].l1, unweighted[i], CONFIG) for i in cs]
    cost = sum(coeff[i] * (f.error ** 2).reshape([-1 if j == i else 1 for j in cs])
               for i, f in enumerate(fronts))
    total = sum(3 * f.sparsity.reshape([-1 if j == i else 1 for j in cs])
                for i, f in enumerate(fronts))
    best = float(torch.where(cost <= kl0 * (1 + 1e-6), total, 0.0).max())
    assert gain >= best - 0.35, (gain, best)
    # budgets move with sensitivity, within the range, the PV margin scaled with them
    assert moved[2].l1 >= budgets[2].l1 >= moved[0].l1
    for i in cs:
        assert budgets[i].l1 / 4 - 1e-12 <= moved[i].l1 <= budgets[i].l1 * 4 + 1e-12
        assert moved[i].pv_l1 == pytest.approx(2 * moved[i].l1)


def test_equal_insensitive_layers_keep_the_unweighted_choice_or_better():
    cs, budgets, unweighted = _setup(11)
    choices, moved = reweight(cs, budgets, unweighted, {i: 1.0 for i in cs}, CONFIG)
    gain, kl = _totals(cs, choices, {i: 1.0 for i in cs})
    gain0, kl0 = _totals(cs, unweighted, {i: 1.0 for i in cs})
    assert kl <= kl0 * (1 + 1e-6) and gain >= gain0 - 1e-6


def test_coefficients_and_dense_layers():
    cs, budgets, unweighted = _setup(3)
    unweighted[1] = type(unweighted[1])(torch.full((3,), -1), True)  # layer 1 dense
    kl = {0: 0.004, 2: 0.0001}
    c = coefficients(kl, cs, unweighted)
    for i in (0, 2):
        pt = unweighted[i].point
        err = torch.where(pt >= 0, cs[i].error.gather(0, pt.clamp_min(0)[None])[0], 0.0)
        assert c[i] == pytest.approx(kl[i] / float(err.double().mean()) ** 2)
    assert c[1] == max(c[0], c[2])  # nothing measured: the cautious guess
    assert coefficients({}, cs, unweighted) == {}


def test_layer_settings_serve_one_layer_alone():
    cs, budgets, unweighted = _setup(5)
    settings = layer_settings(cs, unweighted, num_layers=5)
    seen = []

    def measure_kl(named):
        seen.extend(named)
        return {n: 0.01 for n in named}

    got = measure(measure_kl, cs, unweighted, num_layers=5)
    assert set(got) == set(settings) and seen == [f"layer {i}" for i in settings]
    for i, (sim, cdf, pv) in settings.items():
        assert sim.shape == cdf.shape == pv.shape == (5, 3)
        pt = unweighted[i].point
        others = [j for j in range(5) if j != i]
        assert (sim[others] == 1).all() and (cdf[others] == 1).all() and (pv == PV_SKIP_OFF).all()
        assert torch.equal(cdf[i], torch.where(pt >= 0, cs[i].cdf[pt.clamp_min(0)], 1.0))
        assert torch.equal(sim[i], torch.where(pt >= 0, cs[i].sim[pt.clamp_min(0)], 1.0))
