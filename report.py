"""
Reporting: Markdown tables, the terminal plot of PPL against compute, the optional PNG, and what
the scripts print with them: seed 000's tables at the end of train.py, sweep.py's table, analysis,
oracle shares, plot and files, and its --windows, --details and --calibrate sections.
"""

import csv
import json
import math

import torch

import measure
import uncertainty as un
from checkpoint import atomic_write, write_text
from data import eval_ids


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


def can_draw():
    """Whether matplotlib is there for save_png (sweep.py asks before any work)."""
    try:
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        return False
    return True


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
    print("FLOPs% = forward FLOPs under true early exit vs a plain GPT with one head (counts exit heads, learned routers, and "
          "exited tokens' K/V where later tokens need it)")


# ----------------------------------------------------------------------------------------------
# sweep.py's output: the table, the analysis, the oracle shares, an ASCII plot, CSV / JSON / PNG


def interval(lo, hi, digits):
    return f" [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def sweep_table(rows, mode, conf):
    exit_col = mode == "both"
    print(f"\n## Threshold sweep ({conf} confidence, {'true early exit' if mode == 'exit' else 'masked'})\n")
    ci = " [95% CI]" if any("delta_lo" in r for r in rows) else ""  # none with --resamples 0 or --mode exit
    print(f"| Threshold | PPL | Shallow exit | Compute | FLOPs | ΔPPL vs full depth{ci} | Oracle PPL |"
          + (" True-exit PPL |" if exit_col else ""))
    print("|---" * (7 + exit_col) + "|")
    for r in rows:
        ci = interval(r["delta_lo"], r["delta_hi"], 2) if "delta_lo" in r else ""
        delta = "baseline" if r["threshold"] >= 1.0 else f"{r['delta_ppl']:+.2f}%{ci}"
        print(f"| {fmt_t(r['threshold'])} | {r['ppl']:.3f} | {r['shallow']:.1f}% | {r['compute']:.1f}% | "
              f"{r['flops']:.1f}% | {delta} | {r['oracle_ppl']:.3f} |" + (f" {r['exit_ppl']:.3f} |" if exit_col else ""))


def sweep_analysis(a, budget):
    def line(r):
        return (f"threshold {fmt_t(r['threshold'])}: PPL {r['ppl']:.3f} ({r['delta_ppl']:+.2f}%), "
                f"compute {r['compute']:.1f}% ({100 - r['compute']:.1f}% saved), shallow {r['shallow']:.1f}%")
    w = a["within_budget"]
    print(f"\n{'best PPL':20} {line(a['best_ppl'])}")
    print(f"{f'within +{budget:g}% PPL':20} " + (line(w) if w else f"no threshold stays within +{budget:g}%"))
    print(f"{'maximum efficiency':20} {line(a['max_efficiency'])}")
    need = f" (this measure needs {w['compute']:.1f}%)" if w else ""
    low = a["oracle_compute_within_budget"]
    print(f"{'oracle frontier':20} within +{budget:g}% PPL down to compute {low:.1f}%{need}")


def oracle_shares(fractions, budgets, ceiling):
    """Per measure: the compute it saves within each budget, the oracle's, and its share of it."""
    head = [f"{h} (+{b:g}%)" for b in budgets for h in ("saved", "oracle saves", "share")]
    print("\n## Against the oracle: compute saved within +1% and +2% PPL (masked, thresholds every 0.005)\n\n" + "\n".join(md(["Measure", *head], [
        [m, *(f"{x:.1f}%" if i % 3 < 2 else f"{100 * x:.0f}%" for i, x in enumerate(v))] for m, v in fractions.items()])[:-1]))
    print(f"\n{ceiling}: a character leaves where the exit's expected extra loss, KL(last layer || exit), is small;\n"
          f"it runs every layer to know that: a reference, not a router, for what predicting that cost exactly would reach")


MARKERS = "*+x#@%&o=~"  # ASCII plot: one a curve (all the measures and routers there are); "." is the oracle


def frontier_plot(series, oracle, title="PPL against Compute"):
    plot = [(".", [(o["compute"], o["ppl"]) for o in oracle])] + [(m, p) for m, (_, p) in zip(MARKERS, series)]
    print(f"\n## {title}\n\n" + "\n".join(ascii_plot(plot)))
    legend = [f"{m} {label}" for m, (label, _) in zip(MARKERS, series)] + [". oracle frontier"]
    print("   " + ("   " if len(legend) < 4 else "\n   ").join(legend))
    if len(series) > len(MARKERS):  # said, not dropped without a word: the tables above have them all
        print(f"   (not drawn, no symbol left: {', '.join(label for label, _ in series[len(MARKERS):])})")


def sweep_files(args, result, series):
    if args.csv:
        with atomic_write(args.csv, newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(result["rows"][0]))
            w.writeheader()
            w.writerows(result["rows"])
    if args.json:
        write_text(args.json, json.dumps(result, indent=1))
    if args.plot:
        save_png(args.plot, series, [(o["compute"], o["ppl"]) for o in result["oracle"]])


# sweep.py --windows, --details and --calibrate


def windows_section(stats, cfg, args, series):
    """Token- against window-level routing, each beside its own oracle (one exit)."""
    m = args.measures[0]
    rows = {how: measure.window_rows(stats, cfg, args.thresholds, m, how) for how in ("mean", "min")}
    full = measure.ppl(stats["ce"][cfg.n_layer])
    print(f"\n## Windows leaving as a whole ({m} confidence, masked)\n")
    print("\n".join(md(["Routing", "Threshold", "PPL", "ΔPPL", "Compute"], [
        [r["confidence"], fmt_t(r["threshold"]), f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / full - 1):+.2f}%",
         f"{r['compute']:.1f}%"] for how in rows for r in rows[how]])))
    window_oracle = measure.window_oracle(stats, cfg)
    plot = [(".", [(o["compute"], o["ppl"]) for o in measure.Oracle(stats, cfg).frontier()]),
            ("o", [(o["compute"], o["ppl"]) for o in window_oracle[:: max(1, len(window_oracle) // 100)]]),
            ("*", series[0][1]), *((mk, [(r["compute"], r["ppl"]) for r in rows[how]]) for mk, how in (("+", "mean"), ("x", "min")))]
    print("\n## Token- and window-level routing\n\n" + "\n".join(ascii_plot(plot)))
    print(f"   * {m} per character   + window mean   x window min\n   . oracle per character   o oracle per window")


def details_section(stats, cfg, args, vocab):
    """Calibration of each exit's max softmax, and where exits go by character class."""
    for k in cfg.exits:
        ece, rows = un.reliability(stats["conf"]["softmax"][k], stats["top"][k] == stats["target"])
        print(f"\n## Calibration of the exit after layer {k} (max softmax): ECE {100 * ece:.2f}%\n")
        print("\n".join(md(["Confidence", "Characters", "Mean confidence", "Accuracy"], [
            [f"{lo:.1f}-{hi:.1f}", f"{n:,}", f"{mc:.3f}", f"{acc:.3f}"] for lo, hi, n, mc, acc in rows])))
    threshold = args.thresholds[len(args.thresholds) // 2]
    depth = measure.routed_depth(stats, threshold, cfg, args.measures[0])
    previous = stats["target"].roll(1)
    previous[:: stats["window"]] = 0  # the first of a window has no known input here; counted as unknown
    cls, names = measure.char_class(stats["target"], vocab.itos, previous)
    print(f"\n## Where exits go ({args.measures[0]} at threshold {fmt_t(threshold)}, masked)\n")
    print("\n".join(md(["Next character", "Share", "Exited", "Full-depth PPL", "Routed PPL", "Share of the cost"], [
        [r["class"], f"{r['share']:.1f}%", f"{r['exited']:.1f}%", f"{r['full_ppl']:.3f}", f"{r['routed_ppl']:.3f}",
         f"{r['cost_share']:.1f}%"] for r in measure.class_table(stats, cfg, depth, cls, names)])))


def calibrate_section(model, vocab, data, args, device, routers):
    """Learn then Test, as CALM uses it, for each --calibrate budget: the lowest threshold whose risk
    stays within budget with probability >= 1 - delta over the valid windows, then that threshold on test."""
    cfg = model.config
    splits = {s: measure.token_stats(model, eval_ids(data, s, args.calibrate_chars, vocab)[0], args.eval_batch_size,
                                     device, routers, args.stride) for s in ("valid", "test")}
    T = splits["valid"]["window"]
    grid = [1 - i / 100 for i in range(101)]  # from 1.0 (no exit: no risk at all, so no test) down by 0.01
    print(f"\n## Thresholds with a guarantee ({args.risk}, delta {args.delta:g}): chosen on valid, shown on test\n")
    print(f"With probability at least {1 - args.delta:g} over the {len(splits['valid']['target']) // T:,} valid windows "
          f"(assumed drawn like the test ones), the chosen threshold's expected " + (
              "PPL increase over full depth (per window, in log space; window means clipped to +-2 nats)"
              if args.risk == "ppl" else "share of characters whose top prediction differs from full depth's")
          + " is within the budget.\n")
    head = ["Measure", "Budget", "Threshold", "valid: risk", "test: risk", "test: PPL", "test: compute saved", "holds on test"]
    rows = []
    for m in args.measures:
        risk = {s: [measure.window_risk(st, cfg, t, m, args.risk) for t in grid] for s, st in splits.items()}
        for budget in args.calibrate:
            if args.risk == "ppl":  # window mean extra CE in [-2, 2] nats, mapped onto [0, 1]
                limit, unit, bound = math.log1p(budget / 100), lambda d: (d.clamp(-2, 2) + 2) / 4, "bernstein"
            else:
                limit, unit, bound = budget / 100, lambda d: d, "hb"
            chosen, _ = un.learn_then_test([(t, unit(r)) for t, r in zip(grid[1:], risk["valid"][1:])],
                                           unit(torch.tensor(limit)).item(), args.delta, bound)
            chosen = 1.0 if chosen is None else chosen  # nothing certified: never exit
            i = grid.index(chosen)
            shown = {s: show_risk(risk[s][i], args.risk) for s in splits}
            test = measure.routed_metrics(splits["test"], chosen, cfg, m)
            holds = risk["test"][i].mean().item() <= limit
            rows.append([m, f"{budget:g}%", fmt_t(chosen), shown["valid"], shown["test"], f"{test['ppl']:.3f}",
                         f"{100 - test['compute']:.1f}%", "yes" if holds else "NO"])
    print("\n".join(md(head, rows)))
    return rows


def show_risk(r, kind):
    return f"{100 * math.expm1(r.mean().item()):+.2f}% PPL" if kind == "ppl" else f"{100 * r.mean().item():.2f}%"
