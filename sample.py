"""
Generate text from a checkpoint with true early exit and a KV cache, each character coloured by
the depth that produced it, with tokens/s and the fraction that exited early.

    python sample.py ckpt.pt --prompt "The " --threshold 0.8
    python sample.py ckpt.pt --threshold 1.0 --temperature 0      # greedy, full depth
    python sample.py ckpt.pt --num-samples 4 --max-new-tokens 300 --color never
"""

import sys
import time

import torch

import eemini as ee

SHALLOW, RESET = "\033[32m", "\033[0m"  # exited characters in green, deep ones plain


def parse_args(argv=None):
    p = ee.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="checkpoint written by train.py")
    p.add_argument("--prompt", default="\n", help="text to continue (characters unseen in training map to unknown)")
    p.add_argument("--max-new-tokens", type=int, default=500, help="characters to generate per sample")
    p.add_argument("--num-samples", type=int, default=1, help="samples, generated together as one batch")
    p.add_argument("--threshold", type=float, default=0.9, help="exit when confidence >= this (1.0 = full depth)")
    p.add_argument("--confidence", default="softmax", choices=sorted(ee.CONFIDENCE), help="confidence measure")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely characters (0 = all)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                   help="colour each character by its depth (auto: when writing to a terminal)")
    p.add_argument("--device", default="", help="cuda, mps, cpu ... (empty = autodetect)")
    args = p.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        p.error(f"--threshold {args.threshold} is outside [0, 1]")
    if args.temperature < 0 or args.max_new_tokens < 1 or args.num_samples < 1 or args.top_k < 0:
        p.error("--temperature and --top-k must be >= 0, --max-new-tokens and --num-samples >= 1")
    return args


def render(text, depths, exit_layer, color):
    if not color:
        return text
    return "".join(f"{SHALLOW}{ch}{RESET}" if d <= exit_layer else ch for ch, d in zip(text, depths))


def main(args):
    device = ee.pick_device(args.device)
    ckpt = ee.load_checkpoint(args.ckpt, device)
    model, vocab = ee.model_from_checkpoint(ckpt, device)
    if not args.prompt:
        raise ee.EEminiError("--prompt is empty; give at least one character")
    why = ee.untrained_exit(ckpt)
    if why and args.threshold < 1.0:
        raise ee.EEminiError(f"{args.ckpt} {why}; generate at full depth with --threshold 1.0")
    cfg = model.config
    prompt = vocab.encode(args.prompt).to(device).repeat(args.num_samples, 1)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()
    with ee.autocast(device):
        ids, depths = model.generate(prompt, args.max_new_tokens, args.threshold, args.temperature,
                                     args.top_k or None, args.confidence, gen)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    for i in range(args.num_samples):
        new = ids[i, prompt.size(1):].tolist()
        print(args.prompt + render(vocab.decode(new), depths[i].tolist(), cfg.exit_layer, color))
        print("-" * 60)
    shallow = (depths <= cfg.exit_layer).float().mean().item()
    print(f"{depths.numel():,} characters in {dt:.2f}s = {depths.numel() / dt:,.0f} tok/s | "
          f"exited at layer {cfg.exit_layer}: {100 * shallow:.1f}% | Compute "
          f"{ee.compute_percent(depths, cfg.n_layer):.1f}% | threshold {args.threshold}"
          + (f" | {SHALLOW}green{RESET} = exited early" if color else ""))


if __name__ == "__main__":
    ee.run_cli(main, parse_args)
