"""Offline calibration of per-head SpargeAttn thresholds (``sparge-calibrate``).

The import package ``sparge_calibrate`` (a top-level ``calibrate`` package would collide with
other distributions); modules here import each other relatively. Nothing in ``sparge_serve``
imports this package.

- ``search``: the threshold search over captured Q/K/V (library API, capture-independent);
- ``evaluators``: error oracles (CPU reference, CUDA serving kernels);
- ``hf_driver``: capture with transformers + the held-out quality report;
- ``vllm_driver``: capture through ``vllm.LLM`` with the SPARGE backend (GPU);
- ``prompts``, ``summary``, ``cli``: prompt files, human-readable output, the command line.
"""

from .search import (
    DEFAULT_SIM_GRID,
    ERROR_RULES,
    Evaluation,
    Evaluator,
    LayerBudget,
    LayerResult,
    Sample,
    SearchConfig,
    search_layer,
    search_layers,
)

__all__ = [
    "DEFAULT_SIM_GRID",
    "ERROR_RULES",
    "Evaluation",
    "Evaluator",
    "LayerBudget",
    "LayerResult",
    "Sample",
    "SearchConfig",
    "search_layer",
    "search_layers",
]
