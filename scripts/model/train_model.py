"""Train the tiny long-context code model: a Hugging Face ``LlamaForCausalLM``.

Plain PyTorch loop: bf16 autocast on CUDA, AdamW, linear warm-up then cosine decay driven by
the wall clock, SDPA (FlashAttention) attention, optional ``torch.compile`` of the decoder
layers. Training windows are random slices of the corpus, each starting with EOS; a short
first phase uses ``--warm-ctx`` and the rest ``--ctx``, with the same tokens per step.
Stops at ``--minutes`` (wall clock from start, compile included) and saves an HF model folder
in bf16 next to the tokenizer files::

    python train_model.py --data WORK/data --out WORK/model --minutes 7 --compile

The defaults are the committed model's: head_dim 128, 8 query / 2 KV heads, hidden 512,
4 layers, SwiGLU 768, vocab 4096 tied: 12.06M parameters, 24.1 MB in bf16.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from build_corpus import load_tokens, make_window, read_manifest

log = logging.getLogger("train_model")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MAX_MODEL_DIR_BYTES = 25_000_000  # config + safetensors + tokenizer <= 25 MB


def build_config(args: argparse.Namespace, vocab_size: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        attn_implementation="sdpa",
    )


def configure_sdpa(
    device: torch.device, heads: int, kv_heads: int, head_dim: int, allow_math: bool
) -> bool:
    """Make sure long-context attention runs in a fused kernel; returns whether native GQA does.

    transformers calls SDPA with ``enable_gqa=True``; if no fused kernel takes that here, it is
    told to repeat the KV heads instead (the fused kernels then apply). Unless ``allow_math``,
    the math backend is switched off: at 16K it would materialise [B, H, L, L] scores.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, heads, 256, head_dim, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, kv_heads, 256, head_dim, device=device, dtype=torch.bfloat16)
    native = True
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(
                q, kv, kv, is_causal=True, enable_gqa=heads != kv_heads
            )
    except RuntimeError as e:
        native = False
        import transformers.integrations.sdpa_attention as hf_sdpa

        hf_sdpa.use_gqa_in_sdpa = lambda *a, **k: False
        log.warning("no fused SDPA kernel takes enable_gqa here (%s); repeating KV heads", e)
    if not allow_math:
        torch.backends.cuda.enable_math_sdp(False)
    return native


def count_params(model: torch.nn.Module) -> int:
    # Parameters are unique in .parameters(): the tied LM head is counted once.
    return sum(p.numel() for p in model.parameters())


def lr_at(step: int, progress: float, args: argparse.Namespace) -> float:
    """Linear warm-up over ``--warmup-steps``, then cosine to ``--min-lr-ratio`` by progress."""
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    p = min(1.0, max(0.0, progress))
    cos = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return args.lr * warm * cos


class WindowSampler:
    """Random corpus windows of a given length, reproducible from the seed."""

    def __init__(self, tokens: np.ndarray, eos_id: int, seed: int):
        self.tokens = tokens
        self.eos_id = eos_id
        self.rng = np.random.default_rng(seed)

    def batch(self, batch_size: int, ctx: int) -> torch.Tensor:
        n = self.tokens.size - ctx
        if n <= 0:
            raise ValueError(f"corpus of {self.tokens.size} tokens is shorter than ctx {ctx}")
        starts = self.rng.integers(0, n, size=batch_size)
        return torch.from_numpy(
            np.stack([make_window(self.tokens, int(s), ctx, self.eos_id) for s in starts])
        )


def eval_windows(tokens: np.ndarray, ctx: int, count: int, eos_id: int) -> torch.Tensor:
    """``count`` evenly spaced held-out windows (the same ones at every evaluation)."""
    n = tokens.size - ctx
    if n <= 0:
        raise ValueError(f"held-out split of {tokens.size} tokens is shorter than ctx {ctx}")
    starts = np.linspace(0, n, num=count, dtype=np.int64)
    return torch.from_numpy(np.stack([make_window(tokens, int(s), ctx, eos_id) for s in starts]))


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, device: torch.device, amp: bool) -> float:
    model.eval()
    losses = []
    for w in windows:
        x = w[None].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            losses.append(float(model(input_ids=x, labels=x).loss))
    model.train()
    return float(np.mean(losses))


def set_compiled(model, enabled: bool) -> None:
    """Compile (or un-compile) each decoder layer in place; parameter names do not change."""
    for layer in model.model.layers:
        if enabled:
            layer.compile(dynamic=False)
        else:
            layer._compiled_call_impl = None


def save_model(model, out: Path, tokenizer_dir: Path) -> int:
    """bf16 safetensors + config + tokenizer files; returns the folder's size in bytes."""
    out.mkdir(parents=True, exist_ok=True)
    set_compiled(model, False)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, safe_serialization=True)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # Transformers 5 writes "dtype" and "rope_parameters"; older readers look for "rope_theta".
    # ("torch_dtype" is left out: transformers 5 warns on every load when it is present.)
    cfg["dtype"] = "bfloat16"
    cfg.setdefault("rope_theta", cfg.get("rope_parameters", {}).get("rope_theta"))
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if tokenizer_dir.resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            shutil.copy2(tokenizer_dir / name, out / name)
    return sum(f.stat().st_size for f in out.iterdir() if f.is_file())


def environment(device: torch.device) -> dict:
    import transformers

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def train(args: argparse.Namespace) -> dict:
    """Train and save; ``--minutes`` counts from here (importing torch comes before)."""
    t_start = time.time()
    deadline = t_start + args.minutes * 60
    torch.manual_seed(args.seed)
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))  # fmt: skip
    amp = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        configure_sdpa(device, args.heads, args.kv_heads, args.head_dim, args.allow_math_sdpa)

    manifest = read_manifest(args.data)
    eos_id = int(manifest["eos_id"])
    tokenizer_dir = args.tokenizer or args.out
    from tokenizers import Tokenizer

    vocab_size = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    train_tokens = load_tokens(args.data, "train")
    held_tokens = load_tokens(args.data, "heldout")
    sampler = WindowSampler(train_tokens, eos_id, args.seed)

    from transformers import LlamaForCausalLM

    config = build_config(args, vocab_size, eos_id)
    model = LlamaForCausalLM(config).to(device)
    n_params = count_params(model)
    est_bytes = 2 * n_params + sum((tokenizer_dir / f).stat().st_size for f in TOKENIZER_FILES)
    log.info("model: %d parameters, about %.2f MB in bf16 with the tokenizer",
             n_params, est_bytes / 1e6)  # fmt: skip
    if est_bytes > args.max_model_bytes:
        raise SystemExit(
            f"model folder would be {est_bytes / 1e6:.2f} MB > {args.max_model_bytes / 1e6:.2f} MB: "
            "lower --hidden, --intermediate, --layers or the vocab size"
        )
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )  # fmt: skip
    compiled = bool(args.compile)
    if compiled:
        set_compiled(model, True)

    phases = [(args.warm_ctx, args.warm_frac)] if args.warm_frac > 0 and args.warm_ctx else []
    eval_sets = {
        ctx: eval_windows(held_tokens, ctx, args.eval_windows, eos_id)
        for ctx in sorted({args.ctx, *(c for c, _ in phases)})
    }
    history: list[dict] = []
    evals: list[dict] = []
    run_log = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(device),
        "num_params": n_params,
        "model_config": config.to_dict(),
        "data": {k: manifest.get(k) for k in ("tokens", "chars", "docs", "files_sha256",
                                               "chars_per_token", "vocab_size", "roots")},
        "history": history,
        "evals": evals,
    }  # fmt: skip

    def write_log() -> None:
        if args.log_json:
            args.log_json.parent.mkdir(parents=True, exist_ok=True)
            args.log_json.write_text(json.dumps(run_log, indent=1, default=str) + "\n")

    model.train()
    t_loop = time.time()
    step = 0
    tokens_seen = 0
    step_times: list[float] = []
    loss_acc: list[float] = []
    t_window = time.time()
    tokens_window = 0
    stop_reason = "max_steps"
    ctx = phases[0][0] if phases else args.ctx
    while args.max_steps is None or step < args.max_steps:
        now = time.time()
        budget = max(1e-6, deadline - args.save_reserve_s - t_loop)
        progress = (now - t_loop) / budget
        if args.max_steps:
            progress = max(progress, step / args.max_steps)
        # Stop while a whole step (with margin) still fits before the deadline.
        next_step = 1.5 * (np.median(step_times[-20:]) if step_times else 0.0)
        if now + next_step > deadline - args.save_reserve_s:
            stop_reason = "time_budget"
            break
        new_ctx = phases[0][0] if phases and progress < phases[0][1] else args.ctx
        if new_ctx != ctx:
            log.info("step %d: context %d -> %d", step, ctx, new_ctx)
            ctx = new_ctx
        batch = max(1, args.batch_tokens // ctx)
        micro = max(1, min(batch, args.micro_batch_tokens // ctx))
        lr = lr_at(step, progress, args)
        for g in opt.param_groups:
            g["lr"] = lr
        t_step = time.time()
        x_all = sampler.batch(batch, ctx)
        try:
            loss_val = _train_step(model, opt, x_all, micro, device, amp, args.grad_clip)
        except Exception:
            if not compiled or step > 0:
                raise
            log.exception("compiled first step failed; continuing without torch.compile")
            compiled = False
            set_compiled(model, False)
            opt.zero_grad(set_to_none=True)
            loss_val = _train_step(model, opt, x_all, micro, device, amp, args.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= 2:  # the first steps include compilation
            step_times.append(time.time() - t_step)
        step += 1
        tokens_seen += x_all.numel()
        tokens_window += x_all.numel()
        loss_acc.append(loss_val)
        if not math.isfinite(loss_val):
            raise FloatingPointError(f"loss became {loss_val} at step {step}; lower --lr")
        if step % args.log_every == 0 or step == 1:
            dt = time.time() - t_window
            rec = {
                "step": step, "ctx": ctx, "batch": batch, "loss": float(np.mean(loss_acc)),
                "lr": lr, "tokens": tokens_seen, "elapsed_s": round(time.time() - t_start, 1),
                "tok_per_s": round(tokens_window / max(dt, 1e-9)),
            }  # fmt: skip
            if device.type == "cuda":
                rec["max_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            history.append(rec)
            log.info("step %(step)d ctx %(ctx)d loss %(loss).4f lr %(lr).2e tok/s %(tok_per_s)d "
                     "elapsed %(elapsed_s).0fs", rec)  # fmt: skip
            loss_acc.clear()
            t_window, tokens_window = time.time(), 0
        if args.eval_every and step % args.eval_every == 0:
            evals.append(_evaluate(model, eval_sets, step, device, amp))
            write_log()

    if not evals or evals[-1]["step"] != step:
        evals.append(_evaluate(model, eval_sets, step, device, amp))
    train_seconds = time.time() - t_start
    model_bytes = save_model(model, args.out, tokenizer_dir)
    run_log["final"] = {
        "steps": step,
        "tokens_seen": tokens_seen,
        "epochs": round(tokens_seen / max(1, train_tokens.size), 3),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "stop_reason": stop_reason,
        "compiled": compiled,
        "final_heldout_loss": evals[-1]["loss"],
        "model_dir_bytes": model_bytes,
    }
    write_log()
    log.info("saved %s (%.2f MB) after %d steps, %.1fM tokens, %.0fs; %s",
             args.out, model_bytes / 1e6, step, tokens_seen / 1e6, train_seconds,
             ", ".join(f"held-out loss@{k}={v:.4f}" for k, v in evals[-1]["loss"].items()))  # fmt: skip
    if model_bytes > MAX_MODEL_DIR_BYTES:
        log.warning("model folder is %.2f MB, over its 25 MB limit", model_bytes / 1e6)
    return run_log


def _train_step(model, opt, x_all: torch.Tensor, micro: int, device, amp: bool, clip: float):
    opt.zero_grad(set_to_none=True)
    n_micro = math.ceil(x_all.shape[0] / micro)
    total = 0.0
    for chunk in x_all.split(micro):
        x = chunk.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=x, labels=x).loss
        (loss / n_micro).backward()
        total += loss.detach()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return float(total) / n_micro


def _evaluate(model, eval_sets: dict, step: int, device, amp: bool) -> dict:
    rec = {"step": step, "loss": {}}
    # Eager: evaluation shapes and eval mode would each cost a recompilation.
    compiled = [layer._compiled_call_impl for layer in model.model.layers]
    set_compiled(model, False)
    try:
        for ctx, windows in eval_sets.items():
            rec["loss"][str(ctx)] = heldout_loss(model, windows, device, amp)
    finally:
        for layer, impl in zip(model.model.layers, compiled, strict=True):
            layer._compiled_call_impl = impl
    log.info("step %d held-out loss: %s", step,
             ", ".join(f"{k}: {v:.4f}" for k, v in rec["loss"].items()))  # fmt: skip
    return rec


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="data folder from build_corpus")
    ap.add_argument("--out", type=Path, required=True, help="model folder to write")
    ap.add_argument("--tokenizer", type=Path, default=None, help="default: --out")
    ap.add_argument("--log-json", type=Path, default=None, help="default: OUT/../train_log.json")
    ap.add_argument("--minutes", type=float, default=12.0, help="hard wall-clock budget")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--save-reserve-s", type=float, default=10.0)
    # model
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rope-theta", type=float, default=1e6)
    ap.add_argument("--max-positions", type=int, default=32768)
    ap.add_argument("--max-model-bytes", type=int, default=MAX_MODEL_DIR_BYTES)
    # optimisation
    ap.add_argument("--ctx", type=int, default=16384)
    ap.add_argument("--warm-ctx", type=int, default=4096)
    ap.add_argument("--warm-frac", type=float, default=0.2, help="share of the budget at warm-ctx")
    ap.add_argument("--batch-tokens", type=int, default=131072, help="tokens per optimiser step")
    ap.add_argument("--micro-batch-tokens", type=int, default=131072)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the decoder layers")
    ap.add_argument("--allow-math-sdpa", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-windows", type=int, default=4)
    args = ap.parse_args(argv)
    if args.log_json is None:
        args.log_json = args.out.parent / "train_log.json"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(parse_args(argv))


if __name__ == "__main__":
    main()
