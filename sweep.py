"""
Threshold sweep of a trained checkpoint: seed 002's table with bootstrap intervals, its analysis, the
oracle frontier and the share of it each confidence measure reaches, a plot; on request, a threshold
chosen with a guarantee, window-level routing, calibration and where exits go.

Tiny CPU run (seconds, after `python train.py --data ../shared/data/wikitext-2` has written ckpt.pt):
    python sweep.py ckpt.pt
Every measure (learned routers too, when the checkpoint has them), true early exit beside masked:
    python sweep.py ckpt.pt --confidence all --mode both
A threshold whose PPL cost stays within 1% (or 2%) with 90% confidence, chosen on valid, shown on test:
    python sweep.py ckpt.pt --calibrate 1,2 --delta 0.1
Windows leaving as a whole, calibration and character classes, files to keep:
    python sweep.py ckpt.pt --windows --details --csv s.csv --json s.json --plot s.png

In masked mode every row is read from one forward pass (measure.token_stats: per-token CE at each
head, per-token confidences), so a sweep costs about one evaluation. The oracle frontier is the best
any router could do with this model: with hindsight of each token's losses (the Depth-Adaptive
Transformer's oracle [2]), send deep exactly the tokens that gain most from depth.

References
[1] seeds/002: the threshold sweep this reproduces (DEED, Tang et al. 2023, arXiv:2311.08623)
[2] Elbayad et al. 2020, Depth-Adaptive Transformer (oracle exit). arXiv:1910.10073
[3] Schuster et al. 2022, CALM (confidence measures, learned routers, Learn then Test). arXiv:2207.07061
"""

import time
from pathlib import Path

import checkpoint as ck
import cli
import eemini as ee
import measure
import report
import routers as learned
import uncertainty as un
from data import read_split

DEFAULT_THRESHOLDS = [i / 10 for i in range(11)]
BUDGETS = (1.0, 2.0)  # the PPL budgets (% over full depth) at which each measure is held against the oracle
CEILING = "ceiling: KL to the last layer"  # not a measure: it needs every layer (measure.ceiling_sweep)


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    cli.add_checkpoint(p)
    g = p.add_argument_group("sweep")
    g.add_argument("--thresholds", type=cli.comma_list(cli.threshold), default=DEFAULT_THRESHOLDS,
                   help="thresholds to sweep, comma list in [0, 1]")
    g.add_argument("--confidence", nargs="+", default=["softmax"], help="confidence measure(s), one curve each: "
                   f"{', '.join(ee.CONFIDENCE)}, router-kl, router-gain, router-loss, router-consistency (learned, if the checkpoint "
                   "has them), or all")
    g.add_argument("--mode", default="masked", choices=["masked", "exit", "both"], help="masked routing "
                   "(one pass in all), true early exit (one pass a threshold), or both side by side")
    g.add_argument("--max-ppl-increase", type=cli.number(float, 0.0), default=1.0,
                   help="PPL budget in %% over full depth for 'most compute saved'")
    g.add_argument("--stride", type=cli.number(int, 0), default=0, help="evaluation windows: 0 = side by side (every "
                   "character scored, a window's first ones with little context); N = overlapping, moving on by N, "
                   "only each window's last N characters scored (all with >= block_size - N of context)")
    g = p.add_argument_group("guarantees and details")
    g.add_argument("--calibrate", type=cli.comma_list(cli.number(float, 0.0)), default=[],
                   help="PPL budgets in %% (or, with --risk consistency, shares of changed characters in %%): "
                   "choose each one's threshold on valid by Learn then Test, then show it on test")
    g.add_argument("--risk", default="ppl", choices=["ppl", "consistency"], help="what --calibrate bounds")
    g.add_argument("--delta", type=cli.number(float, 0.0, 1.0, hi_open=True), default=0.1,
                   help="the guarantee holds with probability 1 - delta")
    g.add_argument("--calibrate-chars", type=cli.number(int, 0), default=0, help="characters of valid to choose on "
                   "and of test to show on (0 = the whole splits)")
    g.add_argument("--windows", action="store_true", help="also route whole windows by mean / min confidence")
    g.add_argument("--details", action="store_true", help="calibration of each exit and exits per character class")
    g.add_argument("--resamples", type=cli.number(int, 0), default=1000, help="bootstrap resamples for the "
                   "intervals (0 = none)")
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
    if args.delta == 0:
        p.error("--delta 0 asks for certainty, which no finite text gives (no threshold would pass); give e.g. 0.1")
    for m in args.confidence:
        if m.endswith(".pt"):  # --confidence takes every word after it
            p.error(f"--confidence {' '.join(args.confidence)}: {m} is a checkpoint, not a measure; give the "
                    f"checkpoint first: sweep.py {m} --confidence ...")
    return args


def check_request(args, cfg, data):
    """What would fail only after the evaluation, refused before it."""
    if args.stride >= cfg.block_size:
        raise ee.EEminiError(f"--stride {args.stride} is not below the model's context ({cfg.block_size}); "
                             f"0 reads windows side by side")
    if args.calibrate and 0 < args.calibrate_chars <= cfg.block_size:
        raise ee.EEminiError(f"--calibrate-chars {args.calibrate_chars} is shorter than one window of "
                             f"{cfg.block_size + 1} characters; give more, or 0 for the whole splits")
    if args.calibrate and data and Path(data).is_file():
        raise ee.EEminiError(f"--calibrate chooses on the valid split and shows on test, and {data} is a single "
                             f"text file, with no test split: give --data a WikiText folder, or drop --calibrate")
    for flag, path, suffix in (("--csv", args.csv, ".csv"), ("--json", args.json, ".json"), ("--plot", args.plot, ".png")):
        if path:
            ck.check_output(path, flag, suffix)
    if args.plot and not report.can_draw():
        raise ee.EEminiError("--plot draws with matplotlib, which is not installed: `pip install matplotlib`, or drop "
                             "--plot (the ASCII plot is always printed)")
    if args.calibrate and data:
        read_split(data, "test")  # a folder without its test split fails here, not after the sweep


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


def measures(args, routers):
    """The --confidence names, checked: built-in measures and the checkpoint's learned routers."""
    names = [*ee.CONFIDENCE, *routers] if "all" in args.confidence else args.confidence
    for m in names:
        learned.resolve(m, routers)
    return names


# ----------------------------------------------------------------------------------------------
# the sweep itself, and what it does on request


def run_sweep(model, ids, args, device, routers):
    """token_stats once, every masked row from it (with its bootstrap interval); in exit / both mode,
    one true-exit pass a row. Returns the statistics, the rows and the oracle."""
    t0, cfg = time.time(), model.config
    with cli.autocast(device):
        stats = measure.token_stats(model, ids, args.eval_batch_size, device, routers, args.stride)
    oracle = measure.Oracle(stats, cfg)
    rows = measure.masked_sweep(stats, cfg, args.thresholds, args.measures, oracle)
    for r in rows if args.resamples and args.mode != "exit" else ():  # exit mode shows true-exit figures only
        depth = measure.routed_depth(stats, r["threshold"], cfg, r["confidence"])
        routed = measure.read_off(stats, "ce", depth, cfg)
        (r["ppl_lo"], r["ppl_hi"]), (r["delta_lo"], r["delta_hi"]) = un.bootstrap(
            routed, stats["ce"][cfg.n_layer], stats["window"], args.resamples)
    full = measure.ppl(stats["ce"][cfg.n_layer])
    print(f"masked: one pass over {len(stats['ce'][cfg.n_layer]):,} tokens, {len(rows)} rows read from it, "
          f"{time.time() - t0:.2f} s")
    if args.mode != "masked":
        t0 = time.time()
        for r in rows:
            with cli.autocast(device):
                e = measure.exit_metrics(model, ids, r["threshold"], args.eval_batch_size, device,
                                         routers.get(r["confidence"], r["confidence"]), stride=args.stride)
            if args.mode == "both":
                r["exit_ppl"] = e["ppl"]
            else:  # the true-exit figures replace the masked ones; the oracle stays the masked one
                r.update(e, delta_ppl=100.0 * (e["ppl"] / full - 1))
                for key in ("ppl_lo", "ppl_hi", "delta_lo", "delta_hi"):  # intervals of masked figures
                    r.pop(key, None)
        print(f"true early exit: {len(rows)} passes, {time.time() - t0:.2f} s")
    return stats, rows, oracle


def main(args):
    device = cli.pick_device(args.device, args.threads)
    ckpt = ck.load_checkpoint(args.checkpoint, device)
    model, vocab = ck.model_from_checkpoint(ckpt, device)
    cfg, routers = model.config, learned.from_checkpoint(ckpt, device)
    check_exit_trained(cfg, args.checkpoint)
    trained = ckpt.get("args") or {}
    data = args.data if args.data is not None else trained.get("data", "")
    check_request(args, cfg, data)
    args.measures = measures(args, routers)
    print(describe(ckpt, args.checkpoint) + f" | device {device}")
    ids, source = ck.eval_text(args, ckpt, vocab)
    stats, rows, oracle = run_sweep(model, ids, args, device, routers)
    full = measure.ppl(stats["ce"][cfg.n_layer])
    exits = " | ".join(f"exit only ({k}L) PPL {measure.ppl(stats['ce'][k]):.3f}" for k in cfg.exits)
    print(f"full depth ({cfg.n_layer}L) PPL {full:.3f} | {exits} | best oracle PPL {oracle.ce.min().exp().item():.3f}")

    analysis, series, fractions = {}, [], {}
    for m in args.measures:
        mine = [r for r in rows if r["confidence"] == m]
        report.sweep_table(mine, args.mode, m)
        analysis[m] = measure.analyse(mine, full, args.max_ppl_increase, oracle)
        report.sweep_analysis(analysis[m], args.max_ppl_increase)
        fine = measure.fine_sweep(stats, cfg, m)
        fractions[m] = [x for b in BUDGETS for x in measure.oracle_fraction(fine, full, b, oracle)]
        series.append((f"{m} ({'true exit' if args.mode == 'exit' else 'masked'})", [(r["compute"], r["ppl"]) for r in mine]))
        if args.mode == "both":
            series.append((f"{m} (true exit)", [(r["compute"], r["exit_ppl"]) for r in mine]))
    fractions[CEILING] = [x for b in BUDGETS for x in measure.oracle_fraction(measure.ceiling_sweep(stats, cfg), full, b, oracle)]
    report.oracle_shares(fractions, BUDGETS, CEILING)
    frontier = oracle.frontier()
    report.frontier_plot(series, frontier)
    if args.windows and len(cfg.exits) == 1:
        report.windows_section(stats, cfg, args, series)
    elif args.windows:
        print(f"\n--windows: skipped, window-level routing is built for one exit and this model has {cfg.exits}")
    if args.details:
        report.details_section(stats, cfg, args, vocab)
    calibrated = report.calibrate_section(model, vocab, data, args, device, routers) if args.calibrate else []

    result = {"checkpoint": str(args.checkpoint), "data": source, "split": args.split,
              "tokens": len(stats["ce"][cfg.n_layer]), "mode": args.mode, "full_depth_ppl": full,
              "max_ppl_increase": args.max_ppl_increase, "rows": rows, "oracle": frontier,
              "analysis": {m: {k: v["threshold"] if isinstance(v, dict) else v for k, v in a.items() if v}
                           for m, a in analysis.items()},
              "oracle_share": {m: {f"+{b:g}%": {"saved": v[3 * i], "oracle_saved": v[3 * i + 1], "share": v[3 * i + 2]}
                                   for i, b in enumerate(BUDGETS)} for m, v in fractions.items()},
              "calibrated": calibrated}
    report.sweep_files(args, result, series)
    return result


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
