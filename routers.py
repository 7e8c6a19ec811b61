"""
Learned routers: CALM's early-exit classifier (Schuster et al. 2022, arXiv:2207.07061). A small head
reads the exit layer's state and the exit's cheap confidences (max softmax, top-2 margin, entropy,
and how little the state moved in the last layer) and says how likely the character may leave.

Two labels, trained side by side, each one router an exit:
  consistency  the exit's top character is the last layer's (CALM's label)
  loss         the exit's CE is within epsilon of the last layer's (the label that fits a PPL goal)
Routers learn on text the model never trained on (the training split after --train-chars), on the
frozen model, in seconds; they are saved in the checkpoint and used wherever a confidence is.
"""

import time

import torch
import torch.nn as nn
from torch.nn import functional as F

from data import eval_windows
from eemini import CONFIDENCE, EEminiError, conf_entropy, conf_margin, conf_saturation, conf_softmax

LABELS = ("consistency", "loss")


class Router(nn.Module):
    """P(the character may leave here) from the exit's state and confidences: an MLP, then sigmoid."""

    def __init__(self, n_embd, hidden=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_embd + 4, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, logits, h, h_prev):
        cheap = torch.stack([f(logits, h, h_prev) for f in (conf_softmax, conf_margin, conf_entropy, conf_saturation)], -1)
        x = torch.cat([F.rms_norm(h.float(), (h.size(-1),)), cheap], -1)
        return torch.sigmoid(self.net(x).squeeze(-1))


@torch.no_grad()
def exit_examples(model, ids, batch_size=64, device="cpu"):
    """One pass over ids: per exit, every character's (logits, state, previous state) there, and both
    labels. {exit: (logits (N, V), h (N, C), h_prev (N, C), {label: (N,) 0/1})}."""
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
                           logits.argmax(-1).flatten() == final.argmax(-1).flatten(), ce - ce_final))
    return {k: [torch.cat(t) for t in zip(*rows)] for k, rows in out.items()}


def labels(same, gain, epsilon):
    return {"consistency": same.float(), "loss": (gain <= epsilon).float()}


def fit(router, logits, h, h_prev, target, epochs=8, batch=1024, lr=3e-3, seed=0):
    """Binary cross-entropy of router(...) against target, Adam, a few epochs."""
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for i in torch.randperm(len(target), generator=gen).split(batch):
            loss = F.binary_cross_entropy(router(logits[i], h[i], h_prev[i]).clamp(1e-6, 1 - 1e-6), target[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return router.eval().requires_grad_(False)


def fit_routers(model, ids, epsilon=0.1, device="cpu", seed=0):
    """{label: {exit: Router}} learned from ids (held-out text) on the frozen model."""
    t0, out = time.time(), {label: {} for label in LABELS}
    for k, (logits, h, h_prev, same, gain) in exit_examples(model, ids, device=device).items():
        for label, target in labels(same, gain, epsilon).items():
            torch.manual_seed(seed + k)
            out[label][k] = fit(Router(model.config.n_embd).to(h.device), logits, h, h_prev, target, seed=seed)
    print(f"routers: {', '.join(LABELS)} at exit {', '.join(map(str, model.config.exits))}, learned from "
          f"{len(ids):,} held-out characters in {time.time() - t0:.1f}s")
    return out


def to_checkpoint(routers, epsilon):
    """The routers as plain tensors, for the checkpoint."""
    return {"epsilon": epsilon, "hidden": 64,
            "state": {label: {str(k): r.state_dict() for k, r in by_exit.items()} for label, by_exit in routers.items()}}


def from_checkpoint(ckpt, device="cpu"):
    """{'router-<label>': {exit: Router}} saved in a checkpoint ({} if it has none)."""
    saved, out = ckpt.get("routers"), {}
    for label, by_exit in (saved or {}).get("state", {}).items():
        out[f"router-{label}"] = {}
        for k, state in by_exit.items():
            router = Router(ckpt["config"]["n_embd"], saved["hidden"])
            router.load_state_dict(state)
            out[f"router-{label}"][int(k)] = router.to(device).eval().requires_grad_(False)
    return out


def resolve(name, routers):
    """A --confidence name as forward_exit takes it: a built-in measure's name, or the checkpoint's
    learned router {exit: Router} of that name."""
    if name in CONFIDENCE or name in routers:
        return routers.get(name, name)
    raise EEminiError(f"no confidence measure {name!r} here; choose from {', '.join([*CONFIDENCE, *routers])}"
                      + ("" if routers else " (this checkpoint has no learned routers)"))
