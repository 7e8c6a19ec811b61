"""
How well each exit drafts for self-speculative decoding, model beside model (e.g. trained with and
without --layer-dropout): full-depth PPL, and per exit its PPL, how often its top character is the
last layer's (on the evaluation text), and the share of its greedy drafts the full model accepts
in generation (prompts from the evaluation text, drafts of K). No timing: every figure is exact and
the same on every run at a given thread count.

    python bench/acceptance.py big.pt big-ld2.pt big-ld5.pt
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint as ck  # noqa: E402
import cli  # noqa: E402
import decode  # noqa: E402
import measure  # noqa: E402
from report import md  # noqa: E402


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    p.add_argument("checkpoints", nargs="+", help="checkpoints written by train.py")
    cli.add_data(p, from_checkpoint=True)
    p.add_argument("--draft-length", type=cli.number(int, 1), default=4, help="K, the characters a draft may hold")
    p.add_argument("--prompts", type=cli.number(int, 1), default=8, help="generations, 32-character prompts, one batch")
    p.add_argument("--new-tokens", type=cli.number(int, 1), default=200, help="characters generated after each prompt")
    cli.add_eval_batch_size(p)
    cli.add_device(p)
    return p.parse_args(argv)


def main(args):
    device = cli.pick_device(args.device, args.threads)
    models = {}
    for path in args.checkpoints:  # every file checked before the first is measured
        models[path] = ck.load_with_exit(path, device, " to draft with; train with --exit-layers and a loss on it")
    rows, source = [], None
    for path, (ckpt, model, vocab) in models.items():
        cfg = model.config
        ids, source = ck.eval_text(args, ckpt, vocab)
        stats = measure.token_stats(model, ids, args.eval_batch_size, device)
        full, last = measure.ppl(stats["ce"][cfg.n_layer]), stats["top"][cfg.n_layer]
        starts = (torch.arange(args.prompts) * (len(ids) - 32) // args.prompts).tolist()
        prompt = torch.stack([ids[s : s + 32] for s in starts]).to(device)
        for e in cfg.trained_exits:
            _, spec = decode.speculative(model, prompt, args.new_tokens, e, args.draft_length, temperature=0)
            rows.append([path, f"{full:.3f}", str(e), f"{measure.ppl(stats['ce'][e]):.3f}",
                         f"{100 * (stats['top'][e] == last).float().mean():.1f}%", f"{100 * spec.acceptance:.1f}%",
                         f"{spec.per_cycle:.2f}"])
    print("\n".join(md(["Checkpoint", "Full-depth PPL", "Exit", "Exit PPL", "Top character = last layer's",
                        f"Drafts accepted (K={args.draft_length})", "Characters a pass"], rows)))
    print(f"greedy drafts, {args.prompts} prompts x {args.new_tokens} characters in one batch; PPL and agreement "
          f"on {source}")


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
