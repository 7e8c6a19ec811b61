"""
Generation speed with true early exit: tokens/s of the plain full-depth model against early exit at
a threshold where about half the characters exit, side by side in one run, at batch 1 and a larger
batch; beside the layer-count speedup and the PPL that true early exit costs at that threshold.

    python bench/generate.py ckpt.pt --data ../shared/data/wikitext-2
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint as ck  # noqa: E402
import cli  # noqa: E402
import eemini as ee  # noqa: E402
import measure  # noqa: E402
from data import eval_ids  # noqa: E402


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    cli.add_checkpoint(p)
    cli.add_data(p, from_checkpoint=True)
    p.add_argument("--batch-sizes", type=cli.comma_list(cli.number(int, 1)), default=[1, 16],
                   help="generation batch sizes, comma list")
    p.add_argument("--new-tokens", type=cli.number(int, 1), default=300, help="characters generated per timed run")
    p.add_argument("--rounds", type=cli.number(int, 1), default=10, help="rounds, alternating full depth and early exit")
    cli.add_device(p)
    return p.parse_args(argv)


def tokens_per_s(model, prompt, new, threshold, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    cli.synchronize(device)
    t0 = time.perf_counter()
    with cli.autocast(device):
        _, depths = model.generate(prompt, new, threshold, temperature=1.0, generator=gen)
    cli.synchronize(device)
    return prompt.size(0) * new / (time.perf_counter() - t0), depths


def main(args):
    device = cli.pick_device(args.device, args.threads)
    ckpt = ck.load_checkpoint(args.checkpoint, device)
    model, vocab = ck.model_from_checkpoint(ckpt, device)
    cfg = model.config
    trained = ckpt.get("args") or {}
    val, source = eval_ids(args.data if args.data is not None else trained.get("data", ""), args.split,
                           args.val_chars if args.val_chars is not None else trained.get("val_chars", 50_000), vocab)
    stats = measure.token_stats(model, val, 64, device)
    tau = round(stats["conf"]["softmax"][cfg.exits[0]].median().item(), 3)  # ~50% exit on val text
    full, exit_row = measure.exit_metrics(model, val, 1.0, 64, device), measure.exit_metrics(model, val, tau, 64, device)
    print(f"device {device} ({torch.get_num_threads()} threads) | {args.checkpoint}: {cfg.n_layer} layers, exit after "
          f"{cfg.exits[0]}, n_embd {cfg.n_embd} | threshold {tau} (median exit confidence on {len(val):,} chars of {source})")
    print(f"true-exit PPL: full depth {full['ppl']:.3f} -> early exit {exit_row['ppl']:.3f} "
          f"({100 * (exit_row['ppl'] / full['ppl'] - 1):+.1f}%), shallow {exit_row['shallow']:.1f}%")
    print("| batch | full depth tok/s | early exit tok/s | speedup | shallow | layer-count speedup | ratio |")
    print("|---|---|---|---|---|---|---|")
    for bs in args.batch_sizes:
        prompt = val[:32].to(device).repeat(bs, 1)
        fast, slow, depths = [], [], None
        for r in range(args.rounds + 1):  # round 0 warms up
            f, _ = tokens_per_s(model, prompt, args.new_tokens, None, device, r)
            e, depths = tokens_per_s(model, prompt, args.new_tokens, tau, device, r)
            if r:
                slow.append(f)
                fast.append(e)
        speedup = statistics.median(fast) / statistics.median(slow)
        layer_speedup = 100.0 / ee.compute_percent(depths, cfg.n_layer)
        print(f"| {bs} | {statistics.median(slow):,.0f} | {statistics.median(fast):,.0f} | {speedup:.2f}x "
              f"| {100 * (depths < cfg.n_layer).float().mean():.1f}% | {layer_speedup:.2f}x "
              f"| {speedup / layer_speedup:.2f} |")
    print("full depth = the plain model (no exit checks); ratio = measured / layer-count speedup (target >= 0.8)")


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
