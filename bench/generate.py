"""
Generation speed with true early exit: tokens/s of the plain full-depth model against early exit at
a threshold where about half the characters exit, side by side in one run, at batch 1 and a larger
batch; beside the layer-count speedup and the PPL that true early exit costs at that threshold.

    python bench/generate.py ckpt.pt --data ../shared/data/wikitext-2
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eemini as ee  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", nargs="?", default="ckpt.pt", help="checkpoint written by train.py")
    p.add_argument("--data", default=None, help="data folder or file (default: the checkpoint's)")
    p.add_argument("--val-chars", type=int, default=50_000, help="validation characters for threshold and PPL")
    p.add_argument("--batch-sizes", default="1,16", help="comma list of generation batch sizes")
    p.add_argument("--new-tokens", type=int, default=300, help="characters generated per timed run")
    p.add_argument("--rounds", type=int, default=10, help="rounds, alternating full depth and early exit")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--device", default="", help="cuda, mps, cpu (empty = autodetect)")
    return p.parse_args(argv)


def tokens_per_s(model, prompt, new, threshold, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with ee.autocast(device):
        _, depths = model.generate(prompt, new, threshold, temperature=1.0, generator=gen)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return prompt.size(0) * new / (time.perf_counter() - t0), depths


def main(args):
    device = ee.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = ee.load_checkpoint(args.ckpt, device)
    model, vocab = ee.model_from_checkpoint(ckpt, device)
    cfg = model.config
    text, source = ee.read_split(args.data or ckpt["args"]["data"], "valid")
    val = vocab.encode(text[: args.val_chars])
    stats = ee.token_stats(model, val, 64, device)
    tau = round(stats["conf"]["softmax"][cfg.exit_layer].median().item(), 3)  # ~50% exit on val text
    full, exit_row = ee.exit_metrics(model, val, 1.0, 64, device), ee.exit_metrics(model, val, tau, 64, device)
    print(f"device {device} ({torch.get_num_threads()} threads) | {args.ckpt}: {cfg.n_layer} layers, exit after {cfg.exit_layer}, n_embd {cfg.n_embd} "
          f"| threshold {tau} (median exit confidence on {len(val):,} chars of {source})")
    print(f"true-exit PPL: full depth {full['ppl']:.3f} -> early exit {exit_row['ppl']:.3f} "
          f"({100 * (exit_row['ppl'] / full['ppl'] - 1):+.1f}%), shallow {exit_row['shallow']:.1f}%")
    print("| batch | full depth tok/s | early exit tok/s | speedup | shallow | layer-count speedup | ratio |")
    print("|---|---|---|---|---|---|---|")
    for bs in (int(b) for b in args.batch_sizes.split(",")):
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
    main(parse_args())
