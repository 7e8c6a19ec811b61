"""
Why true early exit loses more than masked routing shows, and why more for some models than others.

Masked routing gives a deep character the deep layers' view of every earlier character; true early
exit gives it, for each earlier character that exited, that character's state frozen at the exit. The
gap between the two PPLs is what those frozen keys and values cost. For each checkpoint, side by side:
both PPLs at a few thresholds, and where the deep layers of the deep characters look (true exit): the
share of their attention on exited characters, on the character just before, and its mean distance.

    python bench/exit_gap.py gpt2.pt muon.pt rope.pt recipe.pt --data ../shared/data/wikitext-2
"""

import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint as ck  # noqa: E402
import cli  # noqa: E402
import eemini as ee  # noqa: E402
import measure  # noqa: E402
from data import eval_windows  # noqa: E402


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    p.add_argument("checkpoints", nargs="+", help="checkpoints written by train.py (with a trained exit)")
    cli.add_data(p, from_checkpoint=True)
    p.add_argument("--thresholds", type=cli.comma_list(cli.threshold, empty=False), default=[0.5, 0.7, 0.9],
                   help="thresholds to compare the two modes at")
    p.add_argument("--probe-threshold", type=cli.threshold, default=0.9, help="threshold of the attention probe")
    cli.add_device(p)
    return p.parse_args(argv)


@torch.no_grad()
def attention_probe(model, ids, threshold, batch_size=64):
    """True early exit, every block run by hand so that its attention weights can be read: for the
    deep characters' queries in the layers above the first exit, the mean attention share on exited
    characters, on the one just before, and the mean distance to what they attend to."""
    cfg, k = model.config, model.config.exits[0]
    sums = torch.zeros(3, dtype=torch.float64)
    count = 0
    for x_ids, _ in eval_windows(ids, cfg.block_size, batch_size):
        x = model.embed(x_ids)
        T = x.size(1)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        dist = (torch.arange(T).view(-1, 1) - torch.arange(T)).clamp(min=0).double()
        frozen = torch.zeros(x.shape[:2], dtype=torch.bool)
        for layer, block in enumerate(model.transformer.h, 1):
            if layer > k:
                attn, h = block.attn, block.ln_1(x)
                q, kk, _ = attn.c_attn(h).split([cfg.n_embd, attn.kv, attn.kv], dim=2)
                pos = torch.arange(T)
                q, kk = attn.heads(q, pos), attn.heads(kk, pos)
                kk = kk.repeat_interleave(q.size(1) // kk.size(1), dim=1)  # a K/V head for each query head
                w = F.softmax((q @ kk.transpose(-1, -2) / q.size(-1) ** 0.5).masked_fill(~causal, float("-inf")), -1)
                w = w.mean(1).double()  # (B, T, T) averaged over heads
                deep = ~frozen
                sums[0] += (w * frozen.unsqueeze(1).double()).sum(-1)[deep].sum()
                sums[1] += w.diagonal(offset=-1, dim1=1, dim2=2)[deep[:, 1:]].sum()
                sums[2] += (w * dist).sum(-1)[deep].sum()
                count += int(deep.sum())
            x = torch.where(frozen.unsqueeze(-1), x, block(x))
            if layer == k:
                frozen = ee.exit_mask(ee.conf_softmax(model.head(k, x)), threshold)
    return (sums / count).tolist() if count else [None] * 3  # no deep character at this threshold


def main(args):
    device = cli.pick_device(args.device, args.threads)
    print(cli.machine(device))
    header = ["checkpoint", "layout", "full depth", *(f"@{t:g} masked / true exit (gap)" for t in args.thresholds),
              "attention on exited", "on the previous character", "mean distance"]
    rows = []  # printed together at the end, after each checkpoint's data line
    for path in args.checkpoints:
        ckpt, model, vocab = ck.load_with_exit(path, device, why="")
        cfg, trained = model.config, ckpt.get("args") or {}
        ids, _ = ck.eval_text(args, ckpt, vocab)
        stats = measure.token_stats(model, ids, 64, device)
        cells = []
        for t in args.thresholds:
            masked = measure.routed_metrics(stats, t, cfg)["ppl"]
            true = measure.exit_metrics(model, ids, t, 64, device)["ppl"]
            cells.append(f"{masked:.3f} / {true:.3f} ({100 * (true / masked - 1):+.2f}%)")
        on_exited, on_previous, distance = attention_probe(model, ids.to(device), args.probe_threshold)
        layout = f"{cfg.pos}, {cfg.norm}, {cfg.mlp}, {trained.get('optimizer', 'adamw')}, exit dropout {cfg.exit_dropout:g}"
        probe = [f"{100 * on_exited:.1f}%", f"{100 * on_previous:.1f}%", f"{distance:.1f}"] if distance is not None \
            else ["—"] * 3  # every character exited: no deep query to look at
        rows.append(f"| {Path(path).name} | {layout} | {measure.ppl(stats['ce'][cfg.n_layer]):.3f} | {' | '.join(cells)} | "
                    + " | ".join(probe) + " |")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" + "\n".join(rows))
    print(f"\nattention: deep characters' queries in the layers above the exit, true early exit at "
          f"{args.probe_threshold:g}, heads averaged")


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
