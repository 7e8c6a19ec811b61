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
    """Per exit and character: what a router reads (the exit's RMS-normed state, then max softmax, margin,
    entropy and saturation), 'same top character', CE_exit - CE_last and KL(last || exit) as a plain
    forward gives them; the four labels made from them."""
    model = make_model(n_layer=4, exits=[1, 2])
    ids = torch.randint(0, 23, (16 * 3 + 1,), generator=torch.Generator().manual_seed(0))
    ex = routers.exit_examples(model, ids, batch_size=2)
    x, y = ids[:-1].view(3, 16), ids[1:].view(3, 16)
    logits, states = model(x)[0], model.states(x)
    last = logits[4].flatten(0, 1)
    for k in (1, 2):
        feats, same, gain, kl = ex[k]
        mine, h, h_prev = logits[k].flatten(0, 1), states[k].flatten(0, 1), states[k - 1].flatten(0, 1)
        p = F.softmax(mine, -1)
        top2 = p.topk(2, -1).values
        by_hand = torch.cat([h / h.pow(2).mean(-1, keepdim=True).add(torch.finfo(h.dtype).eps).sqrt(),
                             torch.stack([top2[:, 0], top2[:, 0] - top2[:, 1], 1 + (p * p.log()).sum(-1) / math.log(23),
                                          F.cosine_similarity(h, h_prev, dim=-1).clamp(min=0)], -1)], -1)
        assert feats.shape == (48, 16 + 4) and torch.allclose(feats, by_hand, atol=1e-5)
        assert torch.equal(same, mine.argmax(-1) == last.argmax(-1))
        ce = lambda z: F.cross_entropy(z, y.flatten(), reduction="none")  # noqa: E731
        assert torch.allclose(gain, ce(mine) - ce(last), atol=1e-5)
        p_last = F.softmax(last, -1)
        assert torch.allclose(kl, (p_last * (p_last.log() - F.log_softmax(mine, -1))).sum(-1), atol=1e-5)
        got = routers.labels(same, gain, kl, epsilon=0.1)
        assert torch.equal(got["consistency"], same.float()) and torch.equal(got["loss"], (gain <= 0.1).float())
        assert torch.allclose(got["kl"], -torch.log(kl + routers.FLOOR)) and torch.equal(got["gain"], -gain)


def test_the_kl_router_regresses_its_score_and_reads_its_cost_as_a_confidence():
    """fit() fits a regressing router's score to a real target (here a function of max softmax, which the
    router sees); the confidence is exp(-KL / cost_scale) of the KL the score stands for, e^-score -
    FLOOR."""
    torch.manual_seed(0)
    logits, h = torch.randn(2000, 7) * 2, torch.randn(2000, 8)
    target = -torch.log(1 - F.softmax(logits, -1).amax(-1) + routers.FLOOR)  # a cost that falls as confidence rises
    router = routers.Router(8, hidden=16, regress="kl")
    x = routers.features(logits, h, h)
    before = F.mse_loss(router.score(x), target).item()
    routers.fit(router, x, target, epochs=30, batch=256, lr=1e-2)
    after = F.mse_loss(router.score(x), target).item()
    assert after < before / 10
    kl = (torch.exp(-router.score(x)) - routers.FLOOR).clamp(min=0)
    assert torch.allclose(router(logits, h, h), torch.exp(-kl / 0.1))
    assert measure.cost_confidence(torch.tensor(0.1 * math.log(1 / 0.9))).item() == pytest.approx(0.9)


def test_the_gain_router_reads_a_predicted_loss_difference_as_a_logistic():
    """The gain router's score stands for minus CE_exit - CE_last: a predicted difference d reads as
    sigmoid(-d / 0.1), 0.5 at no difference, and characters predicted to do better at the exit keep
    their order instead of all reading 1.0."""
    router = routers.Router(4, hidden=8, regress="gain")
    logits, h = torch.randn(6, 5), torch.randn(6, 4)
    with torch.no_grad():
        router.net[2].weight.zero_()
        for bias, want in ((0.0, 0.5), (-0.05, 1 / (1 + math.exp(0.5))), (0.3, 1 / (1 + math.exp(-3))), (0.6, 1 / (1 + math.exp(-6)))):
            router.net[2].bias.fill_(bias)  # the score, whatever the input: minus the predicted difference
            assert torch.allclose(router(logits, h, h), torch.full((6,), want))


def test_routers_pass_over_more_text_fewer_times_but_never_under_a_floor():
    """As many steps past the default 40,000 characters, but never fewer passes than `least`."""
    assert [routers.epochs_for(n, 30, 12) for n in (97, 39_936, 80_000, 200_000, 2_000_000)] == [30, 30, 15, 12, 12]
    assert [routers.epochs_for(n, 8, 4) for n in (39_936, 60_000, 2_000_000)] == [8, 5, 4]


def test_routers_come_back_from_the_checkpoint_as_they_were_fitted():
    """fit_routers -> to_checkpoint -> from_checkpoint: every label's router gives the same confidences,
    the kl router still reading its score as a cost; a checkpoint from before the kl router (two labels,
    64 wide) loads the routers it has."""
    model = make_model()
    ids = torch.randint(0, 23, (16 * 6 + 1,), generator=torch.Generator().manual_seed(1))
    fitted = routers.fit_routers(model, ids)
    saved = {"config": {"n_embd": 16}, "routers": routers.to_checkpoint(fitted, 0.1)}
    loaded = routers.from_checkpoint(saved)
    assert set(loaded) == {"router-consistency", "router-loss", "router-kl", "router-gain"}
    assert loaded["router-kl"][1].regress == "kl" and loaded["router-gain"][1].regress == "gain"
    logits, h, h_prev = torch.randn(5, 23), torch.randn(5, 16), torch.randn(5, 16)
    for label in routers.LABELS:
        assert torch.equal(loaded[f"router-{label}"][1](logits, h, h_prev), fitted[label][1](logits, h, h_prev))
    old = {label: {"1": routers.Router(16, hidden=64).state_dict()} for label in ("consistency", "loss")}
    before = routers.from_checkpoint({"config": {"n_embd": 16}, "routers": {"epsilon": 0.1, "hidden": 64, "state": old}})
    assert set(before) == {"router-consistency", "router-loss"}
    three = {**old, "kl": {"1": routers.Router(16, hidden=64).state_dict()}}  # before the gain router
    loaded = routers.from_checkpoint({"config": {"n_embd": 16}, "routers": {"epsilon": 0.1, "hidden": 64, "state": three}})
    assert set(loaded) == {"router-consistency", "router-loss", "router-kl"} and loaded["router-kl"][1].regress == "kl"
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
