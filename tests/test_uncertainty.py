"""uncertainty.py against cases with known answers: the paired bootstrap, the binomial tail, the two
p-values, Learn-then-Test's guarantee (by simulation), and calibration error.

Run: python -m pytest tests/test_uncertainty.py -q
"""

import math

import pytest
import torch

import uncertainty as un


def test_bootstrap_of_a_constant_shift_is_exact():
    full = torch.rand(4 * 50, generator=torch.Generator().manual_seed(0)) * 3
    (lo, hi), (dlo, dhi) = un.bootstrap(full + 0.01, full, window=4)
    assert dlo == pytest.approx(100 * (math.exp(0.01) - 1)) and dhi == pytest.approx(100 * (math.exp(0.01) - 1))
    assert lo < math.exp((full + 0.01).double().mean().item()) < hi


def test_bootstrap_matches_the_normal_interval_of_a_mean():
    """400 windows of CE 0 or 1 (half each): the mean's 95% interval is 0.5 +- 1.96 * 0.5 / 20."""
    ce = torch.tensor([0.0, 1.0]).repeat_interleave(200).repeat_interleave(8)  # windows of 8 characters
    (lo, hi), _ = un.bootstrap(ce, ce, window=8, resamples=4000)
    assert math.log(lo) == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006)
    assert math.log(hi) == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)


def test_binomial_tail_against_a_direct_sum():
    n, p = 12, 0.3
    want = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(5))
    assert un.binom_cdf(4, n, p) == pytest.approx(want, rel=1e-9)


def test_hoeffding_bentkus_p_value_by_hand():
    # no loss at all in 50 windows, budget 0.1: Hoeffding exp(-50 kl(0, 0.1)) = 0.9^50, Bentkus e * 0.9^50
    assert un.p_hoeffding_bentkus(0.0, 0.1, 50) == pytest.approx(0.9**50, rel=1e-6)
    assert un.p_hoeffding_bentkus(0.2, 0.1, 50) == 1.0  # the mean is over budget: nothing to reject


def test_empirical_bernstein_p_value_solves_its_bound():
    mean, var, budget, n = 0.40, 0.01, 0.45, 500
    delta = un.p_empirical_bernstein(mean, var, budget, n)
    u = math.log(2 / delta)
    assert mean + math.sqrt(2 * var * u / n) + 7 * u / (3 * (n - 1)) == pytest.approx(budget)
    assert un.p_empirical_bernstein(mean, 0.2, budget, n) > delta  # more variance, less evidence


def test_learn_then_test_stops_at_the_first_threshold_it_cannot_clear():
    losses = [(t, torch.full((100,), r)) for t, r in ((1.0, 0.0), (0.9, 0.02), (0.8, 0.2), (0.7, 0.01))]
    chosen, ps = un.learn_then_test(losses, budget=0.1, delta=0.1, bound="hb")
    assert chosen == 0.9 and len(ps) == 3 and ps[2] == 1.0  # 0.7 is never tested, though it would pass


def test_learn_then_test_keeps_its_promise():
    """Thresholds whose true risk rises as they fall (Bernoulli losses); over 300 calibration sets the
    chosen threshold's true risk exceeds the budget in at most delta of them (plus sampling slack)."""
    g = torch.Generator().manual_seed(0)
    grid = [(1 - i / 20, 0.01 * i) for i in range(21)]  # threshold -> true risk 0 .. 0.2
    budget, delta, bad, trials = 0.1, 0.1, 0, 300
    for _ in range(trials):
        losses = [(t, (torch.rand(200, generator=g) < r).double()) for t, r in grid]
        chosen, _ = un.learn_then_test(losses, budget, delta, "hb")
        bad += chosen is not None and dict(grid)[chosen] > budget
    assert bad <= delta * trials + 3 * math.sqrt(delta * (1 - delta) * trials)


def test_reliability_of_an_overconfident_and_a_calibrated_confidence():
    conf = torch.full((1000,), 0.9)
    correct = torch.arange(1000) < 600  # right 60% of the time at confidence 0.9
    ece, rows = un.reliability(conf, correct)
    assert ece == pytest.approx(0.3) and len(rows) == 1 and rows[0][2] == 1000
    g = torch.Generator().manual_seed(0)
    p = torch.rand(20000, generator=g)
    ece, _ = un.reliability(p, torch.rand(20000, generator=g) < p)
    assert ece < 0.02
