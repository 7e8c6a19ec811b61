"""
How a learned router's share of the oracle grows with the characters it learns from, for two
targets side by side: the kl router's, log KL(last layer || exit) (little noise, but never negative),
and the realised loss difference CE_exit - CE_last (noisy, but signed: it can learn where the exit
beats the last layer, which a KL cannot say). An experiment, not a recipe: the train split holds only
about 42,000 characters past the million the quick start trains on, so the larger slices come from
the valid split after --skip characters, well past the part that is scored; sweep.py's routers
never see valid text. Two more rows, on the held-out train slice: the kl router reading the previous
character's states beside its own, and the true KL corrected by a line fitted to the realised loss
difference (a reference, like the KL itself: it runs every layer).

    python bench/router_data.py ckpt.pt
"""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint as ck  # noqa: E402
import cli  # noqa: E402
import measure  # noqa: E402
import routers as learned  # noqa: E402
from data import held_out, read_split  # noqa: E402
from eemini import EEminiError, conf_entropy, conf_margin, conf_saturation, conf_softmax  # noqa: E402
from report import md  # noqa: E402


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    p.add_argument("checkpoint", help="a checkpoint written by train.py, with one exit")
    cli.add_data(p, from_checkpoint=True)
    p.add_argument("--sizes", type=cli.comma_list(cli.number(int, 1000), empty=False), default=[40_000, 100_000, 200_000, 400_000, 600_000],
                   help="characters each router learns from, comma list")
    p.add_argument("--seeds", type=cli.number(int, 1), default=3, help="routers fitted a row, each from its own "
                   "seed (a share moves by several points from seed to seed)")
    p.add_argument("--skip", type=cli.number(int, 0), default=200_000, help="valid characters left out before the "
                   "routers' slices begin (must be at least --val-chars, the scored part)")
    cli.add_eval_batch_size(p)
    cli.add_device(p)
    return p.parse_args(argv)


def share(stats, cfg, score, oracle, full):
    """The oracle shares (+1%, +2%) of routing by score (higher leaves sooner). The scores are ranked
    into confidences, so the thresholds are evenly spaced in characters and only the order counts."""
    conf = score.argsort().argsort().double() / len(score)
    rows = measure.fine_sweep({**stats, "conf": {"score": {cfg.exits[0]: conf}}}, cfg, "score")
    return [measure.oracle_fraction(rows, full, b, oracle)[2] for b in (1, 2)]


def with_previous(t):
    """Each character's row beside the previous character's (text order; the first gets the last)."""
    return torch.cat([t, t.roll(1, 0)], -1)


def corrected_kl(stats, k, train, scored, ridge=1.0):
    """KL itself plus a line in the exit's cheap confidences and the KL, fitted (ridge least squares)
    to what the KL misses of the realised loss difference on held-out text: CE_exit - CE_last - KL.
    The KL is signed by it, so this can send out characters where the exit is the better head."""
    def design(logits, h, h_prev, kl):
        cheap = [f(logits, h, h_prev) for f in (conf_softmax, conf_margin, conf_entropy, conf_saturation)]
        return torch.stack([torch.ones_like(kl), *cheap, kl], -1).double()
    train, scored = [t.cpu() for t in train], [t.cpu() for t in scored]  # where stats are
    logits, h, h_prev, _, gain, kl = train
    a = design(logits, h, h_prev, kl)
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.size(1), dtype=a.dtype), a.T @ (gain - kl).double())
    return stats["kl"][k] + (design(*scored, stats["kl"][k]) @ w).float()


def spread(xs):
    """'45% (40-51)': the mean share over seeds, and its range."""
    xs = [100 * x for x in xs]
    return f"{sum(xs) / len(xs):.0f}%" + (f" ({min(xs):.0f}-{max(xs):.0f})" if len(xs) > 1 else "")


def main(args):
    device = cli.pick_device(args.device, args.threads)
    ckpt = ck.load_checkpoint(args.checkpoint, device)
    model, vocab = ck.model_from_checkpoint(ckpt, device)
    cfg = model.config
    if len(cfg.exits) != 1 or cfg.trained_exits != cfg.exits:
        raise EEminiError(f"{args.checkpoint} has exits {cfg.exits}, trained {cfg.trained_exits}; this experiment "
                          f"takes a model with one trained exit")
    trained = ckpt.get("args") or {}
    data = args.data if args.data is not None else trained.get("data", "")
    scored_chars = args.val_chars if args.val_chars is not None else trained.get("val_chars", 50_000)
    if args.split == "valid" and scored_chars == 0:
        raise EEminiError("--val-chars 0 scores the whole valid split, which leaves no valid text to learn from; "
                          "give --val-chars N (and --skip at least N), or --split test")
    if args.split == "valid" and scored_chars > args.skip:
        raise EEminiError(f"--skip {args.skip:,} would train routers on the scored valid text; give --skip at "
                          f"least --val-chars ({scored_chars:,})")
    ids, source = ck.eval_text(args, ckpt, vocab)
    stats = measure.token_stats(model, ids, args.eval_batch_size, device)
    oracle, full, k = measure.Oracle(stats, cfg), measure.ppl(stats["ce"][cfg.n_layer]), cfg.exits[0]
    scored = learned.exit_examples(model, ids, args.eval_batch_size, device)[k][:3]  # the same tokens as stats
    slices = [("train split, held out", held_out(data, trained.get("train_chars", 0), max(args.sizes), vocab))]
    valid = read_split(data, "valid")[0][args.skip : args.skip + max(args.sizes)]
    slices.append(("valid split, past --skip", vocab.encode(valid)))
    longest = max(len(text) for _, text in slices)
    if min(args.sizes) > longest:  # no sized row at all: say so rather than print the reference rows alone
        raise EEminiError(f"--sizes {','.join(map(str, args.sizes))}: the longest slice here has {longest:,} "
                          f"characters (held-out train text, and valid past --skip {args.skip:,}); give smaller sizes")
    rows = [["(every layer run) KL itself", "", *map(spread, zip(share(stats, cfg, -stats["kl"][k], oracle, full)))]]
    first = slices[0][1][: min(args.sizes)]  # none when the model trained on the whole train split
    if len(first) > cfg.block_size:
        held = learned.exit_examples(model, first, args.eval_batch_size, device)[k]
        rows.append(["(every layer run) KL + a line fitted to the realised loss difference, train split, held out",
                     f"{len(held[0]):,}", *map(spread, zip(share(stats, cfg, -corrected_kl(stats, k, held, scored), oracle, full)))])
        shares = []  # the kl router with [own, previous] states joined (its norm and saturation over both)
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            router = learned.Router(2 * cfg.n_embd, regress=True).to(held[1].device)
            learned.fit(router, held[0], with_previous(held[1]), with_previous(held[2]),
                        -torch.log(held[5] + learned.FLOOR), epochs=30, seed=seed)
            shares.append(share(stats, cfg, router.score(scored[0], *map(with_previous, scored[1:])).cpu(), oracle, full))
        rows.append(["log KL, with the previous character's states, train split, held out", f"{len(held[0]):,}",
                     *map(spread, zip(*shares))])
    for where, text in slices:
        for n in [n for n in args.sizes if n <= len(text)]:
            logits, h, h_prev, _, gain, kl = learned.exit_examples(model, text[:n], args.eval_batch_size, device)[k]
            epochs = max(4, math.ceil(30 * 40_000 / n))  # about as many steps at every size
            for target, y in (("log KL", -torch.log(kl + learned.FLOOR)), ("loss difference", -gain)):
                shares = []
                for seed in range(args.seeds):
                    torch.manual_seed(seed)
                    router = learned.Router(cfg.n_embd, regress=True).to(h.device)
                    learned.fit(router, logits, h, h_prev, y, epochs=epochs, seed=seed)
                    shares.append(share(stats, cfg, router.score(*scored).cpu(), oracle, full))
                rows.append([f"{target}, {where}", f"{len(logits):,}", *map(spread, zip(*shares))])
                print(f"  {rows[-1][0]}: {rows[-1][1]} characters, {rows[-1][2]} at +1%", file=sys.stderr, flush=True)
    print("\n".join(md(["Router target, learned from", "Characters", "Share of oracle (+1%)", "Share (+2%)"], rows)))
    print(f"scored on {source}; full depth PPL {full:.3f}; each share the mean over {args.seeds} seeds (lowest-highest)")


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
