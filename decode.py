"""
Decoding, the engine beside the model (as nanochat's engine.py): the per-layer KV cache, the context
window of each position, sampling, generation with true early exit, and self-speculative decoding.

Generation with true early exit: each new character runs up to an exit; if its confidence clears
the threshold it is emitted from there and skips the deep layers, whose K/V for it are written later
from its frozen state (lazily, for a whole run of easy characters at once, when the next deep
character needs them).

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
A row near the end of its context window may keep only the drafts that fit in it (then it is refilled);
the others draft on, and its drafts past the window are computed in the cache's spare slots and dropped.
Without that, one row at its window's end would stop the whole batch drafting: at batch 128 half the
cycles had no draft at all.

[5] Elhoushi et al. 2024, LayerSkip. arXiv:2404.16710
"""

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from eemini import EEminiError, positions


# ----------------------------------------------------------------------------------------------
# the KV cache: per layer, appendable and truncatable to a length (one for every row, or one a row)


class KVCache:
    """Keys and values of one layer, preallocated to the context; appendable and truncatable.

    truncate() is what self-speculative decoding [5] needs: the exit layer drafts, the full model
    verifies, and the rejected drafts' entries are cut back, in each row to its own length when
    rows accept different numbers of characters (length is then a (B,) tensor). `pending` holds the
    frozen states of exited tokens whose K/V this layer has not written yet: computing it lazily,
    for a run of easy tokens at once when the next deep token arrives, gives the same numbers with
    far fewer steps. `spare` slots past the context hold self-speculative drafts that a row drafts
    beyond its window along with the others, and then drops.
    """

    def __init__(self, spare=0):
        self.k = self.v = self.pending = None
        self.spare = spare  # slots past the context: drafts a row will not keep (see cycle)
        self.length = 0  # tokens whose K/V is written (pending ones come after them): an int, or (B,)

    def append(self, k, v, block_size):  # k, v: (B, H, T, D) -> all keys and values so far
        if self.k is None:
            B, H, _, D = k.shape
            self.k = k.new_zeros(B, H, block_size + self.spare, D)  # zeros, not empty: a masked key still
            self.v = v.new_zeros(B, H, block_size + self.spare, D)  # enters q @ k, and a NaN would poison it
        if isinstance(self.length, int):
            end = self.length + k.size(2)
            self.k[:, :, self.length:end] = k
            self.v[:, :, self.length:end] = v
            self.length = end
            return self.k[:, :, :end], self.v[:, :, :end]
        at = positions(self.length, k.size(2), k.device)  # (B, T): each row at its own end
        rows = torch.arange(k.size(0), device=k.device).unsqueeze(1).expand_as(at)
        self.k[rows, :, at] = k.transpose(1, 2)  # (B, T, H, D) into those slots (faster than a scatter)
        self.v[rows, :, at] = v.transpose(1, 2)
        self.length = self.length + k.size(2)
        end = int(self.length.max())  # a row's keys past its own length are masked by position
        return self.k[:, :, :end], self.v[:, :, :end]

    def defer(self, x):  # x: (B, T, C) frozen states of tokens that skip this layer
        self.pending = x if self.pending is None else torch.cat([self.pending, x], dim=1)

    def truncate(self, length):
        """Keep the first `length` tokens: an int for every row, or (B,) lengths, one a row."""
        if isinstance(length, int) and isinstance(self.length, int):
            if self.pending is not None:
                keep = length - self.length
                self.pending = self.pending[:, :keep] if keep > 0 else None
            self.length = min(self.length, length)
            return
        assert self.pending is None, "pending K/V is kept for one length in every row only"
        new = torch.minimum(torch.as_tensor(self.length), torch.as_tensor(length))
        self.length = int(new[0]) if (new == new[0]).all() else new  # back to one length when rows agree

    def keep(self, rows):
        """Only these rows (R,) from now on: the rows of a batch that have finished leave it."""
        assert self.pending is None, "pending K/V is kept for one length in every row only"
        if self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]
        if not isinstance(self.length, int):
            new = self.length[rows]
            self.length = int(new[0]) if (new == new[0]).all() else new

    def set_rows(self, rows, other, batch):
        """Make these rows (of a batch of `batch`) hold what `other`, a cache of len(rows) rows with
        one length, holds: a row's context refilled while the other rows go on."""
        assert self.pending is None and other.pending is None and isinstance(other.length, int)
        if other.k is not None:
            if self.k is None:
                self.k = other.k.new_zeros(batch, *other.k.shape[1:])
                self.v = other.v.new_zeros(batch, *other.v.shape[1:])
            self.k[rows, :, : other.length] = other.k[:, :, : other.length]
            self.v[rows, :, : other.length] = other.v[:, :, : other.length]
        length = torch.full((batch,), self.length, device=rows.device) if isinstance(self.length, int) else self.length.clone()
        length[rows] = other.length
        self.length = int(length[0]) if (length == length[0]).all() else length


def new_cache(n_layer, spare=0):
    return [KVCache(spare) for _ in range(n_layer)]


# ----------------------------------------------------------------------------------------------
# windows, sampling and generation with true early exit


def window(t, block_size):
    """Where the context of the character at position t begins: 0 while the text fits the model's
    context, then moving on by half a context at a time (a cache refilled with the last half)."""
    half = max(1, block_size // 2)
    return 0 if t <= block_size else -(-(t - block_size) // half) * half


def token_probs(logits, temperature=1.0, top_k=None):
    """(B, V) next-character distribution of (B, V) logits: softmax of logits / temperature, kept to
    the top_k most likely when top_k is set; at temperature 0 all mass on the argmax."""
    logits = logits.float()
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.size(-1)).float()
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return F.softmax(logits, dim=-1)


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """(B, 1) next ids from (B, V) logits: argmax at temperature 0, else a draw from token_probs."""
    if temperature == 0:
        return logits.float().argmax(-1, keepdim=True)
    return torch.multinomial(token_probs(logits, temperature, top_k), 1, generator=generator)


@torch.inference_mode()
def generate(model, idx, max_new_tokens, threshold=1.0, temperature=1.0, top_k=None,
             confidence="softmax", generator=None, whole_batch=False):
    """Sample max_new_tokens after idx (B, T) with a KV cache and true early exit; temperature
    0 is greedy. Returns the ids (B, T + new) and, per new token, the layer that produced it
    (B, new), made under torch.inference_mode (.clone() them to use them where autograd runs). The
    context of each character is window(position): the cache is rebuilt from the window's text when
    it moves on."""
    cache, start, depths = None, None, []
    for _ in range(max_new_tokens):
        s = window(idx.size(1), model.config.block_size)
        if s != start:  # (re)fill the cache from the window's text
            cache, start, step_in = new_cache(model.config.n_layer), s, idx[:, s:]
        logits, depth, _ = model.forward_exit(step_in, threshold, confidence, cache, whole_batch)
        nxt = sample_next(logits[:, -1], temperature, top_k, generator)
        depths.append(depth[:, -1])
        idx = torch.cat([idx, nxt], dim=1)
        step_in = nxt
    return idx, torch.stack(depths, 1) if depths else idx.new_zeros(idx.size(0), 0)


# ----------------------------------------------------------------------------------------------
# self-speculative decoding (LayerSkip [5])


@dataclass
class Stats:
    """What a speculative generation did, counted over every row and cycle."""
    rows: int
    cycles: int = 0  # draft-verify cycles: full-model passes over the batch (the rows still going)
    row_cycles: int = 0  # rows in each of those passes, summed: a finished row leaves the batch
    drafted: int = 0  # characters drafted
    accepted: int = 0  # drafted characters the full model accepted
    emitted: int = 0  # characters produced: the accepted ones and one from the full model a cycle

    @property
    def acceptance(self):
        return self.accepted / max(1, self.drafted)

    @property
    def per_cycle(self):
        """Characters a row gains per full-model pass (1 without drafts, up to K + 1)."""
        return self.emitted / max(1, self.row_cycles)


@torch.inference_mode()
def speculative(model, idx, max_new_tokens, draft_exit, k=4, temperature=1.0, top_k=None, generator=None, stop=0.0):
    """max_new_tokens characters after idx (B, T), each distributed exactly as model.generate at full
    depth would draw it, from drafts of up to k characters by the exit after layer draft_exit. stop:
    a cycle drafts no further once the rows' mean chance that all their drafts so far are accepted,
    by the drafter's own reckoning, falls below it (0: always k; see draft). Returns the ids
    (B, T + max_new_tokens), made under torch.inference_mode as generate's are, and a Stats."""
    cfg = model.config
    if draft_exit not in cfg.exits:
        raise EEminiError(f"layer {draft_exit} has no exit head to draft with; the model's exits are {cfg.exits}")
    if not 0.0 <= stop <= 1.0:  # also refuses NaN
        raise EEminiError(f"draft stop {stop} is outside [0, 1]; 0 always drafts k characters, 1 stops at the first unsure one")
    target = idx.size(1) + max_new_tokens
    spare = min(k, cfg.block_size - 1)  # a row at its window's end may compute every draft past it
    rows, cache, starts = [r.tolist() for r in idx], new_cache(cfg.n_layer, spare), [None] * idx.size(0)
    stats, out, going = Stats(len(rows)), [None] * len(rows), list(range(len(rows)))  # going: rows' places in idx
    while True:
        keep = [i for i, r in enumerate(rows) if len(r) < target]
        for i in set(range(len(rows))) - set(keep):
            out[going[i]] = rows[i][:target]
        if not keep:
            return idx.new_tensor(out), stats
        if len(keep) < len(rows):  # finished rows leave the batch: the others' passes get cheaper
            rows, starts, going = [rows[i] for i in keep], [starts[i] for i in keep], [going[i] for i in keep]
            for c in cache:
                c.keep(torch.tensor(keep, device=idx.device))
        refill(model, cache, rows, starts)
        drafted, accepted = cycle(model, cache, rows, starts, draft_exit, min(k, target - min(map(len, rows)) - 1),
                                  temperature, top_k, generator, stop)
        stats.cycles, stats.row_cycles, stats.drafted = stats.cycles + 1, stats.row_cycles + len(rows), stats.drafted + drafted
        stats.accepted, stats.emitted = stats.accepted + int(accepted.sum()), stats.emitted + int(accepted.sum()) + len(rows)


def cycle(model, cache, rows, starts, e, k, temperature=1.0, top_k=None, generator=None, stop=0.0):
    """One draft-verify cycle over every row: each row gains its accepted drafts and one character
    from the full model, and every layer's cache keeps just those. Rows draft together, as far as
    the row with most room in its window may and the cache's spare slots allow; a row keeps only
    the drafts inside its own window. Returns the number of drafts rows could keep, summed over
    rows, and (B,) how many each row accepted."""
    cfg, blocks = model.config, model.transformer.h
    device = cache_device(model)
    n = torch.tensor([len(r) for r in rows], device=device)  # each row predicts position n next
    cur = torch.tensor([r[-1:] for r in rows], device=device)  # (B, 1): the newest, not yet in the cache
    start = torch.tensor(starts, device=device)  # where each row's context window begins
    room = start + cfg.block_size - n  # drafts that stay in each row's window
    steps = min(k, int(room.max()), int(room.min()) + cache[0].spare)  # past a row's window: in the spare slots
    drafts, q, states = draft(model, cache, cur, steps, e, temperature, top_k, generator, stop)
    steps = len(drafts)  # fewer when the drafter stopped early
    x = model.embed(drafts[-1] if drafts else cur, in_context(cache[0].length, cfg.block_size))  # the newest ...
    for i in range(e):
        x = blocks[i](x, None, cache[i])  # ... through layers 1..e
    x = torch.cat([*states, x], 1)  # (B, steps + 1, C): each position's state after layer e
    for i in range(e, cfg.n_layer):
        x = blocks[i](x, None, cache[i])
    p = token_probs(model.head(cfg.n_layer, x).flatten(0, 1), temperature, top_k).view(*x.shape[:2], -1)
    limit = room.clamp(max=steps)  # a row near its window's end keeps fewer: the rest it drafted, past it, is
    new, accepted = accept(drafts, q, p, generator, limit)  # never looked at (computed in the spare slots)
    for r, chars in zip(rows, new):
        r.extend(chars)
    for c in cache:  # keep the cycle's input and its accepted drafts, in each row
        c.truncate(n - start + accepted)
    return int(limit.sum()), accepted


def in_context(length, block_size):
    """Where new characters' positions start, for model.embed: a row drafting past its window (into
    the cache's spare slots, to be dropped) gets the context's last position instead of one past it."""
    return length if isinstance(length, int) else length.clamp(max=block_size - 1)


def draft(model, cache, cur, steps, e, temperature, top_k, generator, stop=0.0):
    """Up to `steps` characters from the exit after layer e, one at a time: each input goes through
    layers 1..e (its K/V into the cache) and its state there is kept for verification. Drafting stops
    early once the rows' mean of P(d_1) ... P(d_i) (P the exit's softmax at temperature 1), the drafter's
    own odds that every draft so far survives verification, falls below `stop`: a draft past a likely
    refusal costs a step and widens the verify pass, for little. How many drafts are made never changes
    the distribution of what is emitted (greedy: the text itself), only how fast.
    Returns the drafts [(B, 1)], their distributions q [(B, V)] and the kept states [(B, 1, C)]."""
    drafts, q, states, x_in = [], [], [], cur
    alive = torch.ones(cur.size(0), device=cur.device)  # per row: the product of P(d_i) so far
    for _ in range(steps):
        if stop and drafts and alive.mean() < stop:  # (a host sync a draft step, on a GPU; only with a stop)
            break
        x = model.embed(x_in, in_context(cache[0].length, model.config.block_size))
        for i, block in enumerate(model.transformer.h[:e]):
            x = block(x, None, cache[i])
        states.append(x)
        logits = model.head(e, x[:, -1])
        q.append(token_probs(logits, temperature, top_k))
        x_in = torch.multinomial(q[-1], 1, generator=generator) if temperature else q[-1].argmax(-1, keepdim=True)
        drafts.append(x_in)
        if stop:  # the exit's own probability of its draft (q itself is one-hot when greedy)
            alive = alive * F.softmax(logits.float(), dim=-1).gather(1, x_in).squeeze(1)
    return drafts, q, states


def accept(drafts, q, p, generator, limit=None):
    """Per row: the characters this cycle emits (the accepted drafts, then one from the full model)
    and how many drafts were accepted. p: (B, steps + 1, V), the full model's distributions; limit
    (B,): how many of its drafts a row may keep (default all)."""
    B, steps = p.size(0), len(drafts)
    limit = torch.full((B,), steps, device=p.device) if limit is None else limit
    accepted = torch.zeros(B, dtype=torch.long, device=p.device)
    if steps:
        d = torch.cat(drafts, 1)  # (B, steps)
        pd = p[:, :steps].gather(2, d.unsqueeze(-1)).squeeze(-1)  # p_i(d_i)
        qd = torch.stack(q, 1).gather(2, d.unsqueeze(-1)).squeeze(-1)  # q_i(d_i) > 0: d_i was drawn from q_i
        u = torch.rand(B, steps, generator=generator, device=p.device)
        ok = (u * qd < pd) & (torch.arange(steps, device=p.device) < limit.unsqueeze(1))
        accepted = ok.long().cumprod(1).sum(1)  # P(accept) = min(1, p / q); the leading run
    first = p[torch.arange(B), accepted]  # the full model's distribution where each row stopped
    if steps:  # refused at position a: draw from what p has beyond q (all of p where they do not overlap)
        q_a = torch.stack(q, 1)[torch.arange(B), accepted.clamp(max=steps - 1)]
        rest = (first - q_a).clamp(min=0)
        use = (accepted < limit) & (rest.sum(-1) > 0)  # a row that kept all it may: from p as it is
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
        fresh = new_cache(model.config.n_layer, cache[0].spare)
        if length:
            x = model.embed(torch.tensor([rows[b][starts[b]:-1] for b in batch], device=device))
            for block, c in zip(model.transformer.h, fresh):
                x = block(x, None, c)
        for c, f in zip(cache, fresh):
            c.set_rows(torch.tensor(batch, device=device), f, len(rows))


def cache_device(model):
    return next(model.parameters()).device
