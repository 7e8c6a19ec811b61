"""
Reproduce every seed experiment at CPU scale, over several random seeds, and write RESULTS.md.

One command trains every model of the five seed reports on an equal budget (same --max-iters,
batch 32, block 128 for every train.py model), then writes RESULTS.md and results.csv: each seed's
tables in its own layout as mean ± std over the seeds, [the seed's figure] beside each cell; the
PPL-against-Compute plots (masked, true exit, oracle frontier); and a verdict on every key finding.

Smoke run (2-3 minutes on 2 CPU cores; writes runs/quick/RESULTS.md):
    python reproduce.py --data ../shared/data/wikitext-2 --quick
The full run (3 seeds x 8 models, seed 004's cascade, and three longer runs for the training curve;
about 55 minutes on 2 CPU cores with --jobs 2):
    python reproduce.py --data ../shared/data/wikitext-2 --jobs 2
Bigger, on a GPU:
    python reproduce.py --device cuda --seeds 5 --max-iters 5000

Each model is trained by its own `python train.py ...` (or `exit_classifier.py`) process, whose output
goes to `<out-dir>/<name>-seed<k>.log`; random seed k trains with --seed 1337+k. Interrupt at any time
and run the same command again: finished runs (a `<name>-seed<k>.json` beside the checkpoint, with the
same arguments) are skipped, an unfinished checkpoint is resumed.
After a change to what is measured, `--remeasure` measures every finished train.py run again without
training it, keeping the time its training took (seed 004's cascades keep the figures
exit_classifier.py saved with them).
"""

import csv
import io
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path


import checkpoint as ck
import cli
import measure
import uncertainty as un
from data import read_split
from eemini import EEminiError
from report import ascii_plot, can_draw, md, save_png
from seeds import (CLAIMS, LABELS, S000, S000_AUX, S000_DS, S002, S003, S003_ADS, S003_ALPHA, S003_T07, S004,
                   S004_METHODS, TAU)

ROOT = Path(__file__).resolve().parent
THRESHOLDS = sorted({i / 10 for i in range(11)} | {0.95})  # seed 002's sweep and seed 000's table
ORACLE_POINTS = 21  # oracle frontier points: every 5% of the tokens sent deep
SEED0 = 1337  # random seed k uses --seed 1337 + k, so seed 0 is train.py's default run
# (name, script, what it is, argv): the seeds' experiments; one list, so adding one is one line
RUNS = [
    ("std3L", "train.py", "Standard 3L (--loss final)", ["--loss", "final"]),
    ("std1L", "train.py", "Standard 1L (--loss final, 1 layer)", ["--n-layer", "1", "--exit-layers", "0", "--loss", "final"]),
    ("aux", "train.py", "aux (= asym α 0.5)", ["--loss", "aux"]),
    ("deepsup", "train.py", "deepsup (LPT)", ["--loss", "deepsup"]),
    ("asym-a0.3", "train.py", "asym α 0.3", ["--loss", "asym", "--alpha", "0.3"]),
    ("asym-a0.7", "train.py", "asym α 0.7", ["--loss", "asym", "--alpha", "0.7"]),
    ("asym_deepsup-a0.7", "train.py", "asym_deepsup α 0.7", ["--loss", "asym_deepsup", "--alpha", "0.7"]),
    ("seed002-4L", "train.py", "seed 002: 4L, exit 2, dim 32, weights 0,0.7,0,0.3",
     ["--n-layer", "4", "--exit-layers", "2", "--n-embd", "32", "--n-head", "2", "--layer-weights", "0,0.7,0,0.3"]),
    ("seed004", "exit_classifier.py", "seed 004: exit_classifier.py --compare", ["--compare"]),
]
ALIASES = {"asym-a0.5": "aux"}
CURVES = ["std1L", "std3L", "asym-a0.7"]  # also trained for --curve-iters, evaluated often: how PPL falls with steps  # α 0.5 is the aux loss term for term: the same runs serve both tables


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    cli.add_data(p, val_chars=None, split=False)
    p.add_argument("--seeds", type=cli.number(int, 1), default=None, help="random seeds per experiment "
                   "(default 3; --quick 1)")
    p.add_argument("--max-iters", type=cli.number(int, 1), default=None, help="training steps of every train.py "
                   "model (default 1000; --quick 30)")
    p.add_argument("--curve-iters", type=cli.number(int, 1), default=None, help="steps of the PPL-against-steps runs "
                   "(Standard 1L, 3L, asym α 0.7; seed 0; default 2 x --max-iters)")
    p.add_argument("--train-args", default="", help="extra train.py flags for every model, e.g. '--n-embd 16'")
    p.add_argument("--ec-args", default=None, help="extra exit_classifier.py flags (default none: seed 004's "
                   "settings; --quick: '--train-seqs 600 --max-epochs 2 --exit-epochs 2')")
    p.add_argument("--jobs", type=cli.number(int, 1), default=1, help="runs at a time, each its own process; with "
                   "more than one, each gets cores / jobs torch threads (unless --threads says otherwise)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budget, 1 seed, into runs/quick")
    p.add_argument("--remeasure", action="store_true", help="measure every finished train.py run again (after a "
                   "change to what is measured), keeping the time its training took; finished runs are not "
                   "retrained (missing ones are trained), and an --out-dir with none of them is refused")
    p.add_argument("--out-dir", default=None, help="checkpoints, logs, per-run JSON (default runs/, --quick runs/quick)")
    p.add_argument("--results", default=None, help="RESULTS.md to write (default RESULTS.md; --quick in --out-dir); "
                   "results.csv and PNG plots go beside it; a .md or results.csv there that reproduce.py did not "
                   "write is never replaced")
    cli.add_device(p)
    args = p.parse_args(argv)
    q = args.quick
    for name, full, quick in (("seeds", 3, 1), ("max_iters", 1000, 30), ("val_chars", 50_000, 5000),
                              ("ec_args", "", "--train-seqs 600 --max-epochs 2 --exit-epochs 2"),
                              ("out_dir", "runs", "runs/quick")):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    args.curve_iters = args.curve_iters or 2 * args.max_iters
    if args.results is None:
        args.results = str(Path(args.out_dir) / "RESULTS.md") if q else "RESULTS.md"
    if not args.val_chars:
        p.error("--val-chars must be at least 1")
    for name in ("train_args", "ec_args"):
        try:
            setattr(args, name, shlex.split(getattr(args, name)))
        except ValueError as e:  # an unclosed quote
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)!r}: {e}")
    need = max(flag_value(args.train_args, "--block-size", 128) + 2, flag_value(args.ec_args, "--seq-len", 32) + 1)
    if args.val_chars < need:  # train.py evaluates windows of block_size + 1 and wants more; found now, not in a run's log
        p.error(f"--val-chars {args.val_chars} is too short for the runs' evaluation windows; give at least {need}")
    return args


def flag_value(argv, flag, default):
    """The integer a script's argv gives a flag (`--flag N` or `--flag=N`; the last one counts, as in
    argparse), else its default; a value that is no integer is left for the script to refuse."""
    value = default
    for i, a in enumerate(argv):
        given = argv[i + 1] if a == flag and i + 1 < len(argv) else a.partition("=")[2] if a.startswith(flag + "=") else None
        if given is not None:
            try:
                value = int(given)
            except ValueError:
                pass
    return value


# ----------------------------------------------------------------------------------------------
# runs: each one trains (or resumes) a model in its own process, then measures it; its figures are a
# flat {key: number}


def run_script(script, argv, stem, flags=()):
    """`python <script> <argv> <flags>` in its own process, its output appended to <stem>.log. The argv
    is recorded beside the checkpoint first, so a later call knows whether that checkpoint is ours (and
    resumes it after an interrupt); a run that fails before it saved anything (train.py refusing a flag)
    puts the earlier record back, since the checkpoint there is still the one that record names."""
    record, log_path = Path(f"{stem}.argv.json"), Path(f"{stem}.log")
    earlier, before = (record.read_text() if record.exists() else None), stamp(f"{stem}.pt")
    start = log_path.stat().st_size if log_path.exists() else 0  # this attempt's output begins here
    ck.write_text(record, json.dumps(argv))
    ok = False
    try:
        with open(log_path, "a") as log:
            proc = subprocess.Popen([sys.executable, str(ROOT / script), *argv, *flags], stdout=log,
                                    stderr=subprocess.STDOUT)
            try:
                proc.wait()
            except KeyboardInterrupt:  # Ctrl-C reached the child too: let it save its checkpoint, then stop
                proc.wait(timeout=120)
                raise
        ok = proc.returncode == 0
    finally:
        if not ok and stamp(f"{stem}.pt") == before:
            if earlier is None:
                record.unlink(missing_ok=True)
            else:
                ck.write_text(record, earlier)
    if not ok:
        said = last_line(log_path, start) or "it printed nothing"
        raise EEminiError(f"{script} failed (exit {proc.returncode}): {said} (the run: {script} {shlex.join(argv)}; "
                          f"its output is in {log_path})")


def stamp(path):
    """What tells one version of a file from the next (None: no file)."""
    try:
        s = os.stat(path)
    except FileNotFoundError:
        return None
    return s.st_ino, s.st_mtime_ns, s.st_size


def last_line(path, start):
    """The last line with something on it that a log got after byte `start`: a failed run's reason."""
    with open(path, "rb") as f:
        f.seek(max(start, f.seek(0, os.SEEK_END) - 4096))
        lines = f.read().decode(errors="replace").splitlines()
    said = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return said if len(said) <= 300 else said[:300] + "..."


def read_record(path, valid, redo):
    """One of the runs folder's bookkeeping files (a run's figures, its argv), as JSON; anything else is
    refused in one line. Each is written atomically, so damage comes from outside (an edit, a bad copy),
    and only the user can say whether what it held matters."""
    try:
        obj = json.loads(Path(path).read_text())
        why = None if valid(obj) else f"not the record reproduce.py writes: a JSON {type(obj).__name__}"
    except OSError as e:
        why = e.strerror
    except ValueError as e:  # not UTF-8, not JSON, cut short
        why = f"not JSON: {e}"
    if why:
        raise EEminiError(f"{path} is damaged ({why}); delete it, and the next run {redo}")
    return obj


def good_side(d):
    """Is d a <run>.json as run_all writes it?"""
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    return (isinstance(d, dict) and isinstance(d.get("argv"), list) and number(d.get("seconds"))
            and (d.get("finished") is None or number(d["finished"])) and isinstance(d.get("metrics"), dict)
            and all(number(v) for v in d["metrics"].values()))


def recorded_argv(stem):
    """The argv <stem>.pt was started with (None: not recorded)."""
    side = Path(f"{stem}.argv.json")
    if not side.exists():
        return None
    return read_record(side, lambda a: isinstance(a, list) and all(isinstance(x, str) for x in a),
                       "trains that run again from the start, replacing its checkpoint")


def ours(stem, argv):
    """Is <stem>.pt a checkpoint this exact argv started?"""
    return Path(f"{stem}.pt").exists() and recorded_argv(stem) == argv


def measure_model(path, args):
    """Per-layer PPL and the training curve; for a model with a trained exit, masked and true-exit rows
    at every threshold and the oracle frontier on valid, and the masked rows on test (where a claim
    picks a threshold on valid, test says how it fares)."""
    ckpt = ck.load_checkpoint(path, args.device)
    model, vocab = ck.model_from_checkpoint(ckpt, args.device)
    cfg, ids = model.config, vocab.encode(read_split(args.data, "valid")[0][: args.val_chars])
    with cli.autocast(args.device):
        stats = measure.token_stats(model, ids, 64, args.device)
    rec = {f"layer/{k}/ppl": p for k, p in measure.layer_ppl(stats).items()}
    rec["full/ppl"] = rec[f"layer/{cfg.n_layer}/ppl"]
    rec.update({f"history/{h['step']}/{k}": p for h in ckpt.get("history", []) for k, p in h["val_ppl"].items()})
    if not cfg.exits or cfg.trained_exits != cfg.exits:  # --loss final: an untrained exit head, nothing to route
        return rec
    rec["exit_only/ppl"] = rec[f"layer/{cfg.exits[0]}/ppl"]
    for r in measure.masked_sweep(stats, cfg, THRESHOLDS, ["softmax"]):
        rec.update({f"masked/{r['threshold']:g}/{m}": r[m] for m in ("ppl", "shallow", "compute", "flops",
                                                                     "delta_ppl", "oracle_ppl")})
        routed = measure.read_off(stats, "ce", measure.routed_depth(stats, r["threshold"], cfg), cfg)
        _, (lo, hi) = un.bootstrap(routed, stats["ce"][cfg.n_layer], cfg.block_size)
        rec[f"masked/{r['threshold']:g}/delta_lo"], rec[f"masked/{r['threshold']:g}/delta_hi"] = lo, hi
    if Path(args.data).is_file():  # one text file has no test split
        return rec
    test_ids = vocab.encode(read_split(args.data, "test")[0][: args.val_chars])
    with cli.autocast(args.device):
        test = measure.token_stats(model, test_ids, 64, args.device)
    rec["test/full/ppl"] = measure.ppl(test["ce"][cfg.n_layer])
    rec.update({f"test/masked/{t:g}/ppl": measure.routed_metrics(test, t, cfg)["ppl"] for t in THRESHOLDS})
    for t in THRESHOLDS:
        with cli.autocast(args.device):
            e = measure.exit_metrics(model, ids, t, 64, args.device)
        rec.update({f"exit/{t:g}/{m}": e[m] for m in ("ppl", "shallow", "compute", "flops")})
    for j, o in enumerate(measure.Oracle(stats, cfg).frontier(ORACLE_POINTS)):
        rec[f"oracle/{j}/ppl"], rec[f"oracle/{j}/compute"] = o["ppl"], o["compute"]
    return rec


def run_one(script, argv, stem, args):
    """Train (or resume) one model, then its figures; and whether its checkpoint was there before (kept)."""
    path = Path(f"{stem}.pt")
    argv = [*argv, "--out", str(path), "--device", args.device, *(["--threads", str(args.threads)] if args.threads else [])]
    kept = ours(stem, argv)
    if script == "train.py":
        run_script(script, argv, stem, ["--resume" if kept else "--overwrite"])
        return measure_model(path, args), kept
    if not kept:
        run_script(script, argv, stem, ["--overwrite"])
    ckpt = ck.load_checkpoint(path)  # a cascade's figures are the ones exit_classifier.py measured and saved
    return flatten({ckpt["names"][m]: r for m, r in ckpt["metrics"].items()}), kept


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
    """Every (experiment, seed), seed by seed, --jobs at a time; returns {name: [per-seed records]}."""
    out = Path(args.out_dir)
    jobs = []
    curves = [(f"curve-{name}", script, what, spec) for name, script, what, spec in RUNS if name in CURVES]
    for k in range(args.seeds):
        for name, script, _, spec in [*RUNS, *(curves if k == 0 else [])]:
            common = ["--data", args.data, "--val-chars", str(args.val_chars), "--seed", str(SEED0 + k)]
            if script == "train.py":
                iters, evals = (args.curve_iters, 16) if name.startswith("curve-") else (args.max_iters, 2)
                argv = [*common, "--max-iters", str(iters), "--eval-interval", str(max(1, iters // evals)),
                        "--log-interval", str(max(1, iters // 10)), *spec, *args.train_args]
            else:
                argv = [*common, *spec, *args.ec_args]
            side = out / f"{name}-seed{k}.json"
            done = read_record(side, good_side, "redoes that run (a finished checkpoint is only measured again)") \
                if side.exists() else None
            if done and "finished" not in done:  # older side files: when they were written
                done["finished"] = side.stat().st_mtime
            jobs.append((name, script, k, argv, side, done if done and done["argv"] == argv else None))
    if args.remeasure and all(done is None for *_, done in jobs):  # a wrong --out-dir, most likely
        raise EEminiError(f"--remeasure measures finished runs again, and {out} holds none of these {len(jobs)} runs "
                          f"(another --out-dir?); without --remeasure they are trained")
    todo, t0, times = [j for j in jobs if j[-1] is None or args.remeasure], time.time(), []
    for name, _, k, *_ in todo:  # a damaged argv record is refused now, not when its run comes up
        ours(out / f"{name}-seed{k}", None)

    def work(job):
        name, script, k, argv, side, earlier = job
        start = time.time()
        metrics, kept = run_one(script, argv, out / f"{name}-seed{k}", args)
        done = {"argv": argv, "seconds": time.time() - start, "finished": time.time(), "metrics": metrics}
        if earlier and kept:  # measured again: the run still took what its training took
            done = {**earlier, "metrics": metrics}
        ck.write_text(side, json.dumps(done))
        return done, time.time() - start

    for i, (name, _, k, *_, done) in enumerate(jobs, 1):
        if done is not None and not args.remeasure:
            print(f"[{i:2d}/{len(jobs)}] {name} seed {k} | finished earlier, skipped")
    finished = {}
    pool = ThreadPoolExecutor(args.jobs)  # each job is its own process; threads only wait for them
    try:
        futures = {pool.submit(work, j): j for j in todo}
        for n, future in enumerate(as_completed(futures), 1):
            name, _, k, *_ = job = futures[future]
            done, took = future.result()
            finished[id(job)] = done
            times.append(took)
            eta = statistics.fmean(times) * (len(todo) - n) / args.jobs
            print(f"[{jobs.index(job) + 1:2d}/{len(jobs)}] {name} seed {k} | {cli.fmt_time(took)} | "
                  f"{headline(done['metrics'])} | elapsed {cli.fmt_time(time.time() - t0)} | ETA {cli.fmt_time(eta)}")
    finally:  # a failed run or Ctrl-C: the runs not started yet are dropped, not run one after another
        pool.shutdown(wait=True, cancel_futures=True)
    records = {}
    for job in jobs:
        done = finished.get(id(job)) or job[-1]
        records.setdefault(job[0], []).append({**done["metrics"], "seconds": done["seconds"], "finished": done["finished"]})
    return records


def headline(m):
    if "full/ppl" not in m:
        return "final PPL " + " ".join(f"{x} {m[f'{x}/final_ppl']:.2f}" for x in S004_METHODS)
    routed = f" | routed@{TAU:g} PPL {m[f'masked/{TAU:g}/ppl']:.3f}" if f"masked/{TAU:g}/ppl" in m else ""
    return f"full PPL {m['full/ppl']:.3f}{routed}"


# ----------------------------------------------------------------------------------------------
# verdicts: each claim of seeds.CLAIMS is a rule over measured (mean, std, n) quantities


def below(a, b):
    """Is mean a below mean b by more than the two stds combined?"""
    noise = math.hypot(a[1], b[1])
    return "supported" if b[0] - a[0] > noise else "not supported" if a[0] - b[0] > noise else "inconclusive (within noise)"


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


def rule_lower(q, size):
    if not q[1][0]:  # no relative difference to a zero (e.g. no token exits at all)
        return below(*q), ""
    rel = 100 * (q[0][0] / q[1][0] - 1)
    return below(*q) if size is None else sized(below(*q), rel, size), f"{rel:+.1f}%"


def rule_saves(q, size):  # size: the % of compute the seed says was saved
    saved = (100 - q[0][0], q[0][1])
    verdict = "supported" if saved[0] + saved[1] >= size else sized(below((0.0, 0.0), saved), saved[0], size)
    return verdict, f"{saved[0]:.1f}% saved"


def rule_picked(q, _):
    """q: [full depth on test, each threshold on valid ..., the same thresholds on test ...]. The
    extra text is the one comparison made: the threshold best on valid, on test, against full depth."""
    n = (len(q) - 1) // 2
    best = min(range(n), key=lambda i: q[1 + i][0])
    a, b = q[1 + n + best], q[0]
    return below(a, b), f"#{best + 1} of the thresholds is best on valid; on test {a[0]:.3f} ± {a[1]:.3f} against " \
        f"full depth {b[0]:.3f} ± {b[1]:.3f}"


RULES = {
    "lower": rule_lower,  # the first below the second
    "saves": rule_saves,  # 100 - compute reaches the seed's saving
    "falls": lambda q, _: ("supported" if all(b[0] < a[0] for a, b in zip(q, q[1:])) else "partly (not at every step)"
                           if q[-1][0] < q[0][0] else "not supported", ""),
    "order": lambda q, _: (all_of([below(a, b) for a, b in zip(q, q[1:])]), ""),  # ascending, beyond noise
    "lowest": lambda q, _: (all_of([below(q[0], b) for b in q[1:]]), ""),
    "highest": lambda q, _: (all_of([below(b, q[0]) for b in q[1:]]), ""),
    "pairs_lower": lambda q, _: (all_of([below(a, b) for a, b in zip(q[::2], q[1::2])]), ""),
    "not_above": lambda q, _: ("not supported" if below(q[1], q[0]) == "supported" else "supported", ""),
    "picked": rule_picked,  # the threshold best on valid, on test, below full depth on test
    "at_most": lambda q, limit: ("supported" if max(a[0] for a in q) <= limit else "not supported",
                                 f"max {max(a[0] for a in q):+.1f}%"),
    "bumpy": lambda q, _: ("supported" if any(b[0] - a[0] > math.hypot(a[1], b[1]) for a, b in zip(q, q[1:])) and any(
        a[0] - b[0] > math.hypot(a[1], b[1]) for a, b in zip(q, q[1:])) else "not supported", ""),
}


def findings(A):
    """[(seed, claim, verdict, the numbers behind it)] for every claim of seeds.CLAIMS; a claim whose
    runs are missing is 'not measured' (the others stand)."""
    rows = []
    for seed, claim, rule, names, size in CLAIMS:
        q = [A(*name.split(":")) for name in names]
        if any(x is None for x in q):
            rows.append([seed, claim, "not measured", "missing: " + ", ".join(n for n, x in zip(names, q) if x is None)])
            continue
        verdict, extra = RULES[rule](q, size)
        numbers = ", ".join(f"{n.replace(':', ' ')} {x[0]:.2f} ± {x[1]:.2f}" for n, x in zip(names, q))
        rows.append([seed, claim, verdict, extra if rule == "picked" else numbers + (f" ({extra})" if extra else "")])
    return rows


# ----------------------------------------------------------------------------------------------
# RESULTS.md: every seed table in the seed's own layout; each cell "mean ± std [the seed's figure]"

TITLE = "# Results: the seed experiments, reproduced"  # the first lines that tell reproduce.py's own files
CSV_HEAD = ["model", "key", "mean", "std", "n", "per_seed"]
TH = ["Threshold", "PPL", "Shallow%", "Compute%"]
EC_FINAL = {"Final PPL": ("final_ppl", 2, ""), "Accuracy": ("accuracy", 2, "%"), "Shallow ratio": ("shallow", 1, "%"),
            "Compute savings (layers)": ("saved", 1, "%"), "FLOP savings": ("flops_saved", 1, "%"),
            "Final PPL, other context at eval": ("mismatch_ppl", 2, "")}
EC_TRAIN = {"Block 0 val_ppl": ("block0_ppl", 2, ""), "Block 1 val_ppl": ("block_ppl/1", 2, ""),
            "Threshold (Block 0)": ("thresholds/0", 4, ""), "avg_label (Block 0)": ("avg_label/0", 3, "")}


def ci(A, name, t):
    """'+0.12% [-0.05, +0.30]': the mean ΔPPL and the mean bootstrap interval over seeds (— if none)."""
    d, lo, hi = (A(name, f"masked/{t}/{k}") for k in ("delta_ppl", "delta_lo", "delta_hi"))
    return "—" if d is None else f"{d[0]:+.2f}% [{lo[0]:+.2f}, {hi[0]:+.2f}]"


def fmt(a, seed=None, d=2, unit=""):
    s = "—" if a is None else f"{a[0]:.{d}f} ± {a[1]:.{d}f}{unit}"
    return s if seed is None else f"{s} [{seed:g}{unit}]" if isinstance(seed, float) else f"{s} [{seed}]"


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
            [lab["aux"], *row3(A, "aux", TAU, S000["aux"])],
            ["Standard (3L)", fmt(A("std3L", "full/ppl"), S000["std3L"]), "0% [0%]", "100% [100%]"],
            ["Standard (1L)", fmt(A("std1L", "full/ppl"), S000["std1L"]), "100% [100%]", "33.3% [33.3%]"]]),
            "Threshold Analysis:", "", *md(TH, [[f"{t:.2f}", *row3(A, "aux", t, s)] for t, s in S000_AUX.items()]),
            f"### Experiment 4: {lab['e4']}", "", *md(res, [[lab["deepsup"], *row3(A, "deepsup", TAU, S000["deepsup"])]]),
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
                [cfgs[0][0], *row3(A, "asym-a0.7", TAU, S003["asym"])],
                [cfgs[1][0] + " (全層)", *row3(A, "asym_deepsup-a0.7", TAU, S003["asym_deepsup"])]]),
            "Threshold Analysis Comparison:", "", *md(["Config", *TH],
                                                      [[c, f"{t:.2f}", *row3(A, n, t, s[t])] for t in (0.7, 0.8, 0.9, 0.95) for c, n, s in cfgs]),
            "### αの解釈 (what α means)", "", *md(["α値", "意味", "結果 (PPL)"], [
                [f"{a}", m, fmt(A(f"asym-a{a}", f"masked/{TAU:g}/ppl"), s[0])]
                for (a, s), m in zip(S003_ALPHA.items(), ("Deep重視 (deep-weighted)", "バランス (= aux)", "Shallow重視 (shallow-weighted)"))])]


def seed004(A):
    out = []
    for title, rows in (("最終評価 (final evaluation, true early exit, held-out text)", EC_FINAL), ("訓練過程 (training)", EC_TRAIN)):
        body = [[metric, *(fmt(A("seed004", f"{m}/{key}"), S004.get(metric, ("-",) * 3)[i], d, unit)
                           for i, m in enumerate(S004_METHODS))] for metric, (key, d, unit) in rows.items()]
        out += [f"### {title}", "", *md(["指標", *S004_METHODS], body)]
    return out


def training_curves(agg, args):
    """Validation PPL against training steps of the curve runs (one seed), the chosen budget marked."""
    series, rows = [], {}
    for name, marker in zip(CURVES, "13*"):
        hist = sorted((int(k.split("/")[1]), k.split("/")[2], v[0]) for k, v in agg.get(f"curve-{name}", {}).items()
                      if k.startswith("history/"))
        if not hist:
            continue
        top = max(int(layer) for _, layer, _ in hist)
        pts = [(step, ppl) for step, layer, ppl in hist if int(layer) == top]
        series.append((marker, name, pts))
        for step, ppl in pts:
            rows.setdefault(step, {})[name] = ppl
    if not series:
        return []
    names = [n for _, n, _ in series]
    table = [[f"{step:,}" + (" ← the budget" if step == args.max_iters else ""),
              *(f"{rows[step][n]:.3f}" if n in rows[step] else "—" for n in names)] for step in sorted(rows)]
    return ["```", *ascii_plot([(m, pts) for m, _, pts in series], x_max=args.curve_iters, xlabel="training steps",
                               ylabel="val PPL (full depth)"),
            "   " + "   ".join(f"{m} {n}" for m, n, _ in series), "```", "",
            *md(["Step", *(f"{n} (full depth)" for n in names)], table)]


def plots(A, res_dir):
    """PPL against Compute for every model with an exit: masked, true exit, oracle frontier (means)."""
    out, png = [], can_draw()
    for name, _, what, _ in RUNS:
        if A(name, "masked/0/ppl") is None:
            continue
        curve = {mode: [(A(name, f"{mode}/{t:g}/compute")[0], A(name, f"{mode}/{t:g}/ppl")[0]) for t in THRESHOLDS]
                 for mode in ("masked", "exit")}
        orc = [(A(name, f"oracle/{j}/compute")[0], A(name, f"oracle/{j}/ppl")[0]) for j in range(ORACLE_POINTS)]
        out += [f"### {what}", "", "```", *ascii_plot([(".", orc), ("*", curve["masked"]), ("+", curve["exit"])]),
                "   * masked routing   + true early exit   . oracle frontier", "```", ""]
        path = Path(res_dir) / "results" / f"{name}.png"
        if png and save_png(str(path), [("masked", curve["masked"]), ("true exit", curve["exit"])], orc):
            out += [f"![{what}](results/{name}.png)", ""]
    return out


def refuse_others(args):
    """--results and the results.csv beside it replace only what reproduce.py wrote there itself (known by
    its first line), never a README or someone else's table; refused before any run."""
    md_path = Path(args.results)
    for path, first in ((md_path, TITLE), (md_path.with_name("results.csv"), ",".join(CSV_HEAD))):
        if path.exists() and first_line(path) != first:
            raise EEminiError(f"--results {args.results} would replace {path}, which reproduce.py did not write; pick "
                              f"another --results path, or delete that file")


def first_line(path):
    """A file's first line (None if it cannot be read: a folder, no permission)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().rstrip("\r\n")
    except OSError:
        return None


def report(records, args):
    """RESULTS.md text and results.csv text."""
    runs = [r for recs in records.values() for r in recs]
    total = sum(r["seconds"] for r in runs)
    ends = [r["finished"] for r in runs]  # None: not recorded
    span = None if None in ends else max(ends) - min(e - r["seconds"] for e, r in zip(ends, runs))
    records = {name: [{k: v for k, v in r.items() if k != "finished"} for r in recs] for name, recs in records.items()}
    agg = {name: aggregate(recs) for name, recs in records.items()}
    A = lambda name, key: agg.get(ALIASES.get(name, name), {}).get(key)  # noqa: E731
    cmd = (f"python reproduce.py --data {args.data or '(download)'} --seeds {args.seeds} --max-iters {args.max_iters} "
           f"--val-chars {args.val_chars} --jobs {args.jobs}" + (f" --train-args '{shlex.join(args.train_args)}'" if args.train_args else "")
           + (f" --ec-args '{shlex.join(args.ec_args)}'" if args.ec_args else "") + (" --remeasure" if args.remeasure else ""))
    t = f"{TAU:g}"
    head = [[what, *(fmt(A(name, k), d=d, unit=u) for k, d, u in (
        ("full/ppl", 3, ""), ("exit_only/ppl", 3, ""), (f"masked/{t}/ppl", 3, ""), (f"exit/{t}/ppl", 3, ""),
        (f"masked/{t}/oracle_ppl", 3, ""), (f"masked/{t}/shallow", 1, "%"), (f"masked/{t}/compute", 1, "%"),
        (f"exit/{t}/flops", 1, "%"))), ci(A, name, t)]
        for name, script, what, _ in RUNS if script == "train.py" and name in agg]
    lines = [TITLE, "",
             f"Written by `{cmd}` on {time.strftime('%Y-%m-%d')}: {cli.machine(args.device)}, device {args.device}. "
             + (f"The runs took {cli.fmt_time(span)} from the first start to the last end, {args.jobs} at a time "
                f"({cli.fmt_time(total)} counting each one alone)." if span is not None else
                f"The runs took {cli.fmt_time(total)} counting each one alone (when each ran is not recorded)."), "",
             f"Each cell: mean ± sample std over {args.seeds} random seed(s), [the seed report's figure] beside it. "
             f"Every train.py model: {args.max_iters} steps of 32 x 128 characters (an equal budget), "
             f"validation PPL on the first {args.val_chars:,} characters of the valid split. Where a table has no "
             f"threshold column, routed figures are masked routing at threshold {t} (the seeds' quality setting). "
             "The code behind seeds 000-003 trained on a two-sentence placeholder text when WikiText was missing, so their absolute "
             "figures are not expected to match; the verdicts below test the directions they claim.", ""]
    lines += ["## Headline", "", *md(["Model", "Full-depth PPL", "Exit-only PPL", f"Routed PPL @{t} (masked)",
                                      f"Routed PPL @{t} (true exit)", "Oracle PPL at that compute", "Shallow%",
                                      "Compute%", "FLOPs% (true exit)", f"ΔPPL @{t} (masked) [95% CI]"], head),
              "The last column: the routed PPL's increase over full depth, mean over seeds, with the mean of each "
              "seed's paired bootstrap interval over validation windows (1,000 resamples).", ""]
    lines += ["## PPL against training steps", "", f"Standard 1L, Standard 3L and asym α 0.7 trained for "
              f"{args.curve_iters:,} steps (seed 0), evaluated every {max(1, args.curve_iters // 16):,}: where depth "
              f"starts to pay, and the budget every model above gets ({args.max_iters:,} steps).", "",
              *training_curves(agg, args)]
    for seed, title, body in (("000", "Experiments 3 & 4", seed000(A, LABELS["000"])),
                              ("001", "Experiments 3 & 4 (seed 000's runs, seed 001's names)", seed000(A, LABELS["001"])),
                              ("002", "Threshold sweep (4 layers, exit 2)", seed002(A)),
                              ("003", "Experiments 5 & 6: asymmetric auxiliary loss", seed003(A)),
                              ("004", "Exit classifier comparison", seed004(A))):
        lines += [f"## Seed {seed}: {title}", "", *body]
    lines += ["## PPL against Compute", "", *plots(A, Path(args.results).parent), "## Key findings", "",
              *md(["Seed", "Finding", "Verdict", "Measured (mean ± std)"], findings(A))]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_HEAD)
    for name, recs in records.items():
        for key, (mean, sd, n) in agg[name].items():
            w.writerow([name, key, f"{mean:.6g}", f"{sd:.6g}", n, ";".join(f"{r[key]:.6g}" for r in recs if key in r)])
    return "\n".join(lines), buf.getvalue()


def main(args):
    t0 = time.time()
    if args.jobs > 1 and not args.threads:  # share the cores; children and measurements alike
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    args.device = cli.pick_device(args.device, args.threads)
    for split in ("train", "valid"):  # a bad --data fails here, not in the first of many runs
        read_split(args.data, split)
    print(f"reproduce: {args.seeds} seed(s) x {len(RUNS)} experiments | {args.max_iters} steps per train.py model | "
          f"device {args.device} | runs in {args.out_dir}")
    ck.check_output(args.results, "--results", ".md")  # and a bad place for what is written at the end,
    refuse_others(args)  # or a file there that is not ours
    ck.make_folder(Path(args.out_dir))
    records = run_all(args)
    text, table = report(records, args)
    ck.write_text(args.results, text)
    ck.write_text(Path(args.results).with_name("results.csv"), table)
    print(f"wrote {args.results} and {Path(args.results).with_name('results.csv')} | {cli.fmt_time(time.time() - t0)}")
    return records


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
