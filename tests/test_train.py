"""train.py end to end, checkpoints, resume, and the one-line errors for bad input.

Run: python -m pytest tests/test_train.py -q
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint as ck
import eemini as ee
import train
from conftest import TINY_TRAIN, cli_error, flag_error, tiny_text

ROOT = Path(__file__).resolve().parents[1]


def run_train(*argv):
    return train.main(train.parse_args(list(argv)))


def test_tiny_end_to_end_run(text_file, tmp_path, capsys):
    out = tmp_path / "ckpt.pt"
    model = run_train("--data", str(text_file), "--out", str(out), *TINY_TRAIN)
    printed = capsys.readouterr().out
    assert "## Results" in printed and "## Threshold Analysis" in printed and "| 0.95 |" in printed
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["step"] == 6 and ckpt["args"]["loss"] == "asym" and "optimizer" in ckpt
    assert set(ckpt["metrics"]["val_ppl"]) == {"1", "3"}
    # the table's full-depth row is the last layer's PPL, the exit-only row the exit head's
    assert ckpt["metrics"]["full"]["ppl"] == pytest.approx(ckpt["metrics"]["val_ppl"]["3"], rel=1e-5)
    assert ckpt["metrics"]["exit_only"]["ppl"] == pytest.approx(ckpt["metrics"]["val_ppl"]["1"], rel=1e-5)
    assert ckpt["metrics"]["exit_only"]["compute"] == pytest.approx(100 / 3)
    assert isinstance(model, ee.GPT)


def test_wiki_folder_and_layer_weights(wiki_folder, tmp_path, capsys):
    out = tmp_path / "ckpt.pt"
    args = [*TINY_TRAIN, "--n-layer", "4", "--exit-layers", "2", "--layer-weights", "0,0.7,0,0.3"]
    model = run_train("--data", str(wiki_folder), "--out", str(out), *args)
    assert model.config.head_layers == [2]  # no head where the weight is 0
    assert ck.load_checkpoint(out)["config"]["loss_weights"] == {2: 0.7, 4: 0.3}  # resolved, stored
    assert "wiki.valid.raw" in capsys.readouterr().out


def test_plain_one_layer_model(text_file, tmp_path, capsys):
    """Seed 000's 'Standard 1L': one layer, no exit point, loss on the last layer only."""
    out = tmp_path / "l1.pt"
    model = run_train("--data", str(text_file), "--out", str(out), *TINY_TRAIN, "--n-layer", "1",
                      "--exit-layers", "0", "--loss", "final")
    printed = capsys.readouterr().out
    assert "| Full depth (1L) |" in printed and "Exit only" not in printed and "Threshold Analysis" not in printed
    assert model.config.exits == [] and list(model.exit_heads) == []


def test_resume_continues_exactly_where_it_stopped(text_file, tmp_path):
    """6 steps, then resume to 10 == 10 steps straight: same weights, no replayed batches, the same
    dropout masks, and training mode back on after each evaluation. (A constant learning rate,
    since the cosine's length depends on --max-iters.)"""
    base = ["--data", str(text_file), *TINY_TRAIN, "--eval-interval", "3", "--warmup-iters", "0",
            "--lr", "1e-3", "--min-lr", "1e-3", "--dropout", "0.1"]
    run_train(*base, "--out", str(tmp_path / "a.pt"), "--max-iters", "10")
    run_train(*base, "--out", str(tmp_path / "b.pt"), "--max-iters", "6")
    resumed = run_train(*base, "--out", str(tmp_path / "b.pt"), "--max-iters", "10", "--resume")
    straight = ck.load_checkpoint(tmp_path / "a.pt")
    assert ck.load_checkpoint(tmp_path / "b.pt")["step"] == 10
    for k, v in resumed.state_dict().items():
        assert torch.allclose(v, straight["model"][k], atol=1e-6), k


def test_an_existing_checkpoint_is_never_overwritten_by_accident(text_file, tmp_path):
    out = tmp_path / "ckpt.pt"
    run_train("--data", str(text_file), "--out", str(out), *TINY_TRAIN)
    before = out.read_bytes()
    msg = cli_error(train.main, train.parse_args, ["--data", str(text_file), "--out", str(out), *TINY_TRAIN])
    assert "already exists" in msg and out.read_bytes() == before
    run_train("--data", str(text_file), "--out", str(out), *TINY_TRAIN, "--overwrite", "--seed", "7")
    assert out.read_bytes() != before


def test_resume_refuses_flags_it_would_ignore(text_file, tmp_path):
    """A resumed run keeps the checkpoint's settings, so a model flag that differs is refused, not dropped."""
    out = tmp_path / "ckpt.pt"
    run_train("--data", str(text_file), "--out", str(out), *TINY_TRAIN)
    before = out.read_bytes()
    argv = ["--data", str(text_file), "--out", str(out), *TINY_TRAIN, "--resume", "--max-iters", "8"]
    msg = cli_error(train.main, train.parse_args, [*argv, "--loss", "final", "--n-layer", "3", "--exit-layers", "1,2"])
    assert "--exit-layers 1,2 (it has 1), --loss final (it has asym) would be ignored" in msg
    assert "--n-layer" not in msg and out.read_bytes() == before
    run_train(*argv, "--alpha", "0.7", "--eval-batch-size", "3")  # its own value; one a resume may change
    saved = ck.load_checkpoint(out)
    assert saved["step"] == 8 and saved["args"]["eval_batch_size"] == 3 and "given" not in saved["args"]


@pytest.mark.parametrize("argv, match", [
    (["--alpha", "1.5"], "argument --alpha: 1.5 is outside [0.0, 1.0]"),
    (["--threshold", "-0.1"], "threshold -0.1 is outside [0, 1]"),
    (["--threshold", "nan"], "threshold nan is outside [0, 1]"),
    (["--exit-layers", "3"], "--exit-layers 3 must each be between 1 and"),
    (["--exit-layers", "1,x"], "argument --exit-layers: wants an integer, got 'x'"),
    (["--layer-weights", "1,2"], "--layer-weights has 2 entries"),
    (["--n-embd", "30", "--n-head", "4"], "not divisible"),
    (["--n-head", "4", "--n-kv-head", "3"], "--n-kv-head 3 does not divide --n-head 4"),
    (["--n-embd", "12", "--n-head", "4"], "--n-embd 12 / --n-head 4 is 3: change either, or use --pos learned"),
    (["--dropout", "1.5"], "argument --dropout: 1.5 is outside [0.0, 1.0)"),
    (["--ffn-dim", "-4"], "argument --ffn-dim: -4 is outside [0, inf]"),
    (["--n-layer", "2", "--layer-weights", "nan,1"], "argument --layer-weights: nan is outside"),
    (["--n-layer", "2", "--layer-weights", "0,0"], "all zero"),
    (["--loss", "aux", "--exit-layers", "0"], "--loss aux supervises an exit head"),
    (["--exit-layers", "0,1"], "0 means a plain model without an exit"),
])
def test_bad_flags_give_one_line(argv, match, capsys):
    assert match in flag_error(train.parse_args, argv, capsys)


def test_missing_and_empty_data(tmp_path):
    out = ["--out", str(tmp_path / "ckpt.pt"), *TINY_TRAIN]
    msg = cli_error(train.main, train.parse_args, ["--data", str(tmp_path / "nope"), *out])
    assert "no data at" in msg
    (tmp_path / "empty.txt").write_text("  \n")
    msg = cli_error(train.main, train.parse_args, ["--data", str(tmp_path / "empty.txt"), *out])
    assert "is empty" in msg
    (tmp_path / "short.txt").write_text("abc" * 10)
    msg = cli_error(train.main, train.parse_args, ["--data", str(tmp_path / "short.txt"), *out])
    assert "shorter than one window" in msg


def test_cli_prints_one_line_and_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "c.pt")],
                       cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: no data at")
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_rotational_step_is_a_plain_step_without_the_resting_exit(text_file, tmp_path):
    """Step 0 of the rotational curriculum trains exit 2 and the last layer, not exit 1: the same step
    as --layer-weights 0,0.25,0.75 (exit 1's weight 0, the others scaled to the total), weight for
    weight, and exit 1's head is left as it was initialised (its optimizer never sees a gradient).
    A gradual one-step run trains the last layer alone, and a curriculum without exit losses is an error."""
    base = ["--data", str(text_file), *TINY_TRAIN, "--exit-layers", "1,2", "--max-iters", "1", "--eval-interval",
            "100", "--exit-dropout", "0", "--router-chars", "0"]
    rot = run_train(*base, "--out", str(tmp_path / "a.pt"), "--layer-weights", "0.2,0.2,0.6", "--exit-curriculum", "rotational")
    plain = run_train(*base, "--out", str(tmp_path / "b.pt"), "--layer-weights", "0,0.25,0.75")
    other = run_train(*base, "--out", str(tmp_path / "c.pt"), "--layer-weights", "0.2,0.2,0.6")
    for k, v in rot.state_dict().items():
        assert torch.allclose(v, plain.state_dict()[k], atol=1e-6), k
    assert not torch.equal(rot.exit_heads["1"].head.weight, other.exit_heads["1"].head.weight)
    grad = run_train(*base, "--out", str(tmp_path / "d.pt"), "--layer-weights", "0.2,0.2,0.6", "--exit-curriculum", "gradual")
    last = run_train(*base, "--out", str(tmp_path / "e.pt"), "--layer-weights", "0,0,1")
    for k, v in grad.state_dict().items():
        assert torch.allclose(v, last.state_dict()[k], atol=1e-6), k
    msg = cli_error(train.main, train.parse_args, [*base, "--out", str(tmp_path / "f.pt"), "--loss", "final",
                                                   "--exit-curriculum", "gradual"])
    assert "--exit-curriculum gradual schedules exit losses" in msg


def test_grad_accum_matches_one_big_batch(text_file, tmp_path):
    """8 sequences at once == 2 micro-batches of 4 (the generator draws the same windows). Without exit
    dropout: with it, each micro-batch averages over its own scored tokens, a slightly different mean."""
    base = ["--data", str(text_file), *TINY_TRAIN, "--max-iters", "3", "--eval-interval", "100", "--exit-dropout", "0"]
    big = run_train(*base, "--out", str(tmp_path / "a.pt"), "--batch-size", "8")
    acc = run_train(*base, "--out", str(tmp_path / "b.pt"), "--batch-size", "4", "--grad-accum", "2")
    for k, v in big.state_dict().items():
        assert torch.allclose(v, acc.state_dict()[k], atol=1e-5), k


def test_routers_say_when_held_out_text_runs_short_and_resume_refuses_going_back(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(tiny_text(7000))  # a single file: 6,300 train characters, 2,300 past 4,000
    out = tmp_path / "r.pt"
    argv = ["--data", str(tmp_path / "t.txt"), "--out", str(out), *TINY_TRAIN, "--train-chars", "4000"]
    train.main(train.parse_args([*argv, "--router-chars", "100000"]))
    assert "routers: only 2,300 of the 100,000 --router-chars are left" in capsys.readouterr().out
    before = out.read_bytes()
    msg = cli_error(train.main, train.parse_args, [*argv, "--resume", "--max-iters", "3"])
    assert "is at step 6, past --max-iters 3; give --max-iters above 6" in msg and out.read_bytes() == before


def test_resume_compares_a_flag_newer_than_the_checkpoint_with_what_the_model_has(tmp_path, capsys):
    """A checkpoint from before --n-kv-head has no such arg: its model has one K/V head per query head."""
    (tmp_path / "t.txt").write_text(tiny_text(7000))
    out = tmp_path / "old.pt"
    argv = ["--data", str(tmp_path / "t.txt"), "--out", str(out), *TINY_TRAIN, "--router-chars", "0"]
    train.main(train.parse_args(argv))
    ckpt = torch.load(out, weights_only=True)
    for part in ("args", "config"):
        del ckpt[part]["n_kv_head"]
    torch.save(ckpt, out)
    msg = cli_error(train.main, train.parse_args, [*argv, "--resume", "--max-iters", "8", "--n-kv-head", "1"])
    assert "--n-kv-head 1 (it has 0) would be ignored" in msg
    train.main(train.parse_args([*argv, "--resume", "--max-iters", "8"]))
    assert torch.load(out, weights_only=True)["step"] == 8
