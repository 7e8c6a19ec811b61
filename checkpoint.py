"""
Checkpoints: one .pt file holding everything needed to use or resume a model (config with its loss
weights, state dict, vocabulary, training args, step, metrics, optimizer), plain tensors and Python
values only, so `torch.load(..., weights_only=True)` reads it. Every write is atomic. A run resumes
from one with the args it was trained with and its optimizer states.
"""

import contextlib
import hashlib
import os
import re
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch

from data import Vocab, eval_ids
from eemini import GPT, LOSSES, EEminiError, GPTConfig, layer_weights

FORMAT = "eemini-2"  # eemini-1 (before the loss weights moved into the config) still loads


@contextlib.contextmanager
def atomic_write(path, mode="w", **open_kwargs):
    """Write to a temp file beside path and rename it over path only once all is written, so an
    interrupted write never spoils what was there. Yields the open file."""
    path = Path(path)
    make_folder(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")  # ckpt.pt.k3j4h5q8.tmp
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


def make_folder(folder):
    """The folder a file goes into, made if missing (and said so: a mistyped path shows at once); one
    line if it cannot be made or written in (read-only, a file there)."""
    folder = Path(folder)
    if not folder.is_dir():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EEminiError(f"cannot make the folder {folder} ({e.strerror}); write somewhere else") from None
        print(f"made the folder {folder}", flush=True)
    try:  # a folder one may not write in fails here, before any work, not at the first save
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise EEminiError(f"cannot write in the folder {folder} ({e.strerror}); write somewhere else") from None


@contextlib.contextmanager
def exclusive(path, who="train.py"):
    """Hold path's lock file (path + '.lock') for as long as the block runs, so that a second process
    writing the same checkpoint is refused at once instead of silently replacing the first one's
    work. The lock is the operating system's (flock): it goes with the process, however that ends.
    Temp files a killed save left beside path are removed (no writer can be using them now)."""
    path, lock = Path(path), Path(f"{path}.lock")
    make_folder(path.parent)
    try:
        import fcntl
    except ImportError:  # not on this system (Windows): no lock, as before
        yield
        return
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not lock.exists() or lock.stat().st_ino != os.fstat(f.fileno()).st_ino:
                raise OSError("the lock file was replaced while we opened it")  # its holder just finished
        except OSError:
            f.seek(0)
            raise EEminiError(f"another {who} (pid {f.read().strip() or '?'}) is writing {path}; wait for it to "
                              f"finish or pass another --out") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            remove_stale_temps(path)
            yield
        finally:
            lock.unlink(missing_ok=True)  # still holding it: whoever opened this file meanwhile sees it replaced


def refuse_folder(path, flag, example):
    """Refuse, before any work, an output path that is a folder."""
    if Path(path).is_dir():
        raise EEminiError(f"{flag} {path} is a folder; give a file, e.g. {flag} {Path(path) / example}")


def refuse_existing(path, overwrite, also=""):
    """A trained model is never replaced by accident: an existing path needs --overwrite (or `also`),
    and --overwrite replaces only a file torch.save wrote (a zip holding a data.pkl), never notes.txt."""
    if Path(path).exists() and not saved_by_torch(path):
        raise EEminiError(f"{path} is there and is no checkpoint (another kind of file, or a damaged one), so it is "
                          f"not ours to replace, not even with --overwrite; pass another --out, or remove {path} yourself")
    if Path(path).exists() and not overwrite:
        raise EEminiError(f"{path} already exists; {also}--out NEW.pt to keep it, or --overwrite to replace it")


def saved_by_torch(path):
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("/data.pkl") for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def check_output(path, flag, suffix):
    """Refuse, before any work, an output file that is a folder, not named for what is written in it
    (so a checkpoint, a script or the README is never replaced by a slip of the hand), or in a folder
    that cannot be made."""
    p = Path(path)
    refuse_folder(p, flag, "out" + suffix)
    if p.suffix.lower() != suffix:
        raise EEminiError(f"{flag} {path}: give a file ending in {suffix}, the kind it writes (only such a file "
                          f"is ever replaced)")
    make_folder(p.parent)


def remove_stale_temps(path):
    """Delete the temp files an interrupted save of path left behind (path.XXXXXXXX.tmp, and the
    pathXXXXXXXX.tmp of earlier versions); say how many and how large."""
    pattern = re.compile(re.escape(path.name) + r"\.?[a-z0-9_]{8}\.tmp")
    stale = [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]
    if stale:
        size = sum(p.stat().st_size for p in stale) / 1e6
        for p in stale:
            p.unlink()
        print(f"removed {len(stale)} temp file{'s' * (len(stale) > 1)} ({size:.1f} MB) left by an interrupted save "
              f"of {path}")


def write_text(path, text):
    """A text file written atomically."""
    with atomic_write(path, encoding="utf-8") as f:
        f.write(text)


def diverged(state):
    """Whether a state dict holds a NaN or inf weight: what a training that diverged leaves."""
    return not all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def digest(state):
    """SHA-256 of a state dict's names, dtypes, shapes and bytes: saved beside the weights, it tells a
    bit that changed on disk or in a copy, which torch.load reads without a word."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path, model, vocab, **extra):
    """Write config, state dict, vocab and extra (args, step, metrics, optimizer...) atomically; never
    weights with a NaN or inf, which would replace a good file with a useless one."""
    raw = getattr(model, "_orig_mod", model)  # torch.compile wraps; DDP callers pass .module
    state = raw.state_dict()
    if diverged(state):
        raise EEminiError(f"training diverged (its weights hold NaN or inf), so {path} was not written; a file "
                          f"already there is kept as it was. Train again with a lower --lr (and --muon-lr)")
    ckpt = {"format": FORMAT, "kind": "gpt", "config": asdict(raw.config), "model": state, "checksum": digest(state),
            "vocab": vocab.itos, **extra}  # extra may set another kind (exit_classifier.py's cascades)
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)


def upgrade_v1(ckpt):
    """An eemini-1 checkpoint in today's form: one `exit_layer` becomes the `exits` list; the loss
    weights, once re-derived from the saved args wherever they were needed, are resolved here once
    and stored in the config (with no known scheme, every head counts as trained); and the block is
    the GPT-2 layout it was trained with."""
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
    gpt2 = {"pos": "learned", "norm": "layer", "mlp": "gelu", "qk_norm": False, "exit_dropout": 0.0}  # all there was
    return {**ckpt, "format": FORMAT, "config": {**cfg, **gpt2, "exits": exits, "loss_weights": weights},
            "args": {**args, **gpt2, "optimizer": "adamw"}}


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict, or one clear EEminiError for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise EEminiError(f"no checkpoint at {path}; train one with `python train.py` (or pass its path)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # a truncated zip, a text file, pickled code that weights_only refuses ...
        raise EEminiError(f"{path} is not a readable checkpoint (corrupt, truncated, or not written by "
                          f"eemini); re-train or re-copy it") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (FORMAT, "eemini-1"):
        raise EEminiError(f"{path} is not an eemini checkpoint (no '{FORMAT}' format tag); "
                          f"pass a file written by train.py")
    missing = [k for k in ("config", "model", "vocab") if not isinstance(ckpt.get(k), (dict, list))]
    missing += [k for k in ("args", "routers") if not isinstance(ckpt.get(k) or {}, dict)]
    if missing:
        raise EEminiError(f"{path} has no '{missing[0]}' as eemini writes it: it is damaged or was not written by "
                          f"eemini; re-train it")
    tensors = isinstance(ckpt["model"], dict) and all(isinstance(t, torch.Tensor) for t in ckpt["model"].values())
    if "checksum" in ckpt and tensors and ckpt["checksum"] != digest(ckpt["model"]):  # older files have none
        raise EEminiError(f"{path} is damaged: its weights do not match the checksum saved with them (a bit changed "
                          f"on disk or in a copy); re-copy it from where it came, or re-train it")
    try:
        ckpt = upgrade_v1(ckpt) if ckpt["format"] == "eemini-1" else ckpt
    except (KeyError, TypeError, ValueError) as e:
        raise EEminiError(f"{path}: an eemini-1 checkpoint without what it should hold ({e!r}); it is damaged, "
                          f"re-train it") from None
    return {**ckpt, "path": str(path)}


def load_weights(module, state, path):
    """module.load_state_dict(state), with a mismatch told in one line: the first tensor that differs."""
    mine = module.state_dict()
    for name in [*mine, *state]:
        if name not in mine or name not in state:
            where = "the file" if name in state else "its config"
            raise EEminiError(f"{path}: {name} is only in {where}; the checkpoint is damaged or from another version")
        if not isinstance(state[name], torch.Tensor):
            raise EEminiError(f"{path}: {name} is no tensor in the file; the checkpoint is damaged")
        if mine[name].shape != state[name].shape:
            raise EEminiError(f"{path}: {name} is {list(state[name].shape)} in the file, {list(mine[name].shape)} in "
                              f"its config; the checkpoint is damaged or from another version")
    module.load_state_dict(state)


def model_from_checkpoint(ckpt, device="cpu"):
    """(model in eval mode, vocab) from a checkpoint dict."""
    path = ckpt.get("path", "the checkpoint")
    if ckpt.get("kind", "gpt") != "gpt":
        raise EEminiError(f"{path} is a {ckpt['kind']} checkpoint (exit_classifier.py writes cascades), not a "
                          f"train.py model; pass a checkpoint that train.py wrote")
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
    except (TypeError, EEminiError) as e:
        raise EEminiError(f"{path}: its config does not describe a model ({e}); it is damaged or from another "
                          f"version") from None
    load_weights(model, ckpt["model"], path)
    if diverged(ckpt["model"]):
        raise EEminiError(f"{path} holds NaN or inf weights: its training diverged; train again with a lower --lr "
                          f"(and --muon-lr)")
    if not isinstance(ckpt["vocab"], list) or not all(isinstance(c, str) and len(c) == 1 for c in ckpt["vocab"]):
        raise EEminiError(f"{path}: its vocabulary is not a list of characters; the checkpoint is damaged")
    if len(ckpt["vocab"]) != model.config.vocab_size:
        raise EEminiError(f"{path}: a vocabulary of {len(ckpt['vocab'])} characters for an embedding of "
                          f"{model.config.vocab_size}; the checkpoint is damaged")
    return model.to(device).eval(), Vocab(ckpt["vocab"])


def load_with_exit(path, device="cpu", why=" to benchmark"):
    """(ckpt, model, vocab) of a checkpoint whose model has a trained exit; one line refuses any other
    ("<path> has no trained exit" + why)."""
    ckpt = load_checkpoint(path, device)
    model, vocab = model_from_checkpoint(ckpt, device)
    if not model.config.trained_exits:
        raise EEminiError(f"{path} has no trained exit{why}")
    return ckpt, model, vocab


def eval_text(args, ckpt, vocab):
    """The text a script evaluates a checkpoint on: --data and --val-chars where given, else what the
    checkpoint was trained with; --split. Returns (ids, source) as data.eval_ids does."""
    trained = ckpt.get("args") or {}
    data = args.data if args.data is not None else trained.get("data", "")
    chars = args.val_chars if args.val_chars is not None else trained.get("val_chars", 50_000)
    return eval_ids(data, args.split, chars, vocab)


def resume_point(args, keep, may_change=()):
    """The checkpoint at args.out and the args to go on with: those it was trained with, except the
    flags named in `keep` (how long, where, on what), which this command line gives, and those in
    may_change where it gives them (args.given); any other flag it gives that differs from the
    checkpoint's is refused, not ignored. The learning-rate schedule keeps its end unless
    args.restart_schedule stretches it to max_iters."""
    ckpt = load_checkpoint(args.out)
    model_from_checkpoint(ckpt)  # a damaged file is refused here, in one line
    if "optimizer" not in ckpt:
        raise EEminiError(f"{args.out} holds no optimizer state, so it cannot be resumed")
    if isinstance(ckpt["optimizer"], dict):  # eemini-1: one AdamW
        ckpt["optimizer"] = [ckpt["optimizer"]]
    given, config = getattr(args, "given", ()), ckpt["config"]
    # a model flag newer than the checkpoint (not in its args) has the value its config says, or had the default
    old = {**{k: config.get(k, getattr(GPTConfig, k)) for k in vars(args) if hasattr(GPTConfig, k)}, **ckpt["args"]}
    clash = [k for k in given if k not in (*keep, *may_change) and k in old and getattr(args, k) != old[k]]
    if clash:
        def typed(v):  # as one would type it: 1,2 for a list
            return ",".join(map(str, v)) if isinstance(v, list) else v
        raise EEminiError(f"--resume goes on with {args.out}'s own settings, and " + ", ".join(
            f"--{k.replace('_', '-')} {typed(getattr(args, k))} (it has {typed(old[k])})" for k in clash)
            + " would be ignored: drop them, or train a new model with --out NEW.pt")
    merged = {**{k: v for k, v in vars(args).items() if k != "given"}, "schedule_iters": old.get("max_iters"), **old,
              **{k: getattr(args, k) for k in (*keep, *(k for k in may_change if k in given))}}
    if args.restart_schedule:
        merged["schedule_iters"] = args.max_iters
    return ckpt, type(args)(**merged)


def restore(model, optimizers, ckpt, path):
    """Weights and optimizer states from a checkpoint, in place; returns its step, best val and history."""
    load_weights(model, ckpt["model"], path)
    for opt, state in zip(optimizers, ckpt["optimizer"], strict=True):
        opt.load_state_dict(state)
    return ckpt["step"], ckpt["best_val"], ckpt.get("history", [])
