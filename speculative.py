"""
Self-speculative decoding (LayerSkip, Elhoushi et al. 2024, arXiv:2404.16710): the exit after layer e
drafts a few characters on its own; the full model then checks all of them in one pass that reuses
the draft's work. The output is exactly the full model's: greedy decoding gives the same characters,
sampling the same distribution (the speculative-sampling rule of Leviathan et al. 2023,
arXiv:2211.17192, and Chen et al. 2023, arXiv:2302.01318).

One cycle, for every row of the batch at once (rows accept different numbers of characters; the KV
cache then keeps one length per row):
  draft   layers 1..e and the exit head, one character at a time: d_1 .. d_K with the exit's
          distributions q_1 .. q_K; each input's state after layer e is kept
  verify  layers 1..e for the newest draft only, then layers e+1..L for all K+1 kept states in one
          pass: the full model's distributions p_1 .. p_K+1
  accept  the longest prefix the full model agrees with (d_i with probability min(1, p_i(d_i) /
          q_i(d_i)); greedy: d_i = argmax p_i), then one character from the full model: at the first
          refusal i from norm(max(0, p_i - q_i)), after K acceptances from p_K+1
  cut     every layer's cache back to the characters kept
"""

from dataclasses import dataclass

import torch

from eemini import EEminiError, new_cache, token_probs, window


@dataclass
class Stats:
    """What a speculative generation did, counted over every row and cycle."""
    rows: int
    cycles: int = 0  # draft-verify cycles: full-model passes over the batch
    drafted: int = 0  # characters drafted
    accepted: int = 0  # drafted characters the full model accepted
    emitted: int = 0  # characters produced: the accepted ones and one from the full model a cycle

    @property
    def acceptance(self):
        return self.accepted / max(1, self.drafted)

    @property
    def per_cycle(self):
        """Characters a row gains per full-model pass (1 without drafts, up to K + 1)."""
        return self.emitted / max(1, self.cycles * self.rows)


@torch.no_grad()
def generate(model, idx, max_new_tokens, draft_exit, k=4, temperature=1.0, top_k=None, generator=None):
    """max_new_tokens characters after idx (B, T), each distributed exactly as model.generate at full
    depth would draw it, from drafts of up to k characters by the exit after layer draft_exit.
    Returns the ids (B, T + max_new_tokens) and a Stats."""
    cfg = model.config
    if draft_exit not in cfg.exits:
        raise EEminiError(f"layer {draft_exit} has no exit head to draft with; the model's exits are {cfg.exits}")
    target = idx.size(1) + max_new_tokens
    rows, cache, starts = [r.tolist() for r in idx], new_cache(cfg.n_layer), [None] * idx.size(0)
    stats = Stats(len(rows))
    while min(map(len, rows)) < target:
        refill(model, cache, rows, starts)
        steps, accepted = cycle(model, cache, rows, starts, draft_exit, min(k, target - min(map(len, rows)) - 1),
                                temperature, top_k, generator)
        stats.cycles, stats.drafted = stats.cycles + 1, stats.drafted + steps * len(rows)
        stats.accepted, stats.emitted = stats.accepted + int(accepted.sum()), stats.emitted + int(accepted.sum()) + len(rows)
    return idx.new_tensor([r[:target] for r in rows]), stats


def cycle(model, cache, rows, starts, e, k, temperature=1.0, top_k=None, generator=None):
    """One draft-verify cycle over every row: each row gains its accepted drafts and one character
    from the full model, and every layer's cache keeps just those. Returns the number of drafts
    and (B,) how many each row accepted."""
    cfg, blocks = model.config, model.transformer.h
    device = cache_device(model)
    n = torch.tensor([len(r) for r in rows], device=device)  # each row predicts position n next
    cur = torch.tensor([r[-1:] for r in rows], device=device)  # (B, 1): the newest, not yet in the cache
    steps = min(k, min(s + cfg.block_size - len(r) for s, r in zip(starts, rows)))  # stay in every window
    drafts, q, states = draft(model, cache, cur, steps, e, temperature, top_k, generator)
    x = model.embed(drafts[-1] if drafts else cur, cache[0].length)  # the newest character ...
    for i in range(e):
        x = blocks[i](x, None, cache[i])  # ... through layers 1..e
    x = torch.cat([*states, x], 1)  # (B, steps + 1, C): each position's state after layer e
    for i in range(e, cfg.n_layer):
        x = blocks[i](x, None, cache[i])
    p = token_probs(model.head(cfg.n_layer, x).flatten(0, 1), temperature, top_k).view(*x.shape[:2], -1)
    new, accepted = accept(drafts, q, p, generator)
    for r, chars in zip(rows, new):
        r.extend(chars)
    for c in cache:  # keep the cycle's input and its accepted drafts, in each row
        c.truncate(n - torch.tensor(starts, device=device) + accepted)
    return steps, accepted


def draft(model, cache, cur, steps, e, temperature, top_k, generator):
    """`steps` characters from the exit after layer e, one at a time: each input goes through layers
    1..e (its K/V into the cache) and its state there is kept for verification. Returns the drafts
    [(B, 1)], their distributions q [(B, V)] and the kept states [(B, 1, C)]."""
    drafts, q, states, x_in = [], [], [], cur
    for _ in range(steps):
        x = model.embed(x_in, cache[0].length)
        for i, block in enumerate(model.transformer.h[:e]):
            x = block(x, None, cache[i])
        states.append(x)
        q.append(token_probs(model.head(e, x[:, -1]), temperature, top_k))
        x_in = torch.multinomial(q[-1], 1, generator=generator) if temperature else q[-1].argmax(-1, keepdim=True)
        drafts.append(x_in)
    return drafts, q, states


def accept(drafts, q, p, generator):
    """Per row: the characters this cycle emits (the accepted drafts, then one from the full model)
    and how many drafts were accepted. p: (B, steps + 1, V), the full model's distributions."""
    B, steps = p.size(0), len(drafts)
    accepted = torch.zeros(B, dtype=torch.long, device=p.device)
    if steps:
        d = torch.cat(drafts, 1)  # (B, steps)
        pd = p[:, :steps].gather(2, d.unsqueeze(-1)).squeeze(-1)  # p_i(d_i)
        qd = torch.stack(q, 1).gather(2, d.unsqueeze(-1)).squeeze(-1)  # q_i(d_i) > 0: d_i was drawn from q_i
        u = torch.rand(B, steps, generator=generator, device=p.device)
        accepted = (u * qd < pd).long().cumprod(1).sum(1)  # P(accept) = min(1, p / q); the leading run
    first = p[torch.arange(B), accepted]  # the full model's distribution where each row stopped
    if steps:  # refused at position a: draw from what p has beyond q (all of p where they do not overlap)
        q_a = torch.stack(q, 1)[torch.arange(B), accepted.clamp(max=steps - 1)]
        rest = (first - q_a).clamp(min=0)
        use = (accepted < steps) & (rest.sum(-1) > 0)
        first = torch.where(use.unsqueeze(-1), rest / rest.sum(-1, keepdim=True).clamp(min=1e-30), first)
    nxt = torch.multinomial(first, 1, generator=generator)  # (B, 1)
    d = torch.cat([*drafts, nxt], 1).tolist() if drafts else nxt.tolist()
    return [row[:a] + [row[-1]] for row, a in zip(d, accepted.tolist())], accepted


def refill(model, cache, rows, starts):
    """Rows whose next prediction lies beyond their context window get their cache rebuilt from the
    new window's text (all but the newest character, which the next cycle feeds); rows refilled
    together with texts of one length share one prefill pass."""
    due, device = {}, cache_device(model)
    for b, r in enumerate(rows):
        s = window(len(r), model.config.block_size)
        if s != starts[b]:
            starts[b] = s
            due.setdefault(len(r) - 1 - s, []).append(b)
    for length, batch in due.items():
        fresh = new_cache(model.config.n_layer)
        if length:
            x = model.embed(torch.tensor([rows[b][starts[b]:-1] for b in batch], device=device))
            for block, c in zip(model.transformer.h, fresh):
                x = block(x, None, c)
        for c, f in zip(cache, fresh):
            c.set_rows(torch.tensor(batch, device=device), f, len(rows))


def cache_device(model):
    return next(model.parameters()).device
