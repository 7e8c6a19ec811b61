"""
Threshold sweep of a trained checkpoint: seed 002's table, its analysis, the oracle frontier, a plot.

Tiny CPU run (seconds, after `python train.py --data ../shared/data/wikitext-2` has written ckpt.pt):
    python sweep.py ckpt.pt
Other confidence measures, true early exit beside masked, files to keep:
    python sweep.py ckpt.pt --confidence softmax margin entropy --mode both
    python sweep.py ckpt.pt --thresholds 0.5,0.8,0.9,0.95,0.99 --csv s.csv --json s.json --plot s.png
Bigger, on a GPU, the whole test split:
    python sweep.py ckpt.pt --device cuda --split test --val-chars 0 --batch-size 256

In masked mode every row is read from one forward pass (token_stats: per-token CE at each head,
per-token confidences), so a sweep costs about one evaluation. The oracle frontier is the best any
router could do with this model: with hindsight of each token's losses (the Depth-Adaptive
Transformer's oracle [2]), send deep exactly the tokens that gain most from depth.

References
[1] seeds/002: the threshold sweep this reproduces (DEED, Tang et al. 2023, arXiv:2311.08623)
[2] Elbayad et al. 2020, Depth-Adaptive Transformer (oracle exit). arXiv:1910.10073
[3] Schuster et al. 2022, CALM (softmax response, top-2 margin, entropy confidences). arXiv:2207.07061
"""

import csv
import json
import math
import time

import torch

import eemini as ee

DEFAULT_THRESHOLDS = [i / 10 for i in range(11)]
MARKERS = "*+x#@%"  # ASCII plot: one a curve; "." is the oracle frontier


def parse_args(argv=None):
    p = ee.Parser(description=__doc__.split("\n\n")[0], formatter_class=ee.argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .pt file written by train.py")
    g = p.add_argument_group("sweep")
    g.add_argument("--thresholds", default="", help="comma list in [0, 1] (default 0.0,0.1,...,1.0)")
    g.add_argument("--confidence", nargs="+", default=["softmax"], choices=sorted(ee.CONFIDENCE),
                   help="confidence measure(s): max softmax, top-2 margin, negative entropy (one curve each)")
    g.add_argument("--mode", default="masked", choices=["masked", "exit", "both"], help="masked routing "
                   "(one pass in all), true early exit (one pass a threshold), or both side by side")
    g.add_argument("--max-ppl-increase", type=float, default=1.0, help="PPL budget in %% over full depth "
                   "for 'most compute saved'")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="WikiText folder or text file (default: the checkpoint's)")
    g.add_argument("--split", default="valid", choices=["valid", "test"], help="split to evaluate on")
    g.add_argument("--val-chars", type=int, default=None, help="characters of the split to use "
                   "(default: the checkpoint's; 0 = the whole split)")
    g = p.add_argument_group("eval / io")
    g.add_argument("--batch-size", type=int, default=64, help="windows per evaluation batch")
    g.add_argument("--device", default="", help="cuda, mps, cpu ... (empty = autodetect cuda -> mps -> cpu)")
    g.add_argument("--csv", default="", help="write the rows to this CSV file")
    g.add_argument("--json", default="", help="write rows, oracle frontier and provenance to this JSON file")
    g.add_argument("--plot", default="", help="draw PPL against Compute to this PNG (needs matplotlib)")
    args = p.parse_args(argv)
    try:
        args.thresholds = sorted({float(t) for t in args.thresholds.split(",")}) if args.thresholds \
            else DEFAULT_THRESHOLDS
    except ValueError:
        p.error(f"--thresholds wants comma-separated numbers, got '{args.thresholds}'")
    for t in args.thresholds:
        if not 0.0 <= t <= 1.0:
            p.error(f"threshold {t} is outside [0, 1]; 0 sends every token out early, 1 none")
    if args.batch_size < 1 or (args.val_chars is not None and args.val_chars < 0):
        p.error("--batch-size must be at least 1 and --val-chars at least 0")
    args.confidence = list(dict.fromkeys(args.confidence))
    return args


def check_exit_trained(ckpt, path):
    """A plain model, or one whose exit head got no loss (--loss final), has nothing to sweep."""
    why = ee.untrained_exit(ckpt)
    if why:
        raise ee.EEminiError(f"{path} {why}, so there is nothing to sweep; train with --loss asym")


# ----------------------------------------------------------------------------------------------
# the oracle frontier [2]: with hindsight, send deep the n tokens whose CE drops most with depth


def oracle_ce(stats, cfg):
    """(N+1,) mean CE of the best router sending exactly n = 0..N tokens deep (one exit point).
    Sorting the per-token gain CE_exit - CE_final and summing it gives every budget at once."""
    ce_exit, ce_final = stats["ce"][cfg.exits[0]].double(), stats["ce"][cfg.n_layer].double()
    gain = (ce_exit - ce_final).sort(descending=True).values
    return (ce_exit.sum() - torch.cat([gain.new_zeros(1), gain.cumsum(0)])) / len(gain)


def oracle_compute(n_deep, n, cfg):
    """Compute% with n_deep of n tokens through every layer and the rest leaving at the exit."""
    k, L = cfg.exits[0], cfg.n_layer
    return 100.0 * (k / L + (1 - k / L) * n_deep / n)


def masked_sweep(stats, cfg, thresholds, measures):
    """One row a (measure, threshold), all read from one token_stats pass, with the oracle's PPL
    at the row's compute (the same number of deep tokens) beside it."""
    full, orc = math.exp(stats["ce"][cfg.n_layer].double().mean().item()), oracle_ce(stats, cfg)
    rows = []
    for m in measures:
        for t in thresholds:
            r = {"confidence": m, **ee.routed_metrics(stats, t, cfg, m)}
            depth = ee.exit_depth(stats["conf"][m], t, cfg.n_layer, stats["ce"][cfg.n_layer].shape)
            n_deep = int((depth == cfg.n_layer).sum())
            r["delta_ppl"] = 100.0 * (r["ppl"] / full - 1)
            r["oracle_ppl"] = math.exp(orc[n_deep].item())
            rows.append(r)
    return rows


def analyse(rows, full, budget, orc, cfg):
    """Seed 002's analysis: best PPL, most compute saved within +budget% PPL, maximum efficiency;
    and how little compute the oracle needs within the same budget."""
    limit = full * (1 + budget / 100)
    within = [r for r in rows if r["ppl"] <= limit]
    n_ok = int((orc.exp() <= limit).nonzero()[0]) if (orc.exp() <= limit).any() else len(orc) - 1
    return {"best_ppl": min(rows, key=lambda r: r["ppl"]),
            "within_budget": min(within, key=lambda r: (r["compute"], r["ppl"])) if within else None,
            "max_efficiency": min(rows, key=lambda r: (r["compute"], r["ppl"])),
            "oracle_compute_within_budget": oracle_compute(n_ok, len(orc) - 1, cfg)}


# ----------------------------------------------------------------------------------------------
# output: the table, the analysis, an ASCII plot, CSV / JSON / PNG


def fmt_t(t):
    return f"{t:.1f}" if round(t, 1) == t else f"{t:g}"


def print_table(rows, mode, measure):
    exit_col = mode == "both"
    print(f"\n## Threshold sweep ({measure} confidence, {'true early exit' if mode == 'exit' else 'masked'})\n")
    print("| Threshold | PPL | Shallow exit | Compute | FLOPs | ΔPPL vs full depth | Oracle PPL |"
          + (" True-exit PPL |" if exit_col else ""))
    print("|---" * (7 + exit_col) + "|")
    for r in rows:
        delta = "baseline" if r["threshold"] >= 1.0 else f"{r['delta_ppl']:+.2f}%"
        print(f"| {fmt_t(r['threshold'])} | {r['ppl']:.3f} | {r['shallow']:.1f}% | {r['compute']:.1f}% | "
              f"{r['flops']:.1f}% | {delta} | {r['oracle_ppl']:.3f} |"
              + (f" {r['exit_ppl']:.3f} |" if exit_col else ""))


def print_analysis(a, budget):
    def line(r):
        return (f"threshold {fmt_t(r['threshold'])}: PPL {r['ppl']:.3f} ({r['delta_ppl']:+.2f}%), "
                f"compute {r['compute']:.1f}% ({100 - r['compute']:.1f}% saved), shallow {r['shallow']:.1f}%")
    w = a["within_budget"]
    print(f"\n{'best PPL':20} {line(a['best_ppl'])}")
    print(f"{f'within +{budget:g}% PPL':20} " + (line(w) if w else f"no threshold stays within +{budget:g}%"))
    print(f"{'maximum efficiency':20} {line(a['max_efficiency'])}")
    need = f" (the confidence router needs {w['compute']:.1f}%)" if w else ""
    low = a["oracle_compute_within_budget"]
    print(f"{'oracle frontier':20} within +{budget:g}% PPL down to compute {low:.1f}%{need}")


def ascii_plot(series, width=64, height=15):
    """Lines of a terminal scatter plot of PPL (y) against Compute% (x); series: [(marker, [(x, y)])],
    later series drawn on top."""
    xs, ys = [x for _, s in series for x, _ in s], [y for _, s in series for _, y in s]
    x0, y0, y1 = min(xs), min(ys), max(ys)
    col = lambda x: round((x - x0) / max(100 - x0, 1e-9) * (width - 1))  # noqa: E731
    row = lambda y: round((y1 - y) / max(y1 - y0, 1e-9) * (height - 1))  # noqa: E731
    grid = [[" "] * width for _ in range(height)]
    for marker, s in series:
        for x, y in s:
            grid[row(y)][col(x)] = marker
    axis = [f"{y1 - i * (y1 - y0) / (height - 1):9.3f} |" if i % 2 == 0 else f"{'|':>11}" for i in range(height)]
    lines = ["   PPL", *[(a + "".join(g)).rstrip() for a, g in zip(axis, grid)], " " * 10 + "+" + "-" * width]
    ticks = [" "] * (width + 4)
    for v in [x0] + [v for v in range(10, 101, 10) if v - x0 >= 6]:
        ticks[col(v) : col(v) + len(f"{v:.0f}")] = f"{v:.0f}"
    return lines + [(" " * 11 + "".join(ticks)).rstrip(), " " * (11 + width // 2 - 6) + "Compute (%)"]


def save_png(path, series, oracle_pts):
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed; `pip install matplotlib` to draw it")
        return
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(*zip(*oracle_pts), "k--", lw=1, label="oracle frontier")
    for label, pts in series:
        ax.plot(*zip(*pts), "o-", ms=4, label=label)
    ax.set(xlabel="Compute (%)", ylabel="PPL", title="PPL against compute, per threshold")
    ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"plot: {path}")


# ----------------------------------------------------------------------------------------------


def eval_ids(args, ckpt, vocab):
    """The text to sweep, in the checkpoint's vocab: --data / --val-chars, else those it was trained on."""
    trained = ckpt.get("args") or {}
    val_chars = args.val_chars if args.val_chars is not None else trained.get("val_chars", 50_000)
    text, source = ee.read_split(args.data if args.data is not None else trained.get("data", ""), args.split)
    text = text[:val_chars] if val_chars else text
    print(f"data: {len(text):,} chars of {source} | vocab {len(vocab)} from the checkpoint | "
          f"{sum(ch not in vocab.stoi for ch in text)} chars unseen in training -> unknown id")
    return vocab.encode(text), source


def run_sweep(model, ids, args, device):
    """token_stats once, every masked row from it; in exit / both mode, one true-exit pass a row."""
    t0, cfg = time.time(), model.config
    with ee.autocast(device):
        stats = ee.token_stats(model, ids, args.batch_size, device)
    rows = masked_sweep(stats, cfg, args.thresholds, args.confidence)
    full = math.exp(stats["ce"][cfg.n_layer].double().mean().item())
    n_tok = len(stats["ce"][cfg.n_layer])
    print(f"masked: one pass over {n_tok:,} tokens, {len(rows)} rows read from it, {time.time() - t0:.2f} s")
    if args.mode != "masked":
        t0 = time.time()
        for r in rows:
            with ee.autocast(device):
                e = ee.exit_metrics(model, ids, r["threshold"], args.batch_size, device, r["confidence"])
            if args.mode == "both":
                r["exit_ppl"] = e["ppl"]
            else:  # the true-exit figures replace the masked ones; the oracle stays the masked one
                r.update(e, delta_ppl=100.0 * (e["ppl"] / full - 1))
        print(f"true early exit: {len(rows)} passes, {time.time() - t0:.2f} s")
    return stats, rows, full


def write_files(args, result, series):
    if args.csv:
        with ee.atomic_write(args.csv, newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(result["rows"][0]))
            w.writeheader()
            w.writerows(result["rows"])
    if args.json:
        with ee.atomic_write(args.json) as f:
            json.dump(result, f, indent=1)
    if args.plot:
        save_png(args.plot, series, [(o["compute"], o["ppl"]) for o in result["oracle"]])


def main(args):
    device = ee.pick_device(args.device)
    ckpt = ee.load_checkpoint(args.checkpoint, device)
    check_exit_trained(ckpt, args.checkpoint)
    model, vocab = ee.model_from_checkpoint(ckpt, device)
    cfg = model.config
    print(f"checkpoint {args.checkpoint}: step {ckpt.get('step', '?')}, {cfg.n_layer} layers, exit after layer "
          f"{cfg.exit_layer}, loss {(ckpt.get('args') or {}).get('loss', '?')} | device {device}")
    ids, source = eval_ids(args, ckpt, vocab)
    stats, rows, full = run_sweep(model, ids, args, device)
    orc, n_tok = oracle_ce(stats, cfg), len(stats["ce"][cfg.n_layer])
    print(f"full depth ({cfg.n_layer}L) PPL {full:.3f} | exit only ({cfg.exit_layer}L) PPL "
          f"{math.exp(orc[0]):.3f} | best oracle PPL {math.exp(orc.min()):.3f}")

    analysis, series = {}, []
    for m in args.confidence:
        mine = [r for r in rows if r["confidence"] == m]
        print_table(mine, args.mode, m)
        analysis[m] = analyse(mine, full, args.max_ppl_increase, orc, cfg)
        print_analysis(analysis[m], args.max_ppl_increase)
        mode = "true exit" if args.mode == "exit" else "masked"
        series.append((f"{m} ({mode})", [(r["compute"], r["ppl"]) for r in mine]))
        if args.mode == "both":
            series.append((f"{m} (true exit)", [(r["compute"], r["exit_ppl"]) for r in mine]))
    grid = [round(n_tok * j / 100) for j in range(101)]  # every 1% of the tokens sent deep
    oracle = [{"compute": oracle_compute(n, n_tok, cfg), "ppl": math.exp(orc[n].item())} for n in grid]
    plot = [(".", [(o["compute"], o["ppl"]) for o in oracle])] + [(m, p) for m, (_, p) in zip(MARKERS, series)]
    print("\n## PPL against Compute\n\n```\n" + "\n".join(ascii_plot(plot)))
    legend = [f"{m} {label}" for m, (label, _) in zip(MARKERS, series)] + [". oracle frontier"]
    print("   " + ("   " if len(legend) < 4 else "\n   ").join(legend) + "\n```")

    result = {"checkpoint": str(args.checkpoint), "data": source, "split": args.split, "tokens": n_tok,
              "mode": args.mode, "full_depth_ppl": full, "max_ppl_increase": args.max_ppl_increase,
              "rows": rows, "oracle": oracle,
              "analysis": {m: {k: v["threshold"] if isinstance(v, dict) else v for k, v in a.items() if v}
                           for m, a in analysis.items()}}
    write_files(args, result, series)
    return result


if __name__ == "__main__":
    ee.run_cli(main, parse_args)
