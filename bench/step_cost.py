"""
Where confidence exit's time goes in generation at batch 1, step by step. Four kinds of cached
decoding step are timed side by side, interleaved: full depth; a character that leaves at the exit;
one that goes deep after its exit said no; and the same after an exited character, whose keys and
values the deep layers must write first (true early exit writes them lazily, at the next deep
character). Beside each, its FLOPs (measure.flops_per_token). From those, at a few exit rates: the
speedup the step times add up to, against the two counts a paper may quote, the layer count
(layers run) and the FLOPs count (which also charges the heads and the exited characters' K/V).

    python bench/step_cost.py ckpt.pt --data ../shared/data/wikitext-2
    python bench/step_cost.py big-ld5-gradual-all.pt --exit 1 --exit-rates 0.25,0.44,0.7
"""

import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint as ck  # noqa: E402
import cli  # noqa: E402
import decode  # noqa: E402
import eemini as ee  # noqa: E402
import measure  # noqa: E402
from report import md  # noqa: E402

FULL, OUT, DEEP, AFTER = "full depth", "leaves at the exit", "goes deep (exit checked)", "goes deep after an exited character"
KINDS = (FULL, OUT, DEEP, AFTER)
NEVER = 1 - 1e-6  # a threshold the timed character does not reach (checked: see step_times)


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    cli.add_checkpoint(p)
    cli.add_data(p, from_checkpoint=True)
    p.add_argument("--exit", type=cli.number(int, 1), default=None, help="the exit routed through (default: the first trained one)")
    p.add_argument("--context", type=cli.number(int, 1), default=None,
                   help="characters in the cache before each step (default: half the model's context, the mean over "
                        "evaluation windows; attention is a small part of a step, so this moves little)")
    p.add_argument("--steps", type=cli.number(int, 1), default=1000, help="timed steps of each kind")
    p.add_argument("--exit-rates", type=cli.comma_list(cli.number(float, 0.0, 1.0)), default=[0.25, 0.5, 0.75],
                   help="shares of characters leaving at the exit to add the steps up for, comma list")
    cli.add_device(p)
    args = p.parse_args(argv)
    if not args.exit_rates:
        p.error("--exit-rates is empty; give at least one share, e.g. 0.5")
    return args


def predict(cost, kv, rate):
    """Per-character cost at an exit rate, as a share of a full-depth step's: cost = {kind: cost of
    one step} (seconds or FLOPs), kv = the deep layers' K/V of one exited character, written at the
    next deep one. An exited character pays its step and that K/V; a deep one its step."""
    return (rate * (cost[OUT] + kv) + (1 - rate) * cost[DEEP]) / cost[FULL]


def step_flops(cfg, e, context):
    """({kind: FLOPs of one step}, FLOPs of an exited character's K/V in the layers above exit e), as
    measure.flops_percent counts them: a deep character pays the exit head it checked and the last one."""
    layer, head, kv = measure.flops_per_token(cfg, context)
    L, kv_flops = cfg.n_layer, (cfg.n_layer - e) * kv
    return {FULL: L * layer + head, OUT: e * layer + head, DEEP: L * layer + 2 * head,
            AFTER: L * layer + 2 * head + kv_flops}, kv_flops


def layer_count(rate, n_layer, exit_layer):
    """The speedup the layer count claims: n_layer over the mean layers run."""
    return n_layer / (n_layer - rate * (n_layer - exit_layer))


@torch.inference_mode()
def step_times(model, prompt, e, steps, device):
    """{kind: median seconds of one cached step}, the kinds interleaved in a shuffled order so that a
    shared machine's drift hits each alike; every step is cut back to the prompt after."""
    cfg = model.config
    leave, stay = ({k: t if k == e else 1.0 for k in cfg.exits} for t in (0.0, NEVER))  # exit e alone is checked
    threshold = {FULL: None, OUT: leave, DEEP: stay, AFTER: stay}
    cache, T = decode.new_cache(cfg.n_layer), prompt.size(1)
    logits, _, _ = model.forward_exit(prompt, None, cache=cache)
    nxt = logits[:, -1:].argmax(-1)  # (1, 1): the character the model would write next

    def step(kind):
        if kind == AFTER:  # an exited character first, untimed: its K/V is then pending in the deep layers
            model.forward_exit(nxt, leave, cache=cache)
        cli.synchronize(device)
        t0 = time.perf_counter()
        _, depth, _ = model.forward_exit(nxt, threshold[kind], cache=cache)
        cli.synchronize(device)
        t = time.perf_counter() - t0
        for c in cache:
            c.truncate(T)
        if kind != OUT and depth.item() != cfg.n_layer:
            raise ee.EEminiError(f"the timed character left at exit {e} with confidence over {NEVER}; give another --context")
        return t

    order = [k for k in KINDS for _ in range(steps)]
    random.Random(0).shuffle(order)
    for kind in KINDS:  # warm up
        step(kind)
    secs = {k: [] for k in KINDS}
    for kind in order:
        secs[kind].append(step(kind))
    return {k: statistics.median(v) for k, v in secs.items()}


def main(args):
    device = cli.pick_device(args.device, args.threads)
    ckpt, model, vocab = ck.load_with_exit(args.checkpoint, device)
    cfg = model.config
    e = args.exit if args.exit is not None else cfg.trained_exits[0]
    if e not in cfg.trained_exits:
        raise ee.EEminiError(f"--exit {e}: {args.checkpoint}'s trained exits are {cfg.trained_exits}; give one of those")
    if cfg.block_size < 3:
        raise ee.EEminiError(f"{args.checkpoint}'s context of {cfg.block_size} is too short to time a step after a cached one")
    context = args.context if args.context is not None else cfg.block_size // 2
    if context > cfg.block_size - 2:  # room for the exited character and the timed one after it
        raise ee.EEminiError(f"--context {context}: the steps need room in the model's context of {cfg.block_size}; "
                             f"give at most {cfg.block_size - 2}")
    ids, source = ck.eval_text(args, ckpt, vocab)
    if len(ids) < context:
        raise ee.EEminiError(f"{source} has {len(ids)} characters, fewer than --context {context}")
    secs = step_times(model, ids[:context].unsqueeze(0).to(device), e, args.steps, device)
    flops, kv_flops = step_flops(cfg, e, context)
    L, kv_secs = cfg.n_layer, secs[AFTER] - secs[DEEP]
    print(f"device {device} | {cli.machine(device)}")
    print(f"{args.checkpoint}: {L} layers, exit {e} of {cfg.exits}, {cli.width(cfg)} | batch 1, {context} characters "
          f"cached | median of {args.steps} interleaved steps of each kind\n")
    def row(name, t, f):
        return [name, f"{1e3 * t:.3f} ms", f"{t / secs[FULL]:.3f}", f"{f / flops[FULL]:.3f}"]
    rows = [row(k, secs[k], flops[k]) for k in KINDS]
    rows.append(row(f"K/V of one exited character in layers {e + 1}-{L} (row 4 - row 3)", kv_secs, kv_flops))
    print("\n".join(md(["Step", "Time", "Of full depth", "FLOPs, of full depth"], rows)))
    print(f"the layer count charges a character that leaves {e / L:.3f} of a full step, and nothing for its K/V")
    if kv_secs <= 0:
        print("the K/V row is a difference of two medians, and here it came out at or below zero: the machine was too "
              "noisy for it; rerun, with more --steps")
    rows = []
    for p in args.exit_rates:
        by_time = 1 / predict(secs, kv_secs, p)
        by_flops = 1 / predict(flops, kv_flops, p)
        count = layer_count(p, L, e)
        rows.append([f"{100 * p:.0f}%", f"{count:.2f}x", f"{by_flops:.2f}x ({by_flops / count:.2f})",
                     f"{by_time:.2f}x ({by_time / count:.2f})", f"{by_time / by_flops:.2f}"])
    print("\n" + "\n".join(md(["Exit rate", "Layer-count speedup", "FLOPs speedup (of the layer count)",
                               "Step times add up to (of the layer count)", "Time / FLOPs"], rows)))
    print("step times add up: each exited character pays its step and its K/V, each deep one its step; a run's "
          "prompt, sampling and context refills are left out, and so is what a run of exited characters saves by "
          "sharing one catch-up")


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
