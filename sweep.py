"""
Threshold sweep of a trained checkpoint: seed 002's table, its analysis, the oracle frontier, a plot.

Tiny CPU run (seconds, after `python train.py --data ../shared/data/wikitext-2` has written ckpt.pt):
    python sweep.py ckpt.pt
Other confidence measures, true early exit beside masked, files to keep:
    python sweep.py ckpt.pt --confidence softmax margin entropy --mode both
    python sweep.py ckpt.pt --thresholds 0.5,0.8,0.9,0.95,0.99 --csv s.csv --json s.json --plot s.png
Bigger, on a GPU, the whole test split:
    python sweep.py ckpt.pt --device cuda --split test --val-chars 0 --eval-batch-size 256

In masked mode every row is read from one forward pass (measure.token_stats: per-token CE at each
head, per-token confidences), so a sweep costs about one evaluation. The oracle frontier is the best
any router could do with this model: with hindsight of each token's losses (the Depth-Adaptive
Transformer's oracle [2]), send deep exactly the tokens that gain most from depth.

References
[1] seeds/002: the threshold sweep this reproduces (DEED, Tang et al. 2023, arXiv:2311.08623)
[2] Elbayad et al. 2020, Depth-Adaptive Transformer (oracle exit). arXiv:1910.10073
[3] Schuster et al. 2022, CALM (softmax response, top-2 margin, entropy confidences). arXiv:2207.07061
"""

import csv
import json
import time

import checkpoint as ck
import cli
import eemini as ee
import measure
from data import eval_ids
from report import ascii_plot, fmt_t, save_png

DEFAULT_THRESHOLDS = [i / 10 for i in range(11)]
MARKERS = "*+x#@%"  # ASCII plot: one a curve; "." is the oracle frontier


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    cli.add_checkpoint(p)
    g = p.add_argument_group("sweep")
    g.add_argument("--thresholds", type=cli.comma_list(cli.threshold), default=DEFAULT_THRESHOLDS,
                   help="thresholds to sweep, comma list in [0, 1]")
    g.add_argument("--confidence", nargs="+", default=["softmax"], choices=sorted(ee.CONFIDENCE),
                   help="confidence measure(s): max softmax, top-2 margin, negative entropy (one curve each)")
    g.add_argument("--mode", default="masked", choices=["masked", "exit", "both"], help="masked routing "
                   "(one pass in all), true early exit (one pass a threshold), or both side by side")
    g.add_argument("--max-ppl-increase", type=cli.number(float, 0.0), default=1.0,
                   help="PPL budget in %% over full depth for 'most compute saved'")
    cli.add_data(p, from_checkpoint=True)
    g = p.add_argument_group("eval / io")
    cli.add_eval_batch_size(g)
    cli.add_device(g)
    g.add_argument("--csv", default="", help="write the rows to this CSV file")
    g.add_argument("--json", default="", help="write rows, oracle frontier and provenance to this JSON file")
    g.add_argument("--plot", default="", help="draw PPL against Compute to this PNG (needs matplotlib)")
    args = p.parse_args(argv)
    if not args.thresholds:
        p.error("--thresholds is empty; give at least one threshold in [0, 1]")
    args.thresholds = sorted(set(args.thresholds))
    args.confidence = list(dict.fromkeys(args.confidence))
    return args


def describe(ckpt, path):
    """One line naming the checkpoint: step, layers, exits and the loss weights it was trained with."""
    cfg = ckpt["config"]
    weights = ", ".join(f"L{k}={w:g}" for k, w in cfg["loss_weights"].items())
    return (f"checkpoint {path}: step {ckpt.get('step', '?')}, {cfg['n_layer']} layers, exit after layer "
            f"{','.join(map(str, cfg['exits']))}, loss weights {weights}")


def check_exit_trained(cfg, path):
    """A plain model, or one whose exit head got no loss (--loss final), has nothing to sweep."""
    if not cfg.exits:
        raise ee.EEminiError(f"{path} is a plain model without an exit point, so there is nothing to sweep; "
                             f"train with --exit-layers 1 --loss asym")
    if cfg.trained_exits != cfg.exits:
        raise ee.EEminiError(f"{path} was trained with loss weights {cfg.loss_weights}: its exit head (after layer "
                             f"{cfg.exits[0]}) was never trained, so there is nothing to sweep; train with --loss asym")


# ----------------------------------------------------------------------------------------------
# output: the table, the analysis, an ASCII plot, CSV / JSON / PNG


def print_table(rows, mode, conf):
    exit_col = mode == "both"
    print(f"\n## Threshold sweep ({conf} confidence, {'true early exit' if mode == 'exit' else 'masked'})\n")
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


def print_plot(series, oracle):
    plot = [(".", [(o["compute"], o["ppl"]) for o in oracle])] + [(m, p) for m, (_, p) in zip(MARKERS, series)]
    print("\n## PPL against Compute\n\n```\n" + "\n".join(ascii_plot(plot)))
    legend = [f"{m} {label}" for m, (label, _) in zip(MARKERS, series)] + [". oracle frontier"]
    print("   " + ("   " if len(legend) < 4 else "\n   ").join(legend) + "\n```")


def write_files(args, result, series):
    if args.csv:
        with ck.atomic_write(args.csv, newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(result["rows"][0]))
            w.writeheader()
            w.writerows(result["rows"])
    if args.json:
        ck.write_text(args.json, json.dumps(result, indent=1))
    if args.plot:
        save_png(args.plot, series, [(o["compute"], o["ppl"]) for o in result["oracle"]])


# ----------------------------------------------------------------------------------------------


def run_sweep(model, ids, args, device):
    """token_stats once, every masked row from it; in exit / both mode, one true-exit pass a row.
    Returns the statistics, the rows and the oracle."""
    t0, cfg = time.time(), model.config
    with cli.autocast(device):
        stats = measure.token_stats(model, ids, args.eval_batch_size, device)
    oracle = measure.Oracle(stats, cfg)
    rows = measure.masked_sweep(stats, cfg, args.thresholds, args.confidence, oracle)
    full = measure.ppl(stats["ce"][cfg.n_layer])
    print(f"masked: one pass over {len(stats['ce'][cfg.n_layer]):,} tokens, {len(rows)} rows read from it, "
          f"{time.time() - t0:.2f} s")
    if args.mode != "masked":
        t0 = time.time()
        for r in rows:
            with cli.autocast(device):
                e = measure.exit_metrics(model, ids, r["threshold"], args.eval_batch_size, device, r["confidence"])
            if args.mode == "both":
                r["exit_ppl"] = e["ppl"]
            else:  # the true-exit figures replace the masked ones; the oracle stays the masked one
                r.update(e, delta_ppl=100.0 * (e["ppl"] / full - 1))
        print(f"true early exit: {len(rows)} passes, {time.time() - t0:.2f} s")
    return stats, rows, oracle


def main(args):
    device = cli.pick_device(args.device, args.threads)
    ckpt = ck.load_checkpoint(args.checkpoint, device)
    model, vocab = ck.model_from_checkpoint(ckpt, device)
    cfg = model.config
    check_exit_trained(cfg, args.checkpoint)
    print(describe(ckpt, args.checkpoint) + f" | device {device}")
    trained = ckpt.get("args") or {}
    ids, source = eval_ids(args.data if args.data is not None else trained.get("data", ""), args.split,
                           args.val_chars if args.val_chars is not None else trained.get("val_chars", 50_000), vocab)
    stats, rows, oracle = run_sweep(model, ids, args, device)
    full = measure.ppl(stats["ce"][cfg.n_layer])
    exits = " | ".join(f"exit only ({k}L) PPL {measure.ppl(stats['ce'][k]):.3f}" for k in cfg.exits)
    print(f"full depth ({cfg.n_layer}L) PPL {full:.3f} | {exits} | best oracle PPL {oracle.ce.min().exp().item():.3f}")

    analysis, series = {}, []
    for m in args.confidence:
        mine = [r for r in rows if r["confidence"] == m]
        print_table(mine, args.mode, m)
        analysis[m] = measure.analyse(mine, full, args.max_ppl_increase, oracle)
        print_analysis(analysis[m], args.max_ppl_increase)
        series.append((f"{m} ({'true exit' if args.mode == 'exit' else 'masked'})", [(r["compute"], r["ppl"]) for r in mine]))
        if args.mode == "both":
            series.append((f"{m} (true exit)", [(r["compute"], r["exit_ppl"]) for r in mine]))
    frontier = oracle.frontier()
    print_plot(series, frontier)

    result = {"checkpoint": str(args.checkpoint), "data": source, "split": args.split,
              "tokens": len(stats["ce"][cfg.n_layer]), "mode": args.mode, "full_depth_ppl": full,
              "max_ppl_increase": args.max_ppl_increase, "rows": rows, "oracle": frontier,
              "analysis": {m: {k: v["threshold"] if isinstance(v, dict) else v for k, v in a.items() if v}
                           for m, a in analysis.items()}}
    write_files(args, result, series)
    return result


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
