"""Model, loss schemes, routing and true early exit against hand-computed references.

Run: python -m pytest tests/test_model.py -q
"""

import math

import pytest
import torch
from torch.nn import functional as F

import eemini as ee
from conftest import make_model


def mid_threshold(model, x):
    """The median exit confidence on x: a threshold at which about half the tokens exit."""
    exit_logits = model.forward_all_layers(x)[model.config.exit_layer]
    return ee.conf_softmax(exit_logits).median().item()

# ---------------------------------------------------------------------------------------------
# loss schemes: a two-token vocabulary, where each layer's CE is known in closed form

LN2, LN4, LN4_3 = math.log(2), math.log(4), math.log(4 / 3)


def hand_ce():
    """CE at layers 1..3 of a 3-layer model, target 0: p=1/2, 1/4, 3/4."""
    logits = {1: torch.tensor([[0.0, 0.0]]), 2: torch.tensor([[0.0, math.log(3)]]),
              3: torch.tensor([[math.log(3), 0.0]])}
    target = torch.tensor([0])
    ce = {k: F.cross_entropy(v, target) for k, v in logits.items()}
    for k, want in ((1, LN2), (2, LN4), (3, LN4_3)):
        assert ce[k].item() == pytest.approx(want, rel=1e-6)
    return ce


@pytest.mark.parametrize("loss, alpha, want", [
    ("final", 0.7, LN4_3),
    ("aux", 0.7, 0.5 * LN2 + 0.5 * LN4_3),
    ("deepsup", 0.7, (LN2 + LN4 + LN4_3) / 3),
    ("asym", 0.7, 0.7 * LN2 + 0.3 * LN4_3),
    ("asym", 0.3, 0.3 * LN2 + 0.7 * LN4_3),
    ("asym_deepsup", 0.7, 0.7 * LN2 + 1.0 * LN4 + 0.3 * LN4_3),
])
def test_loss_schemes_against_hand_computation(loss, alpha, want):
    weights = ee.layer_weights(loss, n_layer=3, exit_layer=1, alpha=alpha)
    assert ee.weighted_loss(hand_ce(), weights).item() == pytest.approx(want, rel=1e-6)


def test_asym_at_half_is_aux():
    assert ee.layer_weights("asym", 3, 1, 0.5) == ee.layer_weights("aux", 3, 1, 0.9)


def test_layer_weight_list_expresses_seed_002():
    assert ee.layer_weights("final", 4, 2, weights=[0, 0.7, 0, 0.3]) == {2: 0.7, 4: 0.3}
    # and reproduces asym at exit layer 2 of 4 exactly
    assert ee.layer_weights("asym", 4, 2, 0.7) == pytest.approx({2: 0.7, 4: 0.3})


def test_model_loss_is_weighted_ce_of_its_own_logits():
    model = make_model(n_layer=4, exit_layer=2, head_layers=[1, 2, 3])
    x, y = torch.randint(0, 23, (2, 16)), torch.randint(0, 23, (2, 16))
    weights = ee.layer_weights("asym_deepsup", 4, 2, 0.7)
    logits, loss, ce = model(x, y, weights)
    want = sum(w * F.cross_entropy(logits[k].flatten(0, 1), y.flatten()) for k, w in weights.items())
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert set(ce) == {1, 2, 3, 4}


def test_forward_train_and_all_layers_agree():
    model = make_model(head_layers=[2])
    x = torch.randint(0, 23, (2, 16))
    all_layers = model.forward_all_layers(x)
    shallow, deep = model.forward_train(x)
    assert sorted(all_layers) == [1, 2, 3]
    assert torch.equal(shallow, all_layers[1]) and torch.equal(deep, all_layers[3])


# ---------------------------------------------------------------------------------------------
# causality


@pytest.mark.parametrize("mode", ["masked", "exit"])
def test_later_characters_do_not_change_earlier_outputs(mode):
    model = make_model()
    x = torch.randint(0, 23, (1, 16))
    x2 = x.clone()
    x2[0, 10:] = (x2[0, 10:] + 5) % 23
    if mode == "masked":
        a, b = model.forward_all_layers(x), model.forward_all_layers(x2)
        for k in a:
            assert torch.allclose(a[k][0, :10], b[k][0, :10], atol=1e-6)
            assert not torch.allclose(a[k][0, 10:], b[k][0, 10:])
        ca, cb = (ee.conf_softmax(v[1]) for v in (a, b))
    else:
        thr = mid_threshold(model, x)
        (a, da, ca), (b, db, cb) = model.forward_exit(x, thr), model.forward_exit(x2, thr)
        assert 0 < (da < 3).sum() < 16
        assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6) and torch.equal(da[0, :10], db[0, :10])
    assert torch.allclose(ca[..., :10], cb[..., :10], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# routing


def test_route_picks_exit_logits_exactly_where_confident():
    model = make_model()
    x = torch.randint(0, 23, (3, 16))
    logits = model.forward_all_layers(x)
    conf = F.softmax(logits[1], -1).max(-1).values
    thr = conf.median().item()
    routed, depth, c = ee.route(logits, thr, [1])
    confident = conf >= thr
    assert torch.equal(c, conf)
    assert 0 < confident.sum() < confident.numel()
    assert torch.equal(depth < 3, confident)
    assert torch.equal(routed[confident], logits[1][confident])
    assert torch.equal(routed[~confident], logits[3][~confident])


def test_route_endpoints_even_when_softmax_rounds_to_one():
    logits = {1: torch.tensor([[[100.0, 0.0], [0.0, 0.0]]]), 3: torch.zeros(1, 2, 2)}
    assert ee.conf_softmax(logits[1])[0, 0].item() == 1.0  # float rounds to exactly 1
    _, depth, _ = ee.route(logits, 1.0, [1])
    assert (depth == 3).all()  # threshold 1.0: no exit
    _, depth, _ = ee.route(logits, 0.0, [1])
    assert (depth == 1).all()  # threshold 0: everything exits
    with pytest.raises(ee.EEminiError, match="outside"):
        ee.route(logits, 1.5, [1])


def test_compute_percent_formula():
    L, k = 4, 2
    depth = torch.tensor([k] * 3 + [L] * 7)  # 30% shallow
    assert ee.compute_percent(depth, L) == pytest.approx(100 * (0.3 * k / L + 0.7))


def test_flops_percent_counts_heads_and_kv():
    cfg = ee.GPTConfig(vocab_size=100, block_size=64, n_layer=3, n_embd=32, n_head=2, exit_layer=1)
    layer, head, kv = ee.flops_per_token(cfg)
    full = 3 * layer + head
    assert ee.flops_percent(torch.tensor([3]), cfg) == pytest.approx(100 * (3 * layer + 2 * head) / full)
    assert ee.flops_percent(torch.tensor([1]), cfg) == pytest.approx(100 * (layer + head + 2 * kv) / full)


def test_other_confidence_measures_are_in_unit_interval():
    logits = torch.randn(4, 7, 11) * 3
    for name, fn in ee.CONFIDENCE.items():
        c = fn(logits)
        assert ((c >= -1e-6) & (c <= 1 + 1e-6)).all(), name
    uniform, onehot = torch.zeros(1, 5), torch.tensor([[50.0, 0, 0, 0, 0]])
    assert ee.conf_entropy(uniform).item() == pytest.approx(0.0, abs=1e-6)
    for v in (3, 7, 170):  # float rounding never takes a uniform prediction below 0: threshold 0 exits it
        assert ee.exit_mask(ee.conf_entropy(torch.zeros(2, v)), 0.0).all()
    assert ee.conf_entropy(onehot).item() == pytest.approx(1.0, abs=1e-4)
    assert ee.conf_margin(uniform).item() == pytest.approx(0.0, abs=1e-6)


def test_routed_metrics_match_a_direct_routed_evaluation():
    model = make_model()
    data = torch.randint(0, 23, (16 * 6 + 1,))
    stats = ee.token_stats(model, data, batch_size=4)
    thr = stats["conf"]["softmax"][1].median().item()
    row = ee.routed_metrics(stats, thr, model.config)
    x, y = data[:-1].view(6, 16), data[1:].view(6, 16)
    routed, depth, _ = ee.route(model.forward_all_layers(x), thr, [1])
    assert row["ppl"] == pytest.approx(math.exp(F.cross_entropy(routed.flatten(0, 1), y.flatten()).item()), rel=1e-5)
    assert row["shallow"] == pytest.approx(100 * (depth < 3).float().mean().item())


# ---------------------------------------------------------------------------------------------
# true early exit


def test_exit_mode_endpoints_equal_full_and_shallow_models():
    model = make_model()
    x = torch.randint(0, 23, (3, 16))
    logits = model.forward_all_layers(x)
    full, depth, _ = model.forward_exit(x, 1.0)
    assert (depth == 3).all() and torch.allclose(full, logits[3], atol=1e-5)
    shallow, depth, _ = model.forward_exit(x, 0.0)
    assert (depth == 1).all() and torch.allclose(shallow, logits[1], atol=1e-6)


def test_exit_mode_freezes_exited_states():
    """A hard token's deep layers see exited tokens' frozen exit-layer states: this differs from
    masked routing wherever an earlier token exited."""
    model = make_model()
    x = torch.randint(0, 23, (2, 16))
    thr = mid_threshold(model, x)
    true_exit, depth, _ = model.forward_exit(x, thr)
    masked, mdepth, _ = ee.route(model.forward_all_layers(x), thr, [1])
    assert torch.equal(depth, mdepth)  # the single exit decision is the same in both modes
    shallow = depth < 3
    assert torch.equal(true_exit[shallow], masked[shallow])
    assert not torch.allclose(true_exit[~shallow], masked[~shallow], atol=1e-4)


@pytest.mark.parametrize("where", ["none", "half", "all"])
def test_batch_exit_equals_cached_token_by_token(where):
    model = make_model(n_layer=4, exit_layer=2)
    x = torch.randint(0, 23, (3, 16))
    thr = {"all": 0.0, "half": mid_threshold(model, x), "none": 1.0}[where]
    batch, bdepth, _ = model.forward_exit(x, thr)
    n_exited = (bdepth == 2).sum().item()
    assert {"none": n_exited == 0, "half": 0 < n_exited < 48, "all": n_exited == 48}[where]
    cache = ee.new_cache(4)
    steps = [model.forward_exit(x[:, t : t + 1], thr, cache=cache) for t in range(16)]
    cached = torch.cat([s[0] for s in steps], 1)
    assert torch.equal(torch.cat([s[1] for s in steps], 1), bdepth)
    assert torch.allclose(cached, batch, atol=1e-5)


def test_lazy_kv_of_exited_tokens_matches_batch():
    """Batch 1, token by token: a run of exited tokens only stashes its frozen states (pending),
    written as K/V when the next deep token comes; truncating inside that run keeps it exact."""
    model = make_model()
    x = torch.randint(0, 23, (1, 16))
    thr = mid_threshold(model, x)
    batch, bdepth, _ = model.forward_exit(x, thr)
    cache, outs, saw_pending = ee.new_cache(3), [], False
    for t in range(16):
        outs.append(model.forward_exit(x[:, t : t + 1], thr, cache=cache)[0])
        saw_pending |= cache[2].pending is not None
    assert saw_pending and torch.allclose(torch.cat(outs, 1), batch, atol=1e-5)
    # everything exits at threshold 0, so the deep layers' K/V stays pending; truncate inside that
    # run, then a deep tail (threshold 1) must see exactly the first 10 tokens
    cache = ee.new_cache(3)
    for t in range(16):
        model.forward_exit(x[:, t : t + 1], 0.0, cache=cache)
    for c in cache:
        c.truncate(10)
    assert cache[2].pending.size(1) == 10
    tail = torch.randint(0, 23, (1, 6))
    resumed = torch.cat([model.forward_exit(tail[:, t : t + 1], 1.0, cache=cache)[0] for t in range(6)], 1)
    ref = ee.new_cache(3)
    model.forward_exit(x[:, :10], 0.0, cache=ref)
    want, _, _ = model.forward_exit(tail, 1.0, cache=ref)
    assert torch.allclose(resumed, want, atol=1e-5)


def test_batched_decoding_equals_each_row_alone():
    """Rows of a batch decode independently: with a per-step threshold that sometimes sends every
    row out (pending K/V), sometimes none and sometimes some, batch 3 == each row at batch 1."""
    model = make_model(n_layer=4, exit_layer=2)
    x = torch.randint(0, 23, (3, 16))
    mid = mid_threshold(model, x)
    schedule = [0.0, 0.0, mid, 1.0, mid, 0.0, mid, mid, 1.0, 0.0, 0.0, mid, mid, mid, 1.0, mid]
    caches = [ee.new_cache(4) for _ in range(4)]  # one for the batch, one for each row
    mixed = 0
    for t, thr in enumerate(schedule):
        batch, depth, _ = model.forward_exit(x[:, t : t + 1], thr, cache=caches[0])
        mixed += 0 < (depth == 2).sum() < 3
        for r in range(3):
            alone, d, _ = model.forward_exit(x[r : r + 1, t : t + 1], thr, cache=caches[r + 1])
            assert torch.equal(d, depth[r : r + 1]) and torch.allclose(alone, batch[r : r + 1], atol=1e-5)
    assert mixed >= 2  # the gather path (some rows deep, some not) ran


def test_cache_truncate_replays_identically():
    model = make_model()
    x = torch.randint(0, 23, (1, 12))
    thr, cache = mid_threshold(model, x), ee.new_cache(3)
    model.forward_exit(x[:, :8], thr, cache=cache)
    first, _, _ = model.forward_exit(x[:, 8:], thr, cache=cache)
    for c in cache:
        c.truncate(8)  # as self-speculative decoding would after a rejected draft
    again, _, _ = model.forward_exit(x[:, 8:], thr, cache=cache)
    assert torch.allclose(first, again, atol=1e-6)


def test_generation_is_reproducible_and_greedy_matches_batch():
    model = make_model()
    prompt = torch.randint(0, 23, (2, 4))
    thr = mid_threshold(model, torch.randint(0, 23, (2, 16)))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a, da = model.generate(prompt, 30, threshold=thr, top_k=5, generator=g1)  # runs past block_size
    b, db = model.generate(prompt, 30, threshold=thr, top_k=5, generator=g2)
    assert torch.equal(a, b) and torch.equal(da, db) and a.shape == (2, 34)
    assert 0 < (da == 1).sum() < da.numel()  # some characters exited, some went deep
    greedy, depth = model.generate(prompt, 10, threshold=thr, temperature=0)
    logits, bdepth, _ = model.forward_exit(greedy[:, :-1], thr)
    assert torch.equal(logits[:, 3:].argmax(-1), greedy[:, 4:])  # each token is the batch argmax
    assert torch.equal(bdepth[:, 3:], depth)


def test_sequence_longer_than_context_is_a_clear_error():
    model = make_model()
    with pytest.raises(ee.EEminiError, match="longer than the model's context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_bad_config_is_a_clear_error():
    with pytest.raises(ee.EEminiError, match="exit layer"):
        ee.GPTConfig(n_layer=3, exit_layer=3)
    with pytest.raises(ee.EEminiError, match="alpha"):
        ee.layer_weights("asym", 3, 1, alpha=1.2)


def test_overfit_one_batch():
    model = make_model().train()
    x = torch.randint(0, 23, (4, 16))
    y = torch.roll(x, -1, 1)
    weights = ee.layer_weights("asym", 3, 1, 0.7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        _, loss, _ = model(x, y, weights)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
