"""The tiny trained model: its build pipeline (scripts/model) on a toy config, and the
committed model under models/sparge-tiny-code when it is there.

The pipeline fixture runs corpus -> tokenizer -> encode -> train (6 steps, context 256) ->
eval on CPU in a temporary folder, once for the module.
"""

from __future__ import annotations

import json
import math
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "model"))

import build_corpus  # noqa: E402
import eval_model  # noqa: E402
import train_model  # noqa: E402
import train_tokenizer  # noqa: E402

COMMITTED = ROOT / "models" / "sparge-tiny-code"
MAX_MODEL_DIR_BYTES = 25_000_000

ROUND_TRIP_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Foo(Bar):\n\tx: int = 0  # tab-indented\r\n\n\n    trailing   \n",
    'msg = f"héllo wörld — naïve café"  # Latin-1 and punctuation\n',
    "s = '日本語のテキスト'; t = '中文'; u = 'Ελληνικά'; e = '🙂🚀'\n",
    "x = {'k': [1, 2.5e-3, None]} ;; \\n \\t `code` $$ @@ ~~\n",
    "",
    " leading space and no newline",
]

TINY_TRAIN = [
    "--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4",
    "--kv-heads", "2", "--head-dim", "32", "--ctx", "256", "--warm-ctx", "128",
    "--warm-frac", "0.3", "--batch-tokens", "1024", "--micro-batch-tokens", "512",
    "--max-steps", "6", "--warmup-steps", "2", "--lr", "3e-3", "--log-every", "2",
    "--eval-every", "3", "--eval-windows", "2", "--device", "cpu", "--minutes", "5",
]  # fmt: skip
EVAL_CTX = [128, 256]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    work = tmp_path_factory.mktemp("tiny_model")
    data, model = work / "data", work / "model"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    roots = [(name, stdlib / name) for name in ("json", "email", "http", "logging", "urllib")]
    manifest = build_corpus.collect(data, max_chars=600_000, heldout_frac=0.15, roots=roots)
    train_tokenizer.train_tokenizer(data, model, vocab_size=512)
    manifest = build_corpus.encode(data, model)
    args = train_model.parse_args(["--data", str(data), "--out", str(model), *TINY_TRAIN])
    run_log = train_model.train(args)
    eval_args = eval_model.parse_args(
        ["--model", str(model), "--data", str(data), "--out-json", str(work / "eval.json"),
         "--plot", str(work / "attn.png"), "--card", str(work / "card.md"),
         "--ctx", *map(str, EVAL_CTX), "--attn-ctx", "256", "--plot-ctx", "256",
         "--map-size", "64", "--rows-per-chunk", "128", "--span-windows", "4",
         "--attn-windows", "1", "--plot-heads", "4", "--device", "cpu"]
    )  # fmt: skip
    report = eval_model.evaluate(eval_args)
    return {"work": work, "data": data, "model": model, "manifest": manifest,
            "run_log": run_log, "report": report, "roots": roots}  # fmt: skip


# ------------------------------------------------------------------------------ corpus
def _files(spec: dict[str, list[int]]) -> list[build_corpus.SourceFile]:
    out = []
    for group, sizes in spec.items():
        for i, size in enumerate(sizes):
            rel = f"{group}/sub/f{i:02d}.py"
            out.append(build_corpus.SourceFile("site", rel, "/nonexistent/" + rel, size))
    return out


def test_select_files_water_fills_groups_with_contiguous_runs():
    files = _files({"big": [1000] * 20, "mid": [300] * 5, "small": [100, 100]})
    chosen = build_corpus.select_files(files, max_chars=4000, min_bytes=1, max_bytes=10**6)
    assert sum(f.size for f in chosen) <= 4000
    by_group: dict[str, list[str]] = {}
    for f in chosen:
        by_group.setdefault(f.group, []).append(f.rel_path)
    # small groups are taken whole, the big one fills the rest with a prefix of its files
    assert len(by_group["site/small/sub"]) == 2 and len(by_group["site/mid/sub"]) == 5
    big = by_group["site/big/sub"]
    assert big == sorted(r.rel_path for r in files if r.group == "site/big/sub")[: len(big)]
    # corpus order: one group after the other, paths sorted inside a group
    keys = [(f.group, f.rel_path) for f in chosen]
    assert keys == sorted(keys)


def test_heldout_split_is_a_stable_function_of_the_path():
    keys = [f"site/pkg/m{i}.py" for i in range(2000)]
    held = [build_corpus.is_heldout(k, 0.1) for k in keys]
    assert held == [build_corpus.is_heldout(k, 0.1) for k in keys]
    assert 0.07 < np.mean(held) < 0.13
    assert not any(build_corpus.is_heldout(k, 0.0) for k in keys)


def test_collect_is_deterministic_and_splits_by_file(pipeline, tmp_path):
    m1 = pipeline["manifest"]
    m2 = build_corpus.collect(tmp_path, max_chars=600_000, heldout_frac=0.15,
                              roots=pipeline["roots"])  # fmt: skip
    assert m2["files_sha256"] == m1["files_sha256"]
    assert m2["docs"] == m1["docs"] and m2["chars"] == m1["chars"]
    for split in ("train", "heldout"):
        a = (pipeline["data"] / f"docs_{split}.jsonl").read_bytes()
        assert a == (tmp_path / f"docs_{split}.jsonl").read_bytes()
    assert m1["docs"]["train"] > 0 and m1["docs"]["heldout"] > 0
    train_docs = set(build_corpus.iter_docs(pipeline["data"], "train"))
    assert not train_docs & set(build_corpus.iter_docs(pipeline["data"], "heldout"))


def test_encoded_tokens_hold_the_documents(pipeline):
    data, manifest = pipeline["data"], pipeline["manifest"]
    eos = manifest["eos_id"]
    for split in ("train", "heldout"):
        toks = build_corpus.load_tokens(data, split)
        assert toks.dtype == np.uint16 and toks.size == manifest["tokens"][split]
        assert int((toks == eos).sum()) == manifest["docs"][split]  # one EOS after each doc
        assert toks[-1] == eos
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(pipeline["model"] / "tokenizer.json"))
    toks = build_corpus.load_tokens(data, "train")
    first_doc = next(build_corpus.iter_docs(data, "train"))
    first_ids = toks[: int(np.argmax(toks == eos))].tolist()
    assert tok.decode(first_ids, skip_special_tokens=False) == first_doc


def test_literal_end_of_text_in_a_source_file_stays_text(pipeline, tmp_path):
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text('SEP = "<|endoftext|>"\n' + "x = 1\n" * 50)
    data = tmp_path / "data"
    build_corpus.collect(data, max_chars=10**6, heldout_frac=0.0, roots=[("t", root)])
    build_corpus.encode(data, pipeline["model"])
    toks = build_corpus.load_tokens(data, "train")
    assert int((toks == 0).sum()) == 1 and toks[-1] == 0


def test_make_window_starts_with_eos():
    toks = np.arange(10, 30, dtype=np.uint16)
    w = build_corpus.make_window(toks, 3, 5, eos_id=0)
    assert w.tolist() == [0, 13, 14, 15, 16]


# --------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trips(pipeline, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pipeline["model"])
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == tok.eos_token_id == 0  # BOS prepended
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tokenizer_files(pipeline):
    cfg = json.loads((pipeline["model"] / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["clean_up_tokenization_spaces"] is False
    special = json.loads((pipeline["model"] / "special_tokens_map.json").read_text())
    assert set(special.values()) == {"<|endoftext|>"}


# ------------------------------------------------------------------------ train + save
def test_saved_model_loads_and_generates(pipeline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = pipeline["model"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert model.dtype == torch.bfloat16
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 32)
    assert cfg.tie_word_embeddings and cfg.vocab_size == len(tok)
    x = tok("import os\n\ndef main():\n", return_tensors="pt")
    out = model.generate(**x, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, x["input_ids"].shape[1] + 8)
    assert isinstance(tok.decode(out[0]), str)
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["dtype"] == "bfloat16" and saved["rope_parameters"]["rope_theta"] == 1e6


def test_train_log(pipeline):
    log = pipeline["run_log"]
    final = log["final"]
    assert final["steps"] == 6 and final["stop_reason"] == "max_steps"
    assert final["model_dir_bytes"] < 2_000_000
    assert [h["ctx"] for h in log["history"]][0] == 128 and log["history"][-1]["ctx"] == 256
    assert all(math.isfinite(h["loss"]) for h in log["history"])
    saved = json.loads((pipeline["model"].parent / "train_log.json").read_text())
    assert saved["final"]["steps"] == 6 and len(saved["evals"]) >= 2


def test_lr_schedule_warms_up_then_decays():
    args = train_model.parse_args(["--data", "d", "--out", "o", "--lr", "1e-3",
                                   "--warmup-steps", "10", "--min-lr-ratio", "0.1"])  # fmt: skip
    assert train_model.lr_at(0, 0.0, args) == pytest.approx(1e-4)
    assert train_model.lr_at(9, 0.0, args) == pytest.approx(1e-3)
    assert train_model.lr_at(50, 0.5, args) == pytest.approx(0.55e-3)
    assert train_model.lr_at(50, 1.0, args) == pytest.approx(1e-4)


def test_default_config_is_the_issue_geometry_and_fits_25mb():
    from transformers import LlamaForCausalLM

    args = train_model.parse_args(["--data", "d", "--out", "o"])
    cfg = train_model.build_config(args, vocab_size=4096, eos_id=0)
    assert (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 8, 2)
    assert cfg.rope_parameters["rope_theta"] >= 1e6 and cfg.max_position_embeddings == 32768
    assert args.ctx >= 16384
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    n = train_model.count_params(model)
    tokenizer_bytes = 400_000  # a 4096-token tokenizer.json is about 260 KB
    assert 2 * n + tokenizer_bytes <= MAX_MODEL_DIR_BYTES, n


# -------------------------------------------------------------------------------- eval
def test_eval_report(pipeline):
    report = pipeline["report"]
    assert [r["ctx"] for r in report["perplexity"]] == EVAL_CTX
    for r in report["perplexity"]:
        assert math.isfinite(r["loss"]) and 1 < r["ppl"] < 512 * 2
        assert r["bits_per_char"] > 0
    att = report["attention"]["256"]
    assert len(att["layers"]) == 2 and len(att["heads"][0]) == 4
    for row in att["layers"]:
        assert 0 <= row["sparsity_mass94"] <= 1 and 0 <= row["oracle_sparsity_l1"] <= 1
    work = pipeline["work"]
    assert (work / "attn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((work / "eval.json").read_text())
    assert on_disk["perplexity"] == report["perplexity"]
    card = (work / "card.md").read_text()
    assert "| 256 |" in card and "oracle sparsity" in card


def _masked_reference(q, k, v, scale, level, blkq, blkk):
    """Dense attention with -inf outside the kept blocks (plain loops over query blocks)."""
    L = q.shape[0]
    s = (q @ k.T) * scale
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    dense = p @ v
    nqb, nkb = L // blkq, L // blkk
    allowed = torch.zeros(L, L, dtype=torch.bool)
    kept = valid = 0
    for b in range(nqb):
        rows = slice(b * blkq, (b + 1) * blkq)
        masses = [float(p[rows, j * blkk : (j + 1) * blkk].sum()) / blkq for j in range(nkb)]
        valid_j = [j for j in range(nkb) if j * blkk <= (b + 1) * blkq - 1]
        order = sorted(valid_j, key=lambda j: -masses[j])
        keep, total = set(), 0.0
        for j in order:
            if total >= level - 1e-7:
                break
            keep.add(j)
            total += masses[j]
        keep |= {j for j in valid_j if j == 0 or (j + 1) * blkk - 1 >= b * blkq}
        kept += len(keep)
        valid += len(valid_j)
        for j in keep:
            allowed[rows, j * blkk : (j + 1) * blkk] = True
    sp = torch.softmax(s.masked_fill(~(allowed & causal), float("-inf")), -1) @ v
    l1 = float((sp - dense).abs().sum() / dense.abs().sum())
    return kept / valid, l1


@pytest.mark.parametrize("level", [0.5, 0.9, 1.0])
def test_head_structure_matches_a_dense_masked_reference(level):
    g = torch.Generator().manual_seed(0)
    L, D, blkq, blkk = 192, 16, 32, 16
    q = torch.randn(L, D, generator=g, dtype=torch.float64) * 2
    k = torch.randn(L, D, generator=g, dtype=torch.float64) * 2
    v = torch.randn(L, D, generator=g, dtype=torch.float64)
    st = eval_model.head_structure(q, k, v, 0.25, map_size=48, rows_per_chunk=64,
                                   blkq=blkq, blkk=blkk)  # fmt: skip
    i = eval_model.MASS_LEVELS.index(level)
    density, l1 = _masked_reference(q, k, v, 0.25, level, blkq, blkk)
    assert st["density"][i] == pytest.approx(density, abs=1e-12)
    assert st["l1"][i] == pytest.approx(l1, rel=1e-6, abs=1e-9)
    assert st["map"].shape == (48, 48)
    rows = st["map"].sum(-1)  # each pooled query row distributes mass 1
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-4)


# -------------------------------------------------------------------- committed model
@pytest.mark.skipif(not (COMMITTED / "model.safetensors").exists(),
                    reason="models/sparge-tiny-code is not committed yet")  # fmt: skip
def test_committed_model_loads_generates_and_round_trips():
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size = sum(f.stat().st_size for f in COMMITTED.iterdir() if f.is_file())
    assert size <= MAX_MODEL_DIR_BYTES, size
    with safe_open(str(COMMITTED / "model.safetensors"), "pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}  # noqa: SIM118
    tok = AutoTokenizer.from_pretrained(COMMITTED)
    for text in ROUND_TRIP_TEXTS:
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    model = AutoModelForCausalLM.from_pretrained(COMMITTED, dtype=torch.float32).eval()
    cfg = model.config
    assert (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 8, 2)
    prompt = "import numpy as np\n\n\ndef softmax(x):\n"
    x = tok(prompt, return_tensors="pt")
    out = model.generate(**x, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > x["input_ids"].shape[1]
    assert tok.decode(out[0], skip_special_tokens=True).startswith(prompt)
