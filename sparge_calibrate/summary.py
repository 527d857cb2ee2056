"""Human-readable output: the per-layer summary table, the sparsity heatmap, the quality table."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import torch

from .hf_driver import QualityRow
from .outputs import HEATMAP_SOFTWARE
from .search import LayerResult

__all__ = ["format_quality", "format_summary", "overall_sparsity", "plot_heatmap", "print_table"]


def overall_sparsity(results: Sequence[LayerResult]) -> float:
    """Mean block sparsity over every searched (layer, head), dense heads counting as 0;
    sliding-window layers (never searched, always dense) are left out."""
    searched = [r.sparsity for r in results if not r.window]
    return float(torch.stack(searched).mean()) if searched else 0.0


def format_summary(results: Sequence[LayerResult]) -> tuple[list[str], list[list[str]], str]:
    """Header, rows (one per layer) and a footer line of the calibration summary."""
    header = ["layer", "l1 budget", "pv budget", "mean sparsity", "dense heads", "mean pv skip",
              "mean error", "max error"]
    rows = []
    for i, r in enumerate(results):
        dense = int((~r.is_sparse).sum())
        pv = "n/a" if r.pv_skip is None else f"{float(r.pv_skip.mean()):.1%}"
        if r.window:  # a sliding-window layer: served dense, never searched
            rows.append([str(i), f"{r.budget.l1:g}", f"{r.budget.pv_l1:g}", "dense (window)",
                         f"{dense}/{r.num_heads}", "n/a", "n/a", "n/a"])
            continue
        rows.append([
            str(i), f"{r.budget.l1:g}", f"{r.budget.pv_l1:g}", f"{float(r.sparsity.mean()):.1%}",
            f"{dense}/{r.num_heads}" + (" (layer floor)" if r.floored else ""), pv,
            f"{float(r.error.mean()):.4f}", f"{float(r.error.max()):.4f}",
        ])
    searched = [r for r in results if not r.window]
    heads = sum(r.num_heads for r in searched)
    dense = sum(int((~r.is_sparse).sum()) for r in searched)
    windows = len(results) - len(searched)
    window = f"; {windows} sliding-window layers dense, not searched" if windows else ""
    floored = [str(i) for i, r in enumerate(results) if r.floored]
    if floored:
        window += (f"; layer{'s' * (len(floored) > 1)} {', '.join(floored)} dense (below "
                   "--layer-sparsity-floor)")
    footer = (f"overall mean sparsity {overall_sparsity(results):.1%} over {heads} "
              f"{'full-attention ' if windows else ''}heads; {dense} of them dense{window} "
              f"(error rule: {results[0].rule})")
    return header, rows, footer


def format_quality(rows: Sequence[QualityRow]) -> tuple[list[str], list[list[str]], str]:
    header = ["setting", "sparsity", "ppl (sparse)", "ppl (dense)", "worst prompt", "mean |dlogp|",
              "max |dlogp|", "mean KL"]
    body = [[r.name, f"{r.sparsity:.1%}", f"{r.perplexity:.4f}", f"{r.dense_perplexity:.4f}",
             f"{r.worst_rise:+.2%}", f"{r.mean_abs_logprob_diff:.2e}",
             f"{r.max_abs_logprob_diff:.2e}", f"{r.mean_kl:.2e}"] for r in rows]
    tokens = rows[0].tokens if rows else 0
    return header, body, f"held-out quality over {tokens} predicted tokens"


def print_table(title: str, header: list[str], rows: list[list[str]], footer: str, file=None) -> None:
    """Print with ``rich`` when installed, else as aligned plain text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None  # noqa: N806
    if Console is not None:
        table = Table(title=title, caption=footer)
        for h in header:
            table.add_column(h, justify="left" if h == "setting" else "right", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        console = Console(file=file)
        if not console.is_terminal:
            console = Console(file=file, width=200)  # NOTE: logs and pipes: never truncate cells
        console.print(table)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append(footer)
    print("\n".join(lines), file=file)


def plot_heatmap(results: Sequence[LayerResult], path: str, title: str) -> None:
    """PNG heatmap of block sparsity per (layer, head), written to ``path`` whatever its name ends
    with; dense heads marked with a red dot, sliding-window layers (dense, not searched) with a
    grey cross."""
    import matplotlib

    matplotlib.use("Agg")  # NOTE: headless; the CLI never opens a window
    import matplotlib.pyplot as plt

    sp = torch.stack([r.sparsity for r in results]).numpy()
    window = torch.tensor([r.window for r in results])[:, None]
    dense = torch.stack([~r.is_sparse for r in results])
    dense, windowed = (dense & ~window).numpy(), (dense & window).numpy()
    num_layers, num_heads = sp.shape
    # NOTE: at least 5 inches wide so that a few heads (Gemma 3 270M has 4) leave room for the
    # title, wrapped to the width, and the legend, below the axes (never over the first rows)
    width = max(5.0, min(2 + 0.3 * num_heads, 20))
    fig, ax = plt.subplots(figsize=(width, min(2.5 + 0.25 * num_layers, 16)))
    try:
        im = ax.imshow(sp, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                       interpolation="nearest")
        for mask, style in ((dense, dict(c="red", marker="o", label="dense head")),
                            (windowed, dict(c="grey", marker="x", label="sliding window (dense)"))):
            ys, xs = mask.nonzero()
            if len(xs):
                ax.scatter(xs, ys, s=8, **style)
        if dense.any() or windowed.any():
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize="small",
                      frameon=False)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_title(textwrap.fill(title, int(width * 11)), fontsize="small")
        fig.colorbar(im, ax=ax, label="block sparsity")
        fig.tight_layout()
        # NOTE: the Software chunk is how a later run recognises a heatmap it may replace
        fig.savefig(path, dpi=120, format="png", metadata={"Software": HEATMAP_SOFTWARE})
    finally:
        plt.close(fig)
