"""Capture Q/K/V through the serving engine: ``vllm.LLM`` with the SPARGE backend (GPU only).

The backend reports every sparse-path prefill to the sink of ``sparge_serve.backend.capture``
(see that module for the exact contract), so the captured Q/K/V are exactly what serving sees: vLLM's
RoPE, GQA layout, dtype and chunked prefill (a chunk is a sample whose queries are the last ``Lq``
positions of its context, which the search handles). vLLM is imported lazily.

- Tensor parallel size 1: the engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
  set here; the single-GPU executor is in-process) and the sink copies each sample to host memory.
- Tensor parallel size N > 1: the GPU workers are separate processes. The engine gets the worker
  extension ``sparge_serve.backend.capture_worker`` (see there), each worker writes its heads of
  every sample as safetensors files under ``capture_dir/rank{R}`` (a temporary directory by
  default, removed afterwards), and :func:`merge_rank_captures` concatenates the ranks' heads into
  global head order (rank r holds query heads ``[r*Hq/N, (r+1)*Hq/N)`` and KV heads
  ``[r*Hkv/N, (r+1)*Hkv/N)``). Workers must share this host's file system (one node); KV heads
  replicated across ranks (``Hkv < N``) and pipeline parallelism are not supported.

Memory: captures end up in host memory: a layer of ``Hq`` heads, ``Hkv`` KV heads and head dim
``D`` takes ``(Hq + 2*Hkv) * D * 2`` bytes per token (bf16), e.g. 32 layers x 8 prompts x 16K tokens
of a Llama-3-8B geometry need ~50 GB of RAM. With N > 1 the same amount is first written to disk
(``$TMPDIR`` or ``capture_dir``; a tmpfs ``/tmp`` counts against RAM) and the merge holds one
sample's per-rank pieces on top of the merged capture. ``layers=`` captures only some layers (the
CLI's ``--layers-per-pass``: a pass per group of layers, each in a new engine).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Sequence

import torch

from sparge_serve.backend.capture_worker import (
    EXTENSION,
    parse_sample_name,
    rank_dir,
    read_sample,
)

from .hf_driver import Capture, ModelInfo, model_info
from .search import Sample

__all__ = ["capture_vllm", "merge_rank_captures"]

logger = logging.getLogger(__name__)


def capture_vllm(
    model_dir: str,
    prompts: Sequence[Sequence[int]],
    *,
    dtype: str = "auto",
    attention_backend: str = "SPARGE",
    gpu_memory_utilization: float = 0.5,
    tensor_parallel_size: int = 1,
    capture_dir: str | None = None,
    on_prompt: Callable[[int], None] | None = None,
    layers: Collection[int] | None = None,
    **llm_kwargs,
) -> Capture:
    """Run each prompt (1 generated token) through ``vllm.LLM`` and collect the backend's captures
    (with ``layers``, only those layers'; the others' lists stay empty, their scales 0).

    ``gpu_memory_utilization`` is kept low so the search can use the rest of the GPU afterwards
    (the engine is deleted before returning, but vLLM does not always give all memory back).
    With ``tensor_parallel_size`` > 1 the workers write their samples under ``capture_dir`` (which
    must be empty or absent, and is kept), or under a temporary directory that is removed.
    """
    overrides = [v for v in ("SPARGE_MODE", "SPARGE_MIN_SPARSE_LEN", "SPARGE_MIN_SPARSE_QUERY_LEN",
                             "SPARGE_THRESHOLDS", "SPARGE_DENSE_LAYERS") if os.environ.get(v)]
    if overrides:
        raise ValueError(
            f"unset {' and '.join(overrides)}: the capture needs every prefill of every layer on "
            "the sparse path (the driver sets min_sparse_len=1, min_sparse_query_len=1 and the "
            "untuned thresholds), and these environment variables override it"
        )
    tp = int(tensor_parallel_size)
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {tensor_parallel_size}")
    if int(llm_kwargs.get("pipeline_parallel_size", 1)) != 1:
        raise ValueError("the vLLM capture does not support pipeline parallelism; drop "
                         "pipeline_parallel_size (use tensor_parallel_size for several GPUs)")
    if tp == 1:
        if capture_dir is not None:
            raise ValueError("capture_dir is used with tensor_parallel_size > 1 only (with one "
                             "GPU the samples go straight to host memory)")
        return _capture_in_process(model_dir, prompts, dtype, attention_backend,
                                   gpu_memory_utilization, on_prompt, layers, llm_kwargs)
    return _capture_tensor_parallel(model_dir, prompts, dtype, attention_backend,
                                    gpu_memory_utilization, tp, capture_dir, on_prompt, layers,
                                    llm_kwargs)


def _engine_kwargs(prompts: Sequence[Sequence[int]], dtype: str, attention_backend: str,
                   gpu_memory_utilization: float, tp: int) -> dict:
    longest = max(len(p) for p in prompts)
    return dict(
        attention_backend=attention_backend,
        dtype=dtype,
        tensor_parallel_size=tp,
        # NOTE: eager: the sink copies to the host inside forward (no CUDA graphs around it);
        # no prefix caching: every prompt is prefilled in full; one prompt per step, unchunked
        enforce_eager=True,
        enable_prefix_caching=False,
        max_model_len=longest + 1,
        max_num_seqs=1,
        max_num_batched_tokens=max(longest, 2048),
        gpu_memory_utilization=gpu_memory_utilization,
        # every prefill of every layer takes the sparse path (and so reaches the sink), however
        # short: the untuned thresholds leave no layer dense
        additional_config={"sparge": {"thresholds": "untuned", "min_sparse_len": 1,
                                      "min_sparse_query_len": 1}},
    )


def _free_gpu_memory() -> None:
    """After ``del llm``: collect the engine and return cached GPU memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _capture_in_process(model_dir, prompts, dtype, attention_backend, gpu_memory_utilization,
                        on_prompt, layers, llm_kwargs) -> Capture:
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        raise ValueError(
            "the vLLM capture with tensor_parallel_size=1 needs the engine in this process: unset "
            "VLLM_ENABLE_V1_MULTIPROCESSING (or set it to 0)"
        )
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from sparge_serve.backend import capture

    info = model_info(model_dir)
    llm = LLM(model=model_dir,
              **_engine_kwargs(prompts, dtype, attention_backend, gpu_memory_utilization, 1),
              **llm_kwargs)
    captured: list[list[Sample]] = [[] for _ in range(info.num_layers)]
    scales: list[float | None] = [None] * info.num_layers
    seen: list[set[int]] = [set() for _ in range(info.num_layers)]
    keep = range(info.num_layers) if layers is None else frozenset(layers)
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
        if layer_idx not in keep:
            return
        captured[layer_idx].append(Sample(*(t.to("cpu", copy=True) for t in (q, k, v))))
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
        _free_gpu_memory()

    missing = [i for i in range(info.num_layers) if i in keep and len(seen[i]) != len(prompts)]
    if missing:
        raise RuntimeError(
            f"layers {_some(missing)} were not captured for every prompt. The {attention_backend} "
            "backend must call sparge_serve.backend.capture.emit_prefill(...) for every prefill "
            "while a sink is installed (and run in this process: tensor_parallel_size=1)"
        )
    return Capture(captured, [float(s or 0.0) for s in scales], [len(p) for p in prompts])


def _some(items: Sequence) -> str:
    return f"{list(items[:8])}{'...' if len(items) > 8 else ''}"


def _check_tp_geometry(info: ModelInfo, tp: int) -> None:
    if info.num_kv_heads < tp:
        raise ValueError(
            f"tensor_parallel_size {tp} exceeds the model's {info.num_kv_heads} KV heads: vLLM "
            "then replicates KV heads across ranks, which the capture does not support; use "
            f"tensor_parallel_size <= {info.num_kv_heads}"
        )
    if info.num_heads % tp or info.num_kv_heads % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide the model's {info.num_heads} "
                         f"query / {info.num_kv_heads} KV heads")


def _capture_tensor_parallel(model_dir, prompts, dtype, attention_backend, gpu_memory_utilization,
                             tp, capture_dir, on_prompt, layers, llm_kwargs) -> Capture:
    info = model_info(model_dir)
    _check_tp_geometry(info, tp)
    if capture_dir is None:
        root = tempfile.mkdtemp(prefix="sparge-capture-")
    else:
        root = os.path.abspath(capture_dir)
        if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
            raise ValueError(f"capture_dir {root} must be an empty directory or not exist yet")
        os.makedirs(root, exist_ok=True)
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        # NOTE: the workers write to this host's file system: keep them on this host ("mp")
        llm_kwargs = {"distributed_executor_backend": "mp", **llm_kwargs}
        llm = LLM(model=model_dir,
                  **_engine_kwargs(prompts, dtype, attention_backend, gpu_memory_utilization, tp),
                  worker_extension_cls=EXTENSION, **llm_kwargs)
        params = SamplingParams(max_tokens=1, temperature=0.0)
        try:
            llm.collective_rpc("sparge_capture_start",
                               args=(root, None if layers is None else sorted(layers)))
            for p, ids in enumerate(prompts):
                llm.collective_rpc("sparge_capture_set_prompt", args=(p,))
                llm.generate([TokensPrompt(prompt_token_ids=list(ids))], params, use_tqdm=False)
                if on_prompt is not None:
                    on_prompt(p)
            summaries = llm.collective_rpc("sparge_capture_stop")
        finally:
            del llm
            _free_gpu_memory()
        errors = [s["error"] for s in summaries if s.get("error")]
        if errors:
            raise RuntimeError("capture failed in the GPU workers: " + "; ".join(errors))
        logger.info("captured %.1f GB on %d ranks under %s; merging",
                    sum(s["bytes"] for s in summaries) / 1e9, len(summaries), root)
        return merge_rank_captures(root, tp_size=tp, num_layers=info.num_layers,
                                   num_prompts=len(prompts), num_heads=info.num_heads,
                                   num_kv_heads=info.num_kv_heads,
                                   num_tokens=[len(p) for p in prompts], layers=layers)
    finally:
        if capture_dir is None:
            shutil.rmtree(root, ignore_errors=True)


def merge_rank_captures(
    capture_dir: str,
    *,
    tp_size: int,
    num_layers: int,
    num_prompts: int,
    num_heads: int,
    num_kv_heads: int,
    num_tokens: Sequence[int] | None = None,
    layers: Collection[int] | None = None,
) -> Capture:
    """Merge the per-rank sample files of a tensor-parallel capture into one :class:`Capture`
    (of ``layers`` only, if given: the capture must hold exactly those).

    Heads are concatenated in rank order (global head order). Raises ``RuntimeError`` naming the
    problem if a rank is missing, the ranks disagree on what they captured, a (layer, prompt) was
    not captured, or a sample has the wrong shape, dtype or scale.
    """
    hq, hkv = num_heads // tp_size, num_kv_heads // tp_size
    files: list[dict[tuple[int, int, int], str]] = []  # per rank: (layer, prompt, chunk) -> path
    for r in range(tp_size):
        d = rank_dir(capture_dir, r)
        if not os.path.isdir(d):
            raise RuntimeError(f"tensor-parallel rank {r} wrote no captures ({d} does not exist); "
                               f"every worker must run the capture extension ({EXTENSION})")
        names = os.listdir(d)
        parsed = {n: parse_sample_name(n) for n in names}
        stray = sorted(n for n, k in parsed.items() if k is None)
        if stray:
            raise RuntimeError(f"{d} holds files that are not capture samples: {_some(stray)}; "
                               "capture into an empty directory")
        files.append({k: os.path.join(d, n) for n, k in parsed.items()})
    keys = [set(f) for f in files]
    for r in range(1, tp_size):
        if keys[r] != keys[0]:
            diff = sorted(keys[0] - keys[r]) or sorted(keys[r] - keys[0])
            which = "lacks" if keys[0] - keys[r] else "has extra"
            raise RuntimeError(
                f"tensor-parallel rank {r} {which} samples compared with rank 0, e.g. "
                f"(layer, prompt, chunk) {_some(diff)}; the ranks must capture the same prefills")
    bad = sorted(k for k in keys[0] if not (0 <= k[0] < num_layers and 0 <= k[1] < num_prompts))
    if bad:
        raise RuntimeError(f"samples of unknown layers or prompts (layer, prompt, chunk) "
                           f"{_some(bad)}: the model has {num_layers} layers and there were "
                           f"{num_prompts} prompts")
    keep = range(num_layers) if layers is None else frozenset(layers)
    extra = sorted(k for k in keys[0] if k[0] not in keep)
    if extra:
        raise RuntimeError(f"samples of layers outside the ones asked for (layer, prompt, chunk) "
                           f"{_some(extra)}")
    covered = {(k[0], k[1]) for k in keys[0]}
    missing = [i for i in range(num_layers) if i in keep
               and any((i, p) not in covered for p in range(num_prompts))]
    if missing:
        raise RuntimeError(
            f"layers {_some(missing)} were not captured for every prompt. The backend must call "
            "sparge_serve.backend.capture.emit_prefill(...) for every prefill while a sink is "
            "installed in the workers"
        )

    merged: list[list[Sample]] = [[] for _ in range(num_layers)]
    scales: list[float | None] = [None] * num_layers
    for layer, prompt, chunk in sorted(keys[0]):  # per layer: prompt order, then chunk order
        parts, metas = [], []
        for r in range(tp_size):
            path = files[r][layer, prompt, chunk]
            tensors, meta = read_sample(path)
            where = f"{path} (layer {layer}, prompt {prompt}, chunk {chunk}, rank {r})"
            if set(tensors) != {"q", "k", "v"}:
                raise RuntimeError(f"{where}: holds tensors {sorted(tensors)}, expected q, k, v")
            q, k, v = tensors["q"], tensors["k"], tensors["v"]
            if not (q.dim() == k.dim() == v.dim() == 3 and (q.shape[1], k.shape[1]) == (hq, hkv)
                    and v.shape == k.shape and k.shape[2] == q.shape[2]
                    and q.shape[0] <= k.shape[0]):
                raise RuntimeError(
                    f"{where}: shapes q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}; "
                    f"expected q [Lq, {hq}, D] and k, v [Lk >= Lq, {hkv}, D] (this rank's share "
                    f"of {num_heads} query / {num_kv_heads} KV heads over {tp_size} ranks)")
            if not q.dtype == k.dtype == v.dtype:
                raise RuntimeError(f"{where}: dtypes q {q.dtype}, k {k.dtype}, v {v.dtype} differ")
            if meta.get("tp_size") != str(tp_size):
                raise RuntimeError(f"{where}: written with tp_size {meta.get('tp_size')!r}, "
                                   f"merging for {tp_size}")
            parts.append((q, k, v))
            metas.append(meta)
        q0, k0, _ = parts[0]
        for r, (q, k, _) in enumerate(parts[1:], 1):
            if q.shape != q0.shape or k.shape != k0.shape or q.dtype != q0.dtype:
                raise RuntimeError(
                    f"layer {layer}, prompt {prompt}, chunk {chunk}: rank {r} has q "
                    f"{list(q.shape)} / k {list(k.shape)} ({q.dtype}), rank 0 has q "
                    f"{list(q0.shape)} / k {list(k0.shape)} ({q0.dtype}); the ranks must "
                    "capture the same prefills")
        scale = {m.get("scale") for m in metas}
        if len(scale) != 1 or None in scale:
            raise RuntimeError(f"layer {layer}, prompt {prompt}, chunk {chunk}: the ranks report "
                               f"missing or different softmax scales {sorted(map(str, scale))}")
        value = float(scale.pop())
        if scales[layer] is not None and value != scales[layer]:
            raise RuntimeError(f"layer {layer}: prompt {prompt} reports softmax scale {value!r}, "
                               f"an earlier sample {scales[layer]!r}")
        scales[layer] = value
        merged[layer].append(Sample(*(torch.cat(ts, dim=1) for ts in zip(*parts, strict=True))))
    return Capture(merged, [float(s or 0.0) for s in scales], list(num_tokens or []))
