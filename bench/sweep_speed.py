"""
Is a whole masked sweep about one evaluation pass? Times, side by side and interleaved, one
ee.token_stats pass and a full sweep (token_stats + every row of sweep.masked_sweep, oracle
included) on the same checkpoint and text; prints the median of each and their ratio (target <= 1.3).

    python bench/sweep_speed.py ckpt.pt --data ../shared/data/wikitext-2
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eemini as ee  # noqa: E402
import sweep  # noqa: E402


def parse_args(argv=None):
    p = ee.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a .pt file written by train.py")
    p.add_argument("--data", default="", help="WikiText folder or text file (default: the checkpoint's)")
    p.add_argument("--val-chars", type=int, default=50_000, help="characters of the valid split")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each (after one warm-up)")
    p.add_argument("--device", default="cpu", help="device to time on")
    return p.parse_args(argv)


def main(args):
    ckpt = ee.load_checkpoint(args.checkpoint, args.device)
    model, vocab = ee.model_from_checkpoint(ckpt, args.device)
    ids = vocab.encode(ee.read_split(args.data or ckpt["args"]["data"], "valid")[0][: args.val_chars])

    def one_eval():
        return ee.token_stats(model, ids, 64, args.device)

    def whole_sweep():
        return sweep.masked_sweep(one_eval(), model.config, sweep.DEFAULT_THRESHOLDS, ["softmax"])

    times = {"eval": [], "sweep": []}
    for i in range(args.repeats + 1):
        for name, fn in (("eval", one_eval), ("sweep", whole_sweep)):
            t0 = time.perf_counter()
            fn()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    ev, sw = statistics.median(times["eval"]), statistics.median(times["sweep"])
    print(f"device {args.device} | {torch.get_num_threads()} threads | {len(ids):,} chars | "
          f"{len(sweep.DEFAULT_THRESHOLDS)} thresholds | median of {args.repeats}")
    print(f"one evaluation pass {ev:.3f} s | whole sweep {sw:.3f} s | ratio {sw / ev:.2f}")


if __name__ == "__main__":
    ee.run_cli(main, parse_args)
