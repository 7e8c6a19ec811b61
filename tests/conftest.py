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
    """A tiny random GPT (3 layers, exit after layer 1 unless kw says otherwise), in eval mode."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=23, block_size=16, n_layer=3, n_head=2, n_embd=16, exits=[1])
    cfg.update(kw)
    return ee.GPT(ee.GPTConfig(**cfg)).eval()


def mid_threshold(model, x, exit_layer=None):
    """The median exit confidence on x: a threshold at which about half the tokens exit."""
    exit_logits = model.forward_all_layers(x)[exit_layer or model.config.exits[0]]
    return ee.conf_softmax(exit_logits).median().item()


TINY_TRAIN = ["--n-layer", "3", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "8",
              "--max-iters", "6", "--eval-interval", "3", "--log-interval", "3", "--warmup-iters", "2",
              "--val-chars", "1000", "--device", "cpu"]


def cli_error(main, parse_args, argv):
    """The one-line message a script prints for bad input (SystemExit, never a traceback)."""
    import cli

    with pytest.raises(SystemExit) as e:
        cli.run_cli(main, lambda: parse_args(argv))
    msg = str(e.value.code)
    assert msg.startswith("error:") and "\n" not in msg, msg
    return msg


def flag_error(parse_args, argv, capsys):
    """The one line argparse prints for a bad flag (exit code 2)."""
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err
