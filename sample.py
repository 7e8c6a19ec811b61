"""
Generate text from a checkpoint with true early exit and a KV cache, each character coloured by
the depth that produced it, with tokens/s and the fraction that exited early; or with
self-speculative decoding (the exit drafts, the full model verifies: the full model's own text).

    python sample.py ckpt.pt --prompt "The " --threshold 0.8
    python sample.py ckpt.pt --threshold 1.0 --temperature 0      # greedy, full depth
    python sample.py ckpt.pt --speculative 4 --temperature 0      # the same text, drafts of 4
    python sample.py ckpt.pt --num-samples 4 --max-new-tokens 300 --color never
"""

import sys
import time

import torch

import checkpoint as ck
import cli
import eemini as ee
import decode
import measure
import routers as learned

SHALLOW, RESET = "\033[32m", "\033[0m"  # exited characters in green, deep ones plain


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    cli.add_checkpoint(p)
    g = p.add_argument_group("text")
    g.add_argument("--prompt", default="\n", help="text to continue (characters unseen in training map to unknown; "
                   "default: a newline)")
    g.add_argument("--max-new-tokens", type=cli.number(int, 1), default=500, help="characters to generate per sample")
    g.add_argument("--num-samples", type=cli.number(int, 1), default=1, help="samples, generated together as one batch")
    g.add_argument("--temperature", type=cli.number(float, 0.0), default=0.8, help="sampling temperature (0 = greedy)")
    g.add_argument("--top-k", type=cli.number(int, 0), default=0, help="sample from the k most likely characters (0 = all)")
    g.add_argument("--seed", type=int, default=1337, help="random seed")
    g.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                   help="colour each character by its depth (auto: when writing to a terminal)")
    g = p.add_argument_group("early exit")
    g.add_argument("--threshold", type=cli.comma_list(cli.threshold), help="exit when confidence >= this (1.0 = full "
                   "depth); one for every exit, or a comma list with one an exit (default: 0.9)")
    g.add_argument("--confidence", help=f"confidence measure: {', '.join(ee.CONFIDENCE)}, or a learned router the "
                   "checkpoint holds (router-kl, router-gain, router-loss, router-consistency) (default: softmax)")
    g = p.add_argument_group("self-speculative decoding")
    g.add_argument("--speculative", type=cli.number(int, 0), default=0, help="drafts of up to this many characters "
                   "(0 = off, early exit instead): the full model's text, not early exit's")
    g.add_argument("--draft-exit", type=cli.number(int, 1), default=None, help="the exit that drafts (default: the "
                   "first trained exit)")
    g.add_argument("--draft-stop", type=cli.number(float, 0.0, 1.0), default=0.0, help="stop a cycle's drafting once "
                   "the drafter's own odds that all its drafts so far are accepted fall below this (0 = always draft "
                   "K; greedy text is the same, sampled text keeps its distribution; only the speed moves)")
    cli.add_device(p.add_argument_group("device"))
    args = p.parse_args(argv)
    if not args.prompt:
        p.error("--prompt is empty; give at least one character")
    if args.threshold == []:
        p.error("--threshold is empty")
    for flag, value in (("--draft-exit", args.draft_exit), ("--draft-stop", args.draft_stop or None)):
        if value is not None and not args.speculative:
            p.error(f"{flag} tunes the drafts of --speculative K; give --speculative too")
    routing = [f for f, v in (("--threshold", args.threshold), ("--confidence", args.confidence)) if v is not None]
    if args.speculative and routing:  # it would be ignored: the text is the full model's
        p.error(f"{' and '.join(routing)} {'route' if len(routing) > 1 else 'routes'} early exit; --speculative K "
                f"writes the full model's text and uses neither: drop {'them' if len(routing) > 1 else 'it'}, or "
                f"--speculative")
    args.threshold = [0.9] if args.threshold is None else args.threshold
    args.confidence = "softmax" if args.confidence is None else args.confidence
    return args


def render(text, depths, n_layer, color):
    if not color:
        return text
    return "".join(f"{SHALLOW}{ch}{RESET}" if d < n_layer else ch for ch, d in zip(text, depths))


def thresholds(args, cfg):
    """--threshold as the model takes it: one number, or {exit: threshold} with one an exit."""
    if len(args.threshold) == 1:
        return args.threshold[0]
    if len(args.threshold) != len(cfg.exits):
        raise ee.EEminiError(f"--threshold has {len(args.threshold)} values; give one, or one for each of the "
                             f"exits {cfg.exits}")
    return dict(zip(cfg.exits, args.threshold))


def main(args):
    device = cli.pick_device(args.device, args.threads)
    ckpt = ck.load_checkpoint(args.checkpoint, device)
    model, vocab = ck.model_from_checkpoint(ckpt, device)
    cfg = model.config
    threshold = thresholds(args, cfg)
    confidence = learned.resolve(args.confidence, learned.from_checkpoint(ckpt, device))
    untrained = [k for k in cfg.exits if k not in cfg.trained_exits]
    draft = args.draft_exit or next(iter(cfg.trained_exits), None)
    why = f"{args.checkpoint} was trained with loss weights {cfg.loss_weights}: the head of exit"
    if args.speculative and draft is None:
        raise ee.EEminiError(f"{args.checkpoint} has no trained exit to draft with; drop --speculative")
    if args.speculative and draft in untrained:
        raise ee.EEminiError(f"{why} {draft} was never trained; draft with --draft-exit "
                             f"{' or '.join(map(str, cfg.trained_exits))}")
    never = [k for k in untrained if ee.at_exit(threshold, k) < 1.0]  # an exit at threshold 1.0 is never read
    if never and not args.speculative:
        raise ee.EEminiError(f"{why} {', '.join(map(str, never))} was never trained; give it threshold 1.0")
    prompt = vocab.encode(args.prompt).to(device).repeat(args.num_samples, 1)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()
    with cli.autocast(device):
        if args.speculative:
            ids, stats = decode.speculative(model, prompt, args.max_new_tokens, draft, args.speculative,
                                            args.temperature, args.top_k or None, gen, args.draft_stop)
            depths = torch.full((args.num_samples, args.max_new_tokens), cfg.n_layer)
        else:
            ids, depths = decode.generate(model, prompt, args.max_new_tokens, threshold, args.temperature,
                                         args.top_k or None, confidence, gen)
    cli.synchronize(device)
    dt = time.perf_counter() - t0
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    for i in range(args.num_samples):
        new = ids[i, prompt.size(1):].tolist()
        print(args.prompt + render(vocab.decode(new), depths[i].tolist(), cfg.n_layer, color))
        print("-" * 60)
    speed = f"{depths.numel():,} characters in {dt:.2f}s = {depths.numel() / dt:,.0f} tok/s"
    if args.speculative:
        stop = f" (stop {args.draft_stop:g})" if args.draft_stop else ""
        print(f"{speed} | self-speculative, drafts of up to {args.speculative}{stop} by the exit after layer "
              f"{draft}: {100 * stats.acceptance:.1f}% accepted, {stats.per_cycle:.2f} "
              f"characters a full-model pass")
        return
    exited = ", ".join(f"at layer {k}: {100 * (depths == k).float().mean().item():.1f}%" for k in cfg.exits) or "none"
    print(f"{speed} | exited {exited} | Compute {measure.compute_percent(depths, cfg.n_layer):.1f}% | threshold "
          f"{','.join(f'{t:g}' for t in args.threshold)}" + (f" | {SHALLOW}green{RESET} = exited early" if color else ""))


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
