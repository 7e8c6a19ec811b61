"""
How sure a figure is: paired bootstrap intervals over windows, thresholds chosen with a finite-sample
guarantee (Learn then Test), and how well a confidence is calibrated.

The unit of every statistic here is the evaluation window (block_size characters of text), not the
character: neighbouring characters are not independent draws, windows much nearer so.

[1] Efron & Tibshirani 1993, An Introduction to the Bootstrap (the paired percentile bootstrap)
[2] Angelopoulos, Bates, Candès, Jordan, Lei 2021, Learn then Test. arXiv:2110.01052
[3] Bates et al. 2021, Distribution-free, risk-controlling prediction sets (Hoeffding-Bentkus). arXiv:2101.02703
[4] Maurer & Pontil 2009, Empirical Bernstein bounds and sample variance penalization. arXiv:0907.3740
[5] Schuster et al. 2022, CALM (LTT for early exit, the consistency risk). arXiv:2207.07061
[6] Guo et al. 2017, On Calibration of Modern Neural Networks (expected calibration error). arXiv:1706.04599
"""

import math

import torch


def window_means(per_token, window):
    """(W,) mean of each window of a (W * window,) per-token series, in float64."""
    return per_token.double().view(-1, window).mean(1)


def bootstrap(routed_ce, full_ce, window, resamples=1000, level=0.95, seed=0):
    """Paired percentile bootstrap over windows [1]: the same resampled windows for the routed and the
    full-depth CE. Returns ((PPL low, high), (ΔPPL% low, high))."""
    r, f = window_means(routed_ce, window), window_means(full_ce, window)
    pick = torch.randint(len(r), (resamples, len(r)), generator=torch.Generator().manual_seed(seed))
    ppl, full = r[pick].mean(1).exp(), f[pick].mean(1).exp()
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return tuple(ppl.quantile(q).tolist()), tuple((100 * (ppl / full - 1)).quantile(q).tolist())


# ----------------------------------------------------------------------------------------------
# Learn then Test [2]: test "risk(threshold) > budget" at each threshold, from the safest (1.0, no
# exit) down, with a p-value that holds for n windows; stop at the first that cannot be rejected.
# With probability >= 1 - delta over the calibration windows, the threshold chosen keeps the risk
# within the budget.


def kl_bernoulli(a, b):
    a, b = min(max(a, 1e-12), 1 - 1e-12), min(max(b, 1e-12), 1 - 1e-12)
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


def binom_cdf(k, n, p):
    """P(Binomial(n, p) <= k), summed in log space."""
    if k >= n:
        return 1.0
    i = torch.arange(0, k + 1, dtype=torch.float64)
    logp = torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1) \
        + i * math.log(p) + (n - i) * math.log1p(-p)
    return torch.logsumexp(logp, 0).exp().item()


def p_hoeffding_bentkus(mean, budget, n):
    """p-value of H0 'risk > budget' from the mean of n losses in [0, 1] [3]."""
    if mean >= budget:
        return 1.0
    hoeffding = math.exp(-n * kl_bernoulli(mean, budget))
    bentkus = math.e * binom_cdf(math.ceil(n * mean), n, budget)
    return min(1.0, hoeffding, bentkus)


def p_empirical_bernstein(mean, var, budget, n):
    """p-value of H0 'risk > budget' from the mean and sample variance of n losses in [0, 1] [4]:
    the smallest delta with mean + sqrt(2 var ln(2/delta) / n) + 7 ln(2/delta) / (3 (n-1)) <= budget.
    Much tighter than Hoeffding where the losses vary little (most characters do not exit)."""
    if mean >= budget or n < 2:
        return 1.0
    a, b = 7 / (3 * (n - 1)), math.sqrt(2 * var / n)  # a u + b sqrt(u) = budget - mean, u = ln(2 / delta)
    root = (-b + math.sqrt(b * b + 4 * a * (budget - mean))) / (2 * a)
    return min(1.0, 2 * math.exp(-root * root))


def learn_then_test(losses, budget, delta, bound):
    """The lowest threshold whose risk is within budget with probability >= 1 - delta, by fixed-
    sequence testing [2]. losses: [(threshold, (W,) per-window losses in [0, 1])] from the safest
    threshold (1.0) down; bound: 'hb' or 'bernstein'. Returns (threshold or None, [p-values])."""
    chosen, ps = None, []
    for threshold, loss in losses:
        n, mean, var = len(loss), loss.mean().item(), loss.var().item() if len(loss) > 1 else 0.0
        p = p_hoeffding_bentkus(mean, budget, n) if bound == "hb" else p_empirical_bernstein(mean, var, budget, n)
        ps.append(p)
        if p > delta:  # not rejected: this threshold and every lower one stay untested
            break
        chosen = threshold
    return chosen, ps


# ----------------------------------------------------------------------------------------------
# calibration [6]: is a confidence of 0.8 right 80% of the time?


def reliability(conf, correct, bins=10):
    """Expected calibration error and the table behind it: [(bin low, bin high, count, mean
    confidence, accuracy)] over equal-width confidence bins."""
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(conf.clamp(0, 1 - 1e-9), edges[1:-1], right=True)
    rows, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            c, a = conf[sel].double().mean().item(), correct[sel].double().mean().item()
            rows.append((edges[b].item(), edges[b + 1].item(), int(sel.sum()), c, a))
            ece += sel.double().mean().item() * abs(c - a)
    return ece, rows
