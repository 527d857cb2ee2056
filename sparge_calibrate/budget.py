"""The error budget of a calibration: the one given (``--l1``, ``--pv-l1``, per-layer budgets) or
the largest of several candidates whose thresholds keep held-out perplexity within a target of
dense (``--ppl-target``; +0.5% by default when ``--report`` gives held-out prompts and no budget
is given). Without held-out prompts and with no budget given: ``l1`` 0.005.

One good budget differs between models and context lengths: with the model-wide allocation, a
mean l1 of 0.005 costs SmolLM2-135M +0.07% at 4K (25% block sparsity) and 0.02 costs it +0.9%,
while 0.05 costs Gemma 3 270M's full-attention layers at 32K +0.17% (53%); docs/PERFORMANCE.md,
"The algorithm on a real model". A perplexity target states what a user wants; the budget that
meets it is then measured per model: the prompts are captured once, every candidate is
allocated on that capture (``--allocation model``: on one grid measurement; ``head``: one search
each), and one held-out pass per candidate measures its perplexity.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from .arguments import DEFAULT_L1, PV_RATIO, _layer_budgets
from .search import LayerBudget

DEFAULT_PPL_TARGET = 0.005
"""The perplexity target when ``--report`` is given and no budget flag is: +0.5% of dense."""
DEFAULT_CANDIDATES = (0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1)
"""``--budgets``' default: ``l1`` budgets about 1.5x apart, from quality-first to past the one
that holds +0.5% on Gemma 3 at 32K; a step costs SmolLM2 at 4K about 5 points of sparsity
(docs/PERFORMANCE.md). With the model-wide allocation a candidate costs one allocation and one
held-out pass, not a search."""


@dataclass(frozen=True)
class Candidate:
    """One budget to calibrate at: its global ``l1`` / ``pv_l1`` and each layer's."""

    l1: float
    pv_l1: float
    layers: list[LayerBudget]

    @property
    def name(self) -> str:
        return f"l1 {self.l1:g}"


def candidates(parser: argparse.ArgumentParser, args: argparse.Namespace,
               num_layers: int) -> list[Candidate]:
    """The given budget alone, or with a perplexity target one :class:`Candidate` per
    ``--budgets`` value (ascending), whose PV budget keeps ``--pv-l1 / --l1``'s ratio."""
    if args.ppl_target is None:
        return [Candidate(args.l1, args.pv_l1, _layer_budgets(parser, args, num_layers))]
    ratio = args.pv_l1 / args.l1
    out = []
    for l1 in sorted(set(args.budgets)):
        scaled = argparse.Namespace(**{**vars(args), "l1": l1, "pv_l1": l1 * ratio})
        out.append(Candidate(l1, l1 * ratio, _layer_budgets(parser, scaled, num_layers)))
    return out


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Settle the budget arguments in ``args``, ``parser.error`` for combinations that cannot
    work. With ``--report`` and no budget flag (``--l1``, ``--pv-l1``, ``--layer-l1``,
    ``--layer-pv-l1``) the budget is chosen by held-out perplexity, within ``--ppl-target`` or
    :data:`DEFAULT_PPL_TARGET`; a budget flag, or no ``--report``, fixes it unless
    ``--ppl-target`` is given. ``l1`` defaults to :data:`DEFAULT_L1` and ``pv_l1`` to
    :data:`PV_RATIO` times ``l1`` (with a target, their ratio is each candidate's)."""
    given = [flag for flag, value in (("--l1", args.l1), ("--pv-l1", args.pv_l1),
                                      ("--layer-l1", args.layer_l1),
                                      ("--layer-pv-l1", args.layer_pv_l1)) if value]
    if args.ppl_target is None and args.report is not None and not given:
        args.ppl_target = DEFAULT_PPL_TARGET
    if args.ppl_target is None and (args.budgets is not None or args.keep_candidates):
        flag = "--budgets" if args.budgets is not None else "--keep-candidates"
        parser.error(f"{flag} is for the candidates of --ppl-target: give --ppl-target and "
                     "--report (or calibrate one budget with --l1)")
    args.l1 = DEFAULT_L1 if args.l1 is None else args.l1
    if args.pv_l1 is None:
        args.pv_l1 = args.l1 * PV_RATIO
        if args.pv_l1 > 1.0:
            parser.error(f"--l1 {args.l1:g}: the PV budget ({PV_RATIO:g} x --l1 unless --pv-l1 "
                         "is given) must stay at most 1: give --pv-l1")
    if args.pv_l1 <= args.l1:
        parser.error(f"--pv-l1 ({args.pv_l1:g}) must exceed --l1 ({args.l1:g}): the PV skip adds "
                     "error on top of the block selection")
    if args.ppl_target is None:
        return
    if not 0.0 < args.ppl_target < 1.0:
        parser.error(f"--ppl-target {args.ppl_target:g} must be in (0, 1): the held-out "
                     "perplexity rise allowed, e.g. 0.005 for +0.5%")
    if args.report is None:
        parser.error("--ppl-target needs --report HELDOUT_FILE: the budget is chosen by the "
                     "perplexity of held-out prompts")
    if args.layer_l1 or args.layer_pv_l1:
        parser.error("--ppl-target chooses one budget for every layer: drop --layer-l1 and "
                     "--layer-pv-l1 (or calibrate with them and no target)")
    if args.budgets is None:
        args.budgets = list(DEFAULT_CANDIDATES)
    worst = max(args.budgets) * args.pv_l1 / args.l1
    if worst >= 1.0:
        parser.error(f"--budgets {max(args.budgets):g}: its PV budget ({worst:g}, --pv-l1 / --l1 "
                     "times it) must stay below 1")


def candidate_paths(args: argparse.Namespace) -> dict[float, str]:
    """``--keep-candidates``' files by candidate ``l1``: ``STEM.l1_X.safetensors`` next to
    ``--out`` (none without the flag)."""
    if not args.keep_candidates:
        return {}
    stem = args.out.removesuffix(".safetensors")
    return {l1: f"{stem}.l1_{l1:g}.safetensors" for l1 in sorted(set(args.budgets))}


def perplexity_rise(row) -> float:
    """A quality row's held-out perplexity over dense, minus 1 (0.005: +0.5%), on its worst
    prompt: a budget must hold the target on every held-out prompt, not only on their pooled
    tokens, where a long or easy prompt can hide another's loss."""
    return max(row.perplexity / row.dense_perplexity - 1.0, row.worst_rise)


def choose(cands: Sequence[Candidate], rise: dict[str, float], target: float) -> tuple[int, bool]:
    """Index of the largest budget whose held-out perplexity rise (``rise``, by candidate name:
    :func:`perplexity_rise` of its quality row) is at most ``target``, and whether any met it
    (if none did: the smallest budget, the most accurate)."""
    met = [i for i, c in enumerate(cands) if rise[c.name] <= target]
    return (max(met, key=lambda i: cands[i].l1), True) if met else (0, False)


__all__ = ["DEFAULT_CANDIDATES", "DEFAULT_PPL_TARGET", "Candidate", "candidate_paths", "candidates",
           "choose", "perplexity_rise", "resolve"]
