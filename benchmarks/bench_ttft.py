"""Time to first token and decode throughput: SPARGE vs FLASH_ATTN in vLLM (GPU).

    python benchmarks/bench_ttft.py --model models/sparge-tiny-code \
        --lengths 8192 32768 65536 131072 --out benchmarks/results/ttft [--thresholds FILE] \
        [--backends FLASH_ATTN FLASHINFER FLASH_ATTN@64 SPARGE]

Each backend runs in its own process (one in-process engine each, same settings: prefix caching
off, chunked prefill with ``--chunk`` tokens per step, CUDA graphs on). Prompts are real Python
source (the installed vLLM package's files) tokenized with the model's tokenizer, so attention has
the structure of real text. TTFT = wall time of ``generate(max_tokens=1)`` for one prompt, median
of ``--repeats`` after a warm-up; block sparsity is read from the backend's GPU counters. Decode
throughput for ``--decode-batch`` prompts of ``--decode-len`` tokens (512; a long one makes the
attention, and so the page size, matter) x 256 new tokens: the 255 tokens after the first per
prompt over the time of the whole batch minus that of the same batch with one new token (its
prefill, which at 8K context is a third of the run and would otherwise count); median of
``--decode-repeats`` runs. The end-to-end rate (prefill included) is kept as ``e2e_tok_per_s``. ``--profile-lengths``: one more prefill of each such length
under ``torch.profiler``, to split its TTFT into GPU kernel time and the rest (host work, launch
gaps); the slowest kernels are listed. ``--profile-decode``: the same split per decode step.
Writes ``<out>.json``, ``<out>.md`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def corpus_ids(model: str, n_tokens: int) -> list[int]:
    """Token ids of concatenated vLLM source files (available offline wherever vLLM is)."""
    import vllm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    root = os.path.dirname(vllm.__file__)
    ids: list[int] = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        with open(path, encoding="utf-8", errors="replace") as f:
            ids += tok.encode(f.read(), add_special_tokens=False)
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        raise SystemExit(f"corpus has only {len(ids)} tokens, {n_tokens} needed")
    return ids[:n_tokens]


def _block_counters():
    """(valid, computed) blocks summed over layers, or None if the SPARGE backend is not active."""
    import torch

    from sparge_serve.metrics import stats

    st = stats._STATS
    if st is None:
        return None
    torch.cuda.synchronize()
    b = st.blocks.sum(0).tolist()
    return b[0], b[1]


def profile_generate(llm, prompts, params) -> dict:
    """One ``generate`` under ``torch.profiler``: wall ms, summed GPU kernel ms (kernels of
    every stream; overlapping kernels count twice) and the ten kernels with the most GPU time."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    # the kernels' own events (CPU ops also carry the device time of what they launched)
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return dict(wall_ms=wall * 1e3,
                gpu_kernel_ms=sum(e.self_device_time_total for e in kernels) / 1e3,
                top=[(e.key[:80], e.count, e.self_device_time_total / 1e3) for e in kernels[:10]])


# SPARGE variants: pvoff = the thresholds with the PV skip off (so that every layer can use
# attention_kernel fa3); fa3 = pvoff with attention_kernel fa3
VARIANTS = ("", "pvoff", "fa3")


def _pv_off_copy(path: str) -> str:
    """A temporary copy of the thresholds file ``path`` with every ``pvthreshd`` at 50 (off)."""
    import dataclasses

    import torch

    from sparge_serve.thresholds import load_thresholds, save_thresholds

    th = load_thresholds(path)
    with tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False) as f:
        out = f.name
    save_thresholds(out, dataclasses.replace(th, pvthreshd=torch.full_like(th.pvthreshd, 50.0)))
    return out


def host_times(llm, prompts, params, n: int = 1) -> dict[str, tuple[int, float, float]]:
    """Host (Python) time by function over ``n`` ``generate`` calls under ``cProfile``:
    ``{"dir/file.py:line(function)": (calls, own s, cumulative s)}``."""
    import cProfile
    import pstats

    import torch

    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    prof.disable()
    out: dict[str, tuple[int, float, float]] = {}
    for (file, line, func), (_, calls, own, cum, _) in pstats.Stats(prof).stats.items():
        name = f"{'/'.join(file.split('/')[-2:])}:{line}({func})"
        c0, o0, t0 = out.get(name, (0, 0.0, 0.0))
        out[name] = (c0 + calls, o0 + own, t0 + cum)
    return out


def host_profile_diff(llm, prompts, short_params, long_params, steps: int, n: int = 25) -> dict:
    """Host (Python) time per decode step by function: ``cProfile`` of ``generate`` with
    ``long_params`` minus with ``short_params`` (``steps`` more decode steps), in ms per step;
    the ``n`` functions with the most own time and the ``n`` with the most cumulative time."""
    short = host_times(llm, prompts, short_params)
    long = host_times(llm, prompts, long_params)
    rows = []
    for name, (nc, tt, ct) in long.items():
        nc0, tt0, ct0 = short.get(name, (0, 0.0, 0.0))
        rows.append((name, (nc - nc0) / steps, (tt - tt0) * 1e3 / steps,
                     (ct - ct0) * 1e3 / steps))
    own = sorted(rows, key=lambda r: -r[2])[:n]
    cum = sorted(rows, key=lambda r: -r[3])[:n]
    return dict(own=[dict(fn=f, calls=c, own_ms=t, cum_ms=ct) for f, c, t, ct in own],
                cumulative=[dict(fn=f, calls=c, own_ms=t, cum_ms=ct) for f, c, t, ct in cum])


def worker(args) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from vllm import LLM, SamplingParams

    max_len = max(args.lengths)
    ids = corpus_ids(args.model, 2 * max_len + 64)
    kw = {}
    backend, _, page = args.backend.partition("@")
    if page:
        kw["block_size"] = int(page)
    backend, _, variant = backend.partition("+")
    if variant not in VARIANTS or (variant and backend != "SPARGE"):
        raise SystemExit(f"unknown backend variant {args.backend!r} (SPARGE+"
                         f"{'|'.join(v for v in VARIANTS if v)})")
    if backend == "SPARGE":
        sparge = {"min_sparse_len": args.min_sparse_len}
        if variant == "fa3":
            sparge["attention_kernel"] = "fa3"
        sparge["thresholds"] = args.thresholds or "untuned"
        if args.thresholds and variant in ("pvoff", "fa3"):
            sparge["thresholds"] = _pv_off_copy(args.thresholds)
        kw["additional_config"] = {"sparge": sparge}
    # NOTE: lengths past the model's trained context need a longer RoPE table: positions are
    # extrapolated (rope_theta 1e6), fine for timing; sparsity there is the model's, as measured.
    llm = LLM(
        model=args.model, attention_backend=backend, max_model_len=max_len + 512,
        enable_prefix_caching=False, max_num_batched_tokens=args.chunk,
        gpu_memory_utilization=0.8, seed=0,
        hf_overrides={"max_position_embeddings": max_len + 512}, **kw,
    )
    one = SamplingParams(max_tokens=1, temperature=0.0)
    rows = []
    for length in args.lengths:
        prompt = {"prompt_token_ids": ids[max_len : max_len + length]}
        llm.generate([{"prompt_token_ids": ids[:length]}], one, use_tqdm=False)  # warm-up
        before = _block_counters()
        times = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            llm.generate([prompt], one, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        after = _block_counters()
        row = dict(backend=args.backend, length=length, ttft_s=statistics.median(times),
                   ttft_all_s=times)
        if before is not None and after is not None and after[0] > before[0]:
            row["block_sparsity"] = 1.0 - (after[1] - before[1]) / (after[0] - before[0])
        if length in args.profile_lengths:
            row["profile"] = profile_generate(llm, [prompt], one)
        rows.append(row)
        print(json.dumps(row), flush=True)
    # decode throughput
    n, new, plen = args.decode_batch, 256, args.decode_len
    starts = [(i * plen) % (len(ids) - plen) for i in range(n)]
    prompts = [{"prompt_token_ids": ids[s : s + plen]} for s in starts]
    gen = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:4], gen, use_tqdm=False)  # warm-up
    # NOTE: a small model's decode is host-bound and one run varies by tens of percent between
    # processes: report the median of --decode-repeats runs and their spread.
    rates, e2e = [], []
    for _ in range(args.decode_repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate(prompts, one, use_tqdm=False)  # the batch's prefill (and first token)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = llm.generate(prompts, gen, use_tqdm=False)
        dt = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        rates.append((tokens - len(outs)) / max(dt - t_prefill, 1e-9))
        e2e.append(tokens / dt)
    row = dict(backend=args.backend, decode_tokens=tokens,
               decode_tok_per_s=statistics.median(rates), decode_tok_per_s_all=rates,
               e2e_tok_per_s=statistics.median(e2e))
    if args.profile_decode:
        # the batch with 1 and with 65 new tokens: the difference is 64 decode steps
        gen65 = SamplingParams(max_tokens=65, temperature=0.0, ignore_eos=True)
        short = profile_generate(llm, prompts, one)
        long = profile_generate(llm, prompts, gen65)
        row["decode_profile"] = dict(
            step_wall_ms=(long["wall_ms"] - short["wall_ms"]) / 64,
            step_gpu_kernel_ms=(long["gpu_kernel_ms"] - short["gpu_kernel_ms"]) / 64,
            top=long["top"],
            host_top=host_profile_diff(llm, prompts, one, gen65, steps=64))
    rows.append(row)
    print(json.dumps(rows[-1]), flush=True)
    with open(args.worker_out, "w") as f:
        json.dump(rows, f)


def report(rows, meta, out) -> None:
    ttft = {(r["backend"], r["length"]): r["ttft_s"] for r in rows if "length" in r}
    dec = {r["backend"]: r["decode_tok_per_s"] for r in rows if "decode_tok_per_s" in r}
    ok = [b for b in meta["backends"] if b not in meta["failed"]]
    sparges = [b for b in ok if b.split("@")[0].split("+")[0] == "SPARGE"]
    baselines = [b for b in ok if b not in sparges]
    for r in rows:
        if r.get("backend") in sparges and "length" in r:
            for b in baselines:
                if (b, r["length"]) in ttft:
                    r[f"ttft_speedup_vs_{b}"] = ttft[(b, r["length"])] / r["ttft_s"]
    nan = float("nan")
    lines = [
        f"# TTFT and decode: {', '.join(sparges)} vs {', '.join(baselines)} — {meta['device']}, "
        f"{meta['date']}",
        "",
        f"`{meta['command']}` — vllm {meta['vllm']}, torch {meta['torch']}, triton "
        f"{meta['triton']}; model `{meta['model']}`; chunked prefill {meta['chunk']} tokens/step, "
        f"prefix caching off; thresholds: {meta['thresholds'] or 'the untuned ones'}; "
        f"min_sparse_len {meta['min_sparse_len']}. TTFT = median wall time of one "
        "`generate(max_tokens=1)`. `NAME@64`: that backend with 64-token pages (SPARGE's page "
        "size; the others default to 16). `SPARGE+pvoff`: the thresholds with the PV skip off; `SPARGE+fa3`: those with `attention_kernel` fa3.",
        "",
        "| length | " + " | ".join(f"{b} TTFT s" for b in baselines) + " | variant | TTFT s | "
        + " | ".join(f"vs {b}" for b in baselines) + " | block sparsity |",
        "|---|" + "---|" * (2 * len(baselines) + 3),
    ]
    for r in sorted((r for r in rows if r.get("backend") in sparges and "length" in r),
                    key=lambda r: (r["length"], sparges.index(r["backend"]))):
        n = r["length"]
        lines.append(
            f"| {n} | " + " | ".join(f"{ttft.get((b, n), nan):.4f}" for b in baselines)
            + f" | {r['backend']} | {r['ttft_s']:.4f} | "
            + " | ".join(f"{r.get(f'ttft_speedup_vs_{b}', nan):.2f}x" for b in baselines)
            + f" | {r.get('block_sparsity', nan):.3f} |")
    if dec:
        base = dec.get("FLASH_ATTN", nan)
        e2e = {r["backend"]: r["e2e_tok_per_s"] for r in rows if "e2e_tok_per_s" in r}
        lines += ["", f"Decode throughput ({meta['decode_batch']} prompts of "
                      f"{meta.get('decode_len', 512)} tokens x 256 new tokens, the prefill's time "
                      f"taken out, median of {meta['decode_repeats']} runs), ratio to FLASH_ATTN: "
                      + ", ".join(f"{b} {v:.0f} tok/s ({v / base:.3f})" for b, v in dec.items())
                      + "."]
        if e2e:
            e2e_base = e2e.get("FLASH_ATTN", nan)
            lines += ["", "End to end (prefill included): " + ", ".join(
                f"{b} {v:.0f} tok/s ({v / e2e_base:.3f})" for b, v in e2e.items()) + "."]
        meta["decode_ratio"] = dec.get("SPARGE", nan) / base
    profiled = [r for r in rows if "profile" in r]
    if profiled:
        lines += ["", "One more prefill per backend under `torch.profiler` (`--profile-lengths`): "
                  "wall ms, GPU kernel ms summed, and the rest (host work and launch gaps; the "
                  "profiler's own overhead inflates it).", "",
                  "| backend | length | wall ms | GPU kernel ms | rest ms | top kernels (ms) |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(profiled, key=lambda r: (r["length"], r["backend"])):
            p = r["profile"]
            top = "; ".join(f"{name} x{n}: {ms:.2f}" for name, n, ms in p["top"][:4])
            lines.append(f"| {r['backend']} | {r['length']} | {p['wall_ms']:.1f} | "
                         f"{p['gpu_kernel_ms']:.1f} | {p['wall_ms'] - p['gpu_kernel_ms']:.1f} | "
                         f"{top.replace('|', '/')} |")
    dprof = [r for r in rows if "decode_profile" in r]
    if dprof:
        lines += ["", "Per decode step under `torch.profiler` (`--profile-decode`; the batch with "
                  "65 new tokens minus with 1, over 64 steps):", "",
                  "| backend | wall ms / step | GPU kernel ms / step |", "|---|---|---|"]
        lines += [f"| {r['backend']} | {r['decode_profile']['step_wall_ms']:.2f} | "
                  f"{r['decode_profile']['step_gpu_kernel_ms']:.2f} |" for r in dprof]
        for r in dprof:
            top = r["decode_profile"].get("host_top")
            if not top:
                continue
            lines += ["", f"{r['backend']}: host (Python) ms per decode step by function "
                      "(`cProfile`, the same difference; the 12 with the most cumulative time):",
                      "", "| function | calls / step | own ms | cumulative ms |", "|---|---|---|---|"]
            lines += [f"| `{e['fn']}` | {e['calls']:.1f} | {e['own_ms']:.3f} | {e['cum_ms']:.3f} |"
                      for e in top["cumulative"][:12]]
    for b, why in meta["failed"].items():
        lines += ["", f"{b} did not run: {why}"]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for backend in meta["backends"]:
        rs = sorted((r for r in rows if r.get("backend") == backend and "length" in r),
                    key=lambda r: r["length"])
        ax.plot([r["length"] for r in rs], [r["ttft_s"] for r in rs], "o-", label=backend)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("TTFT (s)")
    ax.set_title(f"TTFT, {meta['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/sparge-tiny-code")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    ap.add_argument("--thresholds", default=None)
    ap.add_argument("--min-sparse-len", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-batch", type=int, default=32)
    ap.add_argument("--decode-len", type=int, default=512)
    ap.add_argument("--decode-repeats", type=int, default=5)
    ap.add_argument("--profile-lengths", type=int, nargs="*", default=[],
                    help="also profile one prefill of these lengths (torch.profiler)")
    ap.add_argument("--profile-decode", action="store_true",
                    help="also profile the decode batch (torch.profiler): wall and GPU kernel ms "
                    "per decode step")
    ap.add_argument("--out", default="benchmarks/results/ttft")
    ap.add_argument("--backends", nargs="+", default=["FLASH_ATTN", "SPARGE"],
                    help="vLLM attention backends (NAME, NAME@PAGE_SIZE, SPARGE+pvoff / SPARGE+fa3 "
                    "for the thresholds without PV skip, with the Triton / the FA3 attention "
                    "kernel); FLASH_ATTN is the reference, a failing baseline is reported and "
                    "skipped")
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.backend:
        worker(args)
        return
    import torch
    import triton
    import vllm

    rows, failed = [], {}
    for backend in args.backends:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            path = tmp.name
        cmd = [sys.executable, __file__, "--backend", backend, "--worker-out", path]
        for k in ("model", "thresholds", "min_sparse_len", "chunk", "repeats", "decode_batch",
                  "decode_len", "decode_repeats"):
            v = getattr(args, k)
            if v is not None:
                cmd += [f"--{k.replace('_', '-')}", str(v)]
        cmd += ["--lengths", *map(str, args.lengths)]
        cmd += ["--profile-lengths", *map(str, args.profile_lengths)]
        if args.profile_decode:
            cmd.append("--profile-decode")
        proc = subprocess.run(cmd, check=False, stderr=subprocess.PIPE, text=True)
        sys.stderr.write(proc.stderr[-20000:])
        if proc.returncode != 0:
            if backend in ("FLASH_ATTN", "SPARGE"):
                raise SystemExit(f"{backend} failed (exit {proc.returncode})")
            tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:]
            failed[backend] = f"exit {proc.returncode}: {tail[0][:300] if tail else '?'}"
            continue
        with open(path) as f:
            rows += json.load(f)
    meta = dict(
        device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
        vllm=vllm.__version__, torch=torch.__version__, triton=triton.__version__,
        model=args.model, chunk=args.chunk, thresholds=args.thresholds,
        min_sparse_len=args.min_sparse_len, decode_batch=args.decode_batch,
        decode_len=args.decode_len,
        decode_repeats=args.decode_repeats,
        backends=args.backends, failed=failed,
        command="python benchmarks/bench_ttft.py " + " ".join(sys.argv[1:]),
    )
    report(rows, meta, args.out)
    with open(args.out + ".md") as f:
        print(f.read())


if __name__ == "__main__":
    main()
