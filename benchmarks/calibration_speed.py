"""How long per-head calibration takes: one layer measured, the whole model extrapolated (GPU).

    python benchmarks/calibration_speed.py            # 32 q / 8 KV heads, D 128, 8 prompts x 16K
    python benchmarks/calibration_speed.py --data random       # dense-ish inputs: an upper bound
    python benchmarks/calibration_speed.py --device cpu --seq-len 512 --samples 2 --heads 4 \\
        --kv-heads 2 --head-dim 64 --cdf-steps 3 --pv-steps 2   # smoke (CPU reference)

The issue's budget: a 32-layer, 32-head model on 8 prompts of 16K tokens in under 10 minutes on one
H100. Measured here: the search core (``sparge_calibrate.search.search_layer``) on one layer's
captured Q/K/V with the serving kernels as the error oracle (``KernelEvaluator``: the dense fp32
reference per sample, then ``evaluations_per_layer`` launches of ``sparge_paged_prefill`` over all
samples as one varlen batch). The samples start on the host, as captures do, so the host-to-device
copy is included. Kernel compilation is timed separately (two warm-up evaluations on the real shapes first).

Extrapolation: ``total = layers * layer_seconds * (prompts / samples)`` (every cost of a layer's
search is linear in the number of samples), plus the capture forward passes, which are *not*
measured here (one 16K prefill of an 8B model is ~1-2 s on an H100, dense; budget it separately).

Inputs: ``structured`` (default) = per head a local window + attention sink built from slowly
rotating query/key directions (like RoPE), sharpness varying by head, one head in eight
near-uniform, so the search meets sparse and dense heads as on a real model; ``random`` = i.i.d.
Gaussian Q/K/V: no block is self-similar, every setting computes (nearly) every block, the slowest
case per evaluation. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import time

import torch

from sparge_calibrate.search import (
    DEFAULT_SIM_GRID,
    LayerBudget,
    Sample,
    SearchConfig,
    search_layer,
)


def structured_sample(length, hq, hkv, d, g, device, dtype):
    """q ``[L, Hq, D]``, k/v ``[L, Hkv, D]``: local + sink attention, varied sharpness per head."""
    scale = 1.0 / math.sqrt(d)
    m = (d - 2) // 2
    freqs = 2 * math.pi / torch.logspace(math.log10(256), math.log10(8 * length), m, device=device)
    ang = torch.arange(length, device=device, dtype=torch.float32)[:, None] * freqs[None]
    u = torch.cat([ang.cos(), ang.sin()], -1) / math.sqrt(m)  # [L, 2m]
    k = torch.zeros(length, hkv, d, device=device)
    k[:, :, : 2 * m] = u[:, None]
    k[0, :, -1] = 1.0
    k += 0.02 * torch.randn(length, hkv, d, device=device, generator=g)
    sharp = torch.linspace(4.0, 16.0, hq, device=device)
    q = torch.zeros(length, hq, d, device=device)
    q[:, :, : 2 * m] = u[:, None] * (sharp[None, :, None] / scale)
    q[:, :, -1] = 11.0 / scale
    q += 0.02 * torch.randn(length, hq, d, device=device, generator=g) / scale
    q[:, ::8] = 0.01 * torch.randn(length, len(range(0, hq, 8)), d, device=device, generator=g)
    v = torch.randn(length, hkv, d, device=device, generator=g)
    return Sample(q.to(dtype).cpu(), k.to(dtype).cpu(), v.to(dtype).cpu())


def random_sample(length, hq, hkv, d, g, device, dtype):
    mk = lambda h: torch.randn(length, h, d, device=device, generator=g).to(dtype).cpu()
    return Sample(mk(hq), mk(hkv), mk(hkv))


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except OSError:
        return ""


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "vllm", "sparge-serve"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--samples", type=int, default=8, help="prompts measured in the one layer")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=32, help="layers to extrapolate to")
    p.add_argument("--prompts", type=int, default=8, help="prompts to extrapolate to")
    p.add_argument("--data", choices=("structured", "random"), default="structured")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--cdf-steps", type=int, default=SearchConfig.cdf_steps)
    p.add_argument("--pv-steps", type=int, default=SearchConfig.pv_steps)
    p.add_argument("--target-minutes", type=float, default=10.0)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA GPU: this benchmark times the serving kernels (use --device cpu for a "
                "smoke run with the reference)")

    from sparge_calibrate.evaluators import KernelEvaluator, ReferenceEvaluator

    dtype = getattr(torch, args.dtype)
    if args.device == "cpu":
        evaluator, dtype = ReferenceEvaluator(), torch.float32
    else:
        evaluator = KernelEvaluator("cuda")
    make = structured_sample if args.data == "structured" else random_sample
    g = torch.Generator(device=args.device).manual_seed(0)
    geo = (args.heads, args.kv_heads, args.head_dim)
    config = SearchConfig(sim_grid=DEFAULT_SIM_GRID, cdf_steps=args.cdf_steps,
                          pv_steps=args.pv_steps, allocation="head")
    budget = LayerBudget(0.06, 0.07)
    scale = 1.0 / math.sqrt(args.head_dim)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    samples = [make(args.seq_len, *geo, g, args.device, dtype) for _ in range(args.samples)]
    sync()
    t0 = time.perf_counter()
    prepared = evaluator.prepare(samples, scale)
    sync()
    prepare_s = time.perf_counter() - t0

    # warm-up: Triton compiles per constexpr variant (context-length bucket, PV skip on/off), so
    # run both variants on the real shapes once; compilation is a one-off per process
    t0 = time.perf_counter()
    h = args.heads
    for pv in (50.0, 4.0):
        evaluator.evaluate(prepared, torch.full((h,), 0.5), torch.full((h,), 0.95),
                           torch.full((h,), pv))
    sync()
    warmup_s = time.perf_counter() - t0
    del prepared

    t0 = time.perf_counter()
    res = search_layer(samples, scale, evaluator, budget, config)
    sync()
    layer_s = time.perf_counter() - t0  # includes its own prepare (dense reference + copies)

    total_s = args.layers * layer_s * (args.prompts / args.samples)
    record = {
        "benchmark": "calibration_speed",
        "device": (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"cpu {platform.machine()}"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "versions": _versions(),
        "evaluator": evaluator.name,
        "data": args.data,
        "dtype": str(dtype).removeprefix("torch."),
        "geometry": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                     "seq_len": args.seq_len, "samples": args.samples},
        "search": {"sim_grid": list(config.sim_grid), "cdf_steps": config.cdf_steps,
                   "pv_steps": config.pv_steps, "evaluations_per_layer": res.evaluations},
        "warmup_seconds": round(warmup_s, 3),
        "prepare_seconds": round(prepare_s, 3),
        "layer_seconds": round(layer_s, 3),
        "seconds_per_evaluation": round((layer_s - prepare_s) / res.evaluations, 4),
        "layer_mean_sparsity": round(float(res.sparsity.mean()), 4),
        "layer_dense_heads": int((~res.is_sparse).sum()),
        "extrapolated_to": {"layers": args.layers, "prompts": args.prompts},
        "estimate_seconds": round(total_s, 1),
        "estimate_minutes": round(total_s / 60, 2),
        "target_minutes": args.target_minutes,
        "meets_target": total_s / 60 <= args.target_minutes,
        "excludes": "capture forward passes (vLLM/transformers prefill of the prompts)",
    }
    if args.device == "cuda":
        record["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
