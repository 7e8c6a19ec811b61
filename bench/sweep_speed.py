"""
Is a whole masked sweep about one evaluation pass? Times, side by side and interleaved, one
measure.token_stats pass and a full sweep (token_stats + every row of measure.masked_sweep, oracle
included) on the same checkpoint and text; prints the median of each and their ratio (target <= 1.3).

    python bench/sweep_speed.py ckpt.pt --data ../shared/data/wikitext-2
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint as ck  # noqa: E402
import cli  # noqa: E402
import measure  # noqa: E402

THRESHOLDS = [i / 10 for i in range(11)]


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    cli.add_checkpoint(p)
    cli.add_data(p, from_checkpoint=True)
    p.add_argument("--repeats", type=cli.number(int, 1), default=5, help="timed repeats of each (after one warm-up)")
    cli.add_eval_batch_size(p)
    cli.add_device(p)
    return p.parse_args(argv)


def main(args):
    device = cli.pick_device(args.device, args.threads)
    ckpt, model, vocab = ck.load_with_exit(args.checkpoint, device, ", so there is no sweep to time")  # as sweep.py
    ids, _ = ck.eval_text(args, ckpt, vocab)

    def one_eval():
        return measure.token_stats(model, ids, args.eval_batch_size, device)

    def whole_sweep():
        return measure.masked_sweep(one_eval(), model.config, THRESHOLDS, ["softmax"])

    times = {"eval": [], "sweep": []}
    for i in range(args.repeats + 1):
        for name, fn in (("eval", one_eval), ("sweep", whole_sweep)):
            cli.synchronize(device)
            t0 = time.perf_counter()
            fn()
            cli.synchronize(device)
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    ev, sw = statistics.median(times["eval"]), statistics.median(times["sweep"])
    print(f"device {device} | {torch.get_num_threads()} threads | {len(ids):,} chars | "
          f"{len(THRESHOLDS)} thresholds | median of {args.repeats}")
    print(f"one evaluation pass {ev:.3f} s | whole sweep {sw:.3f} s | ratio {sw / ev:.2f}")


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
