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


def test_a_merged_router_scores_the_mean_of_its_members_and_costs_their_sum(monkeypatch):
    """merge: one router E*H wide whose score is the members' mean score; fit_label fits MEMBERS of the
    gain router, member m from seeds seed + 1000 m, so it equals the members fitted one by one and merged.
    A router's FLOPs are its two products, 2 a multiply-add."""
    torch.manual_seed(0)
    x, target = torch.randn(300, 8 + 4), torch.randn(300)
    members = []
    for m in range(3):
        torch.manual_seed(7 + 1000 * m)
        members.append(routers.fit(routers.Router(8, hidden=16, regress="gain"), x, target, epochs=2, seed=7 + 1000 * m))
    merged = routers.merge(members)
    assert merged.net[0].out_features == 48 and merged.regress == "gain"
    want = torch.stack([r.score(x) for r in members]).mean(0)
    assert torch.allclose(merged.score(x), want, atol=1e-5)
    assert torch.allclose(merged.read(merged.score(x)), torch.sigmoid(want / routers.GAIN_SCALE), atol=1e-5)
    assert members[0].flops() == 2 * (12 * 16 + 16 * 1) and merged.flops() == 3 * members[0].flops()
    monkeypatch.setitem(routers.MEMBERS, "gain", 3)
    by_label = routers.fit_label("gain", x, target, 8, seed=7)
    assert by_label.net[0].out_features == 3 * routers.HIDDEN
    again = []  # the same members by hand: 30 passes over 300 examples (epochs_for), HIDDEN wide
    for m in range(3):
        torch.manual_seed(7 + 1000 * m)
        again.append(routers.fit(routers.Router(8, regress="gain"), x, target, epochs=30, seed=7 + 1000 * m))
    assert torch.allclose(by_label.score(x), routers.merge(again).score(x), atol=1e-5)
    assert routers.fit_label("kl", x, target, 8).net[0].out_features == routers.HIDDEN  # one MLP, as before
    one = routers.fit_label("gain", x, target, 8, seed=7, members=1)  # bench/router_data.py's single-MLP row
    assert torch.equal(one.score(x), again[0].score(x))


def test_checkpoints_give_back_each_routers_width_and_a_damaged_one_is_a_clear_error():
    """fit_routers' gain router is its members fitted by hand from the stated seeds, merged; it comes back
    from the checkpoint as wide as it went in (MEMBERS["gain"] times the others), read off its weights;
    weights that are not there are a clear error, not a KeyError."""
    model = make_model()
    ids = torch.randint(0, 23, (16 * 6 + 1,), generator=torch.Generator().manual_seed(1))
    fitted = routers.fit_routers(model, ids)
    x, same, gain, kl = routers.exit_examples(model, ids)[1]
    members = []  # fit_routers' gain router at exit 1, by hand: weights from seed 0 + exit 1 + 1000 m, order 0 + 1000 m
    for m in range(routers.MEMBERS["gain"]):
        torch.manual_seed(1 + 1000 * m)
        members.append(routers.fit(routers.Router(16, regress="gain"), x, -gain, epochs=30, seed=1000 * m))
    assert torch.allclose(fitted["gain"][1].score(x), routers.merge(members).score(x), atol=1e-5)
    saved = routers.to_checkpoint(fitted, 0.1)
    loaded = routers.from_checkpoint({"config": {"n_embd": 16}, "routers": saved})
    assert {label: r[1].net[0].out_features for label, r in loaded.items()} == {
        "router-consistency": routers.HIDDEN, "router-loss": routers.HIDDEN, "router-kl": routers.HIDDEN,
        "router-gain": routers.MEMBERS["gain"] * routers.HIDDEN}
    assert torch.equal(loaded["router-gain"][1].score(x), fitted["gain"][1].score(x))
    del saved["state"]["gain"]["1"]["net.0.weight"]
    with pytest.raises(routers.EEminiError, match="router-gain at exit 1 does not fit its model"):
        routers.from_checkpoint({"config": {"n_embd": 16}, "routers": saved})


def test_flops_charge_a_learned_router_at_the_exits_a_token_reaches():
    """flops_percent adds the router's FLOPs wherever a token reaches an exit that is checked (by hand);
    the masked rows and true early exit charge a learned router, not a built-in measure."""
    model = make_model(n_layer=4, exits=[1, 2])
    cfg = model.config
    layer, head, kv = measure.flops_per_token(cfg)
    full = 4 * layer + head
    depth = torch.tensor([[1, 2, 4, 4]])
    plain = measure.flops_percent(depth, cfg)
    charged = measure.flops_percent(depth, cfg, router={1: 100.0, 2: 1000.0})
    assert charged - plain == pytest.approx(100 * (4 * 100 + 3 * 1000) / 4 / full)
    assert measure.flops_percent(depth, cfg, checked=[2], router={1: 100.0, 2: 1000.0}) - measure.flops_percent(
        depth, cfg, checked=[2]) == pytest.approx(100 * 3 * 1000 / 4 / full)
    one = make_model()
    r = routers.Router(16, hidden=8, regress="kl")
    ids = torch.randint(0, 23, (16 * 4 + 1,), generator=torch.Generator().manual_seed(2))
    stats = measure.token_stats(one, ids, routers={"router-kl": {1: r}})
    assert stats["router_flops"] == {"router-kl": {1: r.flops()}}
    layer, head, kv = measure.flops_per_token(one.config)
    masked = measure.routed_metrics(stats, 0.0, one.config, "router-kl")  # everyone leaves at exit 1
    assert masked["flops"] - measure.routed_metrics(stats, 0.0, one.config, "softmax")["flops"] == pytest.approx(
        100 * r.flops() / (3 * layer + head))
    windows = measure.window_rows(stats, one.config, [0.0], "router-kl")[0]  # every window leaves: same depth
    assert windows["flops"] == pytest.approx(masked["flops"])
    t = stats["conf"]["router-kl"][1].median().item()  # about half leave: one exit, so true exit routes alike
    true = measure.exit_metrics(one, ids, t, confidence={1: r})
    assert true["flops"] == pytest.approx(measure.routed_metrics(stats, t, one.config, "router-kl")["flops"])
