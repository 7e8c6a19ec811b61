"""
Reporting: Markdown tables (seed 000's, which train.py prints at the end), the terminal plot of PPL
against compute, and the optional PNG.
"""

from checkpoint import atomic_write


def md(header, rows):
    """Lines of a Markdown table (and a blank line after it)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows), ""]


def fmt_t(t):
    """A threshold as the tables write it: 0.5 -> '0.5', 0.95 -> '0.95', 1 -> '1.0'."""
    return f"{t:.1f}" if round(t, 1) == t else f"{t:g}"


def ascii_plot(series, width=64, height=15, x_max=100, xlabel="Compute (%)", ylabel="PPL"):
    """Lines of a terminal scatter plot of y against x from the smallest x to x_max; series:
    [(marker, [(x, y)])], later series drawn on top."""
    xs, ys = [x for _, s in series for x, _ in s], [y for _, s in series for _, y in s]
    x0, y0, y1 = min(xs), min(ys), max(ys)
    col = lambda x: round((x - x0) / max(x_max - x0, 1e-9) * (width - 1))  # noqa: E731
    row = lambda y: round((y1 - y) / max(y1 - y0, 1e-9) * (height - 1))  # noqa: E731
    grid = [[" "] * width for _ in range(height)]
    for marker, s in series:
        for x, y in s:
            grid[row(y)][col(x)] = marker
    axis = [f"{y1 - i * (y1 - y0) / (height - 1):9.3f} |" if i % 2 == 0 else f"{'|':>11}" for i in range(height)]
    lines = [f"   {ylabel}", *[(a + "".join(g)).rstrip() for a, g in zip(axis, grid)], " " * 10 + "+" + "-" * width]
    step = x_max / 10
    ticks = [" "] * (width + 8)
    for v in [x0] + [step * i for i in range(1, 11) if step * i - x0 >= 0.06 * (x_max - x0)]:
        ticks[col(v) : col(v) + len(f"{v:.0f}")] = f"{v:.0f}"
    return lines + [(" " * 11 + "".join(ticks)).rstrip(), " " * (11 + width // 2 - len(xlabel) // 2) + xlabel]


def save_png(path, series, oracle_pts, title="PPL against compute, per threshold"):
    """PPL against Compute% to a PNG: each (label, [(x, y)]) series and the oracle frontier.
    Needs matplotlib; without it, says how to get it and draws nothing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"plot {path}: matplotlib is not installed; `pip install matplotlib` to draw it")
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(*zip(*oracle_pts), "k--", lw=1, label="oracle frontier")
    for label, pts in series:
        ax.plot(*zip(*pts), "o-", ms=4, label=label)
    ax.set(xlabel="Compute (%)", ylabel="PPL", title=title)
    ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    print(f"plot: {path}")
    return True


def seed_tables(layers, rows, full, shallow, exit_row, cfg):
    """Seed 000's Results and Threshold Analysis tables, measured on this run's model."""
    L, k, tau = cfg.n_layer, cfg.exits[0] if cfg.exits else 0, exit_row["threshold"]
    print(f"\n## Results (validation, masked routing at threshold {tau})\n")
    print("| Model | PPL | Shallow% | Compute% | FLOPs% |\n|---|---|---|---|---|")
    named = [(f"Early exit (threshold {tau})", exit_row), (f"Full depth ({L}L)", full), (f"Exit only ({k}L)", shallow)]
    for name, r in named if k else named[1:2]:  # a plain model (no exit) has one row
        print(f"| {name} | {r['ppl']:.3f} | {r['shallow']:.1f}% | {r['compute']:.1f}% | {r['flops']:.1f}% |")
    if not k:
        return
    print("\n## Threshold Analysis\n")
    print("| Threshold | PPL | Shallow% | Compute% | FLOPs% |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threshold']:.2f} | {r['ppl']:.3f} | {r['shallow']:.1f}% | {r['compute']:.1f}% | {r['flops']:.1f}% |")
    print("\nper-layer val PPL: " + "  ".join(f"L{k} {p:.3f}" for k, p in layers.items()))
    print("FLOPs% = forward FLOPs under true early exit vs a plain GPT with one head (counts exit heads, and "
          "exited tokens' K/V where later tokens need it)")
