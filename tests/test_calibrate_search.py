"""The threshold search core on synthetic heads with known structure (CPU, reference evaluator)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from sparge_calibrate.evaluators import ReferenceEvaluator
from sparge_calibrate.search import (
    Evaluation,
    LayerBudget,
    Sample,
    SearchConfig,
    aggregate_errors,
    check_samples,
    output_errors,
    search_layer,
    search_layers,
    skippable_blocks,
    stack_results,
)
from sparge_serve.kernels.geometry import PV_SKIP_OFF
from sparge_serve.reference import dense_causal_attention_ref, sparge_attention_ref
from sparge_serve.thresholds import Thresholds

D = 64
SCALE = 1.0 / math.sqrt(D)
BUDGET = LayerBudget(0.06, 0.07)
# small but real search: two grid points ("all similar" and 0.5), 6 + 4 bisection steps
FAST = SearchConfig(sim_grid=(-1.0, 0.5), cdf_steps=6, pv_steps=4, allocation="head")
RULES = ["l1", "cosine", "rmse"]


def local_sink_head(length: int, g: torch.Generator, sharp: float, sink: float = 11.0):
    """One head whose attention is, by construction, a local window plus an attention sink.

    q_i . k_j * scale = sharp * c(i - j) + sink * [j == 0] with c(0) = 1 and c decaying with |i - j|
    (a mix of slow rotations, like RoPE), plus small noise. Keys and queries vary slowly with the
    position, so blocks are self-similar and pooled scores predict the local blocks.
    """
    m = (D - 2) // 2
    freqs = 2 * math.pi / torch.logspace(math.log10(256), math.log10(8 * length), m)
    ang = torch.arange(length, dtype=torch.float32)[:, None] * freqs[None]
    u = torch.cat([ang.cos(), ang.sin()], -1) / math.sqrt(m)
    q, k = torch.zeros(length, D), torch.zeros(length, D)
    q[:, : 2 * m] = u * sharp / SCALE
    k[:, : 2 * m] = u
    q[:, -1] = sink / SCALE
    k[0, -1] = 1.0
    q += 0.02 * torch.randn(length, D, generator=g) / SCALE
    k += 0.02 * torch.randn(length, D, generator=g)
    return q, k, torch.randn(length, D, generator=g)


def uniform_head(length: int, g: torch.Generator):
    """Near-uniform attention (tiny random queries): every key block matters."""
    return (0.01 * torch.randn(length, D, generator=g), torch.randn(length, D, generator=g),
            torch.randn(length, D, generator=g))


def make_layer(kinds, lengths=(1024, 896), seed=0, kv_heads=None):
    """Samples of one layer; ``kinds`` per query head: a sharpness (local + sink) or "uniform".

    With ``kv_heads`` < len(kinds) (GQA), query head h uses KV head h // group: the KV tensors come
    from the first query head of each group, the other heads of the group reuse them with their own
    queries (a query built for another head's keys is still local: all heads share the geometry).
    """
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or len(kinds)
    group = len(kinds) // kv_heads
    samples = []
    for length in lengths:
        heads = [uniform_head(length, g) if kind == "uniform" else local_sink_head(length, g, kind)
                 for kind in kinds]
        q = torch.stack([h[0] for h in heads], 1)
        k = torch.stack([heads[i * group][1] for i in range(kv_heads)], 1)
        v = torch.stack([heads[i * group][2] for i in range(kv_heads)], 1)
        samples.append(Sample(q, k, v))
    return samples


def recheck(samples, res, rule="l1"):
    """Errors of the calibrated thresholds recomputed with the reference, independently of the
    evaluator's bookkeeping: ``[S, H]``."""
    rows = []
    for s in samples:
        out = sparge_attention_ref(s.q, s.k, s.v, SCALE, res.simthreshd1, res.cdfthreshd,
                                   res.pvthreshd).out
        ref = dense_causal_attention_ref(s.q, s.k, s.v, SCALE)
        rows.append(output_errors(out, ref)[["l1", "cosine", "rmse"].index(rule)])
    return torch.stack(rows)


@pytest.fixture(scope="module")
def structured():
    samples = make_layer([6.0, 10.0, "uniform", 14.0])
    return samples, search_layer(samples, SCALE, ReferenceEvaluator(), BUDGET, FAST)


def test_local_sink_heads_get_high_sparsity_uniform_head_dense(structured):
    _, res = structured
    assert res.is_sparse.tolist() == [True, True, False, True]
    # 1024-token prompt: at most 50% of the valid blocks are skippable (sink, diagonal, tail)
    assert (res.sparsity[[0, 1, 3]] >= 0.3).all(), res.sparsity
    # dense head: exactly dense, PV skip reset
    assert (res.simthreshd1[2].item(), res.cdfthreshd[2].item(), res.pvthreshd[2].item()) == (
        1.0, 1.0, PV_SKIP_OFF)
    assert res.sparsity[2].item() == 0.0


def test_error_within_budget_on_every_sample(structured):
    samples, res = structured
    assert res.sample_errors.shape == (len(samples), 4)
    assert (res.sample_errors[:, res.is_sparse] <= BUDGET.pv_l1).all()
    errs = recheck(samples, res)
    assert (errs[:, res.is_sparse] <= BUDGET.pv_l1 + 1e-6).all(), errs
    assert (errs[:, ~res.is_sparse] < 1e-5).all()
    # stage 1 alone met the tighter l1 budget
    stage1 = [sparge_attention_ref(s.q, s.k, s.v, SCALE, res.simthreshd1, res.cdfthreshd).out
              for s in samples]
    for s, out in zip(samples, stage1, strict=True):
        l1 = output_errors(out, dense_causal_attention_ref(s.q, s.k, s.v, SCALE))[0]
        assert (l1 <= BUDGET.l1 + 1e-6).all()


def test_thresholds_are_valid_file_values(structured):
    _, res = structured
    t = stack_results([res, res])
    th = Thresholds(**t, num_kv_heads=4, head_dim=D)  # validates ranges and dense-head rules
    assert th.num_layers == 2 and th.num_heads == 4


def test_lockstep_equals_per_head_search():
    samples = make_layer([8.0, "uniform", 12.0, 5.0], lengths=(768,), seed=1, kv_heads=2)
    together = search_layer(samples, SCALE, ReferenceEvaluator(), BUDGET, FAST)
    for h in range(4):
        kv = slice(h // 2, h // 2 + 1)
        alone = search_layer([Sample(s.q[:, h : h + 1], s.k[:, kv], s.v[:, kv]) for s in samples],
                             SCALE, ReferenceEvaluator(), BUDGET, FAST)
        for name in ("simthreshd1", "cdfthreshd", "pvthreshd", "sparsity"):
            torch.testing.assert_close(getattr(alone, name)[0], getattr(together, name)[h],
                                       rtol=0, atol=1e-6, msg=f"head {h} {name}")
        assert alone.is_sparse[0] == together.is_sparse[h]
    assert together.evaluations == FAST.evaluations_per_layer


@pytest.mark.parametrize("rule", RULES)
def test_rules_bound_their_own_metric(rule):
    samples = make_layer([8.0, "uniform"], lengths=(768,), seed=2)
    budget = LayerBudget(0.02, 0.03)
    res = search_layer(samples, SCALE, ReferenceEvaluator(), budget, SearchConfig(
        sim_grid=(-1.0,), cdf_steps=6, pv_steps=2, rule=rule))
    assert res.rule == rule
    assert res.is_sparse.tolist() == [True, False]
    assert (recheck(samples, res, rule)[:, 0] <= budget.pv_l1 + 1e-6).all()


def test_sparsity_floor_marks_heads_dense():
    samples = make_layer([8.0], lengths=(768,), seed=3)
    res = search_layer(samples, SCALE, ReferenceEvaluator(), BUDGET,
                       SearchConfig(sim_grid=(-1.0,), cdf_steps=4, pv_steps=2,
                                    sparsity_floor=0.99))
    assert not res.is_sparse[0]
    assert (res.cdfthreshd[0].item(), res.pvthreshd[0].item()) == (1.0, PV_SKIP_OFF)


def test_layer_sparsity_floor_marks_a_layer_dense():
    """A layer whose heads together skip less than ``layer_sparsity_floor`` (its dense heads
    counting 0) is written dense, PV skip off; just above its mean sparsity it stays sparse."""
    samples = make_layer([8.0, "uniform", "uniform"], lengths=(768,), seed=3)
    config = SearchConfig(sim_grid=(-1.0,), cdf_steps=4, pv_steps=2, layer_sparsity_floor=0.0,
                          allocation="head")
    free = search_layer(samples, SCALE, ReferenceEvaluator(), BUDGET, config)
    assert free.is_sparse.tolist() == [True, False, False]
    mean = float(free.sparsity[0]) / 3
    assert mean > 0.05
    kept = search_layer(samples, SCALE, ReferenceEvaluator(), BUDGET,
                        replace(config, layer_sparsity_floor=mean * 0.9))
    assert kept.is_sparse.tolist() == [True, False, False] and not kept.floored
    assert torch.equal(kept.cdfthreshd, free.cdfthreshd)
    steps = []
    dense = search_layer(samples, SCALE, ReferenceEvaluator(), BUDGET,
                         replace(config, layer_sparsity_floor=mean * 1.1),
                         on_step=lambda done, total: steps.append((done, total)))
    assert not dense.is_sparse.any() and dense.floored
    assert dense.cdfthreshd.tolist() == [1.0] * 3 and dense.simthreshd1.tolist() == [1.0] * 3
    assert dense.pvthreshd.tolist() == [PV_SKIP_OFF] * 3
    assert dense.sparsity.max() < 0.01  # only what no setting computes anyway
    # the PV search is skipped, the progress still ends at its total
    assert steps[-1][0] == steps[-1][1] == config.evaluations_per_layer


def test_quantile_aggregation():
    errs = torch.tensor([[0.1, 0.5], [0.2, 0.1], [0.9, 0.2], [0.3, 0.3]])
    assert aggregate_errors(errs, 1.0).tolist() == pytest.approx([0.9, 0.5])
    # "higher": an actual sample's error, never an interpolation below it
    assert aggregate_errors(errs, 0.5).tolist() == pytest.approx([0.3, 0.3])
    assert aggregate_errors(errs, 0.75).tolist() == pytest.approx([0.9, 0.5])


def test_output_errors_metrics():
    ref = torch.randn(10, 2, 8)
    out = ref.clone()
    out[:, 1] *= 1.1  # head 1: 10% too large everywhere
    l1, cos, rmse = output_errors(out, ref)
    assert l1[0] == 0 and rmse[0] == 0 and abs(cos[0]) < 1e-6
    assert l1[1].item() == pytest.approx(0.1, rel=1e-4)
    assert rmse[1].item() == pytest.approx(0.1, rel=1e-4)
    assert abs(cos[1]) < 1e-6  # a rescaled output has the same direction


class _CountingEvaluator(ReferenceEvaluator):
    def __init__(self):
        self.calls = 0

    def evaluate(self, prepared, sim, cdf, pv) -> Evaluation:
        self.calls += 1
        assert sim.shape == cdf.shape == pv.shape == (3,)
        return super().evaluate(prepared, sim, cdf, pv)


def test_one_evaluator_call_per_step_for_all_heads():
    samples = make_layer([8.0, "uniform", 12.0], lengths=(640,), seed=4)
    ev = _CountingEvaluator()
    config = SearchConfig(sim_grid=(-1.0, 0.5), cdf_steps=3, pv_steps=2, allocation="head")
    search_layer(samples, SCALE, ev, BUDGET, config)
    assert ev.calls == config.evaluations_per_layer == 2 * 3 + 2 + 1


def test_search_layers_budgets_and_progress():
    layer = make_layer([8.0], lengths=(640,), seed=5)
    seen = []
    config = SearchConfig(sim_grid=(-1.0,), cdf_steps=2, pv_steps=1)
    res = search_layers([layer, layer], [SCALE, SCALE], ReferenceEvaluator(),
                        [LayerBudget(0.01, 0.02), BUDGET], config,
                        on_step=lambda i, d, t: seen.append((i, d, t)))
    assert [r.budget.l1 for r in res] == [0.01, 0.06]
    assert seen[-1] == (1, 4, 4) and len(seen) == 8
    # a stricter budget never gives more sparsity on the same data
    assert res[0].sparsity[0] <= res[1].sparsity[0]
    with pytest.raises(ValueError, match="scales"):
        search_layers([layer], [SCALE, SCALE], ReferenceEvaluator(), [BUDGET], config)


def test_samples_too_short_or_malformed():
    g = torch.Generator().manual_seed(0)
    short = Sample(*(t[:, None] for t in uniform_head(128, g)))
    assert skippable_blocks(128, 128) == 0 and skippable_blocks(256, 256) == 0
    assert skippable_blocks(384, 384) == 1  # query block 1: key block 1 of 0-3
    # a chunk of the last 128 of 1024 positions is all tail; of the last 256, its first block
    # skips key blocks 1-11 of 0-13
    assert skippable_blocks(128, 1024) == 0 and skippable_blocks(256, 1024) == 11
    with pytest.raises(ValueError, match="at least 384 tokens"):
        check_samples([short])
    with pytest.raises(ValueError, match="no samples"):
        check_samples([])
    q, k = torch.zeros(300, 3, D), torch.zeros(300, 2, D)
    with pytest.raises(ValueError, match="KV heads"):
        check_samples([Sample(q, k, k)])
    with pytest.raises(ValueError, match="query length"):
        check_samples([Sample(torch.zeros(400, 2, D), k, k)])


@pytest.mark.parametrize("kwargs,match", [
    (dict(rule="kl"), "unknown error rule"),
    (dict(sim_grid=(1.5,)), "sim_grid"),
    (dict(cdf_steps=0), "cdf_steps"),
    (dict(sparsity_floor=1.0), "sparsity_floor"),
    (dict(layer_sparsity_floor=-0.1), "layer_sparsity_floor"),
    (dict(quantile=0.0), "quantile"),
])
def test_search_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchConfig(**kwargs)


@pytest.mark.parametrize("l1,pv,match", [(0.0, 0.1, "positive"), (0.06, 0.06, "exceed"),
                                         (float("nan"), 0.1, "positive")])
def test_budget_errors(l1, pv, match):
    with pytest.raises(ValueError, match=match):
        LayerBudget(l1, pv)


def _bf16(samples):
    return [Sample(*(t.to(torch.bfloat16) for t in (s.q, s.k, s.v))) for s in samples]


def test_kernel_evaluator_matches_reference(device):
    """The serving kernels as error oracle (Triton's interpreter without a GPU): same kept blocks
    as the reference, errors equal up to the kernels' bf16 output rounding."""
    from sparge_calibrate.evaluators import KernelEvaluator

    samples = _bf16(make_layer([8.0, "uniform", 12.0, 5.0], lengths=(640, 512), seed=1,
                               kv_heads=2))
    kern, ref = KernelEvaluator(device), ReferenceEvaluator()
    pk, pr = kern.prepare(samples, SCALE), ref.prepare(samples, SCALE)
    th = [torch.tensor(x) for x in ([-1.0, -1.0, 0.5, 0.5], [0.9, 0.99, 0.999, 0.9],
                                    [50.0, 2.0, 50.0, 3.0])]
    a, b = kern.evaluate(pk, *th), ref.evaluate(pr, *th)
    assert torch.equal(a.kept, b.kept) and torch.equal(a.valid, b.valid)
    assert a.pv_skipped is None and b.pv_skipped is not None
    for rule in RULES:
        torch.testing.assert_close(a.error(rule), b.error(rule), rtol=0, atol=1e-2)
    out, kept, valid = kern.sparse_attention(samples[1], SCALE, *th)
    assert out.shape == samples[1].q.shape and out.dtype == torch.bfloat16
    assert torch.equal(kept, b.kept[1]) and torch.equal(valid, b.valid[1])


@pytest.mark.gpu
def test_search_with_kernel_evaluator_on_gpu():
    from sparge_calibrate.evaluators import KernelEvaluator

    samples = _bf16(make_layer([6.0, 10.0, "uniform", 14.0]))
    res = search_layer(samples, SCALE, KernelEvaluator("cuda"), BUDGET)
    assert res.is_sparse[[0, 1]].all() and not res.is_sparse[2]
    assert (res.sample_errors[:, res.is_sparse] <= BUDGET.pv_l1).all()
    # the reference (fp32) agrees up to the kernels' bf16 rounding
    assert (recheck(samples, res) <= BUDGET.pv_l1 + 0.01).all()


@pytest.mark.parametrize("lq,lk", [(200, 200), (77, 300)])
def test_dense_attention_matches_reference(lq, lk):
    """The kernel evaluator's dense reference (fp32 SDPA, lower-right causal) = the oracle's."""
    from sparge_calibrate.evaluators import dense_attention

    g = torch.Generator().manual_seed(lq)
    q, k, v = (torch.randn(n, h, D, generator=g) for n, h in ((lq, 4), (lk, 2), (lk, 2)))
    torch.testing.assert_close(dense_attention(q, k, v, SCALE),
                               dense_causal_attention_ref(q, k, v, SCALE), rtol=1e-5, atol=1e-5)
