"""
eemini: confidence-routed early exit for a character-level GPT. This file is the model and the idea.

Easy characters leave the network at a shallow exit; hard ones go through every layer. Read top to
bottom: config -> attention, MLP, Block -> exit heads and the GPT (training forward with exit
dropout, true early exit) -> confidence and the exit rule -> loss schemes. Beside it: decode.py, the
engine (KV cache, generation, self-speculative decoding), and what the scripts share but the model
never touches: measure.py (masked routing, Compute% and FLOPs%, the oracle), data.py, optim.py,
routers.py, uncertainty.py, report.py, cascade.py, seeds.py, checkpoint.py, cli.py.

References
[1] Teerapittayanon et al. 2016, BranchyNet: fast inference via early exiting. arXiv:1709.01686
[2] Elbayad et al. 2020, Depth-Adaptive Transformer (auxiliary exit losses). arXiv:1910.10073
[3] Schuster et al. 2022, CALM: Confident Adaptive Language Modeling. arXiv:2207.07061
[4] Lee et al. 2015, Deeply-Supervised Nets. arXiv:1409.5185
[5] Elhoushi et al. 2024, LayerSkip: early exit inference and self-speculative decoding. arXiv:2404.16710
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn import functional as F


class EEminiError(Exception):
    """A problem the user can fix (bad data path, bad flag, foreign checkpoint): printed as one line."""


# ----------------------------------------------------------------------------------------------
# config


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128  # context length in characters
    n_layer: int = 3
    n_head: int = 4
    n_kv_head: int = 0  # heads of keys and values, each shared by n_head / n_kv_head query heads; 0 = n_head
    n_embd: int = 64
    ffn_dim: int = 0  # MLP hidden width; 0 means 4 * n_embd
    dropout: float = 0.0
    bias: bool = False
    # exit points: a token may leave after these layers (each in 1..n_layer-1); [] = a plain GPT
    exits: list = field(default_factory=lambda: [1])
    # the training loss, sum_k w_k * CE(head after layer k), as {layer: w}; None = asym with
    # alpha 0.7 (the quick start). Every exit and every weighted layer has a head.
    loss_weights: dict = None
    # the block's recipe (README: "Make depth pay"); the GPT-2 layout is learned, layer, gelu, False
    pos: str = "rope"  # positions: "rope" (rotary, in attention) or "learned" (an embedding added at the input)
    norm: str = "rms"  # "rms" (RMSNorm, no parameters) or "layer" (LayerNorm with a gain)
    mlp: str = "relu2"  # the MLP's nonlinearity: "relu2" (ReLU squared), "gelu" or "swiglu"
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    exit_dropout: float = 0.2  # training only: the share of tokens frozen at the trained exits (see forward)
    layer_dropout: float = 0.0  # training only: the rate at which the last layer is skipped, less below (see forward)

    def __post_init__(self):
        self.exits = sorted(set(self.exits))
        if not all(1 <= k < self.n_layer for k in self.exits):
            raise EEminiError(f"exit layers {self.exits} must lie in 1..n_layer-1 = {self.n_layer - 1} "
                              f"(none, for a plain model without an exit)")
        if not 0 <= self.layer_dropout < 1:
            raise EEminiError(f"layer dropout {self.layer_dropout} must lie in [0, 1)")
        if self.n_embd % self.n_head:
            raise EEminiError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_kv_head < 0 or self.n_head % self.kv_heads:
            raise EEminiError(f"n_kv_head {self.n_kv_head} does not divide n_head {self.n_head}")
        for name, allowed in (("pos", ROPE), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise EEminiError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise EEminiError(f"rotary positions need an even head size, not {self.n_embd // self.n_head}")
        if self.loss_weights is None:
            self.loss_weights = layer_weights("asym" if self.exits else "final", self.n_layer, self.exits, 0.7)
        self.loss_weights = {int(k): float(w) for k, w in sorted(self.loss_weights.items()) if w > 0}
        if not self.loss_weights or not all(1 <= k <= self.n_layer for k in self.loss_weights):
            raise EEminiError(f"loss weights {self.loss_weights} must weigh layers in 1..{self.n_layer}")

    @property
    def head_layers(self):
        """Middle layers with a head of their own: the exits and every weighted middle layer."""
        return sorted(set(self.exits) | {k for k in self.loss_weights if k < self.n_layer})

    @property
    def kv_heads(self):
        """Heads of keys and values (fewer than n_head under grouped-query attention)."""
        return self.n_kv_head or self.n_head

    @property
    def trained_exits(self):
        """The exits whose head the loss reached (under --loss final none did: they cannot route)."""
        return [k for k in self.exits if k in self.loss_weights]


# ----------------------------------------------------------------------------------------------
# the transformer: a pre-norm GPT (nanoGPT layout, modern parts) whose attention can skip exited
# tokens' queries. Each part of the recipe is one switch in the config, one line where it acts.

# RMSNorm · Zhang & Sennrich 2019, arXiv:1910.07467 · nanochat drops its gain as well
NORMS = {"rms": lambda cfg: nn.RMSNorm(cfg.n_embd, elementwise_affine=False),
         "layer": lambda cfg: nn.LayerNorm(cfg.n_embd, bias=cfg.bias)}
# ReLU² · So et al. 2021 (Primer), arXiv:2109.08668; SwiGLU · Shazeer 2020, arXiv:2002.05202
MLPS = {"relu2": lambda h: F.relu(h).square(), "gelu": F.gelu,
        "swiglu": lambda h: F.silu(h.chunk(2, dim=-1)[0]) * h.chunk(2, dim=-1)[1]}
ROPE = ("rope", "learned")


def rotary_tables(cfg):
    """RoPE's turns as unit complex numbers, (2 * block_size, head_size / 2), twice the context for the
    drafts that self-speculative decoding computes past a row's window and drops: position p turns the pair
    (2i, 2i+1) of a head's query and key by the angle p * 10000^(-2i / head_size), so that a query
    and a key score by their offset alone · Su et al. 2021, arXiv:2104.09864."""
    hs = cfg.n_embd // cfg.n_head
    angles = torch.outer(torch.arange(2 * cfg.block_size).float(), 10000.0 ** (-torch.arange(0, hs, 2).float() / hs))
    return torch.polar(torch.ones_like(angles), angles)


def rotate(t, pos, turns):  # t: (B, nh, T, hs), pos: (T,) or (B, T) absolute positions
    z = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))  # (B, nh, T, hs/2): the pairs
    turn = turns[pos] if pos.dim() == 1 else turns[pos].unsqueeze(1)
    return torch.view_as_real(z * turn).flatten(-2).type_as(t)


def positions(start, n, device):
    """Positions of n new tokens after `start` cached ones: (n,) when every row has the same start
    (an int), (B, n) when rows differ (a (B,) tensor: self-speculative decoding accepts a different
    number of characters in each row)."""
    steps = torch.arange(n, device=device)
    return start + steps if isinstance(start, int) else start.unsqueeze(1) + steps


def gather_tokens(x, idx):  # x: (B, T, C), idx: (B, Tq) -> (B, Tq, C)
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.block_size, self.dropout = cfg.n_head, cfg.block_size, cfg.dropout
        # grouped-query attention · Ainslie et al. 2023, arXiv:2305.13245: fewer K/V heads, so the K/V
        # an exited token still owes the deep layers costs less (n_kv_head 1 is multi-query attention)
        self.hs = cfg.n_embd // cfg.n_head
        self.kv, self.gqa = cfg.kv_heads * self.hs, cfg.kv_heads != cfg.n_head  # width of the keys (and values)
        self.c_attn = nn.Linear(cfg.n_embd, cfg.n_embd + 2 * self.kv, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.qk_norm = cfg.qk_norm  # QK-norm · Henry et al. 2020, arXiv:2010.04245; nanochat
        self.rope = cfg.pos == "rope"
        if self.rope:  # not saved: they follow from the config
            self.register_buffer("turns", rotary_tables(cfg), persistent=False)

    def heads(self, t, pos=None):  # (B, T, C) -> (B, nh, T, hs); queries and keys get their positions
        t = t.view(t.size(0), t.size(1), -1, self.hs).transpose(1, 2)
        if pos is None:  # values
            return t
        if self.qk_norm:
            t = F.rms_norm(t, (t.size(-1),))
        return rotate(t, pos, self.turns) if self.rope else t

    def project(self, x, part):  # part: slice of c_attn's output rows (queries 0:C, keys+values C:)
        b = self.c_attn.bias
        return F.linear(x, self.c_attn.weight[part], None if b is None else b[part])

    def write_kv(self, x, cache):
        """K/V of every new token (an exited one too: later tokens attend to it), appended to the
        cache; returns all keys and values so far, (B, nh, S, hs) each."""
        C, start = x.size(-1), cache.length if cache is not None else 0
        k, v = self.project(x, slice(C, None)).split(self.kv, dim=2)
        k, v = self.heads(k, positions(start, x.size(1), x.device)), self.heads(v)
        return cache.append(k, v, self.block_size) if cache is not None else (k, v)

    def forward(self, x, cache=None, rows=None, q_idx=None, prefix=0):
        """x: (B, T, C) normed states of T new tokens. Queries come from all of them, or with
        rows (R,) and q_idx (R, Tq) from x[rows] gathered at q_idx (the tokens still going deep).
        prefix: how many of x's first tokens are earlier exited ones whose K/V is still to be
        written; they share this call's qkv projection (one step instead of two) and ask no queries."""
        B, T, C = x.size()
        T -= prefix
        start = cache.length if cache is not None else 0
        ragged = not isinstance(start, int)  # rows at different lengths: (B,) starts
        if q_idx is None:
            pos = positions(start, x.size(1), x.device)
            q, k, v = self.c_attn(x).split([C, self.kv, self.kv], dim=2)
            q, k, v = self.heads(q, pos), self.heads(k, pos), self.heads(v)
            if prefix:
                q, start = q[:, :, prefix:], start + prefix
            if cache is not None:
                k, v = cache.append(k, v, self.block_size)  # (B, nh, start + T, hs)
        else:  # true early exit: K/V for every token, a query only for the deep ones
            k, v = self.write_kv(x, cache)
            k, v = k[rows], v[rows]
            qpos = q_idx + (start[rows].unsqueeze(1) if ragged else start)  # the deep queries' positions
            q = self.heads(self.project(gather_tokens(x[rows], q_idx), slice(0, C)), qpos)
        if q_idx is None and not ragged and start == 0:
            mask = "causal"
        elif q_idx is None and not ragged and T == 1:
            mask = None  # one new token sees every key
        else:  # queries at arbitrary positions: key j is visible to the query at position p iff j <= p
            qpos = positions(start, T, x.device).expand(B, T) if q_idx is None else qpos
            mask = (torch.arange(k.size(2), device=x.device) <= qpos.unsqueeze(-1)).unsqueeze(1)  # (R, 1, Tq, S)
        return self.resid_dropout(self.c_proj(self.attend(q, k, v, mask, C)))

    def attend(self, q, k, v, mask, C):  # mask: "causal", None (see all keys) or a bool mask
        drop = self.dropout if self.training else 0.0
        if isinstance(mask, str):
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True, enable_gqa=self.gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, enable_gqa=self.gqa)
        return y.transpose(1, 2).reshape(q.size(0), -1, C)  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = cfg.ffn_dim or 4 * cfg.n_embd
        self.c_fc = nn.Linear(cfg.n_embd, hidden * (2 if cfg.mlp == "swiglu" else 1), bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.act = MLPS[cfg.mlp]
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = NORMS[cfg.norm](cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = NORMS[cfg.norm](cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, deep=None, cache=None):
        """deep: (B, T) bool, the tokens this layer updates (None = all). The others keep their
        state, frozen at the layer they exited, and only lend it as K/V (state propagation [3])."""
        if deep is not None and not deep.any():  # all have exited: their K/V, for later tokens,
            if cache is not None:                # is written when the next deep token needs it
                cache.defer(x)
            return x
        pending = None
        if cache is not None and cache.pending is not None:
            pending, cache.pending = cache.pending, None
        if deep is None or deep.all():
            both = x if pending is None else torch.cat([pending, x], dim=1)
            x = x + self.attn(self.ln_1(both), cache, prefix=both.size(1) - x.size(1))
            return x + self.mlp(self.ln_2(x))
        if pending is not None:
            self.attn.write_kv(self.ln_1(pending), cache)
        # the work that is left: rows with a deep token, and in each its deep positions, in order,
        # then padding (a stable sort on "exited?"); the padding is computed but never written
        n_deep = deep.sum(1)
        rows = n_deep.nonzero().squeeze(1)  # (R,)
        T = deep.size(1)
        order = torch.argsort((~deep[rows]).long() * T + torch.arange(T, device=x.device), dim=1)
        q_idx = order[:, : int(n_deep.max())]  # (R, Tq)
        x_rows = x[rows]
        x_deep = gather_tokens(x_rows, q_idx)  # (R, Tq, C)
        h = x_deep + self.attn(self.ln_1(x), cache, rows, q_idx)
        h = h + self.mlp(self.ln_2(h))
        real = torch.arange(q_idx.size(1), device=x.device) < n_deep[rows].unsqueeze(1)
        h = torch.where(real.unsqueeze(-1), h, x_deep)
        return x.index_copy(0, rows, x_rows.scatter(1, q_idx.unsqueeze(-1).expand_as(h), h))


# ----------------------------------------------------------------------------------------------
# exit heads and the GPT


class ExitHead(nn.Module):
    """Norm + linear to the vocabulary, read off a middle layer (BranchyNet's side branch [1])."""

    def __init__(self, cfg):
        super().__init__()
        self.ln = NORMS[cfg.norm](cfg)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, x):
        return self.head(self.ln(x))


def init_weights(module):
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            **({"wpe": nn.Embedding(cfg.block_size, cfg.n_embd)} if cfg.pos == "learned" else {}),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=NORMS[cfg.norm](cfg),
        ))
        self.exit_heads = nn.ModuleDict({str(k): ExitHead(cfg) for k in cfg.head_layers})
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def head(self, layer, x):
        """Logits read off the state after `layer` (1-based); the last layer uses ln_f + lm_head."""
        if layer == self.config.n_layer:
            return self.lm_head(self.transformer.ln_f(x))
        return self.exit_heads[str(layer)](x)

    def embed(self, idx, start=0):
        """Token embeddings of idx (B, T), placed after `start` cached characters (an int, or (B,))."""
        T, end = idx.size(1), int(start if isinstance(start, int) else start.max()) + idx.size(1)
        if end > self.config.block_size:
            raise EEminiError(f"a sequence of {end} characters is longer than the model's context "
                              f"({self.config.block_size}); use shorter windows or train with a larger --block-size")
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos == "learned":  # with rope, positions enter in attention instead
            x = x + self.transformer.wpe(positions(start, T, idx.device))
        return self.transformer.drop(x)

    def forward(self, idx, targets=None, weights=None, leave_at=None):
        """Logits at every layer with a head, {layer: (B, T, V)}, and given targets the training loss
        sum_k w_k CE(layer k) over `weights` (default config.loss_weights; a curriculum's table of the
        step), and then only the weighted heads are computed; leave_at: the exits where exit dropout
        freezes tokens (default: those the table trains; one it does not train scores none of them).
        With exit_dropout, training freezes a random share of the tokens at each exit, as true early
        exit would: the layers above see their frozen states, and heads above do not score them.
        With layer_dropout, training skips layer k for a random share of the sequences, rising with
        depth from 0 at layer 1 to layer_dropout at the last (LayerSkip's rates, e^((k-1) ln 2 / (L-1))
        - 1 of it [5]): the deep layers learn to refine what the shallow ones say, not to replace it.
        A skipped layer is still computed (torch.where keeps the graph the same in every step), so
        unlike LayerSkip's it saves no training time."""
        cfg, weights = self.config, weights or self.config.loss_weights
        wanted = set(weights) if targets is not None else {*cfg.head_layers, cfg.n_layer}
        x, logits, frozen, scored = self.embed(idx), {}, None, {}
        train = self.training and targets is not None
        exits = leave_at if leave_at is not None else [k for k in cfg.trained_exits if k in weights]
        drop = cfg.exit_dropout if train and exits else 0.0
        for k, block in enumerate(self.transformer.h, 1):
            keep = frozen.unsqueeze(-1) if frozen is not None else None  # tokens whose state this layer leaves alone
            rate = cfg.layer_dropout * (2 ** ((k - 1) / max(1, cfg.n_layer - 1)) - 1) if train else 0.0
            if rate:
                skip = torch.rand(idx.size(0), 1, 1, device=idx.device) < rate
                keep = skip if keep is None else keep | skip
            x = block(x) if keep is None else torch.where(keep, x, block(x))
            if k in wanted:
                logits[k] = self.head(k, x)
                scored[k] = targets if frozen is None else targets.masked_fill(frozen, -100)  # -100: not scored
            if drop and k in exits:  # LayerSkip-style exit dropout [5], per token; shared by the exits
                leave = torch.rand(idx.shape, device=idx.device) < drop / len(exits)
                frozen = leave if frozen is None else frozen | leave
        if targets is None:
            return logits, None
        ce = {k: F.cross_entropy(logits[k].flatten(0, 1), scored[k].flatten(), ignore_index=-100) for k in weights}
        return logits, weighted_loss(ce, weights)

    def states(self, idx):
        """{layer: (B, T, C) state after it} for layers 0 (the embedding) .. n_layer."""
        out = {0: self.embed(idx)}
        for k, block in enumerate(self.transformer.h, 1):
            out[k] = block(out[k - 1])
        return out

    def forward_all_layers(self, idx):
        """{layer: logits} after every layer that has a head (deep supervision reads these)."""
        return self(idx)[0]

    def forward_train(self, idx):
        """(shallow, deep) logits: the first exit head's and the last layer's."""
        logits = self(idx)[0]
        return logits[self.config.exits[0]], logits[self.config.n_layer]

    @torch.no_grad()
    def forward_exit(self, idx, threshold, confidence="softmax", cache=None, whole_batch=False):
        """True early exit [3]: a token whose confidence at an exit point reaches the threshold
        stops there; the deep layers skip its attention query and MLP and compute only its K/V,
        from its frozen state. With a cache (decode.new_cache), idx continues the cached text.
        threshold None runs the plain model without exit checks (the honest speed baseline).
        whole_batch: CALM's batch rule [3], the tokens at a position leave only all together, when
        the least confident row clears the threshold (no gathering of rows; all or nothing).
        Returns logits (B, T, V), the layer each token left at (B, T), the confidence at the
        first exit point checked (B, T; None without exit checks). An exit whose threshold is 1.0
        is not checked: no token could leave there, so its head is not computed."""
        cfg = self.config
        checked = {} if threshold is None else checked_exits(threshold, cfg.exits)
        x = self.embed(idx, cache[0].length if cache else 0)
        depth = torch.full(idx.shape, cfg.n_layer, device=idx.device)
        logits = first_conf = deep = None  # deep: tokens still in flight (None = all of them)
        for k, block in enumerate(self.transformer.h, 1):
            if deep is not None and not deep.any():  # every token has left: the layers above owe
                for c in cache[k - 1:] if cache else []:  # only their K/V, written when the next
                    c.defer(x)                            # deep token needs it
                break
            prev, x = x, block(x, deep, cache[k - 1] if cache else None)
            if k not in checked:
                continue
            exit_logits = self.head(k, x)
            conf = confidence_at(confidence, k)(exit_logits, x, prev)
            first_conf = conf if first_conf is None else first_conf
            leave = exit_mask(conf, checked[k])
            leave = leave.all(0, keepdim=True).expand_as(leave) if whole_batch else leave
            leave = leave if deep is None else deep & leave
            if not leave.any():  # the common case while decoding a hard token: nothing to record
                continue
            logits = exit_logits if logits is None else torch.where(leave.unsqueeze(-1), exit_logits, logits)
            depth = depth.masked_fill(leave, k)
            deep = ~leave if deep is None else deep & ~leave
        if deep is None:
            return self.head(cfg.n_layer, x), depth, first_conf
        if deep.any():  # the last head, for the deep tokens only
            logits[deep] = self.head(cfg.n_layer, x[deep]).to(logits.dtype)
        return logits, depth, first_conf


# ----------------------------------------------------------------------------------------------
# confidence and the exit rule: a token leaves at the first exit point where its confidence >= threshold [1][3]


def conf_softmax(logits, h=None, h_prev=None):
    """Max softmax probability (the seeds' confidence, CALM's 'softmax response' [3])."""
    return F.softmax(logits.float(), dim=-1).max(-1).values


def conf_margin(logits, h=None, h_prev=None):
    """Top-1 minus top-2 softmax probability."""
    top2 = torch.topk(F.softmax(logits.float(), dim=-1), 2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def conf_entropy(logits, h=None, h_prev=None):
    """Negative entropy, rescaled to [0, 1]: 1 - H(p) / log V (1 = one-hot, 0 = uniform)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return (1.0 + (logp.exp() * logp).sum(-1) / math.log(logits.size(-1))).clamp(0.0, 1.0)  # rounding


def conf_saturation(logits, h, h_prev):
    """CALM's hidden-state saturation [3]: the cosine of the states after this layer and the one
    before it (clipped to [0, 1]); a state that has stopped moving has little left to learn."""
    return F.cosine_similarity(h.float(), h_prev.float(), dim=-1).clamp(0.0, 1.0)


# each measure: (exit logits, state after the exit layer, state before it) -> confidence in [0, 1]
CONFIDENCE = {"softmax": conf_softmax, "margin": conf_margin, "entropy": conf_entropy, "saturation": conf_saturation}


def confidence_at(confidence, k):
    """The measure used at exit k: a name from CONFIDENCE, or a learned router ({exit: module})."""
    return CONFIDENCE[confidence] if isinstance(confidence, str) else confidence[k]


def check_threshold(threshold):
    if not 0.0 <= threshold <= 1.0:  # also refuses NaN
        raise EEminiError(f"threshold {threshold} is outside [0, 1]; 0 sends every token out early, 1 none")
    return threshold


def exit_mask(conf, threshold):
    """conf >= threshold, except that threshold 1.0 means no exit at all (float softmax can round
    a near-certain prediction to exactly 1.0, and 1.0 is the 'full depth' end of every sweep)."""
    check_threshold(threshold)
    if threshold >= 1.0:
        return torch.zeros_like(conf, dtype=torch.bool)
    return conf >= threshold


def at_exit(threshold, k):
    """The threshold of exit k: one number for every exit, or {exit layer: threshold}."""
    return threshold[k] if isinstance(threshold, dict) else threshold


def checked_exits(threshold, exits):
    """{exit: its threshold} for the exits a token may leave at, each threshold checked to lie in
    [0, 1]. An exit at threshold 1.0 lets nothing out, so it is left out: true early exit does not
    compute its head, and FLOPs% does not charge it."""
    if isinstance(threshold, dict) and not set(exits) <= set(threshold):
        raise EEminiError(f"thresholds given for exits {sorted(threshold)}; give one for each of {list(exits)}")
    at = {k: check_threshold(at_exit(threshold, k)) for k in exits}
    return {k: t for k, t in at.items() if t < 1.0}


# ----------------------------------------------------------------------------------------------
# loss schemes: each one a table {layer: weight}; the loss is sum_k weight_k * CE(layer k).
# Several exit points share the weight a scheme gives "the exit"; with one exit nothing changes.


def loss_final(n_layer, exits, alpha):
    """Seed 000 'Standard': CE of the last layer only (with n_layer=1, 'Standard 1L')."""
    return {n_layer: 1.0}


def loss_aux(n_layer, exits, alpha):
    """Seeds 000/001 Exp 3, Depth-Adaptive Transformer [2]: 0.5 CE(exit) + 0.5 CE(final)."""
    return {**{k: 0.5 / len(exits) for k in exits}, n_layer: 0.5}


def loss_deepsup(n_layer, exits, alpha):
    """Seeds 000/001 Exp 4, Deeply-Supervised Nets [4] (the seeds' 'LPT'): mean CE over all layers."""
    return {k: 1.0 / n_layer for k in range(1, n_layer + 1)}


def loss_asym(n_layer, exits, alpha):
    """Seed 003 Exp 5 and seed 002: alpha CE(exit) + (1-alpha) CE(final), middle layers unsupervised."""
    return {**{k: alpha / len(exits) for k in exits}, n_layer: 1.0 - alpha}


def loss_asym_deepsup(n_layer, exits, alpha):
    """Seed 003 Exp 6: alpha CE(exit) + 1.0 CE(every other middle layer) + (1-alpha) CE(final)."""
    return {k: alpha / len(exits) if k in exits else 1.0 - alpha if k == n_layer else 1.0 for k in range(1, n_layer + 1)}


LOSSES = {"final": loss_final, "aux": loss_aux, "deepsup": loss_deepsup,
          "asym": loss_asym, "asym_deepsup": loss_asym_deepsup}
NEEDS_EXIT = ("aux", "asym", "asym_deepsup")  # the schemes that weigh an exit head


def layer_weights(loss, n_layer, exits, alpha=0.5, weights=None):
    """The {layer: weight} table of a scheme, or of an explicit per-layer list such as seed 002's
    [0, 0.7, 0, 0.3]. Layers of weight 0 are dropped (they get no head, unless they are exits)."""
    if not 0.0 <= alpha <= 1.0:
        raise EEminiError(f"alpha {alpha} is outside [0, 1]; it weighs the exit's loss against the final's")
    if weights is not None:
        if len(weights) != n_layer or min(weights) < 0 or sum(weights) <= 0:
            raise EEminiError(f"--layer-weights needs {n_layer} non-negative numbers, one a layer, "
                              f"not all zero (got {weights})")
        table = dict(enumerate(weights, 1))
    elif loss in NEEDS_EXIT and not exits:
        raise EEminiError(f"--loss {loss} supervises an exit head: give --exit-layers")
    else:
        table = LOSSES[loss](n_layer, exits, alpha)
    return {k: float(w) for k, w in sorted(table.items()) if w > 0}


def weighted_loss(ce_by_layer, weights):
    return sum(weights[k] * ce_by_layer[k] for k in weights)
