"""
Optimisation: Muon for the blocks' matrices, AdamW for everything else, the learning-rate
schedule both follow (linear warmup, cosine decay) and the flags they read, and the early-exit loss
curriculum (which heads a step trains).

Muon (Jordan et al. 2024, kellerjordan.github.io/posts/muon; Liu et al. 2025, arXiv:2502.16982)
replaces each 2-D weight's update by the nearest orthogonal matrix of its momentum (a few
Newton-Schulz steps), so every direction of the matrix learns at the same rate. nanochat and
modded-nanogpt use it for the hidden matrices and AdamW for embeddings, heads and gains.
"""

import math

import torch
from torch.optim import AdamW

import cli

OPTIMIZERS = ("muon", "adamw")


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in float32 instead of bfloat16. Same
    algorithm, arguments and state; but a CPU without native bfloat16 matrix products (AVX2: most
    laptops, many servers) runs torch's bfloat16 iteration 7x slower than float32, which made Muon
    cost 70% of a quick-start training step on a 2-core AVX2 machine (float32: 10%)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            a, b, c = group["ns_coefficients"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])  # the same average torch keeps
                g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                x = g.T if g.size(0) > g.size(1) else g  # orthogonalise the wide way: fewer FLOPs
                x = x / x.norm().clamp(min=group["eps"])  # spectral norm <= 1
                for _ in range(group["ns_steps"]):  # quintic Newton-Schulz: singular values -> ~1
                    gram = x @ x.T
                    x = a * x + (b * gram + c * gram @ gram) @ x
                update = x.T if g.size(0) > g.size(1) else x
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay
                p.add_(update, alpha=-group["lr"] * shape_scale(group["adjust_lr_fn"], *p.shape))


def shape_scale(adjust_lr_fn, rows, cols):
    """Muon's per-shape learning-rate factor, as torch.optim.Muon computes it."""
    if adjust_lr_fn == "match_rms_adamw":  # Liu et al.: an update of the RMS AdamW's would have
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))  # Keller Jordan's original


def is_hidden_matrix(name, p):
    """A 2-D weight inside a transformer block: what Muon trains (embeddings and heads are lookups
    and read-outs, not hidden transforms; AdamW trains them)."""
    return p.dim() == 2 and ".h." in f".{name}"


def add_arguments(g):
    """The flags configure_optimizers and get_lr read, into the argparse group g."""
    g.add_argument("--optimizer", default="muon", choices=OPTIMIZERS, help="Muon for the blocks' matrices "
                   "and AdamW for the rest, or AdamW for all")
    g.add_argument("--muon-lr", type=cli.number(float, 0.0), default=0.02, help="Muon's peak learning rate")
    g.add_argument("--lr", type=cli.number(float, 0.0), default=3e-3, help="AdamW's peak learning rate (linear "
                   "warmup, cosine decay; Muon's follows the same schedule)")
    g.add_argument("--min-lr", type=cli.number(float, 0.0), default=3e-4, help="learning rate at the end of the cosine")
    g.add_argument("--warmup-iters", type=cli.number(int, 0), default=100, help="linear warmup steps")
    g.add_argument("--weight-decay", type=cli.number(float, 0.0), default=0.1, help="AdamW weight decay on matrices")


def configure_optimizers(model, args):
    """[Muon over the blocks' matrices, AdamW over the rest] (--optimizer muon), or [AdamW over all]
    (--optimizer adamw, GPT-2's recipe); weight decay on matrices only. Each group keeps the ratio of
    its peak learning rate to --lr, which the schedule scales."""
    named = list(model.named_parameters())
    hidden = [p for n, p in named if is_hidden_matrix(n, p)] if args.optimizer == "muon" else []
    rest = [p for _, p in named if not any(p is h for h in hidden)]
    adam = AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": args.weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                 lr=args.lr, betas=(0.9, 0.95))
    opts = [Muon(hidden, lr=args.muon_lr, weight_decay=args.weight_decay), adam] if hidden else [adam]
    for opt in opts:
        for group in opt.param_groups:
            group["lr_ratio"] = 1.0 if opt is adam else args.muon_lr / args.lr
    return opts


def get_lr(it, args):
    """Linear warmup to lr, then cosine decay to min_lr at schedule_iters (max_iters, unless a
    resumed run keeps the end of the schedule it was trained with); min_lr after that."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    ratio = min(1.0, (it - args.warmup_iters) / max(1, args.schedule_iters - args.warmup_iters))
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


def set_lr(optimizers, lr):
    """The schedule's lr for AdamW; Muon's groups get it times their ratio (--muon-lr / --lr)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_ratio"]


CURRICULA = ("none", "rotational", "gradual")


def curriculum(weights, n_layer, kind, step, max_iters, every=2):
    """The loss table at one training step under LayerSkip's early-exit curriculum (Elhoushi et al.
    2024, arXiv:2404.16710): the last layer always trains, and the table's total stays as it is (the
    heads switched on share it).
    rotational: the exit after layer k trains at step t when (k - t) % every == 0, so each takes
    its turn. gradual: exits switch on one by one from the deepest down, evenly over the first
    half of training (our choice of pace), and every exit trains from the middle on."""
    exits = sorted((k for k in weights if k < n_layer), reverse=True)
    if kind == "rotational":
        on = [k for k in exits if (k - step) % every == 0]
    elif kind == "gradual":
        on = exits[: 2 * len(exits) * step // max(1, max_iters)]
    else:
        return dict(weights)
    table = {k: w for k, w in weights.items() if k == n_layer or k in on}
    scale = sum(weights.values()) / sum(table.values())
    return {k: w * scale for k, w in table.items()}
