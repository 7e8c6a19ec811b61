"""routers.py: the learned routers' examples and labels against direct computation on a toy model,
the KL that the kl router regresses (and the sweep's ceiling reads) by hand, and the regression fit.

Run: python -m pytest tests/test_routers.py -q
"""

import math

import pytest
import torch
from torch.nn import functional as F

import measure
import routers
from conftest import make_model


def test_kl_divergence_by_hand():
    last = torch.log(torch.tensor([[0.5, 0.5]]))
    exit_logits = torch.log(torch.tensor([[0.9, 0.1]]))
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108 nats
    assert measure.kl_divergence(last, exit_logits).item() == pytest.approx(want, rel=1e-6)
    assert measure.kl_divergence(exit_logits, exit_logits).item() == pytest.approx(0.0, abs=1e-7)


def test_examples_and_labels_of_a_toy_model():
    """Per exit and character: the exit's logits and states, 'same top character', CE_exit - CE_last and
    KL(last || exit) as a plain forward gives them; the three labels made from them."""
    model = make_model(n_layer=4, exits=[1, 2])
    ids = torch.randint(0, 23, (16 * 3 + 1,), generator=torch.Generator().manual_seed(0))
    ex = routers.exit_examples(model, ids, batch_size=2)
    x, y = ids[:-1].view(3, 16), ids[1:].view(3, 16)
    logits = model(x)[0]
    last = logits[4].flatten(0, 1)
    for k in (1, 2):
        lg, h, h_prev, same, gain, kl = ex[k]
        mine = logits[k].flatten(0, 1)
        assert torch.allclose(lg, mine, atol=1e-5) and h.shape == h_prev.shape == (48, 16)
        assert torch.equal(same, mine.argmax(-1) == last.argmax(-1))
        ce = lambda z: F.cross_entropy(z, y.flatten(), reduction="none")  # noqa: E731
        assert torch.allclose(gain, ce(mine) - ce(last), atol=1e-5)
        p_last = F.softmax(last, -1)
        assert torch.allclose(kl, (p_last * (p_last.log() - F.log_softmax(mine, -1))).sum(-1), atol=1e-5)
        got = routers.labels(same, gain, kl, epsilon=0.1)
        assert torch.equal(got["consistency"], same.float()) and torch.equal(got["loss"], (gain <= 0.1).float())
        assert torch.allclose(got["kl"], -torch.log(kl + routers.FLOOR))


def test_the_kl_router_regresses_its_score_and_reads_its_cost_as_a_confidence():
    """fit() fits a regressing router's score to a real target (here a function of max softmax, which the
    router sees); the confidence is exp(-KL / cost_scale) of the KL the score stands for, e^-score -
    FLOOR."""
    torch.manual_seed(0)
    logits, h = torch.randn(2000, 7) * 2, torch.randn(2000, 8)
    target = -torch.log(1 - F.softmax(logits, -1).amax(-1) + routers.FLOOR)  # a cost that falls as confidence rises
    router = routers.Router(8, hidden=16, regress=True)
    before = F.mse_loss(router.score(logits, h, h), target).item()
    routers.fit(router, logits, h, h, target, epochs=30, batch=256, lr=1e-2)
    after = F.mse_loss(router.score(logits, h, h), target).item()
    assert after < before / 10
    kl = (torch.exp(-router.score(logits, h, h)) - routers.FLOOR).clamp(min=0)
    assert torch.allclose(router(logits, h, h), torch.exp(-kl / 0.1))
    assert measure.cost_confidence(torch.tensor(0.1 * math.log(1 / 0.9))).item() == pytest.approx(0.9)


def test_routers_come_back_from_the_checkpoint_as_they_were_fitted():
    """fit_routers -> to_checkpoint -> from_checkpoint: every label's router gives the same confidences,
    the kl router still reading its score as a cost; a checkpoint from before the kl router (two labels,
    64 wide) loads the routers it has."""
    model = make_model()
    ids = torch.randint(0, 23, (16 * 6 + 1,), generator=torch.Generator().manual_seed(1))
    fitted = routers.fit_routers(model, ids)
    saved = {"config": {"n_embd": 16}, "routers": routers.to_checkpoint(fitted, 0.1)}
    loaded = routers.from_checkpoint(saved)
    assert set(loaded) == {"router-consistency", "router-loss", "router-kl"} and loaded["router-kl"][1].regress
    logits, h, h_prev = torch.randn(5, 23), torch.randn(5, 16), torch.randn(5, 16)
    for label in routers.LABELS:
        assert torch.equal(loaded[f"router-{label}"][1](logits, h, h_prev), fitted[label][1](logits, h, h_prev))
    old = {label: {"1": routers.Router(16, hidden=64).state_dict()} for label in ("consistency", "loss")}
    before = routers.from_checkpoint({"config": {"n_embd": 16}, "routers": {"epsilon": 0.1, "hidden": 64, "state": old}})
    assert set(before) == {"router-consistency", "router-loss"}
    assert 0 < before["router-loss"][1](logits, h, h_prev).min() <= before["router-loss"][1](logits, h, h_prev).max() < 1


def test_router_data_benchmark_reads_a_perfect_order_as_the_oracle_and_a_reversed_one_as_nothing():
    """bench/router_data.py ranks a router's scores into confidences: routing by each character's own
    loss difference (hindsight) is the oracle, so it reaches all of the oracle's saving up to the
    threshold grid; the reverse order sends the exit's best characters deep and saves nothing."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "router_data.py"
    spec = importlib.util.spec_from_file_location("router_data", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = make_model()
    stats = measure.token_stats(model, torch.randint(0, 23, (16 * 40 + 1,), generator=torch.Generator().manual_seed(0)))
    gain = torch.rand(640, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 0.5  # mostly worse
    stats["ce"][1] = stats["ce"][3] + gain
    cfg, oracle, full = model.config, measure.Oracle(stats, model.config), measure.ppl(stats["ce"][3])
    assert all(s >= 0.99 for s in bench.share(stats, cfg, -gain, oracle, full))
    assert all(s < 0.05 for s in bench.share(stats, cfg, gain, oracle, full))
