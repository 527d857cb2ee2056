"""The results of ``benchmarks/quality.py``: one merged JSON, ``/metrics`` deltas, the report.

Every measurement is a *record* keyed by (model, configuration, kind, task, length); a later run
replaces the record of the same key and keeps the others, so stages and models measured in
separate commands merge into one file. ``write_report`` turns the file into ``quality.md`` (per
model: accuracy and perplexity against the block sparsity measured on the server) and
``quality.png`` (accuracy against block sparsity, one line per context length).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable
from typing import Any

SCHEMA = 1
BLOCK_COUNTERS = {  # key -> sample name on /metrics (sparge_serve.metrics)
    "valid": "sparge_attention_blocks_valid_total",
    "computed": "sparge_attention_blocks_computed_total",
    "pv_skipped": "sparge_pv_blocks_skipped_total",
}
PROMPT_TOKENS = "sparge_prompt_tokens_total"
FALLBACKS = "sparge_dense_fallbacks_total"
VLLM_PROMPT_TOKENS = "vllm:prompt_tokens_total"
KEY_FIELDS = ("model", "config", "kind", "task", "length")


# ---------------------------------------------------------------------------------- /metrics


def parse_metrics(text: str) -> dict[str, Any]:
    """The ``sparge_*`` counters of one ``/metrics`` scrape, summed over ``model_name``.

    ``layers``: {layer: {valid, computed, pv_skipped}}; ``tokens``: {path: prompt tokens x layers};
    ``fallbacks``: {reason: calls}; ``vllm_prompt_tokens``: vLLM's own prompt-token count.
    """
    from prometheus_client.parser import text_string_to_metric_families

    names = {v: k for k, v in BLOCK_COUNTERS.items()}
    out: dict[str, Any] = {"layers": {}, "tokens": {}, "fallbacks": {}, "vllm_prompt_tokens": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in names:
                layer = out["layers"].setdefault(int(s.labels.get("layer", -1)),
                                                 dict.fromkeys(BLOCK_COUNTERS, 0.0))
                layer[names[s.name]] += s.value
            elif s.name == PROMPT_TOKENS:
                path = s.labels.get("path", "?")
                out["tokens"][path] = out["tokens"].get(path, 0.0) + s.value
            elif s.name == FALLBACKS:
                reason = s.labels.get("reason", "?")
                out["fallbacks"][reason] = out["fallbacks"].get(reason, 0.0) + s.value
            elif s.name == VLLM_PROMPT_TOKENS:
                out["vllm_prompt_tokens"] += s.value
    return out


def metrics_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the server counted between two scrapes, and the block sparsity it implies.

    ``block_sparsity`` = 1 - computed / valid over every layer (None when no call took the sparse
    path, e.g. FLASH_ATTN or prompts below ``min_sparse_len``); ``sparse_token_share``: share of
    (prompt token, layer) pairs that ran on the sparse path.
    """
    layers = {}
    for layer, a in after["layers"].items():
        b = before["layers"].get(layer, {})
        d = {k: a[k] - b.get(k, 0.0) for k in BLOCK_COUNTERS}
        if any(d.values()):
            layers[str(layer)] = d
    tot = {k: sum(d[k] for d in layers.values()) for k in BLOCK_COUNTERS}
    tokens = {p: after["tokens"].get(p, 0.0) - before["tokens"].get(p, 0.0)
              for p in set(after["tokens"]) | set(before["tokens"])}
    fallbacks = {r: after["fallbacks"].get(r, 0.0) - before["fallbacks"].get(r, 0.0)
                 for r in set(after["fallbacks"]) | set(before["fallbacks"])}
    all_tokens = sum(tokens.values())
    return dict(
        blocks=tot, layers=layers, tokens=tokens,
        fallbacks={r: v for r, v in fallbacks.items() if v},
        prompt_tokens=after["vllm_prompt_tokens"] - before["vllm_prompt_tokens"],
        block_sparsity=1.0 - tot["computed"] / tot["valid"] if tot["valid"] > 0 else None,
        pv_skip_share=tot["pv_skipped"] / tot["computed"] if tot["computed"] > 0 else None,
        sparse_token_share=tokens.get("sparse", 0.0) / all_tokens if all_tokens > 0 else None,
    )


def pooled_sparsity(records: Iterable[dict[str, Any]]) -> float | None:
    """1 - computed / valid over several records' deltas (None without sparse calls)."""
    valid = computed = 0.0
    for r in records:
        blocks = (r.get("metrics") or {}).get("blocks") or {}
        valid += blocks.get("valid", 0.0)
        computed += blocks.get("computed", 0.0)
    return 1.0 - computed / valid if valid > 0 else None


# ---------------------------------------------------------------------------------- results


def empty_results() -> dict[str, Any]:
    return dict(schema=SCHEMA, runs=[], models={}, servers={}, calibrations={}, records=[])


def load_results(path: str | None) -> dict[str, Any]:
    """The results file at ``path``, or empty results when there is none."""
    if not path or not os.path.exists(path):
        return empty_results()
    with open(path) as f:
        data = json.load(f)
    if data.get("schema") != SCHEMA:
        raise SystemExit(f"{path}: results schema {data.get('schema')!r}, expected {SCHEMA}")
    return {**empty_results(), **data}


def save_results(results: dict[str, Any], path: str) -> None:
    """Write atomically (a command stopped mid-write leaves the previous file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".quality-", suffix=".json", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=1, sort_keys=False)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def record_key(rec: dict[str, Any]) -> tuple:
    return tuple(rec.get(k) for k in KEY_FIELDS)


def find_record(results: dict[str, Any], **key: Any) -> dict[str, Any] | None:
    want = tuple(key.get(k) for k in KEY_FIELDS)
    return next((r for r in results["records"] if record_key(r) == want), None)


def put_record(results: dict[str, Any], rec: dict[str, Any]) -> None:
    """Add ``rec``, replacing the record of the same key."""
    key = record_key(rec)
    results["records"] = [r for r in results["records"] if record_key(r) != key] + [rec]


def merge_results(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``other``'s records, servers, calibrations and runs merged into ``into`` (theirs win)."""
    for rec in other["records"]:
        put_record(into, rec)
    for name in ("models", "servers", "calibrations"):
        for key, value in other[name].items():
            into[name][key] = {**into[name].get(key, {}), **value} if isinstance(value, dict) \
                else value
    into["runs"] += [r for r in other["runs"] if r not in into["runs"]]
    return into


# ---------------------------------------------------------------------------------- report


def config_label(config: str) -> str:
    """``flash_attn`` -> FLASH_ATTN, ``untuned`` -> SPARGE untuned, ``l1=X`` -> SPARGE l1=X,
    ``cdf=X`` -> SPARGE cdf=X."""
    if config == "flash_attn":
        return "FLASH_ATTN"
    return "SPARGE " + config


def config_order(config: str) -> tuple:
    if config == "flash_attn":
        return (0, 0.0)
    if config == "untuned":
        return (1, 0.0)
    if config.startswith("cdf="):  # uniform settings after the calibrated ones, densest first
        with contextlib.suppress(ValueError):
            return (3, -float(config[4:]))
    try:
        return (2, float(config.split("=", 1)[1]))
    except (IndexError, ValueError):
        return (4, config)


def informative(results: dict[str, Any], model: str, min_dense_acc: float) -> dict:
    """{(task, length): dense accuracy} and whether it counts: a task-length where FLASH_ATTN
    scores below ``min_dense_acc`` measures nothing about sparse attention."""
    out = {}
    for r in results["records"]:
        if r["model"] == model and r["config"] == "flash_attn" and r["kind"] == "accuracy":
            out[(r["task"], r["length"])] = (r["score"], r["score"] >= min_dense_acc)
    return out


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def summary(results: dict[str, Any], model: str, min_dense_acc: float) -> dict[str, Any]:
    """Per configuration and length: mean accuracy over informative tasks and pooled block
    sparsity; perplexity and its change against FLASH_ATTN."""
    recs = [r for r in results["records"] if r["model"] == model]
    configs = sorted({r["config"] for r in recs}, key=config_order)
    lengths = sorted({r["length"] for r in recs if r["kind"] == "accuracy"})
    keep = {k for k, (_, ok) in informative(results, model, min_dense_acc).items() if ok}
    dense_ppl = next((r["ppl"] for r in recs
                      if r["config"] == "flash_attn" and r["kind"] == "perplexity"), None)
    rows = {}
    for c in configs:
        row: dict[str, Any] = {"lengths": {}}
        for n in lengths:
            acc = [r for r in recs if r["config"] == c and r["kind"] == "accuracy"
                   and r["length"] == n]
            scored = [r["score"] for r in acc if (r["task"], n) in keep]
            row["lengths"][n] = dict(
                accuracy=sum(scored) / len(scored) if scored else None, tasks=len(scored),
                sparsity=0.0 if c == "flash_attn" else pooled_sparsity(acc))
        ppl = next((r for r in recs if r["config"] == c and r["kind"] == "perplexity"), None)
        if ppl is not None:
            row["ppl"] = ppl["ppl"]
            row["ppl_change"] = ppl["ppl"] / dense_ppl - 1.0 if dense_ppl else None
            row["ppl_sparsity"] = 0.0 if c == "flash_attn" else pooled_sparsity([ppl])
        rows[c] = row
    # per-prompt scores on the informative task-lengths, for paired comparisons
    samples = {c: {(r["task"], r["length"], smp["doc"]): smp["score"]
                   for r in recs if r["config"] == c and r["kind"] == "accuracy"
                   and (r["task"], r["length"]) in keep for smp in r.get("samples") or ()}
               for c in configs}
    return dict(configs=configs, lengths=lengths, rows=rows, samples=samples)


def sign_test(a: dict[tuple, float], b: dict[tuple, float]) -> tuple[int, int, float]:
    """Paired comparison of two configurations' per-prompt scores on the prompts both answered:
    (prompts where ``a`` scores higher, where ``b`` does, two-sided sign-test p-value). The
    prompts are the same for every configuration (seeded generation), so pairing removes the
    prompts' difficulty from the comparison."""
    common = a.keys() & b.keys()
    wins = sum(1 for k in common if a[k] > b[k])
    losses = sum(1 for k in common if a[k] < b[k])
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return wins, losses, min(1.0, 2 * tail)


def paired_difference(a: dict[tuple, float], b: dict[tuple, float]
                      ) -> tuple[float, float, int] | None:
    """Mean per-prompt score of ``a`` minus ``b`` on the prompts both answered, the half-width
    of its 95% confidence interval (normal approximation over the paired differences) and the
    number of prompts; None without common prompts."""
    diffs = [a[k] - b[k] for k in a.keys() & b.keys()]
    if not diffs:
        return None
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return mean, 1.96 * math.sqrt(var / n), n


def _point(row: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    """(block sparsity, perplexity change, mean accuracy over lengths) of a summary row."""
    accs = [c["accuracy"] for c in row["lengths"].values() if c["accuracy"] is not None]
    return (row.get("ppl_sparsity"), row.get("ppl_change"),
            sum(accs) / len(accs) if accs else None)


def against_uniform(s: dict[str, Any], alpha: float = 0.05) -> list[dict[str, Any]]:
    """Each calibrated configuration (``l1=X``) against each uniform one (``cdf=X``) on the same
    documents and prompts: "dominates" when it skips at least as many blocks at no higher
    perplexity and no lower accuracy (one of them strictly better), "dominated" the other way
    round, else "trade-off" (uncomparable where a measurement is missing). Where per-prompt
    scores are known, accuracy is compared prompt by prompt (``sign_test``) and a difference
    the test does not find at level ``alpha`` counts as equal accuracy: at 20 prompts a task one
    answer is 5 points, so mean accuracies differ by noise more often than not."""
    out = []
    samples = s.get("samples") or {}
    for cal in (c for c in s["configs"] if c.startswith("l1=")):
        a = _point(s["rows"][cal])
        for uni in (c for c in s["configs"] if c.startswith("cdf=")):
            b = _point(s["rows"][uni])
            paired = None
            if samples.get(cal) and samples.get(uni):
                paired = sign_test(samples[cal], samples[uni])
            if None in a or None in b:
                verdict = "uncomparable"
            else:
                same_acc = paired is not None and paired[2] >= alpha
                acc_ge, acc_le = (True, True) if same_acc else (a[2] >= b[2], a[2] <= b[2])
                ge = a[0] >= b[0] and a[1] <= b[1] and acc_ge
                le = a[0] <= b[0] and a[1] >= b[1] and acc_le
                verdict = ("equal" if ge and le else "dominates" if ge else
                           "dominated" if le else "trade-off")
            out.append(dict(calibrated=cal, uniform=uni, verdict=verdict, calibrated_point=a,
                            uniform_point=b, paired=paired))
    return out


def default_config(results: dict[str, Any], model: str) -> str | None:
    """``l1=X`` of the budget sparge-calibrate's default chose: the one a calibrate stage marked,
    else the model's ``default_budget`` (what the default wrote on the CPU reference)."""
    cal = results["calibrations"].get(model, {})
    marked = [b for b, c in cal.items() if c.get("default")]
    if marked:
        return f"l1={float(marked[0]):g}"
    budget = results["models"].get(model, {}).get("default_budget")
    return None if budget is None else f"l1={budget:g}"


NOISE_FLOOR_SPARSITY = 1e-3  # a configuration below this block sparsity everywhere: the noise


def bars(results: dict[str, Any], model: str, s: dict[str, Any],
         min_dense_acc: float) -> list[tuple[str, str, str]]:
    """(bar, measured, PASS / FAIL / -) for the default budget: accuracy within 1 point of
    FLASH_ATTN on every informative task-length, perplexity within +0.5%, the model's block
    sparsity bar at its context, more sparsity than the untuned defaults at no loss of accuracy
    (sign test), and no uniform setting better on every axis while it is on one; beside the
    per-cell accuracy bar, its noise floor where a configuration skips almost no block."""
    d = default_config(results, model)
    if d is None or d not in s["rows"] or "flash_attn" not in s["rows"]:
        return []
    out = []
    keep = [k for k, (_, ok) in informative(results, model, min_dense_acc).items() if ok]
    worst = _worst_cell(results, model, s, d, keep)
    if worst:
        out.append((f"{d}: accuracy >= FLASH_ATTN - 0.01 on every informative task-length "
                    f"({worst[1]})", worst[2], "PASS" if worst[0] >= -0.01 - 1e-9 else "FAIL"))
    # a SPARGE configuration that skips (almost) no block computes FLASH_ATTN's attention in
    # another order: its per-cell differences are the noise of greedy answers near a tie, the
    # resolution of the per-cell bar
    for c in s["configs"]:
        spars = [cell["sparsity"] for cell in s["rows"][c]["lengths"].values()
                 if cell["sparsity"] is not None]
        if c == "flash_attn" or not spars or max(spars) >= NOISE_FLOOR_SPARSITY:
            continue
        floor = _worst_cell(results, model, s, c, keep)
        if floor:
            out.append((f"noise floor: {c} skips under {NOISE_FLOOR_SPARSITY:.1%} of the blocks "
                        "(FLASH_ATTN's attention, summed in another order)", floor[2], "-"))
            break
    pooled = paired_difference(s["samples"].get(d, {}), s["samples"].get("flash_attn", {}))
    if pooled:
        mean, half, count = pooled
        w, l_, p = sign_test(s["samples"].get(d, {}), s["samples"].get("flash_attn", {}))
        out.append((f"{d}: accuracy over all informative task-lengths, prompt by prompt, >= "
                    "FLASH_ATTN - 0.01", f"{mean:+.3f} (95% CI ±{half:.3f}; {count} prompts, "
                    f"better / worse {w} / {l_}, p {p:.2f})",
                    "PASS" if mean >= -0.01 - 1e-9 else "FAIL"))
    row = s["rows"][d]
    if row.get("ppl_change") is not None:
        out.append((f"{d}: perplexity <= FLASH_ATTN + 0.5%", f"{100 * row['ppl_change']:+.2f}%",
                    "PASS" if row["ppl_change"] <= 0.005 else "FAIL"))
    context = results["models"].get(model, {}).get("context")
    bar = results["models"].get(model, {}).get("sparsity_bar")
    cell = row["lengths"].get(context)
    if cell is not None and cell["sparsity"] is not None:
        out.append((f"{d}: block sparsity at {context} tokens" + (f" >= {bar:.0%}" if bar else ""),
                    pct(cell["sparsity"]),
                    "-" if not bar else "PASS" if cell["sparsity"] >= bar else "FAIL"))
    if "untuned" in s["rows"]:
        u = s["rows"]["untuned"]
        more = all((row["lengths"][n]["sparsity"] or 0) > (u["lengths"][n]["sparsity"] or 0)
                   for n in s["lengths"] if row["lengths"][n]["sparsity"] is not None)
        w, l_, p = sign_test(s["samples"].get(d, {}), s["samples"].get("untuned", {}))
        ok = more and (w >= l_ or p >= 0.05)
        out.append((f"{d} against SPARGE untuned: more blocks skipped at every length, accuracy "
                    "no lower (sign test)", f"prompts better / worse {w} / {l_} (p {p:.2f})",
                    "PASS" if ok else "FAIL"))
    versus = [v for v in against_uniform(s) if v["calibrated"] == d]
    if versus:
        verdicts = ", ".join(f"{v['verdict']} {v['uniform']}" for v in versus)
        ok = all(v["verdict"] != "dominated" for v in versus) and any(
            v["verdict"] == "dominates" for v in versus)
        out.append((f"{d} against one uniform cdfthreshd: dominates one, dominated by none",
                    verdicts, "PASS" if ok else "FAIL"))
    return out


def _worst_cell(results: dict[str, Any], model: str, s: dict[str, Any], config: str,
                keep: list[tuple]) -> tuple[float, int, str] | None:
    """(worst accuracy difference from FLASH_ATTN over the task-lengths ``keep``, how many were
    compared, a text of it with that cell's sign test); None where none compares."""
    deltas = []
    for task, n in keep:
        a = find_record(results, model=model, config=config, kind="accuracy", task=task,
                        length=n)
        b = find_record(results, model=model, config="flash_attn", kind="accuracy", task=task,
                        length=n)
        if a and b:
            deltas.append((a["score"] - b["score"], task, n))
    if not deltas:
        return None
    worst, task, n = min(deltas)
    cell = [{k: v for k, v in s["samples"].get(c, {}).items() if k[:2] == (task, n)}
            for c in (config, "flash_attn")]
    w, l_, p = sign_test(*cell)
    return worst, len(deltas), (f"worst {worst:+.3f} ({task} @{n}: prompts better / worse "
                                f"{w} / {l_}, p {p:.2f})")


def _cmp_cells(p: tuple) -> list[str]:
    sp, ch, acc = p
    return [pct(sp), "-" if ch is None else f"{100 * ch:+.2f}%",
            "-" if acc is None else f"{acc:.3f}"]


def _measured(results: dict[str, Any], model: str, s: dict[str, Any], cal: dict[str, Any],
              min_dense_acc: float) -> list[str]:
    """One model's tables of measurements: per configuration, per task, against uniform."""
    lines: list[str] = []
    head = ["configuration"]
    for n in s["lengths"]:
        head += [f"acc {n}", f"sparsity {n}"]
    head += ["perplexity", "vs FLASH_ATTN", "sparsity (ppl)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    chosen = {f"l1={b}" for b, c in cal.items() if c.get("default")}
    for c in s["configs"]:
        row = s["rows"][c]
        cells = [config_label(c) + (" (calibration default)" if c in chosen else "")]
        for n in s["lengths"]:
            cell = row["lengths"][n]
            acc = cell["accuracy"]
            cells += ["-" if acc is None else f"{acc:.3f}", pct(cell["sparsity"])]
        ppl, change = row.get("ppl"), row.get("ppl_change")
        cells += ["-" if ppl is None else f"{ppl:.4f}",
                  "-" if change is None else f"{100 * change:+.2f}%",
                  pct(row.get("ppl_sparsity"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per task (accuracy, block sparsity in parentheses):", ""]
    tasks = sorted({(r["task"], r["length"]) for r in results["records"]
                    if r["model"] == model and r["kind"] == "accuracy"})
    dense = informative(results, model, min_dense_acc)
    head = ["task", "length", *(config_label(c) for c in s["configs"])]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, n in tasks:
        cells = [task if dense.get((task, n), (0, True))[1] else f"{task} (uninformative)",
                 str(n)]
        for c in s["configs"]:
            r = find_record(results, model=model, config=c, kind="accuracy", task=task,
                            length=n)
            if r is None:
                cells.append("-")
                continue
            sp = None if c == "flash_attn" else (r.get("metrics") or {}).get("block_sparsity")
            cells.append(f"{r['score']:.3f} ({pct(sp)}, n={r['n']})")
        lines.append("| " + " | ".join(cells) + " |")
    versus = against_uniform(s)
    if versus:
        lines += ["", "Calibrated against uniform thresholds (block sparsity and perplexity "
                  "change on the perplexity documents, mean accuracy over the lengths):", "",
                  "| calibrated | sparsity | perplexity | accuracy | uniform | sparsity | "
                  "perplexity | accuracy | prompts better / worse (p) | calibrated |",
                  "|" + "---|" * 10]
        for v in versus:
            w = v["paired"]
            lines.append("| " + " | ".join([
                config_label(v["calibrated"]), *_cmp_cells(v["calibrated_point"]),
                config_label(v["uniform"]), *_cmp_cells(v["uniform_point"]),
                "-" if w is None else f"{w[0]} / {w[1]} ({w[2]:.2f})",
                v["verdict"]]) + " |")
        lines += ["", "Prompts better / worse: the calibrated file's answers against the "
                  "uniform one's on the same prompts (informative task-lengths); p: the "
                  "two-sided sign test. Accuracy counts as equal where p >= 0.05."]
    return lines


def markdown(results: dict[str, Any], min_dense_acc: float) -> str:
    runs = results["runs"]
    last = runs[-1] if runs else {}
    lines = [f"# Quality through `vllm serve`: accuracy, perplexity and measured block sparsity "
             f"— {last.get('device', '?')}, {last.get('date', '?')}", ""]
    if last:
        v = last.get("versions", {})
        lines += [", ".join(f"{k} {v[k]}" for k in sorted(v)) + ".", ""]
    lines += [
        "Accuracy: lm-eval's `local-completions` client against `vllm serve` (greedy). Block "
        "sparsity: 1 - computed / valid key blocks from the server's `/metrics` "
        "(`sparge_attention_blocks_*_total`) over each evaluation; FLASH_ATTN is dense (0). "
        f"Mean accuracy counts only the task-lengths where FLASH_ATTN scores at least "
        f"{min_dense_acc:g} (the others measure nothing about sparse attention and are listed "
        "below). Perplexity: held-out Python source of the model's context length, scored "
        "through the completions endpoint (`echo`, `max_tokens` 0, prompt log-probabilities).", ""]
    for model, info in results["models"].items():
        s = summary(results, model, min_dense_acc)
        cal = results["calibrations"].get(model, {})
        if not s["configs"] and not cal:
            continue
        lines += [f"## {model}: {info.get('title', model)}", "",
                  f"Server: `--max-model-len {info.get('context', '?')}`; "
                  f"{info.get('settings', '')}", ""]
        if s["configs"]:
            lines += _measured(results, model, s, cal, min_dense_acc)
            rows = bars(results, model, s, min_dense_acc)
            if rows:
                lines += ["", "Bars at the default calibration budget:", "",
                          "| bar | measured | result |", "|---|---|---|",
                          *(f"| {b} | {m} | {r} |" for b, m, r in rows)]
        if cal:
            lines += ["", "Calibrated thresholds (`sparge-calibrate`, every budget in one "
                      "run; the default is the largest within +0.5% perplexity on its "
                      "held-out prompts):", "",
                      "| budget (l1) | file | sha256 | seconds |", "|---|---|---|---|"]
            for budget in sorted(cal, key=float):
                c = cal[budget]
                mark = " (default)" if c.get("default") else ""
                lines.append(f"| {budget}{mark} | `{os.path.basename(c.get('path', ''))}` | "
                             f"{str(c.get('sha256', ''))[:12]} | {c.get('seconds', 0):.0f} |")
        lines.append("")
    notes = last.get("notes") or []
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    lines += ["## Commands", ""]
    for run in runs:
        lines.append(f"- {run.get('date', '?')}: `{run.get('command', '?')}`")
    return "\n".join(lines) + "\n"


def _family(config: str) -> str:
    """The curve a configuration belongs to in the plot: calibrated files, uniform settings, or
    a point of its own (FLASH_ATTN starts both curves)."""
    return ("calibrated" if config.startswith("l1=") else "uniform" if config.startswith("cdf=")
            else config)


def plot(results: dict[str, Any], path: str, min_dense_acc: float) -> None:
    """One column per model. Top: accuracy (mean over informative tasks) against measured block
    sparsity, one colour per context length, calibrated files on solid lines and uniform
    ``cdfthreshd`` settings on dashed ones, both from FLASH_ATTN; the untuned defaults a
    triangle. Bottom: perplexity change against FLASH_ATTN on the perplexity documents against
    the block sparsity there, the same two curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in results["models"] if summary(results, m, min_dense_acc)["configs"]]
    cols = max(1, len(models))
    fig, axes = plt.subplots(2, cols, figsize=(6.2 * cols, 8.4), squeeze=False)
    styles = {"calibrated": "o-", "uniform": "s--"}
    for col, model in enumerate(models):
        s = summary(results, model, min_dense_acc)
        ax, bx = axes[0][col], axes[1][col]
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, n in enumerate(s["lengths"]):
            color = colors[i % len(colors)]
            pts = {}
            for c in s["configs"]:
                cell = s["rows"][c]["lengths"][n]
                if cell["accuracy"] is not None and cell["sparsity"] is not None:
                    pts[c] = (100 * cell["sparsity"], cell["accuracy"])
            _curves(ax, pts, styles, color, f"{n} tokens")
        pts = {c: (100 * row["ppl_sparsity"], 100 * row["ppl_change"])
               for c, row in s["rows"].items()
               if row.get("ppl_change") is not None and row.get("ppl_sparsity") is not None}
        _curves(bx, pts, styles, "black", None)
        ax.set_ylabel("accuracy (informative tasks)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{model}: accuracy (solid: calibrated, dashed: uniform cdfthreshd)",
                     fontsize=9)
        bx.set_ylabel("perplexity vs FLASH_ATTN (%)")
        bx.axhline(0.5, color="grey", lw=0.8, ls=":")  # the +0.5% bar
        bx.set_title(f"{model}: perplexity on documents of its context", fontsize=9)
        for a in (ax, bx):
            a.set_xlabel("measured block sparsity (%)")
            a.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, title="context", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _curves(ax: Any, pts: dict[str, tuple[float, float]], styles: dict[str, str], color: str,
            label: str | None) -> None:
    """The calibrated and uniform curves through ``pts`` ({config: (x, y)}), each from
    FLASH_ATTN's point in order of sparsity, the other configurations as single points;
    ``label`` on the first thing drawn, one annotation a point (coincident ones joined)."""
    start = [pts["flash_attn"]] if "flash_attn" in pts else []
    for family, style in styles.items():
        line = start + sorted(p for c, p in pts.items() if _family(c) == family)
        if len(line) > len(start):
            ax.plot([p[0] for p in line], [p[1] for p in line], style, color=color, label=label)
            label = None
    for c, (x, y) in pts.items():
        if _family(c) not in styles:
            ax.plot([x], [y], "^" if c == "untuned" else "o", color=color, label=label)
            label = None
    names: dict[tuple[float, float], list[str]] = {}
    for c, (x, y) in pts.items():
        names.setdefault((round(x, 2), round(y, 4)), []).append(
            config_label(c).replace("SPARGE ", ""))
    for (x, y), labels in names.items():
        ax.annotate(", ".join(labels), (x, y), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")


def write_report(results: dict[str, Any], out_prefix: str, min_dense_acc: float = 0.2) -> str:
    """``<out_prefix>.md`` and ``.png`` from the results; returns the markdown."""
    md = markdown(results, min_dense_acc)
    with open(out_prefix + ".md", "w") as f:
        f.write(md)
    plot(results, out_prefix + ".png", min_dense_acc)
    return md


def stderr(p: float, n: int) -> float:
    """Binomial standard error of an accuracy ``p`` over ``n`` samples."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")
