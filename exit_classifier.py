"""
Block-wise cascade with a learned exit classifier (seed 004), at character level.

Block 0 (embedding, 2 layers, a head) learns the next character on all the training text; a small
exit classifier learns from block 0's hidden state how sure block 0 is; tokens below the
`--hard-ratio` quantile of that confidence are "hard" and train block 1, which reads block 0's
hidden states. At evaluation a token leaves at block 0 when its confidence clears the threshold
(true early exit); the rest go on. Every PPL printed is on the same held-out validation text.

Tiny CPU run (a few seconds on 2 cores):
    python exit_classifier.py --data ../shared/data/wikitext-2 --train-seqs 600 --max-epochs 2 --val-chars 5000
Seed 004's settings (the defaults), methods A/B/C on one block 0, each way of giving block 1 its
hard tokens (5 to 6 minutes each on a CPU core; every block stops early, block 0 after about 30 epochs):
    python exit_classifier.py --data ../shared/data/wikitext-2 --compare --hard-context repack --out ec-repack.pt
    python exit_classifier.py --data ../shared/data/wikitext-2 --compare --hard-context inplace --out ec-inplace.pt
Bigger, on a GPU:
    python exit_classifier.py --compare --block-layers 4,4 --n-embd 256 --ffn-dim 1024 --train-seqs 30000

--hard-context repack (seed 004): the hard tokens' block-0 states are concatenated in text order and
cut into new --seq-len sequences, so block 1 sees only earlier *hard* tokens as context. At
evaluation the held-out hard tokens are repacked the same way (consistent with training; easy
tokens skip block 1 entirely, not even K/V). --hard-context inplace: block 1 runs on each whole
sequence, only hard tokens are updated and scored, exited tokens lend their frozen block-0 state as
K/V (eemini's true early exit). Each run also evaluates with the *other* context (the mismatch that
seed 004's hypothesis 2 is about) and prints it as its own row.

[1] Teerapittayanon et al. 2016, BranchyNet. arXiv:1709.01686  [2] Schuster et al. 2022, CALM
(state propagation, learned confidence). arXiv:2207.07061  [3] Wang et al. 2017, IDK cascades. arXiv:1706.00885
"""

import copy
import math
import time

import torch
import torch.nn as nn
from torch.nn import functional as F

import cascade
import checkpoint as ck
import cli
import eemini as ee
from cascade import KIND, METHODS, NAMES
from data import load_data
from seeds import S004


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    g = cli.add_data(p, split=False)
    g.add_argument("--train-seqs", type=cli.number(int, 1), default=10_000, help="training sequences of --seq-len "
                   "characters (seed 004: num_samples)")
    g = p.add_argument_group("model")
    g.add_argument("--block-layers", type=cli.comma_list(cli.number(int, 1)), default=[2, 2],
                   help="layers per block, comma list (at least two blocks)")
    g.add_argument("--n-embd", type=cli.number(int, 1), default=64, help="width of the hidden state (seed: dim)")
    g.add_argument("--n-head", type=cli.number(int, 1), default=4, help="attention heads")
    g.add_argument("--ffn-dim", type=cli.number(int, 1), default=256, help="MLP hidden width")
    g.add_argument("--seq-len", type=cli.number(int, 1), default=32, help="characters per sequence (the context)")
    g = p.add_argument_group("early exit")
    g.add_argument("--confidence", default="classifier", choices=["classifier", "softmax"],
                   help="learned exit classifier, or block 0's max softmax with no classifier")
    g.add_argument("--exit-label", default="distill", choices=["distill", "loss"],
                   help="classifier target: max softmax of the block (distill) or exp(-CE) (loss)")
    g.add_argument("--exit-classifier-mode", default="post", choices=["post", "joint"],
                   help="train the classifier after its block is frozen, or alongside it on detached states")
    g.add_argument("--exit-hidden", type=cli.number(int, 0), default=64, help="classifier MLP width (0 = linear)")
    g.add_argument("--exit-epochs", type=cli.number(int, 1), default=10, help="classifier epochs in post mode")
    g.add_argument("--hard-ratio", type=cli.number(float, 0.0, 1.0), default=0.5,
                   help="fraction of training tokens below the threshold, in (0, 1)")
    g.add_argument("--hard-context", default="repack", choices=["repack", "inplace"],
                   help="how block 1 sees its hard tokens: repacked into new sequences, or in their own text")
    g.add_argument("--compare", action="store_true", help="run A (distill), B (loss), C (softmax) on one block 0")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=cli.number(int, 1), default=64, help="sequences per step")
    g.add_argument("--lr", type=cli.number(float, 0.0), default=1e-3, help="AdamW learning rate")
    g.add_argument("--grad-clip", type=cli.number(float, 0.0), default=1.0, help="clip the gradient norm (0 = off)")
    g.add_argument("--max-epochs", type=cli.number(int, 1), default=50, help="epochs at most per block")
    g.add_argument("--patience", type=cli.number(int, 1), default=3,
                   help="stop after this many epochs without a better val PPL")
    g.add_argument("--val-ratio", type=cli.number(float, 0.0, 1.0), default=0.2,
                   help="share of the samples held out for early stopping, in (0, 1)")
    g.add_argument("--seed", type=int, default=1337, help="random seed")
    g = p.add_argument_group("eval / io")
    cli.add_eval_batch_size(g)
    g.add_argument("--out", default="exit_classifier.pt", help="checkpoint to write")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out (by default it is refused, "
                   "so a trained model is never lost)")
    cli.add_device(g)
    args = p.parse_args(argv)
    if len(args.block_layers) < 2:
        p.error(f"--block-layers needs at least two blocks of at least one layer, got {args.block_layers}")
    if not 0.0 < args.hard_ratio < 1.0:
        p.error(f"--hard-ratio {args.hard_ratio} is outside (0, 1)")
    if not 0.0 < args.val_ratio < 1.0:
        p.error(f"--val-ratio {args.val_ratio} is outside (0, 1)")
    if args.n_embd % args.n_head:
        p.error(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    return args


def val_ppl(block, tok, args, device):
    """PPL of block on the live tokens of tok."""
    return math.exp(cascade.block_outputs(block, tok, args.eval_batch_size, device)["ce"][tok.live].mean().item())


def hard_threshold(conf, hard_ratio):
    """The hard_ratio quantile: the round(hard_ratio*N) least confident tokens fall below it (hard)."""
    k = min(round(hard_ratio * len(conf)), len(conf) - 1)
    return conf.sort().values[k].item()


# ----------------------------------------------------------------------------------------------
# training: each block with early stopping on val PPL, then (post mode) its exit classifier


def fit(name, block, train, val, args, device, clfs=None):
    """Train block on train's live tokens until val PPL has not improved for `patience` epochs;
    restore the best weights. clfs {label: classifier}: trained alongside (joint mode) on the
    block's detached states, so they never change the block. Returns the best val PPL."""
    clfs = clfs or {}
    params = [*block.parameters(), *(p for c in clfs.values() for p in c.parameters())]
    opt, gen = torch.optim.AdamW(params, lr=args.lr), torch.Generator().manual_seed(args.seed)
    best, best_state, bad, t0 = float("inf"), None, 0, time.time()
    for epoch in range(1, args.max_epochs + 1):
        block.train()
        perm, tot, n = torch.randperm(len(train.y), generator=gen), {}, 0
        for i in range(0, len(perm), args.batch_size):
            b = train.take(perm[i : i + args.batch_size])
            if not b.live.any():
                continue
            x, y, live = b.x.to(device), b.y.to(device), b.live.to(device)
            with cli.autocast(device):
                h, logits = block(x, None if b.live.all() else live)
            ce = F.cross_entropy(logits.float().transpose(1, 2), y.clamp(min=0), reduction="none")
            losses = {"ce": ce[live].mean()}
            for label, clf in clfs.items():  # joint mode: regress the label from detached states
                target = cascade.LABELS[label](ce.detach(), ee.conf_softmax(logits.detach()))[live]
                losses[label] = F.mse_loss(clf(h.detach().float())[live], target)
            sum(losses.values()).backward()
            if args.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tot, n = {k: tot.get(k, 0.0) + v.item() for k, v in losses.items()}, n + 1
        ppl = val_ppl(block, val, args, device)
        if ppl < best:
            best, bad = ppl, 0
            best_state = copy.deepcopy([block.state_dict(), *(c.state_dict() for c in clfs.values())])
        else:
            bad += 1
        dt = time.time() - t0
        extra = "".join(f" | exit mse ({k}) {tot[k] / n:.4f}" for k in clfs)
        print(f"{name} | epoch {epoch:3d}/{args.max_epochs} | train ce {tot['ce'] / n:.4f} | val ppl {ppl:8.3f} "
              f"| best {best:8.3f} | {1000 * dt / epoch:6.0f} ms/epoch | ETA <= {cli.fmt_time(dt / epoch * (args.max_epochs - epoch))}{extra}")
        if bad >= args.patience:
            print(f"{name} | early stop: no better val PPL for {args.patience} epochs")
            break
    for module, state in zip([block, *clfs.values()], best_state):
        module.load_state_dict(state)
    block.requires_grad_(False)  # frozen from here on, head included
    return best


def fit_classifier(name, clf, states, labels, args, device):
    """Post mode: regress labels (N,) from frozen states (N, C) with MSE; log loss and avg label."""
    opt, gen = torch.optim.AdamW(clf.parameters(), lr=args.lr), torch.Generator().manual_seed(args.seed)
    step = args.batch_size * args.seq_len  # tokens per step
    for epoch in range(1, args.exit_epochs + 1):
        perm, tot, n = torch.randperm(len(labels), generator=gen), 0.0, 0
        for i in range(0, len(perm), step):
            j = perm[i : i + step]
            loss = F.mse_loss(clf(states[j].to(device)), labels[j].to(device))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tot, n = tot + loss.item(), n + 1
        print(f"{name} | exit epoch {epoch:2d}/{args.exit_epochs} | loss {tot / n:.4f} | avg_label {labels.mean():.3f}")
    clf.requires_grad_(False)


def train_cascade(method, block0, clf0, train, val, cfg, args, device):
    """The blocks after block 0 and a router (classifier, threshold) per non-last block, for one
    confidence method. Returns (blocks, routers, info)."""
    blocks, routers, info, last = [block0], [], {"es_ppl": []}, len(args.block_layers) - 1
    learned, label = METHODS[method][0] == "classifier", METHODS[method][1]
    for i, n_layer in enumerate(args.block_layers):
        clf = clf0 if i == 0 and clf0 is not None else None
        if clf is None and learned and i < last:
            clf = cascade.ExitClassifier(cfg.n_embd, args.exit_hidden).to(device)
        if i > 0:
            joint = {label: clf} if clf is not None and args.exit_classifier_mode == "joint" else {}
            blocks.append(cascade.CascadeBlock(cfg, n_layer).to(device))
            info["es_ppl"].append(fit(f"{NAMES[method]} block {i}", blocks[i], train, val, args, device, joint))
        if i == last:
            break
        out_tr, out_va = (cascade.block_outputs(blocks[i], t, args.eval_batch_size, device) for t in (train, val))
        if learned:
            labels = cascade.LABELS[label](out_tr["ce"], out_tr["pmax"])[train.live]
            info.setdefault("avg_label", []).append(labels.mean().item())
            if args.exit_classifier_mode == "post":
                fit_classifier(f"{NAMES[method]} block {i}", clf, out_tr["h"][train.live], labels, args, device)
        conf_tr, conf_va = cascade.confidence(clf, out_tr), cascade.confidence(clf, out_va)
        thr = hard_threshold(conf_tr[train.live], args.hard_ratio)
        routers.append((clf, thr))
        train = cascade.advance(train, out_tr["h"], ~ee.exit_mask(conf_tr, thr), args.hard_context)
        val = cascade.advance(val, out_va["h"], ~ee.exit_mask(conf_va, thr), args.hard_context)
        if not (train.live.any() and val.live.any()):
            raise ee.EEminiError(f"no hard tokens reach block {i + 1}; use more --train-seqs or --hard-ratio")
        print(f"{NAMES[method]} block {i} | threshold {thr:.4f} | {train.live.sum().item():,} hard training tokens "
              f"-> block {i + 1} ({args.hard_context})")
    return blocks, routers, info


def evaluate(blocks, routers, held, context, cfg, args, device):
    """The seed's figures of one cascade, evaluated with true early exit over the held-out text."""
    r = cascade.evaluate(blocks, routers, held, context, args.eval_batch_size, device)
    return cascade.figures(r, cfg, args.block_layers, args.hard_context)


def table_rows(r, args):
    """{row name: cell} of seed 004's two tables for one method's results."""
    other = "inplace" if args.hard_context == "repack" else "repack"
    final = {"Final PPL": f"{r['final_ppl']:.3f}", "Accuracy": f"{r['accuracy']:.2f}%",
             "Shallow ratio": f"{r['shallow']:.1f}%", "Compute savings (layers)": f"{r['saved']:.1f}%",
             "FLOP savings": f"{r['flops_saved']:.1f}%",
             f"Final PPL, {other} context at eval (mismatch)": f"{r['mismatch_ppl']:.3f}"}
    training = {"Block 0 val_ppl": f"{r['block0_ppl']:.3f}"}
    for i in range(1, len(args.block_layers)):
        training[f"Block {i} val_ppl"] = f"{r['block_ppl'][i]:.3f}"
        training[f"Block 0 on block {i}'s tokens"] = f"{r['block0_on_hard'][i - 1]:.3f}"
    for i, ppl in enumerate(r["es_ppl"]):
        training[f"Block {i} early-stop val_ppl (train split)"] = f"{ppl:.3f}"
    for i, thr in enumerate(r["thresholds"]):
        training[f"Threshold (Block {i})"] = f"{thr:.4f}"
        training[f"avg_label (Block {i})"] = f"{r['avg_label'][i]:.3f}" if "avg_label" in r else "-"
    return final, training


def print_tables(results, methods, args):
    """Seed 004's two tables, this run's columns beside the seed's figures."""
    cells = {m: table_rows(results[m], args) for m in methods}
    for t, title in enumerate(("Final evaluation (true early exit, held-out text)",
                               "Training (every val_ppl on the held-out text unless marked)")):
        print(f"\n## {title}, --hard-context {args.hard_context}\n")
        print(f"| Metric | {' | '.join(NAMES[m] for m in methods)} | {' | '.join('seed ' + NAMES[m] for m in methods)} |")
        print("|---" * (1 + 2 * len(methods)) + "|")
        for name in cells[methods[0]][t]:
            seed = [S004[name][list(METHODS).index(m)] if name in S004 else "" for m in methods]
            print(f"| {name} | {' | '.join(cells[m][t][name] for m in methods)} | {' | '.join(seed)} |")


# ----------------------------------------------------------------------------------------------


def main(args):
    ck.refuse_folder(args.out, "--out", "ec.pt")
    with ck.exclusive(args.out, "exit_classifier.py"):  # one writer per checkpoint
        ck.refuse_existing(args.out, args.overwrite)
        return compare(args)


def compare(args):
    """Block 0 once, then each confidence method's cascade on it, evaluated, tabled and saved."""
    device, t0 = cli.pick_device(args.device, args.threads), time.time()
    torch.manual_seed(args.seed)
    vocab, train_ids, held_ids = load_data(args.data, args.train_seqs * args.seq_len + 1, args.val_chars)
    samples, held = cascade.windows(train_ids, args.seq_len), cascade.windows(held_ids, args.seq_len)
    n_val = int(len(samples.y) * args.val_ratio)
    if not 0 < n_val < len(samples.y):
        raise ee.EEminiError(f"{len(samples.y)} training sequences cannot be split by --val-ratio {args.val_ratio}; "
                             f"use more --train-seqs")
    perm = torch.randperm(len(samples.y), generator=torch.Generator().manual_seed(args.seed))
    val, train = samples.take(perm[:n_val]), samples.take(perm[n_val:])
    bl = args.block_layers
    cfg = ee.GPTConfig(vocab_size=len(vocab), block_size=args.seq_len, n_layer=sum(bl), n_head=args.n_head,
                       n_embd=args.n_embd, ffn_dim=args.ffn_dim, exits=[bl[0]])
    methods = list(METHODS) if args.compare else \
        [m for m, (c, label) in METHODS.items() if c == args.confidence and label in (args.exit_label, None)]
    block0 = cascade.CascadeBlock(cfg, bl[0], embed=True).to(device)
    joint = {METHODS[m][1]: cascade.ExitClassifier(cfg.n_embd, args.exit_hidden).to(device) for m in methods
             if METHODS[m][0] == "classifier"} if args.exit_classifier_mode == "joint" else {}
    print(f"device {device} | {len(train.y):,} train / {len(val.y):,} early-stop / {len(held.y):,} held-out sequences "
          f"of {args.seq_len} | blocks {bl} | block 0 {sum(p.numel() for p in block0.parameters()):,} params | "
          f"methods {', '.join(NAMES[m] for m in methods)} | classifier {args.exit_classifier_mode} | {args.hard_context}")
    es0 = fit("block 0", block0, train, val, args, device, joint)
    results, saved = {}, nn.ModuleDict()
    for m in methods:
        torch.manual_seed(args.seed + 1)  # every method's later blocks start from the same weights
        blocks, routers, info = train_cascade(m, block0, joint.get(METHODS[m][1]), train, val, cfg, args, device)
        results[m] = r = evaluate(blocks, routers, held, args.hard_context, cfg, args, device)
        other = "inplace" if args.hard_context == "repack" else "repack"
        r["mismatch_ppl"] = evaluate(blocks, routers, held, other, cfg, args, device)["final_ppl"]
        r.update(info, es_ppl=[es0, *info["es_ppl"]], thresholds=[t for _, t in routers])
        print(f"{NAMES[m]} | final PPL {r['final_ppl']:.3f} (block 0 alone {r['block0_ppl']:.3f}) | accuracy "
              f"{r['accuracy']:.2f}% | shallow {r['shallow']:.1f}% | saved {r['saved']:.1f}% layers, {r['flops_saved']:.1f}% FLOPs")
        saved[m] = cascade.as_module(blocks, {i: c for i, (c, _) in enumerate(routers) if c is not None})
    print_tables(results, methods, args)
    saved.config = cfg
    ck.save_checkpoint(args.out, saved, vocab, kind=KIND, block_layers=bl, methods=methods, args=vars(args),
                       names={m: NAMES[m] for m in methods},
                       thresholds={m: results[m]["thresholds"] for m in methods}, metrics=results)
    print(f"\ndone in {cli.fmt_time(time.time() - t0)} | saved {args.out}")
    return results


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
