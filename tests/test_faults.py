"""The faults a new user hit, each reproduced: nothing already saved is lost, nothing fails silently,
bad input is one error line. Several run train.py as its own process, as a user would.

Run: python -m pytest tests/test_faults.py -q
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint as ck
import sample
import sweep
import train
from conftest import TINY_TRAIN, cli_error, flag_error, tiny_text

ROOT = Path(__file__).resolve().parents[1]
LONG = [*TINY_TRAIN, "--max-iters", "100000", "--eval-interval", "100000", "--log-interval", "1", "--threads", "1"]


def start_train(*argv, cwd=None):
    """train.py in its own process, output piped (so line-buffering is what shows progress)."""
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)


def wait_for(proc, text, timeout=60):
    """Lines of proc's stdout up to the first that holds text (while proc still runs)."""
    lines, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        lines.append(line)
        if text in line:
            return lines
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"never printed {text!r}: {''.join(lines)} {proc.stderr.read()}")


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(tiny_text())
    return path


def test_progress_reaches_a_pipe_while_training_runs(data, tmp_path):
    proc = start_train("--data", data, "--out", tmp_path / "c.pt", *LONG)
    try:
        wait_for(proc, "step      2/")  # block-buffered output would hold these lines back
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_second_writer_is_refused_while_the_first_runs(data, tmp_path):
    out = tmp_path / "c.pt"
    first = start_train("--data", data, "--out", out, *LONG)
    try:
        wait_for(first, "step      1/")
        second = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(data), "--out", str(out),
                                 "--overwrite", *TINY_TRAIN], capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and "saved" not in second.stdout
        assert second.stderr.strip().startswith("error: another train.py") and "is writing" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)
    assert ck.load_checkpoint(out)["step"] >= 1  # the first one's model is the one on disk


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C, and what a scheduler sends first
def test_ctrl_c_or_sigterm_saves_the_run_and_resume_continues_it(data, tmp_path, sig):
    out = tmp_path / "c.pt"
    proc = start_train("--data", data, "--out", out, *LONG)
    wait_for(proc, "step      3/")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and stderr.strip().splitlines()[-1] == "interrupted"
    saved = ck.load_checkpoint(out)
    assert f"interrupted at step {saved['step']}: saved {out}" in stdout and saved["step"] >= 3
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".lock", ".tmp"))]
    resumed = train.main(train.parse_args(["--data", str(data), "--out", str(out), *TINY_TRAIN, "--resume",
                                           "--max-iters", str(saved["step"] + 2)]))
    assert ck.load_checkpoint(out)["step"] == saved["step"] + 2 and resumed is not None


def test_stale_temp_files_of_killed_saves_are_cleaned_up(data, tmp_path, capsys):
    out = tmp_path / "c.pt"
    stale = [tmp_path / "c.pt.x1y2z3q4.tmp", tmp_path / "c.ptk9j8h7g6.tmp"]  # today's name, and the old one
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    other = tmp_path / "other.pt.abcdefgh.tmp"  # another checkpoint's: not ours to remove
    other.write_bytes(b"x")
    train.main(train.parse_args(["--data", str(data), "--out", str(out), *TINY_TRAIN]))
    assert not any(p.exists() for p in stale) and other.exists()
    assert "removed 2 temp files (0.0 MB) left by an interrupted save" in capsys.readouterr().out
    with ck.atomic_write(tmp_path / "x.csv") as f:  # a temp file is named after its target, and ends in .tmp
        names = [p.name for p in tmp_path.iterdir() if p.name.startswith("x.csv.")]
        assert len(names) == 1 and names[0].endswith(".tmp")
        f.write("a")


def test_short_validation_text_is_refused_before_the_first_step(tmp_path, capsys):
    path = tmp_path / "short_valid.txt"
    path.write_text(tiny_text(2000))  # valid = the last 10%: 200 characters
    argv = ["--data", str(path), "--out", str(tmp_path / "c.pt"), *TINY_TRAIN, "--block-size", "300"]
    msg = cli_error(train.main, train.parse_args, argv)
    assert "validation text (200 chars) is shorter than one window of 301" in msg
    assert "step " not in capsys.readouterr().out and not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("blob", [bytes(range(256)) * 40, "café, naïve, Zürich. ".encode("latin-1") * 300],
                         ids=["random-bytes", "latin-1"])
def test_text_that_is_not_utf8_is_refused(tmp_path, blob):
    path = tmp_path / "bytes.txt"
    path.write_bytes(blob)
    msg = cli_error(train.main, train.parse_args, ["--data", str(path), "--out", str(tmp_path / "c.pt"), *TINY_TRAIN])
    assert "is not UTF-8 text" in msg and "byte 0x" in msg


@pytest.mark.parametrize("script, argv, match", [
    (train, ["--lr", "nan"], "argument --lr: nan is outside"),
    (sample, ["ckpt.pt", "--temperature", "nan"], "argument --temperature: nan is outside"),
    (sweep, ["ckpt.pt", "--thresholds", "-0.1,0.5"], "argument --thresholds: threshold -0.1 is outside [0, 1]"),
    (train, ["--lr", "-1e-3"], "argument --lr: -1e-3 is outside"),  # argparse alone: "expected one argument"
])
def test_bad_numbers_are_one_line(script, argv, match, capsys):
    assert match in flag_error(script.parse_args, argv, capsys)


def test_out_that_is_a_folder_is_refused_before_training(data, tmp_path, capsys):
    msg = cli_error(train.main, train.parse_args, ["--data", str(data), "--out", str(tmp_path), "--overwrite", *TINY_TRAIN])
    assert "is a folder" in msg and "step " not in capsys.readouterr().out


def test_overwrite_replaces_only_a_checkpoint(data, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    for argv in ([], ["--overwrite"]):
        msg = cli_error(train.main, train.parse_args, ["--data", str(data), "--out", str(notes), *argv, *TINY_TRAIN])
        assert "is there and is no checkpoint (another kind of file, or a damaged one), so it is not ours" in msg
    assert notes.read_text() == "my notes" and "step " not in capsys.readouterr().out
    out = tmp_path / "c.pt"
    for seed in ("1", "2"):  # a checkpoint is replaced
        train.main(train.parse_args(["--data", str(data), "--out", str(out), "--overwrite", "--seed", seed, *TINY_TRAIN]))
    assert ck.load_checkpoint(out)["args"]["seed"] == 2


def test_out_into_a_new_folder_makes_it_and_says_so(data, tmp_path, capsys):
    out = tmp_path / "runs" / "a" / "c.pt"
    train.main(train.parse_args(["--data", str(data), "--out", str(out), *TINY_TRAIN]))
    printed = capsys.readouterr().out
    assert out.is_file() and printed.count(f"made the folder {out.parent}") == 1
    ck.make_folder(out.parent)  # there now: nothing more to say
    assert "made the folder" not in capsys.readouterr().out


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a folder no one may write in")
def test_a_folder_one_cannot_write_in_is_refused_before_any_work(data, capsys):
    msg = cli_error(train.main, train.parse_args, ["--data", str(data), "--out", "/proc/c.pt", *TINY_TRAIN])
    assert "cannot write in the folder /proc" in msg and "step " not in capsys.readouterr().out


def test_a_diverged_training_never_overwrites_the_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "c.pt"
    train.main(train.parse_args(["--data", str(data), "--out", str(out), *TINY_TRAIN]))
    before = out.read_bytes()
    msg = cli_error(train.main, train.parse_args, ["--data", str(data), "--out", str(out), "--overwrite", *TINY_TRAIN,
                                                   "--lr", "1e6", "--muon-lr", "1e6"])
    assert "training diverged (its weights hold NaN or inf), so" in msg and "kept as it was" in msg
    assert out.read_bytes() == before


@pytest.fixture
def damaged(data, tmp_path):
    """A good checkpoint, and copies of it damaged in the ways users met."""
    out = tmp_path / "c.pt"
    train.main(train.parse_args(["--data", str(data), "--out", str(out), *TINY_TRAIN]))
    saved = torch.load(out, weights_only=True)
    flipped = saved["model"]["lm_head.weight"].clone()
    flipped.view(torch.int32).view(-1)[5] ^= 1 << 20  # one bit of one weight, as a disk or a copy may change it
    torch.save({**saved, "model": {**saved["model"], "lm_head.weight": flipped}}, tmp_path / "bit_flip.pt")
    good = {k: v for k, v in saved.items() if k != "checksum"}  # the others as another writer (or version) made them
    shapes, no_config, short_vocab = (tmp_path / f"{n}.pt" for n in ("shapes", "no_config", "short_vocab"))
    state = dict(good["model"])
    state["transformer.wte.weight"] = state["transformer.wte.weight"][:, :8]
    torch.save({**good, "model": state}, shapes)
    torch.save({k: v for k, v in good.items() if k != "config"}, no_config)
    torch.save({**good, "vocab": good["vocab"][:-3]}, short_vocab)
    more = {"args_list": {**good, "args": [1, 2]},
            "not_a_tensor": {**good, "model": {**good["model"], "transformer.wte.weight": "x"}},
            "nan_weights": {**good, "model": {**good["model"], "lm_head.weight": good["model"]["lm_head.weight"] * float("nan")}},
            "heads": {**good, "config": {**good["config"], "n_head": 5}},
            "vocab_ints": {**good, "vocab": list(range(len(good["vocab"])))},
            "bad_router": {**good, "routers": {"epsilon": 0.1, "hidden": 8, "state": {"kl": {"1": {"net.0.weight": torch.zeros(2, 2)}}}}}}
    for name, ckpt in more.items():
        torch.save(ckpt, tmp_path / f"{name}.pt")
    return {"shapes": shapes, "no_config": no_config, "short_vocab": short_vocab, "data": data,
            "bit_flip": tmp_path / "bit_flip.pt",
            **{name: tmp_path / f"{name}.pt" for name in more}}


def test_damaged_checkpoints_are_one_line_everywhere(damaged):
    for name, match in (("shapes", "transformer.wte.weight is [18, 8] in the file, [18, 16] in its config"),
                        ("no_config", "has no 'config'"),
                        ("short_vocab", "vocabulary of 15 characters for an embedding of 18"),
                        ("args_list", "has no 'args' as eemini writes it"),
                        ("not_a_tensor", "transformer.wte.weight is no tensor in the file"),
                        ("nan_weights", "holds NaN or inf weights: its training diverged"),
                        ("heads", "its config does not describe a model (n_embd 16 is not divisible by n_head 5)"),
                        ("vocab_ints", "its vocabulary is not a list of characters"),
                        ("bad_router", "its router-kl at exit 1 does not fit its model"),
                        ("bit_flip", "is damaged: its weights do not match the checksum saved with them")):
        path = str(damaged[name])
        resume = (train, ["--resume", "--out", path, "--data", str(damaged["data"]), *TINY_TRAIN])
        for script, argv in ((sweep, [path]), (sample, [path, "--max-new-tokens", "3"]), *[resume] * (name != "bad_router")):
            assert match in cli_error(script.main, script.parse_args, argv), (name, script.__name__)


def test_extending_a_finished_run_keeps_its_schedule_unless_asked(data, tmp_path, capsys):
    base = ["--data", str(data), *TINY_TRAIN, "--warmup-iters", "0", "--lr", "1e-2", "--min-lr", "1e-3"]
    out = tmp_path / "c.pt"
    train.main(train.parse_args([*base, "--out", str(out), "--max-iters", "6"]))
    capsys.readouterr()
    train.main(train.parse_args([*base, "--out", str(out), "--max-iters", "9", "--resume"]))
    printed = capsys.readouterr().out
    assert "the learning-rate schedule ends at step 6" in printed
    assert [line.split("| lr ")[1][:8] for line in printed.splitlines() if line.startswith("step      9/")] == ["1.00e-03"]
    train.main(train.parse_args([*base, "--out", str(out), "--max-iters", "12", "--resume", "--restart-schedule"]))
    printed = capsys.readouterr().out
    assert "the learning-rate schedule restarts: cosine from step 0 to 12" in printed
    lr = float([line.split("| lr ")[1][:8] for line in printed.splitlines() if line.startswith("step     12/")][0])
    assert lr == pytest.approx(1e-3 + 0.5 * (1 + __import__("math").cos(__import__("math").pi * 11 / 12)) * 9e-3, rel=1e-2)


def test_sigint_twice_stops_at_once(data, tmp_path):
    """The first Ctrl-C asks for a save; a second during it stops at once, and what was on disk stays."""
    out = tmp_path / "c.pt"
    proc = start_train("--data", data, "--out", out, *LONG)
    wait_for(proc, "step      2/")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    if out.exists():  # either the save finished first, or it was stopped and left nothing half-written
        ck.load_checkpoint(out)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
