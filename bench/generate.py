"""
Generation speed: tokens/s of full depth, confidence exit (each row leaves on its own), CALM's whole-
batch rule (a position leaves only when every row is confident) and self-speculative decoding (the
exit drafts, the full model verifies), side by side in one run, at several batch sizes. Greedy
decoding throughout, so that speculative decoding's output can be checked against full depth's.
Beside each: how much exits (or is accepted), the layer-count speedup, and the PPL it costs.

    python bench/generate.py ckpt.pt --data ../shared/data/wikitext-2
    python bench/generate.py big.pt --batch-sizes 1,16,128 --new-tokens 200
    python bench/generate.py big.pt --batch-sizes 1 --route-exits 2    # confidence exit through exit 2 alone
    python bench/generate.py big.pt --batch-sizes 16 --draft-exits 1 --draft-lengths 6 --draft-stops 0,0.2 --every-draft
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint as ck  # noqa: E402
import decode  # noqa: E402
import cli  # noqa: E402
import eemini as ee  # noqa: E402
import measure  # noqa: E402


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    cli.add_checkpoint(p)
    cli.add_data(p, from_checkpoint=True)
    p.add_argument("--batch-sizes", type=cli.comma_list(cli.number(int, 1), empty=False), default=[1, 16],
                   help="generation batch sizes, comma list")
    p.add_argument("--new-tokens", type=cli.number(int, 1), default=300, help="characters generated per timed run")
    p.add_argument("--rounds", type=cli.number(int, 1), default=5, help="rounds, each timing every method once")
    p.add_argument("--threshold", type=cli.threshold, default=None, help="confidence threshold for the exit methods "
                   "(default: the median confidence at the first exit routed through, on the text, so that about half the characters leave there)")
    p.add_argument("--route-exits", type=cli.comma_list(cli.number(int, 1)), default=[],
                   help="exits the confidence-exit methods route through, comma list (default: every trained exit); "
                        "the others get threshold 1.0, so their heads are never computed")
    p.add_argument("--draft-lengths", type=cli.comma_list(cli.number(int, 1), empty=False), default=[2, 3, 4, 6],
                   help="speculative drafts to try; the fastest (with the best draft exit) is timed")
    p.add_argument("--draft-exits", type=cli.comma_list(cli.number(int, 1)), default=[],
                   help="exits to try drafting with, comma list (default: every trained exit)")
    p.add_argument("--draft-stops", type=cli.comma_list(cli.number(float, 0.0, 1.0), empty=False), default=[0.0],
                   help="draft stops to try, comma list (decode.draft: a cycle stops drafting once the rows' mean odds "
                        "that all their drafts survive fall below it; 0 always drafts K)")
    p.add_argument("--every-draft", action="store_true", help="time every draft exit, length and stop side by side "
                   "in the rounds, not only the fastest of a short trial")
    cli.add_device(p)
    return p.parse_args(argv)


def timed(fn, device):
    cli.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    cli.synchronize(device)
    return time.perf_counter() - t0, out


def methods(model, tau, specs):
    """{name: generate(prompt, n) -> (ids, depths or Stats)}, greedy; one speculative method for each
    (draft exit, K, stop) in specs."""
    runs = {"full depth": lambda x, n: decode.generate(model, x, n, None, temperature=0),
            "confidence exit (per row)": lambda x, n: decode.generate(model, x, n, tau, temperature=0),
            "CALM batch rule": lambda x, n: decode.generate(model, x, n, tau, temperature=0, whole_batch=True)}
    for e, k, stop in specs:
        name = f"self-speculative (exit {e}, K={k}{f', stop {stop:g}' if stop else ''})"
        runs[name] = lambda x, n, e=e, k=k, stop=stop: decode.speculative(model, x, n, e, k, temperature=0, stop=stop)
    return runs


def fastest_draft(model, prompt, new, exits, lengths, stops, device):
    """The (draft exit, K, stop) with the most tokens/s, the best of two short runs each (chosen before
    the timed rounds; one run alone let a noisy moment pick a slow draft)."""
    runs = {(e, k, s): min(timed(lambda: decode.speculative(model, prompt, new // 2, e, k, temperature=0, stop=s),
                                 device)[0] for _ in range(2))
            for e in exits for k in lengths for s in stops}
    return min(runs, key=runs.get)


@torch.inference_mode()  # as decode's generation runs
def layer_cost(model, prompt, widths, device, calls=100):
    """Seconds of one call of the last layer over n new characters after the prompt's, cached, for each
    n in widths: what self-speculative decoding's verify pass pays per layer for K + 1 characters, against
    one decoding step's n = 1. Median of five rounds of `calls` calls, each cut back to the prompt (as
    much of it as leaves room in the context for the widest n)."""
    prompt = prompt[:, : model.config.block_size - max(widths)]
    cache = decode.new_cache(model.config.n_layer)
    model.forward_exit(prompt, None, cache=cache)
    block, c, T = model.transformer.h[-1], cache[-1], prompt.size(1)
    out = {}
    for n in widths:
        x = torch.randn(prompt.size(0), n, model.config.n_embd, device=device)
        def run():
            for _ in range(calls):
                block(x, None, c)
                c.truncate(T)
        run()
        out[n] = statistics.median(timed(run, device)[0] for _ in range(5)) / calls
    return out


def main(args):
    device = cli.pick_device(args.device, args.threads)
    ckpt, model, vocab = ck.load_with_exit(args.checkpoint, device)
    cfg = model.config
    exits = args.draft_exits or cfg.trained_exits
    if not set(exits) <= set(cfg.trained_exits):
        raise ee.EEminiError(f"--draft-exits {','.join(map(str, exits))}: {args.checkpoint}'s trained exits are "
                             f"{cfg.trained_exits}; draft with those")
    if max(args.draft_lengths) >= cfg.block_size - 1:
        raise ee.EEminiError(f"--draft-lengths {','.join(map(str, args.draft_lengths))}: a draft must fit in the "
                             f"model's context of {cfg.block_size} with its verify pass; give lengths below "
                             f"{cfg.block_size - 1}")
    route = sorted(set(args.route_exits)) or cfg.trained_exits
    if not set(route) <= set(cfg.trained_exits):
        raise ee.EEminiError(f"--route-exits {','.join(map(str, route))}: {args.checkpoint}'s trained exits are "
                             f"{cfg.trained_exits}; route through those")
    val, source = ck.eval_text(args, ckpt, vocab)
    stats = measure.token_stats(model, val, 64, device)
    tau = args.threshold if args.threshold is not None else round(stats["conf"]["softmax"][route[0]].median().item(), 3)
    tau_at = tau if route == cfg.exits else {k: tau if k in route else 1.0 for k in cfg.exits}
    full = measure.ppl(stats["ce"][cfg.n_layer])
    print(f"device {device} | {cli.machine(device)}")
    where = "" if route == cfg.exits else f" at exit{'s' if len(route) > 1 else ''} {','.join(map(str, route))}"
    print(f"{args.checkpoint}: {cfg.n_layer} layers, exits {cfg.exits}, {cli.width(cfg)} | threshold {tau}{where} | "
          f"{args.new_tokens} new characters a run, greedy | median of {args.rounds} interleaved rounds")
    print("\n| batch | method | tok/s | speedup | exited / accepted | layer-count speedup | PPL cost |")
    print("|---|---|---|---|---|---|---|")
    costs = {}
    for bs in args.batch_sizes:
        prompt = torch.stack([val[s : s + 32] for s in (torch.arange(bs) * 32 % (len(val) - 32)).tolist()]).to(device)
        if args.every_draft:
            specs = list(dict.fromkeys((e, k, s) for e in exits for k in args.draft_lengths for s in args.draft_stops))
        else:
            specs = [fastest_draft(model, prompt, args.new_tokens, exits, args.draft_lengths, args.draft_stops, device)]
        runs = methods(model, tau_at, specs)
        secs, outs = {m: [] for m in runs}, {}
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, fn in runs.items():
                t, outs[name] = timed(lambda: fn(prompt, args.new_tokens), device)
                if r:
                    secs[name].append(t)
        same = {n: torch.equal(outs["full depth"][0], outs[n][0]) for n in runs if n.startswith("self")}
        costs[bs] = layer_cost(model, prompt, [1, *(k + 1 for k in args.draft_lengths if k < cfg.block_size - 1)], device)
        base = statistics.median(secs["full depth"])
        for name in runs:
            speed = bs * args.new_tokens / statistics.median(secs[name])
            extra = outs[name][1]
            if isinstance(extra, decode.Stats):
                shown = f"{100 * extra.acceptance:.0f}% accepted, {extra.per_cycle:.2f} chars/pass"
                layer, cost = "—", "0 (output identical)" if same[name] else "OUTPUT DIFFERS"
            elif name == "full depth":
                shown, layer, cost = "—", "1.00x", "—"
            else:
                shown = f"{100 * (extra < cfg.n_layer).float().mean():.0f}% exited"
                layer = f"{100 / measure.compute_percent(extra, cfg.n_layer):.2f}x"
                e = measure.exit_metrics(model, val, tau_at, bs, device, whole_batch=name.startswith("CALM"))
                cost = f"{100 * (e['ppl'] / full - 1):+.1f}%"
            print(f"| {bs} | {name} | {speed:,.0f} | {base * speed / (bs * args.new_tokens):.2f}x | {shown} | {layer} | {cost} |")
    print(f"\nPPL cost: true-exit PPL at the threshold over full depth's ({full:.3f}) on {len(val):,} characters of "
          f"{source} (the batch rule read with as many windows side by side as the batch)")
    widths = list(next(iter(costs.values())))
    print("\n## One layer over n new characters (a verify pass over K drafts has n = K + 1), against n = 1\n")
    print("| batch | " + " | ".join(f"n = {n}" for n in widths) + " |\n|---|" + "---|" * len(widths))
    for bs, c in costs.items():
        print(f"| {bs} | " + " | ".join(f"{1e3 * c[n]:.2f} ms ({c[n] / c[1]:.1f}x)" for n in widths) + " |")


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
