"""``sparge-calibrate``'s argument types and the per-layer error budgets they describe."""

from __future__ import annotations

import argparse
import math
import re

import torch

from .search import LayerBudget

__all__ = ["DEFAULT_L1", "PV_RATIO", "parse_layer_spec"]

DEFAULT_L1 = 0.005
PV_RATIO = 1.5
"""``--pv-l1`` when not given: this times the stage-1 budget (each ``--ppl-target`` candidate's)."""
# NOTE: the fixed default budget (no --report) keeps held-out perplexity well within +0.5% of
# dense on the pretrained models measured (docs/PERFORMANCE.md, "The algorithm on a real model"):
# on SmolLM2-135M at 4K, the model-wide allocation at l1 0.005 / 0.01 / 0.02 skips 24.8% / 31.3%
# / 38.9% of the blocks at +0.07% / +0.31% / +0.89% (+0.17% / +0.63% / +1.50% on the worst of
# two other documents). Relative L1 is a proxy whose perplexity cost differs by model and
# length (l1 0.05 costs SmolLM2 at 4K +2.4%, Gemma 3 270M at 32K +0.17%), so with held-out
# prompts (`--report`) the budget is chosen by perplexity (budget.resolve).

_SPEC = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*:\s*([^:\s]+)\s*$")


def parse_layer_spec(text: str) -> tuple[int, int, float]:
    """``"A-B:X"`` or ``"A:X"`` -> ``(A, B, X)`` (inclusive layer range, budget); ``ValueError``."""
    m = _SPEC.match(text)
    if not m:
        raise ValueError(f"{text!r} is not LAYERS:BUDGET (e.g. 0-5:0.04 or 3:0.05)")
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) is not None else first
    try:
        value = float(m.group(3))
    except ValueError:
        raise ValueError(f"{text!r}: budget {m.group(3)!r} is not a number") from None
    if last < first:
        raise ValueError(f"{text!r}: layer range {first}-{last} is empty (write the lower first)")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{text!r}: budget must be a positive number")
    if value > 1:
        raise ValueError(f"{text!r}: budget must be at most 1 (a relative error)")
    return first, last, value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _budget(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    # NOTE: the thresholds file only holds budgets in (0, 1]; refuse others before the search
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} must be at most 1 (a relative error)")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be in [0, 1)")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _layer_spec(text: str) -> tuple[int, int, float]:
    try:
        return parse_layer_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _layer_budgets(parser, args, num_layers: int) -> list[LayerBudget]:
    def expand(specs, flag):
        values: dict[int, float] = {}
        for first, last, value in specs:
            if last >= num_layers:
                parser.error(f"{flag} {first}-{last}:{value:g}: layer {last} is out of range (the "
                             f"model has {num_layers} layers, 0-{num_layers - 1})")
            for layer in range(first, last + 1):
                if layer in values:
                    parser.error(f"{flag}: layer {layer} is given more than one budget")
                values[layer] = value
        return values

    l1 = expand(args.layer_l1, "--layer-l1")
    pv = expand(args.layer_pv_l1, "--layer-pv-l1")
    margin = args.pv_l1 - args.l1
    budgets = []
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))
    for layer in range(num_layers):
        layer_l1 = l1.get(layer, args.l1)
        layer_pv = pv.get(layer, layer_l1 + margin if layer in l1 else args.pv_l1)
        if layer_pv > 1:
            parser.error(f"layer {layer}: PV budget {layer_pv:g} (its --layer-l1 budget plus the "
                         "global margin --pv-l1 minus --l1) is above 1; give it a --layer-pv-l1")
        # NOTE: compared as stored in the file (float32), so that the file validates
        if f32(layer_pv) <= f32(layer_l1):
            parser.error(f"layer {layer}: PV budget {layer_pv:g} must exceed its l1 budget "
                         f"{layer_l1:g} (check --layer-pv-l1 / --layer-l1 / --pv-l1)")
        budgets.append(LayerBudget(layer_l1, layer_pv))
    return budgets
