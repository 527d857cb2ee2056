"""Capture Q/K/V with transformers, and the dense-vs-sparse quality report.

The capture registers an attention function in transformers' ``AttentionInterface``
(``"sparge_capture"``): it records each layer's post-RoPE ``q [L, Hq, D]`` and ``k, v [L, Hkv, D]``
(GQA kept: no repeat-KV) and returns SDPA's output, so the forward pass is unchanged. Prompts run
one at a time (batch 1, no padding, no KV cache), on CPU or CUDA.

The report swaps in ``"sparge_sparse"``: SpargeAttn with given per-head thresholds, computed by an
:class:`~sparge_calibrate.search.Evaluator` (the reference on CPU, the kernels on CUDA).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .search import Evaluator, Sample

__all__ = [
    "CAPTURE_ATTN",
    "DENSE_ATTN",
    "SPARSE_ATTN",
    "Capture",
    "ModelInfo",
    "QualityRow",
    "SparseAttention",
    "capture_hf",
    "load_model",
    "model_info",
    "quality_report",
    "window_layers",
]

logger = logging.getLogger(__name__)

CAPTURE_ATTN = "sparge_capture"
SPARSE_ATTN = "sparge_sparse"
DENSE_ATTN = "sparge_dense"  # the report's dense pass: SDPA, windows a query chunk at a time


@dataclass(frozen=True)
class ModelInfo:
    """What calibration needs to know about a model (from its ``config.json``)."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None
    config_hash: str
    torch_dtype: torch.dtype | None
    window_layers: frozenset[int] = frozenset()  # sliding-window layers: served dense, not searched


def window_layers(config: Mapping) -> frozenset[int]:
    """The sliding-window layers of a model from its HF config dict (``config.json``; a
    multimodal config's ``text_config`` is read). The backend runs these layers dense with their
    window, so calibration neither captures nor searches them.

    ``layer_types`` decides where given (``"sliding_attention"``: Gemma 3, Qwen 2); else an older
    Gemma 3 ``sliding_window_pattern`` (every pattern-th layer full); else a set ``sliding_window``
    windows every layer (Mistral), unless ``use_sliding_window`` is false (Qwen 2).
    """
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), Mapping):
        config = config["text_config"]
    num_layers = int(config.get("num_hidden_layers") or 0)
    types = config.get("layer_types")
    if types is not None:
        return frozenset(i for i, t in enumerate(types) if t == "sliding_attention")
    if config.get("sliding_window") is None or config.get("use_sliding_window") is False:
        return frozenset()
    pattern = config.get("sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 0:
        return frozenset(i for i in range(num_layers) if (i + 1) % pattern)
    return frozenset(range(num_layers))


def model_info(model_dir: str) -> ModelInfo:
    """Read the attention geometry of a local HF causal LM; ``ValueError`` if it is not one."""
    from transformers import AutoConfig

    from sparge_serve.thresholds import config_hash

    config = AutoConfig.from_pretrained(model_dir)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        num_layers = int(text.num_hidden_layers)
        num_heads = int(text.num_attention_heads)
    except (AttributeError, TypeError) as e:
        raise ValueError(
            f"{model_dir}/config.json has no num_hidden_layers/num_attention_heads: not a "
            "decoder-only attention model"
        ) from e
    num_kv_heads = int(getattr(text, "num_key_value_heads", None) or num_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return ModelInfo(
        name=getattr(config, "_name_or_path", "") or model_dir,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=int(head_dim),
        vocab_size=int(getattr(text, "vocab_size", 0) or 0),
        max_positions=getattr(text, "max_position_embeddings", None),
        config_hash=config_hash(config.to_dict()),
        torch_dtype=dtype if isinstance(dtype, torch.dtype) else None,
        window_layers=window_layers(text.to_dict()),
    )


@dataclass
class Capture:
    """Captured samples per layer: ``layers[i][p]`` is prompt ``p``'s prefill of layer ``i``."""

    layers: list[list[Sample]]
    scales: list[float]
    num_tokens: list[int] = field(default_factory=list)  # per prompt


def _check_supported(module: torch.nn.Module, kwargs: dict) -> int:
    if kwargs.get("softcap") is not None:
        raise ValueError("this model uses attention logit soft-capping, which sparge_serve does not "
                         "implement; it cannot be calibrated")
    idx = getattr(module, "layer_idx", None)
    if not isinstance(idx, int):
        raise ValueError(
            f"attention module {type(module).__name__} has no integer `layer_idx`; the "
            "transformers driver needs it to attribute captures to layers"
        )
    return idx


def _register(name: str, fn: Callable) -> None:
    from transformers import AttentionInterface

    # NOTE: the interface's mapping is process-global; the latest registration of a name wins, so
    # each capture/report binds its own recorder.
    AttentionInterface.register(name, fn)


_WINDOW_CHUNK = 1024
"""Queries per SDPA call of a sliding-window layer (at least the window)."""


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """A query attends to itself and the ``window - 1`` keys before it (transformers' sliding mask,
    vLLM's FlashAttention window)."""
    return ((k_pos[None, :] <= q_pos[:, None]) & (q_pos[:, None] - k_pos[None, :] < window))[None, None]


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, with the layer's sliding window when it has one.

    NOTE: transformers builds no mask for a registered attention function (``attention_mask`` is
    None) and passes the window as ``sliding_window``; SDPA without a mask is plain causal, so
    the window mask is built here, for a chunk of queries at a time against only the keys their
    window reaches: the work grows with the prompt, not with its square (a 32K-token prompt with
    a 512-token window: about 20x fewer products)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    window = kwargs.get("sliding_window")
    if window is None or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    lq, lk = query.shape[2], key.shape[2]
    k_pos = torch.arange(lk, device=query.device)
    q_pos = k_pos[lk - lq:]
    chunk = max(_WINDOW_CHUNK, window)
    outs = []
    for q0 in range(0, lq, chunk):
        q1 = min(q0 + chunk, lq)
        k0, k1 = max(0, int(q_pos[q0]) - window + 1), int(q_pos[q1 - 1]) + 1
        mask = _window_mask(q_pos[q0:q1], k_pos[k0:k1], window)
        out, _ = sdpa_attention_forward(module, query[:, :, q0:q1], key[:, :, k0:k1],
                                        value[:, :, k0:k1], mask, **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=1), None


class _Recorder:
    def __init__(self, num_layers: int, store_device: str = "cpu",
                 keep: Collection[int] | None = None):
        self.layers: list[list[Sample]] = [[] for _ in range(num_layers)]
        self.scales: list[float | None] = [None] * num_layers
        self.store_device = store_device
        self.keep = None if keep is None else frozenset(keep)  # layers to record (None: all)
        self.closed = False

    def attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        idx = _check_supported(module, kwargs)
        if self.closed:  # a stale registration: behave like SDPA, record nothing
            return _sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if query.shape[0] != 1:
            raise ValueError("the capture runs one prompt at a time (batch 1)")
        if scaling is None:
            scaling = 1.0 / math.sqrt(query.shape[-1])

        def grab(t: torch.Tensor) -> torch.Tensor:  # [1, H, L, D] -> [L, H, D]
            return t[0].transpose(0, 1).to(self.store_device, copy=True).contiguous()

        # NOTE: a sliding-window layer runs dense when served: nothing to calibrate
        windowed = kwargs.get("sliding_window") is not None
        if not windowed and (self.keep is None or idx in self.keep):
            self.layers[idx].append(Sample(grab(query), grab(key), grab(value)))
            self.scales[idx] = float(scaling)
        return _sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def load_model(model_dir: str, device: str, dtype: torch.dtype, attn_implementation: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=attn_implementation
    )
    return model.to(device).eval()


def _set_attention(model, name: str) -> None:
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"transformers refused attention implementation {name!r}")


def capture_hf(
    model_dir: str,
    prompts: Sequence[Sequence[int]],
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    model=None,
    on_prompt: Callable[[int], None] | None = None,
    layers: Collection[int] | None = None,
) -> Capture:
    """Run every prompt through the model and capture each layer's Q/K/V (stored on the CPU);
    with ``layers``, only those layers' (the others' lists stay empty, their scales 0).
    Sliding-window layers are never captured (their lists stay empty).

    A ``model`` passed in is switched to the capture and back to ``"sdpa"`` afterwards.
    """
    info = model_info(model_dir)
    keep = range(info.num_layers) if layers is None else layers
    rec = _Recorder(info.num_layers, keep=[i for i in keep if i not in info.window_layers])
    _register(CAPTURE_ATTN, rec.attention)
    if model is None:
        model = load_model(model_dir, device, dtype, CAPTURE_ATTN)
    else:
        _set_attention(model, CAPTURE_ATTN)
    try:
        with torch.inference_mode():
            for p, ids in enumerate(prompts):
                x = torch.tensor([list(ids)], dtype=torch.long, device=device)
                # NOTE: the decoder without the LM head: a 32K prompt's logits over Gemma 3's
                # 262K vocabulary would be 34 GB of fp32 that the capture never reads
                model.base_model(input_ids=x, use_cache=False)
                if on_prompt is not None:
                    on_prompt(p)
    finally:
        rec.closed = True
        _set_attention(model, "sdpa")
    missing = [i for i, s in enumerate(rec.layers)
               if (rec.keep is None or i in rec.keep) and len(s) != len(prompts)]
    if missing:
        raise RuntimeError(
            f"layers {missing} were not captured once per prompt: the model does not route its "
            "attention through transformers' AttentionInterface"
        )
    return Capture(rec.layers, [float(s or 0.0) for s in rec.scales], [len(p) for p in prompts])


# ------------------------------------------------------------------------------------------------
# quality report
# ------------------------------------------------------------------------------------------------


class SparseAttention:
    """SpargeAttn with per-head thresholds ``(sim, cdf, pv)`` (each ``[num_layers, num_heads]``)
    as a transformers attention function, counting the blocks it keeps.

    As served: sliding-window layers run dense with their window, and so does a forward pass of
    fewer than ``min_query`` new tokens (decode steps of a generation, ``min_query`` 2). Use it
    through :meth:`installed`, batch 1.
    """

    def __init__(self, evaluator: Evaluator, sim, cdf, pv, min_query: int = 2):
        self.evaluator = evaluator
        self.sim, self.cdf, self.pv = (t.float().cpu() for t in (sim, cdf, pv))
        self.min_query = min_query
        self.kept = 0
        self.valid = 0

    @property
    def sparsity(self) -> float:
        """The fraction of causally valid blocks skipped so far (0 before any sparse pass)."""
        return 1.0 - self.kept / max(self.valid, 1)

    @contextlib.contextmanager
    def installed(self, model):
        """``model`` attends with this setting inside the block, with SDPA after it."""
        _register(SPARSE_ATTN, self.attention)
        _set_attention(model, SPARSE_ATTN)
        try:
            yield self
        finally:
            _set_attention(model, "sdpa")

    def attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        idx = _check_supported(module, kwargs)
        if kwargs.get("sliding_window") is not None or query.shape[2] < self.min_query:
            return _sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if query.shape[0] != 1:
            raise ValueError("the report runs one prompt at a time (batch 1)")
        if scaling is None:
            scaling = 1.0 / math.sqrt(query.shape[-1])
        sample = Sample(*(t[0].transpose(0, 1) for t in (query, key, value)))
        out, kept, valid = self.evaluator.sparse_attention(
            sample, scaling, self.sim[idx], self.cdf[idx], self.pv[idx]
        )
        self.kept += int(kept.sum())
        self.valid += int(valid.sum())
        return out[None].to(query.dtype), None


@dataclass(frozen=True)
class QualityRow:
    """Sparse vs dense on held-out prompts (next-token log-probabilities of the prompt itself)."""

    name: str
    tokens: int
    perplexity: float
    dense_perplexity: float
    mean_abs_logprob_diff: float
    max_abs_logprob_diff: float
    mean_kl: float  # KL(dense || sparse) of the next-token distributions, nats per token
    sparsity: float  # fraction of valid (layer, head, q-block, k-block) pairs not computed
    worst_rise: float  # the largest perplexity rise of one prompt (sparse / dense - 1)


_ROWS = 256  # positions per chunk when comparing logits (bounds fp32 [rows, vocab] temporaries)


def _hidden(model, ids: Sequence[int], device: str) -> torch.Tensor:
    """The final hidden states that predict tokens 1..L-1, ``[L-1, hidden]`` in the model's dtype.

    NOTE: a prompt's logits (``[L, vocab]``) do not fit in memory for long prompts of a large
    vocabulary (8K x 262K fp32 = 8.6 GB for Gemma 3), so they are made a chunk at a time by
    :func:`_logits` from these."""
    x = torch.tensor([list(ids)], dtype=torch.long, device=device)
    return model.base_model(input_ids=x, use_cache=False).last_hidden_state[0, :-1]


def _logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The causal LM's logits of ``hidden`` (its output projection and final soft-cap, if any)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _compare(model, dense: torch.Tensor, sparse: dict[str, torch.Tensor],
             targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, ...]]]:
    """From the final hidden states of the dense run and of each named sparse run: per predicted
    token, the dense log-prob of the target, and per run its log-prob and KL(dense || sparse).
    The dense logits of a chunk are made once for every run."""
    lp_d: list[torch.Tensor] = []
    lp_s: dict[str, list[torch.Tensor]] = {n: [] for n in sparse}
    kl: dict[str, list[torch.Tensor]] = {n: [] for n in sparse}
    for a in range(0, dense.shape[0], _ROWS):
        d = torch.log_softmax(_logits(model, dense[a : a + _ROWS]), -1)
        t = targets[a : a + _ROWS, None]
        lp_d.append(d.gather(1, t)[:, 0].cpu())
        p_d = d.exp()
        for name, hidden in sparse.items():
            s = torch.log_softmax(_logits(model, hidden[a : a + _ROWS]), -1)
            lp_s[name].append(s.gather(1, t)[:, 0].cpu())
            # clamped at 0: rounding makes identical distributions slightly negative
            kl[name].append((p_d * (d - s)).sum(-1).clamp_min(0).cpu())
    return torch.cat(lp_d), {n: (torch.cat(lp_s[n]), torch.cat(kl[n])) for n in sparse}


def quality_report(
    model_dir: str,
    prompts: Sequence[Sequence[int]],
    settings: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    evaluator: Evaluator,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    model=None,
    progress: bool = False,
    dense_hidden: dict[int, torch.Tensor] | None = None,
) -> list[QualityRow]:
    """Compare dense attention with each named threshold setting ``(sim, cdf, pv)``, each tensor
    ``[num_layers, num_heads]``, on ``prompts`` (each at least 2 tokens).

    One prompt at a time: the final hidden states of its dense run and of every setting's run are
    kept, then compared with logits made ``_ROWS`` positions at a time, so memory does not grow
    with prompt length x vocabulary. ``progress``: a tqdm bar over the forward passes.
    ``dense_hidden``: the dense runs' hidden states by prompt index, filled here and reused by a
    later call on the same prompts and model (no second dense pass).
    """
    from tqdm import tqdm

    if model is None:
        model = load_model(model_dir, device, dtype, "sdpa")
    else:
        _set_attention(model, "sdpa")
    attns = {name: SparseAttention(evaluator, *th) for name, th in settings.items()}
    _register(DENSE_ATTN, _sdpa)
    dense_lp: list[torch.Tensor] = []
    per_setting: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in attns}
    kept = {} if dense_hidden is None else dense_hidden
    missing = sum(j not in kept for j in range(len(prompts)))
    bar = tqdm(total=len(prompts) * len(attns) + missing, unit="pass", desc="quality report",
               disable=not progress)
    with torch.inference_mode(), bar:
        for j, ids in enumerate(prompts):
            dense = kept.get(j)
            if dense is None:
                # NOTE: transformers' own SDPA masks a windowed layer over the whole prompt
                _set_attention(model, DENSE_ATTN)
                try:
                    dense = _hidden(model, ids, device)
                finally:
                    _set_attention(model, "sdpa")
                if dense_hidden is not None:
                    dense_hidden[j] = dense
                bar.update()
            sparse = {}
            for name, attn in attns.items():
                with attn.installed(model):
                    sparse[name] = _hidden(model, ids, device)
                bar.set_postfix_str(name)
                bar.update()
            targets = torch.tensor(list(ids)[1:], device=dense.device)
            lp_d, compared = _compare(model, dense, sparse, targets)
            for name, lp_kl in compared.items():
                per_setting[name].append(lp_kl)
            dense_lp.append(lp_d)
            del dense, sparse
    lp_dense = torch.cat(dense_lp)
    rows = []
    for name, attn in attns.items():
        lp_sparse = torch.cat([lp for lp, _ in per_setting[name]])
        kl = torch.cat([k for _, k in per_setting[name]])
        diff = (lp_sparse - lp_dense).abs()
        # per prompt: exp(mean dense logp - mean sparse logp) - 1
        worst = max(math.expm1(float(d.mean() - lp.mean()))
                    for d, (lp, _) in zip(dense_lp, per_setting[name], strict=True))
        rows.append(
            QualityRow(
                name=name,
                tokens=int(diff.numel()),
                perplexity=math.exp(-float(lp_sparse.mean())),
                dense_perplexity=math.exp(-float(lp_dense.mean())),
                mean_abs_logprob_diff=float(diff.mean()),
                max_abs_logprob_diff=float(diff.max()),
                mean_kl=float(kl.mean()),
                sparsity=attn.sparsity,
                worst_rise=worst,
            )
        )
    return rows
