"""Shared fixtures: tiny models and tiny text, made on the spot (no network, no downloads)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the top-level scripts

import eemini as ee  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def tiny_text(n=6000, seed=0):
    """Pseudo-English with some regularity, so a model can learn something in a few steps."""
    g = torch.Generator().manual_seed(seed)
    words = ["the ", "cat ", "sat ", "on ", "a ", "mat ", "and ", "dog ", "ran ", "far ", "away. "]
    out = []
    while sum(map(len, out)) < n:
        out.append(words[int(torch.randint(len(words), (1,), generator=g))])
    return "".join(out)[:n]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(tiny_text())
    return path


@pytest.fixture
def wiki_folder(tmp_path):
    """A WikiText-shaped folder of tiny raw splits."""
    folder = tmp_path / "wiki"
    folder.mkdir()
    for split, seed in (("train", 0), ("valid", 1), ("test", 2)):
        (folder / f"wiki.{split}.raw").write_text(tiny_text(6000 if split == "train" else 1500, seed))
    return folder


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=23, block_size=16, n_layer=3, n_head=2, n_embd=16, exit_layer=1)
    cfg.update(kw)
    return ee.GPT(ee.GPTConfig(**cfg)).eval()


TINY_TRAIN = ["--n-layer", "3", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "8",
              "--max-iters", "6", "--eval-interval", "3", "--log-interval", "3", "--warmup-iters", "2",
              "--val-chars", "1000", "--device", "cpu"]
