"""reproduce.py: mean ± std against a hand computation, the verdict rules on hand-made cases, a --quick
run on tiny data (each model trained by its own train.py / exit_classifier.py process), resuming; one line,
and nothing lost, for a --results onto someone else's file, a damaged record in the runs folder, a failed run.

Run: python -m pytest tests/test_reproduce.py -q   (about 2 minutes on 2 CPU cores)
"""

import csv
import json
import math
import shutil

import pytest
import torch

import reproduce
from conftest import cli_error, tiny_text
from seeds import CLAIMS

TINY = ["--quick", "--jobs", "2", "--max-iters", "4", "--val-chars", "600", "--device", "cpu",
        "--train-args", "--n-embd 16 --n-head 2 --block-size 16 --batch-size 8 --warmup-iters 2",
        "--ec-args", "--train-seqs 60 --seq-len 8 --n-embd 16 --n-head 2 --ffn-dim 32 --batch-size 16 "
        "--max-epochs 1 --exit-epochs 1 --exit-hidden 8"]


def test_aggregate_is_mean_and_sample_std():
    # a: 1, 2, 6 -> mean 3, squared deviations 4 + 1 + 9 = 14, sample variance 14 / 2 = 7
    # b: 10, 14 (missing in one seed) -> mean 12, sample variance (4 + 4) / 1 = 8
    agg = reproduce.aggregate([{"a": 1.0, "b": 10.0}, {"a": 2.0}, {"a": 6.0, "b": 14.0}])
    assert agg["a"] == pytest.approx((3.0, math.sqrt(7), 3))
    assert agg["b"] == pytest.approx((12.0, math.sqrt(8), 2))
    assert reproduce.aggregate([{"a": 5.0}])["a"] == (5.0, 0.0, 1)  # one seed: std 0, not NaN


def test_flatten_and_cells():
    nested = {"loss": {"block_ppl": [3, 2.5], "name": "x", "flag": True}, "final_ppl": 7}
    assert reproduce.flatten(nested) == {"loss/block_ppl/0": 3.0, "loss/block_ppl/1": 2.5, "final_ppl": 7.0}
    assert reproduce.fmt((14.5, 0.25, 3), 14.51) == "14.50 ± 0.25 [14.51]"
    assert reproduce.fmt((52.34, 1.0, 3), 52.3, 1, "%") == "52.3 ± 1.0% [52.3%]"
    assert reproduce.fmt(None, 35.29) == "— [35.29]"


def test_verdict_rules_on_hand_made_cases():
    lo, hi, fuzzy = (1.0, 0.1, 3), (2.0, 0.1, 3), (1.2, 0.5, 3)
    assert reproduce.below(lo, hi) == "supported" and reproduce.below(hi, lo) == "not supported"
    assert reproduce.below(lo, fuzzy).startswith("inconclusive")
    # a claim with a size: the right direction at under half of it is "direction only"
    assert reproduce.RULES["lower"]([lo, hi], -50.0)[0] == "supported"  # -50% measured, -50% claimed
    assert reproduce.RULES["lower"]([(1.9, 0.01, 3), (2.0, 0.01, 3)], -34.2)[0].startswith("direction only (-5.0%")
    assert reproduce.RULES["saves"]([(65.0, 1.0, 3)], 34.8)[0] == "supported"  # 35% saved (+- 1)
    assert reproduce.RULES["saves"]([(96.0, 0.1, 3)], 34.8)[0].startswith("direction only")
    assert reproduce.RULES["falls"]([hi, fuzzy, lo], None)[0] == "supported"
    assert reproduce.RULES["falls"]([hi, lo, fuzzy], None)[0] == "partly (not at every step)"
    assert reproduce.RULES["order"]([lo, hi, (3.0, 0.1, 3)], None)[0] == "supported"
    assert reproduce.RULES["lowest"]([lo, hi, fuzzy], None)[0].startswith("inconclusive")
    assert reproduce.RULES["highest"]([(3.0, 0.1, 3), lo, hi], None)[0] == "supported"
    assert reproduce.RULES["at_most"]([(3.0, 0.1, 3), (4.9, 0.1, 3)], 5.0)[0] == "supported"
    assert reproduce.RULES["at_most"]([(5.1, 0.1, 3)], 5.0)[0] == "not supported"
    assert reproduce.RULES["bumpy"]([lo, hi, lo], None)[0] == "supported"
    assert reproduce.RULES["bumpy"]([lo, hi, (3.0, 0.1, 3)], None)[0] == "not supported"
    # picked: the second threshold is best on valid; on test it is lo, below full depth's hi
    verdict, extra = reproduce.RULES["picked"]([hi, hi, lo, (3.0, 0.1, 3), lo], None)
    assert verdict == "supported" and extra.startswith("#2 of the thresholds is best on valid; on test 1.000")
    assert reproduce.RULES["picked"]([lo, hi, lo, (3.0, 0.1, 3), hi], None)[0] == "not supported"
    assert reproduce.RULES["not_above"]([hi, lo], None)[0] == "not supported"
    assert {rule for _, _, rule, _, _ in CLAIMS} <= set(reproduce.RULES)


def test_findings_say_which_runs_a_claim_misses():
    rows = reproduce.findings(lambda name, key: None)
    assert len(rows) == len(CLAIMS) and all(r[2] == "not measured" and r[3].startswith("missing: ") for r in rows)


def test_quick_run_writes_every_seed_table_then_resumes(wiki_folder, tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["--data", str(wiki_folder), "--out-dir", str(out), *TINY]
    records = reproduce.main(reproduce.parse_args(argv))
    names = {name for name, *_ in reproduce.RUNS} | {f"curve-{name}" for name in reproduce.CURVES}
    assert set(records) == names  # Standard 1L and seed 004 included, and the runs for the training curves
    assert {p.name for p in out.glob("*.pt")} == {f"{name}-seed0.pt" for name in names}
    text = (out / "RESULTS.md").read_text()
    curve = json.loads((out / "curve-std3L-seed0.json").read_text())["metrics"]
    assert sorted({int(k.split("/")[1]) for k in curve if k.startswith("history/")}) == list(range(1, 9))  # 8 steps, 16 evals
    assert "## PPL against training steps" in text and "← the budget" in text
    for heading in ("## Headline", "## Seed 000", "## Seed 001", "## Seed 002", "## Seed 003", "## Seed 004",
                    "## PPL against Compute", "## Key findings"):
        assert heading in text, heading
    for seed_figure in ("[23.98]", "[34.86]", "[35.29]", "[28.13]", "[14.04]", "[24.88]", "[32.07]", "[1071.76]"):
        assert seed_figure in text, seed_figure
    assert "not measured" not in text  # every claim found its runs
    # a cell is the figure measured by that run (one seed: std 0), beside the seed's
    aux = json.loads((out / "aux-seed0.json").read_text())["metrics"]
    assert f"| Auxiliary Loss (Early Exit) | {aux['masked/0.95/ppl']:.2f} ± 0.00 [23.98] |" in text
    assert f"| 0.50 | {aux['masked/0.5/ppl']:.2f} ± 0.00 [40.61] |" in text
    rows = {(r["model"], r["key"]): r for r in csv.DictReader(open(out / "results.csv"))}
    assert float(rows["aux", "full/ppl"]["mean"]) == pytest.approx(aux["full/ppl"], rel=1e-5)
    assert "seed004" in {m for m, _ in rows}

    capsys.readouterr()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")}
    (out / "aux-seed0.json").unlink()  # its checkpoint is finished: measured again, not retrained
    reproduce.main(reproduce.parse_args(argv))
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == len(names) - 1
    assert "] aux seed 0 |" in printed and "ETA" in printed
    assert "nothing to train" in (out / "aux-seed0.log").read_text()
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt") if p.name != "aux-seed0.pt"} == \
        {k: v for k, v in stamps.items() if k != "aux-seed0.pt"}
    assert json.loads((out / "aux-seed0.json").read_text())["metrics"]["full/ppl"] == pytest.approx(aux["full/ppl"])

    # --remeasure: every finished run measured again, nothing retrained, each keeps its training time
    sides = {p.name: json.loads(p.read_text()) for p in out.glob("*-seed0.json")}
    weights = {p.name: torch.load(p, weights_only=True)["model"] for p in out.glob("*.pt")}
    reproduce.main(reproduce.parse_args([*argv, "--remeasure"]))
    printed = capsys.readouterr().out
    assert "finished earlier, skipped" not in printed and all(f"] {name} seed 0 |" in printed for name in names)
    for name, before in weights.items():  # resumed at its last step, so saved again, the same weights
        after = torch.load(out / name, weights_only=True)["model"]
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    for name, before in sides.items():
        after = json.loads((out / name).read_text())
        assert (after["seconds"], after["finished"]) == (before["seconds"], before["finished"])
        assert after["metrics"] == pytest.approx(before["metrics"])
    assert "--remeasure` on" in (out / "RESULTS.md").read_text()
    side = json.loads((out / "std1L-seed0.json").read_text())
    (out / "std1L-seed0.json").write_text(json.dumps({**side, "finished": None}))  # when it ran: not recorded
    reproduce.main(reproduce.parse_args(argv))
    assert "counting each one alone (when each ran is not recorded)." in (out / "RESULTS.md").read_text()


def test_too_little_validation_text_for_a_window_is_refused_before_any_run(capsys):
    """train.py wants more than a window of --block-size + 1 characters (128 + 1 unless --train-args gives
    it), exit_classifier.py one of --seq-len + 1: fewer --val-chars would fail in the first run's log,
    so parse_args refuses them in one line. The last --block-size given counts, as in argparse."""
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--quick", "--val-chars", "129"])
    assert "--val-chars 129 is too short for the runs' evaluation windows; give at least 130" in capsys.readouterr().err
    assert reproduce.parse_args(["--quick", "--val-chars", "130"]).val_chars == 130
    args = reproduce.parse_args(["--quick", "--val-chars", "18", "--train-args=--block-size=16", "--ec-args", "--seq-len 8"])
    assert args.train_args == ["--block-size=16"] and reproduce.flag_value(args.ec_args, "--seq-len", 32) == 8
    assert reproduce.flag_value(["--block-size", "16", "--block-size", "256"], "--block-size", 128) == 256
    assert reproduce.flag_value(["--block-size", "x"], "--block-size", 128) == 128
    for argv in (["--val-chars", "17", "--train-args", "--block-size 16"],
                 ["--val-chars", "100", "--train-args", "--block-size 16 --block-size 256"],
                 ["--val-chars", "20", "--train-args", "--block-size 8", "--ec-args", "--seq-len 20"]):
        with pytest.raises(SystemExit):
            reproduce.parse_args(["--quick", *argv])
    assert reproduce.parse_args(["--quick", "--val-chars", "21", "--train-args", "--block-size 8", "--ec-args", "--seq-len 20"])


# ----------------------------------------------------------------------------------------------
# bad input: one line, before any run where it can be found then, and nothing saved is lost


@pytest.fixture
def one_model(monkeypatch):
    """reproduce.py with one experiment (Standard 1L, a few seconds) and no training-curve runs."""
    monkeypatch.setattr(reproduce, "RUNS", [r for r in reproduce.RUNS if r[0] == "std1L"])
    monkeypatch.setattr(reproduce, "CURVES", [])


def with_train_args(argv, more):
    i = argv.index("--train-args")
    return [*argv[: i + 1], f"{argv[i + 1]} {more}", *argv[i + 2:]]


def test_results_never_replace_a_file_reproduce_did_not_write(one_model, wiki_folder, tmp_path):
    readme, table, ours = tmp_path / "README.md", tmp_path / "results.csv", tmp_path / "RESULTS.md"
    readme.write_text("# eemini\n\nThe project's README.\n")
    argv = ["--data", str(wiki_folder), "--out-dir", str(tmp_path / "runs"), *TINY]
    msg = cli_error(reproduce.main, reproduce.parse_args, [*argv, "--results", str(readme)])
    assert f"would replace {readme}, which reproduce.py did not write" in msg
    assert "pick another --results path, or delete that file" in msg
    assert readme.read_text() == "# eemini\n\nThe project's README.\n" and not (tmp_path / "runs").exists()
    # the results.csv beside it: someone else's table is kept too, before any run
    ours.write_text(f"{reproduce.TITLE}\n\nan earlier run's results\n")
    table.write_text("name,score\nx,1\n")
    msg = cli_error(reproduce.main, reproduce.parse_args, [*argv, "--results", str(ours)])
    assert f"would replace {table}, which reproduce.py did not write" in msg
    assert table.read_text() == "name,score\nx,1\n" and not (tmp_path / "runs").exists()
    # what reproduce.py wrote itself is replaced, as every run does
    table.write_text(",".join(reproduce.CSV_HEAD) + "\nstd1L,full/ppl,9,0,1,9\n")
    reproduce.main(reproduce.parse_args([*argv, "--results", str(ours)]))
    assert ours.read_text().startswith(reproduce.TITLE + "\n") and "std1L,full/ppl,9," not in table.read_text()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run of one model (Standard 1L) in a runs folder, to copy and damage."""
    tmp = tmp_path_factory.mktemp("finished")
    (tmp / "wiki").mkdir()
    for split, seed in (("train", 0), ("valid", 1), ("test", 2)):
        (tmp / "wiki" / f"wiki.{split}.raw").write_text(tiny_text(6000 if split == "train" else 1500, seed))
    argv = ["--data", str(tmp / "wiki"), "--out-dir", str(tmp / "runs"), *TINY]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reproduce, "RUNS", [r for r in reproduce.RUNS if r[0] == "std1L"])
        mp.setattr(reproduce, "CURVES", [])
        reproduce.main(reproduce.parse_args(argv))
    return tmp / "runs", argv


@pytest.mark.parametrize("name, damage, why", [
    ("std1L-seed0.json", lambda t: t[: len(t) // 2], "not JSON: "),  # cut short
    ("std1L-seed0.json", lambda t: "not json at all", "not JSON: "),
    ("std1L-seed0.json", lambda t: json.dumps([json.loads(t)]), "not the record reproduce.py writes: a JSON list"),
    ("std1L-seed0.json", lambda t: json.dumps({**json.loads(t), "seconds": "long"}), "a JSON dict"),
    ("std1L-seed0.argv.json", lambda t: t[: len(t) // 2], "not JSON: "),
    ("std1L-seed0.argv.json", lambda t: json.dumps({"argv": json.loads(t)}), "a JSON dict"),
])
def test_a_damaged_record_in_the_runs_folder_is_one_line_before_any_run(one_model, finished_run, tmp_path, name,
                                                                         damage, why):
    """Each record is written atomically, so damage is an edit or a bad copy: refused, naming the file and
    what to do, never guessed at (a record read as 'not done' would retrain or lose the run's time).
    The argv record is read when a run starts: --remeasure starts them all."""
    out = tmp_path / "runs"
    shutil.copytree(finished_run[0], out)
    argv = [*finished_run[1][:2], "--out-dir", str(out), *finished_run[1][4:], "--remeasure"]
    bad = damage((out / name).read_text())
    (out / name).write_text(bad)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    msg = cli_error(reproduce.main, reproduce.parse_args, argv)
    assert msg.startswith(f"error: {out / name} is damaged (") and why in msg and "; delete it, and the next run " in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # nothing run, nothing written


def test_a_failed_run_leaves_what_remeasure_does_unchanged(one_model, wiki_folder, tmp_path):
    """train.py refusing a flag saved nothing, so the checkpoint still belongs to the earlier argv:
    the record says so, and --remeasure measures it again instead of training it from the start."""
    out = tmp_path / "runs"
    argv = ["--data", str(wiki_folder), "--out-dir", str(out), *TINY]
    reproduce.main(reproduce.parse_args(argv))
    record, weights = (out / "std1L-seed0.argv.json").read_text(), (out / "std1L-seed0.pt").read_bytes()
    cli_error(reproduce.main, reproduce.parse_args, with_train_args(argv, "--alpha 2"))
    assert (out / "std1L-seed0.argv.json").read_text() == record and (out / "std1L-seed0.pt").read_bytes() == weights
    seen = len((out / "std1L-seed0.log").read_text())
    reproduce.main(reproduce.parse_args([*argv, "--remeasure"]))
    assert "nothing to train" in (out / "std1L-seed0.log").read_text()[seen:]


def test_a_failed_run_says_why(one_model, wiki_folder, tmp_path):
    out = tmp_path / "runs"
    argv = with_train_args(["--data", str(wiki_folder), "--out-dir", str(out), *TINY], "--alpha 2")
    msg = cli_error(reproduce.main, reproduce.parse_args, argv)
    assert msg.startswith("error: train.py failed (exit 2): train.py: error: argument --alpha: 2 is outside [0.0, 1.0]")
    assert f"its output is in {out / 'std1L-seed0.log'}" in msg
    assert not (out / "std1L-seed0.argv.json").exists() and not (out / "std1L-seed0.pt").exists()
