"""
Seed 004's block-wise cascade, the parts exit_classifier.py trains: blocks of eemini layers with a
head each, the exit classifier on a block's state and its two labels, the tokens a block reads
(how the hard ones reach the next block: in their own text, or repacked), and the cascade's true
early exit over held-out text with the seed's figures; the format a trained cascade is saved in, and loading it.

[2] Schuster et al. 2022, CALM (state propagation). arXiv:2207.07061
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

import checkpoint as ck
import cli
import eemini as ee
import measure
from data import Vocab

KIND = "eemini-exit-classifier"  # what exit_classifier.py writes
# seed 004's methods: how a block's confidence is read (a classifier, and its label; or max softmax)
METHODS = {"A": ("classifier", "distill"), "B": ("classifier", "loss"), "C": ("softmax", None)}
NAMES = {"A": "distill", "B": "loss", "C": "softmax"}


# ----------------------------------------------------------------------------------------------
# model: blocks of eemini layers, each with its own head; an exit classifier on a block's state


class CascadeBlock(nn.Module):
    """A few transformer layers and a head. Block 0 embeds characters; a later block reads the
    previous block's hidden states (seed 004) and updates only the tokens still in flight."""

    def __init__(self, cfg, n_layer, embed=False):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd) if embed else None
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if embed and cfg.pos == "learned" else None
        self.h = nn.ModuleList([ee.Block(cfg) for _ in range(n_layer)])
        self.head = ee.ExitHead(cfg)
        self.apply(ee.init_weights)

    def forward(self, x, live=None):  # x: (B, T) ids or (B, T, C) states; live: (B, T) bool or None = all
        if self.wte is not None:
            x = self.wte(x)  # (B, T, C); rotary positions enter in attention, learned ones here
            x = x + self.wpe(torch.arange(x.size(1), device=x.device)) if self.wpe is not None else x
        for layer in self.h:  # a token not live keeps its state and only lends it as K/V [2]
            x = layer(x, live)
        return x, self.head(x)  # (B, T, C), (B, T, V)


class ExitClassifier(nn.Module):
    """Confidence in (0, 1) from a block's hidden state: sigmoid of a small MLP (linear if hidden=0)."""

    def __init__(self, n_embd, hidden):
        super().__init__()
        mlp = [nn.Linear(n_embd, hidden), nn.GELU(), nn.Linear(hidden, 1)] if hidden else [nn.Linear(n_embd, 1)]
        self.net = nn.Sequential(nn.LayerNorm(n_embd), *mlp)

    def forward(self, h):  # (..., C) -> (...)
        return torch.sigmoid(self.net(h).squeeze(-1))


def label_distill(ce, pmax):
    """Seed 004 'distill': the block's max softmax, its own confidence, right or wrong."""
    return pmax


def label_loss(ce, pmax):
    """Seed 004 'loss': exp(-CE), the probability the block gave the right character."""
    return torch.exp(-ce)


LABELS = {"distill": label_distill, "loss": label_loss}


# ----------------------------------------------------------------------------------------------
# tokens: the sequences a block reads, and how the hard ones reach the next block


@dataclass
class Tokens:
    x: torch.Tensor  # (S, T) character ids for block 0, (S, T, C) the previous block's states after it
    y: torch.Tensor  # (S, T) next-character targets
    live: torch.Tensor  # (S, T) bool: still in flight (not exited, not padding): updated and scored
    pos: torch.Tensor  # (S, T) each token's index in the original text, -1 for padding

    def take(self, i):
        return Tokens(self.x[i], self.y[i], self.live[i], self.pos[i])


def windows(ids, seq_len):
    """Non-overlapping windows of ids: inputs, next-character targets, all live."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ee.EEminiError(f"the text ({len(ids)} chars) is shorter than one sequence of {seq_len + 1}")
    x, y = ids[: n * seq_len].view(n, seq_len), ids[1 : n * seq_len + 1].view(n, seq_len)
    return Tokens(x, y, torch.ones_like(x, dtype=torch.bool), torch.arange(n * seq_len).view(n, seq_len))


def repack(tok, seq_len):
    """Seed 004's repacking: the live tokens, in text order, cut into new seq_len sequences. Each
    keeps its state and target but loses its context; the last sequence is padded (pos -1)."""
    keep = tok.live.flatten()
    x, y, pos = tok.x.flatten(0, 1)[keep], tok.y.flatten()[keep], tok.pos.flatten()[keep]
    pad = -len(y) % seq_len
    x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]).view(-1, seq_len, *x.shape[1:])
    y, pos = (torch.cat([t, t.new_full((pad,), -1)]).view(-1, seq_len) for t in (y, pos))
    return Tokens(x, y, pos >= 0, pos)


def advance(tok, states, hard, context):
    """The tokens the next block reads: the hard ones, in their own text or repacked."""
    nxt = Tokens(states, tok.y, tok.live & hard, tok.pos)
    return repack(nxt, tok.y.size(1)) if context == "repack" else nxt


@torch.no_grad()
def block_outputs(block, tok, batch_size, device):
    """A frozen block over tok: its states (S, T, C) and, per token, CE, correct?, max softmax."""
    block.eval()
    out = {"h": [], "ce": [], "correct": [], "pmax": []}
    for i in range(0, len(tok.y), batch_size):
        b = tok.take(slice(i, i + batch_size))
        live = None if b.live.all() else b.live.to(device)
        with cli.autocast(device):
            h, logits = block(b.x.to(device), live)
        logits, y = logits.float(), b.y.to(device)
        out["h"].append(h.float().cpu())
        out["ce"].append(F.cross_entropy(logits.transpose(1, 2), y.clamp(min=0), reduction="none").cpu())
        out["correct"].append((logits.argmax(-1) == y).cpu())
        out["pmax"].append(ee.conf_softmax(logits).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# evaluation: true early exit through the blocks over held-out text, and the seed's figures


def confidence(clf, out):
    """Per-token confidence at a block: its exit classifier's on the block's state, or, for the
    softmax method (whose cascade has no classifiers: clf None), the block's max softmax."""
    if clf is None:
        return out["pmax"]
    with torch.no_grad():
        return torch.cat([clf(h) for h in out["h"].split(4096)])


@torch.no_grad()
def evaluate(blocks, routers, tok, context, batch_size, device):
    """Each token leaves at the first block whose confidence clears that block's threshold (routers:
    (classifier or None, threshold) per block but the last, which takes the rest). Exited tokens never
    change again; with `repack` the hard ones reach the next block repacked (context: earlier hard
    tokens only), with `inplace` in their own text (context: every earlier token, exited ones as frozen
    K/V). Per token, in text order: CE and correct? where it left, the block it left at, block 0's CE;
    and who reached each block."""
    n = int((tok.pos >= 0).sum())
    ce, ce0 = torch.zeros(n), torch.zeros(n)
    correct, exit_at = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long)
    reached, block_ce = [], []
    for i, block in enumerate(blocks):
        out = block_outputs(block, tok, batch_size, device)
        reached.append(tok.pos[tok.live])
        block_ce.append(out["ce"][tok.live])
        if i == 0:
            ce0[tok.pos[tok.live]] = out["ce"][tok.live]
        leave = tok.live.clone()
        if i < len(routers):
            leave &= ee.exit_mask(confidence(routers[i][0], out), routers[i][1])
        p = tok.pos[leave]
        ce[p], correct[p], exit_at[p] = out["ce"][leave], out["correct"][leave], i
        tok = advance(tok, out["h"], ~leave, context)
    return {"ce": ce, "ce0": ce0, "correct": correct, "exit_at": exit_at, "reached": reached,
            "block_ce": block_ce}


def figures(r, cfg, block_layers, hard_context):
    """The seed's figures from evaluate(): PPLs, accuracy, shallow ratio, compute savings."""
    L, bl = sum(block_layers), torch.tensor(block_layers)
    layers_run = bl.cumsum(0)[r["exit_at"]].double()
    layer, head, kv = measure.flops_per_token(cfg)  # FLOP view: heads + classifier-free; K/V of exited tokens in place
    kv_paid = (L - layers_run) * kv if hard_context == "inplace" else 0.0
    flops = layers_run * layer + (r["exit_at"] + 1).double() * head + kv_paid
    ppl = lambda ce: math.exp(ce.mean().item()) if len(ce) else float("nan")  # noqa: E731
    return {"final_ppl": ppl(r["ce"]), "accuracy": 100 * r["correct"].float().mean().item(),
            "shallow": 100 * (r["exit_at"] < len(bl) - 1).float().mean().item(),
            "saved": 100 * (1 - layers_run.mean().item() / L),
            "flops_saved": 100 * (1 - flops.mean().item() / (L * layer + head)),
            "block0_ppl": ppl(r["ce0"]), "block_ppl": [ppl(c) for c in r["block_ce"]],
            "block0_on_hard": [ppl(r["ce0"][p]) for p in r["reached"][1:]]}


# ----------------------------------------------------------------------------------------------
# a trained cascade, as exit_classifier.py saves it and as it loads again


def as_module(blocks, classifiers):
    """One module of a cascade's blocks and its exit classifiers ({block index: classifier})."""
    return nn.ModuleDict({"blocks": nn.ModuleList(blocks),
                          "classifiers": nn.ModuleDict({str(i): c for i, c in classifiers.items()})})


def load(path, device="cpu"):
    """{method: (blocks, routers)} and the vocab from a checkpoint exit_classifier.py wrote."""
    ckpt = ck.load_checkpoint(path, device)
    if ckpt.get("kind") != KIND:
        raise ee.EEminiError(f"{path} was not written by exit_classifier.py")
    if ck.diverged(ckpt["model"]):
        raise ee.EEminiError(f"{path} holds NaN or inf weights: its training diverged; train it again")
    cfg, out = ee.GPTConfig(**ckpt["config"]), {}
    for m in ckpt["methods"]:
        bl, thr = ckpt["block_layers"], ckpt["thresholds"][m]
        blocks = [CascadeBlock(cfg, n, embed=i == 0) for i, n in enumerate(bl)]
        clfs = {i: ExitClassifier(cfg.n_embd, ckpt["args"]["exit_hidden"]) for i in range(len(thr))
                if METHODS[m][0] == "classifier"}
        state = {k[len(m) + 1 :]: v for k, v in ckpt["model"].items() if k.startswith(m + ".")}
        as_module(blocks, clfs).load_state_dict(state)
        out[m] = ([b.to(device).eval() for b in blocks], [(clfs.get(i), t) for i, t in enumerate(thr)])
    return out, Vocab(ckpt["vocab"])
