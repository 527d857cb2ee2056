"""The exported ``sparge_*`` series: names, HELP texts, label values and histogram buckets.

Shared by the counters (``sparge_serve.metrics.stats``) and their export
(``sparge_serve.metrics.export``); the package docstring says what each series means.
"""

from __future__ import annotations

import enum
import math

# Seconds; one layer's attention call for a short prompt is ~1e-4 s, a 128K prefill layer ~1 s.
TIME_BUCKETS: tuple[float, ...] = (
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5,
    math.inf,
)


class FallbackReason(enum.StrEnum):
    """Why a prefill attention call ran dense (the ``reason`` label; a closed set)."""

    SHORT_PROMPT = "short_prompt"  # the request's context is below the sparse minimum length
    # every head of this layer is dense in the thresholds file, or a sliding-window layer
    DENSE_LAYER = "dense_layer"
    MODE_DENSE = "mode_dense"  # the configuration forces dense attention
    UNSUPPORTED = "unsupported"  # a feature the sparse kernels do not handle (logged once)


THRESHOLDS_INFO_LABELS: tuple[str, ...] = ("file", "sha256", "l1", "pv_l1", "created")

# name, HELP. Counters are named without "_total" here, as prometheus_client stores them.
BLOCK_COUNTERS = (
    ("sparge_attention_blocks_valid",
     "Causally valid (query block, key block) pairs seen by the sparse prefill path, "
     "summed over query heads."),
    ("sparge_attention_blocks_computed",
     "Valid (query block, key block) pairs kept by the SpargeAttn predictor (QK^T computed)."),
    ("sparge_pv_blocks_skipped",
     "Computed (query block, key block) pairs whose softmax and P.V were skipped by the PV test."),
)
TOKENS = ("sparge_prompt_tokens",
           "Prompt tokens whose attention in this layer ran on the sparse or the dense path "
           "(one count per token per layer).")
FALLBACKS = ("sparge_dense_fallbacks",
              "Prefill attention calls (one per request chunk and layer) that ran dense instead "
              "of sparse, by reason.")
ATTENTION_HISTOGRAM = ("sparge_sparse_attention_seconds",
              "GPU time of one layer's sparse prefill attention call (predictor + kernel), "
              "sampled.")
PREDICTOR_HISTOGRAM = ("sparge_predictor_seconds",
              "GPU time of the SpargeAttn block predictor within the sampled sparse calls.")
THRESHOLDS_INFO = ("sparge_thresholds_info", "The SpargeAttn thresholds file in use (value 1).")
PATHS = ("sparse", "dense")
