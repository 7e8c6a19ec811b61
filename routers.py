"""
Learned routers: CALM's early-exit classifier (Schuster et al. 2022, arXiv:2207.07061). A small head
reads the exit layer's state and the exit's cheap confidences (max softmax, top-2 margin, entropy,
and how little the state moved in the last layer) and says how likely the character may leave.

Three labels, trained side by side, each one router an exit:
  consistency  the exit's top character is the last layer's (CALM's label)
  loss         the exit's CE is within epsilon of the last layer's (the label that fits a PPL goal)
  kl           how much CE leaving here is expected to cost: KL(last layer || exit), the loss
               difference averaged over the character that may come (as the last layer sees it)
               instead of read off the one that came, so a far less noisy target; regressed, not
               classified, and read as the confidence measure.cost_confidence(KL) = exp(-KL / 0.1)
Routers learn on text the model never trained on (the training split after --train-chars), on the
frozen model, in seconds; they are saved in the checkpoint and used wherever a confidence is.
"""

import time

import torch
import torch.nn as nn
from torch.nn import functional as F

from data import eval_windows, held_out
from eemini import CONFIDENCE, EEminiError, conf_entropy, conf_margin, conf_saturation, conf_softmax
from measure import cost_confidence, kl_divergence

LABELS = ("consistency", "loss", "kl")
FLOOR = 1e-3  # the kl router regresses -log(KL + FLOOR): KLs below a thousandth of a nat all look alike
HIDDEN = 128  # the routers' MLP width


class Router(nn.Module):
    """P(the character may leave here) from the exit's state and confidences: an MLP, then sigmoid.
    A regressing router (the kl router) has a score that regresses -log(KL + FLOOR) instead, and its
    confidence is measure.cost_confidence of the KL it predicts."""

    def __init__(self, n_embd, hidden=HIDDEN, regress=False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_embd + 4, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.regress = regress

    def score(self, logits, h, h_prev):
        cheap = torch.stack([f(logits, h, h_prev) for f in (conf_softmax, conf_margin, conf_entropy, conf_saturation)], -1)
        x = torch.cat([F.rms_norm(h.float(), (h.size(-1),)), cheap], -1)
        return self.net(x).squeeze(-1)

    def forward(self, logits, h, h_prev):
        s = self.score(logits, h, h_prev)
        if not self.regress:
            return torch.sigmoid(s)
        return cost_confidence((torch.exp(-s) - FLOOR).clamp(min=0))


@torch.no_grad()
def exit_examples(model, ids, batch_size=64, device="cpu"):
    """One pass over ids: per exit, every character's (logits, state, previous state) there, and what
    the labels are made of. {exit: (logits (N, V), h (N, C), h_prev (N, C), same (N,) bool: the exit's
    top character is the last layer's, gain (N,): CE_exit - CE_last, kl (N,): KL(last || exit))}."""
    model.eval()
    cfg, out = model.config, {k: [] for k in model.config.exits}
    for x, y in eval_windows(ids, cfg.block_size, batch_size):
        x, y = x.to(device), y.to(device)
        states = model.states(x)
        final = model.head(cfg.n_layer, states[cfg.n_layer]).float()
        ce_final = F.cross_entropy(final.flatten(0, 1), y.flatten(), reduction="none")
        for k in cfg.exits:
            logits = model.head(k, states[k]).float()
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
            out[k].append((logits.flatten(0, 1), states[k].flatten(0, 1).float(), states[k - 1].flatten(0, 1).float(),
                           logits.argmax(-1).flatten() == final.argmax(-1).flatten(), ce - ce_final,
                           kl_divergence(final, logits).flatten()))
    return {k: [torch.cat(t) for t in zip(*rows)] for k, rows in out.items()}


def labels(same, gain, kl, epsilon):
    """Each router's target: 0/1 for the two classifiers, -log(KL + FLOOR) for the kl regression."""
    return {"consistency": same.float(), "loss": (gain <= epsilon).float(), "kl": -torch.log(kl + FLOOR)}


def fit(router, logits, h, h_prev, target, epochs=8, batch=1024, lr=3e-3, seed=0):
    """Binary cross-entropy of router(...) against a 0/1 target, or for a regressing router the squared
    error of its score against a real one; Adam, a few epochs."""
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for i in torch.randperm(len(target), generator=gen).split(batch):
            if router.regress:
                loss = F.mse_loss(router.score(logits[i], h[i], h_prev[i]), target[i])
            else:
                loss = F.binary_cross_entropy(router(logits[i], h[i], h_prev[i]).clamp(1e-6, 1 - 1e-6), target[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return router.eval().requires_grad_(False)


def fit_routers(model, ids, epsilon=0.1, device="cpu", seed=0):
    """{label: {exit: Router}} learned from ids (held-out text) on the frozen model."""
    t0, out = time.time(), {label: {} for label in LABELS}
    for k, (logits, h, h_prev, same, gain, kl) in exit_examples(model, ids, device=device).items():
        for label, target in labels(same, gain, kl, epsilon).items():
            torch.manual_seed(seed + k)
            regress = label == "kl"  # a real target: it takes longer to fit than a 0/1 one
            router = Router(model.config.n_embd, regress=regress).to(h.device)
            out[label][k] = fit(router, logits, h, h_prev, target, epochs=30 if regress else 8, seed=seed)
    print(f"routers: {', '.join(LABELS)} at exit {', '.join(map(str, model.config.exits))}, learned from "
          f"{len(ids):,} held-out characters in {time.time() - t0:.1f}s")
    return out


def fit_held_out(model, data, train_chars, chars, vocab, epsilon=0.1, device="cpu"):
    """fit_routers on `chars` characters of the train split past the first train_chars, which the model
    never trained on, as to_checkpoint stores them; None, with a line saying why, if there are too few."""
    ids = held_out(data, train_chars, chars, vocab)
    if len(ids) <= 4 * (model.config.block_size + 1):
        print(f"routers: skipped, only {len(ids):,} training characters after --train-chars {train_chars:,} "
              f"(use a smaller --train-chars, or --router-chars 0 to say so)")
        return None
    if len(ids) < chars:
        print(f"routers: only {len(ids):,} of the {chars:,} --router-chars are left in the train split after "
              f"--train-chars {train_chars:,}; they learn from those")
    return to_checkpoint(fit_routers(model, ids, epsilon, device), epsilon)


def to_checkpoint(routers, epsilon):
    """The routers as plain tensors, for the checkpoint."""
    return {"epsilon": epsilon, "hidden": HIDDEN,
            "state": {label: {str(k): r.state_dict() for k, r in by_exit.items()} for label, by_exit in routers.items()}}


def from_checkpoint(ckpt, device="cpu"):
    """{'router-<label>': {exit: Router}} saved in a checkpoint ({} if it has none)."""
    saved, out = ckpt.get("routers"), {}
    for label, by_exit in (saved or {}).get("state", {}).items():
        out[f"router-{label}"] = {}
        for k, state in by_exit.items():
            router = Router(ckpt["config"]["n_embd"], saved["hidden"], regress=label == "kl")
            try:
                router.load_state_dict(state)
            except (RuntimeError, TypeError, AttributeError):
                raise EEminiError(f"{ckpt.get('path', 'the checkpoint')}: its router-{label} at exit {k} does not fit "
                                  f"its model; the checkpoint is damaged, re-train it") from None
            out[f"router-{label}"][int(k)] = router.to(device).eval().requires_grad_(False)
    return out


def resolve(name, routers):
    """A --confidence name as forward_exit takes it: a built-in measure's name, or the checkpoint's
    learned router {exit: Router} of that name."""
    if name in CONFIDENCE or name in routers:
        return routers.get(name, name)
    raise EEminiError(f"no confidence measure {name!r} here; choose from {', '.join([*CONFIDENCE, *routers])}"
                      + ("" if routers else " (this checkpoint has no learned routers)"))
