"""sample.py: generation coloured by depth, its statistics line, and what it refuses.

Run: python -m pytest tests/test_sample.py -q
"""

import pytest

import sample
import train
from conftest import TINY_TRAIN, cli_error, flag_error


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from conftest import tiny_text

    tmp = tmp_path_factory.mktemp("sample")
    (tmp / "tiny.txt").write_text(tiny_text())
    for loss in ("asym", "final"):
        train.main(train.parse_args(["--data", str(tmp / "tiny.txt"), "--out", str(tmp / f"{loss}.pt"),
                                     "--loss", loss, *TINY_TRAIN]))
    train.main(train.parse_args(["--data", str(tmp / "tiny.txt"), "--out", str(tmp / "plain.pt"), "--loss", "final",
                                 "--exit-layers", "0", *TINY_TRAIN]))  # no exit at all
    return tmp


def test_colours_by_depth(ckpts, capsys):
    capsys.readouterr()
    argv = [str(ckpts / "asym.pt"), "--prompt", "the ", "--max-new-tokens", "40", "--color", "always"]
    sample.main(sample.parse_args([*argv, "--threshold", "0.0"]))
    printed = capsys.readouterr().out
    assert printed.count(sample.SHALLOW) == 40 + 1  # threshold 0: every character exits (+ legend)
    assert "exited at layer 1: 100.0%" in printed and "Compute 33.3%" in printed
    sample.main(sample.parse_args([*argv, "--threshold", "1.0"]))
    printed = capsys.readouterr().out
    assert sample.SHALLOW not in printed.split("-" * 60)[0] and "exited at layer 1: 0.0%" in printed


def test_refuses_an_untrained_exit_head(ckpts):
    msg = cli_error(sample.main, sample.parse_args, [str(ckpts / "final.pt"), "--threshold", "0.5", "--max-new-tokens", "5"])
    assert "the head of exit 1 was never trained; give it threshold 1.0" in msg
    sample.main(sample.parse_args([str(ckpts / "final.pt"), "--threshold", "1.0", "--max-new-tokens", "5"]))
    for name in ("final", "plain"):  # nothing to draft with; a model without exits generates at any threshold
        msg = cli_error(sample.main, sample.parse_args, [str(ckpts / f"{name}.pt"), "--speculative", "2", "--max-new-tokens", "5"])
        assert msg.endswith("has no trained exit to draft with; drop --speculative")
    sample.main(sample.parse_args([str(ckpts / "plain.pt"), "--max-new-tokens", "5"]))


def test_an_untrained_exit_at_threshold_one_does_not_stop_the_others(tmp_path, capsys):
    """Exits 1 and 2 with only exit 2 in the loss: exit 1 at threshold 1.0 is never read, so routing
    through exit 2 alone is allowed; exit 1 below 1.0 is refused."""
    (tmp_path / "tiny.txt").write_text(__import__("conftest").tiny_text())
    out = tmp_path / "two.pt"
    train.main(train.parse_args(["--data", str(tmp_path / "tiny.txt"), "--out", str(out), *TINY_TRAIN,
                                 "--n-layer", "4", "--exit-layers", "1,2", "--layer-weights", "0,0.5,0,0.5"]))
    capsys.readouterr()
    sample.main(sample.parse_args([str(out), "--threshold", "1,0", "--max-new-tokens", "20", "--color", "never"]))
    assert "exited at layer 1: 0.0%, at layer 2: 100.0%" in capsys.readouterr().out
    msg = cli_error(sample.main, sample.parse_args, [str(out), "--threshold", "0.5,1", "--max-new-tokens", "5"])
    assert "the head of exit 1 was never trained" in msg
    sample.main(sample.parse_args([str(out), "--speculative", "3", "--temperature", "0", "--max-new-tokens", "20"]))
    assert "by the exit after layer 2:" in capsys.readouterr().out  # the first trained exit; thresholds play no part
    msg = cli_error(sample.main, sample.parse_args, [str(out), "--speculative", "3", "--draft-exit", "1", "--max-new-tokens", "5"])
    assert msg.endswith("the head of exit 1 was never trained; draft with --draft-exit 2")


@pytest.mark.parametrize("argv, match", [
    (["--threshold", "2"], "threshold 2 is outside [0, 1]"),
    (["--prompt", ""], "--prompt is empty"),
    (["--top-k", "-1"], "argument --top-k: -1 is outside"),
    (["--threshold", ""], "--threshold is empty"),
    (["--speculative", "4", "--threshold", "0.3"], "--threshold routes early exit; --speculative K writes the full"),
    (["--speculative", "4", "--confidence", "router-kl", "--threshold", "1"], "--threshold and --confidence route"),
    (["--draft-stop", "0.5"], "--draft-stop tunes the drafts of --speculative K; give --speculative too"),
    (["--speculative", "4", "--draft-stop", "1.5"], "argument --draft-stop: 1.5 is outside"),
])
def test_bad_flags_give_one_line(argv, match, capsys):
    assert match in flag_error(sample.parse_args, ["ckpt.pt", *argv], capsys)


def test_speculative_gives_the_full_models_greedy_text(ckpts, capsys):
    capsys.readouterr()
    argv = [str(ckpts / "asym.pt"), "--prompt", "the ", "--max-new-tokens", "60", "--temperature", "0", "--color", "never"]
    sample.main(sample.parse_args([*argv, "--threshold", "1.0"]))
    full = capsys.readouterr().out.split("-" * 60)[0]
    sample.main(sample.parse_args([*argv, "--speculative", "3"]))
    printed = capsys.readouterr().out
    assert printed.split("-" * 60)[0] == full and "accepted" in printed and "characters a full-model pass" in printed
    sample.main(sample.parse_args([*argv, "--speculative", "40"]))  # drafts longer than the context of 16: cut to fit
    assert capsys.readouterr().out.split("-" * 60)[0] == full
    sample.main(sample.parse_args([*argv, "--speculative", "6"]))
    always = capsys.readouterr().out.split(" accepted, ")[1]
    sample.main(sample.parse_args([*argv, "--speculative", "6", "--draft-stop", "0.5"]))
    printed = capsys.readouterr().out
    assert printed.split("-" * 60)[0] == full and "drafts of up to 6 (stop 0.5) by the exit" in printed
    assert printed.split(" accepted, ")[1] != always  # the stop reached the decoder: fewer characters a pass


def test_one_threshold_per_exit(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text(__import__("conftest").tiny_text())
    out = tmp_path / "two.pt"
    train.main(train.parse_args(["--data", str(tmp_path / "tiny.txt"), "--out", str(out), *TINY_TRAIN,
                                 "--n-layer", "4", "--exit-layers", "1,2"]))
    capsys.readouterr()
    sample.main(sample.parse_args([str(out), "--threshold", "0,1", "--max-new-tokens", "20", "--color", "never"]))
    assert "exited at layer 1: 100.0%, at layer 2: 0.0%" in capsys.readouterr().out
    sample.main(sample.parse_args([str(out), "--threshold", "1,0", "--max-new-tokens", "20", "--color", "never"]))
    assert "exited at layer 1: 0.0%, at layer 2: 100.0%" in capsys.readouterr().out
    msg = cli_error(sample.main, sample.parse_args, [str(out), "--threshold", "0.5,0.5,0.5"])
    assert "one for each of the exits [1, 2]" in msg


def test_a_draft_exit_without_speculative_decoding_is_refused(capsys):
    assert "give --speculative too" in flag_error(sample.parse_args, ["ckpt.pt", "--draft-exit", "2"], capsys)
