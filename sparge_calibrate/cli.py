"""``sparge-calibrate``: per-head SpargeAttn thresholds for a local HF causal LM.

Example (the budget chosen by held-out perplexity, within +0.5% of dense: ``budget.py``)::

    sparge-calibrate ./Llama-3.1-8B --prompts calib.jsonl --out llama.sparge.safetensors \\
        --report heldout.txt --max-len 16384 --samples 8 --driver vllm --device cuda \\
        --tensor-parallel-size 2 --plot sparsity.png

Writes the thresholds file the SPARGE backend loads (``--additional-config
'{"sparge": {"thresholds": "llama.sparge.safetensors"}}'``), prints a per-layer summary and
optionally a sparsity heatmap and a dense-vs-sparse quality report on held-out prompts. Outputs are
checked before any work and written atomically (``outputs.py``); exit codes: 0 done, 1 a runtime
error (an output that could not be written: its copy's path is on stderr), 2 an argument error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence

import torch

from sparge_serve.kernels.geometry import BLKK, BLKQ

from . import budget
from .arguments import (
    DEFAULT_L1,
    PV_RATIO,
    _budget,
    _fraction,
    _layer_spec,
    _positive_int,
    parse_layer_spec,
)
from .outputs import Output, OutputError, check_output, describe_cause, save_copy, write_atomic
from .prompts import MIN_PROMPT_TOKENS, PROMPT_EXTENSIONS, PromptError, check_lengths, load_prompts
from .search import ALLOCATIONS, DEFAULT_SIM_GRID, ERROR_RULES, SearchConfig

__all__ = ["build_parser", "main", "parse_layer_spec"]

logger = logging.getLogger("sparge_calibrate")

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparge-calibrate",
        description="Calibrate per-head SpargeAttn thresholds (simthreshd1, cdfthreshd, pvthreshd) "
        "for a local Hugging Face causal LM and write the thresholds file the SPARGE vLLM backend "
        "loads.",
        epilog=f"Prompts must have at least {MIN_PROMPT_TOKENS} tokens (three query blocks of "
        f"{BLKQ}): the sink, the diagonal key blocks (of {BLKK} keys) and the rows of the last "
        f"{BLKQ} queries are always computed, so the second of three query blocks is the first "
        "with a choice. Use prompts as long as the ones you serve.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local HF model directory (config.json, "
                   "weights, and a tokenizer for text prompts)")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="calibration prompts: .txt (paragraphs separated by blank lines) or .jsonl "
                   '(one object per line with "text" or "prompt_token_ids")')
    p.add_argument("--out", required=True, metavar="FILE.safetensors",
                   help="thresholds file to write (an existing file is only replaced if it is a "
                   "thresholds file)")
    p.add_argument("--l1", type=_budget,
                   help="stage-1 error budget (relative L1 for --sim-rule l1): the mean over "
                   "the heads (--allocation model) or every head's (--allocation head). Default: "
                   "with --report, chosen by held-out perplexity (--ppl-target); without, "
                   f"{DEFAULT_L1:g}. Any budget flag fixes the budget")
    p.add_argument("--pv-l1", type=_budget,
                   help=f"error budget with the PV skip; must exceed --l1 (default {PV_RATIO:g} x "
                   "--l1)")
    p.add_argument("--sim-rule", choices=ERROR_RULES, default="l1",
                   help="error rule the budgets bound: relative L1, 1 - cosine similarity, or "
                   "relative RMSE (default l1)")
    p.add_argument("--layer-l1", type=_layer_spec, nargs="+", action="extend", default=[],
                   metavar="LAYERS:BUDGET",
                   help="per-layer stage-1 budgets, e.g. 0-5:0.04 (stricter early layers); these "
                   "layers' PV budget keeps the global margin (--pv-l1 minus --l1) unless "
                   "--layer-pv-l1 sets it")
    p.add_argument("--layer-pv-l1", type=_layer_spec, nargs="+", action="extend", default=[],
                   metavar="LAYERS:BUDGET", help="per-layer PV budgets, e.g. 0-5:0.05")
    p.add_argument("--max-len", type=_positive_int, metavar="N",
                   help=f"truncate prompts to their first N tokens (N >= {MIN_PROMPT_TOKENS})")
    p.add_argument("--samples", type=_positive_int, metavar="N",
                   help="use only the first N prompts of --prompts")
    p.add_argument("--driver", choices=("hf", "vllm"), default="hf",
                   help="capture Q/K/V with transformers (CPU or CUDA) or through vLLM with the "
                   "SPARGE backend (CUDA)")
    p.add_argument("--layers-per-pass", type=_positive_int, metavar="N",
                   help="capture and search N layers at a time, which bounds the captured Q/K/V "
                   "held in host memory to N layers' worth (default: all layers in one pass; "
                   "each further pass runs the prompts again, with --driver vllm in a new engine)")
    p.add_argument("--tensor-parallel-size", type=_positive_int, default=1, metavar="N",
                   help="--driver vllm: capture with N GPUs (tensor parallel; the workers write "
                   "their captures to $TMPDIR, merged afterwards; default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="where the model runs and errors are measured (default: cuda if available)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="model dtype (auto: float32 on CPU, the checkpoint's 16-bit dtype on CUDA)")
    p.add_argument("--report", metavar="HELDOUT_FILE",
                   help="also measure dense-vs-sparse quality (log-probabilities, perplexity) and "
                   "sparsity on these held-out prompts (same formats as --prompts), with the "
                   "transformers model")
    p.add_argument("--ppl-target", type=float, metavar="FRAC",
                   help="choose the budget per model: calibrate at each of --budgets, measure "
                   "held-out perplexity on --report, and write the largest budget whose "
                   "perplexity stays within FRAC of dense on every prompt (default with --report "
                   f"and no budget flag: {budget.DEFAULT_PPL_TARGET:g}, +0.5%%)")
    p.add_argument("--budgets", type=_budget, nargs="+", metavar="L1",
                   help="--ppl-target's candidate l1 budgets (default "
                   f"{' '.join(f'{b:g}' for b in budget.DEFAULT_CANDIDATES)}); each one's PV "
                   f"budget keeps the ratio --pv-l1 / --l1 ({PV_RATIO:g} by default)")
    p.add_argument("--keep-candidates", action="store_true",
                   help="with --ppl-target, also write every candidate's thresholds next to "
                   "--out as STEM.l1_X.safetensors (the whole curve: serve another point "
                   "without calibrating again)")
    p.add_argument("--plot", metavar="PNG", help="write a heatmap of sparsity per (layer, head) (an "
                   "existing file is only replaced if it is a heatmap sparge-calibrate wrote)")
    search = p.add_argument_group("search (docs/METHOD.md, \"Calibration\")")
    search.add_argument("--allocation", choices=ALLOCATIONS, default="model",
                        help="model (default): the l1 budget bounds the mean error over the heads "
                        "of the layers sharing it, spent where it skips the most blocks; head: "
                        "it bounds every head's error")
    search.add_argument("--layer-sensitivity", action="store_true",
                        help="--allocation model: move the budget between layers by how much "
                        "each layer's error changes the model's output, measured by serving each "
                        "candidate's allocation one layer at a time on calibration prompts (a "
                        "pass per layer and candidate; two more per candidate check the result)")
    search.add_argument("--sensitivity-prompts", type=_positive_int, default=1,
                        help="--layer-sensitivity: calibration prompts it measures on (default 1)")
    search.add_argument("--quantile", type=float, default=1.0,
                        help="a setting must meet the budget on this quantile of the samples "
                        "(default 1.0: on every sample)")
    search.add_argument("--sparsity-floor", type=_fraction, default=0.1,
                        help="heads with less block sparsity are calibrated dense (default 0.1)")
    search.add_argument("--layer-sparsity-floor", type=_fraction, default=0.1,
                        help="a layer whose heads together skip less (dense heads at 0) is "
                        "calibrated dense: the sparse path would cost it more (default 0.1)")
    search.add_argument("--sim-grid", type=float, nargs="+", default=list(DEFAULT_SIM_GRID),
                        metavar="S", help="simthreshd1 candidates in [-1, 1]")
    search.add_argument("--cdf-points", type=_positive_int, default=SearchConfig.cdf_points,
                        help="--allocation model: cdfthreshd grid points per simthreshd1 "
                        f"(default {SearchConfig.cdf_points})")
    search.add_argument("--cdf-steps", type=_positive_int, default=SearchConfig.cdf_steps,
                        help="--allocation head: bisection steps on cdfthreshd "
                        f"(default {SearchConfig.cdf_steps})")
    search.add_argument("--pv-steps", type=int, default=8,
                        help="bisection steps on pvthreshd (default 8; 0 = PV skip off, so "
                        "every layer can run attention_kernel fa3)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# ---- validation (every problem -> parser.error, exit code 2) -------------------------------------


def _check_file_arg(parser, flag: str, path: str, extensions: Sequence[str]) -> None:
    if not os.path.exists(path):
        parser.error(f"{flag}: {path} does not exist")
    if not os.path.isfile(path):
        parser.error(f"{flag}: {path} is not a file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in extensions:
        parser.error(f"{flag}: {path} must end with {' or '.join(extensions)} (got "
                     f"{ext or 'no extension'})")


def _check_output_arg(parser, flag: str, path: str, extension: str) -> Output:
    try:
        return check_output(flag, path, extension)
    except OutputError as e:
        parser.error(str(e))


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not os.path.isdir(args.model_dir):
        parser.error(f"MODEL_DIR {args.model_dir} is not a directory")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        parser.error(f"MODEL_DIR {args.model_dir} has no config.json (not a Hugging Face model "
                     "directory)")
    _check_file_arg(parser, "--prompts", args.prompts, PROMPT_EXTENSIONS)
    args.out_file = _check_output_arg(parser, "--out", args.out, ".safetensors")
    if args.report is not None:
        _check_file_arg(parser, "--report", args.report, PROMPT_EXTENSIONS)
    args.plot_file = None
    if args.plot is not None:
        args.plot_file = _check_output_arg(parser, "--plot", args.plot, ".png")
    if args.max_len is not None and args.max_len < MIN_PROMPT_TOKENS:
        parser.error(f"--max-len {args.max_len} is below the minimum calibration prompt length of "
                     f"{MIN_PROMPT_TOKENS} tokens (three query blocks of {BLKQ})")
    if not 0.0 < args.quantile <= 1.0:
        parser.error(f"--quantile {args.quantile:g} must be in (0, 1]")
    if any(not -1.0 <= s <= 1.0 for s in args.sim_grid):
        parser.error(f"--sim-grid values must be in [-1, 1], got {args.sim_grid}")
    if args.pv_steps < 0:
        parser.error(f"--pv-steps {args.pv_steps} must be >= 0")
    if args.layer_sensitivity and args.allocation != "model":
        parser.error("--layer-sensitivity moves the model-wide allocation's budget between "
                     "layers: drop it or use --allocation model")
    if args.cdf_points < 2:
        parser.error(f"--cdf-points {args.cdf_points} must be >= 2 (the grid spans cdfthreshd "
                     "0.44 to 0.99997)")
    budget.resolve(parser, args)
    args.candidate_files = {l1: _check_output_arg(parser, "--keep-candidates", path, ".safetensors")
                            for l1, path in budget.candidate_paths(args).items()}
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available (use --device cpu)")
    if args.tensor_parallel_size != 1 and args.driver != "vllm":
        parser.error(f"--tensor-parallel-size {args.tensor_parallel_size} needs --driver vllm (the "
                     "transformers driver runs on one device)")
    if args.driver == "vllm" and args.device != "cuda":
        parser.error("--driver vllm needs --device cuda (vLLM serves on the GPU); use --driver hf "
                     "on CPU")
    if args.device == "cuda" and args.tensor_parallel_size > torch.cuda.device_count():
        parser.error(f"--tensor-parallel-size {args.tensor_parallel_size}: only "
                     f"{torch.cuda.device_count()} CUDA GPU(s) are visible")
    if args.device == "cpu" and args.dtype in ("bfloat16", "float16"):
        parser.error(f"--dtype {args.dtype} on CPU: the CPU reference computes in float32; use "
                     "--dtype float32 (or auto)")


def _tokenizer(model_dir: str):
    state: dict = {}

    def tokenize(text: str) -> list[int]:
        if "tok" not in state:
            from transformers import AutoTokenizer

            try:
                state["tok"] = AutoTokenizer.from_pretrained(model_dir)
            except Exception as e:  # transformers raises many types for a missing tokenizer
                raise PromptError(
                    f"prompts are text but no tokenizer loads from {model_dir} ({type(e).__name__}"
                    f"); add the tokenizer files or give `prompt_token_ids` in a .jsonl file"
                ) from None
        # NOTE: special tokens (BOS) as serving adds them
        return list(state["tok"](text)["input_ids"])

    return tokenize


def _load(parser, flag: str, path: str, model_dir: str, info, max_len: int | None, minimum: int,
          limit: int | None = None, driver: str = "hf") -> list[list[int]]:
    try:
        prompts = load_prompts(path, _tokenizer(model_dir), info.vocab_size)
        if limit is not None:
            prompts = prompts[:limit]
        if max_len is not None:
            prompts = [p[:max_len] for p in prompts]
        check_lengths(prompts, minimum, path)
    except PromptError as e:
        parser.error(f"{flag}: {e}")
    longest = max(len(p) for p in prompts)
    # NOTE: the vLLM capture engine generates one token after each prompt, and vLLM keeps
    # prompt + output within max_position_embeddings
    positions = info.max_positions - (driver == "vllm") if info.max_positions else None
    if positions and longest > positions:
        why = " less the token the vLLM capture generates" if driver == "vllm" else ""
        parser.error(f"{flag}: a prompt has {longest} tokens, more than the model's "
                     f"max_position_embeddings {info.max_positions}{why}; pass --max-len "
                     f"{positions} or shorter prompts")
    return prompts


def _dtype(args, info) -> torch.dtype:
    if args.dtype != "auto":
        return getattr(torch, args.dtype)
    if args.device == "cpu":
        return torch.float32
    if info.torch_dtype in (torch.bfloat16, torch.float16):
        return info.torch_dtype
    return torch.bfloat16


# ---- main ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    saved: dict[str, str] = {}  # flag -> where its file was written, for the Ctrl-C message
    try:
        return _main(parser, args, saved)
    except KeyboardInterrupt:
        if "--out" in saved:
            state = f"the thresholds are in {saved['--out']}"
        elif args.out_file.existed:
            state = f"nothing was written; the existing {args.out} is unchanged"
        else:
            state = f"nothing was written ({args.out} was not created)"
        print(f"sparge-calibrate: interrupted; {state}", file=sys.stderr)
        return 130


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace, saved: dict[str, str]) -> int:
    from .hf_driver import model_info

    try:
        info = model_info(args.model_dir)
    except (ValueError, OSError) as e:
        parser.error(f"MODEL_DIR {args.model_dir}: {e}")
    from sparge_serve.kernels import SUPPORTED_HEAD_DIMS

    if info.head_dim not in SUPPORTED_HEAD_DIMS:
        parser.error(f"MODEL_DIR {args.model_dir}: head dim {info.head_dim} is not served by "
                     f"sparge_serve's kernels (supported: {SUPPORTED_HEAD_DIMS})")
    if info.num_heads % info.num_kv_heads:
        parser.error(f"MODEL_DIR {args.model_dir}: {info.num_heads} query heads are not a multiple "
                     f"of {info.num_kv_heads} KV heads")
    tp = args.tensor_parallel_size
    if tp > info.num_kv_heads or info.num_kv_heads % tp:
        parser.error(f"--tensor-parallel-size {tp}: the capture needs it to divide the model's "
                     f"{info.num_kv_heads} KV heads (KV heads replicated across ranks are not "
                     "supported)")
    cands = budget.candidates(parser, args, info.num_layers)
    prompts = _load(parser, "--prompts", args.prompts, args.model_dir, info, args.max_len,
                    MIN_PROMPT_TOKENS, args.samples, args.driver)
    heldout = None
    if args.report is not None:
        heldout = _load(parser, "--report", args.report, args.model_dir, info, args.max_len, 2,
                        driver=args.driver)
    config = SearchConfig(
        sim_grid=tuple(args.sim_grid), cdf_steps=args.cdf_steps, pv_steps=args.pv_steps,
        sparsity_floor=args.sparsity_floor, layer_sparsity_floor=args.layer_sparsity_floor,
        rule=args.sim_rule, quantile=args.quantile, allocation=args.allocation,
        cdf_points=args.cdf_points,
    )
    try:
        return _run(args, info, cands, prompts, heldout, config, saved)
    except (RuntimeError, ValueError) as e:
        print(f"sparge-calibrate: error: {e}", file=sys.stderr)
        return 1


def _save(out: Output, extension: str, write, what: str, saved: dict[str, str]) -> bool:
    """Write one output atomically; if that fails, save a copy elsewhere and say where (one line
    on stderr). True if the output is in place."""
    try:
        write_atomic(out, extension, write)
    except Exception as e:  # any failure to write: keep the results, say why
        cause = str(e) if isinstance(e, OutputError) else describe_cause(e)
        copy = save_copy(out, write)
        if copy is not None:
            saved[out.flag] = copy
            where = (f"{what} are saved in {copy} instead; move it into place with "
                     f"`mv {shlex.quote(copy)} {shlex.quote(out.path)}`")
        else:
            where = (f"no copy could be written next to it or in {tempfile.gettempdir()} either, "
                     f"so the {what} are lost; free space or fix the folder and run again")
        print(f"sparge-calibrate: error: cannot write {out.flag} {out.path} ({cause}); {where}",
              file=sys.stderr)
        return False
    saved[out.flag] = out.path
    replaced = " (replaced the previous file)" if out.existed else ""
    print(f"wrote {out.path}{replaced}")
    return True


def _thresholds(args, info, cand, searched: dict, config, prompts):
    """The thresholds file of one budget (``cand``) and its per-layer results: the searched
    layers' (``searched``, by layer index), sliding-window layers dense."""
    from sparge_serve.thresholds import Thresholds

    from .prompts import prompts_sha256
    from .search import dense_layer_result, stack_results

    results = [searched[i] if i in searched else dense_layer_result(
        info.num_heads, cand.layers[i], config.rule, window=True) for i in range(info.num_layers)]
    th = Thresholds(
        **stack_results(results), num_kv_heads=info.num_kv_heads, head_dim=info.head_dim,
        blkq=BLKQ, blkk=BLKK,
        model=os.path.normpath(args.model_dir),  # identity proper is config_hash
        config_hash=info.config_hash, l1=cand.l1, pv_l1=cand.pv_l1,
        l1_budget=torch.tensor([r.budget.l1 for r in results], dtype=torch.float32),
        pv_l1_budget=torch.tensor([r.budget.pv_l1 for r in results], dtype=torch.float32),
        sim_rule=args.sim_rule, allocation=config.allocation, num_prompts=len(prompts),
        prompts_sha256=prompts_sha256(prompts),
    )
    return th, results


def _run(args, info, cands, prompts, heldout, config, saved: dict[str, str]) -> int:
    from sparge_serve.thresholds import Thresholds, save_thresholds

    from .evaluators import make_evaluator
    from .hf_driver import load_model, quality_report
    from .pipeline import search_candidates
    from .summary import format_quality, format_summary, plot_heatmap, print_table

    dtype = _dtype(args, info)
    lengths = sorted(len(p) for p in prompts)
    logger.info("calibrating %s: %d layers x %d heads (%d KV heads, head dim %d) on %d prompts of "
                "%d-%d tokens; driver %s, device %s, %s", args.model_dir, info.num_layers,
                info.num_heads, info.num_kv_heads, info.head_dim, len(prompts), lengths[0],
                lengths[-1], args.driver, args.device, dtype)
    if args.ppl_target is not None:
        logger.info("budget: the largest of l1 %s whose held-out perplexity stays within +%g%% "
                    "of dense (--ppl-target; --l1 fixes the budget instead)",
                    " / ".join(f"{c.l1:g}" for c in cands), 100 * args.ppl_target)

    model = None
    if args.driver == "hf":
        model = load_model(args.model_dir, args.device, dtype, "sdpa")
    if info.window_layers:
        logger.info("sliding-window layers %s run dense when served: written dense, not searched",
                    sorted(info.window_layers))
    found, evaluator = search_candidates(args, info, cands, prompts, config, dtype, model)
    if evaluator is None:  # every layer windowed: nothing was captured
        evaluator = make_evaluator(args.device)
    made = [_thresholds(args, info, cand, results, config, prompts)
            for cand, results in zip(cands, found, strict=True)]

    def quality(named):  # held-out quality of the named thresholds and of the untuned defaults
        nonlocal model
        d = Thresholds.defaults(info.num_layers, info.num_heads, info.num_kv_heads,
                                info.head_dim)
        settings = {name: (t.simthreshd1, t.cdfthreshd, t.pvthreshd) for name, t in named}
        settings["untuned defaults"] = (d.simthreshd1, d.cdfthreshd, d.pvthreshd)
        if model is None:
            model = load_model(args.model_dir, args.device, dtype, "sdpa")
        return quality_report(args.model_dir, heldout, settings, evaluator, args.device, dtype,
                              model=model, progress=not args.quiet)

    rows_q, pick = None, 0
    if args.ppl_target is not None:  # NOTE: the file to write is the one the report chooses
        rows_q = quality([(c.name, t) for c, (t, _) in zip(cands, made, strict=True)])
        rise = {r.name: budget.perplexity_rise(r) for r in rows_q}
        pick, met = budget.choose(cands, rise, args.ppl_target)
        tried = ", ".join(f"{c.name}: {rise[c.name]:+.2%}" for c in cands)
        if met:
            logger.info("budget %s: held-out perplexity %+.2f%% of dense (worst prompt), within "
                        "the target +%g%% (%s)", cands[pick].name, 100 * rise[cands[pick].name],
                        100 * args.ppl_target, tried)
        else:
            print(f"sparge-calibrate: warning: no budget keeps held-out perplexity within "
                  f"+{args.ppl_target:.2%} of dense on every prompt ({tried}); writing the most "
                  f"accurate, {cands[pick].name}: try smaller --budgets", file=sys.stderr)
    th, results = made[pick]
    ok = _save(args.out_file, ".safetensors", lambda path: save_thresholds(path, th),
               "the calibrated thresholds", saved)
    for cand, (t, _) in zip(cands, made, strict=True):
        if cand.l1 in args.candidate_files:
            ok &= _save(args.candidate_files[cand.l1], ".safetensors",
                        lambda path, t=t: save_thresholds(path, t), f"the {cand.name} thresholds",
                        saved)
    if args.layer_l1 or args.layer_pv_l1:
        logger.info("per-layer budgets (l1/pv_l1): %s", ", ".join(
            f"{i}:{b.l1:g}/{b.pv_l1:g}" for i, b in enumerate(cands[pick].layers)))

    header, rows, footer = format_summary(results)
    print_table(f"SpargeAttn calibration: {info.name}", header, rows, footer)
    if args.plot_file is not None:
        title = (f"{info.name}: block sparsity per head (l1 {cands[pick].l1:g}, pv "
                 f"{cands[pick].pv_l1:g}, {args.sim_rule}, {config.allocation} allocation)")
        ok &= _save(args.plot_file, ".png", lambda path: plot_heatmap(results, path, title),
                    "the heatmap", saved)

    if heldout is not None:
        rows_q = rows_q or quality([("calibrated", th)])
        header, body, footer = format_quality(rows_q)
        print_table(f"held-out quality ({len(heldout)} prompts, {args.report})", header, body,
                    footer)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
