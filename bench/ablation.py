"""
What each part of the training recipe buys: validation PPL and training step time of a plain model
(--loss final) at the quick-start budget, GPT-2's layout with one change at a time, then together,
at 3 layers and at 1 layer. Every PPL comes from a full `python train.py` run (--jobs of them side
by side, one thread each, so every figure is exact at one thread); step times from short runs of
the same command, one at a time, interleaved over --rounds.

    python bench/ablation.py --data ../shared/data/wikitext-2 --jobs 2     # ~45 min on 2 cores
    python bench/ablation.py --data ../shared/data/wikitext-2 --max-iters 200 --only gpt2,recipe
"""

import json
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint as ck  # noqa: E402
import cli  # noqa: E402
from data import read_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPT2 = ["--gpt2"]
VARIANTS = [  # (name, what it is, train.py flags)
    ("gpt2", "GPT-2 layout, AdamW, 500,000 characters (eemini before)", [*GPT2, "--train-chars", "500000"]),
    ("gpt2-1M", "GPT-2 layout, AdamW, 1,000,000 characters", GPT2),
    ("muon", "+ Muon for the blocks' matrices", [*GPT2, "--optimizer", "muon"]),
    ("rope", "+ rotary positions", [*GPT2, "--pos", "rope"]),
    ("relu2", "+ ReLU² MLP", [*GPT2, "--mlp", "relu2"]),
    ("qk", "+ QK-norm", [*GPT2, "--qk-norm"]),
    ("rms", "+ RMSNorm", [*GPT2, "--norm", "rms"]),
    ("rope-muon", "+ rotary + Muon", [*GPT2, "--pos", "rope", "--optimizer", "muon"]),
    ("recipe", "rotary + RMSNorm + ReLU² + Muon, 1,000,000 characters (the default)", []),
    ("recipe-qk", "the default + QK-norm", ["--qk-norm"]),
    ("recipe-500k", "the default on 500,000 characters (16 passes over the text, not 8)", ["--train-chars", "500000"]),
]
LAYERS = {"3L": ["--n-layer", "3"], "1L": ["--n-layer", "1", "--exit-layers", "0"]}


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    cli.add_data(p, split=False)
    p.add_argument("--max-iters", type=cli.number(int, 1), default=2000, help="training steps of every run")
    p.add_argument("--only", type=cli.comma_list(str), default=[], help="variant names to run (default all)")
    p.add_argument("--jobs", type=cli.number(int, 1), default=2, help="training runs side by side (one thread each)")
    p.add_argument("--rounds", type=cli.number(int, 1), default=3, help="interleaved rounds of the step-time runs")
    p.add_argument("--timing-steps", type=cli.number(int, 2), default=40, help="steps of each step-time run")
    p.add_argument("--out-dir", default="runs/ablation", help="checkpoints and logs")
    args = p.parse_args(argv)
    unknown = set(args.only) - {name for name, _, _ in VARIANTS}
    if unknown:
        p.error(f"--only names no variant {', '.join(sorted(unknown))}; the variants: "
                f"{', '.join(name for name, _, _ in VARIANTS)}")
    return args


def train(flags, log, threads):
    """One `python train.py` run; its output goes to log."""
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, "--threads", str(threads)], stdout=f,
                           stderr=subprocess.STDOUT)
    if r.returncode:
        raise cli.EEminiError(f"train.py {' '.join(flags)} failed; see {log}")
    return Path(log).read_text()


def main(args):
    read_split(args.data, "train")  # a bad --data fails here, not in the first run's log
    out = Path(args.out_dir)
    variants = [v for v in VARIANTS if not args.only or v[0] in args.only]
    runs = [(f"{name}-{layers}", [*flags, *LAYERS[layers]]) for name, _, flags in variants for layers in LAYERS
            if not (layers == "1L" and name in ("qk", "recipe-qk"))]
    common = ["--data", args.data, "--val-chars", str(args.val_chars), "--loss", "final", "--overwrite"]
    print(f"ablation: {len(runs)} runs of {args.max_iters} steps, {args.jobs} at a time | {cli.machine()}")
    ck.make_folder(out)

    def ppl_run(run):
        name, flags = run
        log = train([*common, *flags, "--max-iters", str(args.max_iters), "--out", str(out / f"{name}.pt")],
                    out / f"{name}.log", 1)
        ckpt = ck.load_checkpoint(out / f"{name}.pt")
        ppl = ckpt["metrics"]["val_ppl"][str(ckpt["config"]["n_layer"])]
        print(f"{name}: val PPL {ppl:.3f}", flush=True)
        return name, ppl, log

    with ThreadPoolExecutor(args.jobs) as pool:
        ppl = {name: p for name, p, _ in pool.map(ppl_run, runs)}
    ms = {name: [] for name, _ in runs}
    for _ in range(args.rounds):  # step time: each alone, at the default thread count, interleaved
        for name, flags in runs:
            log = train([*common, *flags, "--max-iters", str(args.timing_steps), "--log-interval", str(args.timing_steps),
                         "--eval-interval", "1000000", "--val-chars", "2000", "--out", str(out / "timing.pt")],
                        out / "timing.log", 0)
            ms[name].append(float(re.search(r"\| +([\d.]+) ms \|", log).group(1)))
    ms = {name: statistics.median(v) for name, v in ms.items()}
    (out / "ablation.json").write_text(json.dumps({"ppl": ppl, "ms": ms}, indent=1))
    print(f"\n| change (quick-start budget: {args.max_iters} steps of 32 x 128) | val PPL, 3 layers | val PPL, 1 layer | "
          "depth gain | ms/step, 3 layers | ms/step, 1 layer |")
    print("|---|---|---|---|---|---|")
    for name, what, _ in variants:
        a, b = ppl.get(f"{name}-3L"), ppl.get(f"{name}-1L")
        gain = f"{100 * (1 - a / b):.1f}%" if a and b else "—"
        cell = lambda v, d: f"{v:.{d}f}" if v is not None else "—"  # noqa: E731
        print(f"| {what} | {cell(a, 3)} | {cell(b, 3)} | {gain} | {cell(ms.get(f'{name}-3L'), 1)} | "
              f"{cell(ms.get(f'{name}-1L'), 1)} |")
    print(f"\nPPL at one thread (exact there); ms/step median of {args.rounds} runs of {args.timing_steps} steps, "
          f"alone, torch's default threads; depth gain = how much lower the 3-layer PPL is than the 1-layer one")


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
