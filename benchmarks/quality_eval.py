"""The serving stages of ``benchmarks/quality.py``: one ``vllm serve`` per configuration, lm-eval's
``local-completions`` client and the perplexity documents against it, ``/metrics`` around each.

lm-eval runs in this process through its Python API (``lm_eval.simple_evaluate``, as vLLM's own
lm-eval correctness tests call it) with the ``local-completions`` model, i.e. its HTTP client. Each
task is built once per model and length (the RULER tasks generate 500 documents whatever
``--limit`` says) and reused for every configuration; the equivalent ``lm_eval`` command is
recorded with each result. Tasks are built while the first server starts.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import math
import os
import random
import shlex
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import quality_report as qr
from quality import (
    OWN_TASKS,
    RESULTS_LOCK,
    ROOT,
    TASK_DIR,
    estimate_minutes,
    group_minutes,
    log,
    model_configs,
    model_context,
    model_lengths,
    note,
    pending_units,
    server_command,
    shown,
    thresholds_path,
    thresholds_sha256,
    time_left,
    unit_minutes,
    write_uniform,
)

from sparge_serve.models.verification import folder_tokenizer_problems
from tests import subproc

# the local server is reached directly, whatever proxy the environment names
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
SETTLE_INTERVAL_S = 1.2  # between scrapes; the backend writes its counters once a second
LM_EVAL_SEEDS = dict(random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
                     fewshot_random_seed=1234)


def seed_like_lm_eval() -> None:
    """The seeds ``lm_eval`` sets before it builds a task: RULER's documents built after this
    equal those of the recorded ``lm_eval`` command."""
    import numpy as np
    import torch

    random.seed(LM_EVAL_SEEDS["random_seed"])
    np.random.seed(LM_EVAL_SEEDS["numpy_random_seed"])
    torch.manual_seed(LM_EVAL_SEEDS["torch_random_seed"])


def task_metric(task: str, length: int) -> str:
    """The name of a task's score in lm-eval's results: ``acc`` for the passkey tasks; RULER
    reports one per sequence length."""
    return "acc" if task in OWN_TASKS else str(length)


def offline_env(work_dir: str) -> None:
    """No hub or dataset downloads, no proxy for the local servers; nltk finds a (stub)
    punkt_tab so that lm-eval's RULER module does not try to download it at import (the offline
    tasks never split sentences)."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false")
    for var in ("NO_PROXY", "no_proxy"):  # the local servers never go through a proxy
        os.environ[var] = ",".join(filter(None, ["127.0.0.1,localhost", os.environ.get(var)]))
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        stub = os.path.join(work_dir, "nltk_data")
        os.makedirs(os.path.join(stub, "tokenizers", "punkt_tab"), exist_ok=True)
        os.environ["NLTK_DATA"] = stub + os.pathsep + os.environ.get("NLTK_DATA", "")
        nltk.data.path.insert(0, stub)
    except ImportError:
        pass  # lm-eval's RULER import names the missing package


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_memory_used() -> list[int] | None:
    """MiB used per GPU (nvidia-smi), or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                              "nounits"], capture_output=True, text=True, timeout=30).stdout
        return [int(x) for x in out.split()] or None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def wait_gpu_released(baseline: list[int] | None, timeout: float = 120) -> float:
    """Wait until every GPU is back within 1 GiB of ``baseline``; returns the seconds waited."""
    t0 = time.monotonic()
    while baseline is not None and time.monotonic() - t0 < timeout:
        used = gpu_memory_used()
        if used is None or all(u <= b + 1024 for u, b in zip(used, baseline, strict=False)):
            break
        time.sleep(1)
    return time.monotonic() - t0


class Server:
    """``vllm serve`` in its own process group (tests/subproc.py), its /metrics and completions."""

    def __init__(self, args: Any, model: str, config: str) -> None:
        self.model, self.config = model, config
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = server_command(args, model, config, self.port)
        self.thresholds_sha256 = thresholds_sha256(args, model, config)
        os.makedirs(args.logs, exist_ok=True)
        self.log = Path(args.logs) / f"serve_{model}_{config.replace('=', '_')}.log"
        self.timeout = args.server_timeout
        self.proc = None
        self.stopped = False

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if k != "PROMETHEUS_MULTIPROC_DIR" and not k.startswith("SPARGE_")}
        log(f"{self.model} {qr.config_label(self.config)}: {shlex.join(self.cmd)} (log {self.log})")
        self.t0 = time.monotonic()
        self.proc = subproc.start(self.cmd, env, self.log)

    def wait(self) -> float:
        subproc.wait_healthy(self.proc, f"{self.base}/health", self.log, self.timeout)
        return time.monotonic() - self.t0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and not self.stopped:
            self.stopped = True
            subproc.stop(self.proc)

    def post(self, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.base}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with DIRECT.open(req, timeout=timeout) as r:
            return json.load(r)

    def scrape(self) -> dict[str, Any]:
        with DIRECT.open(f"{self.base}/metrics", timeout=30) as r:
            return qr.parse_metrics(r.read().decode())

    def settled(self) -> dict[str, Any]:
        """The counters once every step so far has reached /metrics: the backend reads its GPU
        counters back a step or two late and writes them once a second, so two short requests
        (dense: below min_sparse_len) push the last steps through, then scrapes repeat until two
        in a row agree."""
        for _ in range(2):
            self.post({"model": self.model, "prompt": "Hello", "max_tokens": 1,
                       "temperature": 0})
        last = self.scrape()
        for _ in range(20):
            time.sleep(SETTLE_INTERVAL_S)
            now = self.scrape()
            if now == last:
                return now
            last = now
        return last


def lm_eval_args(server: Server, args: Any) -> dict[str, Any]:
    """``local-completions`` model arguments: token-id requests with the model's own tokenizer and
    its special tokens (Gemma's <bos>), no truncation below the server's context."""
    return dict(base_url=f"{server.base}/v1/completions", model=server.model,
                tokenizer=os.path.abspath(args.model_dirs[server.model]),
                tokenizer_backend="huggingface", tokenized_requests=True, add_bos_token=True,
                max_length=model_context(args, server.model), num_concurrent=args.concurrency,
                max_retries=3, timeout=600)


def task_metadata(args: Any, model: str, length: int) -> dict[str, Any]:
    return {"tokenizer": os.path.abspath(args.model_dirs[model]), "max_seq_lengths": [length],
            "sparge_samples": args.samples}


def lm_eval_command(model_args: dict[str, Any], task: str, meta: dict[str, Any],
                    limit: int) -> str:
    """The ``lm_eval`` CLI call that runs the same evaluation (from the repository's root)."""
    margs = ",".join(f"{k}={v}" for k, v in model_args.items())
    meta = {k: v for k, v in meta.items() if k != "tokenizer"}  # model_args carries it
    return shlex.join(["lm_eval", "--model", "local-completions", "--model_args", margs,
                       "--tasks", task, "--include_path", str(TASK_DIR.relative_to(ROOT)), "--metadata",
                       json.dumps(meta), "--limit", str(limit), "--seed", "0,1234,1234,1234",
                       "--log_samples", "--output_path", "lm_eval_out"])


class TaskCache:
    """lm-eval Task objects per (length, task), built once per model (and the model's
    perplexity documents, ``docs``, once made)."""

    def __init__(self, args: Any, model: str) -> None:
        self.args, self.model, self.tasks = args, model, {}
        self.docs: dict[str, Any] | None = None
        self.manager = None  # the last TaskManager (simple_evaluate needs one; building it costs)
        self.failed: dict[tuple[int, str], str] = {}

    def build(self, needed: list[tuple[str, int]]) -> None:
        from lm_eval.tasks import TaskManager

        by_length: dict[int, list[str]] = {}
        for task, n in needed:
            if (n, task) not in self.tasks and (n, task) not in self.failed:
                by_length.setdefault(n, []).append(task)
        for n, names in sorted(by_length.items()):
            # lm-eval's own tasks are indexed only when needed (thousands of files)
            manager = TaskManager(include_path=str(TASK_DIR),
                                  include_defaults=not set(names) <= set(OWN_TASKS),
                                  metadata=task_metadata(self.args, self.model, n))
            for name in names:
                t0 = time.monotonic()
                seed_like_lm_eval()
                try:
                    self.tasks[(n, name)] = manager.load([name])["tasks"][name]
                    log(f"{self.model}: built {name} @{n} in {time.monotonic() - t0:.0f} s")
                except Exception as e:  # noqa: BLE001 - a task that cannot build is reported
                    self.failed[(n, name)] = f"{type(e).__name__}: {e}"
                    log(f"{self.model}: {name} @{n} failed to build: {self.failed[(n, name)]}")
            self.manager = manager


def run_accuracy(lm: Any, cache: TaskCache, server: Server, task: str, length: int,
                 model_args: dict[str, Any], args: Any, before: dict[str, Any]) -> dict[str, Any]:
    """One task at one length through lm-eval; ``before``: the settled counters before it."""
    import lm_eval

    # NOTE: a copy: lm-eval keeps an evaluation's requests on the Task, and the group's servers
    # are evaluated at once
    obj = copy.deepcopy(cache.tasks[(length, task)])
    t0 = time.monotonic()
    res = lm_eval.simple_evaluate(model=lm, tasks=[obj], limit=args.samples, log_samples=True,
                                  bootstrap_iters=0, task_manager=cache.manager,
                                  **LM_EVAL_SEEDS)
    seconds = time.monotonic() - t0
    after = server.settled()
    delta = {**qr.metrics_delta(before, after), "_after": after}
    metric = task_metric(task, length)
    score = float(res["results"][task][f"{metric},none"])
    samples = res["samples"][task]
    compact = []  # per sample: its score, and what it answered when that was wrong
    for s in samples:
        c = dict(doc=s["doc_id"], depth=s["doc"].get("depth"), score=float(s[metric]))
        if c["score"] < 1:
            c.update(answer=s.get("target"),
                     prediction=str((s.get("filtered_resps") or [""])[0])[:60])
        compact.append(c)
    rec = dict(model=server.model, config=server.config, kind="accuracy", task=task,
               length=length, score=score, n=len(samples), stderr=qr.stderr(score, len(samples)),
               seconds=round(seconds, 1), metrics=delta, samples=compact,
               lm_eval_command=lm_eval_command(model_args, task,
                                               task_metadata(args, server.model, length),
                                               args.samples))
    depths = sorted({c["depth"] for c in compact if c["depth"] is not None})
    if depths:
        rec["by_depth"] = {f"{d:.2f}": sum(c["score"] for c in compact if c["depth"] == d)
                           / sum(1 for c in compact if c["depth"] == d) for d in depths}
    return rec


def token_logprobs(response: dict[str, Any], n_prompt: int) -> list[float]:
    """Log-probabilities of prompt tokens 1..n-1 from an ``echo`` completion (the first token has
    none; a generated token, when ``max_tokens`` had to be 1, is dropped)."""
    lps = response["choices"][0]["logprobs"]["token_logprobs"][:n_prompt]
    if len(lps) != n_prompt or lps[0] is not None or any(x is None for x in lps[1:]):
        raise ValueError(f"expected {n_prompt} prompt log-probabilities (the first None), got "
                         f"{len(lps)}")
    return [float(x) for x in lps[1:]]


def run_perplexity(server: Server, docs: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """The documents' mean negative log-likelihood per token and perplexity."""
    t0 = time.monotonic()
    per_doc, quarters = [], [[0.0, 0] for _ in range(4)]
    for i, ids in enumerate(docs["docs"]):
        body = {"model": server.model, "prompt": ids, "max_tokens": 0, "echo": True,
                "logprobs": 0, "temperature": 0}
        try:
            lps = token_logprobs(server.post(body), len(ids))
        except urllib.error.HTTPError as e:
            if e.code != 400:
                raise
            body["max_tokens"] = 1  # a server that refuses max_tokens 0 scores the same prompt
            lps = token_logprobs(server.post(body), len(ids))
        per_doc.append(dict(nll=-sum(lps) / len(lps), tokens=len(lps), sha256=docs["sha256"][i]))
        for j, lp in enumerate(lps):
            q = quarters[4 * j // len(lps)]
            q[0] -= lp
            q[1] += 1
        log(f"  document {i + 1}/{len(docs['docs'])}: nll {per_doc[-1]['nll']:.4f}")
    seconds = time.monotonic() - t0
    after = server.settled()
    tokens = sum(d["tokens"] for d in per_doc)
    nll = sum(d["nll"] * d["tokens"] for d in per_doc) / tokens
    return dict(model=server.model, config=server.config, kind="perplexity", task="perplexity",
                length=docs["tokens"], nll=nll, ppl=math.exp(nll), tokens=tokens,
                quarter_nll=[s / n for s, n in quarters], docs=per_doc, files=docs["files"],
                seconds=round(seconds, 1),
                metrics={**qr.metrics_delta(before, after), "_after": after})


def stage_eval(args: Any, results: dict[str, Any]) -> None:
    offline_env(args.work_dir)
    baseline = gpu_memory_used()
    started = 0
    for model in args.models:
        if not os.path.exists(os.path.join(args.model_dirs[model], "config.json")):
            note(results, f"{model}: {args.model_dirs[model]} is not a converted model (run the "
                 "convert stage); not evaluated")
            continue
        bad = folder_tokenizer_problems(args.model_dirs[model])
        if bad:  # every prompt and document is tokenised with it: nothing measured would hold
            note(results, f"{model}: the tokenizer of {args.model_dirs[model]} is wrong "
                 f"({'; '.join(bad)}); not evaluated")
            continue
        lengths = model_lengths(args, model)
        results["models"][model]["settings"] = (
            f"min_sparse_len {args.min_sparse_len}, prefill chunk {args.max_num_batched_tokens}, "
            f"prefix caching off, {'CUDA graphs' if args.cuda_graphs else 'eager'}, "
            f"{args.samples} samples per task and length, lengths {lengths}")
        cache = TaskCache(args, model)
        todo = []
        for config in model_configs(args, model):
            units = pending_units(args, results, model, config)
            if not units:
                log(f"{model} {qr.config_label(config)}: measured already")
                continue
            if config.startswith("cdf="):
                write_uniform(args, model, config)
            if thresholds_path(args, model, config) == "":
                note(results, f"{model} {qr.config_label(config)}: no thresholds file (run the "
                     "calibrate stage or pass --thresholds); not evaluated")
                continue
            todo.append((config, units))
        while todo:
            group = next_group(args, results, model, todo, started)
            if not group:
                for config, units in todo:
                    note(results, f"{model} {qr.config_label(config)}: not started, about "
                         f"{estimate_minutes(args, results, model, units):.1f} min needed and "
                         f"{time_left(args):.1f} left before the deadline; run the same command "
                         "again to continue")
                break
            todo = todo[len(group):]
            started += len(group)
            serve_group(args, results, cache, model, group)
            waited = wait_gpu_released(baseline)
            log(f"{model}: servers stopped; GPU memory released after {waited:.0f} s")


def next_group(args: Any, results: dict[str, Any], model: str,
               todo: list[tuple[str, list]], started: int) -> list[tuple[str, list]]:
    """The configurations whose servers start next, together: up to ``--servers`` of them, as
    many as end before the deadline (``group_minutes``). The first server of a call starts
    whenever 2 minutes are left: its evaluations stop one by one at the deadline, and the next
    call continues with the rest."""
    group: list[tuple[str, list]] = []
    for config, units in todo[:args.servers]:
        need = group_minutes(args, results, model, [*group, (config, units)])
        if need > time_left(args) and (group or started or time_left(args) < 2):
            break
        group.append((config, units))
    return group


def serve_group(args: Any, results: dict[str, Any], cache: TaskCache, model: str,
                group: list[tuple[str, list]]) -> None:
    """Start one server a configuration, build the tasks while they start, then evaluate the
    servers at once, one thread each (a model this small leaves the GPU mostly idle: a server's
    steps are bound by its host), each server stopped when its evaluations end; every server
    is stopped on the way out."""
    servers = [Server(args, model, config) for config, _ in group]
    try:
        for server in servers:
            server.start()
        try:
            acc = [(t, n) for _, units in group for kind, t, n in units if kind == "accuracy"]
            cache.build(list(dict.fromkeys(acc)))  # each task-length once, in order
            if cache.docs is None and any(k == "perplexity" for _, units in group
                                          for k, _, _ in units):
                from documents import make_documents
                from passkey import load_tokenizer

                cache.docs = make_documents(
                    load_tokenizer(os.path.abspath(args.model_dirs[model])), args.ppl_docs,
                    model_context(args, model) - 1)
        except Exception as e:  # noqa: BLE001 - reported; the next model may still run
            for server in servers:
                note(results, f"{model} {qr.config_label(server.config)}: {type(e).__name__}: "
                     f"{e}")
            return
        ready = {}
        for server in servers:  # in start order: each start-up is timed to its own /health
            try:
                ready[server.config] = server.wait()
            except AssertionError as e:  # the server exited or hung (tests/subproc.py)
                note(results, f"{model} {qr.config_label(server.config)}: server failed: "
                     f"{str(e)[-1500:]}")
                server.stop()
        for server in servers:
            if server.config in ready:
                log(f"{model} {qr.config_label(server.config)}: healthy after "
                    f"{ready[server.config]:.0f} s")
                results["servers"].setdefault(model, {})[server.config] = dict(
                    command=shown(server.cmd), startup_s=round(ready[server.config], 1))
        units_of = dict(group)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(servers))
        try:
            futures = [pool.submit(evaluate_server, args, results, cache, server,
                                   units_of[server.config])
                       for server in servers if server.config in ready]
            for future in concurrent.futures.as_completed(futures):
                future.result()
        finally:
            for server in servers:  # first: an evaluation still running fails at once
                server.stop()
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        for server in servers:
            server.stop()


def evaluate_server(args: Any, results: dict[str, Any], cache: TaskCache, server: Server,
                    units: list[tuple[str, str, int]]) -> None:
    """One server's evaluations (a thread of ``serve_group``), then the server is stopped."""
    label = f"{server.model} {qr.config_label(server.config)}"
    try:
        evaluate_units(args, results, server, cache, cache.docs, units)
    except AssertionError as e:
        note(results, f"{label}: server failed: {str(e)[-1500:]}")
    except Exception as e:  # noqa: BLE001 - the other configurations may still run
        note(results, f"{label}: {type(e).__name__}: {e}")
    finally:
        server.stop()
        log(f"{label}: stopped")
        with RESULTS_LOCK:
            qr.save_results(results, args.results)


def evaluate_units(args: Any, results: dict[str, Any], server: Server, cache: TaskCache,
                   docs: dict[str, Any] | None, units: list[tuple[str, str, int]]) -> None:
    from lm_eval.api.registry import get_model

    model_args = lm_eval_args(server, args)
    lm = None
    counters = server.settled()  # each evaluation's "after" is the next one's "before"
    for i, (kind, task, length) in enumerate(units):
        label = f"{server.model} {qr.config_label(server.config)} [{i + 1}/{len(units)}]"
        if not server.alive():
            note(results, f"{label}: the server exited; log {server.log}")
            return
        if unit_minutes(args, (kind, task, length), results, server.model) + 0.3 > time_left(args):
            note(results, f"{label}: stopped before {task} @{length} (deadline); run the same "
                 "command again to continue")
            return
        try:
            if kind == "perplexity":
                rec = run_perplexity(server, docs, counters)
                log(f"{label} perplexity {rec['ppl']:.4f} over {rec['tokens']} tokens, block "
                    f"sparsity {qr.pct(rec['metrics']['block_sparsity'])}")
            elif (length, task) in cache.failed:
                note(results, f"{label} {task} @{length}: not built: {cache.failed[(length, task)]}")
                continue
            else:
                if lm is None:
                    lm = get_model("local-completions").create_from_arg_obj(
                        model_args, {"batch_size": 1})
                rec = run_accuracy(lm, cache, server, task, length, model_args, args,
                                   counters)
                log(f"{label} {task} @{length}: accuracy {rec['score']:.3f} (n={rec['n']}), "
                    f"block sparsity {qr.pct(rec['metrics']['block_sparsity'])}, "
                    f"{rec['seconds']:.0f} s")
        except Exception as e:  # noqa: BLE001 - one failed evaluation must not lose the others
            note(results, f"{label} {task} @{length}: failed: {type(e).__name__}: {e}")
            if server.alive():
                counters = server.settled()
            continue
        counters = rec["metrics"].pop("_after")
        rec["date"] = time.strftime("%Y-%m-%d")
        if server.thresholds_sha256:  # the calibrated file measured (pending_units compares)
            rec["thresholds_sha256"] = server.thresholds_sha256
        with RESULTS_LOCK:
            qr.put_record(results, rec)
            qr.save_results(results, args.results)
