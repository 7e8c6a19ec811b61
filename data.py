"""
Data: character-level WikiText-2 from plain text, its vocabulary, training batches and evaluation windows.

WikiText-2 (Merity et al. 2016, arXiv:1609.07843) comes from the official raw archive, downloaded
once and sha256-checked, or from any folder holding wiki.{train,valid,test}.raw (or .tokens), or
from one text file (cut 90/10 into train and valid). Missing data is an error, never a fallback.
"""

import hashlib
import os
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import torch

from eemini import EEminiError

WIKITEXT_URL = "https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip"
WIKITEXT_SHA256 = "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11"
CACHE_DIR = Path(os.environ.get("EEMINI_CACHE", Path.home() / ".cache" / "eemini"))
UNK = "\ufffd"  # id 0: every character the training text never showed


def download_wikitext(cache_dir=CACHE_DIR):
    """Fetch wikitext-2-raw-v1.zip once, check its sha256, unpack it; returns the split folder."""
    folder = Path(cache_dir) / "wikitext-2-raw"
    if (folder / "wiki.train.raw").exists():
        return folder
    print(f"downloading WikiText-2 (4.7 MB) from {WIKITEXT_URL} into {cache_dir}", flush=True)
    try:
        with urllib.request.urlopen(WIKITEXT_URL, timeout=30) as r:
            blob = r.read()
    except OSError as e:
        raise EEminiError(f"could not download WikiText-2 ({e}); fetch wikitext-2-raw-v1.zip by hand, "
                          f"unzip it and pass --data path/to/wikitext-2-raw") from None
    if hashlib.sha256(blob).hexdigest() != WIKITEXT_SHA256:
        raise EEminiError(f"the download from {WIKITEXT_URL} failed its sha256 check; try again or pass --data")
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:  # unpack beside, then rename: never half a folder
        zip_path = Path(tmp) / "wikitext-2-raw-v1.zip"
        zip_path.write_bytes(blob)
        zipfile.ZipFile(zip_path).extractall(tmp)
        os.replace(Path(tmp) / "wikitext-2-raw", folder)
    return folder


def read_text(path):
    """A file's text, refusing anything that is not UTF-8 (a binary file, or Latin-1 text, would
    otherwise train silently on replacement characters)."""
    blob = Path(path).read_bytes()
    try:
        return blob.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as open() reads
    except UnicodeDecodeError as e:
        raise EEminiError(f"{path} is not UTF-8 text (byte 0x{blob[e.start]:02x} at offset {e.start:,}); convert it "
                          f"(e.g. iconv -f latin1 -t utf-8) or point --data at UTF-8 text") from None


def read_split(data, split):
    """(text, source) of one split ('train', 'valid', 'test') from a WikiText folder or one text file.

    A folder may hold wiki.{split}.raw or .tokens; where it has both, the raw variant is taken for
    every split (mixing them inflates validation PPL: .tokens writes rare words as <unk>).
    A single file is cut 90/10 into train and valid; it has no test split.
    """
    path = Path(data) if data else download_wikitext()
    if path.is_dir():
        raw = all((path / f"wiki.{s}.raw").exists() for s in ("train", "valid"))
        file = path / f"wiki.{split}.{'raw' if raw else 'tokens'}"
        if not file.exists():  # name the file that is missing, of the train and valid pair or of this split
            need = dict.fromkeys(("train", "valid", split))
            lacking = [s for s in need if not any((path / f"wiki.{s}.{v}").exists() for v in ("raw", "tokens"))]
            if not lacking:  # each is there, but .raw beside .tokens
                has = [f"wiki.{s}.{'raw' if (path / f'wiki.{s}.raw').exists() else 'tokens'}" for s in need]
                raise EEminiError(f"{path} has {', '.join(has)}: give these splits in one format, all .raw (or all "
                                  f".tokens)")
            raise EEminiError(f"{path} has no wiki.{lacking[0]}.raw (nor .tokens); --data wants a folder with "
                              f"wiki.{{train,valid,test}}.raw (or .tokens) or a single text file")
        text, source = read_text(file), str(file)
    elif path.is_file():
        if split == "test":
            raise EEminiError(f"{path} is a single text file, which has no test split; use --split valid")
        text = read_text(path)
        cut = int(len(text) * 0.9)
        text, source = (text[:cut], f"{path} [:90%]") if split == "train" else (text[cut:], f"{path} [90%:]")
    else:
        raise EEminiError(f"no data at {path}; pass --data a WikiText-2 folder or a text file "
                          f"(or no --data, to download WikiText-2 once)")
    if not text.strip():
        raise EEminiError(f"the {split} text from {path} is empty; point --data at real text")
    return text, source


class Vocab:
    """Characters of the training text, id 0 reserved for characters it never showed."""

    def __init__(self, itos):
        self.itos = list(itos)
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}

    @classmethod
    def from_text(cls, text):
        return cls([UNK] + sorted(set(text) - {UNK}))

    def encode(self, text):
        return torch.tensor([self.stoi.get(ch, 0) for ch in text], dtype=torch.long)

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids)

    def __len__(self):
        return len(self.itos)


def load_data(data, train_chars=500_000, val_chars=50_000, split="valid", verbose=True):
    """(vocab, train ids, eval ids) for the first train_chars / val_chars characters of each split
    (0 = the whole split)."""
    (train, train_src), (held, held_src) = read_split(data, "train"), read_split(data, split)
    train, held = train[: train_chars or None], held[: val_chars or None]
    vocab = Vocab.from_text(train)
    unseen = sum(ch not in vocab.stoi for ch in held)
    if verbose:
        print(f"data: {len(train):,} chars of {train_src} | {len(held):,} chars of {held_src} | vocab {len(vocab)} "
              f"| {unseen} {split} chars unseen in train -> unknown id", flush=True)
    return vocab, vocab.encode(train), vocab.encode(held)


def held_out(data, train_chars, n, vocab):
    """The n characters of the train split right after the first train_chars (text the model never
    trained on, for what is fitted to a trained model), in its vocabulary; possibly fewer, and none
    when the model trained on the whole split (train_chars 0)."""
    return vocab.encode(read_split(data, "train")[0][train_chars : train_chars + n] if train_chars else "")


def eval_ids(data, split, val_chars, vocab):
    """(ids, source) of the first val_chars characters (0 = all) of a split, in a trained model's
    vocabulary (characters it never saw map to the unknown id), with one line saying so."""
    text, source = read_split(data, split)
    text = text[: val_chars or None]
    print(f"data: {len(text):,} chars of {source} | vocab {len(vocab)} from the checkpoint | "
          f"{sum(ch not in vocab.stoi for ch in text)} chars unseen in training -> unknown id", flush=True)
    return vocab.encode(text), source


def get_batch(data, block_size, batch_size, generator, device):
    """batch_size random windows of data: inputs and next-character targets, (B, T) each."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([data[i : i + block_size] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + block_size] for i in ix])
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def eval_windows(data, block_size, batch_size, stride=0):
    """(x, y) windows of data, batch_size windows at a time. stride 0: windows side by side, every
    character scored, the first of each window with no context at all. A stride s < block_size: windows
    overlapping, moving on by s; only the last s characters of each are scored (each character once,
    every one with at least block_size - s characters of context), the others are marked -100 in y."""
    step = stride or block_size
    n = (len(data) - 1 - block_size) // step + 1 if len(data) > block_size else 0
    if n <= 0:
        raise EEminiError(f"the evaluation text ({len(data)} chars) is shorter than one window of "
                          f"{block_size + 1} (the model's context + 1); use more --val-chars")
    starts = torch.arange(n) * step
    cols = torch.arange(block_size)
    x, y = data[starts[:, None] + cols], data[starts[:, None] + cols + 1]
    if stride:
        y = y.masked_fill(cols < block_size - stride, -100)  # context only
    for i in range(0, n, batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]
