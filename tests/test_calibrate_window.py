"""``sparge-calibrate`` on sliding-window models (CPU, transformers driver): which layers are
windowed (from the HF config), and end to end on tiny random Gemma 3 (sliding and full layers) and
Mistral (every layer windowed) models: windowed layers are never captured or searched and are
written dense, full layers are searched, and the backend loads the file for the model."""

from __future__ import annotations

import re

import pytest
import torch

import sparge_calibrate.allocate as allocate_mod
import sparge_calibrate.search as search_mod
from sparge_calibrate.cli import main
from sparge_calibrate.hf_driver import model_info, window_layers
from sparge_serve.kernels.geometry import PV_SKIP_OFF
from sparge_serve.thresholds import ModelGeometry, load_thresholds, model_geometry_of
from tests.test_calibrate_cli import token_prompt_files

HQ, HKV, D, VOCAB = 4, 2, 64, 300
GEMMA_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
FAST = ["--sim-grid", "-1", "0.5", "--cdf-steps", "3", "--cdf-points", "4", "--pv-steps", "2",
        "--quiet"]


def test_window_layers_gemma3_default_pattern():
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(num_hidden_layers=6).to_dict()
    assert window_layers(config) == frozenset({0, 1, 2, 3, 4})
    # a multimodal config: its text config decides
    assert window_layers({"model_type": "gemma3", "text_config": config}) == frozenset(range(5))


def test_window_layers_gemma3_older_sliding_window_pattern():
    config = {"num_hidden_layers": 12, "sliding_window": 512, "sliding_window_pattern": 6}
    assert window_layers(config) == frozenset(range(12)) - {5, 11}


def test_window_layers_mistral_every_layer_llama_none():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    config = MistralConfig(num_hidden_layers=3, sliding_window=4096).to_dict()
    assert window_layers(config) == frozenset({0, 1, 2})
    assert window_layers(LlamaConfig(num_hidden_layers=3).to_dict()) == frozenset()
    assert window_layers(MistralConfig(num_hidden_layers=3, sliding_window=None).to_dict()) \
        == frozenset()
    qwen = Qwen2Config(num_hidden_layers=3, sliding_window=4096, use_sliding_window=False)
    assert window_layers(qwen.to_dict()) == frozenset()


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """A 4-layer Gemma 3 text model (sliding, full, sliding, full), random weights, head dim 64."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=HQ * D, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, max_position_embeddings=1024,
        sliding_window=128, layer_types=GEMMA_TYPES, query_pre_attn_scalar=48)
    path = tmp_path_factory.mktemp("tiny-gemma3")
    Gemma3ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """A 2-layer Mistral model (every layer windowed), random weights, head dim 64."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=HQ * D, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, max_position_embeddings=1024,
        sliding_window=128)
    path = tmp_path_factory.mktemp("tiny-mistral")
    MistralForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    calib, heldout, _ = token_prompt_files(tmp_path_factory.mktemp("prompts"), VOCAB)
    return calib, heldout


@pytest.fixture
def searched(monkeypatch):
    """The real search (either allocation), recording the samples of every layer it is given."""
    seen = []

    def recording(real):
        def record(samples, *args, **kwargs):
            seen.append(samples)
            return real(samples, *args, **kwargs)

        return record

    for module, name in ((search_mod, "search_layer"), (allocate_mod, "layer_curves")):
        monkeypatch.setattr(module, name, recording(getattr(module, name)))
    return seen


def _calibrate(model, prompts, out, capsys, *extra) -> str:
    calib, heldout = prompts
    rc = main([str(a) for a in (model, "--prompts", calib, "--out", out, "--driver", "hf",
                                "--device", "cpu", "--max-len", 420, "--report", heldout,
                                "--l1", 0.01, *FAST, *extra)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def _assert_dense(th, layers):
    for i in layers:
        assert (th.cdfthreshd[i] == 1).all() and (th.simthreshd1[i] == 1).all(), i
        assert (th.pvthreshd[i] == PV_SKIP_OFF).all() and (th.is_sparse[i] == 0).all(), i


def _vllm_geometry(path):
    """The geometry the backend checks the file against, from vLLM's engine config."""
    from transformers import AutoConfig

    from tests.test_sliding_window import _engine_config

    return model_geometry_of(_engine_config(path, AutoConfig.from_pretrained(path)).model_config)


def test_gemma3_windowed_layers_dense_full_layers_searched(gemma3, prompts, searched, tmp_path,
                                                          capsys):
    assert model_info(str(gemma3)).window_layers == frozenset({0, 2})
    out = tmp_path / "gemma3.safetensors"
    stdout = _calibrate(gemma3, prompts, out, capsys)

    # only the two full layers were captured and searched, each on both prompts
    assert len(searched) == 2 and all(len(s) == 2 for s in searched)
    assert all(s.q.shape[1:] == (HQ, D) and s.k.shape[1:] == (HKV, D)
               for layer in searched for s in layer)
    th = load_thresholds(out, expect=_vllm_geometry(gemma3))
    assert th.simthreshd1.shape == (4, HQ)
    _assert_dense(th, (0, 2))
    # the table shows the windowed layers as dense (window), the full ones with a sparsity
    for i in (0, 2):
        assert re.search(rf"^\W*{i}\W.*dense \(window\)", stdout, re.M), stdout
    for i in (1, 3):
        assert re.search(rf"^\W*{i}\W.*\d%", stdout, re.M), stdout
        assert not re.search(rf"^\W*{i}\W.*window", stdout, re.M), stdout
    assert "calibrated" in stdout and "untuned defaults" in stdout


def test_gemma3_layers_per_pass_gives_the_same_file(gemma3, prompts, searched, tmp_path, capsys):
    one, per_layer = tmp_path / "one.safetensors", tmp_path / "per_layer.safetensors"
    _calibrate(gemma3, prompts, one, capsys)
    _calibrate(gemma3, prompts, per_layer, capsys, "--layers-per-pass", "1")
    a, b = load_thresholds(one), load_thresholds(per_layer)
    for name in ("simthreshd1", "cdfthreshd", "pvthreshd", "is_sparse"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_mistral_every_layer_windowed_is_written_dense(mistral, prompts, searched, tmp_path,
                                                       capsys):
    out = tmp_path / "mistral.safetensors"
    stdout = _calibrate(mistral, prompts, out, capsys)
    assert searched == []
    th = load_thresholds(out, expect=ModelGeometry(2, HQ, HKV, D))
    _assert_dense(th, (0, 1))
    assert stdout.count("dense (window)") == 2, stdout


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


@pytest.mark.parametrize("chunked", [False, True], ids=["one-call", "query-chunks"])
def test_capture_and_report_keep_the_sliding_window(gemma3, chunked, monkeypatch):
    """Past the window (300 tokens, window 128) the capture's and the quality report's attention
    functions give the model's own SDPA logits: transformers hands a registered attention
    function no mask, and a windowed layer run without its window is another model. Chunked:
    128 queries at a time against the keys their window reaches (a long prompt's path)."""
    import sparge_calibrate.hf_driver as hd
    from sparge_calibrate.evaluators import ReferenceEvaluator

    monkeypatch.setattr(hd, "_WINDOW_CHUNK", 16 if chunked else hd._WINDOW_CHUNK)

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, VOCAB, (300,), generator=g).tolist()
    model = hd.load_model(str(gemma3), "cpu", torch.float32, "sdpa")
    want = _logits(model, ids)
    rec = hd._Recorder(4, keep=[1, 3])
    hd._register(hd.CAPTURE_ATTN, rec.attention)
    hd._set_attention(model, hd.CAPTURE_ATTN)
    got = _logits(model, ids)
    hd._set_attention(model, "sdpa")
    assert len(rec.layers[1]) == 1 and not rec.layers[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    dense = tuple(torch.full((4, HQ), x) for x in (1.0, 1.0, PV_SKIP_OFF))
    (row,) = hd.quality_report(str(gemma3), [ids], {"dense-equivalent": dense},
                               ReferenceEvaluator(), model=model)
    assert row.max_abs_logprob_diff < 1e-3 and row.sparsity == 0.0
    # the report's dense pass is the model's own (SDPA over transformers' window masks)
    lp = torch.log_softmax(want[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])
    assert row.dense_perplexity == pytest.approx(float(torch.exp(-lp.mean())), rel=1e-5)


def test_summary_counts_only_searched_heads():
    """The summary's overall sparsity and dense-head count are over the full-attention heads:
    sliding-window layers, never searched, would otherwise dilute them."""
    from dataclasses import replace

    from sparge_calibrate.search import LayerBudget, dense_layer_result
    from sparge_calibrate.summary import format_summary, overall_sparsity

    budget = LayerBudget(0.01, 0.02)
    full = replace(dense_layer_result(4, budget, "l1"), sparsity=torch.tensor([0.2, 0.4, 0, 0]),
                   is_sparse=torch.tensor([True, True, False, False]))
    results = [dense_layer_result(4, budget, "l1", window=True)] * 5 + [full]
    assert overall_sparsity(results) == pytest.approx(0.15)
    footer = format_summary(results)[2]
    assert footer.startswith("overall mean sparsity 15.0% over 4 full-attention heads; 2 of them "
                             "dense; 5 sliding-window layers dense, not searched")
    assert overall_sparsity([dense_layer_result(4, budget, "l1", window=True)]) == 0.0
    assert "over 4 heads; 2 of them dense (error" in format_summary([full])[2]
    floored = replace(dense_layer_result(4, budget, "l1"), floored=True)
    rows, footer = format_summary([full, floored, full])[1:]
    assert rows[1][4] == "4/4 (layer floor)" and rows[0][4] == "2/4"
    assert footer.endswith("; layer 1 dense (below --layer-sparsity-floor) (error rule: l1)")
