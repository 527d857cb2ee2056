"""What ``benchmarks/bench_e2e.py`` runs: the model geometries (Hugging Face config folders that
vLLM loads with random weights, ``load_format="dummy"``), random token-id prompts, the
configurations of each stage, the plan of engine runs, and rough time estimates.

The ``*_real`` geometries are the small models themselves: the folder ``sparge-models convert``
wrote (``--weights KEY=DIR``) with its trained weights, prompted with held-out documents
(``quality_tasks/documents.py``: standard-library source no calibration set reads) in its
tokenizer, so a thresholds file (``SPARGE@64:calibrated``, the file given with ``--thresholds
KEY=FILE``) skips the blocks it skips on real text; TTFT only, up to the model's context.

config.json comes from ``sparge_serve.models.convert.build_config``, the function that writes the
configs of converted GGUF models, fed the numbers a GGUF file of each model carries; Gemma 3's
layer pattern (5 sliding-window layers per global layer), local rope base and query scale are its
rules. Llama 3.1's ``llama3`` rope scaling, which GGUF files do not describe, is set afterwards.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import e2e_report

GATE_OPEN_FILE = "sparge_gate_open.safetensors"
# variant calibrated_nopv: the --thresholds file with its PV skip off, written here per geometry
NO_PV_FILE = "sparge_calibrated_nopv.safetensors"
# tokenizer files of the usual Hugging Face layouts (fast, sentencepiece, BPE vocab + merges)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja")
GLOBAL_EVERY = 6  # Gemma 3: every 6th layer is global (convert.py's rule without GGUF metadata)


@dataclass(frozen=True)
class Geometry:
    arch: str  # the GGUF architecture name build_config expects
    description: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int
    rope_theta: float
    rms_eps: float
    tied: bool
    bos: int
    eos: int
    sliding_window: int | None = None
    rope_theta_local: float | None = None
    rope_parameters: dict[str, Any] | None = field(default=None)  # replaces build_config's
    weights: str | None = None  # sparge-models key: served with that model's trained weights

    def metadata(self) -> dict[str, Any]:
        """The GGUF key/values that ``build_config`` reads ("{arch}" stands for the arch)."""
        meta = {
            "{arch}.embedding_length": self.hidden, "{arch}.feed_forward_length": self.intermediate,
            "{arch}.block_count": self.layers, "{arch}.attention.head_count": self.heads,
            "{arch}.attention.head_count_kv": self.kv_heads,
            "{arch}.attention.key_length": self.head_dim,
            "{arch}.attention.value_length": self.head_dim,
            "{arch}.rope.dimension_count": self.head_dim, "{arch}.rope.freq_base": self.rope_theta,
            "{arch}.context_length": self.context, "{arch}.vocab_size": self.vocab,
            "{arch}.attention.layer_norm_rms_epsilon": self.rms_eps,
            "tokenizer.ggml.bos_token_id": self.bos, "tokenizer.ggml.eos_token_id": self.eos,
        }
        if self.sliding_window is not None:
            meta["{arch}.attention.sliding_window"] = self.sliding_window
            meta["{arch}.rope.freq_base_swa"] = self.rope_theta_local
        return {k.replace("{arch}", self.arch): v for k, v in meta.items()}

    @property
    def window_layers(self) -> int:
        return 0 if self.sliding_window is None else self.layers - self.layers // GLOBAL_EVERY

    def kv_bytes(self, tokens: int) -> int:
        """bf16 KV cache of one sequence of ``tokens`` (windowed layers hold their window)."""
        per_layer = 2 * 2 * self.kv_heads * self.head_dim
        window = min(tokens, self.sliding_window or tokens)
        return per_layer * ((self.layers - self.window_layers) * tokens
                            + self.window_layers * window)

    def prompt(self, n: int, seed: int | tuple[int, ...]) -> dict[str, list[int]]:
        """A TokensPrompt of ``n`` random token ids (no tokenizer needed; ``seed`` picks them)."""
        import numpy as np

        ids = np.random.default_rng(seed).integers(16, min(self.vocab, 32000), size=n)
        return {"prompt_token_ids": ids.tolist()}


GEOMETRIES = {
    "llama8b": Geometry(
        "llama", "Llama-3.1-8B geometry (LlamaForCausalLM, 32 layers, hidden 4096, MLP 14336, "
        "32 / 8 heads of 128, llama3 rope scaling, 128K context, vocabulary 128256)",
        layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
        vocab=128256, context=131072, rope_theta=500000.0, rms_eps=1e-5, tied=False,
        bos=128000, eos=128001,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}),
    "gemma3_270m": Geometry(
        "gemma3", "Gemma 3 270M geometry (Gemma3ForCausalLM, 18 layers, hidden 640, 4 / 1 "
        "heads of 256, sliding window 512 on 5 of every 6 layers, which run dense)",
        layers=18, hidden=640, intermediate=2048, heads=4, kv_heads=1, head_dim=256,
        vocab=262144, context=32768, rope_theta=1000000.0, rms_eps=1e-6, tied=True, bos=2,
        eos=1, sliding_window=512, rope_theta_local=10000.0),
    "smollm2_135m": Geometry(
        "llama", "SmolLM2-135M geometry (LlamaForCausalLM, 30 layers, hidden 576, 9 / 3 heads "
        "of 64)",
        layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64,
        vocab=49152, context=8192, rope_theta=100000.0, rms_eps=1e-5, tied=True, bos=1, eos=2),
}
GEOMETRIES["gemma3_270m_real"] = replace(
    GEOMETRIES["gemma3_270m"], weights="gemma3", description="Gemma 3 270M with its pretrained "
    "weights (`sparge-models convert gemma3`), prompts of held-out standard-library source")
GEOMETRIES["smollm2_135m_real"] = replace(
    GEOMETRIES["smollm2_135m"], weights="smollm2", description="SmolLM2-135M-Instruct with its "
    "pretrained weights (`sparge-models convert smollm2`), prompts of held-out standard-library "
    "source")
REAL_STAGES = ("ttft",)  # what the real-weight geometries run
DESCRIPTIONS = {name: g.description for name, g in GEOMETRIES.items()}


class _Metadata:
    """What ``convert.build_config`` reads of a GGUF file (``get``, ``arch``, ``path``)."""

    _MISSING = object()

    def __init__(self, name: str, geo: Geometry):
        self.arch, self.path, self._values = geo.arch, Path(name), geo.metadata()

    def get(self, key: str, default: Any = _MISSING) -> Any:
        key = key.replace("{arch}", self.arch)
        if key in self._values:
            return self._values[key]
        if default is self._MISSING:
            raise KeyError(f"geometry {self.path}: no {key!r}")
        return default


def hf_config(name: str) -> Any:
    """The transformers config of geometry ``name``."""
    from sparge_serve.models.convert import build_config

    geo = GEOMETRIES[name]
    config = build_config(_Metadata(name, geo), geo.vocab, geo.tied, "bfloat16")
    if geo.rope_parameters is not None:
        config.rope_parameters = dict(geo.rope_parameters)
    return config


def write_geometry(name: str, root: str | Path, tokenizer: str | Path | None) -> Path:
    """``root/name``: config.json, the tokenizer files found in folder ``tokenizer`` and the
    thresholds file of the topk configurations (``simthreshd1`` -1: every block passes the
    similarity gate, so ``topk`` alone picks the kept blocks; ``cdfthreshd`` 1, PV skip off)."""
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    hf_config(name).save_pretrained(str(folder))
    if tokenizer is not None:
        found = [f for f in TOKENIZER_FILES if (Path(tokenizer) / f).is_file()]
        if not found:
            raise SystemExit(f"--tokenizer {tokenizer}: no tokenizer files "
                             f"({', '.join(TOKENIZER_FILES)}) in that folder")
        for f in found:
            shutil.copyfile(Path(tokenizer) / f, folder / f)
    write_gate_open(name, root)
    return folder


def write_gate_open(name: str, root: str | Path) -> Path:
    """``root/name/GATE_OPEN_FILE``, the topk configurations' thresholds (every block passes
    the similarity gate, ``cdfthreshd`` 1, PV skip off)."""
    from sparge_serve.thresholds import Thresholds, save_thresholds

    geo = GEOMETRIES[name]
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    save_thresholds(folder / GATE_OPEN_FILE, Thresholds.defaults(
        geo.layers, geo.heads, geo.kv_heads, geo.head_dim, simthreshd1=-1.0, cdfthreshd=1.0,
        model=name))
    return folder / GATE_OPEN_FILE


def write_no_pv(name: str, root: str | Path, thresholds: str | Path) -> Path:
    """``root/name/NO_PV_FILE``: the thresholds file ``thresholds`` with its PV skip off (every
    ``pvthreshd`` at ``PV_SKIP_OFF``), so that ``attention_kernel`` auto attends every sparse
    layer through FA3 (a layer with the PV skip keeps the Triton kernel)."""
    from sparge_serve.kernels.geometry import PV_SKIP_OFF
    from sparge_serve.thresholds import load_thresholds, save_thresholds

    th = load_thresholds(thresholds)
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    save_thresholds(folder / NO_PV_FILE, replace(
        th, pvthreshd=th.pvthreshd.clamp(min=PV_SKIP_OFF), created="", package_version=""))
    return folder / NO_PV_FILE


def uses_pv_skip(thresholds: str | Path) -> bool:
    """Whether a thresholds file gives any head the PV skip (a ``pvthreshd`` below
    ``PV_SKIP_OFF``); ``ValueError`` for a file that is not a thresholds file."""
    from sparge_serve.kernels.geometry import PV_SKIP_OFF
    from sparge_serve.thresholds import load_thresholds

    return bool((load_thresholds(thresholds).pvthreshd < PV_SKIP_OFF).any())


def document_prompts(folder: str | Path, n: int, count: int) -> list[dict[str, list[int]]]:
    """``count`` TokensPrompts of ``n`` tokens: consecutive held-out documents in the tokenizer
    of the model folder ``folder`` (the same ones for the same tokenizer and Python)."""
    from quality_tasks.documents import make_documents
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return [{"prompt_token_ids": d} for d in make_documents(tokenizer, count, n)["docs"]]


def key_values(pairs: list[str] | None, option: str) -> dict[str, str]:
    """``KEY=VALUE`` arguments of ``option`` as a dict, the keys the real models' (``gemma3``,
    ``smollm2``)."""
    keys = sorted({g.weights for g in GEOMETRIES.values() if g.weights})
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or key not in keys or not value:
            raise ValueError(f"{option} {pair!r}: give MODEL=PATH, MODEL one of {', '.join(keys)}")
        out[key] = value
    return out


def position_overrides(name: str, max_len: int) -> dict[str, int]:
    """``hf_overrides`` for a ``max_model_len`` past the geometry's trained context (positions
    are extrapolated: fine for timing with random weights)."""
    return {"max_position_embeddings": max_len} if max_len > GEOMETRIES[name].context else {}


# ---- rough time estimates (the plan's, not measurements) --------------------------------------
FLOPS = 5e14  # bf16 FLOP/s a long prefill reaches on an H200, roughly
BYTES = 4e12  # HBM bytes/s a decode step reaches, roughly
LAYER_HOST_S = 2e-4  # host time per layer and engine step, roughly


def prefill_s(geo: Geometry, n: int, keep: float = 1.0, chunk: int = 16384) -> float:
    weights = geo.layers * (2 * geo.hidden * geo.heads * geo.head_dim
                            + 2 * geo.hidden * geo.kv_heads * geo.head_dim
                            + 3 * geo.hidden * geo.intermediate)
    full = geo.layers - geo.window_layers
    attn = 2.0 * n * n * geo.heads * geo.head_dim * (full * keep)
    attn += 4.0 * n * min(n, geo.sliding_window or n) * geo.heads * geo.head_dim * geo.window_layers
    steps = -(-n // chunk)
    return (2.0 * weights * n + attn) / FLOPS + steps * geo.layers * LAYER_HOST_S


SHORT_PREFILL_S = 0.1
"""A prefill estimated shorter than this (a small model at 8K-32K tokens: tens of milliseconds,
bound by the host) varies by several percent from one to the next, and a burst of other work on
the host moves the median of repeats that span a fraction of a second: such a length takes
enough repeats to span :data:`TTFT_SAMPLE_S` (an engine's start takes tens of seconds), at most
:data:`MAX_TTFT_REPEATS`."""
TTFT_SAMPLE_S = 3.0
MAX_TTFT_REPEATS = 200


def ttft_repeats(job: dict, n: int) -> int:
    """Timed prefills of ``n`` tokens in a ``ttft`` job: ``repeats``, or more where one prefill
    is short (:data:`SHORT_PREFILL_S`)."""
    geo = GEOMETRIES[job["geometry"]]
    keep = (job["sparge"] or {}).get("topk") or 1.0
    est = prefill_s(geo, n, keep, job["chunk"])
    if est >= SHORT_PREFILL_S:
        return job["repeats"]
    return max(job["repeats"], min(MAX_TTFT_REPEATS, math.ceil(TTFT_SAMPLE_S / est)))


def estimate_s(job: dict) -> float:
    """A rough duration of one engine run: start-up plus its measured work."""
    geo = GEOMETRIES[job["geometry"]]
    keep = (job["sparge"] or {}).get("topk") or 1.0
    startup = 90.0 if geo.hidden >= 2048 else 60.0
    if job["stage"] == "ttft":
        runs = {n: job["warmups"] + ttft_repeats(job, n) + (n in job["profile_lengths"])
                for n, in job["points"]}
        return startup + sum(r * prefill_s(geo, n, keep, job["chunk"]) for n, r in runs.items())
    if job["stage"] == "decode":
        total = startup
        weight_bytes = 2 * 12 * geo.layers * geo.hidden * geo.hidden
        for ctx, b in job["points"]:
            step = (weight_bytes + b * geo.kv_bytes(ctx)) / BYTES + geo.layers * LAYER_HOST_S
            total += b * prefill_s(geo, ctx, 1.0, job["chunk"]) + (
                2 * job["repeats"] + 1) * job["new_tokens"] * step
        return total
    n_req = sum(max(c, job["prompts_per_concurrency"] * c) + c for c, in job["points"])
    return startup + n_req * (prefill_s(geo, job["input_len"], keep, job["chunk"])
                              + job["output_len"] * geo.layers * LAYER_HOST_S)


# ---- the plan ----------------------------------------------------------------------------------
DEFAULTS = {  # stage -> (configurations, in run order: the baseline first)
    "ttft": ["FLASH_ATTN@64", "SPARGE@64:topk0.5", "SPARGE@64:topk0.1", "SPARGE@64:topk1.0",
             "SPARGE@64:topk0.2", "SPARGE@64:untuned", "SPARGE@64:defaults", "FLASH_ATTN@16"],
    # decode under the untuned thresholds: every layer bound sparse, as with a calibrated file
    "decode": ["FLASH_ATTN@64", "SPARGE@64:untuned", "FLASH_ATTN@16"],
    "serve": ["FLASH_ATTN@64", "SPARGE@64:topk0.2"],
}
FULL = dict(lengths=[8192, 16384, 32768, 65536, 131072], profile_lengths=[32768, 131072],
            repeats=3, contexts=[8192, 32768], batches=[1, 8, 32], decode_repeats=3,
            concurrency=[4, 16], serve_input_len=32768, prompts_per_concurrency=4)
QUICK = {  # --quick: the rows that matter most, each stage in a few minutes (options given on
    # the command line still win)
    "ttft": dict(configs=["FLASH_ATTN@64", "SPARGE@64:topk0.5", "SPARGE@64:topk0.1",
                          "SPARGE@64:defaults"],
                 lengths=[32768, 131072], profile_lengths=[131072], repeats=2),
    "decode": dict(configs=["FLASH_ATTN@64", "SPARGE@64:untuned"], contexts=[32768],
                   batches=[1, 8], decode_repeats=2),
    "serve": dict(configs=["FLASH_ATTN@64", "SPARGE@64:topk0.2"], concurrency=[8],
                  serve_input_len=16384, prompts_per_concurrency=2),
}


def sparge_options(config: str, thresholds: str, min_sparse_len: int,
                   files: dict[str, str] | None = None) -> dict | None:
    """``additional_config["sparge"]`` of a configuration (None for FLASH_ATTN); ``files``: the
    thresholds file of each ``calibrated*`` variant (real-weight geometries)."""
    c = e2e_report.parse_config(config)
    if c["backend"] != "SPARGE":
        return None
    if c["variant"] == "dense":
        return {"mode": "dense"}
    if c["variant"] == "defaults":
        return {}  # the backend's default settings, as a user who sets nothing gets them
    opts = {"min_sparse_len": min_sparse_len}
    if c["topk"] is not None:
        opts.update(thresholds=thresholds, topk=c["topk"])
    elif c["variant"].startswith("calibrated"):
        if not files or c["variant"] not in files:
            raise ValueError(f"configuration {config!r}: a calibrated file serves a *_real "
                             "geometry given --thresholds MODEL=FILE")
        opts.update(thresholds=files[c["variant"]])
    else:
        opts.update(thresholds="untuned")
    if c["attention_kernel"] is not None:
        opts["attention_kernel"] = c["attention_kernel"]
    if c["fp8_attention"]:
        opts["fp8_attention"] = True
    return opts


def make_plan(args, data: dict) -> tuple[list[dict], list[str]]:
    """The engine runs (jobs) of the requested stages and what is left out, with why. With
    ``--skip-done``, a job keeps only the points that ``data`` does not hold yet."""
    from sparge_serve.config import SpargeConfig

    weights = key_values(args.weights, "--weights")
    calibrated = key_values(args.thresholds, "--thresholds")
    jobs, left_out = [], []
    for stage in [s for s in e2e_report.STAGES if s in args.stages]:
        quick = QUICK[stage] if args.quick else {}
        opt = {k: v if getattr(args, k) is None else getattr(args, k)
               for k, v in {**FULL, **quick}.items() if k != "configs"}
        configs = args.configs or quick.get("configs") or DEFAULTS[stage]
        for geo_name in args.geometries:
            geo = GEOMETRIES[geo_name]
            thresholds = str(Path(args.model_dir) / geo_name / GATE_OPEN_FILE)
            model, files = str(Path(args.model_dir) / geo_name), None
            if geo.weights:
                if stage not in REAL_STAGES:
                    left_out.append(f"{stage} {geo_name}: the real-weight geometries run "
                                    f"{', '.join(REAL_STAGES)} only")
                    continue
                model = weights.get(geo.weights)
                if model is None:
                    raise ValueError(f"{geo_name} serves the converted {geo.weights} folder: "
                                     f"give --weights {geo.weights}=DIR (`sparge-models convert "
                                     f"{geo.weights} --out DIR` writes it)")
                if geo.weights in calibrated:
                    if not Path(calibrated[geo.weights]).is_file():
                        raise ValueError(f"--thresholds {geo.weights}="
                                         f"{calibrated[geo.weights]}: no such file")
                    files = {"calibrated": calibrated[geo.weights],
                             "calibrated_nopv": str(Path(args.model_dir) / geo_name / NO_PV_FILE)}
            for config in configs:
                if (files and e2e_report.parse_config(config)["variant"] == "calibrated_nopv"
                        and not uses_pv_skip(files["calibrated"])):
                    left_out.append(f"{stage} {geo_name} {config}: the file uses no PV skip "
                                    "(the calibrated rows are these)")
                    continue
                opts = sparge_options(config, thresholds, args.min_sparse_len, files)
                if opts is not None:
                    SpargeConfig.from_dict(opts, env={})  # a bad option fails here, not on the GPU
                job = dict(stage=stage, geometry=geo_name, config=config, sparge=opts,
                           model=model, chunk=args.chunk, weights=bool(geo.weights),
                           gpu_memory_utilization=args.gpu_memory_utilization)
                if stage == "ttft":
                    points = [(n,) for n in opt["lengths"]]
                    if geo.weights:  # trained weights: prompts within the model's context
                        left_out += [f"ttft {geo_name} {config} {n}: past the model's context "
                                     f"({geo.context})" for n, in points if n > geo.context]
                        points = [(n,) for n, in points if n <= geo.context]
                    job.update(warmups=args.warmups, repeats=opt["repeats"],
                               host_profile=args.host_profile,
                               profile_lengths=[n for n in opt["profile_lengths"]
                                                if (n,) in points])
                elif stage == "decode":
                    points = []
                    for ctx in opt["contexts"]:
                        for b in opt["batches"]:
                            gib = geo.kv_bytes(ctx + args.new_tokens + 64) * b / 2**30
                            if gib > args.kv_budget_gib:
                                left_out.append(f"decode {geo_name} {config} context {ctx} batch "
                                                f"{b}: KV cache of {gib:.0f} GiB > "
                                                f"--kv-budget-gib {args.kv_budget_gib:g}")
                            else:
                                points.append((ctx, b))
                    job.update(new_tokens=args.new_tokens, repeats=opt["decode_repeats"])
                else:
                    points = [(c,) for c in opt["concurrency"]]
                    job.update(input_len=opt["serve_input_len"], output_len=args.serve_output_len,
                               range_ratio=args.range_ratio,
                               prompts_per_concurrency=opt["prompts_per_concurrency"])
                if args.skip_done:
                    done = [p for p in points
                            if e2e_report.has_row(data, (stage, geo_name, config, *p))]
                    left_out += [f"{stage} {geo_name} {config} {p}: in the results already"
                                 for p in done]
                    points = [p for p in points if p not in done]
                if points:
                    job["points"] = points
                    job["est_s"] = estimate_s(job)
                    jobs.append(job)
    return with_rounds(jobs, args.rounds), left_out


def with_rounds(jobs: list[dict], rounds: int) -> list[dict]:
    """``jobs`` with each TTFT engine run ``rounds`` times, the rounds one after the other
    (every configuration's first engine, then every one's second, ...), so that a change of the
    host's speed during the call reaches a configuration and its baseline alike; every second
    round runs the engines in reverse order, so that no configuration always starts first or
    always follows the same one. A later round's rows join the first round's
    (``e2e_report.add_rows``); only the first profiles."""
    if rounds < 1:
        raise ValueError(f"--rounds {rounds}: give 1 or more")
    if rounds == 1:
        return jobs
    out = []
    ttft = [j for j in jobs if j["stage"] == "ttft"]
    for r in range(rounds):
        for job in (ttft[::-1] if r % 2 else ttft):
            job = dict(job, round=r)
            if r:  # the profiled prefill runs in the first round only
                job["profile_lengths"] = []
                job["est_s"] = estimate_s(job)
            out.append(job)
    return out + [j for j in jobs if j["stage"] != "ttft"]


def describe(job: dict) -> str:
    p = job["points"]
    if job["stage"] == "ttft":
        more = ", ".join(f"{ttft_repeats(job, n)} at {n}" for n, in p
                         if ttft_repeats(job, n) != job["repeats"])
        what = (f"lengths {' '.join(str(n) for n, in p)}; {job['warmups']} warm-up + "
                f"{job['repeats']} repeats{f' ({more})' if more else ''}; "
                f"profiled {job['profile_lengths'] or 'none'}")
    elif job["stage"] == "decode":
        what = (f"(context, batch) {', '.join(f'({c}, {b})' for c, b in p)}; "
                f"{job['new_tokens']} new tokens; {job['repeats']} repeats")
    else:
        what = (f"concurrency {' '.join(str(c) for c, in p)}; input {job['input_len']} "
                f"± {job['range_ratio']:.0%}, output {job['output_len']}")
    if "round" in job:
        what += f"; round {job['round'] + 1}"
    return (f"{job['stage']:6s} {job['geometry']:12s} {job['config']:19s} {what} "
            f"(~{job['est_s'] / 60:.1f} min)")
