"""Capture Q/K/V through the serving engine: ``vllm.LLM`` with the SPARGE backend (GPU only).

The backend reports every sparse-path prefill to the sink of ``sparge_serve.backend.capture``
(see that module for the exact contract), so the captured Q/K/V are exactly what serving sees: vLLM's
RoPE, GQA layout, dtype and chunked prefill (a chunk is a sample whose queries are the last ``Lq``
positions of its context, which the search handles). vLLM is imported lazily.

Limits (by design of this first version):

- tensor parallel size 1: the sink lives in this process, so the engine must run in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here; the single-GPU executor is in-process). Per-rank
  tuning under tensor parallelism would install the sink and run the search inside each worker
  (``LLM.collective_rpc``); not implemented.
- captures are copied to host memory: a layer of ``Hq`` heads, ``Hkv`` KV heads and head dim ``D``
  takes ``(Hq + 2*Hkv) * D * 2`` bytes per token (bf16), e.g. 32 layers x 8 prompts x 16K tokens of
  a Llama-3-8B geometry need ~50 GB of RAM.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Sequence

import torch

from .hf_driver import Capture, model_info
from .search import Sample

__all__ = ["capture_vllm"]

logger = logging.getLogger(__name__)


def capture_vllm(
    model_dir: str,
    prompts: Sequence[Sequence[int]],
    *,
    dtype: str = "auto",
    attention_backend: str = "SPARGE",
    gpu_memory_utilization: float = 0.5,
    on_prompt: Callable[[int], None] | None = None,
    **llm_kwargs,
) -> Capture:
    """Run each prompt (1 generated token) through ``vllm.LLM`` and collect the backend's captures.

    ``gpu_memory_utilization`` is kept low so the search can use the rest of the GPU afterwards
    (the engine is deleted before returning, but vLLM does not always give all memory back).
    """
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        raise ValueError(
            "the vLLM capture needs the engine in this process: unset "
            "VLLM_ENABLE_V1_MULTIPROCESSING (or set it to 0)"
        )
    overrides = [v for v in ("SPARGE_MODE", "SPARGE_MIN_SPARSE_LEN", "SPARGE_MIN_SPARSE_QUERY_LEN")
                 if os.environ.get(v)]
    if overrides:
        raise ValueError(
            f"unset {' and '.join(overrides)}: the capture needs every prefill on the sparse path "
            "(the driver sets min_sparse_len=1 and min_sparse_query_len=1), and these environment "
            "variables override it"
        )
    if int(llm_kwargs.get("tensor_parallel_size", 1)) != 1:
        raise ValueError("the vLLM capture supports tensor_parallel_size=1 only")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from sparge_serve.backend import capture

    info = model_info(model_dir)
    longest = max(len(p) for p in prompts)
    llm = LLM(
        model=model_dir,
        attention_backend=attention_backend,
        dtype=dtype,
        tensor_parallel_size=1,
        # NOTE: eager: the sink copies to the host inside forward (no CUDA graphs around it);
        # no prefix caching: every prompt is prefilled in full; one prompt per step, unchunked
        enforce_eager=True,
        enable_prefix_caching=False,
        max_model_len=longest + 1,
        max_num_seqs=1,
        max_num_batched_tokens=max(longest, 2048),
        gpu_memory_utilization=gpu_memory_utilization,
        # every prefill takes the sparse path (and so reaches the sink), however short
        additional_config={"sparge": {"min_sparse_len": 1, "min_sparse_query_len": 1}},
        **llm_kwargs,
    )
    layers: list[list[Sample]] = [[] for _ in range(info.num_layers)]
    scales: list[float | None] = [None] * info.num_layers
    seen: list[set[int]] = [set() for _ in range(info.num_layers)]
    current = -1

    def sink(layer_idx: int, q, k, v, cinfo) -> None:
        if not 0 <= layer_idx < info.num_layers:
            raise RuntimeError(f"capture sink got layer {layer_idx} ({cinfo.layer_name!r}); the "
                               f"model has {info.num_layers} layers")
        if q.shape[1] != info.num_heads or k.shape[1] != info.num_kv_heads:
            raise RuntimeError(
                f"layer {layer_idx}: captured {q.shape[1]} query / {k.shape[1]} KV heads, the "
                f"model has {info.num_heads} / {info.num_kv_heads}"
            )
        layers[layer_idx].append(Sample(*(t.to("cpu", copy=True) for t in (q, k, v))))
        scales[layer_idx] = cinfo.scale
        seen[layer_idx].add(current)

    params = SamplingParams(max_tokens=1, temperature=0.0)
    try:
        with capture.sink_installed(sink):
            for p, ids in enumerate(prompts):
                current = p
                llm.generate([TokensPrompt(prompt_token_ids=list(ids))], params, use_tqdm=False)
                if on_prompt is not None:
                    on_prompt(p)
    finally:
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    missing = [i for i in range(info.num_layers) if len(seen[i]) != len(prompts)]
    if missing:
        raise RuntimeError(
            f"layers {missing[:8]}{'...' if len(missing) > 8 else ''} were not captured for every "
            f"prompt. The {attention_backend} backend must call "
            "sparge_serve.backend.capture.emit_prefill(...) for every prefill while a sink is "
            "installed (and run in this process: tensor_parallel_size=1)"
        )
    return Capture(layers, [float(s) for s in scales], [len(p) for p in prompts])
