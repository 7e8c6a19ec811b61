"""
Checkpoints: one .pt file holding everything needed to use or resume a model (config with its loss
weights, state dict, vocabulary, training args, step, metrics, optimizer), plain tensors and Python
values only, so `torch.load(..., weights_only=True)` reads it. Every write is atomic.
"""

import contextlib
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from data import Vocab
from eemini import GPT, LOSSES, EEminiError, GPTConfig, layer_weights

FORMAT = "eemini-2"  # eemini-1 (before the loss weights moved into the config) still loads


@contextlib.contextmanager
def atomic_write(path, mode="w", **open_kwargs):
    """Write to a temp file beside path and rename it over path only once all is written, so an
    interrupted write never spoils what was there. Yields the open file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_text(path, text):
    """A text file written atomically."""
    with atomic_write(path, encoding="utf-8") as f:
        f.write(text)


def save_checkpoint(path, model, vocab, **extra):
    """Write config, state dict, vocab and extra (args, step, metrics, optimizer...) atomically."""
    raw = getattr(model, "_orig_mod", model)  # torch.compile wraps; DDP callers pass .module
    ckpt = {"format": FORMAT, "kind": "gpt", "config": asdict(raw.config), "model": raw.state_dict(),
            "vocab": vocab.itos, **extra}  # extra may set another kind (exit_classifier.py's cascades)
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)


def upgrade_v1(ckpt):
    """An eemini-1 checkpoint in today's form: one `exit_layer` becomes the `exits` list, and the
    loss weights, once re-derived from the saved args wherever they were needed, are resolved here
    once and stored in the config (with no known scheme, every head counts as trained)."""
    cfg, args = dict(ckpt["config"]), dict(ckpt.get("args") or {})
    exits = [cfg.pop("exit_layer")] if cfg.get("exit_layer") else []
    cfg.pop("exit_layer", None)
    heads = cfg.pop("head_layers", exits)
    if args.get("loss") in LOSSES:
        weights = layer_weights(args["loss"], cfg["n_layer"], exits, args.get("alpha", 0.5),
                                args.get("layer_weights") or None)
    else:
        weights = {k: 1.0 for k in [*heads, cfg["n_layer"]]}
    if "exit_layer" in args:
        args["exit_layers"] = exits
    return {**ckpt, "format": FORMAT, "config": {**cfg, "exits": exits, "loss_weights": weights}, "args": args}


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict, or one clear EEminiError for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise EEminiError(f"no checkpoint at {path}; train one with `python train.py` (or pass its path)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated zip, a text file, pickled code that weights_only refuses ...
        raise EEminiError(f"{path} is not a readable checkpoint (corrupt, truncated, or not written by "
                          f"eemini: {type(e).__name__}); re-train or re-copy it") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (FORMAT, "eemini-1"):
        raise EEminiError(f"{path} is not an eemini checkpoint (no '{FORMAT}' format tag); "
                          f"pass a file written by train.py")
    return upgrade_v1(ckpt) if ckpt["format"] == "eemini-1" else ckpt


def model_from_checkpoint(ckpt, device="cpu"):
    """(model in eval mode, vocab) from a checkpoint dict."""
    if ckpt.get("kind", "gpt") != "gpt":
        raise EEminiError(f"this is a {ckpt['kind']} checkpoint, not a train.py model; "
                          f"use the script that wrote it (exit_classifier.py for cascades)")
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
        vocab = Vocab(ckpt["vocab"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise EEminiError(f"the checkpoint's model does not match its config ({str(e)[:120]}); "
                          f"it is damaged or from another version") from None
    return model.to(device).eval(), vocab
