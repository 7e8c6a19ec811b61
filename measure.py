"""
Measurement: masked routing and what routing costs (Compute%, FLOPs%); one pass gathers every
token's cross-entropy and confidences, and every threshold, the oracle frontier and the sweep's rows
are read from them; true early exit's metrics (exit_metrics), one pass a threshold; window-level
routing, character classes, and the per-window risk that sweep.py --calibrate tests.

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
from eemini import CONFIDENCE, at_exit, checked_exits, exit_mask
from uncertainty import window_means

# ----------------------------------------------------------------------------------------------
# masked routing: every layer ran for every token, and each token's output is read off the exit it left at


def exit_depth(conf_by_exit, threshold, n_layer, shape=None):
    """Layer each token leaves at: the first exit point (in depth order) whose confidence clears
    its threshold, else n_layer. conf_by_exit: {exit layer: confidence}; shape is needed only
    when there is no exit point."""
    depth = torch.full(shape or next(iter(conf_by_exit.values())).shape, n_layer, dtype=torch.long)
    for k in sorted(conf_by_exit, reverse=True):  # deepest first, so a shallower exit overrides
        depth = torch.where(exit_mask(conf_by_exit[k], at_exit(threshold, k)), k, depth.to(conf_by_exit[k].device))
    return depth


def pick_by_depth(by_layer, depth):
    """Per token, the entry of by_layer ({layer: (…) or (…, V)}) at the layer it left at."""
    out = by_layer[max(by_layer)]
    for k in sorted(by_layer)[:-1]:
        d = depth.unsqueeze(-1) if out.dim() > depth.dim() else depth
        out = torch.where(d == k, by_layer[k], out)
    return out


def route(logits_by_layer, threshold, exits, confidence="softmax"):
    """Masked routing (what the seeds measured): every layer ran for every token; each token's
    output is taken from the exit it left at or the last layer. Returns (logits, depth, conf),
    conf at the first exit point; depth < n_layer marks the tokens that exited."""
    n_layer = max(logits_by_layer)
    confs = {k: CONFIDENCE[confidence](logits_by_layer[k]) for k in exits}
    depth = exit_depth(confs, threshold, n_layer, logits_by_layer[n_layer].shape[:-1])
    picked = pick_by_depth({k: logits_by_layer[k] for k in [*exits, n_layer]}, depth)
    return picked, depth, confs[exits[0]] if exits else None


# ----------------------------------------------------------------------------------------------
# compute accounting


def compute_percent(depth, n_layer):
    """The seeds' Compute%: mean layers run per token / n_layer (shallow*k/L + (1-shallow)*1)."""
    return 100.0 * depth.float().mean().item() / n_layer


def flops_per_token(cfg, context=None):
    """Forward FLOPs of one token (2 per multiply-add): one layer, one head, one layer's K/V
    projection. Attention is counted over `context` keys (default: half the block, the mean)."""
    C, Fd, V = cfg.n_embd, cfg.ffn_dim or 4 * cfg.n_embd, cfg.vocab_size
    kv = C * cfg.kv_heads // cfg.n_head  # keys' width: less than C with grouped-query attention
    ctx = cfg.block_size / 2 if context is None else context
    layer = 2 * (2 * C * C + 2 * C * kv) + 2 * 2 * ctx * C + 2 * 2 * C * Fd  # q, k, v + proj, scores + mix, MLP
    return layer, 2 * C * V, 2 * 2 * C * kv


def kv_layers(depth, n_layer):
    """Per token, the layers above its exit where its K/V must be computed: those a *later* token
    of its window reaches (an exited token lends K/V only to later tokens; lazy decoding computes
    exactly these). depth: (..., T), windows along the last dimension."""
    after = depth.flip(-1).cummax(-1).values.flip(-1)  # deepest layer reached from t to the end
    after = torch.cat([after[..., 1:], torch.zeros_like(after[..., :1])], dim=-1)  # ... after t
    return (after.clamp(max=n_layer) - depth).clamp(min=0)


def flops_percent(depth, cfg, context=None, checked=None, router=None):
    """FLOPs of this routing under true early exit, as % of a plain n_layer GPT with one head.
    Counts what Compute% hides: every exit head a token reaches (of the exits `checked`, default all:
    one at threshold 1.0 computes none), with the learned router there if the routing asks one
    (router: {exit: its FLOPs a token}), and the K/V an exited token still computes in the layers
    above its exit that later tokens of its window reach.
    depth: (..., T) with windows along the last dimension."""
    layer, head, kv = flops_per_token(cfg, context)
    L, d, router = cfg.n_layer, depth.double(), router or {}
    exits = sum((d >= k).double() * (head + router.get(k, 0)) for k in (cfg.exits if checked is None else checked))
    cost = d * layer + exits + (d == L).double() * head + kv_layers(d, L) * kv
    return 100.0 * cost.mean().item() / (L * layer + head)


# ----------------------------------------------------------------------------------------------
# per-token statistics and the metrics read from them


@torch.no_grad()
def token_stats(model, data, batch_size=64, device="cpu", routers=None, stride=0):
    """One masked forward over data: per token, CE and top character at every head, and each confidence
    measure (and each learned router, {name: {exit: router}}) and KL(last layer || exit) at each exit
    point. {'ce': {layer: (N,)}, 'top': {layer: (N,)}, 'conf': {measure: {exit: (N,)}}, 'kl': {exit:
    (N,)}, 'target': (N,), 'window': T}: the scored
    tokens in text order, N a whole number of windows of T (the model's block_size; with a stride,
    the stride: each window's scored part, see data.eval_windows)."""
    model.eval()
    cfg = model.config
    measures = {**CONFIDENCE, **(routers or {})}
    ce, top, conf, kl, target = {}, {}, {m: {} for m in measures}, {}, []
    for x, y in eval_windows(data, cfg.block_size, batch_size, stride):
        x, y = x.to(device), y.to(device)
        states, keep = model.states(x), (y != -100).flatten()
        target.append(y.flatten()[keep].cpu())
        last = model.head(cfg.n_layer, states[cfg.n_layer]).float()
        for k in [*cfg.head_layers, cfg.n_layer]:
            lg = model.head(k, states[k]).float() if k < cfg.n_layer else last
            ce.setdefault(k, []).append(F.cross_entropy(lg.flatten(0, 1), y.flatten(), reduction="none")[keep].cpu())
            top.setdefault(k, []).append(lg.argmax(-1).flatten()[keep].cpu())
            if k in cfg.exits:
                kl.setdefault(k, []).append(kl_divergence(last, lg).flatten()[keep].cpu())
            for m in measures if k in cfg.exits else ():
                fn = CONFIDENCE[m] if m in CONFIDENCE else routers[m][k]
                conf[m].setdefault(k, []).append(fn(lg, states[k], states[k - 1]).flatten()[keep].cpu())
    cat = lambda d: {k: torch.cat(v) for k, v in d.items()}  # noqa: E731
    return {"ce": cat(ce), "top": cat(top), "conf": {m: cat(c) for m, c in conf.items()}, "kl": cat(kl),
            "target": torch.cat(target), "window": stride or cfg.block_size,
            "router_flops": {m: router_flops(r) for m, r in (routers or {}).items()}}


def router_flops(confidence):
    """{exit: FLOPs a token} of a learned router ({exit: Router}; another module there is charged nothing);
    {} for a built-in measure, whose arithmetic on the exit's logits is a rounding error beside the head's."""
    if not isinstance(confidence, dict):
        return {}
    return {k: r.flops() if hasattr(r, "flops") else 0 for k, r in confidence.items()}


def cost_confidence(kl, scale=0.1):  # scale: the loss router's default epsilon
    """A confidence in (0, 1] from an expected cost in nats: exp(-kl / scale). Threshold t lets a character
    leave when its cost is at most scale * ln(1/t): with scale 0.1, t = 0.9 allows 0.011 nats, 0.5 0.069."""
    return torch.exp(-kl / scale)


def kl_divergence(last, exit_logits):
    """KL(p_last || p_exit) per position, from the two heads' logits (..., V): the CE that leaving at
    the exit costs on average over the next character, drawn as the last layer expects it."""
    log_last, log_exit = F.log_softmax(last.float(), -1), F.log_softmax(exit_logits.float(), -1)
    return (log_last.exp() * (log_last - log_exit)).sum(-1)


def ppl(ce):
    """exp of the mean CE, summed in float64 (a float32 sum over 50,000 tokens drifts by ~1e-5)."""
    return math.exp(ce.double().mean().item())


def layer_ppl(stats):
    """{layer: PPL} of each head alone."""
    return {k: ppl(v) for k, v in stats["ce"].items()}


def routed_depth(stats, threshold, cfg, confidence="softmax"):
    """The layer each token leaves at under masked routing at this threshold, through cfg's exits
    (which may be a subset of those the statistics hold)."""
    conf = {k: c for k, c in stats["conf"][confidence].items() if k in cfg.exits}
    return exit_depth(conf, threshold, cfg.n_layer, stats["ce"][cfg.n_layer].shape)


def read_off(stats, key, depth, cfg):
    """Per token, stats[key] ('ce' or 'top') at the layer it left at: an exit of cfg's, or the last."""
    return pick_by_depth({k: stats[key][k] for k in [*cfg.exits, cfg.n_layer]}, depth)


def routed_metrics(stats, threshold, cfg, confidence="softmax"):
    """PPL, Shallow%, Compute%, FLOPs% of the masked router at one threshold, from token_stats."""
    depth = routed_depth(stats, threshold, cfg, confidence)
    ce = read_off(stats, "ce", depth, cfg)
    return summarize(ce, depth, cfg, threshold, stats["window"], stats.get("router_flops", {}).get(confidence))


def summarize(ce, depth, cfg, threshold, window=None, router=None):
    """One row of a results table from per-token CE and exit depth (tokens in whole windows of
    `window`, by default the model's block_size); router: the learned router's FLOPs, see flops_percent."""
    return {"threshold": threshold, "ppl": ppl(ce),
            "shallow": 100.0 * (depth < cfg.n_layer).float().mean().item(),
            "compute": compute_percent(depth, cfg.n_layer),
            "flops": flops_percent(depth.view(-1, window or cfg.block_size), cfg, checked=checked_exits(threshold, cfg.exits),
                                   router=router)}


@torch.no_grad()
def exit_metrics(model, data, threshold, batch_size=64, device="cpu", confidence="softmax", whole_batch=False,
                 stride=0):
    """The same figures as routed_metrics, measured with true early exit (one pass a threshold:
    which states the deep layers see depends on who exited). whole_batch: CALM's rule, over
    batch_size windows read side by side."""
    model.eval()
    ce, depth = [], []
    for x, y in eval_windows(data, model.config.block_size, batch_size, stride):
        logits, d, _ = model.forward_exit(x.to(device), threshold, confidence, whole_batch=whole_batch)
        keep = (y != -100).flatten()
        ce.append(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none").cpu()[keep])
        depth.append(d.flatten().cpu()[keep])
    return summarize(torch.cat(ce), torch.cat(depth), model.config, threshold, stride or None, router_flops(confidence))


# ----------------------------------------------------------------------------------------------
# the oracle frontier [2]: with hindsight, each token leaves where depth helps it least


class Oracle:
    """The best any router could do with this model: for each compute budget, the lowest mean CE
    of a choice of exit per token, knowing every token's losses. One exit point: exact for every
    number n of tokens sent deep (sort the gains CE_exit - CE_final, add them up). Several: a
    Lagrangian sweep (each token leaves where CE + lam * depth / L is least, over a range of lam),
    which finds the frontier's lower convex hull."""

    def __init__(self, stats, cfg):
        self.cfg, L, self.n = cfg, cfg.n_layer, len(stats["ce"][cfg.n_layer])
        if len(cfg.exits) == 1:  # exact: n = 0..N tokens deep
            k = cfg.exits[0]
            ce_exit, ce_final = stats["ce"][k].double(), stats["ce"][L].double()
            gain = (ce_exit - ce_final).sort(descending=True).values
            self.ce = (ce_exit.sum() - torch.cat([gain.new_zeros(1), gain.cumsum(0)])) / self.n
            self.compute = 100.0 * (k / L + (1 - k / L) * torch.arange(self.n + 1, dtype=torch.float64) / self.n)
            return
        ce = torch.stack([stats["ce"][k].double() for k in [*cfg.exits, L]], 1)  # (N, depths)
        depths = torch.tensor([*cfg.exits, L], dtype=torch.float64)
        # every lam at which some token would switch between two depths, a few hundred of them
        switch = [(ce[:, i] - ce[:, j]) * L / (depths[j] - depths[i]) for i in range(len(depths)) for j in range(i + 1, len(depths))]
        switch = torch.cat(switch)
        lams = torch.cat([torch.zeros(1), switch[switch > 0].quantile(torch.linspace(0, 1, 400, dtype=torch.float64)), switch.max().clamp(min=0).view(1) + 1])
        pick = (ce.unsqueeze(0) + lams.view(-1, 1, 1) * depths / L).argmin(-1)  # (lams, N)
        points = torch.stack([100.0 * depths[pick].mean(1) / L, ce.gather(1, pick.T).mean(0)], 1).unique(dim=0)
        self.compute, self.ce = points[:, 0], points[:, 1]  # ascending compute, falling CE

    def at(self, depth):
        """The oracle's mean CE at this routing's compute: with one exit, the same number of deep
        tokens; with several, the best frontier point that uses no more compute."""
        if len(self.cfg.exits) == 1:
            return self.ce[int((depth == self.cfg.n_layer).sum())].item()
        ok = self.compute <= 100.0 * depth.double().mean().item() / self.cfg.n_layer + 1e-9
        return self.ce[ok].min().item() if ok.any() else self.ce[0].item()

    def least_compute(self, max_ppl):
        """The least Compute% at which the oracle's PPL is within max_ppl (100 if nowhere)."""
        ok = self.ce.exp() <= max_ppl
        return self.compute[ok].min().item() if ok.any() else 100.0

    def frontier(self, points=101):
        """(Compute%, PPL) points along the frontier: evenly spaced shares of tokens sent deep with
        one exit; the hull's points with several (at most `points` of them)."""
        idx = torch.linspace(0, len(self.ce) - 1, min(points, len(self.ce))).round().long()
        if len(self.cfg.exits) == 1:
            idx = torch.tensor([round(self.n * j / (points - 1)) for j in range(points)])
        return [{"compute": self.compute[i].item(), "ppl": math.exp(self.ce[i].item())} for i in idx.tolist()]


# ----------------------------------------------------------------------------------------------
# the sweep: one row a (measure, threshold), and seed 002's analysis of them


def masked_sweep(stats, cfg, thresholds, measures, oracle=None):
    """One row a (measure, threshold), all read from one token_stats pass, with the oracle's PPL
    at the row's compute beside it."""
    full, oracle = ppl(stats["ce"][cfg.n_layer]), oracle or Oracle(stats, cfg)
    rows = []
    for m in measures:
        for t in thresholds:
            r = {"confidence": m, **routed_metrics(stats, t, cfg, m)}
            r["delta_ppl"] = 100.0 * (r["ppl"] / full - 1)
            r["oracle_ppl"] = math.exp(oracle.at(routed_depth(stats, t, cfg, m)))
            rows.append(r)
    return rows


def analyse(rows, full, budget, oracle):
    """Seed 002's analysis: best PPL, most compute saved within +budget% PPL, maximum efficiency;
    and how little compute the oracle needs within the same budget."""
    limit = full * (1 + budget / 100)
    within = [r for r in rows if r["ppl"] <= limit]
    return {"best_ppl": min(rows, key=lambda r: r["ppl"]),
            "within_budget": min(within, key=lambda r: (r["compute"], r["ppl"])) if within else None,
            "max_efficiency": min(rows, key=lambda r: (r["compute"], r["ppl"])),
            "oracle_compute_within_budget": oracle.least_compute(limit)}


# ----------------------------------------------------------------------------------------------
# what share of the oracle's saving a router reaches, within a PPL budget


def saving_within(rows, full, budget):
    """The most compute saved (100 - Compute%) by a row within +budget% PPL of full depth (0 if none)."""
    ok = [100 - r["compute"] for r in rows if r["ppl"] <= full * (1 + budget / 100)]
    return max(ok, default=0.0)


FINE = [i / 200 for i in range(201)]  # the grid a measure's share of the oracle is read from


def fine_sweep(stats, cfg, confidence):
    """Rows at every threshold of FINE: a measure's share of the oracle should not depend on which
    thresholds a table happens to print."""
    return [routed_metrics(stats, t, cfg, confidence) for t in FINE]


def ceiling_sweep(stats, cfg):
    """fine_sweep's rows for a router that knows the last layer's distribution (not the answer): each
    character leaves where KL(last || exit), its expected cost, is small (confidence cost_confidence(KL)).
    Not deployable (it runs every layer), it is a reference for a router that predicts that cost: the
    oracle's saving also has hindsight of the one character that came. Not a bound: KL is never
    negative, so it cannot pick out characters where the exit is better than the last layer."""
    known = {**stats, "conf": {"ceiling": {k: cost_confidence(kl) for k, kl in stats["kl"].items()}}}
    return fine_sweep(known, cfg, "ceiling")


def oracle_fraction(rows, full, budget, oracle):
    """(router's saving, oracle's saving, the router's share of it) within +budget% PPL."""
    mine, best = saving_within(rows, full, budget), 100 - oracle.least_compute(full * (1 + budget / 100))
    return mine, best, mine / best if best > 0 else float("nan")


# ----------------------------------------------------------------------------------------------
# sequence-level routing (seed 002's open question): a window leaves as a whole


def window_depth(stats, threshold, cfg, confidence="softmax", how="mean"):
    """Masked routing in which each window of text leaves at the first exit where its mean (or min)
    confidence clears the threshold: every token of the window leaves together."""
    T = stats["window"]
    pooled = {k: c.view(-1, T).mean(1) if how == "mean" else c.view(-1, T).min(1).values
              for k, c in stats["conf"][confidence].items()}
    return exit_depth(pooled, threshold, cfg.n_layer).repeat_interleave(T)


def window_rows(stats, cfg, thresholds, confidence="softmax", how="mean"):
    """Rows like masked_sweep's for window-level routing."""
    rows = []
    for t in thresholds:
        depth = window_depth(stats, t, cfg, confidence, how)
        ce = read_off(stats, "ce", depth, cfg)
        rows.append({"confidence": f"{confidence} (window {how})",
                     **summarize(ce, depth, cfg, t, stats["window"], stats.get("router_flops", {}).get(confidence))})
    return rows


def window_oracle(stats, cfg):
    """The oracle for window-level routing (one exit): send deep the windows that gain most."""
    T, k, L = stats["window"], cfg.exits[0], cfg.n_layer
    per_window = {kk: v.view(-1, T) for kk, v in stats["ce"].items()}
    gain = (per_window[k] - per_window[L]).sum(1).sort(descending=True).values
    n = len(gain)
    ce = (per_window[k].sum() - torch.cat([gain.new_zeros(1), gain.cumsum(0)])) / (n * T)
    return [{"compute": 100.0 * (k / L + (1 - k / L) * j / n), "ppl": math.exp(ce[j].item())} for j in range(n + 1)]


# ----------------------------------------------------------------------------------------------
# where exits go: classes of the character being predicted


def char_class(target, vocab_itos, previous):
    """Each target character's class: space, newline, digit, punctuation, first letter of a word,
    letter inside a word, or other; `previous` is the character before it (the input)."""
    names = ["space", "newline", "digit", "punctuation", "word start", "inside word", "other"]
    def kind(ch, prev):
        if ch == " ":
            return 0
        if ch == "\n":
            return 1
        if ch.isdigit():
            return 2
        if ch.isalpha():
            return 5 if prev.isalpha() else 4
        return 3 if not ch.isalnum() and ch.isprintable() else 6
    cls = torch.tensor([kind(vocab_itos[t], vocab_itos[p]) for t, p in zip(target.tolist(), previous.tolist())])
    return cls, names


def class_table(stats, cfg, depth, cls, names):
    """Per class: share of characters, share that exited, full-depth PPL, routed PPL, and the share
    of the routing's total extra loss that this class carries."""
    L = cfg.n_layer
    routed = read_off(stats, "ce", depth, cfg)
    extra = (routed - stats["ce"][L]).double()
    rows = []
    for i, name in enumerate(names):
        sel = cls == i
        if sel.any():
            rows.append({"class": name, "share": 100 * sel.double().mean().item(),
                         "exited": 100 * (depth[sel] < L).double().mean().item(),
                         "full_ppl": ppl(stats["ce"][L][sel]), "routed_ppl": ppl(routed[sel]),
                         "cost_share": 100 * extra[sel].sum().item() / extra.sum().item() if extra.sum() else 0.0})
    return rows


def window_risk(stats, cfg, threshold, confidence, kind):
    """Per window: the mean extra CE of routing over full depth (ppl), or the share of characters whose
    top prediction routing changes (consistency)."""
    L, T = cfg.n_layer, stats["window"]
    depth = routed_depth(stats, threshold, cfg, confidence)
    if kind == "ppl":
        routed = read_off(stats, "ce", depth, cfg)
        return window_means(routed - stats["ce"][L], T)
    top = read_off(stats, "top", depth, cfg)
    return window_means((top != stats["top"][L]).double(), T)
