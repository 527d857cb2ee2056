"""benchmarks/bench_e2e.py on the CPU: the geometry folders, the plan and its dry run, the results
file (stage merging, ratios, the ceiling, markdown, plot) and the driver's handling of its worker
processes. The GPU parts (the workers' engines) run on the GPU machine only."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_e2e.py"
sys.path.insert(0, str(SCRIPT.parent))
import bench_e2e  # noqa: E402
import e2e_plan  # noqa: E402
import e2e_report as report  # noqa: E402


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OUT": ""})


# ---- geometry folders -------------------------------------------------------------------------
def test_geometry_folders_load_offline(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    from sparge_serve.thresholds import ModelGeometry, load_thresholds

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = ROOT / "models" / "sparge-tiny-code"
    cfgs = {}
    for name, geo in e2e_plan.GEOMETRIES.items():
        folder = e2e_plan.write_geometry(name, tmp_path, tokenizer)
        cfgs[name] = c = AutoConfig.from_pretrained(folder)
        assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                c.head_dim, c.vocab_size) == (geo.layers, geo.hidden, geo.heads, geo.kv_heads,
                                              geo.head_dim, geo.vocab)
        assert (folder / "tokenizer.json").read_bytes() == (tokenizer / "tokenizer.json").read_bytes()
        assert len(AutoTokenizer.from_pretrained(folder)) == 4096
        th = load_thresholds(folder / e2e_plan.GATE_OPEN_FILE, expect=ModelGeometry(
            c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim))
        assert th.simthreshd1.eq(-1.0).all() and th.cdfthreshd.eq(1.0).all()
        assert th.pvthreshd.ge(50.0).all() and th.is_sparse.eq(1).all()
    llama = cfgs["llama8b"]
    assert llama.architectures == ["LlamaForCausalLM"] and llama.intermediate_size == 14336
    assert llama.max_position_embeddings == 131072 and not llama.tie_word_embeddings
    assert llama.rope_parameters == {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    gemma = cfgs["gemma3_270m"]
    assert gemma.architectures == ["Gemma3ForCausalLM"] and gemma.sliding_window == 512
    assert gemma.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert gemma.query_pre_attn_scalar == 256 and gemma.attn_logit_softcapping is None
    assert gemma.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert gemma.rope_parameters["full_attention"]["rope_theta"] == 1000000.0
    smol = cfgs["smollm2_135m"]
    assert smol.architectures == ["LlamaForCausalLM"] and smol.intermediate_size == 1536
    with pytest.raises(SystemExit, match="no tokenizer files"):
        e2e_plan.write_geometry("smollm2_135m", tmp_path / "other", tmp_path / "empty")


@pytest.mark.slow  # reading the GGUF file's metadata takes about 6 s
def test_smollm2_geometry_is_the_gguf_models():
    """The SmolLM2 geometry equals the config `sparge-models convert smollm2` writes from the
    GGUF file's metadata (where that package is installed)."""
    pytest.importorskip("gguf")
    from sparge_serve.models import ModelsError, locate, spec_for
    from sparge_serve.models.convert import _open, build_config

    try:
        src = locate(spec_for("smollm2"))
    except ModelsError as e:
        pytest.skip(str(e))
    reader, meta = _open(src.path)
    n_vocab = next(int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight")
    real = build_config(meta, n_vocab, True, "bfloat16").to_dict()
    ours = e2e_plan.hf_config("smollm2_135m").to_dict()
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
            "rope_parameters", "tie_word_embeddings", "architectures", "bos_token_id")
    assert {k: ours[k] for k in keys} == {k: real[k] for k in keys}
    assert ours["rms_norm_eps"] == pytest.approx(real["rms_norm_eps"])


def test_kv_bytes_and_overrides():
    llama, gemma = e2e_plan.GEOMETRIES["llama8b"], e2e_plan.GEOMETRIES["gemma3_270m"]
    assert llama.kv_bytes(1) == 2 * 2 * 8 * 128 * 32  # K and V, bf16, 8 KV heads, 32 layers
    assert gemma.window_layers == 15
    assert gemma.kv_bytes(4096) == 4 * 256 * (3 * 4096 + 15 * 512)  # windowed layers keep 512
    assert e2e_plan.position_overrides("llama8b", 131072) == {}
    assert e2e_plan.position_overrides("llama8b", 131328) == {"max_position_embeddings": 131328}
    p = llama.prompt(1000, (1000, 0))
    assert len(p["prompt_token_ids"]) == 1000 and max(p["prompt_token_ids"]) < 32000
    assert p == llama.prompt(1000, (1000, 0)) != llama.prompt(1000, (1000, 1))


# ---- configurations and the plan --------------------------------------------------------------
def test_configurations():
    assert report.parse_config("SPARGE@64:topk0.5")["topk"] == 0.5
    assert report.parse_config("FLASH_ATTN@16") == dict(
        backend="FLASH_ATTN", page=16, variant=None, topk=None, kv_cache_dtype="auto",
        attention_kernel=None, fp8_attention=False)
    fa3 = report.parse_config("SPARGE@64:topk0.5+fp8+triton")
    assert (fa3["kv_cache_dtype"], fa3["attention_kernel"]) == ("fp8", "triton")
    assert report.baseline_of("SPARGE@64:topk0.5+fa3") == "FLASH_ATTN@64"
    assert e2e_plan.sparge_options("SPARGE@64:topk0.5+fa3", "T", 4096) == dict(
        min_sparse_len=4096, thresholds="T", topk=0.5, attention_kernel="fa3")
    assert report.parse_config("SPARGE@64:topk0.5+fp8")["kv_cache_dtype"] == "fp8"
    dot = report.parse_config("SPARGE@64:topk0.5+fp8dot+triton")
    assert (dot["kv_cache_dtype"], dot["fp8_attention"], dot["attention_kernel"]) == (
        "fp8", True, "triton")
    assert report.baseline_of("SPARGE@64:topk0.5+fp8dot+triton") == "FLASH_ATTN@64+fp8"
    assert e2e_plan.sparge_options("SPARGE@64:topk0.5+fp8dot+triton", "T", 4096) == dict(
        min_sparse_len=4096, thresholds="T", topk=0.5, attention_kernel="triton",
        fp8_attention=True)
    assert sorted(["SPARGE@64:topk0.5+fp8dot+triton", "SPARGE@64:topk0.5+fp8+triton"],
                  key=report.config_order) == ["SPARGE@64:topk0.5+fp8+triton",
                                               "SPARGE@64:topk0.5+fp8dot+triton"]
    assert report.baseline_of("SPARGE@64:topk0.5+fp8") == "FLASH_ATTN@64+fp8"
    assert sorted(["SPARGE@64:topk0.5+fp8", "SPARGE@64:topk0.5", "FLASH_ATTN@64+fp8",
                   "FLASH_ATTN@64"], key=report.config_order) == [
        "FLASH_ATTN@64", "SPARGE@64:topk0.5", "FLASH_ATTN@64+fp8", "SPARGE@64:topk0.5+fp8"]
    for bad in ("SPARGE@64:topk0", "SPARGE@64:topk1.5", "SPARGE@64", "FLASH_ATTN@64:topk0.5",
                "FLASHINFER@16", "SPARGE:topk0.5", "SPARGE@64:topk0.5+fp16", "SPARGE@64+fp8",
                "FLASH_ATTN@64+fa3", "SPARGE@64:dense+triton", "SPARGE@64:topk0.5+fa3+fp8",
                "SPARGE@64:defaults+fa3", "FLASH_ATTN@64+fp8dot", "SPARGE@64:dense+fp8dot"):
        with pytest.raises(ValueError):
            report.parse_config(bad)
    assert report.baseline_of("SPARGE@64:topk0.1") == "FLASH_ATTN@64"
    assert report.baseline_of("SPARGE@16:defaults") == "FLASH_ATTN@16"
    assert e2e_plan.sparge_options("SPARGE@64:topk0.2", "T", 4096) == dict(
        min_sparse_len=4096, thresholds="T", topk=0.2)
    assert e2e_plan.sparge_options("SPARGE@64:untuned+fa3", "T", 4096) == dict(
        min_sparse_len=4096, thresholds="untuned", attention_kernel="fa3")
    assert e2e_plan.sparge_options("SPARGE@64:defaults", "T", 4096) == {}
    assert e2e_plan.sparge_options("SPARGE@64:dense", "T", 4096) == {"mode": "dense"}
    assert e2e_plan.sparge_options("FLASH_ATTN@64", "T", 4096) is None
    order = sorted(["SPARGE@64:defaults", "SPARGE@64:topk0.1", "FLASH_ATTN@64",
                    "SPARGE@64:topk1.0", "FLASH_ATTN@16", "SPARGE@64:untuned"],
                   key=report.config_order)
    assert order == ["FLASH_ATTN@16", "FLASH_ATTN@64", "SPARGE@64:topk1.0", "SPARGE@64:topk0.1",
                     "SPARGE@64:untuned", "SPARGE@64:defaults"]
    assert sorted(["SPARGE@64:topk0.5+fa3", "SPARGE@64:topk0.5"], key=report.config_order) == [
        "SPARGE@64:topk0.5", "SPARGE@64:topk0.5+fa3"]


def test_cli_help():
    res = _cli("--help")
    assert res.returncode == 0, res.stderr
    for word in ("ttft", "decode", "serve", "report", "--quick", "--dry-run", "--skip-done",
                 "--budget-s", "--tokenizer"):
        assert word in res.stdout


def test_dry_run_prints_the_plan_without_a_gpu(tmp_path):
    models = tmp_path / "models"
    res = _cli("ttft", "decode", "serve", "--dry-run", "--out", str(tmp_path),
               "--model-dir", str(models))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "13 engine runs planned" in out
    assert ("1. ttft   llama8b      FLASH_ATTN@64       lengths 8192 16384 32768 65536 131072; "
            "1 warm-up + 3 repeats; profiled [32768, 131072]") in out
    assert "SPARGE@64:topk1.0" in out and "SPARGE@64:defaults" in out
    assert "SPARGE@64:untuned" in out
    assert ("left out: decode llama8b FLASH_ATTN@64 context 32768 batch 32: KV cache of 129 GiB"
            in out)
    assert "concurrency 4 16; input 32768 ± 50%, output 128" in out
    assert not models.exists() and not (tmp_path / "e2e.json").exists()
    quick = _cli("ttft", "--quick", "--lengths", "8192", "131072", "--dry-run", "--out",
                 str(tmp_path))
    assert quick.returncode == 0, quick.stderr
    assert "4 engine runs planned" in quick.stdout
    assert "lengths 8192 131072; 1 warm-up + 2 repeats; profiled [131072]" in quick.stdout
    # a prefill of milliseconds (Gemma 3 270M at 8K) takes more timed repeats, up to 200
    small = _cli("ttft", "--geometries", "gemma3_270m", "--configs", "FLASH_ATTN@64",
                 "--lengths", "8192", "131072", "--dry-run", "--out", str(tmp_path))
    assert small.returncode == 0, small.stderr
    assert "lengths 8192 131072; 1 warm-up + 3 repeats (200 at 8192); profiled" in small.stdout
    bad = _cli("ttft", "--configs", "SPARGE@64:topk0", "--dry-run", "--out", str(tmp_path))
    assert bad.returncode == 2 and "(0, 1]" in bad.stderr


# ---- the real-weight geometries ------------------------------------------------------------------
GEMMA_FILE = ROOT / "benchmarks" / "results" / "quality_thresholds" / "gemma3_l1_0.05.safetensors"


def _real_plan(tmp_path, *extra: str, geometries=("gemma3_270m_real", "smollm2_135m_real")):
    args = bench_e2e.parser().parse_args([
        "ttft", "decode", "--geometries", *geometries,
        "--weights", "gemma3=/m/gemma3", "--weights", "smollm2=/m/smollm2",
        "--model-dir", str(tmp_path), "--lengths", "8192", "32768", "--profile-lengths", "32768",
        *extra])
    return e2e_plan.make_plan(args, report.load_results(str(tmp_path / "none.json")))


def test_real_weight_geometries_plan(tmp_path):
    """The converted folders serve with their trained weights, TTFT up to each model's context,
    the calibrated variants with the --thresholds file and its PV-off copy."""
    jobs, left_out = _real_plan(
        tmp_path, "--thresholds", f"gemma3={GEMMA_FILE}", "--configs", "FLASH_ATTN@64",
        "SPARGE@64:calibrated", "SPARGE@64:calibrated_nopv+fa3", "SPARGE@64:topk0.5",
        geometries=("gemma3_270m_real",))
    gemma = {j["config"]: j for j in jobs if j["geometry"] == "gemma3_270m_real"}
    assert all(j["model"] == "/m/gemma3" and j["weights"] for j in gemma.values())
    assert [j["points"] for j in gemma.values()] == [[(8192,), (32768,)]] * 4
    assert gemma["SPARGE@64:calibrated"]["sparge"] == dict(min_sparse_len=4096,
                                                           thresholds=str(GEMMA_FILE))
    assert gemma["SPARGE@64:calibrated_nopv+fa3"]["sparge"] == dict(
        min_sparse_len=4096, attention_kernel="fa3",
        thresholds=str(tmp_path / "gemma3_270m_real" / e2e_plan.NO_PV_FILE))
    assert gemma["SPARGE@64:topk0.5"]["sparge"]["thresholds"] == str(
        tmp_path / "gemma3_270m_real" / e2e_plan.GATE_OPEN_FILE)
    # a file without the PV skip: calibrated_nopv would repeat the calibrated rows
    no_pv = e2e_plan.write_no_pv("gemma3_270m_real", tmp_path / "np", GEMMA_FILE)
    jobs, left_out = _real_plan(tmp_path, "--thresholds", f"gemma3={no_pv}", "--configs",
                                "SPARGE@64:calibrated", "SPARGE@64:calibrated_nopv",
                                geometries=("gemma3_270m_real",))
    assert [j["config"] for j in jobs] == ["SPARGE@64:calibrated"]
    assert ("ttft gemma3_270m_real SPARGE@64:calibrated_nopv: the file uses no PV skip (the "
            "calibrated rows are these)") in left_out
    assert e2e_plan.uses_pv_skip(GEMMA_FILE) and not e2e_plan.uses_pv_skip(no_pv)
    # SmolLM2 has no --thresholds: its calibrated variants cannot be planned
    with pytest.raises(ValueError, match="--thresholds MODEL=FILE"):
        _real_plan(tmp_path, "--configs", "SPARGE@64:calibrated")
    jobs, left_out = _real_plan(tmp_path, "--configs", "FLASH_ATTN@64")
    smol = [j for j in jobs if j["geometry"] == "smollm2_135m_real"]
    assert [(j["points"], j["profile_lengths"]) for j in smol] == [([(8192,)], [])]
    assert "ttft smollm2_135m_real FLASH_ATTN@64 32768: past the model's context (8192)" in left_out
    assert "decode gemma3_270m_real: the real-weight geometries run ttft only" in left_out
    assert all(j["stage"] == "ttft" for j in jobs)
    with pytest.raises(ValueError, match="give --weights gemma3=DIR"):
        e2e_plan.make_plan(bench_e2e.parser().parse_args(
            ["ttft", "--geometries", "gemma3_270m_real"]), {"runs": [], "rows": []})
    for bad in ("gemma4=/x", "gemma3", "gemma3="):
        with pytest.raises(ValueError, match="MODEL one of gemma3, smollm2"):
            _real_plan(tmp_path, "--thresholds", bad)
    with pytest.raises(ValueError, match="no such file"):
        _real_plan(tmp_path, "--thresholds", f"gemma3={tmp_path / 'missing.safetensors'}")
    assert report.config_order("SPARGE@64:calibrated") < report.config_order(
        "SPARGE@64:calibrated_nopv") < report.config_order("SPARGE@64:untuned")
    with pytest.raises(ValueError, match="topk, untuned or calibrated"):
        report.parse_config("SPARGE@64:defaults+fa3")


def test_no_pv_copy_and_document_prompts(tmp_path):
    """calibrated_nopv's file is the calibrated one with every pvthreshd off; the real-weight
    prompts are held-out documents of exactly the asked length in the model's tokenizer."""
    import torch

    from sparge_serve.kernels.geometry import PV_SKIP_OFF
    from sparge_serve.thresholds import ModelGeometry, load_thresholds

    src = load_thresholds(GEMMA_FILE)
    assert bool((src.pvthreshd < PV_SKIP_OFF).any())  # the file uses the PV skip
    path = e2e_plan.write_no_pv("gemma3_270m_real", tmp_path, GEMMA_FILE)
    out = load_thresholds(path, expect=ModelGeometry(18, 4, 1, 256))
    assert bool((out.pvthreshd == PV_SKIP_OFF).all())
    for name in ("simthreshd1", "cdfthreshd", "is_sparse"):
        assert torch.equal(getattr(out, name), getattr(src, name)), name
    assert (out.model, out.config_hash) == (src.model, src.config_hash)
    prompts = e2e_plan.document_prompts(ROOT / "models" / "sparge-tiny-code", 3000, 2)
    ids = [p["prompt_token_ids"] for p in prompts]
    assert [len(i) for i in ids] == [3000, 3000] and ids[0] != ids[1]
    assert ids == [p["prompt_token_ids"] for p in e2e_plan.document_prompts(
        ROOT / "models" / "sparge-tiny-code", 3000, 2)]


# ---- results: ratios, ceiling, markdown, plot --------------------------------------------------
def test_ceiling_formula():
    assert report.ceiling(0.5, 2.0) == pytest.approx(1 / 0.75)
    assert report.ceiling(0.8, 1.0) == pytest.approx(1.0)
    assert report.ceiling(0.0, 10.0) == pytest.approx(1.0)
    assert report.ceiling(0.9, 1e12) == pytest.approx(10.0)


def test_attention_kernels_and_block_counts():
    kernels = [("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<",
                32, 200.0), ("_sparse_attn_kernel", 32, 50.0), ("_select_kernel", 32, 5.0),
               ("void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16", 32, 1.0),
               ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT", 128, 40.0),
               ("triton_per_fused_fused_add_rms_norm_2", 32, 4.0)]
    s = report.kernel_summary(kernels, 400.0)
    assert s["attention_ms"] == 255.0 and s["gpu_ms"] == 300.0 and s["wall_ms"] == 400.0
    assert [k[0][:5] for k in s["attention_top"]] == ["void ", "_spar", "_sele"]
    assert "host_ms" not in s
    host = [("aten::empty", 40, 0.5), ("cudaLaunchKernel", 300, 3.0), ("aten::copy_", 20, 0.75),
            ("## Call CompiledFxGraph abc ##", 4, 0.5)]
    s = report.kernel_summary(kernels, 400.0, host)
    assert (s["host_ms"], s["host_calls"]) == (4.75, 364)
    assert [k[0] for k in s["host_top"]][:3] == ["cudaLaunchKernel", "aten::copy_",
                                                 "aten::empty"]
    assert s["graph_host"] == (4, 0.5) and report.graph_host_us(s) == 125.0
    # the baseline's compiled graphs took half the host time a call: a 2.00x slower host
    base = report.kernel_summary(kernels, 300.0, host[:3] + [(host[3][0], 4, 0.25)])
    del base["graph_host"]  # a summary without it: read from its largest host ops
    data = {"runs": [{}], "failed": [], "rows": [dict(
        stage="ttft", geometry="g", config="SPARGE@64:defaults", length=8192, ttft_s=0.4,
        run=0, profile=s, host_load=9.5), dict(stage="ttft", geometry="g", config="FLASH_ATTN@64",
                                length=8192, ttft_s=0.3, run=0, profile=base)]}
    md = report.markdown(data)
    assert ("| g | 8192 | SPARGE@64:defaults | 400.0 | 300.0 | 255.0 | 364 | 4.8 | 125 (2.00x) | "
            "9.5 | "
            "`cudaLaunchKernel` (300, 3.00); `aten::copy_` (20, 0.75); `aten::empty` (40, 0.50) |"
            in md)
    assert ("| g | 8192 | FLASH_ATTN@64 | 300.0 | 300.0 | 255.0 | 364 | 4.5 | 62 (1.00x) | — |"
            in md)
    assert report.graph_host_us({"host_top": []}) is None
    # the full op tables: ops whose call count differs, largest change in host time first
    assert s["host_ops"]["aten::copy_"] == [20, 0.75]
    assert report.host_op_diff(s, base) == []  # the same calls everywhere
    more = report.kernel_summary(kernels, 400.0, host + [("aten::slice", 72, 0.5),
                                                          ("aten::empty", 4, 0.25)])
    assert report.host_op_diff(more, base) == [("aten::slice", 0, 72, 0.0, 0.5),
                                               ("aten::empty", 40, 44, 0.5, 0.75)]
    assert report.host_op_diff(more, {"host_top": []}) == []  # an older summary: no table
    data["rows"][0]["profile"] = more
    assert "| g | 8192 | SPARGE@64:defaults | `aten::slice` | 0 → 72 | 0.00 → 0.50 |" in (
        report.markdown(data))
    # --host-profile: functions both cProfile lists hold, largest change first; the generated
    # modules of torch.compile (named by each engine's graph hash) compare as one
    def fn(name, calls, cum):
        return dict(fn=name, calls=calls, own_ms=0.0, cum_ms=cum)

    gen, other_gen = ("ab/" + h * 52 + ".py:1349(call)" for h in "cd")
    hp = dict(prefills=30, own=[], cumulative=[
        fn("gpu/model_runner.py:1150(execute_model)", 2, 13.9), fn(gen, 17, 4.6),
        fn("attention/attention.py:816(unified_attention_with_output)", 18, 2.5),
        fn("backend/sparge_attn.py:375(forward)", 18, 2.4)])
    base_hp = dict(prefills=30, own=[], cumulative=[
        fn("gpu/model_runner.py:1150(execute_model)", 2, 13.7), fn(other_gen, 17, 4.0),
        fn("attention/attention.py:816(unified_attention_with_output)", 18, 2.4),
        fn("backends/flash_attn.py:811(forward)", 18, 0.5)])
    assert report.host_function_diff(hp, base_hp, n=2) == [
        ("<generated>.py:1349(call)", 17, 4.0, 4.6),
        ("gpu/model_runner.py:1150(execute_model)", 2, 13.7, 13.9)]
    data["rows"][0]["host_profile"], data["rows"][1]["host_profile"] = hp, base_hp
    assert ("| g | 8192 | SPARGE@64:defaults | `attention/attention.py:816(unified_attention_"
            "with_output)` | 18 | 2.400 → 2.500 |") in report.markdown(data)
    text = ("# HELP x\nsparge_attention_blocks_valid_total{layer=\"0\"} 100.0\n"
            "sparge_attention_blocks_valid_total{layer=\"1\"} 50.0\n"
            "sparge_attention_blocks_valid_created{layer=\"0\"} 1.7e9\n"
            "sparge_attention_blocks_computed_total{layer=\"0\"} 30.0\n")
    assert report.block_counts(text) == (150.0, 30.0)
    assert report.block_counts("vllm:num_requests_running 0\n") == (0.0, 0.0)
    row = report.serve_row({"completed": 16, "failed": 0, "request_throughput": 0.5,
                            "p50_ttft_ms": 900.0, "p99_ttft_ms": 2000.0, "mean_tpot_ms": 30.0,
                            "input_lens": [1, 2]}, (100.0, 60.0), (300.0, 100.0))
    assert row["block_sparsity"] == pytest.approx(0.8) and row["p99_ttft_ms"] == 2000.0
    assert "input_lens" not in row["bench"] and row["bench"]["completed"] == 16


def _ttft(config, length, t, attention=None, gpu=None, sparsity=None):
    row = dict(stage="ttft", geometry="llama8b", config=config, length=length, ttft_s=t,
               ttft_all_s=[t])
    if attention is not None:
        row["profile"] = dict(wall_ms=t * 1e3, gpu_ms=gpu, attention_ms=attention, top=[],
                              attention_top=[])
    if sparsity is not None:
        row["block_sparsity"] = sparsity
    return row


def _synthetic() -> dict:
    data = report.new_results()
    run = report.start_run(data, dict(command="cmd0", device="GPU0", date="d", vllm="0.26.0",
                                      torch="2.11", triton="3.6"))
    report.add_rows(data, [
        _ttft("FLASH_ATTN@64", 32768, 2.0, attention=1500.0, gpu=1900.0),
        _ttft("FLASH_ATTN@16", 32768, 2.4),
        _ttft("SPARGE@64:topk0.5", 32768, 1.25, attention=600.0, gpu=1000.0, sparsity=0.49),
        _ttft("FLASH_ATTN@64", 131072, 12.0),
        _ttft("SPARGE@64:topk0.1", 131072, 4.0, sparsity=0.89),
        dict(stage="decode", geometry="llama8b", config="FLASH_ATTN@64", context=8192, batch=8,
             new_tokens=128, tok_per_s=1000.0, itl_ms=8.0),
        dict(stage="decode", geometry="llama8b", config="SPARGE@64:defaults", context=8192,
             batch=8, new_tokens=128, tok_per_s=950.0, itl_ms=8.42),
    ], run)
    serve = dict(stage="serve", geometry="llama8b", concurrency=8, input_len=16384,
                 output_len=128, range_ratio=0.5, completed=16, failed=0, p99_ttft_ms=9000.0,
                 mean_tpot_ms=40.0, p99_tpot_ms=60.0)
    report.add_rows(data, [dict(serve, config="FLASH_ATTN@64", p50_ttft_ms=4000.0,
                                request_throughput=0.5),
                           dict(serve, config="SPARGE@64:topk0.2", p50_ttft_ms=2500.0,
                                request_throughput=0.6, block_sparsity=0.79)], run)
    return data


def test_report_from_synthetic_results(tmp_path):
    data = _synthetic()
    att = report.attention_rows(data)
    assert len(att) == 1  # only 32K has both profiles
    a = att[0]
    assert a["a"] == pytest.approx(0.75) and a["a_gpu"] == pytest.approx(1500 / 1900)
    assert a["k"] == pytest.approx(2.5) and a["measured"] == pytest.approx(1.6)
    assert a["ceiling"] == pytest.approx(1 / (0.25 + 0.75 / 2.5))
    # a later run's SPARGE row against the first run's baseline is marked
    run = report.start_run(data, dict(command="cmd1", device="GPU1", date="d2"))
    report.add_rows(data, [_ttft("SPARGE@64:topk0.1", 131072, 3.0, sparsity=0.9)], run)
    written = report.write_all(data, str(tmp_path), {"llama8b": "Llama-3.1-8B geometry"})
    assert [Path(p).name for p in written] == ["e2e.json", "e2e.md", "e2e.png"]
    md = (tmp_path / "e2e.md").read_text()
    assert "# End to end at real models' geometries: SPARGE vs FLASH_ATTN — GPU1, d2" in md
    assert "- 0: `cmd0` — GPU0, d; vllm 0.26.0, torch 2.11, triton 3.6" in md
    assert "- `llama8b`: Llama-3.1-8B geometry" in md
    assert "| llama8b | 32768 | SPARGE@64:topk0.5 | 1.2500 | 1.60x | 1.92x | 0.490 | 0 |" in md
    assert "| llama8b | 32768 | FLASH_ATTN@16 | 2.4000 | 1.00x | 1.00x | — | 0 |" in md
    assert "| llama8b | 32768 | FLASH_ATTN@64 | 2.0000 | 1.00x | 1.20x | — | 0 |" in md
    assert "| llama8b | 131072 | SPARGE@64:topk0.1 | 3.0000 | 4.00x† | — | 0.900 | 1 |" in md
    assert ("| llama8b | 32768 | SPARGE@64:topk0.5 | FLASH_ATTN@64 | 1500.0 / 600.0 | 0.750 | "
            "0.789 | 2.50 | 1.82x | 1.90x | 1.60x |") in md
    assert "| llama8b | 8192 | 8 | SPARGE@64:defaults | 950 | 8.42 | 0.950x | 0 |" in md
    assert ("| llama8b | 8 | SPARGE@64:topk0.2 | 16384 ± 50% / 128 | 16 / 0 | 0.600 | 2500.0 | "
            "9000.0 | 40.00 | 60.00 | 1.60x | 1.200x | 0.790 | 0 |") in md
    assert (tmp_path / "e2e.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "e2e.json").read_text()) == data
    # rows' order in the TTFT table: by length, then FLASH_ATTN by page, then SPARGE
    ttft = [ln for ln in md.splitlines() if ln.startswith("| llama8b | 32768 |")][:3]
    assert [ln.split(" | ")[2] for ln in ttft] == ["FLASH_ATTN@16", "FLASH_ATTN@64",
                                                   "SPARGE@64:topk0.5"]


def test_report_stage_rewrites_from_json(tmp_path):
    report.write_all(_synthetic(), str(tmp_path))
    (tmp_path / "e2e.md").unlink()
    (tmp_path / "e2e.png").unlink()
    res = _cli("report", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "| llama8b | 8192 | 8 | FLASH_ATTN@64 | 1000 | 8.00 |" in (tmp_path / "e2e.md").read_text()
    assert (tmp_path / "e2e.png").exists()


def test_report_adds_other_calls_results(tmp_path):
    """``report --add``: another call's runs are appended, its rows (renumbered to those runs)
    replace the same points, its failures are kept."""
    report.write_all(_synthetic(), str(tmp_path))
    other = report.new_results()
    run = report.start_run(other, dict(command="cmd1", device="GPU1", date="d2", vllm="0.26.0",
                                       torch="2.11", triton="3.6"))
    report.add_rows(other, [_ttft("FLASH_ATTN@64", 131072, 11.0),
                            _ttft("SPARGE@64:topk0.5", 131072, 8.0, sparsity=0.5)], run)
    report.add_failure(other, "decode", "llama8b", "FLASH_ATTN@16", "stopped", run)
    (tmp_path / "other.json").write_text(json.dumps(other))
    res = _cli("report", "--out", str(tmp_path), "--add", str(tmp_path / "other.json"))
    assert res.returncode == 0, res.stderr
    data = report.load_results(str(tmp_path / "e2e.json"))
    assert [r["command"] for r in data["runs"]] == ["cmd0", "cmd1"]
    ttft = {(r["config"], r["length"]): r for r in data["rows"] if r["stage"] == "ttft"}
    assert ttft[("FLASH_ATTN@64", 131072)]["ttft_s"] == 11.0  # replaced
    assert ttft[("FLASH_ATTN@64", 131072)]["run"] == ttft[("SPARGE@64:topk0.5", 131072)]["run"] == 1
    assert ttft[("FLASH_ATTN@64", 32768)]["run"] == 0 and len(ttft) == 6
    assert data["failed"] == [dict(stage="decode", geometry="llama8b", config="FLASH_ATTN@16",
                                   why="stopped", run=1)]
    assert "| llama8b | 131072 | SPARGE@64:topk0.5 | 8.0000 | 1.38x |" in (
        tmp_path / "e2e.md").read_text()


# ---- the driver: stages merged across calls, failures, time limits ----------------------------
def _fake_worker(fail: set, calls: list):
    """A run_worker that measures nothing: one row per planned point (failing jobs of ``fail``
    return their first row and an error)."""
    def run(cmd, timeout, log_path, on_row=None):
        job = json.loads(cmd[-1])
        calls.append(job)
        rows = []
        for p in job["points"]:
            row = dict(stage=job["stage"], geometry=job["geometry"], config=job["config"])
            if job["stage"] == "ttft":
                row.update(length=p[0], ttft_s=1.0 if "FLASH" in job["config"] else 0.5)
            elif job["stage"] == "decode":
                row.update(context=p[0], batch=p[1], tok_per_s=100.0, itl_ms=10.0)
            else:
                row.update(concurrency=p[0], input_len=job["input_len"], output_len=1,
                           range_ratio=0.5, completed=1, failed=0, p50_ttft_ms=1.0,
                           request_throughput=1.0)
            rows.append(row)
        meta = dict(device="FakeGPU", torch="t", triton="tr", vllm="v")
        if job["config"] in fail:
            return rows[:1], meta, "exit 1: boom"
        return rows, meta, None
    return run


def test_stages_merge_into_one_results_file(tmp_path, monkeypatch):
    calls: list = []
    fail = {"SPARGE@64:topk0.5"}
    monkeypatch.setattr(bench_e2e, "run_worker", _fake_worker(fail, calls))
    monkeypatch.setattr(e2e_plan, "write_geometry", lambda *a: None)
    monkeypatch.setattr(report, "plot", lambda *a: False)  # drawn in the report tests
    common = ["--out", str(tmp_path), "--log-dir", str(tmp_path / "logs")]
    ttft = ["ttft", "--configs", "FLASH_ATTN@64", "SPARGE@64:topk0.5", "--lengths", "8192",
            "32768", *common]
    assert bench_e2e.main(ttft) == 1  # one engine failed
    assert bench_e2e.main(["decode", "--contexts", "8192", "--batches", "1", "8", *common]) == 0
    data = json.loads((tmp_path / "e2e.json").read_text())
    assert [r["command"].split()[2] for r in data["runs"]] == ["ttft", "decode"]
    assert data["runs"][0]["device"] == "FakeGPU"
    keys = {(r["stage"], r["config"], r.get("length") or r.get("batch"), r["run"])
            for r in data["rows"]}
    assert keys == {("ttft", "FLASH_ATTN@64", 8192, 0), ("ttft", "FLASH_ATTN@64", 32768, 0),
                    ("ttft", "SPARGE@64:topk0.5", 8192, 0),
                    *{("decode", c, b, 1) for c in e2e_plan.DEFAULTS["decode"] for b in (1, 8)}}
    assert [(f["config"], f["why"]) for f in data["failed"]] == [("SPARGE@64:topk0.5",
                                                                  "exit 1: boom")]
    # --skip-done runs only the missing point, and its success clears the failure
    calls.clear()
    fail.clear()
    assert bench_e2e.main([*ttft, "--skip-done"]) == 0
    assert [(c["config"], c["points"]) for c in calls] == [("SPARGE@64:topk0.5", [[32768]])]
    data = json.loads((tmp_path / "e2e.json").read_text())
    assert data["failed"] == [] and len(data["runs"]) == 3 and len(data["rows"]) == 10
    # a spent budget starts nothing and says so
    calls.clear()
    assert bench_e2e.main([*ttft, "--budget-s", "30"]) == 0 and calls == []
    data = json.loads((tmp_path / "e2e.json").read_text())
    assert {f["why"] for f in data["failed"]} == {"not run: the call's --budget-s was spent"}
    assert "## Did not run" in (tmp_path / "e2e.md").read_text()


def test_real_weight_run_writes_its_thresholds_files(tmp_path, monkeypatch):
    """The driver writes the topk and calibrated_nopv files beside no config folder (the
    converted one serves), and the report names the real-weight geometry; a file that is not a
    thresholds file stops it before any engine starts."""
    calls: list = []
    monkeypatch.setattr(bench_e2e, "run_worker", _fake_worker(set(), calls))
    monkeypatch.setattr(report, "plot", lambda *a: False)
    models = tmp_path / "models"
    argv = ["ttft", "--geometries", "gemma3_270m_real", "--weights", "gemma3=/m/gemma3",
            "--thresholds", f"gemma3={GEMMA_FILE}", "--configs", "FLASH_ATTN@64",
            "SPARGE@64:calibrated", "SPARGE@64:calibrated_nopv", "--lengths", "8192",
            "--model-dir", str(models), "--out", str(tmp_path), "--log-dir", str(tmp_path / "l")]
    assert bench_e2e.main(argv) == 0
    folder = models / "gemma3_270m_real"
    assert sorted(f.name for f in folder.iterdir()) == sorted(
        [e2e_plan.GATE_OPEN_FILE, e2e_plan.NO_PV_FILE])
    assert [(c["config"], c["weights"], c["model"]) for c in calls] == [
        (c, True, "/m/gemma3") for c in ("FLASH_ATTN@64", "SPARGE@64:calibrated",
                                         "SPARGE@64:calibrated_nopv")]
    md = (tmp_path / "e2e.md").read_text()
    assert "`gemma3_270m_real`: Gemma 3 270M with its pretrained weights" in md
    not_thresholds = tmp_path / "weights.safetensors"
    not_thresholds.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    calls.clear()
    bad = [a if not a.startswith("gemma3=/") or "safetensors" not in a
           else f"gemma3={not_thresholds}" for a in argv]
    assert bench_e2e.main(bad) == 2 and calls == []


_WORKER = """
import json, subprocess, sys, time
print("E2E_META " + json.dumps({"device": "X"}), flush=True)
print("vllm log line", flush=True)
print("E2E_ROW " + json.dumps({"length": 1}), flush=True)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("child", child.pid, flush=True)
if sys.argv[1] == "fail":
    print("RuntimeError: no GPU", flush=True)
    sys.exit(3)
time.sleep(60)
"""


def test_run_worker_keeps_rows_and_stops_what_it_started(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    t0 = time.monotonic()
    rows, meta, why = bench_e2e.run_worker([sys.executable, str(script), "hang"], 3.0,
                                           str(tmp_path / "hang.log"))
    assert time.monotonic() - t0 < 30
    assert rows == [{"length": 1}] and meta == {"device": "X"}
    assert why == "stopped at its time limit (3 s)"
    log = (tmp_path / "hang.log").read_text()
    assert "vllm log line" in log
    child = int(log.split("child ")[1].split()[0])
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(
        f"/proc/{child}/stat").read_text().split()[2]
    seen: list = []
    rows, _, why = bench_e2e.run_worker([sys.executable, str(script), "fail"], None,
                                        str(tmp_path / "fail.log"), on_row=seen.append)
    assert rows == seen == [{"length": 1}]
    assert why.startswith("exit 3: RuntimeError: no GPU (log ")
    child = int((tmp_path / "fail.log").read_text().split("child ")[1].split()[0])
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(
        f"/proc/{child}/stat").read_text().split()[2]


def test_rounds_start_every_engine_in_turn_and_join_their_rows(tmp_path):
    """--rounds N: every TTFT engine N times, all configurations' first engines before any
    second, every second round in reverse order; a later round's rows join the run's row
    (median of all repeats, each round's median kept, the first round's profile) and the report
    shows each round against the baseline's."""
    args = bench_e2e.parser().parse_args([
        "ttft", "decode", "--geometries", "gemma3_270m", "--model-dir", str(tmp_path),
        "--configs", "FLASH_ATTN@64", "SPARGE@64:defaults", "--lengths", "8192",
        "--profile-lengths", "8192", "--contexts", "8192", "--batches", "1", "--rounds", "3",
        "--host-profile", "20"])
    jobs, _ = e2e_plan.make_plan(args, report.load_results(None))
    fa, sp = "FLASH_ATTN@64", "SPARGE@64:defaults"
    assert [(j["stage"], j["config"], j.get("round")) for j in jobs] == [
        ("ttft", fa, 0), ("ttft", sp, 0), ("ttft", sp, 1), ("ttft", fa, 1), ("ttft", fa, 2),
        ("ttft", sp, 2), ("decode", fa, None), ("decode", sp, None)]
    assert "round 2" in e2e_plan.describe(jobs[2]) and "round" not in e2e_plan.describe(jobs[6])
    assert [j["profile_lengths"] for j in jobs[:6]] == [[8192], [8192], [], [], [], []]
    assert all(j["host_profile"] == 20 for j in jobs[:6])  # with the profiled lengths only
    one = bench_e2e.parser().parse_args(["ttft", "--configs", "FLASH_ATTN@64"])
    assert "round" not in e2e_plan.make_plan(one, report.load_results(None))[0][0]
    with pytest.raises(ValueError, match="--rounds 0"):
        e2e_plan.make_plan(bench_e2e.parser().parse_args(["ttft", "--rounds", "0"]),
                           report.load_results(None))

    def row(config, times, rnd, **extra):
        return dict(stage="ttft", geometry="gemma3_270m", config=config, length=8192,
                    ttft_s=sorted(times)[len(times) // 2], ttft_all_s=times, round=rnd, **extra)

    data = report.new_results()
    run = report.start_run(data, {"command": "x"})
    report.add_rows(data, [row("FLASH_ATTN@64", [0.010, 0.011, 0.012], 0, profile={"a": 1})], run)
    report.add_rows(data, [row("SPARGE@64:defaults", [0.012, 0.013, 0.014], 0)], run)
    report.add_rows(data, [row("FLASH_ATTN@64", [0.016, 0.017, 0.018], 1, profile={"a": 2})], run)
    report.add_rows(data, [row("SPARGE@64:defaults", [0.016, 0.017, 0.018], 1)], run)
    fa = report._find(data, ("ttft", "gemma3_270m", "FLASH_ATTN@64", 8192))
    assert fa["ttft_round_s"] == [0.011, 0.017] and fa["profile"] == {"a": 1}
    assert fa["ttft_s"] == pytest.approx(0.014) and len(fa["ttft_all_s"]) == 6
    assert len(data["rows"]) == 2
    md = report.markdown(data)
    assert "| gemma3_270m | 8192 | SPARGE@64:defaults | 13.0 / 17.0 | 0.85x / 1.00x |" in md
    assert "| gemma3_270m | 8192 | FLASH_ATTN@64 | 11.0 / 17.0 | 1.00x / 1.00x |" in md
    # a run stopped by its budget between a round's engines: the rounds both ran, paired
    report.add_rows(data, [row("FLASH_ATTN@64", [0.020], 2)], run)
    md = report.markdown(data)
    assert ("| gemma3_270m | 8192 | FLASH_ATTN@64 | 11.0 / 17.0 / 20.0 | 1.00x / 1.00x / "
            "1.00x |") in md
    assert "| gemma3_270m | 8192 | SPARGE@64:defaults | 13.0 / 17.0 | 0.85x / 1.00x |" in md
    # another run's row of the same point replaces it rather than joining it
    later = report.start_run(data, {"command": "y"})
    report.add_rows(data, [row("FLASH_ATTN@64", [0.020], 1)], later)
    fa = report._find(data, ("ttft", "gemma3_270m", "FLASH_ATTN@64", 8192))
    assert fa["ttft_s"] == 0.020 and "ttft_round_s" not in fa


def _tokenize_once(prompt):
    return len(prompt)


class _FakeLLM:
    def generate(self, prompts, params, use_tqdm=False):
        return [_tokenize_once(p) for p in prompts for _ in range(params or 1)]


def test_host_profile_reports_each_functions_time_per_prefill(monkeypatch):
    """--host-profile N: cProfile over N generate calls; calls and ms are per prefill, named
    ``dir/file.py:line(function)``, most cumulative time first."""
    import torch

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    hp = bench_e2e._host_profile(_FakeLLM(), "abc", None, 4)
    assert hp["prefills"] == 4
    rows = {r["fn"]: r for r in hp["cumulative"]}
    name = next(n for n in rows if n.endswith("(_tokenize_once)"))
    assert name.startswith("tests/test_bench_e2e.py:") and rows[name]["calls"] == 1
    cum = [r["cum_ms"] for r in hp["cumulative"]]
    assert cum == sorted(cum, reverse=True) and all(r["own_ms"] >= 0 for r in hp["own"])


def test_decode_host_profile_is_the_difference_per_step(monkeypatch):
    """bench_ttft's decode host profile: the longer run's calls minus the shorter one's, per
    extra step."""
    import torch
    from bench_ttft import host_profile_diff

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    diff = host_profile_diff(_FakeLLM(), ["abc"], 1, 9, steps=8)
    row = next(r for r in diff["cumulative"] if r["fn"].endswith("(_tokenize_once)"))
    assert row["calls"] == 1.0  # (9 - 1) calls over 8 steps
