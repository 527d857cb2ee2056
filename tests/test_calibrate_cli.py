"""``sparge-calibrate`` end to end on a tiny random Llama (CPU), its argument errors, prompt files,
and the transformers capture driver."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from sparge_calibrate.cli import main, parse_layer_spec
from sparge_calibrate.hf_driver import CAPTURE_ATTN, capture_hf, load_model, model_info
from sparge_calibrate.prompts import MIN_PROMPT_TOKENS, PromptError, load_prompts, prompts_sha256
from sparge_serve.reference import dense_causal_attention_ref
from sparge_serve.thresholds import ModelGeometry, config_hash, load_thresholds

LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2, 4, 2, 64, 300
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a real but coarse search, so the CLI runs in seconds on the CPU reference
FAST = ["--sim-grid", "-1", "0.5", "--cdf-steps", "3", "--cdf-points", "4", "--pv-steps", "2",
        "--quiet"]


def _words(n: int, start: int = 0) -> str:
    return " ".join(f"w{(start + i) % (VOCAB - 4)}" for i in range(n))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random Llama (2 layers, 4 query / 2 KV heads, head dim 64) with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HEADS * HEAD_DIM, intermediate_size=512,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "[PAD]": 3}
    vocab.update({f"w{i}": i + 4 for i in range(VOCAB - 4)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>",
                            eos_token="</s>", pad_token="[PAD]").save_pretrained(path)
    return path


def token_prompt_files(d, vocab: int = VOCAB):
    """``calib.jsonl`` (two prompts of random token ids, 420 and 400) and ``heldout.jsonl`` (one
    of 150) in folder ``d``; also the generator's next ids, for more files."""
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(4, vocab, (n,), generator=g).tolist()
    calib = d / "calib.jsonl"
    calib.write_text("".join(json.dumps({"prompt_token_ids": ids(n)}) + "\n" for n in (420, 400)))
    heldout = d / "heldout.jsonl"
    heldout.write_text(json.dumps({"prompt_token_ids": ids(150)}) + "\n")
    return calib, heldout, ids


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    calib, heldout, ids = token_prompt_files(d)
    text = d / "calib.txt"
    text.write_text(f"{_words(380)}\n{_words(10, 7)}\n\n\n{_words(400, 3)}\n")
    short = d / "short.jsonl"
    short.write_text(json.dumps({"prompt_token_ids": ids(400)}) + "\n"
                     + json.dumps({"prompt_token_ids": ids(100)}) + "\n")
    return {"calib": calib, "heldout": heldout, "text": text, "short": short, "dir": d}


def _run_ok(argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def test_end_to_end_with_report_and_plot(tiny_model, files, tmp_path, capsys):
    out_file, png = tmp_path / "tiny.safetensors", tmp_path / "sparsity.png"
    stdout = _run_ok([tiny_model, "--prompts", files["calib"], "--out", out_file, "--plot", png,
                      "--report", files["heldout"], "--layer-l1", "0:0.04", "--layer-pv-l1",
                      "1:0.09", *FAST], capsys)

    th = load_thresholds(out_file, expect=ModelGeometry(LAYERS, HEADS, KV_HEADS, HEAD_DIM))
    assert th.simthreshd1.shape == (LAYERS, HEADS)
    assert th.l1 == 0.005 and th.pv_l1 == 0.0075 and th.sim_rule == "l1" and th.num_prompts == 2
    assert th.allocation == "model"
    # the per-layer budgets used: layer 0 its own l1 with the global PV margin, layer 1 its own PV
    f32 = lambda *x: torch.tensor(x, dtype=torch.float32)
    assert torch.equal(th.l1_budget, f32(0.04, 0.005))
    assert torch.equal(th.pv_l1_budget, f32(0.04 + (0.0075 - 0.005), 0.09))
    from transformers import AutoConfig

    assert th.config_hash == config_hash(AutoConfig.from_pretrained(tiny_model).to_dict())
    assert th.model == str(tiny_model)
    prompts = [json.loads(line)["prompt_token_ids"] for line in files["calib"].read_text().split("\n")
               if line]
    assert th.prompts_sha256 == prompts_sha256(prompts)
    assert th.package_version and th.created
    # structure, not sparsity: a random model attends near-uniformly, so heads may well be dense;
    # whatever was chosen is consistent (load_thresholds validated dense heads are fully dense)
    sparse = th.is_sparse.bool()
    assert (th.cdfthreshd[sparse] < 1).all() or not sparse.any()

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "overall mean sparsity" in stdout and "dense heads" in stdout
    # layer 0's own budget with the global PV margin (rich or plain table)
    assert re.search(r"^\W*0\W+0\.04\W+0\.0425\W", stdout, re.M), stdout
    assert "calibrated" in stdout and "untuned defaults" in stdout and "ppl" in stdout


def test_ppl_target_writes_the_largest_budget_within_it(tiny_model, files, tmp_path, capsys):
    """``--ppl-target``: one capture, a search per ``--budgets`` candidate, a held-out row per
    candidate; the file written is the largest budget within the target (here every one is: a
    target of +90%), with that budget in its metadata; calibrating that budget alone gives the
    same thresholds. ``--keep-candidates`` writes every candidate next to it."""
    out_file = tmp_path / "target.safetensors"
    stdout = _run_ok([tiny_model, "--prompts", files["calib"], "--out", out_file, "--report",
                      files["heldout"], "--ppl-target", "0.9", "--budgets", "0.2", "0.01",
                      "--keep-candidates", *FAST], capsys)
    th = load_thresholds(out_file, expect=ModelGeometry(LAYERS, HEADS, KV_HEADS, HEAD_DIM))
    kept = {b: load_thresholds(tmp_path / f"target.l1_{b}.safetensors") for b in ("0.01", "0.2")}
    assert kept["0.01"].l1 == pytest.approx(0.01) and kept["0.2"].l1 == pytest.approx(0.2)
    for name in ("simthreshd1", "cdfthreshd", "pvthreshd"):
        assert torch.equal(getattr(kept["0.2"], name), getattr(th, name)), name
    assert th.l1 == pytest.approx(0.2) and th.pv_l1 == pytest.approx(0.3)
    assert torch.equal(th.l1_budget, torch.full((LAYERS,), 0.2))
    for row in ("l1 0.01", "l1 0.2", "untuned defaults"):
        assert row in stdout
    alone = tmp_path / "alone.safetensors"
    _run_ok([tiny_model, "--prompts", files["calib"], "--out", alone, "--l1", "0.2", "--pv-l1",
             "0.3", *FAST], capsys)
    single = load_thresholds(alone)
    for name in ("simthreshd1", "cdfthreshd", "pvthreshd"):
        assert torch.equal(getattr(th, name), getattr(single, name)), name


def test_budget_choice_takes_the_largest_within_the_target():
    """:func:`budget.choose`: the largest budget whose perplexity rise is within the target (a
    fall counts as within), else the smallest, flagged; the rise is the worst prompt's where
    that is above the pooled one."""
    from types import SimpleNamespace

    from sparge_calibrate.budget import Candidate, choose, perplexity_rise

    cands = [Candidate(b, 1.5 * b, []) for b in (0.005, 0.01, 0.02, 0.04)]
    rows = [SimpleNamespace(name=c.name, perplexity=p, dense_perplexity=10.0, worst_rise=-1.0)
            for c, p in zip(cands, (9.99, 10.04, 10.03, 10.2), strict=True)]

    def rise():
        return {r.name: perplexity_rise(r) for r in rows}

    assert choose(cands, rise(), 0.005) == (2, True)  # +0.3% at 0.02; 0.04 is +2%
    assert choose(cands, rise(), 0.0) == (0, True)  # -0.1% at 0.005
    rows[2].worst_rise = 0.007  # one prompt of 0.02 loses 0.7%: 0.01 (+0.4%) is the largest
    assert choose(cands, rise(), 0.005) == (1, True)
    rows[0].perplexity = 10.1
    assert choose(cands, rise(), 0.001) == (0, False)


@pytest.mark.parametrize("flags,expect", [
    ([], dict(l1=0.005, pv_l1=0.0075, ppl_target=None)),
    (["--report", "h.txt"], dict(l1=0.005, pv_l1=0.0075, ppl_target=0.005)),
    (["--report", "h.txt", "--ppl-target", "0.01", "--pv-l1", "0.02"],
     dict(l1=0.005, pv_l1=0.02, ppl_target=0.01)),
    (["--report", "h.txt", "--l1", "0.02"], dict(l1=0.02, pv_l1=0.03, ppl_target=None)),
    (["--report", "h.txt", "--pv-l1", "0.05"], dict(l1=0.005, pv_l1=0.05, ppl_target=None)),
    (["--report", "h.txt", "--layer-l1", "0:0.02"], dict(l1=0.005, ppl_target=None)),
    (["--l1", "0.05"], dict(l1=0.05, pv_l1=0.075, ppl_target=None)),
], ids=["no-report", "report", "report-target", "report-l1", "report-pv", "report-layer", "l1"])
def test_budget_resolution(flags, expect):
    """:func:`budget.resolve`: held-out prompts and no budget flag choose the budget by
    perplexity (+0.5% unless --ppl-target says otherwise; --l1 / --pv-l1 then set the candidates'
    PV ratio); any budget flag, or no --report, fixes it (l1 0.005, PV 1.5 x l1 unless
    given)."""
    from sparge_calibrate import budget
    from sparge_calibrate.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["m", "--prompts", "p.txt", "--out", "t.safetensors", *flags])
    budget.resolve(parser, args)
    for key, value in expect.items():
        assert getattr(args, key) == (value if value is None else pytest.approx(value)), key
    if args.ppl_target is not None:
        assert args.budgets == list(budget.DEFAULT_CANDIDATES)


def test_search_flags_reach_the_search(tiny_model, files, tmp_path, monkeypatch):
    import sparge_calibrate.cli as cli

    seen = []
    monkeypatch.setattr(cli, "_run", lambda *a: seen.append(a[5]) or 0)
    argv = [tiny_model, "--prompts", files["calib"], "--out", tmp_path / "t.safetensors",
            "--sparsity-floor", "0.2", "--layer-sparsity-floor", "0.3", "--quantile", "0.5",
            "--allocation", "head", *FAST]
    assert main([str(a) for a in argv]) == 0
    (config,) = seen
    assert (config.sparsity_floor, config.layer_sparsity_floor, config.quantile) == (0.2, 0.3, 0.5)
    assert (config.sim_grid, config.cdf_steps, config.pv_steps) == ((-1.0, 0.5), 3, 2)
    assert (config.allocation, config.cdf_points) == ("head", 4)


@pytest.mark.parametrize("allocation", ["model", "head"])
def test_layers_per_pass_gives_the_same_file(allocation, tiny_model, files, tmp_path, capsys):
    """--layers-per-pass 1 (one layer's Q/K/V in memory at a time) finds the same thresholds:
    each layer is measured only on its own samples, and the model-wide allocation (whose PV
    search captures each pass again) sees every layer's curves either way."""
    one_pass, per_layer = tmp_path / "one.safetensors", tmp_path / "per_layer.safetensors"
    flags = ["--allocation", allocation, "--l1", "0.2", "--pv-l1", "0.3", "--sparsity-floor", "0",
             "--layer-sparsity-floor", "0", *FAST]
    _run_ok([tiny_model, "--prompts", files["calib"], "--out", one_pass, *flags], capsys)
    _run_ok([tiny_model, "--prompts", files["calib"], "--out", per_layer, "--layers-per-pass", "1",
             *flags], capsys)
    a, b = load_thresholds(one_pass), load_thresholds(per_layer)
    assert a.allocation == b.allocation == allocation
    # a loose budget without floors: sparse heads with the PV skip, so the PV search (and, per
    # pass, the capture it needs again) is what is compared
    assert a.is_sparse.any() and (a.pvthreshd < 50).any()
    for name in ("simthreshd1", "cdfthreshd", "pvthreshd", "is_sparse"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_layer_sensitivity_moves_budgets_between_layers(tiny_model, files, tmp_path, capsys,
                                                        caplog):
    """--layer-sensitivity measures each layer served alone (the log names both layers' KL) and
    writes the per-layer budgets, each within the range around --l1, in the file (moved ones
    only after the moved allocation measured no worse); the held-out report measures the
    result."""
    import logging

    from sparge_calibrate.sensitivity import LAYER_BUDGET_RANGE

    out = tmp_path / "s.safetensors"
    with caplog.at_level(logging.INFO, logger="sparge_calibrate"):
        _run_ok([tiny_model, "--prompts", files["calib"], "--out", out, "--l1", "0.05",
                 "--layer-sensitivity", "--report", files["heldout"],
                 "--sparsity-floor", "0", "--layer-sparsity-floor", "0", *FAST], capsys)
    msgs = [r.getMessage() for r in caplog.records if "layer sensitivity at" in r.getMessage()]
    assert "0: " in msgs[0] and "1: " in msgs[0], msgs
    th = load_thresholds(out)
    assert th.is_sparse.any()
    for b in th.l1_budget.tolist():
        assert 0.05 / LAYER_BUDGET_RANGE - 1e-6 <= b <= 0.05 * LAYER_BUDGET_RANGE + 1e-6
    # budgets that moved were checked by measurement and kept
    if any(abs(b - 0.05) > 1e-6 for b in th.l1_budget.tolist()):
        assert any("moved budgets kept" in m for m in msgs), msgs
    assert torch.allclose(th.pv_l1_budget, th.l1_budget * 1.5)


def test_text_prompts_through_the_tokenizer(tiny_model, files, tmp_path, capsys):
    """.txt paragraphs through the model's tokenizer (BOS added as serving does), with --samples
    and --max-len, under another error rule."""
    out_file = tmp_path / "text.safetensors"
    _run_ok([tiny_model, "--prompts", files["text"], "--out", out_file, "--samples", "1",
             "--max-len", "384", "--sim-rule", "cosine", *FAST], capsys)
    th = load_thresholds(out_file)
    assert th.num_prompts == 1 and th.sim_rule == "cosine"
    # no per-layer override: every layer's budgets are the global pair
    assert th.l1_budget.tolist() == [torch.tensor(0.005).item()] * LAYERS
    assert th.pv_l1_budget.tolist() == [torch.tensor(0.0075).item()] * LAYERS
    # the first paragraph (two lines), BOS first, truncated to --max-len
    tok_ids = [1] + [int(w[1:]) + 4 for w in f"{_words(380)} {_words(10, 7)}".split()]
    assert th.prompts_sha256 == prompts_sha256([tok_ids[:384]])


def test_python_dash_m_entry_point(tmp_path):
    """``python -m sparge_calibrate`` reaches the CLI (argument errors exit with 2)."""
    proc = subprocess.run(
        [sys.executable, "-m", "sparge_calibrate", str(tmp_path / "missing"), "--prompts", "x.jsonl",
         "--out", "x.safetensors"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "sparge-calibrate: error: MODEL_DIR" in proc.stderr


def test_hf_capture_is_what_attention_consumed(tiny_model):
    """Captured post-RoPE q and GQA k/v reproduce the attention output the model used, and the
    forward pass is unchanged by the capture."""
    model_dir = str(tiny_model)
    info = model_info(model_dir)
    ids = torch.randint(4, VOCAB, (200,), generator=torch.Generator().manual_seed(0))
    model = load_model(model_dir, "cpu", torch.float32, "sdpa")
    with torch.inference_mode():
        dense_hidden = model.base_model(input_ids=ids[None], use_cache=False).last_hidden_state

    o_proj_inputs, hidden = [], []
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda _m, args: o_proj_inputs.append(args[0][0].clone())) for layer in model.model.layers]
    hooks.append(model.base_model.register_forward_hook(
        lambda _m, _a, out: hidden.append(out.last_hidden_state)))
    cap = capture_hf(model_dir, [ids.tolist()], model=model)
    for h in hooks:
        h.remove()
    assert torch.equal(hidden[0], dense_hidden)  # the capture does not change the forward
    assert model.config._attn_implementation == "sdpa"  # and is switched off afterwards
    with torch.inference_mode():
        model.set_attn_implementation(CAPTURE_ATTN)  # a stale registration records nothing
        model(input_ids=ids[None], use_cache=False)

    assert len(cap.layers) == info.num_layers and cap.num_tokens == [200]
    for layer, (samples, scale) in enumerate(zip(cap.layers, cap.scales, strict=True)):
        (s,) = samples
        assert s.q.shape == (200, info.num_heads, info.head_dim)
        assert s.k.shape == s.v.shape == (200, info.num_kv_heads, info.head_dim)  # no repeat-KV
        assert scale == pytest.approx(info.head_dim ** -0.5)
        out = dense_causal_attention_ref(s.q, s.k, s.v, scale)
        torch.testing.assert_close(out.flatten(1), o_proj_inputs[layer], rtol=1e-4, atol=1e-5)


def test_quality_report_measures_what_sparsity_costs(tiny_model, monkeypatch):
    """Dense-equivalent thresholds reproduce the dense model; aggressive ones skip blocks and
    change the log-probabilities, and the report says both."""
    from sparge_calibrate.evaluators import ReferenceEvaluator
    from sparge_calibrate.hf_driver import quality_report

    ids = torch.randint(4, VOCAB, (600,), generator=torch.Generator().manual_seed(3)).tolist()
    full = lambda x: torch.full((LAYERS, HEADS), float(x))
    settings = {"dense": (full(1), full(1), full(50)), "aggressive": (full(-1), full(0.05), full(50))}
    dense, aggressive = quality_report(str(tiny_model), [ids, ids[:150]], settings,
                                       ReferenceEvaluator())
    assert dense.tokens == aggressive.tokens == 599 + 149
    assert dense.sparsity == 0 and dense.max_abs_logprob_diff < 1e-4 and dense.mean_kl < 1e-6
    assert dense.perplexity == pytest.approx(dense.dense_perplexity, rel=1e-5)
    assert aggressive.sparsity > 0.05
    assert aggressive.mean_abs_logprob_diff > 100 * max(dense.mean_abs_logprob_diff, 1e-7)
    assert aggressive.mean_kl > 0 and aggressive.dense_perplexity == dense.dense_perplexity
    # the chunked log-probabilities are the model's own: perplexity from its full logits
    model = load_model(str(tiny_model), "cpu", torch.float32, "sdpa")
    nll = []
    with torch.inference_mode():
        for p in (ids, ids[:150]):
            logits = model(input_ids=torch.tensor([p])).logits[0, :-1]
            nll.append(-torch.log_softmax(logits, -1).gather(1, torch.tensor(p[1:])[:, None]))
    assert dense.dense_perplexity == pytest.approx(math.exp(float(torch.cat(nll).mean())), rel=1e-5)
    # the worst prompt's rise: at least the pooled one, and 0 where nothing is skipped
    assert abs(dense.worst_rise) < 1e-5
    pooled = aggressive.perplexity / aggressive.dense_perplexity - 1
    assert aggressive.worst_rise >= pooled - 1e-9
    # dense runs kept between calls: the second call makes none and reports the same
    kept = {}
    first = quality_report(str(tiny_model), [ids, ids[:150]], {"aggressive": settings["aggressive"]},
                           ReferenceEvaluator(), model=model, dense_hidden=kept)
    assert sorted(kept) == [0, 1] and kept[0].shape[0] == 599
    import sparge_calibrate.hf_driver as hd

    real, calls = hd._hidden, []
    monkeypatch.setattr(hd, "_hidden", lambda *a: calls.append(1) or real(*a))
    again = quality_report(str(tiny_model), [ids, ids[:150]], {"aggressive": settings["aggressive"]},
                           ReferenceEvaluator(), model=model, dense_hidden=kept)
    assert len(calls) == 2  # one sparse pass a prompt, no dense one
    assert again[0].mean_kl == pytest.approx(first[0].mean_kl, rel=1e-6)
    assert again[0].dense_perplexity == pytest.approx(aggressive.dense_perplexity, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# argument errors: each one exits with code 2 and a message saying what is wrong


def test_sparse_attention_generates_with_dense_decode_steps(tiny_model):
    """As served: the prompt's forward pass is sparse, a decode step dense (SDPA over the sparse
    prompt's KV cache), and the model is back on SDPA afterwards."""
    import copy

    from sparge_calibrate.evaluators import ReferenceEvaluator
    from sparge_calibrate.hf_driver import SparseAttention, load_model

    model = load_model(str(tiny_model), "cpu", torch.float32, "sdpa")
    full = lambda x: torch.full((LAYERS, HEADS), float(x))  # noqa: E731
    attn = SparseAttention(ReferenceEvaluator(), full(-1), full(0.05), full(50))
    ids = torch.randint(4, VOCAB, (1, 600), generator=torch.Generator().manual_seed(5))
    nxt = torch.tensor([[7]])
    with torch.inference_mode():
        dense = model(input_ids=torch.cat([ids, nxt], 1)).logits[0]
        with attn.installed(model):
            pre = model(input_ids=ids, use_cache=True)
            valid = attn.valid
            cache = copy.deepcopy(pre.past_key_values)
            step = model(input_ids=nxt, cache=pre.past_key_values).logits[0, -1]
        assert model.config._attn_implementation == "sdpa"
        sdpa_step = model(input_ids=nxt, cache=cache).logits[0, -1]
    assert valid > 0 and attn.valid == valid and attn.sparsity > 0.05
    assert (pre.logits[0] - dense[:-1]).abs().max() > 1e-3  # the prompt ran sparse
    torch.testing.assert_close(step, sdpa_step, rtol=0, atol=0)  # the step ran dense


# ------------------------------------------------------------------------------------------------

def _bad_files(d):
    (d / "prompts.csv").write_text("a,b\n")
    (d / "empty.jsonl").write_text("\n")
    (d / "broken.jsonl").write_text("{not json\n")
    (d / "nofield.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    (d / "badids.jsonl").write_text(json.dumps({"prompt_token_ids": [1, "a"]}) + "\n")
    (d / "oov.jsonl").write_text(json.dumps({"prompt_token_ids": [5] * 299 + [VOCAB]}) + "\n")
    (d / "long.jsonl").write_text(json.dumps({"prompt_token_ids": [5] * 1100}) + "\n")
    (d / "nomodel").mkdir(exist_ok=True)
    (d / "calib.txt").write_text(f"{_words(300)}\n")
    hd32 = d / "hd32"
    hd32.mkdir(exist_ok=True)
    (hd32 / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 2, "vocab_size": 300,
        "intermediate_size": 256}))
    notok = d / "notok"
    notok.mkdir(exist_ok=True)
    (notok / "config.json").write_text((d / "hd32" / "config.json").read_text()
                                       .replace('"head_dim": 32', '"head_dim": 64')
                                       .replace('"hidden_size": 128', '"hidden_size": 256'))


# (argv edits, message fragment); {m} model, {p} calib prompts, {d} the prompts dir
ARG_ERRORS = [
    (["{d}/missing-model"], "is not a directory"),
    (["{d}/nomodel"], "has no config.json"),
    (["--prompts", "{d}/nope.jsonl"], "does not exist"),
    (["--prompts", "{d}/prompts.csv"], "must end with .txt or .jsonl"),
    (["--prompts", "{d}/empty.jsonl"], "holds no prompts"),
    (["--prompts", "{d}/broken.jsonl"], "not valid JSON"),
    (["--prompts", "{d}/nofield.jsonl"], "needs a `text` or a `prompt_token_ids` field"),
    (["--prompts", "{d}/badids.jsonl"], "must be a list of integers"),
    (["--prompts", "{d}/oov.jsonl"], "outside the model's vocabulary"),
    (["--prompts", "{d}/short.jsonl"], "prompt 1 has 100 tokens; need at least 384"),
    (["--prompts", "{d}/long.jsonl"], "max_position_embeddings 1024; pass --max-len 1024"),
    (["--out", "{d}/th.pt"], "must end with .safetensors"),
    (["--out", "{d}/no/such/dir/th.safetensors"], "does not exist"),
    (["--l1", "0"], "must be a positive number"),
    (["--l1", "-0.1"], "must be a positive number"),
    (["--pv-l1", "abc"], "is not a number"),
    (["--l1", "0.07", "--pv-l1", "0.07"], "must exceed --l1"),
    (["--sim-rule", "kl"], "invalid choice"),
    (["--layer-l1", "0-1"], "is not LAYERS:BUDGET"),
    (["--layer-l1", "1-0:0.04"], "is empty"),
    (["--layer-l1", "0:x"], "is not a number"),
    (["--layer-l1", "0:-1"], "budget must be a positive number"),
    (["--layer-l1", "0:0"], "budget must be a positive number"),
    (["--layer-l1", "0-5:0.04"], "layer 5 is out of range (the model has 2 layers, 0-1)"),
    (["--layer-l1", "0-1:0.04", "1:0.05"], "layer 1 is given more than one budget"),
    (["--layer-pv-l1", "0:0.004"], "PV budget 0.004 must exceed its l1 budget 0.005"),
    (["--l1", "1.5"], "1.5 must be at most 1"),
    (["--layer-l1", "0:2"], "budget must be at most 1"),
    (["--layer-l1", "0:0.999"], "layer 0: PV budget 1.0015 (its --layer-l1 budget plus"),
    (["--layer-l1", "0:0.05", "--layer-pv-l1", "0:0.0500000001"],
     "PV budget 0.05 must exceed its l1 budget 0.05"),
    (["--max-len", "100"], "below the minimum calibration prompt length of 384"),
    (["--max-len", "0"], "must be at least 1"),
    (["--samples", "0"], "must be at least 1"),
    (["--layers-per-pass", "0"], "must be at least 1"),
    (["--report", "{d}/nope.txt"], "--report: {d}/nope.txt does not exist"),
    (["--report", "{d}/prompts.csv"], "--report"),
    (["--plot", "{d}/heat.jpg"], "must end with .png"),
    (["--quantile", "1.5"], "must be in (0, 1]"),
    (["--sparsity-floor", "1"], "must be in [0, 1)"),
    (["--layer-sparsity-floor", "-0.1"], "must be in [0, 1)"),
    (["--layer-sparsity-floor", "half"], "'half' is not a number"),
    (["--sim-grid", "2"], "must be in [-1, 1]"),
    (["--pv-steps", "-1"], "must be >= 0"),
    (["--cdf-points", "1"], "--cdf-points 1 must be >= 2"),
    (["--allocation", "global"], "invalid choice: 'global'"),
    (["--allocation", "head", "--layer-sensitivity"], "drop it or use --allocation model"),
    (["--sensitivity-prompts", "0"], "must be at least 1"),
    (["--driver", "vllm", "--device", "cpu"], "--driver vllm needs --device cuda"),
    (["--tensor-parallel-size", "0"], "must be at least 1"),
    (["--tensor-parallel-size", "two"], "'two' is not an integer"),
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size 2 needs --driver vllm"),
    (["--device", "cpu", "--dtype", "bfloat16"], "use --dtype float32"),
    (["{d}/hd32"], "head dim 32 is not served"),
    (["{d}/notok", "--prompts", "{d}/calib.txt"], "no tokenizer loads from"),
    (["--ppl-target", "0.005"], "--ppl-target needs --report HELDOUT_FILE"),
    (["--ppl-target", "0", "--report", "{p}"], "--ppl-target 0 must be in (0, 1)"),
    (["--budgets", "0.01", "0.02"], "--budgets is for the candidates of --ppl-target"),
    (["--keep-candidates"], "--keep-candidates is for the candidates of --ppl-target"),
    (["--ppl-target", "0.01", "--report", "{p}", "--layer-l1", "0:0.02"],
     "--ppl-target chooses one budget for every layer"),
    (["--l1", "0.8"], "the PV budget (1.5 x --l1 unless --pv-l1 is given) must stay at most 1"),
    (["--ppl-target", "0.01", "--report", "{p}", "--budgets", "0.01", "0.7"],
     "--budgets 0.7: its PV budget (1.05"),
]
def test_vllm_capture_keeps_one_position_for_its_generated_token(tiny_model, tmp_path):
    """Prompts of the whole context pass the transformers driver; the vLLM driver, which
    generates one token after each prompt, asks for one token less."""
    from types import SimpleNamespace

    from sparge_calibrate import cli

    path = tmp_path / "full.jsonl"
    path.write_text(json.dumps({"prompt_token_ids": [5] * 1024}) + "\n")
    info = SimpleNamespace(vocab_size=VOCAB, max_positions=1024)
    parser = argparse.ArgumentParser()
    assert len(cli._load(parser, "--prompts", str(path), str(tiny_model), info, None, 256)[0]) == 1024
    parser.error = lambda message: (_ for _ in ()).throw(ValueError(message))
    with pytest.raises(ValueError, match=r"max_position_embeddings 1024 less the token the vLLM "
                                         r"capture generates; pass --max-len 1023"):
        cli._load(parser, "--prompts", str(path), str(tiny_model), info, None, 256, driver="vllm")
    assert len(cli._load(parser, "--prompts", str(path), str(tiny_model), info, 1023, 256,
                         driver="vllm")[0]) == 1023


if not torch.cuda.is_available():
    ARG_ERRORS.append((["--device", "cuda"], "no CUDA GPU is available"))


@pytest.mark.parametrize("edits,message", ARG_ERRORS, ids=[m for _, m in ARG_ERRORS])
def test_argument_errors(edits, message, tiny_model, files, tmp_path, capsys):
    d = files["dir"]
    _bad_files(d)
    fmt = lambda s: s.format(m=tiny_model, p=files["calib"], d=d)
    out = tmp_path / "t.safetensors"
    # defaults; an edit not starting with "-" replaces MODEL_DIR, --prompts/--out replace theirs
    model, opts, extra = str(tiny_model), {"--prompts": str(files["calib"]), "--out": str(out)}, []
    it = iter(fmt(e) for e in edits)
    for e in it:
        if not e.startswith("-") and not extra and model == str(tiny_model):
            model = e
        elif e in opts:
            opts[e] = next(it)
        else:
            extra.append(e)
    argv = [model, *(x for kv in opts.items() for x in kv), *extra]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert fmt(message) in err, err
    assert not out.exists()


def test_layer_spec_parser():
    assert parse_layer_spec("0-5:0.04") == (0, 5, 0.04)
    assert parse_layer_spec(" 7 : 1e-2 ") == (7, 7, 0.01)
    for bad in ("", "a:0.1", "1-:0.1", "0-5:0.04:1"):
        with pytest.raises(ValueError):
            parse_layer_spec(bad)


def test_prompt_file_formats(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("\n\nfirst paragraph\nsecond line\n  \nsecond\n\n\n")
    got = load_prompts(str(txt), lambda s: [len(w) for w in s.split()])
    assert got == [[5, 9, 6, 4], [6]]
    with pytest.raises(PromptError, match="no usable tokenizer"):
        load_prompts(str(txt), None)
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt_token_ids": [1, 2, 3]}\n\n{"text": "a b"}\n')
    assert load_prompts(str(jl), lambda s: [9] * len(s.split())) == [[1, 2, 3], [9, 9]]
    assert MIN_PROMPT_TOKENS == 384


@pytest.mark.parametrize("with_rich", [True, False])
def test_summary_table_with_and_without_rich(with_rich, monkeypatch, capsys):
    from sparge_calibrate.summary import print_table

    if not with_rich:
        monkeypatch.setitem(sys.modules, "rich.console", None)  # import fails -> plain text
    print_table("title", ["layer", "mean sparsity"], [["0", "41.0%"], ["1", "0.0%"]], "footer")
    out = capsys.readouterr().out
    assert "title" in out and "footer" in out and "41.0%" in out
    assert ("┃" in out) == with_rich


def test_prompt_file_not_utf8_names_the_byte_offset_in_the_file(tmp_path):
    """The offset counts from the start of the file, past the decoder's first chunk too."""
    jl = tmp_path / "p.jsonl"
    lines = [json.dumps({"text": "x" * 100}) + "\n"] * 200  # 23 KB of good lines first
    good = "".join(lines).encode()
    jl.write_bytes(good + b'{"text": "na\xefve"}\n')
    with pytest.raises(PromptError) as exc:
        load_prompts(str(jl), lambda s: [5])
    msg = str(exc.value)
    assert f"prompt file {jl} is not UTF-8 text: byte 0xef at offset {len(good) + 12} (line 201)" \
        in msg, msg


def test_prompt_file_newlines_read_as_before(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_bytes(b'{"prompt_token_ids": [1]}\r\n{"text": "a\xe2\x80\xa8b"}\r{"text": "c"}')
    assert load_prompts(str(jl), lambda s: [len(s)]) == [[1], [3], [1]]
    txt = tmp_path / "p.txt"
    txt.write_bytes(b"one\r\ntwo\r\n\r\nthree\r")
    assert load_prompts(str(txt), lambda s: [len(s)]) == [[7], [5]]


def test_prompt_file_unreadable(tmp_path, monkeypatch):
    import sparge_calibrate.prompts as prompts_mod

    p = tmp_path / "p.txt"
    p.write_text("hello\n")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(prompts_mod, "open", denied, raising=False)
    with pytest.raises(PromptError, match=r"prompt file .*p\.txt cannot be read \(Permission denied\)"):
        load_prompts(str(p), lambda s: [5])


def test_outputs_recognised_from_their_headers(tmp_path):
    from safetensors.torch import save_file

    from sparge_calibrate.outputs import not_heatmap, not_thresholds
    from sparge_calibrate.search import LayerBudget, LayerResult, dense_layer_result
    from sparge_calibrate.summary import plot_heatmap
    from sparge_serve.thresholds import Thresholds, save_thresholds

    th = tmp_path / "th.safetensors"
    save_thresholds(th, Thresholds.defaults(LAYERS, HEADS, KV_HEADS, HEAD_DIM))
    assert not_thresholds(str(th)) is None
    weights = tmp_path / "w.safetensors"
    save_file({f"layer{i}.weight": torch.zeros(1) for i in range(5)}, str(weights))
    why = not_thresholds(str(weights))
    assert "layer0.weight, layer1.weight, layer2.weight and 2 more" in why and "format None" in why
    # the thresholds metadata alone is not enough: the four threshold tensors must be there too
    save_file({"simthreshd1": torch.zeros(1)}, str(weights), metadata={"format": "sparge-thresholds"})
    assert not_thresholds(str(weights)) is not None

    png = tmp_path / "heat.tmp"  # the tool writes through a temporary name: the format is explicit
    h = HEADS
    result = LayerResult(torch.ones(h), torch.ones(h), torch.full((h,), 50.0),
                         torch.zeros(h, dtype=torch.bool), torch.zeros(h), None, torch.zeros(h),
                         torch.zeros(1, h), LayerBudget(0.06, 0.07), "l1")
    window = dense_layer_result(h, LayerBudget(0.06, 0.07), "l1", window=True)
    plot_heatmap([result, window], str(png), "title")  # a dense head, a sliding-window layer
    assert not_heatmap(str(png)) is None
    assert not_heatmap(str(th)) == "it is not a PNG file"
