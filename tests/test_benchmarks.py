"""The benchmark scripts' report code (their GPU parts run on the GPU machine only)."""

import importlib.util
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
    bench.attach_ratios(results)
    meta = dict(device="GPU", date="today", torch="2.11", triton="3.6", vllm="0.26.0",
                command="cmd")
    out = tmp_path / "kernels"
    bench.write_reports(results, meta, str(out))
    md = (tmp_path / "kernels.md").read_text()
    assert ("| 32768 | 64 | topk_s0.5+chunked | random | 0.500 | 0.100 | 0.800 | 1.000 | 1.11x |"
            in md)
    assert "| 8192 | 64 | dense | 1.300 | 1.000 (1.300x) | 2.600 (0.500x) |" in md
    assert "| 8192 | 64 | 0.100 | 0.040 | 0.060 |" in md
    assert "| 8192 | 64 | dense+fa3_chunked | 2 | 8 | 0.100 | 0.050 | 5.00% |" in md
    assert "| 8192 | 64 | topk_s0.5 | 0.100 | 0.050 (2.000x) | 0.200 (0.500x) |" in md
    png = tmp_path / "kernels.png"
    assert png.stat().st_size > 10_000
    png.unlink()
    monkeypatch.setattr("sys.argv", ["bench_kernels.py", "--replot", str(out) + ".json"])
    bench.main()
    assert png.stat().st_size > 10_000


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
