"""
Reproduce every seed experiment at CPU scale, over several random seeds, and write RESULTS.md.

One command trains every model of the five seed reports on an equal budget (same --max-iters,
batch 32, block 128 for every train.py model), then writes RESULTS.md and results.csv: each seed's
tables in its own layout as mean ± std over the seeds, [the seed's figure] beside each cell; the
PPL-against-Compute plots (masked, true exit, oracle frontier); and a verdict on every key finding.

Smoke run (about 1-2 minutes on 2 CPU cores; writes runs/quick/RESULTS.md):
    python reproduce.py --data ../shared/data/wikitext-2 --quick
The full run (3 seeds x 8 models + seed 004's cascade; 31 minutes on 2 quiet CPU cores):
    python reproduce.py --data ../shared/data/wikitext-2
Bigger, on a GPU:
    python reproduce.py --device cuda --seeds 5 --max-iters 5000

--max-iters 1000 by default: a 3-layer train.py step takes ~75 ms on 2 quiet cores, so each model is
~75 s of training plus ~15 s of evaluation; 24 train.py runs and 3 seed-004 cascades (2-3 minutes
each) took 31 minutes. Interrupt at any time and run the same
command again: finished runs (a `<name>-seed<k>.json` beside the checkpoint, with the same
arguments) are skipped, an unfinished checkpoint is resumed. Each run's own output goes to
`<out-dir>/<name>-seed<k>.log`. Random seed k trains with --seed 1337+k.
"""

import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import platform
import shlex
import statistics
import time
from pathlib import Path

import torch

import eemini as ee
import sweep
import train

TAU = 0.95  # headline threshold: the seeds' "quality" setting (seed 000 finding 4, seed 003's recommended config)
THRESHOLDS = sorted(set(sweep.DEFAULT_THRESHOLDS) | set(train.TABLE_THRESHOLDS))
ORACLE_GRID = range(0, 101, 5)  # oracle frontier points: % of tokens sent deep
SEED0 = 1337  # random seed k uses --seed 1337 + k, so seed 0 is train.py's default run
# (name, runner, what it is, argv): the seeds' experiments; one list, so adding one is one line
RUNS = [
    ("std3L", "train", "Standard 3L (--loss final)", ["--loss", "final"]),
    ("std1L", "train", "Standard 1L (--loss final, 1 layer)", ["--n-layer", "1", "--exit-layer", "0", "--loss", "final"]),
    ("aux", "train", "aux (= asym α 0.5)", ["--loss", "aux"]),
    ("deepsup", "train", "deepsup (LPT)", ["--loss", "deepsup"]),
    ("asym-a0.3", "train", "asym α 0.3", ["--loss", "asym", "--alpha", "0.3"]),
    ("asym-a0.7", "train", "asym α 0.7", ["--loss", "asym", "--alpha", "0.7"]),
    ("asym_deepsup-a0.7", "train", "asym_deepsup α 0.7", ["--loss", "asym_deepsup", "--alpha", "0.7"]),
    ("seed002-4L", "train", "seed 002: 4L, exit 2, dim 32, weights 0,0.7,0,0.3",
     ["--n-layer", "4", "--exit-layer", "2", "--n-embd", "32", "--n-head", "2", "--layer-weights", "0,0.7,0,0.3"]),
    ("seed004", "ec", "seed 004: exit_classifier.py --compare", ["--compare"]),
]
ALIASES = {"asym-a0.5": "aux"}  # α 0.5 is the aux loss term for term: the same runs serve both tables


def parse_args(argv=None):
    p = ee.Parser(description=__doc__.split("\n\n")[0], formatter_class=ee.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="WikiText folder or text file (empty = download WikiText-2 once)")
    p.add_argument("--seeds", type=int, default=None, help="random seeds per experiment (default 3; --quick 1)")
    p.add_argument("--max-iters", type=int, default=None, help="training steps of every train.py model "
                   "(default 1000; --quick 30)")
    p.add_argument("--val-chars", type=int, default=None, help="validation characters (default 50000; --quick 5000)")
    p.add_argument("--train-args", default="", help="extra train.py flags for every model, e.g. '--n-embd 16'")
    p.add_argument("--ec-args", default=None, help="extra exit_classifier.py flags (default none: seed 004's "
                   "settings; --quick: '--num-samples 600 --max-epochs 2 --exit-epochs 2')")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budget, 1 seed, into runs/quick")
    p.add_argument("--out-dir", default=None, help="checkpoints, logs, per-run JSON (default runs/, --quick runs/quick)")
    p.add_argument("--results", default=None, help="RESULTS.md to write (default RESULTS.md; --quick in --out-dir); "
                   "results.csv and PNG plots go beside it")
    p.add_argument("--device", default="", help="cuda, mps, cpu ... (empty = autodetect cuda -> mps -> cpu)")
    args = p.parse_args(argv)
    q = args.quick
    for name, full, quick in (("seeds", 3, 1), ("max_iters", 1000, 30), ("val_chars", 50_000, 5000),
                              ("ec_args", "", "--num-samples 600 --max-epochs 2 --exit-epochs 2"),
                              ("out_dir", "runs", "runs/quick")):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    if args.results is None:
        args.results = str(Path(args.out_dir) / "RESULTS.md") if q else "RESULTS.md"
    if min(args.seeds, args.max_iters, args.val_chars) < 1:
        p.error("--seeds, --max-iters and --val-chars must be at least 1")
    args.train_args, args.ec_args = shlex.split(args.train_args), shlex.split(args.ec_args)
    return args


# ----------------------------------------------------------------------------------------------
# runs: each one trains (or resumes) a model, then measures it; its figures are a flat {key: number}


class Unavailable(Exception):
    """This experiment cannot run with the scripts as they are (the reason says why)."""


def parse_quietly(parse, argv):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse(argv)
    except SystemExit:
        raise Unavailable(err.getvalue().strip().splitlines()[-1]) from None


def same_args(ckpt, args):
    return all(ckpt["args"].get(k) == v for k, v in vars(args).items() if k not in train.RESUME_KEEPS)


def measure(path, args):
    """Per-layer PPL; for a model with a trained exit, masked and true-exit rows at every threshold
    (sweep.masked_sweep, ee.exit_metrics) and the oracle frontier (sweep.oracle_ce)."""
    ckpt = ee.load_checkpoint(path, args.device)
    model, vocab = ee.model_from_checkpoint(ckpt, args.device)
    cfg, ids = model.config, vocab.encode(ee.read_split(args.data, "valid")[0][: args.val_chars])
    with ee.autocast(args.device):
        stats = ee.token_stats(model, ids, 64, args.device)
    rec = {f"layer/{k}/ppl": p for k, p in ee.layer_ppl(stats).items()}
    rec["full/ppl"] = rec[f"layer/{cfg.n_layer}/ppl"]
    try:
        sweep.check_exit_trained(ckpt, path)
    except ee.EEminiError:  # --loss final: an untrained exit head, nothing to route
        return rec
    rec["exit_only/ppl"] = rec[f"layer/{cfg.exits[0]}/ppl"]
    for r in sweep.masked_sweep(stats, cfg, THRESHOLDS, ["softmax"]):
        rec.update({f"masked/{r['threshold']:g}/{m}": r[m] for m in ("ppl", "shallow", "compute", "flops",
                                                                     "delta_ppl", "oracle_ppl")})
    for t in THRESHOLDS:
        with ee.autocast(args.device):
            e = ee.exit_metrics(model, ids, t, 64, args.device)
        rec.update({f"exit/{t:g}/{m}": e[m] for m in ("ppl", "shallow", "compute", "flops")})
    orc, n = sweep.oracle_ce(stats, cfg), len(stats["ce"][cfg.n_layer])
    for j in ORACLE_GRID:
        rec[f"oracle/{j}/ppl"] = math.exp(orc[round(n * j / 100)].item())
        rec[f"oracle/{j}/compute"] = sweep.oracle_compute(round(n * j / 100), n, cfg)
    return rec


def run_train(argv, stem, args):  # stem: <out-dir>/<name>-seed<k> (names hold dots: no with_suffix)
    path = Path(f"{stem}.pt")
    full = [*argv, "--out", str(path), "--device", args.device]
    targs = parse_quietly(train.parse_args, full)
    if path.exists():
        ckpt = ee.load_checkpoint(path)
        if not same_args(ckpt, targs):
            path.unlink()  # trained with other flags: start again
        elif ckpt["step"] < targs.max_iters:
            targs = train.parse_args([*full, "--resume"])
        else:
            targs = None  # finished: only measure it
    if targs is not None:
        with open(Path(f"{stem}.log"), "a") as log, contextlib.redirect_stdout(log):
            train.main(targs)
    return measure(path, args)


def run_exit_classifier(argv, stem, args):
    if importlib.util.find_spec("exit_classifier") is None:  # hook: runs once exit_classifier.py exists
        raise Unavailable("exit_classifier.py is not in the project yet")
    import exit_classifier as ec

    path = Path(f"{stem}.pt")
    eargs = parse_quietly(ec.parse_args, [*argv, "--out", str(path), "--device", args.device])
    results = None
    if path.exists():
        ckpt = ee.load_checkpoint(path)
        keep = {"out", "device"}
        if ckpt.get("kind") == ec.KIND and all(ckpt["args"].get(k) == v for k, v in vars(eargs).items() if k not in keep):
            results = ckpt["metrics"]
    if results is None:
        with open(Path(f"{stem}.log"), "a") as log, contextlib.redirect_stdout(log):
            results = ec.main(eargs)
    return flatten({ec.NAMES[m]: r for m, r in results.items()})


RUNNERS = {"train": run_train, "ec": run_exit_classifier}


def flatten(obj, prefix=""):
    """{'a': {'b': [1, 2]}} -> {'a/b/0': 1.0, 'a/b/1': 2.0}; numbers only."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flatten(val, f"{prefix}{key}/").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in flatten(val, f"{prefix}{i}/").items()}
    return {prefix[:-1]: float(obj)} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else {}


def aggregate(records):
    """{key: (mean, sample std, n)} over a list of flat per-seed records (std 0 for one seed)."""
    keys = dict.fromkeys(k for r in records for k in r)
    out = {}
    for k in keys:
        v = [r[k] for r in records if k in r]
        out[k] = (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
    return out


def run_all(args):
    """Every (experiment, seed), seed by seed; returns {name: [per-seed records]}, {name: why not run}."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for k in range(args.seeds):
        for name, kind, _, spec in RUNS:
            common = ["--data", args.data, "--val-chars", str(args.val_chars), "--seed", str(SEED0 + k)]
            if kind == "train":
                argv = [*common, "--max-iters", str(args.max_iters), "--eval-interval", str(max(1, args.max_iters // 2)),
                        "--log-interval", str(max(1, args.max_iters // 10)), *spec, *args.train_args]
            else:
                argv = [*common, *spec, *args.ec_args]
            side = out / f"{name}-seed{k}.json"
            done = json.loads(side.read_text()) if side.exists() else None
            jobs.append((name, kind, k, argv, side, done if done and done["argv"] == argv else None))
    records, missing, times, t0 = {}, {}, [], time.time()
    left = sum(done is None for *_, done in jobs)
    for i, (name, kind, k, argv, side, done) in enumerate(jobs, 1):
        tag = f"[{i:2d}/{len(jobs)}] {name} seed {k}"
        if done is None:
            start = time.time()
            try:
                metrics = RUNNERS[kind](argv, out / f"{name}-seed{k}", args)
            except Unavailable as e:
                missing[name], left = str(e), left - 1
                print(f"{tag} | not run: {e}", flush=True)
                continue
            done = {"argv": argv, "seconds": time.time() - start, "metrics": metrics}
            write_atomic(side, json.dumps(done))
            times.append(done["seconds"])
            left -= 1
            eta = statistics.fmean(times) * left
            print(f"{tag} | {ee.fmt_time(done['seconds'])} | {headline(metrics)} | elapsed {ee.fmt_time(time.time() - t0)} "
                  f"| ETA {ee.fmt_time(eta)}", flush=True)
        else:
            print(f"{tag} | finished earlier, skipped", flush=True)
        records.setdefault(name, []).append({**done["metrics"], "seconds": done["seconds"]})
    return records, missing


def headline(m):
    if "full/ppl" not in m:
        return "final PPL " + " ".join(f"{x} {m[f'{x}/final_ppl']:.2f}" for x in ("distill", "loss", "softmax"))
    routed = f" | routed@{TAU:g} PPL {m[f'masked/{TAU:g}/ppl']:.3f}" if f"masked/{TAU:g}/ppl" in m else ""
    return f"full PPL {m['full/ppl']:.3f}{routed}"


def write_atomic(path, text):
    with ee.atomic_write(path, encoding="utf-8") as f:
        f.write(text)


# ----------------------------------------------------------------------------------------------
# RESULTS.md: every seed table in the seed's own layout; each cell "mean ± std [the seed's figure]"

S000_AUX = {0.5: (40.61, 95.5, 36.3), 0.7: (39.41, 88.7, 40.9), 0.8: (40.36, 83.7, 44.2), 0.9: (36.98, 71.8, 52.1),
            0.95: (32.21, 57.1, 61.9)}
S000_DS = {0.5: (43.05, 95.1, 36.6), 0.7: (44.44, 89.9, 40.1), 0.8: (45.89, 85.2, 43.2), 0.9: (47.38, 75.5, 49.7),
           0.95: (48.16, 64.6, 56.9)}
S002 = {0.0: (14.51, 100.0, 50.0, 3.1), 0.1: (14.51, 100.0, 50.0, 3.1), 0.2: (14.45, 99.7, 50.2, 2.7),
        0.3: (14.58, 97.0, 51.5, 3.6), 0.4: (14.64, 91.4, 54.3, 4.1), 0.5: (14.80, 85.4, 57.3, 5.2),
        0.6: (14.89, 79.9, 60.1, 5.8), 0.7: (14.38, 73.2, 63.4, 2.2), 0.8: (14.04, 62.6, 68.7, -0.2),
        0.9: (14.20, 37.6, 81.2, 0.9), 1.0: (14.07, 0.0, 100.0, 0.0)}
S003_ALPHA = {0.3: (24.88, 72.0, 52.0), 0.5: (23.98, 52.3, 65.2), 0.7: (22.95, 52.4, 65.0)}
S003_T07 = {0.5: (41.62, 94.4, 37.0), 0.7: (40.48, 87.8, 41.4), 0.8: (40.57, 84.5, 43.6), 0.9: (36.94, 73.4, 51.1),
            0.95: (31.46, 59.7, 60.2)}
S003_ADS = {0.7: (50.24, 91.0, 39.4), 0.8: (51.46, 87.5, 41.7), 0.9: (53.10, 79.0, 47.4), 0.95: (54.90, 68.9, 54.0)}
LABELS = {"000": {"e3": "Auxiliary Loss Training", "e4": "Deep Supervision Training", "aux": "Auxiliary Loss (Early Exit)",
                  "deepsup": "Deep Supervision + Early Exit", "aux_c": "Auxiliary Loss Training",
                  "deepsup_c": "Deep Supervision + Early Exit"},
          "001": {"e3": "Standard Training (Auxiliary Loss)", "e4": "LPT Training", "aux": "Confidence-Routed",
                  "deepsup": "Routed + LPT", "aux_c": "Standard Routing", "deepsup_c": "LPT Routing"}}
EC_FINAL = {"Final PPL": ("final_ppl", 2, ""), "Accuracy": ("accuracy", 2, "%"), "Shallow ratio": ("shallow", 1, "%"),
            "Compute savings (layers)": ("saved", 1, "%"), "FLOP savings": ("flops_saved", 1, "%"),
            "Final PPL, other context at eval": ("mismatch_ppl", 2, "")}
EC_TRAIN = {"Block 0 val_ppl": ("block0_ppl", 2, ""), "Block 1 val_ppl": ("block_ppl/1", 2, ""),
            "Threshold (Block 0)": ("thresholds/0", 4, ""), "avg_label (Block 0)": ("avg_label/0", 3, "")}
TH = ["Threshold", "PPL", "Shallow%", "Compute%"]


def fmt(a, seed=None, d=2, unit=""):
    s = "—" if a is None else f"{a[0]:.{d}f} ± {a[1]:.{d}f}{unit}"
    return s if seed is None else f"{s} [{seed:g}{unit}]" if isinstance(seed, float) else f"{s} [{seed}]"


def md(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows), ""]


def row3(A, name, t, seed, mode="masked"):
    """PPL, Shallow%, Compute% of one model at one threshold, beside the seed's three figures."""
    return [fmt(A(name, f"{mode}/{t:g}/{m}"), s, *((2, "") if m == "ppl" else (1, "%")))
            for m, s in zip(("ppl", "shallow", "compute"), seed)]


def seed000(A, lab):
    def comp(name, seed_ppl, seed_c, seed_gain):
        a, b = A(name, f"masked/{TAU:g}/ppl"), A("std3L", "full/ppl")
        g = 100 * (1 - a[0] / b[0]) if a and b else None
        gain = "—" if g is None else f"{abs(g):.1f}% {'better' if g >= 0 else 'worse'}"
        return [lab[name + "_c"], fmt(a, seed_ppl), fmt(A(name, f"masked/{TAU:g}/compute"), seed_c, 1, "%"), f"{gain} [{seed_gain}]"]
    res = ["Model", "PPL", "Shallow%", "Compute%"]
    return [f"### Experiment 3: {lab['e3']}", "", *md(res, [
            [lab["aux"], *row3(A, "aux", TAU, (23.98, 52.3, 65.2))],
            ["Standard (3L)", fmt(A("std3L", "full/ppl"), 34.86), "0% [0%]", "100% [100%]"],
            ["Standard (1L)", fmt(A("std1L", "full/ppl"), 35.29), "100% [100%]", "33.3% [33.3%]"]]),
            "Threshold Analysis:", "", *md(TH, [[f"{t:.2f}", *row3(A, "aux", t, s)] for t, s in S000_AUX.items()]),
            f"### Experiment 4: {lab['e4']}", "", *md(res, [[lab["deepsup"], *row3(A, "deepsup", TAU, (28.13, 80.0, 46.6))]]),
            "Threshold Analysis:", "", *md(TH, [[f"{t:.2f}", *row3(A, "deepsup", t, s)] for t, s in S000_DS.items()]),
            "### Comparison", "", *md(["Model", "PPL", "Compute%", "vs Standard 3L"],
                                      [comp("aux", 23.98, 65.2, "31.2% 改善"), comp("deepsup", 28.13, 46.6, "19.3% 改善")])]


def seed002(A):
    n = "seed002-4L"
    sweep_rows = [[f"{t:.1f}", *row3(A, n, t, s[:3]),
                   "baseline" if t == 1 else fmt(A(n, f"masked/{t:g}/delta_ppl"), f"{s[3]:+.1f}%", 1, "%")]
                  for t, s in S002.items()]
    rec = [[p, f"{t:.1f}", fmt(A(n, f"masked/{t:g}/ppl"), sp), fmt(A(n, f"masked/{t:g}/compute"), sc, 1, "%")]
           for p, t, sp, sc in (("品質維持 (keep quality)", 0.8, 14.04, 68.7), ("効率重視 (efficiency)", 0.0, 14.51, 50.0),
                                ("品質重視 (quality, baseline)", 1.0, 14.07, 100.0))]
    return ["### Phase 1: training", "", f"Best PPL (full depth, end of training): {fmt(A(n, 'full/ppl'), 14.07)}", "",
            "### Phase 2: Threshold Sweep", "", *md(["Threshold", "PPL", "Shallow Exit", "Compute", "PPL変化"], sweep_rows),
            "### 推奨設定 (recommended settings)", "", *md(["目的", "閾値", "PPL", "Compute"], rec)]


def seed003(A):
    cfgs = (("Asymmetric Auxiliary Loss (L2なし)", "asym-a0.7", S003_T07), ("Deep Supervision + Asymmetric", "asym_deepsup-a0.7", S003_ADS))
    return ["### Experiment 5: Asymmetric Auxiliary Loss (L2ロスなし)", "", *md(
            ["α", "L1重み", "L3重み", "PPL", "Shallow%", "Compute%"],
            [[f"{a}", f"{a:.0%}", f"{1 - a:.0%}", *row3(A, f"asym-a{a}", TAU, s)] for a, s in S003_ALPHA.items()]),
            "Threshold Analysis (α=0.7):", "", *md(TH, [[f"{t:.2f}", *row3(A, "asym-a0.7", t, s)] for t, s in S003_T07.items()]),
            "### Experiment 6: Deep Supervision with Asymmetric Weights (α=0.7)", "", *md(["Model", "PPL", "Shallow%", "Compute%"], [
                [cfgs[0][0], *row3(A, "asym-a0.7", TAU, (22.95, 52.4, 65.0))],
                [cfgs[1][0] + " (全層)", *row3(A, "asym_deepsup-a0.7", TAU, (32.07, 86.3, 42.5))]]),
            "Threshold Analysis Comparison:", "", *md(["Config", *TH],
                                                      [[c, f"{t:.2f}", *row3(A, n, t, s[t])] for t in (0.7, 0.8, 0.9, 0.95) for c, n, s in cfgs]),
            "### αの解釈 (what α means)", "", *md(["α値", "意味", "結果 (PPL)"], [
                [f"{a}", m, fmt(A(f"asym-a{a}", f"masked/{TAU:g}/ppl"), s[0])]
                for (a, s), m in zip(S003_ALPHA.items(), ("Deep重視 (deep-weighted)", "バランス (= aux)", "Shallow重視 (shallow-weighted)"))])]


def seed004(A):
    try:
        import exit_classifier as ec
    except ImportError:
        return ["not run: exit_classifier.py is not in the project yet", ""]
    names, out = list(ec.NAMES.values()), []
    for title, rows in (("最終評価 (final evaluation, true early exit, held-out text)", EC_FINAL), ("訓練過程 (training)", EC_TRAIN)):
        body = [[metric, *(fmt(A("seed004", f"{m}/{key}"), ec.SEED004.get(metric, ("-",) * 3)[i], d, unit)
                           for i, m in enumerate(names))] for metric, (key, d, unit) in rows.items()]
        out += [f"### {title}", "", *md(["指標", *names], body)]
    return out


# ----------------------------------------------------------------------------------------------
# key findings: each one a claim and a check on the measured means (differences beyond the combined std)


def below(a, b):
    """Is mean a below mean b by more than the two stds combined?"""
    noise = math.hypot(a[1], b[1])
    return "supported" if b[0] - a[0] > noise else "not supported" if a[0] - b[0] > noise else "inconclusive (within noise)"


def m(a):
    return f"{a[0]:.2f} ± {a[1]:.2f}"


def all_of(verdicts):
    """Several pairwise checks as one: any contradicted -> not supported; all hold -> supported."""
    if "not supported" in verdicts:
        return "not supported"
    return "supported" if all(v == "supported" for v in verdicts) else "inconclusive (within noise)"


def sized(verdict, measured, claimed):
    """A claim of a size ('31.2% better'): the right direction at under half the size is direction only."""
    if verdict == "supported" and abs(measured) < abs(claimed) / 2:
        return f"direction only ({measured:+.1f}%, claimed {claimed:+.1f}%)"
    return verdict


def findings(A):
    """[(seed, claim, check)]; each check returns (verdict, the numbers behind it)."""
    ppl = lambda n, t=TAU: A(n, f"masked/{t:g}/ppl")  # noqa: E731
    comp = lambda n, t=TAU: A(n, f"masked/{t:g}/compute")  # noqa: E731
    std3, s2 = A("std3L", "full/ppl"), "seed002-4L"

    def vs(a, b, la, lb, claimed=None):  # claimed: the seed's relative difference in %, if it gave one
        rel = 100 * (a[0] / b[0] - 1) if b[0] else 0.0
        verdict = below(a, b) if claimed is None else sized(below(a, b), rel, claimed)
        return verdict, f"{la} {m(a)} vs {lb} {m(b)} ({rel:+.1f}%)"

    def saves(name, claimed):  # claimed: % of compute the seed says was saved
        c = comp(name)
        saved = (100 - c[0], c[1])
        verdict = sized(below((0.0, 0.0), saved), saved[0], claimed) if saved[0] + saved[1] < claimed else "supported"
        return verdict, f"compute {m(c)}% at threshold {TAU:g}, {saved[0]:.1f}% saved (claimed {claimed:.1f}%)"

    def falls(seq):  # [(label, agg)]: does the mean fall at every step?
        means = [a[0] for _, a in seq]
        ok = all(y < x for x, y in zip(means, means[1:]))
        verdict = "supported" if ok else "partly (not at every step)" if means[-1] < means[0] else "not supported"
        return verdict, ", ".join(f"{lab}: {a[0]:.2f}" for lab, a in seq)

    def bumpy(seq):  # both a rise and a fall between neighbours, each beyond noise?
        d = [(b[0] - a[0], math.hypot(a[1], b[1])) for a, b in zip(seq, seq[1:])]
        ok = any(x > e for x, e in d) and any(-x > e for x, e in d)
        return ("supported" if ok else "not supported"), ", ".join(f"{t:g}: {a[0]:.2f}" for t, a in zip(S002, seq))

    def best_method():
        runs = {n: ppl(n) for n in ("aux", "deepsup", "asym-a0.3", "asym-a0.7", "asym_deepsup-a0.7") if ppl(n)}
        order = sorted(runs, key=lambda n: runs[n][0])
        verdict = below(runs["asym-a0.7"], runs[order[1]]) if order[0] == "asym-a0.7" else "not supported"
        return verdict, ", ".join(f"{n} {m(runs[n])}" for n in order)

    def s002_range():  # every threshold saving >= 31% keeps PPL within +5%
        rows = [(A(s2, f"masked/{t:g}/delta_ppl"), comp(s2, t)) for t in S002 if comp(s2, t)[0] <= 69.0]
        if not rows:
            return "not supported", f"no threshold saves 31% compute (lowest compute {comp(s2, 0)[0]:.1f}%)"
        d = [x[0] for x, _ in rows]
        return ("supported" if max(d) <= 5.0 else "not supported"), \
            f"ΔPPL {min(d):+.1f}% .. {max(d):+.1f}% at compute {min(c[0] for _, c in rows):.1f}% .. {max(c[0] for _, c in rows):.1f}%"

    def s002_best():
        t = min((t for t in S002 if t < 1), key=lambda t: ppl(s2, t)[0])
        d, c = A(s2, "masked/0.8/delta_ppl"), comp(s2, 0.8)
        verdict = "not supported" if d[0] > d[1] else "supported" if c[0] < 90 else "partly (PPL kept, under 10% compute saved)"
        return verdict, f"ΔPPL at 0.8: {m(d)}%, compute {m(c)}%; lowest mean PPL at threshold {t:g}"

    def s002_improves():
        t = min((t for t in S002 if t < 1), key=lambda t: ppl(s2, t)[0])
        v, text = vs(ppl(s2, t), A(s2, "full/ppl"), f"best threshold {t:g}", "full depth")
        return v, f"{text}; oracle router at that compute {m(A(s2, f'masked/{t:g}/oracle_ppl'))}"

    def s002_zero():
        d = A(s2, "masked/0/delta_ppl")
        return ("supported" if d[0] <= 5.0 else "not supported"), f"ΔPPL at 0.0: {m(d)}%, compute {m(comp(s2, 0))}%"

    def ec_order(key, order):
        vals = {n: A("seed004", f"{n}/{key}") for n in ("distill", "loss", "softmax")}
        verdict = all_of([below(vals[a], vals[b]) for a, b in zip(order, order[1:])])
        return verdict, ", ".join(f"{n} {m(vals[n])}" for n in order)

    def ec_softmax():
        sh = {n: A("seed004", f"{n}/shallow") for n in ("distill", "loss", "softmax")}
        f = {n: A("seed004", f"{n}/final_ppl") for n in sh}
        verdict = all_of([below(x[n], x["softmax"]) for x in (sh, f) for n in ("distill", "loss")])
        return verdict, "shallow " + ", ".join(f"{n} {m(a)}%" for n, a in sh.items()) \
            + "; final PPL " + ", ".join(f"{n} {m(a)}" for n, a in f.items())

    def ec_worse():
        pairs = {n: (A("seed004", f"{n}/final_ppl"), A("seed004", f"{n}/block0_ppl")) for n in ("distill", "loss", "softmax")}
        return all_of([below(b, a) for a, b in pairs.values()]), ", ".join(f"{n} {m(a)} vs block 0 {m(b)}" for n, (a, b) in pairs.items())

    return [
        ("000/001", "Routing an aux-trained model beats Standard 3L in PPL (23.98 vs 34.86, -31.2%)",
         lambda: vs(ppl("aux"), std3, f"aux routed@{TAU:g}", "Standard 3L", -31.2)),
        ("000/001", "... and cuts compute by 34.8% (65.2% of 3L)", lambda: saves("aux", 34.8)),
        ("000/001", "A higher threshold gives a lower PPL (more tokens take the deep path)",
         lambda: falls([(f"{t:g}", ppl("aux", t)) for t in S000_AUX])),
        ("000/001", "Threshold 0.95 is the quality setting, 0.5 the speed setting (lower PPL vs lower compute)",
         lambda: (below(ppl("aux", 0.95), ppl("aux", 0.5)) if comp("aux", 0.5)[0] < comp("aux", 0.95)[0] else "not supported",
                  f"0.95: PPL {m(ppl('aux', 0.95))}, compute {m(comp('aux', 0.95))}%; 0.5: PPL {m(ppl('aux', 0.5))}, compute {m(comp('aux', 0.5))}%")),
        ("000/001", "Deep supervision (LPT) + early exit beats Standard 3L (28.13 vs 34.86, -19.3%)",
         lambda: vs(ppl("deepsup"), std3, f"deepsup routed@{TAU:g}", "Standard 3L", -19.3)),
        ("000/001", "... and cuts compute by 53.4% (46.6% of 3L)", lambda: saves("deepsup", 53.4)),
        ("000/001", "... but aux routing is better than deepsup routing (23.98 vs 28.13, 14.7% better)",
         lambda: vs(ppl("aux"), ppl("deepsup"), "aux", "deepsup", -14.7)),
        ("002", "Deep supervision + inference-time early exit works: 31-50% compute saved for -0.2%..+5% PPL", s002_range),
        ("002", "The best threshold is about 0.8: PPL kept (-0.2%) with 31% compute saved", s002_best),
        ("002", "At a suitable threshold early exit improves PPL over full depth (the exit layer predicts some tokens better)",
         s002_improves),
        ("002", "Threshold 0 saves 50% compute for about +3% PPL", s002_zero),
        ("002", "PPL is not monotone in the threshold (worse 0.0 -> 0.6, better 0.7 -> 0.8)",
         lambda: bumpy([ppl(s2, t) for t in S002])),
        ("003", "asym α=0.7 without a middle-layer loss is the best of all methods (PPL 22.95)", best_method),
        ("003", "... 34.2% better than Standard 3L in PPL",
         lambda: vs(ppl("asym-a0.7"), std3, "asym α 0.7", "Standard 3L", -34.2)),
        ("003", "... with 35.0% compute saved", lambda: saves("asym-a0.7", 35.0)),
        ("003", "... and 4.3% better than aux (α=0.5: 23.98)",
         lambda: vs(ppl("asym-a0.7"), ppl("aux"), "α 0.7", "α 0.5", -4.3)),
        ("003", "Weighting the exit more is better: PPL falls as α rises 0.3 -> 0.5 -> 0.7",
         lambda: falls([(f"α {a}", ppl(f"asym-a{a}" if a != 0.5 else "aux")) for a in S003_ALPHA])),
        ("003", "Adding a middle-layer loss worsens PPL by 39.8% (22.95 -> 32.07)",
         lambda: vs(ppl("asym-a0.7"), ppl("asym_deepsup-a0.7"), "asym", "asym_deepsup", -28.4)),
        ("003", "... because the exit becomes over-confident: more tokens exit (86.3% vs 52.4%)",
         lambda: vs(A("asym-a0.7", f"masked/{TAU:g}/shallow"), A("asym_deepsup-a0.7", f"masked/{TAU:g}/shallow"),
                    "shallow% asym", "asym_deepsup")),
        ("004", "Loss labels train block 1 best: block 1 val PPL loss 445 < distill 522 < softmax 736",
         lambda: ec_order("block_ppl/1", ("loss", "distill", "softmax"))),
        ("004", "Softmax confidence exits the most tokens (72.8%) but has the worst final PPL", ec_softmax),
        ("004", "Every method's final PPL is worse than block 0 alone (~565 -> 1072-1220)", ec_worse),
        ("004", "Exit classifier + loss labels has the best final PPL (adopted as the standard)",
         lambda: ec_order("final_ppl", ("loss", "distill", "softmax"))),
    ]


# ----------------------------------------------------------------------------------------------


def machine(device):
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    gpu = f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""
    return f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads){gpu}, {platform.system()}, torch {torch.__version__}"


def plots(A, res_dir):
    """PPL against Compute for every model with an exit: masked, true exit, oracle frontier (means)."""
    out, png = [], importlib.util.find_spec("matplotlib") is not None
    for name, _, what, _ in RUNS:
        if A(name, "masked/0/ppl") is None:
            continue
        curve = {mode: [(A(name, f"{mode}/{t:g}/compute")[0], A(name, f"{mode}/{t:g}/ppl")[0]) for t in THRESHOLDS]
                 for mode in ("masked", "exit")}
        orc = [(A(name, f"oracle/{j}/compute")[0], A(name, f"oracle/{j}/ppl")[0]) for j in ORACLE_GRID]
        out += [f"### {what}", "", "```", *sweep.ascii_plot([(".", orc), ("*", curve["masked"]), ("+", curve["exit"])]),
                "   * masked routing   + true early exit   . oracle frontier", "```", ""]
        if png:
            path = Path(res_dir) / "results" / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            sweep.save_png(str(path), [("masked", curve["masked"]), ("true exit", curve["exit"])], orc)
            out += [f"![{what}](results/{name}.png)", ""]
    return out


def report(records, missing, args):
    """RESULTS.md text and results.csv text."""
    agg = {name: aggregate(recs) for name, recs in records.items()}
    A = lambda name, key: agg.get(ALIASES.get(name, name), {}).get(key)  # noqa: E731
    total = sum(r["seconds"] for recs in records.values() for r in recs)
    cmd = (f"python reproduce.py --data {args.data or '(download)'} --seeds {args.seeds} --max-iters {args.max_iters} "
           f"--val-chars {args.val_chars}" + (f" --train-args '{shlex.join(args.train_args)}'" if args.train_args else "")
           + (f" --ec-args '{shlex.join(args.ec_args)}'" if args.ec_args else ""))
    t = f"{TAU:g}"
    head = [[what, *(fmt(A(name, k), d=d, unit=u) for k, d, u in (
        ("full/ppl", 3, ""), ("exit_only/ppl", 3, ""), (f"masked/{t}/ppl", 3, ""), (f"exit/{t}/ppl", 3, ""),
        (f"masked/{t}/oracle_ppl", 3, ""), (f"masked/{t}/shallow", 1, "%"), (f"masked/{t}/compute", 1, "%"),
        (f"exit/{t}/flops", 1, "%")))] for name, kind, what, _ in RUNS if kind == "train" and name in agg]
    lines = ["# Results: the seed experiments, reproduced", "",
             f"Written by `{cmd}` on {time.strftime('%Y-%m-%d')}: {machine(args.device)}, device {args.device}. "
             f"Total time {ee.fmt_time(total)} of runs.", "",
             f"Each cell: mean ± sample std over {args.seeds} random seed(s), [the seed report's figure] beside it. "
             f"Every train.py model: {args.max_iters} steps of 32 x 128 characters (an equal budget), "
             f"validation PPL on the first {args.val_chars:,} characters of the valid split. Where a table has no "
             f"threshold column, routed figures are masked routing at threshold {t} (the seeds' quality setting). "
             "The code behind seeds 000-003 trained on a two-sentence placeholder text when WikiText was missing, so their absolute "
             "figures are not expected to match; the verdicts below test the directions they claim.", ""]
    lines += [f"Not run: **{n}** ({why})." for n, why in missing.items()] + ([""] if missing else [])
    lines += ["## Headline", "", *md(["Model", "Full-depth PPL", "Exit-only PPL", f"Routed PPL @{t} (masked)",
                                      f"Routed PPL @{t} (true exit)", "Oracle PPL at that compute", "Shallow%",
                                      "Compute%", "FLOPs% (true exit)"], head)]
    for seed, title, body in (("000", "Experiments 3 & 4", seed000(A, LABELS["000"])),
                              ("001", "Experiments 3 & 4 (seed 000's runs, seed 001's names)", seed000(A, LABELS["001"])),
                              ("002", "Threshold sweep (4 layers, exit 2)", seed002(A)),
                              ("003", "Experiments 5 & 6: asymmetric auxiliary loss", seed003(A)),
                              ("004", "Exit classifier comparison", seed004(A))):
        lines += [f"## Seed {seed}: {title}", "", *body]
    lines += ["## PPL against Compute", "", *plots(A, Path(args.results).parent), "## Key findings", "",
              *md(["Seed", "Finding", "Verdict", "Measured (mean ± std)"], [[s, c, *check_safely(f)] for s, c, f in findings(A)])]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "key", "mean", "std", "n", "per_seed"])
    for name, recs in records.items():
        for key, (mean, sd, n) in agg[name].items():
            w.writerow([name, key, f"{mean:.6g}", f"{sd:.6g}", n, ";".join(f"{r[key]:.6g}" for r in recs if key in r)])
    return "\n".join(lines), buf.getvalue()


def check_safely(check):
    try:
        return check()
    except (TypeError, KeyError, IndexError, ValueError, ZeroDivisionError):  # a run it needs is missing
        return "not measured", "—"


def main(args):
    t0 = time.time()
    args.device = ee.pick_device(args.device)
    print(f"reproduce: {args.seeds} seed(s) x {len(RUNS)} experiments | {args.max_iters} steps per train.py model | "
          f"device {args.device} | runs in {args.out_dir}", flush=True)
    records, missing = run_all(args)
    text, table = report(records, missing, args)
    write_atomic(args.results, text)
    write_atomic(Path(args.results).with_name("results.csv"), table)
    print(f"wrote {args.results} and {Path(args.results).with_name('results.csv')} | {ee.fmt_time(time.time() - t0)}")
    return records


if __name__ == "__main__":
    ee.run_cli(main, parse_args)
