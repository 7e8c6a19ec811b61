"""
Which exit layer pays most (seed 002's question, for deeper models)? From a model with a trained head
after every layer, masked routing through each single exit and each pair of exits: the compute saved
within +1% (and +2%) PPL of full depth, beside the oracle's for the same exits. One evaluation pass;
every row is read from it.

    python train.py --data ../shared/data/wikitext-2 --n-layer 6 --n-embd 256 --n-head 8 \\
        --exit-layers 1,2,3,4,5 --layer-weights 0.1,0.1,0.1,0.1,0.1,0.5 --batch-size 16 --max-iters 900 --out big.pt
    python bench/exit_layers.py big.pt
"""

import dataclasses
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint as ck  # noqa: E402
import cli  # noqa: E402
import eemini as ee  # noqa: E402
import measure  # noqa: E402
from report import md  # noqa: E402


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    cli.add_checkpoint(p)
    cli.add_data(p, from_checkpoint=True)
    p.add_argument("--confidence", default="softmax", choices=sorted(ee.CONFIDENCE), help="confidence measure")
    cli.add_eval_batch_size(p)
    cli.add_device(p)
    return p.parse_args(argv)


def main(args):
    device = cli.pick_device(args.device, args.threads)
    ckpt = ck.load_checkpoint(args.checkpoint, device)
    model, vocab = ck.model_from_checkpoint(ckpt, device)
    cfg = model.config
    if len(cfg.trained_exits) < 2:
        raise ee.EEminiError(f"{args.checkpoint} has {len(cfg.trained_exits)} trained exit(s); train one with a head "
                             f"after every layer (e.g. --exit-layers 1,2,3,4,5 --layer-weights ...)")
    ids, source = ck.eval_text(args, ckpt, vocab)
    stats = measure.token_stats(model, ids, args.eval_batch_size, device)
    full = measure.ppl(stats["ce"][cfg.n_layer])
    print(f"{args.checkpoint}: {cfg.n_layer} layers, {cli.width(cfg)}, exits {cfg.exits} | full depth PPL "
          f"{full:.3f} | " + " ".join(f"L{k} {measure.ppl(stats['ce'][k]):.3f}" for k in cfg.exits))
    rows = []
    for exits in [*([k] for k in cfg.trained_exits), *(list(p) for p in itertools.combinations(cfg.trained_exits, 2))]:
        sub = dataclasses.replace(cfg, exits=exits)
        oracle = measure.Oracle(stats, sub)
        swept = measure.fine_sweep(stats, sub, args.confidence)
        cells = [f"{x:.1f}%" if i % 3 < 2 else f"{100 * x:.0f}%" for b in (1.0, 2.0)
                 for i, x in enumerate(measure.oracle_fraction(swept, full, b, oracle))]
        rows.append((measure.saving_within(swept, full, 1.0), [",".join(map(str, exits)), *cells]))
    head = [f"{h} +{b:g}% PPL" for b in (1, 2) for h in ("saved within", "oracle saves", "share")]
    print("\n".join(md(["Exit(s)", *head], [r for _, r in rows])))
    best = max(rows, key=lambda r: r[0])
    print(f"most compute saved within +1% PPL: exit(s) {best[1][0]} ({best[0]:.1f}%), {args.confidence} confidence, "
          f"masked, {len(stats['target']):,} characters of {source}")


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
