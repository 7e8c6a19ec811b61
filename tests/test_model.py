"""eemini.py and decode.py: loss schemes, routing (and measure.py's masked routing and compute
accounting), true early exit, the KV cache and generation, each against a reference computed
another way (by hand, or by a slower independent implementation).

Run: python -m pytest tests/test_model.py -q
"""

import math

import pytest
import torch
from torch.nn import functional as F

import decode
import eemini as ee
import measure
from conftest import make_model, mid_threshold

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
    weights = ee.layer_weights(loss, n_layer=3, exits=[1], alpha=alpha)
    assert ee.weighted_loss(hand_ce(), weights).item() == pytest.approx(want, rel=1e-6)


def test_asym_at_half_is_aux():
    assert ee.layer_weights("asym", 3, [1], 0.5) == ee.layer_weights("aux", 3, [1], 0.9)


def test_layer_weight_list_expresses_seed_002():
    assert ee.layer_weights("final", 4, [2], weights=[0, 0.7, 0, 0.3]) == {2: 0.7, 4: 0.3}
    # and reproduces asym at exit layer 2 of 4 exactly
    assert ee.layer_weights("asym", 4, [2], 0.7) == pytest.approx({2: 0.7, 4: 0.3})


def test_model_loss_is_weighted_ce_of_its_own_logits():
    weights = ee.layer_weights("asym_deepsup", 4, [2], 0.7)
    model = make_model(n_layer=4, exits=[2], loss_weights=weights)
    x, y = torch.randint(0, 23, (2, 16)), torch.randint(0, 23, (2, 16))
    logits, loss = model(x, y)  # the nanoGPT call: the loss weights come from the config
    want = sum(w * F.cross_entropy(logits[k].flatten(0, 1), y.flatten()) for k, w in weights.items())
    assert set(logits) == {1, 2, 3, 4} and loss.item() == pytest.approx(want.item(), rel=1e-5)
    default = make_model()  # a bare config trains the quick start's scheme: asym, alpha 0.7
    assert default.config.loss_weights == pytest.approx({1: 0.7, 3: 0.3})
    logits, loss = default(x, y)
    want = 0.7 * F.cross_entropy(logits[1].flatten(0, 1), y.flatten()) + 0.3 * F.cross_entropy(logits[3].flatten(0, 1), y.flatten())
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_a_step_table_replaces_the_config_weights_and_computes_only_its_heads():
    model = make_model(n_layer=4, exits=[1, 2, 3], loss_weights={1: 0.2, 2: 0.2, 3: 0.2, 4: 0.4})
    x, y = torch.randint(0, 23, (2, 16)), torch.randint(0, 23, (2, 16))
    full = model(x)[0]
    logits, loss = model(x, y, {2: 0.5, 4: 0.5})
    want = 0.5 * F.cross_entropy(full[2].flatten(0, 1), y.flatten()) + 0.5 * F.cross_entropy(full[4].flatten(0, 1), y.flatten())
    assert set(logits) == {2, 4} and loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_exit_dropout_freezes_tokens_only_at_the_exits_a_step_trains():
    """Under a curriculum's table a resting exit lets no token leave (none would be scored there):
    the step is the one of a model whose config never trained that exit, draw for draw."""
    x, y = torch.randint(0, 23, (4, 16)), torch.randint(0, 23, (4, 16))
    torch.manual_seed(0)
    both = make_model(exits=[1, 2], loss_weights={1: 0.2, 2: 0.2, 3: 0.6}, exit_dropout=0.5).train()
    torch.manual_seed(0)
    one = make_model(exits=[1, 2], loss_weights={2: 0.25, 3: 0.75}, exit_dropout=0.5).train()
    torch.manual_seed(1)
    _, rested = both(x, y, {2: 0.25, 3: 0.75})
    torch.manual_seed(1)
    _, want = one(x, y)
    assert rested.item() == pytest.approx(want.item(), rel=1e-6)
    # leave_at (train.py --curriculum-freeze all): tokens freeze at the resting exit 1 too, and no head scores them
    torch.manual_seed(1)
    _, frozen_too = both(x, y, {2: 0.25, 3: 0.75}, leave_at=[1, 2])
    torch.manual_seed(1)
    h1 = both.transformer.h[0](both.embed(x))
    f1 = torch.rand(4, 16) < 0.25  # exit dropout 0.5 shared by two exits
    h2 = torch.where(f1.unsqueeze(-1), h1, both.transformer.h[1](h1))
    f2 = f1 | (torch.rand(4, 16) < 0.25)
    h3 = torch.where(f2.unsqueeze(-1), h2, both.transformer.h[2](h2))
    hand = 0.25 * F.cross_entropy(both.head(2, h2)[~f1], y[~f1]) + 0.75 * F.cross_entropy(both.head(3, h3)[~f2], y[~f2])
    assert frozen_too.item() == pytest.approx(hand.item(), rel=1e-5) and frozen_too.item() != pytest.approx(want.item())


def test_heads_are_read_off_the_states_after_their_layer():
    """forward, forward_all_layers and forward_train against blocks and heads applied by hand."""
    model = make_model(loss_weights={2: 1.0, 3: 1.0})  # a head after layers 1 (the exit), 2 and 3
    x = torch.randint(0, 23, (2, 16))
    h = model.embed(x)
    want = {}
    for k, block in enumerate(model.transformer.h, 1):
        h = block(h)
        want[k] = model.exit_heads[str(k)](h) if k < 3 else model.lm_head(model.transformer.ln_f(h))
    got = model.forward_all_layers(x)
    assert sorted(got) == [1, 2, 3] and all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    shallow, deep = model.forward_train(x)
    assert torch.allclose(shallow, want[1], atol=1e-6) and torch.allclose(deep, want[3], atol=1e-6)


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
    routed, depth, c = measure.route(logits, thr, [1])
    confident = conf >= thr
    assert torch.equal(c, conf)
    assert 0 < confident.sum() < confident.numel()
    assert torch.equal(depth < 3, confident)
    assert torch.equal(routed[confident], logits[1][confident])
    assert torch.equal(routed[~confident], logits[3][~confident])


def test_route_endpoints_even_when_softmax_rounds_to_one():
    logits = {1: torch.tensor([[[100.0, 0.0], [0.0, 0.0]]]), 3: torch.zeros(1, 2, 2)}
    assert ee.conf_softmax(logits[1])[0, 0].item() == 1.0  # float rounds to exactly 1
    _, depth, _ = measure.route(logits, 1.0, [1])
    assert (depth == 3).all()  # threshold 1.0: no exit
    _, depth, _ = measure.route(logits, 0.0, [1])
    assert (depth == 1).all()  # threshold 0: everything exits
    with pytest.raises(ee.EEminiError, match="outside"):
        measure.route(logits, 1.5, [1])


def test_other_confidence_measures_are_in_unit_interval():
    logits, h, h_prev = torch.randn(4, 7, 11) * 3, torch.randn(4, 7, 8), torch.randn(4, 7, 8)
    for name, fn in ee.CONFIDENCE.items():
        c = fn(logits, h, h_prev)
        assert ((c >= -1e-6) & (c <= 1 + 1e-6)).all(), name
    assert torch.allclose(ee.conf_saturation(logits, h, 3 * h), torch.ones(4, 7))  # a state that only grew
    assert (ee.conf_saturation(logits, h, -h) == 0).all()  # one that turned around
    uniform, onehot = torch.zeros(1, 5), torch.tensor([[50.0, 0, 0, 0, 0]])
    assert ee.conf_entropy(uniform).item() == pytest.approx(0.0, abs=1e-6)
    for v in (3, 7, 170):  # float rounding never takes a uniform prediction below 0: threshold 0 exits it
        assert ee.exit_mask(ee.conf_entropy(torch.zeros(2, v)), 0.0).all()
    assert ee.conf_entropy(onehot).item() == pytest.approx(1.0, abs=1e-4)
    assert ee.conf_margin(uniform).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# true early exit against an independent reference


def reference_exit(model, idx, threshold):
    """True early exit the slow, obvious way: run every block on every token, and after each exit
    point freeze the tokens confident enough to leave (put their state back after every later
    block). A frozen token's K/V in a later block then comes from its frozen state, as it must."""
    cfg = model.config
    x = model.embed(idx)
    frozen = torch.zeros(idx.shape, dtype=torch.bool)
    depth, out = torch.full(idx.shape, cfg.n_layer), None
    for k, block in enumerate(model.transformer.h, 1):
        x = torch.where(frozen.unsqueeze(-1), x, block(x))
        if k in cfg.exits:
            logits = model.head(k, x)
            leave = ~frozen & ee.exit_mask(ee.conf_softmax(logits), threshold)
            out = logits if out is None else torch.where(leave.unsqueeze(-1), logits, out)
            depth, frozen = depth.masked_fill(leave, k), frozen | leave
    final = model.head(cfg.n_layer, x)
    return torch.where(frozen.unsqueeze(-1), out, final) if out is not None else final, depth


@pytest.mark.parametrize("exits", [[1], [2], [1, 2]])
def test_true_exit_matches_the_independent_reference(exits):
    model = make_model(n_layer=4, exits=exits)
    x = torch.randint(0, 23, (3, 16))
    mid = mid_threshold(model, x, exits[-1])
    for thr in (0.0, mid, 1.0):
        logits, depth, _ = model.forward_exit(x, thr)
        want, want_depth = reference_exit(model, x, thr)
        assert torch.equal(depth, want_depth)
        assert torch.allclose(logits, want, atol=1e-6)
        assert thr != mid or 0 < (depth < 4).sum() < 48  # some exit, some go deep


def test_an_exit_at_threshold_one_is_never_computed():
    """Threshold 1.0 at exit 1 of exits [1, 2]: its head is never called (it could not send a token
    out), and the routing equals the model's with exit 2 alone, in a batch and token by token."""
    model = make_model(n_layer=4, exits=[1, 2])
    x = torch.randint(0, 23, (3, 16))
    thr = {1: 1.0, 2: mid_threshold(model, x, 2)}
    calls = []
    hook = model.exit_heads["1"].register_forward_hook(lambda *a: calls.append(1))
    logits, depth, _ = model.forward_exit(x, thr)
    cache = decode.new_cache(4)
    cached = torch.cat([model.forward_exit(x[:, t : t + 1], thr, cache=cache)[0] for t in range(16)], 1)
    hook.remove()
    model.config.exits = [2]
    want, want_depth = reference_exit(model, x, thr[2])
    assert not calls and torch.equal(depth, want_depth) and 0 < (depth == 2).sum() < 48
    assert torch.allclose(logits, want, atol=1e-6) and torch.allclose(cached, want, atol=1e-5)
    model.config.exits = [1, 2]  # every exit's threshold is checked, also where no token gets to
    for bad, match in (({1: 1.5, 2: 0.5}, "outside"), ({1: 0.0, 2: float("nan")}, "outside"),
                       ({2: 0.5}, "give one for each of \\[1, 2\\]")):
        with pytest.raises(ee.EEminiError, match=match):
            model.forward_exit(x, bad)


def test_exit_mode_endpoints_equal_full_and_shallow_models():
    model = make_model()
    x = torch.randint(0, 23, (3, 16))
    logits = model.forward_all_layers(x)
    full, depth, _ = model.forward_exit(x, 1.0)
    assert (depth == 3).all() and torch.allclose(full, logits[3], atol=1e-5)
    shallow, depth, _ = model.forward_exit(x, 0.0)
    assert (depth == 1).all() and torch.allclose(shallow, logits[1], atol=1e-6)


def test_exit_mode_differs_from_masked_only_for_deep_tokens_after_an_exit():
    """A deep token's later layers see earlier exited tokens' frozen states (true exit) instead of
    their deep states (masked): the same logits wherever no earlier token of the row exited."""
    model = make_model()
    x = torch.randint(0, 23, (2, 16))
    thr = mid_threshold(model, x)
    true_exit, depth, _ = model.forward_exit(x, thr)
    masked, mdepth, _ = measure.route(model.forward_all_layers(x), thr, [1])
    assert torch.equal(depth, mdepth)  # the single exit decision is the same in both modes
    shallow = depth < 3
    exited_before = (shallow.long().cumsum(1) - shallow.long()) > 0  # an earlier token of the row exited
    same = shallow | ~exited_before
    assert torch.allclose(true_exit[same], masked[same], atol=1e-5)
    differs = (true_exit - masked).abs().amax(-1) > 1e-4
    assert differs[~same].all() and (~same).any()


@pytest.mark.parametrize("where", ["none", "half", "all"])
def test_batch_exit_equals_cached_token_by_token(where):
    model = make_model(n_layer=4, exits=[2])
    x = torch.randint(0, 23, (3, 16))
    thr = {"all": 0.0, "half": mid_threshold(model, x), "none": 1.0}[where]
    batch, bdepth, _ = model.forward_exit(x, thr)
    n_exited = (bdepth == 2).sum().item()
    assert {"none": n_exited == 0, "half": 0 < n_exited < 48, "all": n_exited == 48}[where]
    cache = decode.new_cache(4)
    steps = [model.forward_exit(x[:, t : t + 1], thr, cache=cache) for t in range(16)]
    cached = torch.cat([s[0] for s in steps], 1)
    assert torch.equal(torch.cat([s[1] for s in steps], 1), bdepth)
    assert torch.allclose(cached, batch, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_prefill_into_a_nonempty_cache_equals_batch(seed):
    """Chunks of random sizes (several tokens each, some exiting) appended to a cache that already
    holds text, some of it as pending K/V: the same logits and depths as one batch pass."""
    model = make_model(n_layer=4, exits=[1, 2], seed=seed)
    x = torch.randint(0, 23, (2, 16), generator=torch.Generator().manual_seed(seed))
    thr = mid_threshold(model, x)
    batch, bdepth, _ = model.forward_exit(x, thr)
    cuts = sorted(torch.randperm(15, generator=torch.Generator().manual_seed(seed))[:4].add(1).tolist())
    cache, outs, depths = decode.new_cache(4), [], []
    for a, b in zip([0, *cuts], [*cuts, 16]):
        logits, depth, _ = model.forward_exit(x[:, a:b], thr, cache=cache)
        outs.append(logits)
        depths.append(depth)
    assert torch.equal(torch.cat(depths, 1), bdepth) and 0 < (bdepth < 4).sum() < 32
    assert torch.allclose(torch.cat(outs, 1), batch, atol=1e-5)


def test_lazy_kv_of_exited_tokens_matches_batch():
    """Batch 1, token by token: a run of exited tokens only stashes its frozen states (pending),
    written as K/V when the next deep token comes; truncating inside that run keeps it exact."""
    model = make_model()
    x = torch.randint(0, 23, (1, 16))
    thr = mid_threshold(model, x)
    batch, bdepth, _ = model.forward_exit(x, thr)
    cache, outs, saw_pending = decode.new_cache(3), [], False
    for t in range(16):
        outs.append(model.forward_exit(x[:, t : t + 1], thr, cache=cache)[0])
        saw_pending |= cache[2].pending is not None
    assert saw_pending and torch.allclose(torch.cat(outs, 1), batch, atol=1e-5)
    # everything exits at threshold 0, so the deep layers' K/V stays pending; truncate inside that
    # run, then a deep tail (threshold 1) must see exactly the first 10 tokens
    cache = decode.new_cache(3)
    for t in range(16):
        model.forward_exit(x[:, t : t + 1], 0.0, cache=cache)
    for c in cache:
        c.truncate(10)
    assert cache[2].pending.size(1) == 10
    tail = torch.randint(0, 23, (1, 6))
    resumed = torch.cat([model.forward_exit(tail[:, t : t + 1], 1.0, cache=cache)[0] for t in range(6)], 1)
    ref = decode.new_cache(3)
    model.forward_exit(x[:, :10], 0.0, cache=ref)
    want, _, _ = model.forward_exit(tail, 1.0, cache=ref)
    assert torch.allclose(resumed, want, atol=1e-5)


def test_batched_decoding_equals_each_row_alone():
    """Rows of a batch decode independently: with a per-step threshold that sometimes sends every
    row out (pending K/V), sometimes none and sometimes some, batch 3 == each row at batch 1."""
    model = make_model(n_layer=4, exits=[2])
    x = torch.randint(0, 23, (3, 16))
    mid = mid_threshold(model, x)
    schedule = [0.0, 0.0, mid, 1.0, mid, 0.0, mid, mid, 1.0, 0.0, 0.0, mid, mid, mid, 1.0, mid]
    caches = [decode.new_cache(4) for _ in range(4)]  # one for the batch, one for each row
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
    thr, cache = mid_threshold(model, x), decode.new_cache(3)
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
    a, da = decode.generate(model, prompt, 30, threshold=thr, top_k=5, generator=g1)  # runs past block_size
    b, db = decode.generate(model, prompt, 30, threshold=thr, top_k=5, generator=g2)
    assert torch.equal(a, b) and torch.equal(da, db) and a.shape == (2, 34)
    assert 0 < (da == 1).sum() < da.numel()  # some characters exited, some went deep
    greedy, depth = decode.generate(model, prompt, 10, threshold=thr, temperature=0)
    logits, bdepth, _ = model.forward_exit(greedy[:, :-1], thr)
    assert torch.equal(logits[:, 3:].argmax(-1), greedy[:, 4:])  # each token is the batch argmax
    assert torch.equal(bdepth[:, 3:], depth)


def test_sequence_longer_than_context_is_a_clear_error():
    model = make_model()
    with pytest.raises(ee.EEminiError, match="longer than the model's context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_bad_config_is_a_clear_error():
    with pytest.raises(ee.EEminiError, match="exit layers"):
        ee.GPTConfig(n_layer=3, exits=[3])
    with pytest.raises(ee.EEminiError, match="alpha"):
        ee.layer_weights("asym", 3, [1], alpha=1.2)
    with pytest.raises(ee.EEminiError, match="supervises an exit head"):
        ee.layer_weights("asym", 3, [])


def test_overfit_one_batch():
    model = make_model().train()
    x = torch.randint(0, 23, (4, 16))
    y = torch.roll(x, -1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        _, loss = model(x, y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


# ---------------------------------------------------------------------------------------------
# compute accounting


def test_compute_percent_formula():
    L, k = 4, 2
    depth = torch.tensor([k] * 3 + [L] * 7)  # 30% shallow
    assert measure.compute_percent(depth, L) == pytest.approx(100 * (0.3 * k / L + 0.7))


def test_flops_per_token_by_hand():
    """Multiply-adds of one token, twice: a layer's q, k, v and output projections, its attention over
    the context, its MLP; the head; the K/V an exited token owes a layer. Grouped-query attention
    (one K/V head for two query heads here) halves the keys' and values' width, so that K/V."""
    C, ctx = 32, 4
    mha = ee.GPTConfig(vocab_size=100, block_size=8, n_layer=3, n_embd=C, n_head=2, exits=[1])
    mlp, scores = 2 * C * 4 * C, 2 * ctx * C
    assert measure.flops_per_token(mha, ctx) == (2 * (4 * C * C + scores + mlp), 2 * C * 100, 2 * 2 * C * C)
    mqa = ee.GPTConfig(vocab_size=100, block_size=8, n_layer=3, n_embd=C, n_head=2, n_kv_head=1, exits=[1])
    assert measure.flops_per_token(mqa, ctx) == (2 * (3 * C * C + scores + mlp), 2 * C * 100, 2 * C * C)
    assert sum(p.numel() for n, p in ee.GPT(mqa).named_parameters() if "c_attn" in n) == 3 * 2 * C * C  # q: C rows, k and v: C / 2 each


def test_kv_layers_counts_only_what_later_tokens_need():
    # L = 4, one window: token 0 exits at 1 and token 2 reaches 3 -> token 0 computes K/V in 2, 3;
    # token 1 exits at 2, token 2 reaches 3 -> K/V in 3; token 3 exits at 1, token 4 runs layer 2 ->
    # K/V in 2; token 4 is the last: nobody reads its K/V
    depth = torch.tensor([[1, 2, 3, 1, 2]])
    assert measure.kv_layers(depth, 4).tolist() == [[2, 1, 0, 1, 0]]
    assert measure.kv_layers(torch.tensor([[1, 4, 1, 1]]), 4).tolist() == [[3, 0, 0, 0]]


def test_flops_percent_counts_heads_and_the_kv_that_is_computed():
    cfg = ee.GPTConfig(vocab_size=100, block_size=4, n_layer=3, n_embd=32, n_head=2, exits=[1])
    layer, head, kv = measure.flops_per_token(cfg)
    full = 3 * layer + head
    assert measure.flops_percent(torch.tensor([[3, 3, 3, 3]]), cfg) == pytest.approx(100 * (3 * layer + 2 * head) / full)
    # threshold 0: nobody goes deep, so no exited token's K/V is ever needed above the exit
    assert measure.flops_percent(torch.tensor([[1, 1, 1, 1]]), cfg) == pytest.approx(100 * (layer + head) / full)
    # one exited token before a deep one: its K/V in layers 2 and 3
    mixed = (layer + head + 2 * kv) + (3 * layer + 2 * head) + 2 * (layer + head)
    assert measure.flops_percent(torch.tensor([[1, 3, 1, 1]]), cfg) == pytest.approx(100 * mixed / 4 / full)
    # at threshold 1.0 the exit's head is never computed: full depth is the plain model, 100%
    assert measure.flops_percent(torch.tensor([[3, 3, 3, 3]]), cfg, checked=[]) == pytest.approx(100.0)
    depth = torch.full((1, 4), 3)
    assert measure.summarize(torch.zeros(4), depth, cfg, 1.0, window=4)["flops"] == pytest.approx(100.0)
    assert measure.summarize(torch.zeros(4), depth, cfg, 0.99, window=4)["flops"] == pytest.approx(100 * (full + head) / full)
    two = ee.GPTConfig(vocab_size=100, block_size=4, n_layer=3, n_embd=32, n_head=2, exits=[1, 2])
    assert measure.summarize(torch.zeros(4), depth, two, {1: 1.0, 2: 0.5}, window=4)["flops"] == pytest.approx(100 * (full + head) / full)


# ---------------------------------------------------------------------------------------------
# the recipe's parts: every layout keeps true exit and cached decoding exact

LAYOUTS = {"gpt2": dict(pos="learned", norm="layer", mlp="gelu"), "recipe": {},
           "swiglu+qk-norm": dict(mlp="swiglu", qk_norm=True), "gqa": dict(n_head=4, n_kv_head=2),
           "mqa+qk-norm": dict(n_head=4, n_kv_head=1, qk_norm=True)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_keeps_true_exit_and_cached_decoding_exact(layout):
    model = make_model(n_layer=4, exits=[1, 2], **LAYOUTS[layout])
    x = torch.randint(0, 23, (2, 16))
    thr = mid_threshold(model, x) + 1e-4  # the median is a token's own confidence: off it, no rounding flips it
    logits, depth, _ = model.forward_exit(x, thr)
    want, want_depth = reference_exit(model, x, thr)
    assert torch.equal(depth, want_depth) and torch.allclose(logits, want, atol=1e-5)
    cache = decode.new_cache(4)
    steps = [model.forward_exit(x[:, t : t + 1], thr, cache=cache) for t in range(16)]
    assert torch.allclose(torch.cat([s[0] for s in steps], 1), logits, atol=1e-5)
    assert ("wpe" in model.transformer) == (layout == "gpt2")


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_grouped_query_attention_is_attention_with_shared_key_value_heads(n_kv_head):
    """A model with n_kv_head K/V heads computes what the plain model does when each K/V head's weights
    are copied to the n_head / n_kv_head query heads that share it; and it has fewer weights."""
    gqa = make_model(n_layer=4, exits=[1, 2], n_head=4, n_kv_head=n_kv_head, qk_norm=True)
    mha = make_model(n_layer=4, exits=[1, 2], n_head=4, qk_norm=True)
    C, kv = 16, 4 * n_kv_head
    state = gqa.state_dict()
    for name, w in state.items():
        if name.endswith("c_attn.weight"):  # rows: queries (C), keys (kv), values (kv); heads of 4 rows
            q, k, v = w.split([C, kv, kv])
            k, v = (t.view(n_kv_head, 4, C).repeat_interleave(4 // n_kv_head, 0).reshape(C, C) for t in (k, v))
            state[name] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    x = torch.randint(0, 23, (2, 16))
    want = mha.forward_all_layers(x)
    assert all(torch.allclose(gqa.forward_all_layers(x)[k], want[k], atol=1e-5) for k in want)
    assert gqa.num_params() == mha.num_params() - 4 * 2 * (C - kv) * C


def test_rotary_scores_depend_on_the_offset_only():
    """RoPE: q at position p and k at position p' score the same for every shift of both."""
    turns = ee.rotary_tables(ee.GPTConfig(block_size=64, n_embd=16, n_head=2))
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    score = [(ee.rotate(q, torch.tensor([p + 5]), turns) * ee.rotate(k, torch.tensor([p]), turns)).sum()
             for p in (0, 7, 40)]
    assert torch.allclose(torch.stack(score), score[0].expand(3), atol=1e-5)
    assert not torch.allclose(ee.rotate(q, torch.tensor([3]), turns), q)
    assert torch.allclose(ee.rotate(q, torch.tensor([0]), turns), q)  # position 0 is not turned
    assert torch.allclose(ee.rotate(q, torch.tensor([3]), turns).norm(), q.norm())  # turned, not stretched


def test_calm_batch_rule_moves_each_position_all_together():
    """CALM's rule: at each position the batch leaves only if every row is confident there; with
    one row it is the per-row rule."""
    model = make_model(n_layer=4, exits=[1, 2])
    x = torch.randint(0, 23, (3, 16))
    thr = mid_threshold(model, x)
    _, depth, _ = model.forward_exit(x, thr, whole_batch=True)
    assert (depth == depth[:1]).all()  # every row left at the same layer at each position
    _, row_depth, _ = model.forward_exit(x, thr)
    assert (depth >= row_depth.max(0).values).all() and (depth < 4).any()  # and never earlier than any row
    one, _, _ = model.forward_exit(x[:1], thr, whole_batch=True)
    assert torch.equal(one, model.forward_exit(x[:1], thr)[0])


def test_exit_dropout_freezes_tokens_as_true_exit_would():
    """Training with exit dropout: tokens drawn at the exit keep their exit-layer state above it (the
    deep layers read it as K/V, as under true early exit) and only the exit head scores them."""
    model = make_model(exit_dropout=0.3).train()
    x, y = torch.randint(0, 23, (2, 16)), torch.randint(0, 23, (2, 16))
    torch.manual_seed(5)
    _, loss = model(x, y)
    torch.manual_seed(5)
    h = model.transformer.h[0](model.embed(x))
    exit_logits = model.head(1, h)
    frozen = torch.rand(2, 16) < 0.3
    for block in model.transformer.h[1:]:
        h = torch.where(frozen.unsqueeze(-1), h, block(h))
    final = F.cross_entropy(model.head(3, h)[~frozen], y[~frozen])
    want = 0.7 * F.cross_entropy(exit_logits.flatten(0, 1), y.flatten()) + 0.3 * final
    assert 0 < frozen.sum() < 32 and loss.item() == pytest.approx(want.item(), rel=1e-5)
    model.eval()  # evaluation never drops
    assert torch.equal(model(x)[0][3], make_model(exit_dropout=0.0)(x)[0][3])
    plain = make_model(loss_weights={3: 1.0}).train()  # an exit no loss reaches (--loss final) drops nothing
    torch.manual_seed(5)
    assert plain(x, y)[1].item() == pytest.approx(F.cross_entropy(plain(x)[0][3].flatten(0, 1), y.flatten()).item())


@pytest.mark.parametrize("exit_dropout", [0.0, 0.3])
def test_layer_dropout_skips_deep_layers_per_sequence_at_rates_rising_with_depth(exit_dropout):
    """Training with layer dropout p: layer 1 is never skipped, layer 2 of 3 for a share p (2^0.5 - 1)
    of the sequences, layer 3 for a share p. A token keeps its state through a layer if its sequence
    skips it or (beside exit dropout) it was frozen at the exit; only tokens not frozen are scored
    above the exit. Checked on every token's logits, not only the loss. Evaluation never skips."""
    model = make_model(exit_dropout=exit_dropout, layer_dropout=0.6).train()
    x, y = torch.randint(0, 23, (8, 16)), torch.randint(0, 23, (8, 16))
    torch.manual_seed(5)
    logits, loss = model(x, y)
    torch.manual_seed(5)
    h = model.transformer.h[0](model.embed(x))
    exit_logits = model.head(1, h)
    frozen = torch.rand(8, 16) < exit_dropout if exit_dropout else torch.zeros(8, 16, dtype=torch.bool)  # after layer 1
    skipped = []
    for block, rate in zip(model.transformer.h[1:], (0.6 * (2 ** 0.5 - 1), 0.6)):
        skipped.append(torch.rand(8, 1, 1) < rate)
        h = torch.where(frozen.unsqueeze(-1) | skipped[-1], h, block(h))
    want = 0.7 * F.cross_entropy(exit_logits.flatten(0, 1), y.flatten()) + 0.3 * F.cross_entropy(
        model.head(3, h)[~frozen], y[~frozen])
    assert 0 < skipped[1].sum() < 8 and loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(logits[3], model.head(3, h), atol=1e-6)  # the frozen and skipped tokens' states too
    model.eval()
    assert torch.equal(model(x)[0][3], make_model(exit_dropout=0.0)(x)[0][3])
    with pytest.raises(ee.EEminiError, match="layer dropout 1.0 must lie in"):
        make_model(layer_dropout=1.0)


def test_a_cascade_leaves_at_the_first_confident_exit():
    """Masked routing with exits after layers 1 and 2 of 4: each token's logits are those of the first
    exit whose confidence clears the threshold (per exit, or one for all), else the last layer's."""
    model = make_model(n_layer=4, exits=[1, 2])
    x = torch.randint(0, 23, (3, 16))
    logits = model.forward_all_layers(x)
    c1, c2 = ee.conf_softmax(logits[1]), ee.conf_softmax(logits[2])
    t1, t2 = c1.median().item(), c2.median().item()
    routed, depth, _ = measure.route(logits, {1: t1, 2: t2}, [1, 2])
    first, second = c1 >= t1, (c1 < t1) & (c2 >= t2)
    assert torch.equal(depth, torch.where(first, 1, torch.where(second, 2, 4)))
    assert first.any() and second.any() and (depth == 4).any()
    for k, sel in ((1, first), (2, second), (4, depth == 4)):
        assert torch.equal(routed[sel], logits[k][sel])
    assert measure.compute_percent(depth, 4) == pytest.approx(100 * depth.float().mean().item() / 4)
