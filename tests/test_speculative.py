"""decode.py's self-speculative decoding is the full model's decoding, character for character
(greedy) and in distribution (sampling), in every row of a batch that accepts at its own pace.

Run: python -m pytest tests/test_speculative.py -q
"""

import itertools
import math

import pytest
import torch

import eemini as ee
import decode
from conftest import make_model


def model64(depth=2.5, **kw):
    """A tiny random model in float64, so that batched and one-at-a-time passes agree to far below any
    gap between two logits (greedy comparisons never hinge on rounding). Its exit heads read the
    final head's weights, and its blocks' matrices are scaled by `depth`, so that the exits agree
    with the last layer often but not always, as trained ones do."""
    model = make_model(**{"n_layer": 4, "exits": [1, 2], **kw}).double()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        for head in model.exit_heads.values():
            head.head.weight.copy_(model.lm_head.weight)
        for p in model.transformer.h.parameters():
            p.mul_(depth if p.dim() == 2 else 1.0)
    return model


@pytest.mark.parametrize("draft_exit, k, pos", [(1, 1, "rope"), (2, 3, "rope"), (1, 6, "rope"), (1, 6, "learned"),
                                                (2, 20, "learned")])
def test_greedy_is_full_model_greedy_across_context_refills(draft_exit, k, pos):
    """Rows drift apart, so near a refill some draft past their window (into spare cache slots) while
    others keep their drafts; learned positions must then be clamped, and k may exceed the context."""
    model = model64(pos=pos)
    prompt = torch.randint(0, 23, (3, 5), generator=torch.Generator().manual_seed(k))
    want, _ = decode.generate(model, prompt, 60, threshold=1.0, temperature=0)  # block 16: refills at 17, 25, 33, ...
    got, stats = decode.speculative(model, prompt, 60, draft_exit, k, temperature=0)
    assert torch.equal(got, want)
    assert 0 < stats.acceptance < 1 and stats.drafted > 0  # a random exit is sometimes right, sometimes not


def test_greedy_with_grouped_query_attention():
    """One K/V head for every query head (multi-query): the cache holds fewer heads, nothing else moves."""
    model = model64(n_head=2, n_kv_head=1)
    prompt = torch.randint(0, 23, (3, 5), generator=torch.Generator().manual_seed(1))
    want, _ = decode.generate(model, prompt, 40, threshold=1.0, temperature=0)
    got, stats = decode.speculative(model, prompt, 40, 1, 4, temperature=0)
    assert torch.equal(got, want) and 0 < stats.acceptance < 1


def test_each_row_is_what_it_would_be_alone():
    model = model64()
    prompt = torch.randint(0, 23, (4, 3), generator=torch.Generator().manual_seed(3))
    batch, _ = decode.speculative(model, prompt, 40, 1, 4, temperature=0)
    for b in range(4):
        alone, _ = decode.speculative(model, prompt[b : b + 1], 40, 1, 4, temperature=0)
        assert torch.equal(batch[b], alone[0])


def full_model_as_draft(model, e):
    """Make the exit after layer e compute exactly the full model: layers above e do nothing (their
    residual branches output zero) and exit head e is the final head."""
    for block in model.transformer.h[e:]:
        block.attn.c_proj.weight.data.zero_()
        block.mlp.c_proj.weight.data.zero_()
    model.exit_heads[str(e)].load_state_dict({"ln." + k: v for k, v in model.transformer.ln_f.state_dict().items()}
                                             | {"head.weight": model.lm_head.weight.data})
    return model


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_draft_that_is_the_full_model_is_always_accepted(temperature):
    model = full_model_as_draft(model64(), 2)
    prompt = torch.randint(0, 23, (2, 4))
    _, stats = decode.speculative(model, prompt, 50, 2, 4, temperature, generator=torch.Generator().manual_seed(0))
    assert stats.accepted == stats.drafted and stats.acceptance == 1.0


def test_the_cache_keeps_exactly_the_accepted_characters():
    """After a cycle in which rows accept different numbers of drafts, each row's cache holds K/V for
    its committed text but the newest character, at every layer; decoding on from there equals
    decoding that row from scratch."""
    model = model64()
    rows = [torch.randint(0, 23, (6,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(3)]
    cache, starts = decode.new_cache(4), [None] * 3
    before = [len(r) for r in rows]
    seen = set()
    for _ in range(6):
        decode.refill(model, cache, rows, starts)
        steps, accepted = decode.cycle(model, cache, rows, starts, 1, 4, temperature=0)
        seen.add(tuple(accepted.tolist()))
        for c in cache:
            lengths = c.length if torch.is_tensor(c.length) else torch.full((3,), c.length)
            assert lengths.tolist() == [len(r) - 1 - s for r, s in zip(rows, starts)]
    assert any(len(set(a)) > 1 for a in seen)  # rows did accept different numbers in one cycle
    for b in range(3):
        want, _ = decode.generate(model, torch.tensor([rows[b][: before[b]]]), len(rows[b]) - before[b], 1.0, temperature=0)
        assert want[0].tolist() == rows[b]


def exact_two_characters(model, prompt, temperature):
    """The full model's exact distribution of the next two characters, (V, V)."""
    V = model.config.vocab_size
    first = decode.token_probs(model(prompt)[0][model.config.n_layer][:, -1], temperature)[0]
    both = prompt.repeat(V, 1)
    second = decode.token_probs(model(torch.cat([both, torch.arange(V).view(V, 1)], 1))[0][model.config.n_layer][:, -1],
                            temperature)
    return first.unsqueeze(1) * second


def chi_square_p(counts, probs):
    """p-value of Pearson's chi-square test (cells with expectation >= 5; the rest pooled)."""
    n = counts.sum()
    expect = probs * n
    big = expect >= 5
    obs, exp = counts[big], expect[big]
    if (~big).any():
        obs, exp = torch.cat([obs, counts[~big].sum().view(1)]), torch.cat([exp, expect[~big].sum().view(1)])
    stat = ((obs - exp) ** 2 / exp.clamp(min=1e-12)).sum().item()
    dof = len(obs) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(stat / 2)).item()


@pytest.mark.parametrize("stop", [0.0, 0.5])
def test_sampling_draws_the_full_models_distribution(stop):
    """6000 rows sample their next two characters by speculative decoding (a random, poor draft:
    many refusals); the counts fit the full model's exact joint distribution, and do not fit the
    draft's own (what a broken acceptance rule would give). Three characters are asked for, so that
    a cycle may draft two; with stop 0.5 the first cycle stops after one draft (the rows' mean odds
    of the first fall below it), and the distribution is still the full model's."""
    torch.manual_seed(0)
    model = model64(vocab_size=5, n_layer=3, exits=[1])
    prompt = torch.tensor([[1, 3, 0]])
    ids, stats = decode.speculative(model, prompt.repeat(6000, 1), 3, 1, 2, 1.0,
                                      generator=torch.Generator().manual_seed(1), stop=stop)
    assert (stats.drafted <= 2 * 6000) == bool(stop)  # two drafts a row in the first cycle, or one
    counts = torch.zeros(5, 5, dtype=torch.float64)
    for a, b in ids[:, 3:5].tolist():
        counts[a, b] += 1
    exact = exact_two_characters(model, prompt, 1.0)
    assert 0.2 < stats.acceptance < 0.9
    assert chi_square_p(counts.flatten(), exact.flatten()) > 1e-3
    draft_model = decode.token_probs(model(prompt)[0][1][:, -1], 1.0)[0]  # the draft's first character
    assert chi_square_p(counts.sum(1), draft_model) < 1e-6


def test_chi_square_p_value_on_a_known_case():
    probs = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert chi_square_p(torch.tensor([50.0, 50.0], dtype=torch.float64), probs) == pytest.approx(1.0)
    # 60/40 of 100: statistic 4 on 1 degree of freedom, p = 0.0455
    assert chi_square_p(torch.tensor([60.0, 40.0], dtype=torch.float64), probs) == pytest.approx(0.0455, abs=1e-3)


@pytest.mark.parametrize("stop", [0.3, 0.9, 1.0])
def test_a_draft_stop_changes_the_speed_not_the_text(stop):
    """Stopping drafts early, across context refills and rows that accept at their own pace: the
    full model's greedy text still, from fewer drafts."""
    model = model64()
    prompt = torch.randint(0, 23, (3, 5), generator=torch.Generator().manual_seed(4))
    want, _ = decode.generate(model, prompt, 60, threshold=1.0, temperature=0)
    _, always = decode.speculative(model, prompt, 60, 1, 6, temperature=0)
    got, stats = decode.speculative(model, prompt, 60, 1, 6, temperature=0, stop=stop)
    assert torch.equal(got, want)
    assert stats.drafted < always.drafted


def test_drafting_stops_where_the_drafters_odds_fall_below_the_stop():
    """draft() against a hand count: the rows' mean of the running product of the exit's probability of
    each draft; a stop between two of those means cuts the drafts right after the first below it,
    and the drafts made are the same ones (the same random draws, in order)."""
    model = model64()
    prompt = torch.randint(0, 23, (3, 6), generator=torch.Generator().manual_seed(5))

    @torch.inference_mode()
    def drafts_with(stop):
        cache = decode.new_cache(model.config.n_layer)
        model.forward_exit(prompt[:, :-1], None, cache=cache)
        return decode.draft(model, cache, prompt[:, -1:], 8, 1, 1.0, None, torch.Generator().manual_seed(0), stop)

    drafts, q, _ = drafts_with(0.0)
    assert len(drafts) == 8
    odds = torch.stack([qi.gather(1, d).squeeze(1) for qi, d in zip(q, drafts)], 1).cumprod(1).mean(0)  # (8,)
    assert (odds[1:] < odds[:-1]).all()
    for n in range(2, 8):  # between the odds after n - 1 drafts and after n: n drafts, then it stops
        stop = (odds[n - 2] + odds[n - 1]).item() / 2
        got, _, _ = drafts_with(stop)
        assert [d.tolist() for d in got] == [d.tolist() for d in drafts[:n]]
    assert len(drafts_with(1.0)[0]) == 1 and len(drafts_with(odds[-1].item() / 2)[0]) == 8


def test_refuses_a_draft_stop_outside_zero_to_one():
    for stop in (-0.1, 1.5, float("nan")):
        with pytest.raises(ee.EEminiError, match=f"draft stop {stop} is outside"):
            decode.speculative(model64(), torch.zeros(1, 2, dtype=torch.long), 5, 1, 2, stop=stop)


def test_refuses_a_layer_without_an_exit_head():
    with pytest.raises(ee.EEminiError, match="no exit head to draft with"):
        decode.speculative(model64(), torch.zeros(1, 2, dtype=torch.long), 5, 3, 2)


def test_every_draft_length_and_exit_gives_the_same_greedy_text():
    model = model64()
    prompt = torch.randint(0, 23, (2, 7), generator=torch.Generator().manual_seed(9))
    outs = {decode.speculative(model, prompt, 25, e, k, temperature=0)[0] for e, k in itertools.product((1, 2), (0, 2, 5))}
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 1
    assert math.isfinite(decode.Stats(1).per_cycle)


def test_cache_storage_past_a_rows_length_holds_no_garbage():
    """Rows at different lengths read keys past their own end, masked out by position; masking does
    not undo a NaN in q @ k, so the storage past every row's end must hold finite numbers (a cache
    made with torch.empty failed the greedy test above only after other tests had used the memory)."""
    cache = decode.KVCache()
    k = torch.randn(2, 1, 3, 4)
    cache.append(k, k, block_size=8)
    cache.truncate(torch.tensor([1, 3]))
    assert torch.isfinite(cache.k).all() and torch.isfinite(cache.v).all()
    assert torch.equal(cache.k[:, :, 3:], torch.zeros(2, 1, 5, 4))
    other = decode.KVCache()
    other.append(k[:1], k[:1], block_size=8)
    fresh = decode.KVCache()
    fresh.set_rows(torch.tensor([1]), other, batch=2)
    assert torch.equal(fresh.k[0], torch.zeros(1, 8, 4)) and torch.equal(fresh.k[1, :, :3], k[0])



def test_rows_at_different_lengths_append_at_their_own_ends():
    """Three rows at lengths 2, 6 and 4 take three new tokens each: row b's go to slots len_b ..
    len_b + 2, and nothing else in the cache moves."""
    cache, old = decode.KVCache(spare=2), torch.randn(3, 2, 6, 4)
    cache.append(old, -old, block_size=10)
    cache.truncate(torch.tensor([2, 6, 4]))
    k_before, v_before = cache.k.clone(), cache.v.clone()
    new = torch.randn(3, 2, 3, 4)
    k, v = cache.append(new, 2 * new, block_size=10)
    assert cache.length.tolist() == [5, 9, 7] and k.shape == (3, 2, 9, 4)
    for b, n in enumerate([2, 6, 4]):
        slots = torch.zeros(12, dtype=torch.bool)
        slots[n : n + 3] = True
        assert torch.equal(cache.k[b][:, slots], new[b]) and torch.equal(cache.v[b][:, slots], 2 * new[b])
        assert torch.equal(cache.k[b][:, ~slots], k_before[b][:, ~slots]) and torch.equal(cache.v[b][:, ~slots], v_before[b][:, ~slots])

def test_a_row_at_its_windows_end_keeps_fewer_drafts_while_the_others_draft_on():
    """Row 0 stands at the end of its context window (it may keep no draft), row 1 has room for ten.
    With spare room in the cache row 1 drafts and keeps all four (the draft is the full model), row 0
    keeps none and takes its one character from the full model; without, neither drafts. Either way
    each row goes on to be what full-depth decoding gives it alone."""
    model = full_model_as_draft(model64(), 2)
    prompts = [torch.randint(0, 23, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (16, 6)]
    for spare, want in ((5, [0, 4]), (0, [0, 0])):
        rows, cache, starts = [list(p) for p in prompts], decode.new_cache(4, spare), [None, None]
        decode.refill(model, cache, rows, starts)
        drafted, accepted = decode.cycle(model, cache, rows, starts, 2, 4, temperature=0)
        assert accepted.tolist() == want and drafted == sum(want)
        assert [len(r) for r in rows] == [17, 6 + want[1] + 1]
        for _ in range(5):
            decode.refill(model, cache, rows, starts)
            decode.cycle(model, cache, rows, starts, 2, 4, temperature=0)
        for p, r in zip(prompts, rows):
            alone, _ = decode.generate(model, torch.tensor([p]), len(r) - len(p), 1.0, temperature=0)
            assert alone[0].tolist() == r


def test_sampling_at_a_windows_end_draws_the_full_models_distribution():
    """Half the rows stand one character before their window's end, so each keeps at most one of its
    two drafts while the other half keep both: after an accepted first draft, the second character
    must come from the full model as it is, not from what it has beyond the (dropped) second draft."""
    torch.manual_seed(0)
    model = model64(vocab_size=5, n_layer=3, exits=[1])
    short, end = [1, 3, 0], [2, 4, 1, 0, 3, 3, 2, 1, 0, 4, 4, 1, 2, 0, 3]  # room 13 and room 1 (block 16)
    rows, cache, starts = [list(short) for _ in range(3000)] + [list(end) for _ in range(3000)], decode.new_cache(3, 3), [None] * 6000
    gen = torch.Generator().manual_seed(1)
    while min(len(r) for r in rows[3000:]) < len(end) + 2:
        decode.refill(model, cache, rows, starts)
        decode.cycle(model, cache, rows, starts, 1, 2, 1.0, generator=gen)
    counts = torch.zeros(5, 5, dtype=torch.float64)
    for r in rows[3000:]:
        counts[r[len(end)], r[len(end) + 1]] += 1
    assert chi_square_p(counts.flatten(), exact_two_characters(model, torch.tensor([end]), 1.0).flatten()) > 1e-3


def test_a_batch_takes_no_more_cycles_than_its_slowest_row_alone():
    """A row in a batch keeps at least the drafts it would keep alone (the others' windows never cut
    its draft short), so the batch finishes within the cycles its slowest row needs by itself, and
    the rows take part in no more passes, summed, than alone: a finished row leaves the batch rather
    than ride along to the slowest row's end. Rows drift apart here and cross three context refills."""
    model = model64()
    prompt = torch.randint(0, 23, (4, 5), generator=torch.Generator().manual_seed(4))
    ids, batch = decode.speculative(model, prompt, 60, 1, 4, temperature=0)
    alone = [decode.speculative(model, prompt[b : b + 1], 60, 1, 4, temperature=0) for b in range(4)]
    cycles = [stats.cycles for _, stats in alone]
    assert len(set(cycles)) > 1 and batch.cycles <= max(cycles)
    assert batch.row_cycles <= sum(cycles) < 4 * batch.cycles  # without leaving: 4 * batch.cycles
    assert torch.equal(ids, torch.cat([row for row, _ in alone]))


def test_rows_that_finish_together_at_different_lengths():
    """Every row can finish in the same cycle with its cache at its own length (a batch of 128 did):
    the batch ends there, each row as decoded alone."""
    model = model64()
    prompt = torch.randint(0, 23, (3, 5), generator=torch.Generator().manual_seed(23))
    ids, stats = decode.speculative(model, prompt, 3, 1, 4, temperature=0)
    alone = torch.cat([decode.speculative(model, prompt[b : b + 1], 3, 1, 4, temperature=0)[0] for b in range(3)])
    assert torch.equal(ids, alone) and stats.cycles == 2 and stats.row_cycles == 6
