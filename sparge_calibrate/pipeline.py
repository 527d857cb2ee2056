"""Capture and search every candidate budget of a calibration (``sparge-calibrate``'s core).

Layers are captured ``--layers-per-pass`` at a time (all in one pass by default); sliding-window
layers run dense when served, so they are neither captured nor searched. Each captured layer is
prepared for the evaluator once and serves every candidate budget:

- ``--allocation model``: each layer is measured on the grid once (``allocate.layer_curves``),
  every candidate budget is allocated over all layers' curves (``allocate.allocate``), and the
  PV search, if on, then runs per layer on the samples (kept from a single pass, captured again
  with several passes); ``--layer-sensitivity`` first moves the budget between layers by each
  layer's measured effect on the model's output (``sensitivity.py``);
- ``--allocation head``: each layer is searched per candidate (``search.search_layer``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

import torch

from .search import LayerResult, SearchConfig

__all__ = ["search_candidates"]

logger = logging.getLogger("sparge_calibrate")


def search_candidates(args: argparse.Namespace, info: Any, cands: Sequence[Any],
                      prompts: Sequence[Sequence[int]], config: SearchConfig, dtype: torch.dtype,
                      model: Any) -> tuple[list[dict[int, LayerResult]], Any]:
    """Per candidate budget, the searched layers' results (by layer index); and the evaluator
    (``None`` if every layer is windowed: nothing was captured)."""
    searched = [i for i in range(info.num_layers) if i not in info.window_layers]
    per_pass = args.layers_per_pass or max(len(searched), 1)
    passes = [searched[i : i + per_pass] for i in range(0, len(searched), per_pass)]
    state: dict[str, Any] = dict(evaluator=None, kl=None)
    if args.layer_sensitivity:
        state["kl"] = _kl_measurer(args, info, prompts, dtype, model, state)

    def capture(group: list[int]):
        from tqdm import tqdm

        only = None if len(passes) == 1 and not info.window_layers else group
        desc = "capturing" + ("" if only is None else f" layers {group[0]}-{group[-1]}")
        with tqdm(total=len(prompts), unit="prompt", desc=desc, disable=args.quiet) as bar:
            step = lambda _p: bar.update(1)  # noqa: E731
            if args.driver == "vllm":
                from .vllm_driver import capture_vllm

                cap = capture_vllm(args.model_dir, prompts,
                                   dtype=str(dtype).removeprefix("torch."),
                                   tensor_parallel_size=args.tensor_parallel_size,
                                   on_prompt=step, layers=only)
            else:
                from .hf_driver import capture_hf

                cap = capture_hf(args.model_dir, prompts, args.device, dtype, model=model,
                                 on_prompt=step, layers=only)
        if state["evaluator"] is None:
            from .evaluators import make_evaluator

            state["evaluator"] = make_evaluator(args.device)
            logger.info("measuring errors with the %s evaluator (%d evaluations per layer%s)",
                        state["evaluator"].name, config.evaluations_per_layer,
                        " and budget" if config.allocation == "head" else "")
        return cap

    def release() -> None:
        if args.driver == "vllm":  # the next pass starts a new engine
            from .vllm_driver import _free_gpu_memory

            _free_gpu_memory()

    search = _search_head if config.allocation == "head" else _search_model
    found = search(args, info, cands, config, passes, capture, release, state)
    return found, state["evaluator"]


def _kl_measurer(args, info, prompts, dtype, model, state):
    """``measure_kl(settings) -> {name: mean KL}`` on the first ``--sensitivity-prompts``
    calibration prompts (one pass per setting and prompt, transformers on ``--device``; the
    dense passes, made by the first call, are kept for the next)."""
    dense: dict = {}

    def measure_kl(settings):
        from .hf_driver import quality_report

        some = prompts[: args.sensitivity_prompts]
        logger.info("layer sensitivity: %d settings on %d prompts (%d passes)", len(settings),
                    len(some), len(some) * len(settings) + len(some) - len(dense))
        rows = quality_report(args.model_dir, some, settings, state["evaluator"], args.device,
                              dtype, model=model, progress=not args.quiet, dense_hidden=dense)
        return {r.name: r.mean_kl for r in rows}

    return measure_kl


def _bar(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="head", desc=desc, disable=quiet)


def _progress(bar, heads: int):
    """An ``on_step(done, total)`` that advances ``bar`` by ``heads`` over one call's total."""
    start = bar.n

    def on_step(done: int, total: int) -> None:
        bar.update(start + (heads * done) // total - bar.n)

    return on_step


def _search_head(args, info, cands, config, passes, capture, release, state):
    from . import search

    heads = info.num_heads
    found: list[dict[int, LayerResult]] = [{} for _ in cands]
    for group in passes:
        cap = capture(group)
        desc = "searching" + (f" {len(cands)} budgets" if len(cands) > 1 else "")
        with _bar(len(group) * heads * len(cands), desc, args.quiet) as bar:
            for i in group:
                bar.set_postfix_str(f"layer {i}")
                prepared = state["evaluator"].prepare(cap.layers[i], cap.scales[i])
                for cand, results in zip(cands, found, strict=True):
                    results[i] = search.search_layer(
                        cap.layers[i], cap.scales[i], state["evaluator"], cand.layers[i], config,
                        _progress(bar, heads), prepared)
                del prepared
        del cap
        release()
    return found


def _search_model(args, info, cands, config, passes, capture, release, state):
    from . import allocate, search

    heads = info.num_heads
    curves: dict[int, allocate.LayerCurves] = {}
    kept = None  # a single pass's capture, kept for the PV search
    pv = config.pv_steps > 0
    for group in passes:
        cap = capture(group)
        with _bar(len(group) * heads, "measuring the grid", args.quiet) as bar:
            for i in group:
                bar.set_postfix_str(f"layer {i}")
                curves[i] = allocate.layer_curves(cap.layers[i], cap.scales[i],
                                                  state["evaluator"], config,
                                                  _progress(bar, heads))
        if pv and len(passes) == 1:
            kept = cap
        del cap
        release()

    layers = sorted(curves)
    choices = [dict(zip(layers, allocate.allocate([curves[i] for i in layers],
                                                  [c.layers[i] for i in layers], config),
                        strict=True)) for c in cands]
    budgets = [{i: c.layers[i] for i in layers} for c in cands]
    if state["kl"] is not None:
        _sensitivity(info, cands, curves, choices, budgets, config, state["kl"])
    found: list[dict[int, LayerResult]] = [{} for _ in cands]
    if not pv:
        for choice, budget, results in zip(choices, budgets, found, strict=True):
            for i in layers:
                results[i] = allocate.layer_result(curves[i], choice[i], budget[i], config)
        return found
    steps = config.pv_steps + 1
    for group in passes:
        cap = kept if kept is not None else capture(group)
        desc = "PV search" + (f" {len(cands)} budgets" if len(cands) > 1 else "")
        with _bar(len(group) * heads * len(cands), desc, args.quiet) as bar:
            for i in group:
                bar.set_postfix_str(f"layer {i}")
                prepared = state["evaluator"].prepare(cap.layers[i], cap.scales[i])
                for choice, budget, results in zip(choices, budgets, found, strict=True):
                    run = search.Runner(state["evaluator"], prepared, config, steps,
                                        _progress(bar, heads))
                    results[i] = allocate.layer_result(curves[i], choice[i], budget[i],
                                                       config, run)
                    run.skip(steps - run.done)  # a layer with no sparse head: no PV search
                del prepared
        del cap
        kept = None
        release()
    return found


def _sensitivity(info, cands, curves, choices, budgets, config, measure_kl) -> None:
    """Move each candidate's budget between layers by measured sensitivity (in place)."""
    from . import sensitivity

    names = [c.name for c in cands]
    got = sensitivity.apply(measure_kl, names, curves, choices, budgets, config, info.num_layers)
    for name, m in zip(names, got, strict=True):
        logger.info("layer sensitivity at %s (mean KL of each layer served alone): %s", name,
                    ", ".join(f"{i}: {v:.2e}" for i, v in sorted(m.layer_kl.items())) or "none")
        if m.moved_kl == m.moved_kl:  # measured
            logger.info("layer sensitivity at %s: moved budgets %s (mean KL %.2e, unweighted "
                        "%.2e)", name, "kept" if m.kept else "dropped", m.moved_kl,
                        m.unweighted_kl)
