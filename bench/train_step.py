"""
Training step time of the early-exit model (exit head + final head, asym loss) against a plain
GPT of the same size with one head, side by side in one run, beside the ratio of their FLOPs.
The exit head is real extra work: with a character vocabulary it can cost a good part of a layer.

    python bench/train_step.py                       # the quick-start model, on the CPU
    python bench/train_step.py --n-embd 256 --n-layer 6 --block-size 256 --device cuda
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import eemini as ee  # noqa: E402
import measure  # noqa: E402


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    p.add_argument("--n-layer", type=cli.number(int, 2), default=3, help="layers")
    p.add_argument("--n-embd", type=cli.number(int, 1), default=64, help="width")
    p.add_argument("--n-head", type=cli.number(int, 1), default=4, help="heads")
    p.add_argument("--block-size", type=cli.number(int, 1), default=128, help="context")
    p.add_argument("--batch-size", type=cli.number(int, 1), default=32, help="sequences per step")
    p.add_argument("--vocab-size", type=cli.number(int, 2), default=260, help="vocabulary (the quick start's: 260)")
    p.add_argument("--steps", type=cli.number(int, 1), default=20, help="timed steps per round")
    p.add_argument("--rounds", type=cli.number(int, 1), default=15, help="rounds, alternating the two models")
    cli.add_device(p)
    return p.parse_args(argv)


def time_steps(model, x, y, opt, steps, device):
    def step():
        with cli.autocast(device):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up, not timed
    cli.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    cli.synchronize(device)
    return 1000 * (time.perf_counter() - t0) / steps


def main(args):
    device = cli.pick_device(args.device, args.threads)
    shape = dict(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                 n_embd=args.n_embd)
    configs = {"early exit (asym)": ee.GPTConfig(**shape, exits=[1]),
               "plain GPT (one head)": ee.GPTConfig(**shape, exits=[])}
    torch.manual_seed(0)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size), device=device)
    y = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size), device=device)
    models = {name: ee.GPT(cfg).to(device).train() for name, cfg in configs.items()}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    ms = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name in configs:
            ms[name].append(time_steps(models[name], x, y, opts[name], args.steps, device))
    cfg = configs["early exit (asym)"]
    layer, head, _ = measure.flops_per_token(cfg)
    flop_ratio = (cfg.n_layer * layer + 2 * head) / (cfg.n_layer * layer + head)
    a, b = (statistics.median(v) for v in ms.values())
    print(f"device {device} | {cfg.n_layer} layers, {cli.width(cfg)}, vocab {cfg.vocab_size}, "
          f"batch {args.batch_size}x{cfg.block_size} | median of {args.rounds} rounds x {args.steps} steps")
    for name, v in ms.items():
        print(f"{name:22s} {statistics.median(v):8.2f} ms/step  (rounds: {' '.join(f'{t:.1f}' for t in v)})")
    print(f"step-time ratio {a / b:.3f} | FLOP ratio {flop_ratio:.3f} | overhead beyond the maths "
          f"{a / b / flop_ratio:.3f} (target <= 1.1)")


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
