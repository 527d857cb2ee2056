"""Layer sensitivity (``sparge_calibrate.sensitivity``): the budget moved between layers by
measured KL, against brute force over every layer's options on small synthetic curves, and the
settings that serve one layer alone."""

from __future__ import annotations

import pytest
import torch

from sparge_calibrate.allocate import allocate
from sparge_calibrate.search import LayerBudget
from sparge_calibrate.sensitivity import (
    apply,
    coefficients,
    frontier,
    layer_settings,
    model_settings,
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
    assert set(settings) == {i for i, c in unweighted.items() if (c.point >= 0).any()}
    for i, (sim, cdf, pv) in settings.items():
        assert sim.shape == cdf.shape == pv.shape == (5, 3)
        pt = unweighted[i].point
        others = [j for j in range(5) if j != i]
        assert (sim[others] == 1).all() and (cdf[others] == 1).all() and (pv == PV_SKIP_OFF).all()
        assert torch.equal(cdf[i], torch.where(pt >= 0, cs[i].cdf[pt.clamp_min(0)], 1.0))
        assert torch.equal(sim[i], torch.where(pt >= 0, cs[i].sim[pt.clamp_min(0)], 1.0))
    sim, cdf, pv = model_settings(cs, unweighted, num_layers=5)
    for i in cs:
        assert torch.equal(cdf[i], settings[i][1][i]) and torch.equal(sim[i], settings[i][0][i])
    assert (sim[3:] == 1).all() and (cdf[3:] == 1).all() and (pv == PV_SKIP_OFF).all()


class _Model:
    """A stand-in for the model: the KL of served settings is ``sum_l c_l e_l ** power`` over
    the layers (``e_l``: the layer's mean error at the served cdf thresholds)."""

    def __init__(self, cs, c, power=2.0):
        self.cs, self.c, self.power, self.calls = cs, c, power, []

    def kl(self, cdf: torch.Tensor) -> float:
        total = 0.0
        for i, curves in self.cs.items():
            err = []
            for h in range(curves.num_heads):
                hit = (curves.cdf == cdf[i, h]).nonzero()
                err.append(float(curves.error[hit[0, 0], h]) if cdf[i, h] < 1 else 0.0)
            e = sum(err) / len(err)
            total += self.c[i] * e ** self.power
        return total

    def __call__(self, named):
        self.calls.append(list(named))
        return {n: self.kl(cdf) for n, (_sim, cdf, _pv) in named.items()}


def _candidates(seed, l1s=(0.01, 0.02, 0.04)):
    cs = dict(enumerate(random_layers(seed, layers=3, heads=3, points=6)))
    budgets = [{i: LayerBudget(l1, 1.5 * l1) for i in cs} for l1 in l1s]
    choices = [dict(zip(cs, allocate(list(cs.values()), list(b.values()), CONFIG), strict=True))
               for b in budgets]
    return cs, choices, budgets


@pytest.mark.parametrize("seed", range(4))
def test_apply_fits_each_candidate_and_keeps_what_measures_no_worse(seed):
    """Each candidate's layers are measured at that candidate's own allocation; under a
    quadratic, additive model the moved budgets measure within the unweighted KL and are kept,
    the reported KLs are the model's."""
    cs, choices, budgets = _candidates(seed)
    model = _Model(cs, {0: 100.0, 1: 1.0, 2: 0.01})
    before = [dict(c) for c in choices]
    got = apply(model, ["a", "b", "c"], cs, choices, budgets, CONFIG, num_layers=3)
    alone = model.calls[0]
    for name, old in zip("abc", before, strict=True):
        assert {n for n in alone if n.startswith(name)} == {
            f"{name} layer {i}" for i, c in old.items() if (c.point >= 0).any()}
    for m, old, new in zip(got, before, choices, strict=True):
        for i, v in m.layer_kl.items():
            assert v == pytest.approx(model.kl(model_settings(cs, {i: old[i]}, 3)[1]))
        if m.moved_kl == m.moved_kl:
            assert m.kept and m.moved_kl <= m.unweighted_kl * (1 + 1e-9)
            assert m.unweighted_kl == pytest.approx(model.kl(model_settings(cs, old, 3)[1]))
            assert m.moved_kl == pytest.approx(model.kl(model_settings(cs, new, 3)[1]))
        else:
            assert not m.kept and all(torch.equal(new[i].point, old[i].point) for i in cs)
    assert any(m.kept for m in got)


def test_apply_drops_moves_that_measure_worse():
    """Where a layer's KL grows faster than the square of its error, the quadratic model fitted
    at the unweighted allocation underrates the layers whose budget grows: the check finds the
    moved allocation worse and keeps the unweighted one."""
    for seed in range(20):
        cs, choices, budgets = _candidates(seed)
        model = _Model(cs, {0: 100.0, 1: 1.0, 2: 0.01}, power=3.0)
        before = [dict(c) for c in choices]
        old_budgets = [dict(b) for b in budgets]
        got = apply(model, ["a", "b", "c"], cs, choices, budgets, CONFIG, num_layers=3)
        dropped = [k for k, m in enumerate(got) if m.moved_kl > m.unweighted_kl]
        for k in dropped:
            assert not got[k].kept and budgets[k] == old_budgets[k]
            assert all(torch.equal(choices[k][i].point, before[k][i].point) for i in cs)
        if dropped:
            return
    pytest.fail("no seed gave a move that measures worse")
