"""
Measurement: one pass gathers every token's cross-entropy and confidences; every threshold, the
oracle frontier and the sweep's rows are read from them. True early exit is measured separately.

Masked routing [1] needs no second pass: a token's output is the exit's or the last layer's, both
already computed, so a whole threshold sweep costs one evaluation. True early exit changes what the
deep layers see, so it takes one pass a threshold. The oracle frontier is the Depth-Adaptive
Transformer's oracle exit [2]: with hindsight of each token's losses, the best any router could do.

[1] seeds/000-003: the figures this reproduces  [2] Elbayad et al. 2020, arXiv:1910.10073
"""

import math

import torch
from torch.nn import functional as F

from data import eval_windows
from eemini import CONFIDENCE, compute_percent, exit_depth, flops_percent, pick_by_depth

# ----------------------------------------------------------------------------------------------
# per-token statistics and the metrics read from them


@torch.no_grad()
def token_stats(model, data, batch_size=64, device="cpu"):
    """One masked forward over data: per token, CE at every head and each confidence measure at
    each exit point. {'ce': {layer: (N,)}, 'conf': {measure: {exit: (N,)}}, 'correct': {layer: (N,)}},
    tokens in text order, N a whole number of windows of the model's block_size."""
    model.eval()
    cfg = model.config
    ce, correct, conf = {}, {}, {m: {} for m in CONFIDENCE}
    for x, y in eval_windows(data, cfg.block_size, batch_size):
        x, y = x.to(device), y.to(device)
        logits = model(x)[0]
        for k, lg in logits.items():
            lg = lg.float()
            ce.setdefault(k, []).append(F.cross_entropy(lg.flatten(0, 1), y.flatten(), reduction="none").cpu())
            correct.setdefault(k, []).append((lg.argmax(-1) == y).flatten().cpu())
            if k in cfg.exits:
                for m, fn in CONFIDENCE.items():
                    conf[m].setdefault(k, []).append(fn(lg).flatten().cpu())
    cat = lambda d: {k: torch.cat(v) for k, v in d.items()}  # noqa: E731
    return {"ce": cat(ce), "correct": cat(correct), "conf": {m: cat(c) for m, c in conf.items()}}


def ppl(ce):
    """exp of the mean CE, summed in float64 (a float32 sum over 50,000 tokens drifts by ~1e-5)."""
    return math.exp(ce.double().mean().item())


def layer_ppl(stats):
    """{layer: PPL} of each head alone."""
    return {k: ppl(v) for k, v in stats["ce"].items()}


def routed_depth(stats, threshold, cfg, confidence="softmax"):
    """The layer each token leaves at under masked routing at this threshold."""
    return exit_depth(stats["conf"][confidence], threshold, cfg.n_layer, stats["ce"][cfg.n_layer].shape)


def routed_metrics(stats, threshold, cfg, confidence="softmax"):
    """PPL, Shallow%, Compute%, FLOPs% of the masked router at one threshold, from token_stats."""
    depth = routed_depth(stats, threshold, cfg, confidence)
    ce = pick_by_depth({k: stats["ce"][k] for k in [*cfg.exits, cfg.n_layer]}, depth)
    return summarize(ce, depth, cfg, threshold)


def summarize(ce, depth, cfg, threshold):
    """One row of a results table from per-token CE and exit depth (tokens in whole windows)."""
    return {"threshold": threshold, "ppl": ppl(ce),
            "shallow": 100.0 * (depth < cfg.n_layer).float().mean().item(),
            "compute": compute_percent(depth, cfg.n_layer),
            "flops": flops_percent(depth.view(-1, cfg.block_size), cfg)}


@torch.no_grad()
def exit_metrics(model, data, threshold, batch_size=64, device="cpu", confidence="softmax"):
    """The same figures as routed_metrics, measured with true early exit (one pass a threshold:
    which states the deep layers see depends on who exited)."""
    model.eval()
    ce, depth = [], []
    for x, y in eval_windows(data, model.config.block_size, batch_size):
        logits, d, _ = model.forward_exit(x.to(device), threshold, confidence)
        ce.append(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none").cpu())
        depth.append(d.flatten().cpu())
    return summarize(torch.cat(ce), torch.cat(depth), model.config, threshold)


# ----------------------------------------------------------------------------------------------
# the oracle frontier [2]: with hindsight, send deep the n tokens whose CE drops most with depth


def oracle_ce(stats, cfg):
    """(N+1,) mean CE of the best router sending exactly n = 0..N tokens deep (one exit point).
    Sorting the per-token gain CE_exit - CE_final and summing it gives every budget at once."""
    ce_exit, ce_final = stats["ce"][cfg.exits[0]].double(), stats["ce"][cfg.n_layer].double()
    gain = (ce_exit - ce_final).sort(descending=True).values
    return (ce_exit.sum() - torch.cat([gain.new_zeros(1), gain.cumsum(0)])) / len(gain)


def oracle_compute(n_deep, n, cfg):
    """Compute% with n_deep of n tokens through every layer and the rest leaving at the exit."""
    k, L = cfg.exits[0], cfg.n_layer
    return 100.0 * (k / L + (1 - k / L) * n_deep / n)


def oracle_frontier(stats, cfg, points=101):
    """The oracle's (Compute%, PPL) at `points` evenly spaced shares of tokens sent deep."""
    orc, n = oracle_ce(stats, cfg), len(stats["ce"][cfg.n_layer])
    deep = [round(n * j / (points - 1)) for j in range(points)]
    return [{"compute": oracle_compute(d, n, cfg), "ppl": math.exp(orc[d].item())} for d in deep]


# ----------------------------------------------------------------------------------------------
# the sweep: one row a (measure, threshold), and seed 002's analysis of them


def masked_sweep(stats, cfg, thresholds, measures):
    """One row a (measure, threshold), all read from one token_stats pass, with the oracle's PPL
    at the row's compute (the same number of deep tokens) beside it."""
    full, orc = ppl(stats["ce"][cfg.n_layer]), oracle_ce(stats, cfg)
    rows = []
    for m in measures:
        for t in thresholds:
            r = {"confidence": m, **routed_metrics(stats, t, cfg, m)}
            n_deep = int((routed_depth(stats, t, cfg, m) == cfg.n_layer).sum())
            r["delta_ppl"] = 100.0 * (r["ppl"] / full - 1)
            r["oracle_ppl"] = math.exp(orc[n_deep].item())
            rows.append(r)
    return rows


def analyse(rows, full, budget, orc, cfg):
    """Seed 002's analysis: best PPL, most compute saved within +budget% PPL, maximum efficiency;
    and how little compute the oracle needs within the same budget."""
    limit = full * (1 + budget / 100)
    within = [r for r in rows if r["ppl"] <= limit]
    n_ok = int((orc.exp() <= limit).nonzero()[0]) if (orc.exp() <= limit).any() else len(orc) - 1
    return {"best_ppl": min(rows, key=lambda r: r["ppl"]),
            "within_budget": min(within, key=lambda r: (r["compute"], r["ppl"])) if within else None,
            "max_efficiency": min(rows, key=lambda r: (r["compute"], r["ppl"])),
            "oracle_compute_within_budget": oracle_compute(n_ok, len(orc) - 1, cfg)}
