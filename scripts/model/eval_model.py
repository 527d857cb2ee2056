"""Evaluate the tiny code model: held-out perplexity and attention structure.

1. Perplexity of the same held-out token span cut into windows of 2K, 8K and 16K tokens (each
   window starts with EOS, as in training), with the loss by position bucket and bits/char.
2. Attention structure: for a few held-out windows at 8K and 16K, Q/K/V of every layer are
   recomputed in fp32 from the captured attention inputs (the ``input_layernorm`` outputs),
   attention probabilities are formed per query head, and per (head, query block) the key
   blocks are ranked by their attention mass (block geometry of sparge_serve: 128 queries x
   64 keys; key block 0 and the diagonal blocks are always kept):

   - ``sparsity_mass94``: share of causally valid blocks NOT needed to cover 94% of each query
     block's mass (a proxy for SpargeAttn's CDF selection);
   - ``oracle_sparsity_l1``: the highest block sparsity of that oracle selection, over a grid
     of mass levels, whose block-sparse output keeps the relative L1 error
     ``sum|O_sparse - O_dense| / sum|O_dense|`` of the head within ``--l1-budget`` (0.06).

   Heads are also scored by where their mass goes (sink = first key block, local = the last
   256 positions, long = 1024+ positions back), and a PNG shows block-pooled log attention maps
   of the most sink-, local- and long-range-dominated heads at 8K plus per-layer sparsities.

Writes ``--out-json`` and ``--plot``, prints a markdown block for the model card (and writes
it to ``--card`` if given)::

    python eval_model.py --model WORK/model --data WORK/data --out-json eval.json \\
        --plot attention_8k.png --card model_card.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from build_corpus import load_tokens, make_window, read_manifest
from train_model import configure_sdpa

log = logging.getLogger("eval_model")

BLKQ = 128  # sparge_serve.kernels.BLKQ: query rows per query block
BLKK = 64  # sparge_serve.kernels.BLKK: keys per key block
MASS_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.94, 0.96, 0.98, 0.99, 0.995, 0.999, 1.0)
LOCAL_WINDOW = 256
LONG_DISTANCE = 1024


# ----------------------------------------------------------------------------- perplexity
def position_buckets(ctx: int) -> list[tuple[int, int]]:
    edges = [0, 128, 512, 2048, 8192, 16384, 32768]
    edges = [e for e in edges if e < ctx] + [ctx]
    return list(zip(edges[:-1], edges[1:], strict=True))


@torch.no_grad()
def perplexity(
    model, tokens: np.ndarray, ctx: int, span: int, eos_id: int, device, batch_tokens: int
) -> dict:
    """NLL of the first ``span`` held-out tokens, cut into windows of ``ctx`` (EOS + ctx-1)."""
    n_win = span // (ctx - 1)
    if n_win < 1:
        raise ValueError(f"held-out span of {span} tokens is shorter than one {ctx} window")
    buckets = position_buckets(ctx)
    nll_sum = 0.0
    count = 0
    b_sum = np.zeros(len(buckets))
    b_cnt = np.zeros(len(buckets))
    per_batch = max(1, batch_tokens // ctx)
    for i0 in range(0, n_win, per_batch):
        x = torch.from_numpy(
            np.stack(
                [make_window(tokens, i * (ctx - 1), ctx, eos_id)
                 for i in range(i0, min(n_win, i0 + per_batch))]
            )
        ).to(device)  # fmt: skip
        logits = model(input_ids=x).logits[:, :-1]
        nll = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
        ).view(x.shape[0], ctx - 1)
        nll_sum += float(nll.sum())
        count += nll.numel()
        pos_nll = nll.sum(0).double().cpu().numpy()  # target position p+1 predicted at p
        for k, (a, b) in enumerate(buckets):
            b_sum[k] += pos_nll[a : b - 1].sum()
            b_cnt[k] += x.shape[0] * len(range(a, b - 1))
    loss = nll_sum / count
    return {
        "ctx": ctx,
        "windows": n_win,
        "tokens": count,
        "loss": loss,
        "ppl": math.exp(loss),
        "loss_by_position": {
            f"{a}-{b}": float(b_sum[k] / max(1, b_cnt[k])) for k, (a, b) in enumerate(buckets)
        },  # fmt: skip
    }


# ------------------------------------------------------------------- attention structure
@torch.no_grad()
def capture_attention_inputs(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention input (its input_layernorm output), [L, hidden]."""
    captured: list[torch.Tensor] = []
    hooks = [
        layer.input_layernorm.register_forward_hook(
            lambda _m, _i, out: captured.append(out[0].detach())
        )
        for layer in model.model.layers
    ]
    try:
        model.model(input_ids=x)
    finally:
        for h in hooks:
            h.remove()
    return captured


@torch.no_grad()
def layer_qkv(model, layer_idx: int, h: torch.Tensor):
    """fp32 Q [Hq, L, D] (RoPE applied), K [Hkv, L, D] (RoPE applied), V [Hkv, L, D]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = model.model.layers[layer_idx].self_attn
    cfg = model.config
    d = attn.head_dim
    hf = h.float()
    q = F.linear(hf, attn.q_proj.weight.float()).view(-1, cfg.num_attention_heads, d)
    k = F.linear(hf, attn.k_proj.weight.float()).view(-1, cfg.num_key_value_heads, d)
    v = F.linear(hf, attn.v_proj.weight.float()).view(-1, cfg.num_key_value_heads, d)
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, L, D]
    pos = torch.arange(h.shape[0], device=h.device)[None]
    cos, sin = model.model.rotary_emb(v, pos)
    q, k = apply_rotary_pos_emb(q, k, cos.float(), sin.float())
    return q[0], k[0], v[0], attn.scaling


@torch.no_grad()
def head_structure(
    q: torch.Tensor,  # [L, D] fp32, one query head
    k: torch.Tensor,  # [L, D] fp32, its KV head
    v: torch.Tensor,  # [L, D] fp32
    scale: float,
    map_size: int,
    rows_per_chunk: int,
    blkq: int = BLKQ,
    blkk: int = BLKK,
) -> dict:
    """Attention statistics of one head over a causal prefill from position 0.

    NOTE: L must be a multiple of ``blkq``, ``blkk`` and ``map_size``; query block ``b`` covers
    positions ``[b*blkq, (b+1)*blkq)``, key block ``j`` is valid iff ``j*blkk <= (b+1)*blkq-1``
    and diagonal iff also ``(j+1)*blkk-1 >= b*blkq`` (sparge_serve's bottom-right alignment).
    """
    L, _ = q.shape
    pool = max(1, L // map_size)
    align = math.lcm(blkq, blkk, pool)
    if L % align or L % map_size:
        raise ValueError(
            f"window of {L} tokens must be a multiple of {align} (lcm of blkq, blkk and the "
            f"map pooling) and of --map-size {map_size}"
        )
    rows_per_chunk = max(align, rows_per_chunk // align * align)
    levels = torch.tensor(MASS_LEVELS, device=q.device)
    kept = torch.zeros(len(MASS_LEVELS), dtype=torch.float64)
    valid_total = 0
    l1_err = torch.zeros(len(MASS_LEVELS), dtype=torch.float64)
    l1_ref = 0.0
    pooled = torch.zeros(map_size, map_size, dtype=torch.float64)
    mass = {"sink": 0.0, "local": 0.0, "long": 0.0}
    n_stat_rows = 0
    stat_from = min(LONG_DISTANCE, L // 2)  # rows early in the window see no long range
    key_pos = torch.arange(L, device=q.device)
    for r0 in range(0, L, rows_per_chunk):
        r1 = min(L, r0 + rows_per_chunk)
        end = r1  # causal: keys [0, r1) suffice; r1 is a multiple of blkq hence of blkk
        s = (q[r0:r1] @ k[:end].T) * scale
        qpos = torch.arange(r0, r1, device=q.device)[:, None]
        s.masked_fill_(key_pos[None, :end] > qpos, float("-inf"))
        p = torch.softmax(s, dim=-1)  # [R, end]
        R = r1 - r0
        # Pooled map for the plot: mean over `pool` query rows of the mass in `pool` keys.
        pm = p.view(R // pool, pool, end // pool, pool).sum(dim=(1, 3)) / pool
        pooled[r0 // pool : r1 // pool, : end // pool] = pm.double().cpu()
        # Where the mass goes (rows far enough in).
        srows = qpos[:, 0] >= stat_from
        if srows.any():
            ps = p[srows]
            dist = qpos[srows] - key_pos[None, :end]
            sink = ps[:, :blkk].sum(-1)
            mass["sink"] += float(sink.sum())
            mass["local"] += float((ps * ((dist < LOCAL_WINDOW) & (key_pos[:end] >= blkk))).sum())
            mass["long"] += float((ps * ((dist >= LONG_DISTANCE) & (key_pos[:end] >= blkk))).sum())
            n_stat_rows += int(srows.sum())
        # Block masses [nq, nkb_c] and the oracle selection at each mass level.
        nq, nkb_c = R // blkq, end // blkk
        bm = p.view(nq, blkq, nkb_c, blkk).sum(dim=(1, 3)) / blkq
        qb = torch.arange(r0 // blkq, r1 // blkq, device=q.device)[:, None]
        kb = torch.arange(nkb_c, device=q.device)[None, :]
        valid = kb * blkk <= (qb + 1) * blkq - 1
        forced = valid & ((kb == 0) | ((kb + 1) * blkk - 1 >= qb * blkq))
        order = torch.argsort(bm, dim=-1, descending=True)
        csum = torch.cumsum(torch.gather(bm, 1, order), dim=-1)
        rank = torch.argsort(order, dim=-1)  # position of each block in the ranking
        # minimal prefix covering level c: count = 1 + #(csum < c) (csum is non-decreasing)
        need = 1 + (csum[None] < levels[:, None, None] - 1e-7).sum(-1)  # [n_levels, nq]
        keep = (rank[None] < need[..., None]) | forced[None]
        keep &= valid[None]
        kept += keep.sum(dim=(1, 2)).double().cpu()
        valid_total += int(valid.sum())
        # Block-sparse outputs: per-row partial outputs of each key block, then masked sums.
        part = torch.einsum("rjk,jkd->rjd", p.view(R, nkb_c, blkk), v[:end].view(nkb_c, blkk, -1))
        row_mass = p.view(R, nkb_c, blkk).sum(-1)  # [R, nkb_c]
        dense = part.sum(1)  # [R, D]
        l1_ref += float(dense.abs().sum())
        keep_rows = keep.repeat_interleave(blkq, dim=1).to(p.dtype)  # [n_levels, R, nkb_c]
        num = torch.einsum("lrj,rjd->lrd", keep_rows, part)
        den = (keep_rows * row_mass[None]).sum(-1, keepdim=True)
        sparse = num / den.clamp_min(1e-30)
        l1_err += (sparse - dense[None]).abs().sum(dim=(1, 2)).double().cpu()
    density = (kept / max(1, valid_total)).tolist()
    l1 = (l1_err / max(l1_ref, 1e-30)).tolist()
    n = max(1, n_stat_rows)
    return {
        "density": density,  # per MASS_LEVELS
        "l1": l1,  # per MASS_LEVELS
        "mass": {k: v / n for k, v in mass.items()},
        "map": pooled.float(),
    }


def summarise_head(st: dict, l1_budget: float) -> dict:
    i94 = MASS_LEVELS.index(0.94)
    ok = [1 - d for d, e in zip(st["density"], st["l1"], strict=True) if e <= l1_budget]
    return {
        "sparsity_mass94": 1 - st["density"][i94],
        "l1_mass94": st["l1"][i94],
        "oracle_sparsity_l1": max(ok) if ok else 0.0,
        **{f"{k}_mass": v for k, v in st["mass"].items()},
    }


def attention_analysis(
    model, tokens: np.ndarray, ctx: int, n_windows: int, eos_id: int, args
) -> tuple[list[list[dict]], list[list[torch.Tensor]]]:
    """Per window, per layer, per head summaries; and the pooled maps of the first window."""
    n = tokens.size - ctx
    if n <= 0:
        raise ValueError(f"held-out split of {tokens.size} tokens is shorter than ctx {ctx}")
    starts = np.linspace(0, n, num=n_windows + 2, dtype=np.int64)[1:-1]
    cfg = model.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    per_head: list[list[list[dict]]] = []  # [window][layer][head]
    maps: list[list[torch.Tensor]] = []
    device = next(model.parameters()).device
    for wi, s in enumerate(starts):
        x = torch.from_numpy(make_window(tokens, int(s), ctx, eos_id))[None].to(device)
        inputs = capture_attention_inputs(model, x)
        layers = []
        for li, h in enumerate(inputs):
            q, k, v, scale = layer_qkv(model, li, h)
            heads = []
            layer_maps = []
            for hi in range(cfg.num_attention_heads):
                st = head_structure(
                    q[hi], k[hi // group], v[hi // group], scale, args.map_size,
                    args.rows_per_chunk, args.blkq, args.blkk,
                )  # fmt: skip
                heads.append(summarise_head(st, args.l1_budget))
                layer_maps.append(st["map"])
            layers.append(heads)
            if wi == 0:
                maps.append(layer_maps)
        per_head.append(layers)
    # mean over windows -> [layer][head]
    avg = [
        [
            {key: float(np.mean([per_head[w][li][hi][key] for w in range(len(per_head))]))
             for key in per_head[0][li][hi]}
            for hi in range(cfg.num_attention_heads)
        ]
        for li in range(cfg.num_hidden_layers)
    ]  # fmt: skip
    return avg, maps


def layer_table(heads: list[list[dict]]) -> list[dict]:
    rows = []
    for li, hs in enumerate(heads):
        rows.append(
            {
                "layer": li,
                **{key: float(np.mean([h[key] for h in hs])) for key in hs[0]},
                "min_oracle_sparsity_l1": float(min(h["oracle_sparsity_l1"] for h in hs)),
            }
        )
    return rows


# --------------------------------------------------------------------------------- plot
def pick_heads(heads: list[list[dict]], count: int) -> list[tuple[int, int, str]]:
    """Most sink-, local- and long-range-dominated heads (distinct), then the sparsest."""
    flat = [(li, hi, h) for li, hs in enumerate(heads) for hi, h in enumerate(hs)]
    chosen: list[tuple[int, int, str]] = []
    keys = [("long_mass", "long-range"), ("local_mass", "local"), ("sink_mass", "sink"),
            ("sparsity_mass94", "sparse")]  # fmt: skip
    for _ in range(count):
        for key, label in keys:
            if len(chosen) >= count:
                break
            for li, hi, _ in sorted(flat, key=lambda t, key=key: -t[2][key]):
                if (li, hi) not in {(c[0], c[1]) for c in chosen}:
                    chosen.append((li, hi, label))
                    break
    return chosen


def plot_attention(
    maps: list[list[torch.Tensor]], heads: list[list[dict]], layers_by_ctx: dict,
    ctx: int, path: Path, count: int,
) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = pick_heads(heads, count)
    ncol = 4
    nrow = math.ceil(len(chosen) / ncol)
    fig = plt.figure(figsize=(3.2 * ncol, 3.3 * nrow + 2.8))
    gs = fig.add_gridspec(nrow + 1, ncol, height_ratios=[3.3] * nrow + [2.6])
    im = None
    for i, (li, hi, label) in enumerate(chosen):
        ax = fig.add_subplot(gs[i // ncol, i % ncol])
        m = maps[li][hi].numpy().astype(np.float64)
        img = np.log10(np.maximum(m, 1e-7))
        img[np.triu_indices_from(img, k=1)] = np.nan
        im = ax.imshow(img, cmap="magma", vmin=-5, vmax=0, interpolation="nearest")
        h = heads[li][hi]
        ax.set_title(
            f"L{li} H{hi} ({label})\nsink {h['sink_mass']:.2f} local {h['local_mass']:.2f} "
            f"long {h['long_mass']:.2f}",
            fontsize=8,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=fig.axes, shrink=0.6, label="log10 mean attention per cell")
    ax = fig.add_subplot(gs[nrow, :])
    width = 0.8 / max(1, 2 * len(layers_by_ctx))
    n_layers = len(next(iter(layers_by_ctx.values())))
    xs = np.arange(n_layers)
    i = 0
    for c, rows in layers_by_ctx.items():
        for key, name in (("sparsity_mass94", "94% mass"), ("oracle_sparsity_l1", "oracle L1")):
            ax.bar(xs + (i - len(layers_by_ctx)) * width + width / 2,
                   [r[key] for r in rows], width, label=f"{name} @{c}")  # fmt: skip
            i += 1
    ax.axhline(0.4, color="k", lw=0.8, ls="--")
    ax.set_xticks(xs, [f"layer {j}" for j in xs])
    ax.set_ylim(0, 1)
    ax.set_ylabel("block sparsity (mean over heads)")
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    fig.suptitle(f"Attention at {ctx} tokens, {BLKQ}x{BLKK} blocks pooled to "
                 f"{maps[0][0].shape[0]}x{maps[0][0].shape[0]} (held-out code)")  # fmt: skip
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------- reporting
def summary_lines(report: dict) -> list[str]:
    """Model, data and training facts for the model card (from the run's JSON files)."""
    m, d, t = report["model_summary"], report["data_summary"], report.get("training")
    lines = [
        f"- **Model**: {m['num_params']:,} parameters; model folder {m['dir_bytes'] / 1e6:.2f} MB "
        f"(`model.safetensors` sha256 `{report['model_sha256'][:16]}…`).",
    ]
    if d.get("tokens"):
        lines.append(
            f"- **Data**: train {d['docs']['train']:,} files, {d['chars']['train'] / 1e6:.1f}M "
            f"chars, {d['tokens']['train'] / 1e6:.1f}M tokens; held-out {d['docs']['heldout']:,} "
            f"files, {d['chars']['heldout'] / 1e6:.2f}M chars, {d['tokens']['heldout'] / 1e6:.2f}M "
            f"tokens; {d['chars_per_token']} chars/token; python {d['python']}; "
            f"`files_sha256` `{d['files_sha256'][:16]}…`."
        )
    if t:
        f, env, a = t["final"], t["environment"], t["args"]
        loss = ", ".join(f"{v:.4f} @{k}" for k, v in f["final_heldout_loss"].items())
        lines.append(
            f"- **Training**: {env.get('gpu', env['device'])}, torch {env['torch']}, transformers "
            f"{env['transformers']}; {f['steps']:,} steps, {f['tokens_seen'] / 1e6:.1f}M tokens "
            f"({f['epochs']} epochs) in {f['train_seconds']:.0f} s (budget {a['minutes']} min, "
            f"compile {f['compiled']}); context {a['warm_ctx']} for {a['warm_frac']:.0%} of the "
            f"budget, then {a['ctx']}; {a['batch_tokens']:,} tokens/step; peak LR {a['lr']}; "
            f"final held-out loss (training's windows) {loss}."
        )
    return lines


def markdown(report: dict) -> str:
    lines = summary_lines(report) + [""]
    lines += ["| context | windows | held-out loss (nats/token) | perplexity | bits/char |",
              "|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in report["perplexity"]:
        lines.append(f"| {r['ctx']} | {r['windows']} | {r['loss']:.4f} | {r['ppl']:.3f} "
                     f"| {r.get('bits_per_char', float('nan')):.4f} |")  # fmt: skip
    lines += ["", "Attention concentration, mean over heads "
              f"({report['settings']['blkq']}x{report['settings']['blkk']} blocks; key block 0 "
              "and diagonal blocks always kept; oracle block ranking by true mass):", ""]  # fmt: skip
    ctxs = list(report["attention"])
    head = "| layer | " + " | ".join(
        f"sparsity @94% mass ({c}) | oracle sparsity @L1<={report['settings']['l1_budget']} ({c})"
        for c in ctxs
    )
    lines += [head + " |", "|---:|" + "---:|" * (2 * len(ctxs))]
    n_layers = len(report["attention"][ctxs[0]]["layers"])
    for li in range(n_layers):
        cells = []
        for c in ctxs:
            r = report["attention"][c]["layers"][li]
            cells += [f"{r['sparsity_mass94']:.3f}", f"{r['oracle_sparsity_l1']:.3f}"]
        lines.append(f"| {li} | " + " | ".join(cells) + " |")
    cells = []
    for c in ctxs:
        a = report["attention"][c]["mean"]
        cells += [f"**{a['sparsity_mass94']:.3f}**", f"**{a['oracle_sparsity_l1']:.3f}**"]
    lines.append("| all | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def evaluate(args: argparse.Namespace) -> dict:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))  # fmt: skip
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 attention maps stay fp32
        cfg = model.config
        configure_sdpa(device, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                       allow_math=True)  # fmt: skip
    manifest = read_manifest(args.data)
    eos_id = int(manifest["eos_id"])
    held = load_tokens(args.data, "heldout")
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    tok.encode_special_tokens = True

    ctxs = sorted(args.ctx)
    span = min(held.size - 1, args.span_windows * (max(ctxs) - 1))
    span_ids = np.asarray(held[:span])
    # Characters of the span, each document separator counted as one character.
    span_chars = len(tok.decode(span_ids.tolist(), skip_special_tokens=True))
    span_chars += int((span_ids == eos_id).sum())
    ppl = []
    for c in ctxs:
        r = perplexity(model, held, c, span, eos_id, device, args.batch_tokens)
        r["bits_per_char"] = r["loss"] / math.log(2) * span / max(1, span_chars)
        ppl.append(r)
        log.info("ctx %d: loss %.4f ppl %.3f over %d windows", c, r["loss"], r["ppl"], r["windows"])

    attention = {}
    plot_maps = plot_heads = None
    for c in sorted(args.attn_ctx):
        heads, maps = attention_analysis(model, held, c, args.attn_windows, eos_id, args)
        rows = layer_table(heads)
        attention[str(c)] = {
            "windows": args.attn_windows,
            "layers": rows,
            "mean": {key: float(np.mean([r[key] for r in rows])) for key in rows[0]
                     if key != "layer"},
            "heads": heads,
        }  # fmt: skip
        if c == args.plot_ctx:
            plot_maps, plot_heads = maps, heads
        log.info("attention at %d: mean sparsity @94%% mass %.3f, oracle @L1<=%.2f %.3f", c,
                 attention[str(c)]["mean"]["sparsity_mass94"], args.l1_budget,
                 attention[str(c)]["mean"]["oracle_sparsity_l1"])  # fmt: skip
    report = {
        "model": str(args.model),
        "model_sha256": file_sha256(args.model / "model.safetensors"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "settings": {
            "blkq": args.blkq,
            "blkk": args.blkk,
            "l1_budget": args.l1_budget,
            "mass_levels": list(MASS_LEVELS),
            "span_tokens": span,
            "local_window": LOCAL_WINDOW,
            "long_distance": LONG_DISTANCE,
        },  # fmt: skip
        "model_summary": {
            "num_params": sum(p.numel() for p in model.parameters()),
            "dir_bytes": sum(f.stat().st_size for f in args.model.iterdir() if f.is_file()),
        },
        "data_summary": {
            k: manifest.get(k)
            for k in (
                "docs",
                "chars",
                "tokens",
                "chars_per_token",
                "files_sha256",
                "python",
                "roots",
            )
        },
        "perplexity": ppl,
        "attention": attention,
    }
    if args.train_log and args.train_log.exists():
        report["training"] = json.loads(args.train_log.read_text())
        report["training"].pop("history", None)
    if args.plot and plot_maps is not None:
        plot_attention(plot_maps, plot_heads, {c: a["layers"] for c, a in attention.items()},
                       args.plot_ctx, args.plot, args.plot_heads)  # fmt: skip
    report["seconds"] = round(time.time() - t0, 1)
    md = markdown(report)
    report["markdown"] = md
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(report, indent=1) + "\n")
    if args.card:
        args.card.write_text(md)
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="data folder with heldout.npy")
    ap.add_argument("--out-json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PNG of attention maps")
    ap.add_argument("--card", type=Path, default=None, help="write the markdown block here")
    ap.add_argument("--train-log", type=Path, default=None, help="train_model's JSON log")
    ap.add_argument("--ctx", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--span-windows", type=int, default=16,
                    help="held-out span = this many windows of the longest --ctx")  # fmt: skip
    ap.add_argument("--batch-tokens", type=int, default=65536)
    ap.add_argument("--attn-ctx", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--attn-windows", type=int, default=2)
    ap.add_argument("--plot-ctx", type=int, default=8192)
    ap.add_argument("--plot-heads", type=int, default=8)
    ap.add_argument("--map-size", type=int, default=128)
    ap.add_argument("--rows-per-chunk", type=int, default=1024)
    ap.add_argument("--blkq", type=int, default=BLKQ)
    ap.add_argument("--blkk", type=int, default=BLKK)
    ap.add_argument("--l1-budget", type=float, default=0.06)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                    help="model weights (auto: bf16 on CUDA, fp32 on CPU)")  # fmt: skip
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report = evaluate(parse_args(argv))
    print(report["markdown"])


if __name__ == "__main__":
    main()
