"""Host time of a step's attention metadata builds: SPARGE's builder against FlashAttention's.

    python benchmarks/builder_overhead.py --out benchmarks/results/builder_overhead

vLLM 0.26's model runner builds every KV cache group's metadata each step, all from the same
host arrays. A small model's short prefill is bound by the host (Gemma 3 270M at 8K: 10 ms of
TTFT around 5.8 ms of GPU kernels, ``benchmarks/results/e2e_small_defaults.md``), so what a
backend's builder adds to FlashAttention's build shows in its TTFT. One step here is one build
per group of a geometry's KV cache layout (``--geometry``: Gemma 3 270M, one full-attention
group and five sliding-window groups of three layers; a model without windows, one group) over
one request prefilling ``--length`` tokens, for SPARGE with its default settings (the metrics
on, as served) and for FlashAttention's own builder. Two such batches alternate, so every
step's first build meets a new batch. µs per step: the median of ``--repeats`` runs of
``--steps`` steps, the builders in turn. The builders' host work only: it runs on the CPU, or
on the GPU host (``--device cuda``: with FlashAttention's ahead-of-time schedule where FA3 runs).
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_plan as plan  # noqa: E402

PAGE = 64
GROUP_SIZE = 3  # layers per KV cache group (vLLM groups a hybrid model's layers evenly)


def engine_config(model_dir: Path, device: str):
    """``EngineArgs(model_dir, SPARGE).create_engine_config()``, as ``vllm serve`` builds it."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    import sparge_serve.plugin as plugin

    if device == "cpu":
        # NOTE: without a GPU vLLM's platform is unspecified; the builders run on the CPU
        current_platform.device_type = "cpu"
    plugin.register()
    return EngineArgs(model=str(model_dir), skip_tokenizer_init=True, attention_backend="SPARGE",
                      block_size=PAGE, load_format="dummy").create_engine_config()


def kv_groups(geo: plan.Geometry) -> list[tuple[object, list[str]]]:
    """The geometry's KV cache groups: (spec, layer names), full attention first."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    names = [f"model.layers.{i}.self_attn.attn" for i in range(geo.layers)]
    spec = dict(block_size=PAGE, num_kv_heads=geo.kv_heads, head_size=geo.head_dim,
                dtype=torch.bfloat16)
    if geo.sliding_window is None:
        return [(FullAttentionSpec(**spec), names)]
    full = names[5::6]  # Gemma 3: every sixth layer attends globally
    window = [n for n in names if n not in full]
    return [(FullAttentionSpec(**spec), full)] + [
        (SlidingWindowSpec(**spec, sliding_window=geo.sliding_window),
         window[i : i + GROUP_SIZE]) for i in range(0, len(window), GROUP_SIZE)]


def batch(n: int, device: torch.device):
    """CommonAttentionMetadata of one request prefilling ``n`` tokens."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    pages = -(-n // PAGE)
    qsl = torch.tensor([0, n], dtype=torch.int32)
    seq = torch.tensor([n], dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl.to(device), query_start_loc_cpu=qsl, seq_lens=seq.to(device),
        seq_lens_cpu_upper_bound=seq, num_reqs=1, num_actual_tokens=n, max_query_len=n,
        max_seq_len=n, block_table_tensor=torch.arange(pages, dtype=torch.int32,
                                                        device=device)[None],
        slot_mapping=torch.arange(n, dtype=torch.int64, device=device), num_logits_indices=None)


def cpu_name() -> str:
    """The host CPU's model name (Linux), else the platform's word for it."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def step_us(builders: list, cams: list, steps: int) -> float:
    """Host µs per step: one build per builder, the batches in turn."""
    t0 = time.perf_counter()
    for i in range(steps):
        cam = cams[i % len(cams)]
        for b in builders:
            b.build(0, cam)
    return (time.perf_counter() - t0) / steps * 1e6


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", default="gemma3_270m", choices=sorted(plan.GEOMETRIES))
    ap.add_argument("--length", type=int, default=8192, help="prompt tokens of the request")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default="builder_overhead", help="writes <out>.json, <out>.md")
    args = ap.parse_args(argv)
    if args.length < 2 * PAGE:
        ap.error(f"--length must be at least {2 * PAGE} tokens")

    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

    from sparge_serve.backend.sparge_attn import SpargeAttentionMetadataBuilder

    geo = plan.GEOMETRIES[args.geometry]
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as root:
        vc = engine_config(plan.write_geometry(args.geometry, root, None), args.device)
    vc.additional_config = {"sparge": {}}  # the default settings
    groups = kv_groups(geo)
    runners = {name: [cls(spec, layers, vc, device) for spec, layers in groups]
               for name, cls in (("FLASH_ATTN", FlashAttentionMetadataBuilder),
                                 ("SPARGE", SpargeAttentionMetadataBuilder))}
    cams = [batch(args.length, device), batch(args.length - PAGE, device)]
    times: dict[str, list[float]] = {name: [] for name in runners}
    for builders in runners.values():
        step_us(builders, cams, min(args.steps, 100))  # warm-up
    for _ in range(args.repeats):
        for name, builders in runners.items():
            times[name].append(step_us(builders, cams, args.steps))
    us = {name: statistics.median(t) for name, t in times.items()}
    import vllm

    result = dict(
        meta=dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                  device=(torch.cuda.get_device_name() + " host, " if args.device == "cuda"
                          else "") + cpu_name(), torch=torch.__version__, vllm=vllm.__version__,
                  command="python benchmarks/builder_overhead.py " + " ".join(
                      sys.argv[1:] if argv is None else argv)),
        geometry=args.geometry, length=args.length, groups=len(groups),
        step_us=us, runs_us=times)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    Path(args.out + ".md").write_text(
        f"# Attention metadata builds a step — {result['meta']['device']}, "
        f"{result['meta']['date']}\n\n`{result['meta']['command']}`; torch {torch.__version__}, "
        f"vllm {vllm.__version__}. {geo.description}: {len(groups)} KV cache group(s), one "
        f"build each a step, one request prefilling {args.length} tokens; host µs per step, "
        f"median of {args.repeats} runs of {args.steps} steps.\n\n"
        "| builder | µs a step | over FLASH_ATTN |\n|---|---|---|\n"
        + "".join(f"| {name} | {us[name]:.1f} | {us[name] - us['FLASH_ATTN']:+.1f} |\n"
                  for name in runners))
    print(json.dumps({"step_us": us}))
    return result


if __name__ == "__main__":
    main()
