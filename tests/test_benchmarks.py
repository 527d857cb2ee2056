"""The benchmark scripts' report code (their GPU parts run on the GPU machine only)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ttft_report_one_row_per_sparge_variant(tmp_path):
    bench = _load("bench_ttft")
    rows = []
    for backend, t in (("FLASH_ATTN", 1.0), ("SPARGE", 0.7), ("SPARGE+fa3", 0.5)):
        for n in (8192, 131072):
            rows.append(dict(backend=backend, length=n, ttft_s=t * n / 8192, block_sparsity=0.66))
        rows.append(dict(backend=backend, decode_tok_per_s=1000 * t, e2e_tok_per_s=800 * t,
                         decode_profile=dict(step_wall_ms=2.5 * t, step_gpu_kernel_ms=0.5, top=[])))
    rows[1]["profile"] = dict(wall_ms=20.0, gpu_kernel_ms=12.5,
                              top=[("flash|fwd", 4, 10.0), ("rms_norm", 8, 1.5)])
    meta = dict(backends=["FLASH_ATTN", "SPARGE", "SPARGE+fa3", "FLASHINFER"],
                failed={"FLASHINFER": "exit 1: no wheel"}, device="GPU", date="today",
                command="cmd", vllm="0.26.0", torch="2.11", triton="3.6", model="m", chunk=8192,
                thresholds=None, min_sparse_len=8192, decode_batch=32, decode_len=512,
                decode_repeats=5)
    bench.report(rows, meta, str(tmp_path / "ttft"))
    md = (tmp_path / "ttft.md").read_text()
    assert "| 131072 | 16.0000 | SPARGE+fa3 | 8.0000 | 2.00x | 0.660 |" in md
    assert "| 8192 | 1.0000 | SPARGE | 0.7000 | 1.43x | 0.660 |" in md
    assert "FLASHINFER did not run: exit 1: no wheel" in md
    assert ("| FLASH_ATTN | 131072 | 20.0 | 12.5 | 7.5 | flash/fwd x4: 10.00; rms_norm x8: 1.50 |"
            in md)
    assert meta["decode_ratio"] == 0.7
    assert "End to end (prefill included): FLASH_ATTN 800 tok/s (1.000), SPARGE 560 tok/s" in md
    assert "| SPARGE | 1.75 | 0.50 |" in md
    assert (tmp_path / "ttft.json").exists()


def test_kernels_report_and_replot(tmp_path, monkeypatch):
    """The kernel benchmark's table and plot from saved rows (head-chunk rows included), and
    ``--replot`` redrawing the PNG from the saved JSON alone."""
    bench = _load("bench_kernels")
    report = _load("kernels_report")
    results = []
    for page in (64, 16):
        for length in (8192, 32768):
            for cfg, sp, t in (("dense", 0.0, 1.3), ("topk_s0.5", 0.5, 0.7),
                               ("dense+chunked", 0.0, 1.4), ("topk_s0.5+chunked", 0.5, 0.8)):
                results.append(dict(length=length, page=page, config=cfg, inputs="random",
                                    block_sparsity=sp, predictor_ms=0.1, attention_ms=t,
                                    total_ms=t + 0.1, extra_mem_frac_of_kv=0.02,
                                    fa3_ms=1.0 if cfg == "dense" else None))
    results.append(dict(results[0], config="dense+fa3_chunked", predictor_gpu_ms=0.05,
                        chunk_heads=2, select_heads=8, fa3_ms=None))
    for r in results:
        if r["fa3_ms"] is None:
            del r["fa3_ms"]
    results[0]["variants_ms"] = {"head_major": 1.0, "eager_rescale": 2.6}
    results[0]["predictor_parts_ms"] = {"pool_keys": 0.04, "select": 0.06}
    results[1]["predictor_variants_ms"] = {"select_w4": 0.05, "select_w8": 0.2}
    results[1]["launch_sweep_ms"] = {"split2_w8s2": 0.6, "split1_w8s2": 0.3,
                                     "split1_w8s1": float("nan")}
    results[1]["launch_sweep_max_diff"] = {"split2_w8s2": 0.0, "split1_w8s2": 0.0078,
                                           "split1_w8s1": float("nan")}
    # a row that kept only the sweep's diffs (no times) is not a sweep row
    results[2]["launch_sweep_max_diff"] = dict(results[1]["launch_sweep_max_diff"])
    report.attach_ratios(results)
    meta = dict(device="GPU", date="today", torch="2.11", triton="3.6", vllm="0.26.0",
                command="cmd")
    out = tmp_path / "kernels"
    report.write_reports(results, meta, str(out))
    md = (tmp_path / "kernels.md").read_text()
    assert ("| 32768 | 64 | topk_s0.5+chunked | random | 0.500 | 0.100 | 0.800 | 1.000 | 1.11x |"
            in md)
    assert "| 8192 | 64 | dense | 1.300 | 1.000 (1.300x) | 2.600 (0.500x) |" in md
    assert "| 8192 | 64 | 0.100 | 0.040 | 0.060 |" in md
    assert "| 8192 | 64 | dense+fa3_chunked | 2 | 8 | 0.100 | 0.050 | 5.00% |" in md
    assert "| 8192 | 64 | topk_s0.5 | 0.100 | 0.050 (2.000x) | 0.200 (0.500x) |" in md
    assert ("| length | page | config | split2_w8s2 | split1_w8s2 | split1_w8s1 | max diff |\n"
            "|---|---|---|---|---|---|---|\n"
            "| 8192 | 64 | topk_s0.5 | 0.600 (1.00x) | 0.300 (2.00x) | nan (nanx) | 7.80e-03 |"
            in md)
    png = tmp_path / "kernels.png"
    assert png.stat().st_size > 10_000
    png.unlink()
    monkeypatch.setattr("sys.argv", ["bench_kernels.py", "--replot", str(out) + ".json"])
    bench.main()
    assert png.stat().st_size > 10_000


def _fp8_results():
    """Synthetic rows of a ``--kv-dtype fp8`` run at 32K and 128K, 64-token pages: bf16 rows
    and fp8 rows, FA3 bf16 and FLASH_ATTN-fp8 times on every random row (as the run records
    them); at 128K two bars fail (topk_s0.5+fp8 at 1.60x, topk_s0.5+fp8dot at 2.00x), at 32K
    topk_s0.5+fp8dot is missing (not measured)."""
    fa3 = {32768: (14.0, 9.0), 131072: (200.0, 120.0)}
    totals = {
        32768: {"dense": 18.0, "dense+fp8": 10.0, "dense+fp8dot": 12.0},
        131072: {"dense": 250.0, "topk_s0.5": 120.0, "dense+fp8": 126.0,
                 "topk_s0.5+fp8": 75.0, "topk_s0.9+fp8": 19.0, "dense+fp8dot": 160.0,
                 "topk_s0.5+fp8dot": 100.0},
    }
    results = []
    for length, rows in totals.items():
        for cfg, total in rows.items():
            fp8 = "+fp8" in cfg
            r = dict(length=length, page=64, config=cfg, inputs="random",
                     kv_dtype="fp8" if fp8 else "bf16", block_sparsity=0.5 if "topk" in cfg
                     else 0.0, predictor_ms=2.0, attention_ms=total - 2.0, total_ms=total,
                     extra_mem_frac_of_kv=0.1, fa3_ms=fa3[length][0], fa3_fp8_ms=fa3[length][1])
            if fp8:
                r.update(rel_l1_vs_bf16=0.0123, rel_l1_vs_bf16_dense=0.0456,
                         fa3_fp8_rel_l1_vs_bf16_dense=0.0321)
            results.append(r)
    # structured inputs: no baseline of their own, those of their length and page
    results.append(dict(results[-1], config="defaults+fp8", inputs="structured", total_ms=50.0,
                        attention_ms=48.0))
    for key in ("fa3_ms", "fa3_fp8_ms"):
        del results[-1][key]
    return results


def test_kernels_fp8_report_ratios_and_bars(tmp_path):
    """``--kv-dtype fp8``'s report: the fp8 rows only in their own table, with speed-ups over
    FLASH_ATTN-fp8 and over FA3 bf16 and their errors; the baselines; each bar checked per page
    (pass, FAIL, not measured); JSON rows keep ``kv_dtype``."""
    import json

    report = _load("kernels_report")
    results = _fp8_results()
    report.attach_ratios(results)
    by = {(r["config"], r["length"]): r for r in results}
    assert by["dense+fp8", 131072]["speedup_vs_fa3_fp8"] == pytest.approx(120 / 126)
    assert by["dense+fp8", 131072]["speedup_vs_fa3"] == pytest.approx(200 / 126)
    assert "speedup_vs_fa3_fp8" not in by["dense", 131072]  # a bf16 row: FA3 bf16 only
    checks = {(c["config"], c["length"], c["baseline"]): c
              for c in report.fp8_bar_checks(results)}
    assert len(checks) == len(report.FP8_BARS)  # one page
    assert all(c["passed"] is None for k, c in checks.items() if "+fa3+fp8" in k[0])
    fp8, bf16 = "fa3_fp8", "fa3"
    assert [checks[k]["passed"] for k in [
        ("dense+fp8", 131072, fp8), ("topk_s0.5+fp8", 131072, fp8),
        ("topk_s0.9+fp8", 131072, fp8), ("dense+fp8dot", 32768, bf16),
        ("dense+fp8dot", 131072, bf16), ("topk_s0.5+fp8dot", 32768, bf16),
        ("topk_s0.5+fp8dot", 131072, bf16), ("dense+fp8dot", 131072, fp8)]] == [
            True, False, True, True, True, None, False, False]
    assert checks["topk_s0.5+fp8dot", 131072, bf16]["speedup"] == pytest.approx(2.0)
    assert checks["topk_s0.5+fp8dot", 131072, fp8]["speedup"] == pytest.approx(1.2)

    meta = dict(device="GPU", date="today", torch="2.11", triton="3.6", vllm="0.26.0",
                command="cmd", fp8_notes=["fp8 compute rows (`+fp8dot`) not measured: x"])
    report.write_reports(results, meta, str(tmp_path / "k"))
    md = (tmp_path / "k.md").read_text()
    main_table, _, fp8_part = md.partition("fp8 KV cache (`--kv-dtype fp8`)")
    assert "| 131072 | 64 | dense | random | 0.000 | 2.000 | 248.000 | 200.000 | 0.80x |" in main_table
    assert "+fp8" not in main_table
    assert ("| 131072 | 64 | dense+fp8 | random | 0.000 | 2.000 | 124.000 | 120.000 | 200.000 "
            "| 0.95x | 1.59x | 0.0123 | 0.0456 |") in fp8_part
    assert ("| 32768 | 64 | dense+fp8dot | random | 0.000 | 2.000 | 10.000 | 9.000 | 14.000 "
            "| 0.75x | 1.17x |") in fp8_part
    assert "| 131072 | 64 | 200.000 | 120.000 | 1.67x | 0.0321 |" in fp8_part
    assert ("| 131072 | 64 | defaults+fp8 | structured | 0.500 | 2.000 | 48.000 | 120.000 "
            "| 200.000 | 2.40x | 4.00x |") in fp8_part
    triton, dot = "attention_kernel triton", "fp8_attention"
    assert (f"| dense+fp8 | {triton} | FLASH_ATTN-fp8 | 131072 | 64 | 0.952x | >= 0.95x | pass |"
            in fp8_part)
    assert (f"| topk_s0.5+fp8 | {triton} | FLASH_ATTN-fp8 | 131072 | 64 | 1.600x | >= 1.7x "
            "| FAIL |") in fp8_part
    assert (f"| topk_s0.5+fp8dot | {dot} | FA3 bf16 | 32768 | 64 | - | >= 1.7x "
            "| not measured |") in fp8_part
    assert (f"| topk_s0.5+fp8dot | {dot} | FA3 bf16 | 131072 | 64 | 2.000x | >= 2.1x "
            "| FAIL |") in fp8_part
    assert "| dense+fa3+fp8 | default (auto: FA3 path) | FLASH_ATTN-fp8 |" in fp8_part
    assert "fp8 compute rows (`+fp8dot`) not measured: x" in fp8_part
    saved = json.loads((tmp_path / "k.json").read_text())["results"]
    assert {r["config"]: r["kv_dtype"] for r in saved}["topk_s0.9+fp8"] == "fp8"
    # a bf16 run's report has no fp8 part
    report.write_reports([r for r in results if r["kv_dtype"] == "bf16"], meta,
                        str(tmp_path / "b"))
    assert "fp8" not in (tmp_path / "b.md").read_text().replace("fp8_dot", "")


def test_kernels_fp8_inputs_and_fa3_descales():
    """The fp8 inputs on the CPU: per-tensor scale amax / 448, K and V as views of one fp8
    buffer in vLLM's layout, FA3's descales expanded to (num_seqs, num_kv_heads), and the
    chunked relative L1 error equal to the whole one."""
    import torch

    from sparge_serve.kernels import FP8_DTYPE, PrefillBatch

    bench = _load("bench_kernels")
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(100, 32, 128, generator=g) * 3).bfloat16()
    kc = torch.randn(4, 64, 8, 128, generator=g).bfloat16()
    vc = kc * 2
    q8, kc8, vc8, scales = bench.fp8_inputs(q, kc, vc)
    assert q8.dtype == kc8.dtype == vc8.dtype == FP8_DTYPE
    assert kc8.data_ptr() + 128 == vc8.data_ptr() and kc8.stride(2) == 256
    assert scales.k_scale.shape == (1,) and scales.k_scale.dtype == torch.float32
    assert scales.q_scale.item() == pytest.approx(q.float().abs().max().item() / 448)
    assert scales.v_scale.item() == pytest.approx(2 * scales.k_scale.item())
    deq = kc8.float() * scales.k_scale
    assert bench.rel_l1(deq, kc) == pytest.approx(bench.rel_l1(deq, kc, rows=3), rel=1e-6)
    assert 0 < bench.rel_l1(deq, kc) < 0.05
    batch = PrefillBatch(query_start_loc=torch.tensor([0, 60, 100], dtype=torch.int32),
                         seq_lens=torch.tensor([60, 40], dtype=torch.int32),
                         block_table=torch.zeros(2, 4, dtype=torch.int32), max_query_len=60,
                         max_seq_len=60)
    d = bench.fa3_descales(scales, batch, 8)
    assert sorted(d) == ["k_descale", "q_descale", "v_descale"]
    assert all(t.shape == (2, 8) and t.stride() == (0, 0) for t in d.values())
    assert d["v_descale"][1, 7].item() == scales.v_scale.item()


def test_kernels_fp8_rows_on_toy_inputs(monkeypatch, device):
    """The fp8 part of one length's run on the real kernels at toy sizes (timing stubbed, FA3 a
    stand-in that records its call and writes zeros, the FA3 path's forward emulated): ``+fp8``
    rows (and ``+fp8dot`` where the kernels take ``fp8_dot``, ``+fa3+fp8``) next to the bf16
    ones, FLASH_ATTN-fp8 called with fp8 views and
    descales of shape (num_seqs, num_kv_heads), and the errors measured against the right
    outputs."""
    import torch

    import sparge_serve.kernels.fa3 as virtual
    from sparge_serve.kernels import FP8_DTYPE
    from tests.test_virtual import fa3_emulation

    bench = _load("bench_kernels")
    monkeypatch.setattr(virtual, "fa3_paged_forward", fa3_emulation)
    monkeypatch.setattr(bench, "DEVICE", device)
    monkeypatch.setattr(bench, "HQ", 2)
    monkeypatch.setattr(bench, "HKV", 1)
    monkeypatch.setattr(bench, "D", 64)
    monkeypatch.setattr(bench, "KV_FP8", True)
    monkeypatch.setattr(bench, "bench", lambda fn: (fn(), 1.0)[1])
    if device == "cpu":
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    calls = []

    def fa3(q, k, v, out, **kw):
        calls.append((q.dtype, k.dtype, {n: t.shape for n, t in kw.items() if "descale" in n}))
        out.zero_()

    swept = []
    monkeypatch.setattr(bench, "FP8_SWEEP", ("w4s2",))
    monkeypatch.setattr(bench, "fp8_dot_sweep", lambda *a: (swept.append(a), ({"w4s2": 1.0},
                                                                              {"w4s2": 0.0}))[1])
    results = []
    bench._bench_inputs(512, 64, False, results, fa3)
    assert [c[:2] for c in calls] == [(torch.bfloat16, torch.bfloat16), (FP8_DTYPE, FP8_DTYPE)]
    assert calls[1][2] == {f"{x}_descale": (1, 1) for x in "qkv"}
    rows = {r["config"]: r for r in results}
    dot = [""] if bench.fp8_dot_entry() is None else ["", "dot", "dot_vpages"]
    configs = ["dense", "topk_s0.5", "topk_s0.8", "topk_s0.9"]
    assert sorted(rows) == sorted(configs + [f"{c}+fp8{d}" for c in configs for d in dot]
                                  + [f"{c}+fa3+fp8" for c in configs])
    for name, r in rows.items():
        assert r["kv_dtype"] == ("fp8" if "+fp8" in name else "bf16")
        assert r["fa3_ms"] == r["fa3_fp8_ms"] == 1.0
    for d in [*dot, "fa3"]:
        dense, topk = (rows[f"{c}+fp8{d}"] if d != "fa3" else rows[f"{c}+fa3+fp8"]
                       for c in ("dense", "topk_s0.5"))
        # the dense row's two references are one output; a top-k row's error against the bf16
        # dense output includes what its selection leaves out
        assert dense["rel_l1_vs_bf16"] == dense["rel_l1_vs_bf16_dense"]
        assert 0 < dense["rel_l1_vs_bf16"] < 0.1
        assert topk["block_sparsity"] > 0
        assert 0 < topk["rel_l1_vs_bf16"] < 0.1 < topk["rel_l1_vs_bf16_dense"]
        assert dense["fa3_fp8_rel_l1_vs_bf16_dense"] == 1.0  # the stand-in's zeros
    # --fp8-sweep: the +fp8dot rows of the dense and 50% configurations only, over fp8 inputs
    if bench.fp8_dot_entry() == "attention":
        assert sorted(n for n, r in rows.items() if "fp8_launch_sweep_ms" in r) == [
            "dense+fp8dot", "topk_s0.5+fp8dot"]
        assert all(a[0].dtype == a[1].dtype == FP8_DTYPE for a in swept) and len(swept) == 2


def test_query_len_dense_call_paths_force_the_rule_both_ways(monkeypatch):
    """bench_query_len's ``fa3_call`` / ``fa3_nocall`` rows: the FA3 path with the dense rows'
    own call forced on / off for the plans they time (``fa3`` keeps the rule, which at one
    launch a chunk makes no call), the rule's constant restored after. Toy sizes on the CPU,
    FA3 emulated, timing stubbed."""
    import sparge_serve.kernels.fa3 as virtual
    from tests.test_virtual import fa3_emulation

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _load("bench_query_len")
    calls = []

    def counting(q, k, v, out, q_start, q_len, *args, **kw):
        calls.append(q_len.shape[0])
        fa3_emulation(q, k, v, out, q_start, q_len, *args, **kw)

    monkeypatch.setattr(virtual, "fa3_paged_forward", counting)
    for name, value in (("DEVICE", "cpu"), ("HQ", 2), ("HKV", 1), ("D", 64)):
        monkeypatch.setattr(bench, name, value)
    monkeypatch.setattr(bench, "bench", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(bench, "CONFIGS", (("topk_s0.5", -1.0, 0.5),))
    rule = virtual.DENSE_CALL_LAUNCHES
    fa3 = lambda q, k, v, out, **kw: out.zero_()  # noqa: E731
    seqs = {}
    for path in ("fa3", "fa3_call", "fa3_nocall"):
        calls.clear()
        row = bench.measure(512, 512, fa3, [path], "bf16", planned=True)
        assert row[f"topk_s0.5{bench.SUFFIX[path]}_speedup"] == 1.0
        seqs[path] = list(calls)
        assert rule == virtual.DENSE_CALL_LAUNCHES
    # 4 query blocks x 2 heads in one launch, then (forced on) one call of the dense rows
    assert seqs == {"fa3": [8], "fa3_call": [8, 4], "fa3_nocall": [8]}


def _fake_turns(fns, **kw):
    """``interleaved`` without a GPU: one call of each function, 0.5 ms each."""
    return {name: (fn(), 0.5)[1] for name, fn in fns.items()}


def test_d256_launch_sweep_checks_outputs_and_survives_a_refused_launch(monkeypatch):
    """``--sweep`` at head dim 256 times every launch of ``D256_LAUNCHES`` with TMA loads and PV
    skip off, measures each output against the default launch's, and notes a launch the device
    refuses as NaN instead of ending the run."""
    import torch

    bench = _load("bench_kernels")
    monkeypatch.setattr(bench, "interleaved", _fake_turns)
    seen = []

    def attend(q, kc, vc, batch, bm, scale, pv, out, launch=None, split=None, pv_skip=None,
               use_tma=None, **kw):
        seen.append((launch, split, pv_skip, use_tma))
        if launch == (8, 1) and split == 1:
            raise RuntimeError("out of resource: shared memory\nRequired: 1, limit: 0")
        out.fill_(1.0 + (0.25 if split == 2 else 0.0))

    monkeypatch.setattr(bench, "sparse_paged_attention", attend)
    out = torch.zeros(4, 2)
    times, diffs = bench.d256_sweep(None, None, None, None, None, 1.0, None, out)
    assert list(times) == [f"split{s}_w{w}s{st}" for s, w, st in bench.D256_LAUNCHES]
    assert seen[0] == (None, None, False, None)  # the reference: the default launch
    assert all(s[2] is False and s[3] is True for s in seen[1:])
    assert times["split1_w8s2"] == 0.5 and diffs["split1_w8s2"] == 0.0
    assert diffs["split2_w8s2"] == 0.25
    assert times["split1_w8s1"] != times["split1_w8s1"]  # NaN: refused, the run went on
    assert diffs["split1_w8s1"] != diffs["split1_w8s1"]


def test_fp8_launch_sweep_times_each_launch_with_fp8_products(monkeypatch):
    """``--fp8-sweep`` times the default launch (8 warps / 4 stages capped at 128 registers,
    page ids ahead), then the named launches of ``FP8_LAUNCHES`` or every one, with ``fp8_dot``
    and the cache's scales, PV skip off, each output against the default launch's, and a refused
    launch as NaN; its report table gives each launch's ms and the default's time over it."""
    import torch

    bench = _load("bench_kernels")
    report = _load("kernels_report")
    monkeypatch.setattr(bench, "interleaved", _fake_turns)
    seen = []

    def attend(q, kc, vc, batch, bm, scale, pv, out, launch=None, pv_skip=None, use_tma=None,
               scales=None, fp8_dot=False, page_ahead=False, split=None, lazy_rescale=None,
               v_tma=None, **kw):
        seen.append((launch, use_tma, page_ahead, pv_skip, scales, fp8_dot, split, lazy_rescale,
                     v_tma))
        if launch == (8, 3) and use_tma is False:
            raise RuntimeError("out of resource: shared memory\nRequired: 1, limit: 0")
        out.fill_(1.0 + (0.5 if launch == (4, 5) else 0.0) + (0.25 if split == 2 else 0.0))

    monkeypatch.setattr(bench, "sparse_paged_attention", attend)
    out = torch.zeros(4, 2)
    # --fp8-sweep NAME...: the default, then the named launches
    monkeypatch.setattr(bench, "FP8_SWEEP", ("w8s3_ahead", "w4s5"))
    times, _ = bench.fp8_dot_sweep(None, None, None, None, None, 1.0, None, out, "scales")
    assert list(times) == ["w8s4_ahead_r128", "w8s3_ahead", "w4s5"]
    # (num_warps, num_stages[, maxnreg]), TMA K loads, page_ahead, programs a query block,
    # lazy_rescale, v_tma (None: the default)
    assert list(dict.fromkeys(s[:3] + s[6:] for s in seen[1:])) == [
        ((8, 4, 128), True, True, 1, None, None), ((8, 3), True, True, 1, None, None),
        ((4, 5), True, False, 1, None, None)]
    # --fp8-sweep: every one
    seen.clear()
    monkeypatch.setattr(bench, "FP8_SWEEP", tuple(x.name for x in bench.FP8_LAUNCHES))
    times, diffs = bench.fp8_dot_sweep(None, None, None, None, None, 1.0, None, out, "scales")
    assert list(times) == ["w8s4_ahead_r128", "w4s2_ahead", "w4s2", "w4s3", "w4s5", "w8s2",
                           "w8s3", "w8s5", "w4s3_ptr", "w8s3_ptr", "w4s3_ahead", "w8s3_ahead",
                           "w8s2_ahead_r128", "w8s3_ahead_r128", "w4s2_ahead_split2",
                           "w4s3_ahead_split2", "w4s3_ahead_split2_r168", "w4s2_ahead_lazy0",
                           "w8s2_ahead_r128_lazy0", "w8s3_ahead_r128_lazy0",
                           "w8s4_ahead_r128_lazy0", "w8s5_ahead_r128_lazy0", "w8s3_r128_lazy0",
                           "w8s4_ahead_r128_ptrv"]
    # the reference: the default launch
    assert seen[0] == (None, None, False, False, "scales", True, None, None, None)
    assert all(s[3:6] == (False, "scales", True) for s in seen)
    assert list(dict.fromkeys(s[:3] + s[6:] for s in seen[1:]))[-12:-4] == [
        ((8, 2, 128), True, True, 1, None, None), ((8, 3, 128), True, True, 1, None, None),
        ((4, 2), True, True, 2, None, None), ((4, 3), True, True, 2, None, None),
        ((4, 3, 168), True, True, 2, None, None), ((4, 2), True, True, 1, 0.0, None),
        ((8, 2, 128), True, True, 1, 0.0, None), ((8, 3, 128), True, True, 1, 0.0, None)]
    # the K-major values by pointer loads
    assert list(dict.fromkeys(s[:3] + s[6:] for s in seen[1:]))[-1] == (
        (8, 4, 128), True, True, 1, None, False)
    assert len(dict.fromkeys(s[:3] + s[6:] for s in seen[1:])) == len(bench.FP8_LAUNCHES) + 1
    assert diffs["w8s4_ahead_r128"] == 0.0 and diffs["w4s5"] == 0.5
    assert diffs["w4s2_ahead_split2"] == 0.25
    assert times["w8s3_ptr"] != times["w8s3_ptr"]  # NaN: refused, the run went on
    rows = [dict(length=32768, page=64, config="dense+fp8dot", fp8_launch_sweep_ms=dict(
        times, w4s2_ahead=0.25), fp8_launch_sweep_max_diff=diffs)]
    text = "\n".join(report._sweep_table(rows, "fp8_launch_sweep", "(fp8)"))
    assert "| 32768 | 64 | dense+fp8dot | 0.500 (1.00x) | 0.250 (2.00x) | 0.500 (1.00x) |" in text
    assert "the default `w8s4_ahead_r128`'s time" in text
    assert "5.00e-01 |" in text


def test_sweep_times_page_ahead_launches_against_the_default(monkeypatch, device):
    """``--sweep`` (head dim 128, 64-token pages) times every launch in turns after the
    default, among them ``page_ahead`` at 4 warps / 2 and 3 stages and 8 warps / 3 stages with
    TMA loads, each output against the default launch's (real predictor at toy sizes, the
    attention a stand-in, timing stubbed)."""
    import torch

    bench = _load("bench_kernels")
    for name, value in (("DEVICE", device), ("HQ", 2), ("HKV", 1), ("D", 64), ("SWEEP", True),
                        ("ONLY_CONFIGS", {"dense"})):
        monkeypatch.setattr(bench, name, value)
    monkeypatch.setattr(bench, "bench", lambda fn: (fn(), 0.5)[1])
    monkeypatch.setattr(bench, "interleaved", _fake_turns)
    monkeypatch.setattr(bench, "dense_block_map", lambda length, block_n: None)
    if device == "cpu":
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    ahead = []

    def attend(q, kc, vc, batch, bm, scale, pv, out, stats=None, launch=None, use_tma=None,
               page_ahead=False, **kw):
        if page_ahead:
            ahead.append((launch, use_tma))
        out.fill_(1.0 + (0.25 if page_ahead and launch == (8, 3) else 0.0))

    monkeypatch.setattr(bench, "sparse_paged_attention", attend)
    results = []
    bench._bench_inputs(256, 64, False, results, None)
    row = results[0]
    assert row["config"] == "dense" and len(results) == 1
    assert {k: v for k, v in row["launch_sweep_ms"].items() if "ahead" in k} == {
        "w4s2_ahead": 0.5, "w4s3_ahead": 0.5, "w8s3_ahead": 0.5}
    assert list(row["launch_sweep_ms"])[0] == "w4s2"  # the default launch (64-token pages)
    diffs = row["launch_sweep_max_diff"]
    assert list(diffs) == list(row["launch_sweep_ms"])  # every launch's output checked
    assert {k: v for k, v in diffs.items() if "ahead" in k} == {
        "w4s2_ahead": 0.0, "w4s3_ahead": 0.0, "w8s3_ahead": 0.25}
    assert set(diffs.values()) == {0.0, 0.25}
    text = "\n".join(_load("kernels_report")._sweep_table(results))
    assert "| 256 | 64 | dense | 0.500 (1.00x) |" in text and "| 2.50e-01 |" in text
    assert set(ahead) == {((4, 2), True), ((4, 3), True), ((8, 3), True)}


def test_bf16_sweep_times_the_named_launches_after_the_default(monkeypatch, device):
    """``--bf16-sweep NAME...`` times the named launches of the fp8 sweep's table on the bf16
    dense and 50% rows (64-token pages), after the bf16 default launch (head dim 64: ``w4s2``),
    each with its register cap, programs a query block and rescaling, its output against the
    default's; an unknown name is refused naming the known ones."""
    import torch

    bench = _load("bench_kernels")
    for name, value in (("DEVICE", device), ("HQ", 2), ("HKV", 1), ("D", 64),
                        ("BF16_SWEEP", ("w4s2", "w8s3_ahead_r128_lazy0", "w4s2_ahead_split2")),
                        ("ONLY_CONFIGS", {"dense", "topk_s0.5"})):
        monkeypatch.setattr(bench, name, value)
    monkeypatch.setattr(bench, "bench", lambda fn: (fn(), 0.5)[1])
    monkeypatch.setattr(bench, "interleaved", _fake_turns)
    if device == "cpu":
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    seen = []

    def attend(q, kc, vc, batch, bm, scale, pv, out, stats=None, launch=None, use_tma=None,
               page_ahead=False, split=None, lazy_rescale=None, pv_skip=None, **kw):
        seen.append((launch, use_tma, page_ahead, split, lazy_rescale, pv_skip))
        out.fill_(1.0 + (0.25 if split == 2 else 0.0))

    monkeypatch.setattr(bench, "sparse_paged_attention", attend)
    results = []
    bench._bench_inputs(512, 64, False, results, None)
    rows = [r for r in results if "bf16_launch_sweep_ms" in r]
    assert [r["config"] for r in rows] == ["dense", "topk_s0.5"]
    assert list(rows[0]["bf16_launch_sweep_ms"]) == ["w4s2", "w8s3_ahead_r128_lazy0",
                                                     "w4s2_ahead_split2"]
    assert rows[0]["bf16_launch_sweep_max_diff"]["w4s2_ahead_split2"] == 0.25
    assert {s for s in seen if s[0] is not None} == {
        ((4, 2), True, False, 1, None, False), ((8, 3, 128), True, True, 1, 0.0, False),
        ((4, 2), True, True, 2, None, False)}
    text = "\n".join(_load("kernels_report")._sweep_table(results, "bf16_launch_sweep", "x"))
    assert "the default `w4s2`'s time" in text and "| 256 |" not in text
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--bf16-sweep", "w9s9"])
    with pytest.raises(SystemExit):
        bench.main()


def test_kernels_fp8dot_failure_is_noted_not_fatal(monkeypatch):
    """A ``+fp8dot`` row that raises leaves the run going: the ``+fp8`` rows are kept, and the
    report says which row was not measured and why."""
    import torch

    from sparge_serve.kernels import BlockMap

    bench = _load("bench_kernels")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "bench", lambda fn: 1.0)
    monkeypatch.setattr(bench, "FP8_NOTES", [])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    hq = bench.HQ

    def predict(q, kc, batch, scale, sim, cdf, topk=None, stats=None, **kw):
        if stats is not None:
            stats[:2] += torch.tensor([10, 5])
        one = torch.ones(1, hq, 1, dtype=torch.int32)
        return BlockMap(torch.zeros(1, hq, 1, 1, dtype=torch.int16), one, one)

    def attend(q, kc, vc, batch, bm, scale, pv, out, stats=None, fp8_dot=False, **kw):
        if fp8_dot:
            raise RuntimeError("no fp8 dot here\nsecond line")
        out.fill_(1.0)

    monkeypatch.setattr(bench, "predict_block_map", predict)
    monkeypatch.setattr(bench, "sparse_paged_attention", attend)
    q = torch.ones(8, hq, bench.D, dtype=torch.bfloat16)
    fp8 = dict(inputs=bench.fp8_inputs(q, q[:, :bench.HKV, None].transpose(1, 2),
                                       q[:, :bench.HKV, None].transpose(1, 2)),
               ref_dense=q * 2, same_config={"dense": q.clone()})
    results = []
    bench._bench_fp8(8, 64, False, [("dense", dict(sim=1.0, cdf=1.0, topk=None))], None,
                     torch.empty_like(q), fp8, {"fa3": 2.0}, results)
    assert [r["config"] for r in results] == ["dense+fp8"]
    assert results[0]["block_sparsity"] == 0.5 and results[0]["rel_l1_vs_bf16"] == 0.0
    assert results[0]["rel_l1_vs_bf16_dense"] == 0.5
    assert bench.FP8_NOTES == ["8 tokens, page 64: dense+fp8dot not measured: RuntimeError: "
                               "no fp8 dot here"]


def test_kernels_help_lists_kv_dtype(monkeypatch, capsys):
    bench = _load("bench_kernels")
    monkeypatch.setattr("sys.argv", ["bench_kernels.py", "--help"])
    with pytest.raises(SystemExit):
        bench.main()
    out = capsys.readouterr().out
    assert "--kv-dtype {bf16,fp8}" in out and "--heads Q KV" in out
    monkeypatch.setattr("sys.argv", ["bench_kernels.py", "--heads", "6", "4"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "query heads must be a multiple of KV heads" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["bench_kernels.py", "--fp8-sweep"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--fp8-sweep times the fp8 rows: add --kv-dtype fp8" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["bench_kernels.py", "--kv-dtype", "fp8", "--fp8-sweep",
                                     "w4s2", "w4s4"])
    with pytest.raises(SystemExit):
        bench.main()
    err = capsys.readouterr().err
    assert "--fp8-sweep w4s4: no such launch; name any of w4s2_ahead w4s2 w4s3 " in err


def test_kernels_configs_option_times_only_those(monkeypatch):
    """``--configs``: only the named configurations, and no inputs built for a kind (random or
    structured) none of them uses."""
    bench = _load("bench_kernels")
    built = []

    def inputs(length, page, structured, results, fa3):
        built.append((structured, [name for name, _ in bench.configs_to_time(structured)]))

    monkeypatch.setattr(bench, "_bench_inputs", inputs)
    monkeypatch.setattr(bench.torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench, "ONLY_CONFIGS", set())
    bench.run_length(8, 64, [], None)
    assert built == [(False, ["dense", "topk_s0.5", "topk_s0.8", "topk_s0.9"]),
                     (True, ["defaults", "defaults_pv8"])]
    built.clear()
    monkeypatch.setattr(bench, "ONLY_CONFIGS", {"topk_s0.5", "dense"})
    bench.run_length(8, 64, [], None)
    assert built == [(False, ["dense", "topk_s0.5"])]
    built.clear()
    monkeypatch.setattr(bench, "ONLY_CONFIGS", {"defaults_pv8"})
    bench.run_length(8, 64, [], None)
    assert built == [(True, ["defaults_pv8"])]


SCRIPTS = sorted(p.relative_to(ROOT) for d in ("benchmarks", "scripts")
                 for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=str)
def test_scripts_compile(path):
    """Every benchmark and script at least compiles (they run on the GPU machine only, where a
    syntax error costs device time; ruff does not report every compile-time error)."""
    source = (ROOT / path).read_text()
    compile(source, str(path), "exec")


@pytest.mark.parametrize("as_mask", [False, True])
def test_chunk_select_times_one_chunk_at_each_launch(as_mask, device):
    """``bench_kernels.chunk_select_ms`` launches one head chunk's select kernel at the default
    launch and at 4 and 8 warps, the same block map each time (lists, or the FA3 path's bit
    sets)."""
    import torch

    from sparge_serve.kernels.pooling import pool_keys
    from sparge_serve.kernels.predictor import select_blocks
    from tests.kernel_inputs import head_vec, make_paged_case

    bench = _load("bench_kernels")
    case = make_paged_case([(300, 700), (129, 129)], 8, 2, 64, 64, torch.bfloat16, device,
                           packed=True)
    sim, cdf = head_vec(0.3, 8, device), head_vec(0.9, 8, device)
    counts = []

    def once(fn):
        bm = fn()
        counts.append(bm.count.clone())
        assert bm.count.shape[1] == 2  # the chunk's heads only
        assert (bm.mask is not None) == as_mask
        return 1.0

    assert bench.chunk_select_ms(case.q, case.key_cache, case.batch, case.scale, sim, cdf, None,
                                 2, once, as_mask) == (1.0, {"w4": 1.0, "w8": 1.0})
    whole = select_blocks(case.q, case.key_cache, case.batch, case.scale, sim, cdf, None,
                          torch.zeros(3, dtype=torch.int64, device=device),
                          pool_keys(case.key_cache, case.batch), 4)
    for c in counts:
        assert torch.equal(c, whole.count[:, :2])


def test_reference_quality_settings_and_report(tmp_path):
    """``reference_quality.py``: the defaults and the uniform sweep as per-(layer, head) tensors
    (every block eligible, PV skip off), and a report whose changes are against dense."""
    import json

    rq = _load("reference_quality")
    named = rq.settings(3, 4, [0.9, 0.99])
    assert list(named) == ["untuned defaults", "uniform cdf=0.9", "uniform cdf=0.99"]
    sim, cdf, pv = named["uniform cdf=0.9"]
    assert sim.shape == (3, 4) and bool((sim == -1).all()) and bool((cdf == 0.9).all())
    assert bool((pv >= 50).all()) and bool((named["untuned defaults"][0] == 0.6).all())
    from sparge_serve.thresholds import Thresholds, save_thresholds

    path = tmp_path / "th.safetensors"
    save_thresholds(path, Thresholds.defaults(3, 4, 2, 64, cdfthreshd=0.9))
    assert bool((rq.settings(3, 4, [], {"cal": str(path)})["cal"][1] == 0.9).all())
    with pytest.raises(ValueError, match=r"thresholds for \(3, 4\).*the model has \(2, 4\)"):
        rq.settings(2, 4, [], {"cal": str(path)})
    rows = [dict(name="untuned defaults", tokens=10, perplexity=2.0, dense_perplexity=2.0,
                 mean_abs_logprob_diff=0.0, max_abs_logprob_diff=0.0, mean_kl=0.0, sparsity=0.0),
            dict(name="uniform cdf=0.9", tokens=10, perplexity=2.2, dense_perplexity=2.0,
                 mean_abs_logprob_diff=0.1, max_abs_logprob_diff=0.5, mean_kl=0.02, sparsity=0.4)]
    meta = dict(model="m", date="d", command="c", device="CPU", torch="t", transformers="x",
                docs=1, tokens=10)
    rq.report(rows, meta, str(tmp_path / "r"))
    md = (tmp_path / "r.md").read_text()
    assert "| uniform cdf=0.9 | 0.400 | 2.2000 | +10.00% |" in md
    assert json.loads((tmp_path / "r.json").read_text())["rows"][1]["sparsity"] == 0.4
    assert (tmp_path / "r.png").stat().st_size > 0


def test_reference_accuracy_report(tmp_path):
    """``reference_accuracy.py``: one row per configuration with each task's accuracy and the
    mean block sparsity; dense has none; a plot."""
    import json

    ra = _load("reference_accuracy")
    rows = [dict(config="dense", task="sparge_passkey", acc=1.0, n=10, sparsity=0.0, wrong=[]),
            dict(config="dense", task="sparge_passkey_code", acc=0.9, n=10, sparsity=0.0,
                 wrong=[dict(depth=0.05, answer="1234567", prediction=" 1234")]),
            dict(config="cal", task="sparge_passkey", acc=0.8, n=10, sparsity=0.3, wrong=[]),
            dict(config="cal", task="sparge_passkey_code", acc=0.9, n=10, sparsity=0.5, wrong=[])]
    meta = dict(model="m", date="d", command="c", device="CPU", torch="t", transformers="x",
                lm_eval="l", length=4096, samples=10)
    ra.report(rows, meta, str(tmp_path / "r"))
    md = (tmp_path / "r.md").read_text()
    assert "| configuration | block sparsity | sparge_passkey acc | sparge_passkey_code acc |" in md
    assert "| dense | - | 1.00 (10) | 0.90 (10) |" in md
    assert "| cal | 0.400 | 0.80 (10) | 0.90 (10) |" in md
    assert "(4064 tokens for the passkey tasks, up to 4096 for RULER's)" in md
    assert json.loads((tmp_path / "r.json").read_text())["rows"][1]["wrong"][0]["depth"] == 0.05
    assert (tmp_path / "r.png").stat().st_size > 0
    (tmp_path / "sparge_model.json").write_text(json.dumps({"model": "smollm2"}))
    assert ra.model_name(str(tmp_path)) == "smollm2"
    assert ra.model_name(str(tmp_path / "x")) == "x"


def test_reference_accuracy_scores_ruler_by_length(monkeypatch):
    """A RULER task is scored by lm-eval's per-length metric, a passkey task by ``acc``; the wrong
    samples are those scoring under 1."""
    import lm_eval

    ra = _load("reference_accuracy")
    calls = []

    def fake(**kw):
        calls.append(kw)
        name = kw["tasks"][0]
        metric = "acc" if name.startswith("sparge") else "8192"
        samples = [{"doc": {}, metric: 1.0, "target": "1", "filtered_resps": ["1"]},
                   {"doc": {}, metric: 0.5, "target": "2", "filtered_resps": ["3"]}]
        return {"results": {name: {f"{metric},none": 0.75}}, "samples": {name: samples}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake)
    r = ra.evaluate(None, "niah_single_1", None, 2, 8192)
    assert (r["task"], r["acc"], r["n"], len(r["wrong"])) == ("niah_single_1", 0.75, 2, 1)
    assert ra.evaluate(None, "sparge_passkey", None, 2, 8192)["acc"] == 0.75
    assert calls[0]["limit"] == 2 and calls[0]["random_seed"] == 0


def test_fp8_pv_layout_kernel_reads_v_in_either_layout(device):
    """The layout benchmark's kernel against SDPA with V token-major and K-major (same values;
    fp32 inputs: the interpreter's dot is exact there), and its report's ratios."""
    import torch

    bench = _load("fp8_pv_layout")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 256, 64, generator=g).to(device) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for vv in (v, bench.kmajor(v)):
        out = torch.empty(2, 256, 64, dtype=torch.bfloat16, device=device)
        bench.attention(q, k, vv, out, (64, 32, 4, 2))
        # the output's bf16 rounding (2^-8 relative) on values below 1
        assert (out.float() - ref).abs().max().item() < 2**-7
    assert bench.kmajor(v).stride() == (256 * 64, 1, 256) and torch.equal(bench.kmajor(v), v)
    rows = [dict(length=8192, variant="bf16", ms=2.0, tflops=550.0, config=(128, 64, 4, 3),
                 rel_l1=0.001, copy_ms=None),
            dict(length=8192, variant="fp8_kmajor", ms=1.0, tflops=1100.0, config=(128, 128, 8, 3),
                 rel_l1=0.03, copy_ms=0.25)]
    md = bench.markdown(dict(device="GPU", date="today", command="cmd", torch="2.11",
                             triton="3.6", heads=32, head_dim=128), rows)
    assert "| 8192 | fp8_kmajor | 1.000 | 1100 | 2.00x | 1.60x (0.250 ms) | 0.0300 |" in md


def test_builder_overhead_times_each_backends_builds_of_a_step(tmp_path, monkeypatch,
                                                              fresh_backend_state):
    """``builder_overhead.py`` times one build per KV cache group of the geometry (Gemma 3
    270M: a full-attention group and five sliding-window ones) for SPARGE and FlashAttention,
    on the CPU, and reports µs a step with the difference."""
    import json

    from vllm.platforms import current_platform

    import sparge_serve.metrics as metrics

    monkeypatch.setattr(current_platform, "device_type", current_platform.device_type,
                        raising=False)  # the script sets it for this process
    monkeypatch.setattr(metrics, "install_metrics_bridge", lambda *a, **k: None)
    bench = _load("builder_overhead")
    geo = _load("e2e_plan").GEOMETRIES["gemma3_270m"]
    groups = bench.kv_groups(geo)
    assert [len(names) for _, names in groups] == [3] * 6
    assert groups[0][1] == [f"model.layers.{i}.self_attn.attn" for i in (5, 11, 17)]
    assert all(spec.sliding_window == 512 for spec, _ in groups[1:])
    out = tmp_path / "bo"
    result = bench.main(["--steps", "5", "--repeats", "2", "--length", "1024", "--out",
                         str(out)])
    assert result["groups"] == 6 and set(result["step_us"]) == {"FLASH_ATTN", "SPARGE"}
    assert all(len(t) == 2 and min(t) > 0 for t in result["runs_us"].values())
    assert json.loads((tmp_path / "bo.json").read_text())["length"] == 1024
    md = (tmp_path / "bo.md").read_text()
    assert "| SPARGE | " in md and "6 KV cache group(s)" in md and "--length 1024" in md


def test_interleaved_timing_cancels_clock_drift():
    """``timing.interleaved`` runs the functions in turns, a block of calls each a round, as many
    rounds as the budget holds (within its bounds), and times a block's second half: under a
    clock that slows by 1% a call and runs a block's first calls at the previous function's
    speed, a function twice as slow as another keeps its 2x ratio of medians, where timing one
    after the other (all of one, then all of the other) would not."""
    import statistics

    timing = _load("timing")
    calls = []
    work = {"a": 1.0, "b": 2.0}
    clock = [1.0]

    def timer(fn, n):
        times = []
        for i in range(n):
            fn()
            clock[0] *= 1.01  # the GPU heats up: every call a little slower
            # the first call of a block runs at the clock the last function left
            w = work[calls[-2]] if i == 0 and len(calls) > 1 else work[calls[-1]]
            times.append(w * clock[0])
        return times

    fns = {name: (lambda name=name: calls.append(name)) for name in work}
    med = timing.interleaved(fns, budget_ms=100.0, min_rounds=3, max_rounds=50, block_ms=4.0,
                             timer=timer)
    # warm-up a, b; estimates (the second of two calls) a 1.03 ms: 4 calls a block, b 2.1 ms:
    # 2 calls; then rounds of 4 a, 2 b: 4 * 1.03 + 2 * 2.1 = 8.3 ms a round -> 12 rounds
    assert calls[:6] == ["a", "b", "a", "a", "b", "b"]
    assert calls[6:] == (["a"] * 4 + ["b"] * 2) * 12
    assert med["b"] / med["a"] == pytest.approx(2.0, rel=0.03)
    # what the turns avoid: the same fake clock, all of a then all of b
    a, b = timer(fns["a"], 20), timer(fns["b"], 20)
    assert statistics.median(b) / statistics.median(a) / 2 > 1.2
    calls.clear()
    timing.interleaved(fns, budget_ms=1e9, min_rounds=3, max_rounds=5, block_ms=0.0,
                       timer=timer)
    assert len(calls) == 2 * (1 + 2 + 2 * 5)  # capped at max_rounds; 2 calls a block at least
    calls.clear()
    timing.interleaved(fns, budget_ms=0.0, min_rounds=3, max_rounds=5, block_ms=0.0,
                       timer=timer)
    assert len(calls) == 2 * (1 + 2 + 2 * 3)  # at least min_rounds


def test_kernels_fp8_bars_use_the_interleaved_timings(monkeypatch):
    """A row a bar holds gets its predictor and attention timed in turns with the run's
    baselines (``interleaved_ms``), other rows do not; the bars are checked on those medians,
    and the report shows the ratio to the baseline timed first in brackets."""
    bench = _load("bench_kernels")
    report = _load("kernels_report")
    seen = []
    monkeypatch.setattr(bench, "interleaved",
                        lambda fns: seen.append(sorted(fns)) or {"row": 100.0, "fa3": 190.0,
                                                                 "fa3_fp8": 130.0})
    fp8 = {"base_fns": {"fa3": None, "fa3_fp8": None}}
    held = dict(config="dense+fp8dot", length=131072)
    bench.pair_with_baselines(held, None, fp8)
    assert seen == [["fa3", "fa3_fp8", "row"]]
    other = dict(config="dense+fp8dot_vpages", length=131072)
    bench.pair_with_baselines(other, None, fp8)
    no_base = dict(config="dense+fp8dot", length=131072)
    bench.pair_with_baselines(no_base, None, {"base_fns": {}})
    assert "interleaved_ms" not in other and "interleaved_ms" not in no_base
    assert len(seen) == 1

    results = [r for r in _fp8_results() if r["config"] != "dense+fp8dot"]
    results.append(dict(results[0], config="dense+fp8dot", length=131072, kv_dtype="fp8",
                        total_ms=160.0, fa3_ms=200.0, fa3_fp8_ms=120.0,
                        interleaved_ms=held["interleaved_ms"]))
    report.attach_ratios(results)
    checks = {(c["config"], c["length"], c["baseline"]): c
              for c in report.fp8_bar_checks(results)}
    c = checks["dense+fp8dot", 131072, "fa3"]
    assert c["speedup"] == pytest.approx(1.9) and c["first"] == pytest.approx(200 / 160)
    assert c["passed"] is True  # 1.25x timed first would pass too; 0.75x over fa3_fp8 not:
    c = checks["dense+fp8dot", 131072, "fa3_fp8"]
    assert c["speedup"] == pytest.approx(1.3) and c["passed"] is True
    lines = "\n".join(report._fp8_lines(results, {}))
    assert "| FA3 bf16 | 131072 | 64 | 1.900x (1.250x) | >= 1.15x | pass |" in lines
    # a bar row without paired timings is checked on the ratio to the baseline timed first
    assert checks["dense+fp8", 131072, "fa3_fp8"]["speedup"] == pytest.approx(120 / 126)


def test_fa3_dense_call_rows_attend_as_flash_attn(monkeypatch):
    """``fa3_dense_call.py`` on the CPU at 256 tokens, FA3 emulated (``tests/test_virtual``),
    bf16 and fp8: each way of making the dense call (one sequence, ``kv_batch_idx``, the
    path's sequences, gathered tables, non-empty first) and the whole FA3 path give
    FLASH_ATTN's output, and every row is timed in turns."""

    from tests.test_virtual import fa3_emulation

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    mod = _load("fa3_dense_call")
    bench = importlib.import_module("bench_kernels")
    timing = importlib.import_module("timing")
    import sparge_serve.kernels.fa3 as fa3_mod

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(mod, "fa3_paged_forward", fa3_emulation)
    monkeypatch.setattr(fa3_mod, "fa3_paged_forward", fa3_emulation)
    rounds = []
    # calls of a second: blocks of 2 calls; one round
    turns = timing.interleaved
    monkeypatch.setattr(timing, "interleaved", lambda fns, budget_ms: turns(
        fns, budget_ms, min_rounds=1, max_rounds=1,
        timer=lambda fn, n: [(fn(), rounds.append(fn), 1e3)[2] for _ in range(n)]))

    def flash_attn(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, seqused_k, softmax_scale,
                   causal, block_table, out, fa_version, q_descale=None, k_descale=None,
                   v_descale=None):
        d = None if q_descale is None else (q_descale, k_descale, v_descale)
        fa3_emulation(q, k, v, out, cu_seqlens_q, cu_seqlens_q[1:] - cu_seqlens_q[:-1],
                      seqused_k, block_table, max_seqlen_k, softmax_scale, d,
                      max_seqlen_q=max_seqlen_q)

    for fp8 in (False, True):
        times, diffs = mod.time_length(256, fp8, flash_attn)
        assert set(times) == set(diffs) == {
            "flash_attn", "fwd_1seq", "fwd_1seq_kvidx", "dense_call", "dense_call_table",
            "dense_call_first", "launches", "fa3_path"}
        # at 256 tokens the path makes no dense call (one launch): its launches attend it all
        assert all(d < 2e-2 for d in diffs.values()), diffs
        assert len(rounds) == 8 * (2 + 2)  # the estimates, then a round of 2 calls
        rounds.clear()
