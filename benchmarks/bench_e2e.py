"""End-to-end speed at real models' geometries: SPARGE vs FLASH_ATTN in vLLM (GPU).

    python benchmarks/bench_e2e.py ttft --quick                  # the key TTFT rows, a few minutes
    python benchmarks/bench_e2e.py ttft decode serve --budget-s 540 --skip-done
    python benchmarks/bench_e2e.py ttft decode serve --dry-run   # the planned runs; no GPU needed
    python benchmarks/bench_e2e.py report                        # tables and plot from e2e.json
    python benchmarks/bench_e2e.py report --add other/e2e.json   # merge another call's results

Stages (any of them, in one call or in several):

- ``ttft``: one prompt, ``max_tokens=1``, at 8K-128K tokens; median of ``--repeats`` after
  ``--warmups`` (where a prefill is estimated under 0.1 s, enough repeats to span 3 s, up to
  200: ``e2e_plan.ttft_repeats``); one more prefill of each ``--profile-lengths``
  length under ``torch.profiler`` gives attention's share ``a`` of FLASH_ATTN's prefill, the
  attention speed-up ``k`` and the ceiling 1 / (1 - a + a/k), next to the measured TTFT ratio;
  ``--host-profile N`` adds N prefills of each such length under ``cProfile``: the host time by
  function, against the baseline's.
  ``--rounds N`` starts each engine N times, in turn (every second round in reverse order),
  for prefills bound by the host, whose speed can differ between engine processes more than
  between the backends.
- ``decode``: batches of 1, 8, 32 prompts at 8K and 32K context (prefix-cached), CUDA graphs on:
  tokens/s of the decode steps and inter-token latency. Points whose KV cache would pass
  ``--kv-budget-gib`` are left out (listed).
- ``serve``: ``vllm serve`` under ``vllm bench serve`` (random dataset, long inputs, 4-16 requests
  at a time, ``--save-result``): TTFT p50/p99, TPOT, request throughput, failed requests.
- ``report``: rewrites ``e2e.md`` and ``e2e.png`` from ``e2e.json``.

``--geometries gemma3_270m_real smollm2_135m_real`` (with ``--weights MODEL=DIR`` and
``--thresholds MODEL=FILE``) times the pretrained small models on held-out text instead, their
calibrated thresholds file as ``SPARGE@64:calibrated`` (and with its PV skip off,
``SPARGE@64:calibrated_nopv``): TTFT up to the model's context (``benchmarks/e2e_plan.py``).

Configurations are ``BACKEND@PAGE[:VARIANT]``: ``FLASH_ATTN@16`` (vLLM's default pages),
``FLASH_ATTN@64`` (the baseline of every SPARGE ratio: same page size), ``SPARGE@64:topkF`` (keep
the fraction F of key blocks: ``topk1.0`` is the sparse path at 0% block sparsity, 0.5 / 0.2 / 0.1
are 50 / 80 / 90%), ``SPARGE@64:untuned`` (the published untuned thresholds),
``SPARGE@64:defaults`` (the backend's default settings: no thresholds file, so every layer
attends densely, and the default ``min_sparse_len``) and ``SPARGE@64:dense`` (``mode: dense``); a ``+fp8`` suffix (``FLASH_ATTN@64+fp8``,
``SPARGE@64:topk0.5+fp8``) serves with ``--kv-cache-dtype fp8``, against FLASH_ATTN with the same
cache dtype (``+fp8dot``, SPARGE only: the same with ``fp8_attention``, the Triton kernel's
products in fp8); a last ``+fa3`` or ``+triton`` (``SPARGE@64:topk0.5+fa3``) sets SPARGE's
``attention_kernel`` (else ``auto``). The models are written here as Hugging Face config folders
and loaded with random weights (``load_format="dummy"``), so attention has no structure and
sparsity is set by ``topk``: the topk rows serve a thresholds file whose similarity gate passes
every block (``simthreshd1`` -1), since the default gate (0.6) finds random blocks dissimilar and
keeps them all. Each engine runs in its own process (``_worker``); rows stream back as they are
measured and are merged into ``<out>/e2e.json`` after every engine, so a call stopped at its time
limit keeps what it measured and a later call (``--skip-done``) runs only what is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_plan as plan  # noqa: E402
import e2e_report as report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROW, META = "E2E_ROW ", "E2E_META "  # the worker's stdout lines the driver reads

# ---- the driver --------------------------------------------------------------------------------
def run_worker(cmd: list[str], timeout: float | None, log_path: str,
               on_row=None) -> tuple[list[dict], dict, str | None]:
    """Runs a worker in its own process group, its output into ``log_path``: (rows, meta, why it
    failed or None). Rows arrive as ``E2E_ROW`` lines while it runs; past ``timeout`` seconds the
    group gets SIGTERM, then SIGKILL, and the rows so far are kept. Once the worker has exited,
    whatever it started and left running (a server) is killed with its group."""
    rows, meta, tail = [], {}, [""]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def read() -> None:
            for line in proc.stdout:
                log.write(line)
                if line.startswith(ROW):
                    rows.append(json.loads(line[len(ROW):]))
                    if on_row:
                        on_row(rows[-1])
                elif line.startswith(META):
                    meta.update(json.loads(line[len(META):]))
                elif line.strip():
                    tail[0] = line.strip()

        # NOTE: a thread reads, so that a child holding the pipe open cannot block the driver
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        timed_out = False
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(15)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                rc = proc.wait()
        _signal_group(proc.pid, signal.SIGKILL)
        reader.join(30)
    if timed_out:
        return rows, meta, f"stopped at its time limit ({timeout:.0f} s)"
    if rc != 0:
        return rows, meta, f"exit {rc}: {tail[0][:300] or '?'} (log {log_path})"
    return rows, meta, None


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _row_line(row: dict) -> str:
    keys = ("ttft_s", "block_sparsity", "tok_per_s", "itl_ms", "p50_ttft_ms", "p99_ttft_ms",
            "mean_tpot_ms", "request_throughput", "failed")
    point = {k: row[k] for k in ("length", "context", "batch", "concurrency") if k in row}
    vals = {k: round(row[k], 4) if isinstance(row[k], float) else row[k] for k in keys if k in row}
    return f"    {point} {vals}"


def drive(args) -> int:
    data = report.load_results(args.merge or os.path.join(args.out, "e2e.json"))
    try:
        jobs, left_out = plan.make_plan(args, data)
    except ValueError as e:  # a configuration or SPARGE option that cannot run
        print(f"bench_e2e: {e}", file=sys.stderr)
        return 2
    total = sum(j["est_s"] for j in jobs)
    print(f"{len(jobs)} engine runs planned, roughly {total / 60:.0f} min (a FLOP model and a "
          "startup guess, not a measurement)", flush=True)
    for i, job in enumerate(jobs, 1):
        print(f"  {i}. {plan.describe(job)}", flush=True)
    for why in left_out:
        print(f"  left out: {why}", flush=True)
    if args.dry_run:
        return 0
    t_start = time.monotonic()
    os.makedirs(args.log_dir, exist_ok=True)
    for name in sorted({j["geometry"] for j in jobs}):
        if plan.GEOMETRIES[name].weights:  # the converted folder serves; topk's file only
            plan.write_gate_open(name, args.model_dir)
        else:
            plan.write_geometry(name, args.model_dir, args.tokenizer)
    for job in jobs:
        if job["config"].split("+")[0].endswith(":calibrated_nopv"):
            key = plan.GEOMETRIES[job["geometry"]].weights
            try:
                plan.write_no_pv(job["geometry"], args.model_dir,
                                 plan.key_values(args.thresholds, "--thresholds")[key])
            except ValueError as e:  # not a thresholds file, or not this model's
                print(f"bench_e2e: --thresholds {key}: {e}", file=sys.stderr)
                return 2
    command = "python benchmarks/bench_e2e.py " + shlex.join(args.argv)
    run = report.start_run(data, dict(command=command, date=datetime.datetime.now().isoformat(
        timespec="seconds"), stages=args.stages))
    status = 0
    for i, job in enumerate(jobs, 1):
        remaining = None if args.budget_s is None else args.budget_s - (time.monotonic() - t_start)
        if remaining is not None and remaining < 60:
            print(f"[{i}/{len(jobs)}] not started (--budget-s spent): {plan.describe(job)}", flush=True)
            report.add_failure(data, job["stage"], job["geometry"], job["config"],
                               "not run: the call's --budget-s was spent", run)
            continue
        print(f"[{i}/{len(jobs)}] {plan.describe(job)}", flush=True)
        t0 = time.monotonic()
        log = os.path.join(args.log_dir, f"{job['stage']}_{job['geometry']}_"
                           f"{job['config'].replace('@', '_').replace(':', '_')}.log")
        cmd = [sys.executable, os.path.abspath(__file__), "_worker", json.dumps(job)]
        rows, meta, why = run_worker(cmd, remaining, log,
                                     on_row=lambda r: print(_row_line(r), flush=True))
        for k in ("device", "torch", "triton", "vllm"):
            if meta.get(k) and not data["runs"][run].get(k):
                data["runs"][run][k] = meta[k]
        report.add_rows(data, rows, run)
        if why:
            status = 1
            report.add_failure(data, job["stage"], job["geometry"], job["config"], why, run)
            print(f"    failed: {why}", flush=True)
        print(f"    {len(rows)} rows in {time.monotonic() - t0:.0f} s", flush=True)
        report.write_all(data, args.out, plan.DESCRIPTIONS)
    if jobs:
        print(f"wrote {', '.join(report.write_all(data, args.out, plan.DESCRIPTIONS))}")
    return status


# ---- the workers (one engine each, on the GPU) ------------------------------------------------
def _emit(prefix: str, obj: dict) -> None:
    print(prefix + json.dumps(obj), flush=True)


def _versions() -> dict:
    import torch
    import triton
    import vllm

    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, vllm=vllm.__version__)


def _engine(job: dict, max_len: int, **kw):
    from vllm import LLM

    c = report.parse_config(job["config"])
    if job["sparge"] is not None:
        kw["additional_config"] = {"sparge": job["sparge"]}
    overrides = plan.position_overrides(job["geometry"], max_len)
    load = "auto" if job.get("weights") else "dummy"  # trained weights or random ones
    return LLM(model=job["model"], load_format=load, skip_tokenizer_init=True,
               attention_backend=c["backend"], block_size=c["page"], max_model_len=max_len,
               max_num_batched_tokens=job["chunk"], dtype="bfloat16",
               gpu_memory_utilization=job["gpu_memory_utilization"], seed=0,
               kv_cache_dtype=c["kv_cache_dtype"], hf_overrides=overrides or None, **kw)


def _timed(llm, prompts, params) -> float:
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def ttft_worker(job: dict) -> None:
    import statistics

    import torch
    from bench_ttft import _block_counters
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams

    geo = plan.GEOMETRIES[job["geometry"]]
    # NOTE: CUDA graphs off: a prefill chunk of thousands of tokens runs without them anyway, and
    # capturing them would only lengthen the start
    llm = _engine(job, max(n for n, in job["points"]) + 256, enable_prefix_caching=False,
                  compilation_config={"cudagraph_mode": "NONE"})
    _emit(META, _versions())
    one = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    # a prompt a warm-up, a timed repeat and the profiled prefill (plan.ttft_repeats)
    counts = {n: job["warmups"] + plan.ttft_repeats(job, n) + 1 for n, in job["points"]}
    # real text for trained weights: the longest length's documents, cut for the shorter ones
    docs = (plan.document_prompts(job["model"], max(counts), max(counts.values()))
            if job.get("weights") else None)
    for n, in job["points"]:
        count = counts[n]
        if docs is not None:
            prompts = [{"prompt_token_ids": d["prompt_token_ids"][:n]} for d in docs[:count]]
        else:
            prompts = [geo.prompt(n, (n, i)) for i in range(count)]
        for p in prompts[:job["warmups"]]:
            _timed(llm, [p], one)
        before = _block_counters()
        times = [_timed(llm, [p], one) for p in prompts[job["warmups"]:-1]]
        after = _block_counters()
        row = dict(stage="ttft", geometry=job["geometry"], config=job["config"], length=n,
                   ttft_s=statistics.median(times), ttft_all_s=times)
        if "round" in job:
            row["round"] = job["round"]
        if before is not None and after is not None and after[0] > before[0]:
            row["block_sparsity"] = 1.0 - (after[1] - before[1]) / (after[0] - before[0])
        if n in job["profile_lengths"]:
            # other processes' load on the host while this row ran (a host-bound prefill slows
            # with it; the report shows it beside the compiled graphs' host time)
            row["host_load"] = os.getloadavg()[0]
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                wall = _timed(llm, [prompts[-1]], one)
            kernels = [(e.key, e.count, e.self_device_time_total / 1e3)
                       for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
            # the host's ops; its waits for the GPU (synchronisations) are not host work
            host = [(e.key, e.count, e.self_cpu_time_total / 1e3)
                    for e in prof.key_averages()
                    if e.device_type == DeviceType.CPU and "Synchronize" not in e.key]
            row["profile"] = report.kernel_summary(kernels, wall * 1e3, host)
            if job.get("host_profile"):
                row["host_profile"] = _host_profile(llm, prompts[-1], one, job["host_profile"])
        _emit(ROW, row)


def _host_profile(llm, prompt, params, n: int, top: int = 80) -> dict:
    """Host (Python) time by function over ``n`` prefills of ``prompt`` under ``cProfile``, in
    ms per prefill: the ``top`` functions with the most own time and with the most cumulative
    time (the profiler inflates small calls; compare configurations, not absolute times)."""
    from bench_ttft import host_times

    rows = [dict(fn=name, calls=calls / n, own_ms=own * 1e3 / n, cum_ms=cum * 1e3 / n)
            for name, (calls, own, cum) in host_times(llm, [prompt], params, n).items()]
    return dict(prefills=n, own=sorted(rows, key=lambda r: -r["own_ms"])[:top],
                cumulative=sorted(rows, key=lambda r: -r["cum_ms"])[:top])


def decode_worker(job: dict) -> None:
    import statistics

    from vllm import SamplingParams

    geo = plan.GEOMETRIES[job["geometry"]]
    new = job["new_tokens"]
    batches = sorted({b for _, b in job["points"]})
    llm = _engine(job, max(c for c, _ in job["points"]) + new + 64, enable_prefix_caching=True,
                  compilation_config={"cudagraph_capture_sizes": batches})
    _emit(META, _versions())
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
    gen = SamplingParams(max_tokens=new + 1, temperature=0.0, ignore_eos=True, detokenize=False)
    for ctx, b in job["points"]:
        prompts = [geo.prompt(ctx, (ctx, b, i)) for i in range(b)]
        _timed(llm, prompts, one)  # the prefill, which leaves the prompts in the prefix cache
        _timed(llm, prompts, gen)  # warm-up of the decode steps
        steps = []
        for _ in range(job["repeats"]):
            # NOTE: the same batch with 1 and with new + 1 tokens, both on cached prompts: the
            # difference is the new decode steps alone
            t_one = _timed(llm, prompts, one)
            steps.append(_timed(llm, prompts, gen) - t_one)
        dt = statistics.median(steps)
        _emit(ROW, dict(stage="decode", geometry=job["geometry"], config=job["config"],
                        context=ctx, batch=b, new_tokens=new, tok_per_s=b * new / dt,
                        itl_ms=dt / new * 1e3, steps_s_all=steps))


def serve_worker(job: dict) -> None:
    import socket
    import urllib.request

    c = report.parse_config(job["config"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    max_len = int(job["input_len"] * (1 + job["range_ratio"])) + job["output_len"] + 256
    cli = [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    cmd = cli + ["serve", job["model"], "--load-format", "dummy", "--attention-backend",
                 c["backend"], "--block-size", str(c["page"]), "--max-model-len", str(max_len),
                 "--max-num-batched-tokens", str(job["chunk"]), "--no-enable-prefix-caching",
                 "--gpu-memory-utilization", str(job["gpu_memory_utilization"]), "--seed", "0",
                 "--served-model-name", "e2e", "--host", "127.0.0.1", "--port", str(port),
                 "--kv-cache-dtype", c["kv_cache_dtype"]]
    if job["sparge"] is not None:
        cmd += ["--additional-config", json.dumps({"sparge": job["sparge"]})]
    overrides = plan.position_overrides(job["geometry"], max_len)
    if overrides:
        cmd += ["--hf-overrides", json.dumps(overrides)]
    env = dict(os.environ)
    print("serve: " + " ".join(cmd), flush=True)
    server = subprocess.Popen(cmd, env=env)

    def metrics() -> str:
        with urllib.request.urlopen(f"{base}/metrics", timeout=30) as r:
            return r.read().decode()

    try:
        deadline = time.monotonic() + 900
        while True:
            if server.poll() is not None:
                raise SystemExit(f"vllm serve exited with {server.returncode} before it was up")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("vllm serve was not up after 900 s")
            time.sleep(2)
        _emit(META, _versions())
        for conc, in job["points"]:
            n = max(conc, job["prompts_per_concurrency"] * conc)
            before = report.block_counts(metrics())
            with tempfile.TemporaryDirectory() as tmp:
                bench = cli + [
                    "bench", "serve", "--backend", "vllm", "--base-url", base, "--model", "e2e",
                    "--tokenizer", job["model"], "--dataset-name", "random",
                    "--random-input-len", str(job["input_len"]),
                    "--random-output-len", str(job["output_len"]),
                    "--random-range-ratio", str(job["range_ratio"]), "--num-prompts", str(n),
                    "--max-concurrency", str(conc), "--num-warmups", str(conc), "--ignore-eos",
                    "--seed", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
                    "--metric-percentiles", "50,99", "--save-result", "--result-dir", tmp,
                    "--result-filename", "bench.json"]
                print("bench: " + " ".join(bench), flush=True)
                subprocess.run(bench, env=env, check=True)
                with open(os.path.join(tmp, "bench.json")) as f:
                    result = json.load(f)
            time.sleep(3)  # the block counters reach /metrics a step or two late
            after = report.block_counts(metrics())
            row = report.serve_row(result, before, after)
            row.update(stage="serve", geometry=job["geometry"], config=job["config"],
                       concurrency=conc, num_prompts=n, input_len=job["input_len"],
                       output_len=job["output_len"], range_ratio=job["range_ratio"])
            _emit(ROW, row)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def worker(job: dict) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if job["stage"] == "serve":
        serve_worker(job)
        return
    # the engine in this process: its kernels are profiled and its block counters read here
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    (ttft_worker if job["stage"] == "ttft" else decode_worker)(job)


# ---- the command line --------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Stages: ttft, decode, serve (GPU), "
        "report (no GPU). Each call merges into <out>/e2e.json (or --merge FILE). Without "
        f"--quick the per-stage options default to {json.dumps(plan.FULL)}; with it, per stage, to "
        f"{json.dumps(plan.QUICK)}.")
    ap.add_argument("stages", nargs="+", choices=[*report.STAGES, "report"])
    ap.add_argument("--quick", action="store_true", help="the most important rows only")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the planned engine runs and what is left out; run nothing")
    ap.add_argument("--geometries", nargs="+", default=["llama8b"],
                    choices=list(plan.GEOMETRIES))
    ap.add_argument("--configs", nargs="+", help="BACKEND@PAGE[:VARIANT] for every requested "
                    f"stage (default per stage: {json.dumps(plan.DEFAULTS)})")
    for name, kind in (("lengths", "+"), ("profile-lengths", "*"), ("contexts", "+"),
                       ("batches", "+"), ("concurrency", "+")):
        ap.add_argument(f"--{name}", type=int, nargs=kind)
    for name in ("repeats", "decode-repeats", "serve-input-len", "prompts-per-concurrency"):
        ap.add_argument(f"--{name}", type=int)
    ap.add_argument("--warmups", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="ttft: start every engine this many "
                    "times, in turn (all configurations' first engines, then their second in "
                    "reverse order, ...); a row's TTFT is the median of all its rounds' repeats "
                    "and the report shows each round's")
    ap.add_argument("--host-profile", type=int, default=0, metavar="N",
                    help="ttft: also run N prefills of each --profile-lengths length under "
                    "cProfile; the row's host_profile lists the functions with the most host "
                    "ms per prefill (own and cumulative)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--kv-budget-gib", type=float, default=80.0,
                    help="decode points needing more KV cache are left out")
    ap.add_argument("--serve-output-len", type=int, default=128)
    ap.add_argument("--range-ratio", type=float, default=0.5)
    ap.add_argument("--min-sparse-len", type=int, default=4096, help="SPARGE's min_sparse_len: "
                    "below the shortest length, so every measured prompt takes the sparse path")
    ap.add_argument("--chunk", type=int, default=16384, help="max_num_batched_tokens")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--tokenizer", default=str(ROOT / "models" / "sparge-tiny-code"),
                    help="a local folder whose tokenizer files are copied into every geometry "
                    "folder (vllm serve and vllm bench serve need one), e.g. one written by "
                    "`sparge-models convert smollm2`")
    ap.add_argument("--weights", action="append", metavar="MODEL=DIR",
                    help="the folder `sparge-models convert MODEL` wrote, served by the "
                    "geometry MODEL's *_real (gemma3_270m_real, smollm2_135m_real) with its "
                    "trained weights")
    ap.add_argument("--thresholds", action="append", metavar="MODEL=FILE",
                    help="the thresholds file of the variants calibrated and calibrated_nopv on "
                    "MODEL's *_real geometry (e.g. gemma3=benchmarks/results/quality_thresholds/"
                    "gemma3_l1_0.05.safetensors)")
    tmp = tempfile.gettempdir()
    ap.add_argument("--model-dir", default=os.path.join(tmp, "sparge_e2e_models"),
                    help="where the geometry folders are written")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"),
                    help="folder of e2e.json, e2e.md, e2e.png (default $OUT, else "
                    "benchmarks/results)")
    ap.add_argument("--merge", help="results of earlier calls to merge into (default "
                    "<out>/e2e.json)")
    ap.add_argument("--add", nargs="+", metavar="JSON", help="report: other calls' results "
                    "files to merge in (their runs added, their rows replacing those of the same "
                    "point)")
    ap.add_argument("--skip-done", action="store_true",
                    help="run only the points that the merged results do not hold")
    ap.add_argument("--budget-s", type=float, help="time for this call: no engine starts with "
                    "less than 60 s left, and a running one is stopped (its rows kept) at the end")
    ap.add_argument("--log-dir", default=os.path.join(tmp, "sparge_e2e_logs"),
                    help="one log per engine run")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        worker(json.loads(argv[1]))
        return 0
    args = parser().parse_args(argv)
    args.argv = argv
    if args.stages == ["report"]:
        data = report.load_results(args.merge or os.path.join(args.out, "e2e.json"))
        for path in args.add or []:
            report.merge_results(data, report.load_results(path))
        print("\n".join(report.write_all(data, args.out, plan.DESCRIPTIONS)))
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
