"""
How a learned router's share of the oracle grows with the characters it learns from, for two
targets side by side: the kl router's, log KL(last layer || exit) (little noise, but never negative),
and the realised loss difference CE_exit - CE_last (noisy, but signed: it can learn where the exit
beats the last layer, which a KL cannot say). An experiment, not a recipe: the offline copy of the
train split holds only about 42,000 characters past the million the quick start trains on (the full
WikiText-2 train split, which train.py downloads, has ten million), so the larger slices stand in
for held-out training text with the valid split after --skip characters, well past the part that is
scored, and then the test split after --skip; sweep.py's routers never see valid or test text.
Two more rows, on the held-out train slice: the kl router reading the previous character's
features beside its own, and the true KL corrected by a line fitted to the realised loss difference (a
reference, like the KL itself: it runs every layer). The loss difference is learned twice: by one MLP,
and by the mean of routers.MEMBERS["gain"] MLPs from different seeds, which is train.py's router-gain; the
KL router is its router-kl. --save-routers OUT.pt writes a copy of the checkpoint whose
routers (train.py's four) learned from the stand-in slice, the largest of --sizes it holds, so that sweep.py
can calibrate them on valid and show them on test, as routers from that much held-out training text
would be.

    python bench/router_data.py ckpt.pt
    python bench/router_data.py ckpt.pt --sizes 1200000 --skip 600000 --seeds 1 --save-routers ckpt-routers.pt
    python sweep.py ckpt-routers.pt --calibrate 1,2 --calibrate-chars 600000 --confidence router-gain
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint as ck  # noqa: E402
import cli  # noqa: E402
import measure  # noqa: E402
import routers as learned  # noqa: E402
from data import held_out, read_split  # noqa: E402
from eemini import EEminiError  # noqa: E402
from report import md  # noqa: E402


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    p.add_argument("checkpoint", help="a checkpoint written by train.py, with one exit")
    cli.add_data(p, from_checkpoint=True)
    p.add_argument("--sizes", type=cli.comma_list(cli.number(int, 1000), empty=False), default=[40_000, 200_000, 600_000, 1_200_000, 2_000_000],
                   help="characters each router learns from, comma list")
    p.add_argument("--seeds", type=cli.number(int, 1), default=3, help="routers fitted a row, each from its own "
                   "seed (a share moves by several points from seed to seed)")
    p.add_argument("--skip", type=cli.number(int, 0), default=200_000, help="valid (and test) characters left out before "
                   "the stand-in slices begin (must be at least --val-chars, the scored part)")
    p.add_argument("--save-routers", metavar="OUT.pt", help="also write a copy of the checkpoint whose routers "
                   "learned from the stand-in slice (the largest of --sizes it holds; never scored text)")
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
    def design(x, kl):  # the last four features are the cheap confidences
        return torch.cat([torch.ones_like(kl)[:, None], x[:, -4:], kl[:, None]], -1).double()
    x, _, gain, kl = [t.cpu() for t in train]  # where stats are
    a = design(x, kl)
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.size(1), dtype=a.dtype), a.T @ (gain - kl).double())
    return stats["kl"][k] + (design(scored.cpu(), stats["kl"][k]) @ w).float()


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
    if scored_chars == 0:
        raise EEminiError(f"--val-chars 0 scores the whole {args.split} split, which the routers also learn from "
                          f"past --skip; give --val-chars N (and --skip at least N)")
    if scored_chars > args.skip:
        raise EEminiError(f"--skip {args.skip:,} would train routers on the scored {args.split} text; give --skip at "
                          f"least --val-chars ({scored_chars:,})")
    if args.save_routers:  # before any work: a bad place, or a file that is there already
        ck.check_output(args.save_routers, "--save-routers", ".pt")
        if Path(args.save_routers).exists():
            raise EEminiError(f"--save-routers {args.save_routers} is there already; give another name, or remove it")
    ids, source = ck.eval_text(args, ckpt, vocab)
    stats = measure.token_stats(model, ids, args.eval_batch_size, device)
    oracle, full, k = measure.Oracle(stats, cfg), measure.ppl(stats["ce"][cfg.n_layer]), cfg.exits[0]
    scored = learned.exit_examples(model, ids, args.eval_batch_size, device)[k][0]  # the same tokens as stats
    slices = [("train split, held out", held_out(data, trained.get("train_chars", 0), max(args.sizes), vocab))]
    stand_in = read_split(data, "valid")[0][args.skip :]
    if len(stand_in) < max(args.sizes) and Path(data).is_dir():  # one text file has no test split
        stand_in += read_split(data, "test")[0][args.skip :]
    slices.append(("valid, then test split, past --skip", vocab.encode(stand_in[: max(args.sizes)])))
    longest = max(len(text) for _, text in slices)
    if min(args.sizes) > longest:  # no sized row at all: say so rather than print the reference rows alone
        raise EEminiError(f"--sizes {','.join(map(str, args.sizes))}: the longest slice here has {longest:,} "
                          f"characters (held-out train text, and valid and test past --skip {args.skip:,}); give smaller sizes")
    if args.save_routers and min(args.sizes) > len(slices[-1][1]):
        raise EEminiError(f"--save-routers: no --sizes fits the stand-in text ({len(slices[-1][1]):,} characters)")
    rows = [["(every layer run) KL itself", "", *map(spread, zip(share(stats, cfg, -stats["kl"][k], oracle, full)))]]
    first = slices[0][1][: min(args.sizes)]  # none when the model trained on the whole train split
    if len(first) > cfg.block_size:
        held = learned.exit_examples(model, first, args.eval_batch_size, device)[k]
        rows.append(["(every layer run) KL + a line fitted to the realised loss difference, train split, held out",
                     f"{len(held[0]):,}", *map(spread, zip(share(stats, cfg, -corrected_kl(stats, k, held, scored), oracle, full)))])
        shares = []  # the kl router reading [own, previous] features: 2 (C + 4) wide
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            router = learned.Router(2 * cfg.n_embd + 4, regress="kl").to(held[0].device)  # reads 2C + 8 numbers
            learned.fit(router, with_previous(held[0]), -torch.log(held[3] + learned.FLOOR), epochs=30, seed=seed)
            shares.append(share(stats, cfg, router.score(with_previous(scored)).cpu(), oracle, full))
        rows.append(["log KL, with the previous character's features, train split, held out", f"{len(held[0]):,}",
                     *map(spread, zip(*shares))])
    kept = None  # the largest stand-in slice's examples, for --save-routers
    for where, text in slices:
        for n in sorted(n for n in args.sizes if n <= len(text)):
            x, same, gain, kl = learned.exit_examples(model, text[:n], args.eval_batch_size, device)[k]
            kept = (x, same, gain, kl) if text is slices[-1][1] else kept
            targets = learned.labels(same, gain, kl, epsilon=0.1)
            gain_members = learned.MEMBERS["gain"]
            for target, regress, members in (("log KL", "kl", 1), ("loss difference, one MLP", "gain", 1),
                                             (f"loss difference, mean of {gain_members} MLPs", "gain", gain_members)):
                shares = []
                for seed in range(args.seeds):
                    router = learned.fit_label(regress, x, targets[regress], cfg.n_embd, seed, members=members)
                    shares.append(share(stats, cfg, router.score(scored).cpu(), oracle, full))
                rows.append([f"{target}, {where}", f"{len(x):,}", *map(spread, zip(*shares))])
                print(f"  {rows[-1][0]}: {rows[-1][1]} characters, {rows[-1][2]} at +1%", file=sys.stderr, flush=True)
    print("\n".join(md(["Router target, learned from", "Characters", "Share of oracle (+1%)", "Share (+2%)"], rows)))
    print(f"scored on {source}; full depth PPL {full:.3f}; each share the mean over {args.seeds} seeds (lowest-highest)")
    if args.save_routers:
        epsilon = trained.get("router_epsilon", 0.1)
        save_routers(ckpt, learned.fit_examples({k: kept}, cfg.n_embd, epsilon), epsilon,
                     f"{len(kept[0]):,} characters of the {slices[-1][0]}", args.save_routers)


def save_routers(ckpt, routers, epsilon, text, path):
    """A copy of the checkpoint with these routers in place of its own (the weights, and so their
    checksum, are unchanged), written atomically."""
    saved = {key: v for key, v in ckpt.items() if key != "path"}
    saved["routers"] = {**learned.to_checkpoint(routers, epsilon), "learned_from": text}
    with ck.atomic_write(path, "wb") as f:
        torch.save(saved, f)
    print(f"wrote {path}: {Path(ckpt['path']).name} with routers learned from {text}")


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
