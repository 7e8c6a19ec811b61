"""
Learned routers: CALM's early-exit classifier (Schuster et al. 2022, arXiv:2207.07061). A small head
reads the exit layer's state and the exit's cheap confidences (max softmax, top-2 margin, entropy,
and how little the state moved in the last layer) and says how likely the character may leave.

Four labels, trained side by side, each one router an exit:
  consistency  the exit's top character is the last layer's (CALM's label)
  loss         the exit's CE is within epsilon of the last layer's (the label that fits a PPL goal)
  kl           how much CE leaving here is expected to cost: KL(last layer || exit), the loss
               difference averaged over the character that may come (as the last layer sees it)
               instead of read off the one that came, so a far less noisy target; regressed, not
               classified, and read as the confidence measure.cost_confidence(KL) = exp(-KL / 0.1)
  gain         the realised loss difference CE_exit - CE_last itself, regressed: far noisier than
               the KL, so it needs far more text, but signed: it can learn where the exit is the
               better head, which a KL (never negative) cannot say; read as sigmoid(-gain / 0.1), so
               0.5 where leaving is predicted to cost nothing, and above 0.5 where it is to pay
Routers learn on text the model never trained on (the training split after --train-chars), on the
frozen model, in seconds; they are saved in the checkpoint and used wherever a confidence is.
The gain router is the mean of MEMBERS["gain"] MLPs fitted from different seeds: one MLP fitted to so noisy a
target is as much seed as signal, and from 200,000 characters on the mean of five is much the better router
(bench/router_data.py).
The mean of E MLPs of width H is itself one MLP, E*H wide (merge), so it is stored and run as one (a
router's width is read off its weights).
"""

import time

import torch
import torch.nn as nn
from torch.nn import functional as F

from data import eval_windows, held_out
from eemini import CONFIDENCE, EEminiError, conf_entropy, conf_margin, conf_saturation, conf_softmax
from measure import cost_confidence, kl_divergence

LABELS = ("consistency", "loss", "kl", "gain")
REGRESS = ("kl", "gain")  # the labels regressed (a real target), not classified
FLOOR = 1e-3  # the kl router regresses -log(KL + FLOOR): KLs below a thousandth of a nat all look alike
HIDDEN = 128  # the routers' MLP width
MEMBERS = {"gain": 5}  # MLPs averaged into one router, by label (the others: 1)
GAIN_SCALE = 0.1  # nats: the gain router's confidence goes from 0.27 to 0.73 as its predicted CE_exit - CE_last goes +0.1 .. -0.1


class Router(nn.Module):
    """P(the character may leave here) from the exit's state and confidences: an MLP, then sigmoid.
    A regressing router has a score that regresses -log(KL + FLOOR) (regress "kl") or minus the loss
    difference (regress "gain") instead. The kl router's confidence is measure.cost_confidence of the
    KL it predicts; the gain router's is a logistic of the gain, which keeps the order of characters
    predicted to do better at the exit (a cost clipped at 0 would tie them all at 1.0)."""

    def __init__(self, n_embd, hidden=HIDDEN, regress=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_embd + 4, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.regress = regress

    def score(self, x):  # x: features (N, C + 4)
        return self.net(x).squeeze(-1)

    def read(self, s):
        """The confidence a score stands for."""
        if not self.regress:
            return torch.sigmoid(s)
        if self.regress == "gain":
            return torch.sigmoid(s / GAIN_SCALE)
        return cost_confidence((torch.exp(-s) - FLOOR).clamp(min=0))

    def flops(self):
        """Forward FLOPs a character (2 a multiply-add): its two layers' products, as measure.flops_percent
        charges them at the exit (not the features it reads: a norm and four confidences, a few thousand)."""
        return 2 * sum(lin.in_features * lin.out_features for lin in (self.net[0], self.net[2]))

    def forward(self, logits, h, h_prev):
        return self.read(self.score(features(logits, h, h_prev)))


def features(logits, h, h_prev):
    """What a router reads of a character at an exit, (..., C + 4): the exit's state, RMS-normed, and its
    four cheap confidences. Computed once per character, they are all a router keeps of it while it
    learns (the logits would take 260 numbers a character)."""
    cheap = torch.stack([f(logits, h, h_prev) for f in (conf_softmax, conf_margin, conf_entropy, conf_saturation)], -1)
    return torch.cat([F.rms_norm(h.float(), (h.size(-1),)), cheap], -1)


@torch.no_grad()
def exit_examples(model, ids, batch_size=64, device="cpu"):
    """One pass over ids: per exit, what a router reads of every character there, and what the labels
    are made of. {exit: (features (N, C + 4), same (N,) bool: the exit's top character is the last
    layer's, gain (N,): CE_exit - CE_last, kl (N,): KL(last || exit))}."""
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
            h, h_prev = states[k].flatten(0, 1).float(), states[k - 1].flatten(0, 1).float()
            same = logits.argmax(-1).flatten() == final.argmax(-1).flatten()
            out[k].append((features(logits.flatten(0, 1), h, h_prev), same, ce - ce_final, kl_divergence(final, logits).flatten()))
    return {k: [torch.cat(t) for t in zip(*rows)] for k, rows in out.items()}


def labels(same, gain, kl, epsilon):
    """Each router's target: 0/1 for the two classifiers, -log(KL + FLOOR) and -gain for the regressions."""
    return {"consistency": same.float(), "loss": (gain <= epsilon).float(), "kl": -torch.log(kl + FLOOR),
            "gain": -gain}


def epochs_for(n, at_40k, least):
    """Passes over n examples: at_40k up to the default --router-chars, fewer over more text (about as many
    steps), but never fewer than `least`: a regression on two million characters still gains from 12."""
    return at_40k if n <= 40_000 else max(least, round(at_40k * 40_000 / n))


def fit(router, x, target, epochs=8, batch=1024, lr=3e-3, seed=0):
    """Binary cross-entropy of the router's confidence against a 0/1 target, or for a regressing router
    the squared error of its score against a real one, from features x (N, C + 4); Adam, a few epochs."""
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for i in torch.randperm(len(target), generator=gen).split(batch):
            if router.regress:
                loss = F.mse_loss(router.score(x[i]), target[i])
            else:
                loss = F.binary_cross_entropy(router.read(router.score(x[i])).clamp(1e-6, 1 - 1e-6), target[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return router.eval().requires_grad_(False)


def merge(members):
    """One router whose score is the mean of the members' scores: their hidden units side by side (first
    layers stacked), each member's output weights divided by their number, the mean of their biases."""
    first, last = zip(*[(r.net[0], r.net[2]) for r in members])
    out = Router(first[0].in_features - 4, sum(f.out_features for f in first), members[0].regress)
    with torch.no_grad():
        out.net[0].weight.copy_(torch.cat([f.weight for f in first]))
        out.net[0].bias.copy_(torch.cat([f.bias for f in first]))
        out.net[2].weight.copy_(torch.cat([w.weight for w in last], 1) / len(members))
        out.net[2].bias.copy_(torch.stack([w.bias for w in last]).mean(0))
    return out.to(first[0].weight.device).eval().requires_grad_(False)


def fit_label(label, x, target, n_embd, seed=0, init=None, members=None):
    """The router of one label from features x and its target: MEMBERS[label] MLPs (or `members`), each from its own seeds
    (member m: weights drawn from init + 1000 m, init defaulting to seed; examples shuffled by seed + 1000 m),
    merged into one."""
    regress = label if label in REGRESS else None  # a real target takes longer to fit than a 0/1 one
    epochs = epochs_for(len(target), 30, 12) if regress else epochs_for(len(target), 8, 4)
    fitted = []
    for m in range(members or MEMBERS.get(label, 1)):
        torch.manual_seed((seed if init is None else init) + 1000 * m)
        fitted.append(fit(Router(n_embd, regress=regress).to(x.device), x, target, epochs, seed=seed + 1000 * m))
    return fitted[0] if len(fitted) == 1 else merge(fitted)


def fit_routers(model, ids, epsilon=0.1, device="cpu", seed=0):
    """{label: {exit: Router}} learned from ids (held-out text) on the frozen model."""
    t0 = time.time()
    out = fit_examples(exit_examples(model, ids, device=device), model.config.n_embd, epsilon, seed)
    print(f"routers: {', '.join(LABELS)} at exit {', '.join(map(str, model.config.exits))}, learned from "
          f"{len(ids):,} held-out characters in {time.time() - t0:.1f}s")
    return out


def fit_examples(examples, n_embd, epsilon=0.1, seed=0):
    """{label: {exit: Router}} from exit_examples' {exit: (features, same, gain, kl)}."""
    out = {label: {} for label in LABELS}
    for k, (x, same, gain, kl) in examples.items():
        for label, target in labels(same, gain, kl, epsilon).items():
            out[label][k] = fit_label(label, x, target, n_embd, seed, init=seed + k)
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
    return {"epsilon": epsilon,
            "state": {label: {str(k): r.state_dict() for k, r in by_exit.items()} for label, by_exit in routers.items()}}


def from_checkpoint(ckpt, device="cpu"):
    """{'router-<label>': {exit: Router}} saved in a checkpoint ({} if it has none)."""
    saved, out = ckpt.get("routers"), {}
    for label, by_exit in (saved or {}).get("state", {}).items():
        out[f"router-{label}"] = {}
        for k, state in by_exit.items():
            try:
                width = state["net.0.weight"].shape[0]  # 128, or five times that for a mean of five
                router = Router(ckpt["config"]["n_embd"], width, regress=label if label in REGRESS else None)
                router.load_state_dict(state)
            except (RuntimeError, TypeError, AttributeError, KeyError):
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
