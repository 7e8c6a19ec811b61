"""measure.py and sweep.py: rows against direct routed evaluation, the oracle against brute force,
files, the checkpoint's name for its loss, bad input.

Run: python -m pytest tests/test_sweep.py -q
"""

import csv
import itertools
import json
import math
import sys

import pytest
import torch
from torch.nn import functional as F

import checkpoint as ck
import eemini as ee
import measure
import sweep
import train
from conftest import TINY_TRAIN, cli_error, flag_error, make_model, tiny_text
from data import Vocab, eval_windows, read_split

THRESHOLDS = "0,0.3,0.5,0.7,0.9,1"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two tiny checkpoints trained on the spot: asym (the default) and --loss final."""
    tmp = tmp_path_factory.mktemp("sweep")
    (tmp / "tiny.txt").write_text(tiny_text())
    for name, loss in (("asym", "asym"), ("final", "final")):
        train.main(train.parse_args(["--data", str(tmp / "tiny.txt"), "--out", str(tmp / f"{name}.pt"),
                                     "--loss", loss, *TINY_TRAIN]))
    return tmp


def run_sweep(*argv):
    return sweep.main(sweep.parse_args([str(a) for a in argv]))


def direct_routed(model, ids, threshold, confidence):
    """Reference, by hand: each window's states, the exit's confidence from them, the exit's or the
    last head's logits by threshold (1.0: nobody leaves), then CE, shallow and compute."""
    ce, depth, L, k = [], [], model.config.n_layer, model.config.exits[0]
    for x, y in eval_windows(ids, model.config.block_size, 7):
        states = model.states(x)
        exit_logits, final_logits = model.head(k, states[k]), model.head(L, states[L])
        leave = (ee.CONFIDENCE[confidence](exit_logits, states[k], states[k - 1]) >= threshold) & (threshold < 1)
        logits = torch.where(leave.unsqueeze(-1), exit_logits, final_logits)
        ce.append(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none"))
        depth.append(torch.where(leave, k, L).flatten())
    ce, depth = torch.cat(ce), torch.cat(depth).float()
    return math.exp(ce.mean().item()), 100.0 * (depth < L).float().mean().item(), 100.0 * depth.mean().item() / L


@pytest.mark.parametrize("confidence", sorted(ee.CONFIDENCE))
def test_rows_equal_direct_routed_evaluation(ckpts, confidence, capsys):
    res = run_sweep(ckpts / "asym.pt", "--thresholds", THRESHOLDS, "--confidence", confidence, "--device", "cpu")
    model, vocab = ck.model_from_checkpoint(ck.load_checkpoint(ckpts / "asym.pt"))
    text, _ = read_split(ckpts / "tiny.txt", "valid")  # the data recorded in the checkpoint
    ids = vocab.encode(text[:1000])  # and its --val-chars
    assert len(res["rows"]) == 6 and res["tokens"] == (len(ids) - 1) // 16 * 16
    for r in res["rows"]:
        ppl, shallow, compute = direct_routed(model, ids, r["threshold"], confidence)
        assert r["ppl"] == pytest.approx(ppl, rel=1e-5)
        assert r["shallow"] == pytest.approx(shallow) and r["compute"] == pytest.approx(compute)
    out = capsys.readouterr().out
    assert "| Threshold | PPL | Shallow exit | Compute |" in out and "| 1.0 |" in out and "baseline" in out
    assert "best PPL" in out and "within +1% PPL" in out and "maximum efficiency" in out and "Compute (%)" in out


def test_endpoints(ckpts):
    res = run_sweep(ckpts / "asym.pt", "--thresholds", "1,0", "--confidence", "softmax", "margin", "entropy")
    for r in res["rows"]:
        if r["threshold"] == 0:  # every token leaves at the exit after layer 1 of 3
            assert r["shallow"] == 100.0 and r["compute"] == pytest.approx(100 / 3)
        else:  # none does, even where float softmax rounds to 1.0
            assert r["shallow"] == 0.0 and r["compute"] == 100.0
            assert r["ppl"] == pytest.approx(res["full_depth_ppl"]) and r["delta_ppl"] == pytest.approx(0, abs=1e-9)


def test_oracle_is_brute_force_best_and_beats_the_confidence_curve(ckpts):
    """Every subset of 8 tokens sent deep: the oracle's CE is the lowest for each subset size."""
    g = torch.Generator().manual_seed(0)
    stats = {"ce": {1: torch.rand(8, generator=g) * 3, 3: torch.rand(8, generator=g) * 3}}
    cfg = ee.GPTConfig(n_layer=3, exits=[1])
    oracle = measure.Oracle(stats, cfg)
    for n in range(9):
        best = min((stats["ce"][1].sum() - sum(stats["ce"][1][i] - stats["ce"][3][i] for i in deep)).item() / 8
                   for deep in itertools.combinations(range(8), n))
        assert oracle.ce[n].item() == pytest.approx(best, rel=1e-6)
        assert oracle.compute[n].item() == pytest.approx(100 * (1 / 3 + 2 / 3 * n / 8))

    res = run_sweep(ckpts / "asym.pt", "--thresholds", "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95,1",
                    "--confidence", "softmax", "margin", "entropy")
    for r in res["rows"]:  # at equal compute (the same number of deep tokens), never worse
        assert r["oracle_ppl"] <= r["ppl"] * (1 + 1e-6)
    assert res["oracle"][0]["compute"] == pytest.approx(100 / 3) and res["oracle"][-1]["compute"] == 100
    assert res["oracle"][-1]["ppl"] == pytest.approx(res["full_depth_ppl"], rel=1e-6)


def test_oracle_with_several_exits_is_on_the_brute_force_frontier():
    """6 tokens, exits after layers 1 and 2 of 4: each of the 3**6 ways to place them has a compute
    and a CE; no placement beats an oracle point (less CE for no more compute), and the oracle
    reaches both ends (everything at the first exit; the best CE of all)."""
    g = torch.Generator().manual_seed(1)
    stats = {"ce": {k: torch.rand(6, generator=g) * 3 for k in (1, 2, 4)}}
    cfg = ee.GPTConfig(n_layer=4, exits=[1, 2])
    oracle = measure.Oracle(stats, cfg)
    ce = torch.stack([stats["ce"][k] for k in (1, 2, 4)], 1).double()
    brute = [(100 * sum((1, 2, 4)[c] for c in pick) / 6 / 4, sum(ce[i, c] for i, c in enumerate(pick)).item() / 6)
             for pick in itertools.product(range(3), repeat=6)]
    for c, e in zip(oracle.compute.tolist(), oracle.ce.tolist()):
        assert not any(bc <= c + 1e-9 and be < e - 1e-9 for bc, be in brute)
    assert oracle.compute[0].item() == pytest.approx(25.0) and oracle.ce[0].item() == pytest.approx(ce[:, 0].mean().item())
    assert oracle.ce.min().item() == pytest.approx(min(be for _, be in brute))


def test_csv_and_json_round_trip(ckpts, tmp_path):
    c, j = tmp_path / "s.csv", tmp_path / "s.json"
    res = run_sweep(ckpts / "asym.pt", "--thresholds", THRESHOLDS, "--csv", c, "--json", j)
    with open(c, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(res["rows"])
    for got, want in zip(rows, res["rows"]):
        assert got["confidence"] == want["confidence"]
        assert all(float(got[k]) == want[k] for k in want if k != "confidence")
    data = json.loads(j.read_text())
    assert data["rows"] == res["rows"] and data["checkpoint"] == str(ckpts / "asym.pt")
    assert data["data"].endswith("tiny.txt [90%:]")
    assert {"threshold", "ppl", "shallow", "compute"} <= set(data["rows"][0])


def test_true_exit_beside_masked(ckpts, capsys):
    """--mode both: at 0 (all exit) and 1 (none) true exit computes exactly what masked routing reads."""
    res = run_sweep(ckpts / "asym.pt", "--thresholds", "0,0.5,1", "--mode", "both")
    for r in res["rows"]:
        if r["threshold"] in (0, 1):
            assert r["exit_ppl"] == pytest.approx(r["ppl"], rel=1e-5)
    assert "True-exit PPL" in capsys.readouterr().out
    exit_only = run_sweep(ckpts / "asym.pt", "--thresholds", "0.5", "--mode", "exit")["rows"][0]
    assert exit_only["ppl"] == pytest.approx(res["rows"][1]["exit_ppl"])


def test_plot_png_or_one_install_line_before_any_work(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # as if it were not installed
    msg = cli_error(sweep.main, sweep.parse_args, [str(ckpts / "asym.pt"), "--plot", str(tmp_path / "a.png")])
    assert "`pip install matplotlib`, or drop --plot" in msg and "Threshold sweep" not in capsys.readouterr().out
    assert not (tmp_path / "a.png").exists()
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    run_sweep(ckpts / "asym.pt", "--thresholds", "0,1", "--plot", tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input(ckpts, tmp_path):
    corrupt, foreign = tmp_path / "corrupt.pt", tmp_path / "foreign.pt"
    corrupt.write_bytes(b"not a checkpoint")
    torch.save({"model": {}}, foreign)
    for path, match in ((tmp_path / "missing.pt", "no checkpoint at"), (corrupt, "not a readable checkpoint"),
                        (foreign, "not an eemini checkpoint"), (ckpts / "final.pt", "was never trained")):
        assert match in cli_error(sweep.main, sweep.parse_args, [str(path)])
    plain = tmp_path / "plain.pt"
    ck.save_checkpoint(plain, make_model(exits=[]), Vocab([chr(97 + i) for i in range(23)]), args={})
    assert "plain model without an exit point" in cli_error(sweep.main, sweep.parse_args, [str(plain)])
    msg = cli_error(sweep.main, sweep.parse_args, [str(ckpts / "asym.pt"), "--data", str(tmp_path / "nope")])
    assert "no data at" in msg
    msg = cli_error(sweep.main, sweep.parse_args, [str(ckpts / "asym.pt"), "--confidence", "logit"])
    assert "no confidence measure 'logit'" in msg and "has no learned routers" in msg


def test_outputs_that_would_destroy_a_file_or_fail_late_are_refused_first(ckpts, tmp_path, text_file, capsys):
    """--json onto a checkpoint, --csv onto a folder or a script, --calibrate without a test split:
    one line before any evaluation, and nothing on disk changes."""
    ckpt = ckpts / "asym.pt"
    before = ckpt.read_bytes()
    (tmp_path / "notes.md").write_text("mine")
    for argv, match in ((["--json", str(ckpt)], "give a file ending in .json"),
                        (["--csv", str(tmp_path)], "is a folder"),
                        (["--csv", str(tmp_path / "notes.md")], "give a file ending in .csv"),
                        (["--plot", str(tmp_path / "new.svg")], "give a file ending in .png"),
                        (["--json", str(tmp_path / "notes.md" / "s.json")], "cannot make the folder"),
                        (["--calibrate", "1", "--data", str(text_file)], "single text file, with no test split"),
                        (["--calibrate", "1", "--calibrate-chars", "10"], "is shorter than one window")):
        assert match in cli_error(sweep.main, sweep.parse_args, [str(ckpt), *argv])
        assert "masked: one pass" not in capsys.readouterr().out  # refused before the evaluation
    msg = flag_error(sweep.parse_args, ["--confidence", "softmax", str(ckpt)], capsys)
    assert f"{ckpt} is a checkpoint, not a measure; give the checkpoint first" in msg
    assert ckpt.read_bytes() == before and (tmp_path / "notes.md").read_text() == "mine"
    (tmp_path / "old.json").write_text("{}")  # an output of its own kind is updated
    run_sweep(ckpt, "--thresholds", "0,1", "--json", tmp_path / "old.json")
    assert json.loads((tmp_path / "old.json").read_text())["rows"]


@pytest.mark.parametrize("argv, match", [
    (["--thresholds", "0,1.5"], "threshold 1.5 is outside [0, 1]"),
    (["--thresholds", "-0.1"], "threshold -0.1 is outside [0, 1]"),
    (["--thresholds", "a,b"], "threshold a is outside [0, 1] (or not a number)"),
    (["--thresholds", ""], "--thresholds is empty"),
    (["--calibrate", "-1"], "argument --calibrate: -1 is outside"),
    (["--delta", "1"], "argument --delta: 1 is outside"),
    (["--delta", "0"], "--delta 0 asks for certainty"),
])
def test_bad_flags_give_one_line(argv, match, capsys):
    assert match in flag_error(sweep.parse_args, ["ckpt.pt", *argv], capsys)


def test_header_names_the_loss_weights_a_run_was_trained_with(tmp_path, capsys):
    """A --layer-weights run is named by its weights, not by the --loss default it never used."""
    (tmp_path / "tiny.txt").write_text(tiny_text())
    out = tmp_path / "lw.pt"
    train.main(train.parse_args(["--data", str(tmp_path / "tiny.txt"), "--out", str(out), *TINY_TRAIN,
                                 "--n-layer", "4", "--exit-layers", "2", "--layer-weights", "0,0.7,0,0.3"]))
    capsys.readouterr()
    run_sweep(out, "--thresholds", "0,1")
    header = capsys.readouterr().out.splitlines()[0]
    assert "exit after layer 2, loss weights L2=0.7, L4=0.3" in header and "asym" not in header


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """A tiny checkpoint with learned routers: trained on 4,000 characters, routers on the next 1,400."""
    tmp = tmp_path_factory.mktemp("routers")
    (tmp / "tiny.txt").write_text(tiny_text(7000))
    train.main(train.parse_args(["--data", str(tmp / "tiny.txt"), "--out", str(tmp / "r.pt"), *TINY_TRAIN,
                                 "--train-chars", "4000", "--router-chars", "2000"]))
    return tmp / "r.pt"


def test_learned_routers_are_measures_like_the_others(routed, capsys):
    assert set(ck.load_checkpoint(routed)["routers"]["state"]) == {"consistency", "loss", "kl", "gain"}
    res = run_sweep(routed, "--confidence", "all", "--mode", "both", "--thresholds", "0,0.5,1")
    printed = capsys.readouterr().out
    assert {r["confidence"] for r in res["rows"]} == {*ee.CONFIDENCE, "router-consistency", "router-loss", "router-kl", "router-gain"}
    for r in res["rows"]:
        if r["threshold"] in (0, 1):  # the endpoints do not depend on the measure
            assert r["shallow"] == (100.0 if r["threshold"] == 0 else 0.0)
            assert r["exit_ppl"] == pytest.approx(r["ppl"], rel=1e-5)
    at0 = {r["confidence"]: r["flops"] for r in res["rows"] if r["threshold"] == 0}  # all leave at the exit
    assert at0["router-gain"] > at0["router-kl"] > at0["softmax"] == at0["margin"]  # the gain router: 5 MLPs
    assert "## Against the oracle" in printed and "| router-loss |" in printed
    assert set(res["oracle_share"]["router-loss"]) == {"+1%", "+2%"}
    assert "| ceiling: KL to the last layer |" in printed and sweep.CEILING in res["oracle_share"]


def test_rows_carry_paired_bootstrap_intervals(ckpts, capsys):
    res = run_sweep(ckpts / "asym.pt", "--thresholds", "0,0.5,1", "--resamples", "200")
    for r in res["rows"]:
        assert r["ppl_lo"] <= r["ppl"] <= r["ppl_hi"] and r["delta_lo"] <= r["delta_ppl"] <= r["delta_hi"]
    full = [r for r in res["rows"] if r["threshold"] == 1][0]
    assert full["delta_lo"] == full["delta_hi"] == 0  # full depth against itself: no spread at all
    assert "ΔPPL vs full depth [95% CI]" in capsys.readouterr().out


def test_calibrated_thresholds_are_chosen_on_valid_and_shown_on_test(wiki_folder, tmp_path, capsys):
    out = tmp_path / "w.pt"
    train.main(train.parse_args(["--data", str(wiki_folder), "--out", str(out), *TINY_TRAIN]))
    capsys.readouterr()
    res = run_sweep(out, "--calibrate", "1,50", "--delta", "0.2")
    printed = capsys.readouterr().out
    assert "## Thresholds with a guarantee (ppl, delta 0.2)" in printed and "With probability at least 0.8" in printed
    tight, loose = res["calibrated"]
    assert float(loose[2]) <= float(tight[2]) <= 1.0  # a looser budget, a lower threshold (1.0: none certified)
    assert tight[-1] == "yes" or float(tight[2]) < 1.0  # never exiting always keeps its promise
    res = run_sweep(out, "--calibrate", "20", "--risk", "consistency")
    assert res["calibrated"][0][1] == "20%"
    (wiki_folder / "wiki.test.raw").unlink()  # no test split: said before the sweep, not after it
    capsys.readouterr()
    msg = cli_error(sweep.main, sweep.parse_args, [str(out), "--calibrate", "1"])
    assert "has no wiki.test.raw" in msg and "Threshold sweep" not in capsys.readouterr().out


def test_windows_and_details_sections(ckpts, capsys):
    run_sweep(ckpts / "asym.pt", "--windows", "--details", "--thresholds", "0,0.5,1")
    printed = capsys.readouterr().out
    for heading in ("## Windows leaving as a whole", "## Token- and window-level routing", "## Calibration of the exit",
                    "## Where exits go"):
        assert heading in printed, heading


def test_window_routing_moves_whole_windows_and_its_oracle_is_brute_force_best():
    g = torch.Generator().manual_seed(2)
    stats = {"ce": {1: torch.rand(12, generator=g), 3: torch.rand(12, generator=g)},
             "conf": {"softmax": {1: torch.rand(12, generator=g)}}, "window": 4}
    cfg = ee.GPTConfig(n_layer=3, exits=[1], block_size=4)
    depth = measure.window_depth(stats, 0.5, cfg)
    assert (depth.view(3, 4) == depth.view(3, 4)[:, :1]).all()
    mean = stats["conf"]["softmax"][1].view(3, 4).mean(1)
    assert torch.equal(depth.view(3, 4)[:, 0] == 1, mean >= 0.5)
    oracle = measure.window_oracle(stats, cfg)
    ce = {k: v.view(3, 4) for k, v in stats["ce"].items()}
    for n in range(4):
        best = min(sum((ce[3][w] if w in deep else ce[1][w]).sum() for w in range(3)).item() / 12
                   for deep in itertools.combinations(range(3), n))
        assert math.log(oracle[n]["ppl"]) == pytest.approx(best, rel=1e-6)


def test_oracle_share_and_character_classes_by_hand():
    rows = [{"ppl": 10.05, "compute": 70.0}, {"ppl": 10.5, "compute": 50.0}, {"ppl": 10.0, "compute": 100.0}]
    oracle = type("O", (), {"least_compute": lambda self, limit: 40.0})()
    assert measure.oracle_fraction(rows, 10.0, 1.0, oracle) == (30.0, 60.0, 0.5)
    itos = list(" \nab1,")
    target, previous = torch.tensor([0, 1, 2, 3, 4, 5, 2]), torch.tensor([2, 0, 0, 2, 3, 4, 4])
    cls, names = measure.char_class(target, itos, previous)
    assert [names[c] for c in cls] == ["space", "newline", "word start", "inside word", "digit", "punctuation",
                                       "word start"]


def test_the_ceiling_routes_by_the_kl_to_the_last_layer():
    """measure.ceiling_sweep: a character leaves when exp(-KL(last || exit) / 0.1) clears the threshold."""
    cfg = ee.GPTConfig(vocab_size=5, block_size=4, n_layer=3, n_head=2, n_embd=8, exits=[1])
    stats = {"ce": {1: torch.tensor([1.0, 2.0, 1.0, 3.0]), 3: torch.ones(4)}, "conf": {},
             "kl": {1: torch.tensor([0.0, 0.05, 0.001, 0.2])}, "window": 4}  # confidences 1, 0.607, 0.990, 0.135
    at = {r["threshold"]: r for r in measure.ceiling_sweep(stats, cfg)}
    assert at[0.9]["shallow"] == 50.0 and at[0.9]["ppl"] == pytest.approx(math.exp(1.0))
    assert at[0.5]["shallow"] == 75.0 and at[0.5]["ppl"] == pytest.approx(math.exp(1.25))
    assert at[1.0]["shallow"] == 0.0  # threshold 1 is full depth, whatever the confidence


def test_a_stride_scores_each_character_once_with_context(ckpts):
    """Windows overlapping by half: each character scored once (the last half of every window), and
    with a block of 16 every scored one has at least 8 characters of context. Against a reference
    that reads each scored character's logits from its own window."""
    model, vocab = ck.model_from_checkpoint(ck.load_checkpoint(ckpts / "asym.pt"))
    ids = vocab.encode(read_split(ckpts / "tiny.txt", "valid")[0][:200])
    stats = measure.token_stats(model, ids, 4, stride=8)
    n = (len(ids) - 1 - 16) // 8 + 1
    assert torch.equal(stats["target"], ids[16 - 8 + 1 : 16 + 8 * (n - 1) + 1]) and stats["window"] == 8
    want = []
    for w in range(n):
        x = ids[8 * w : 8 * w + 16].view(1, -1)
        want.append(F.cross_entropy(model.forward_all_layers(x)[3][0, 8:], ids[8 * w + 9 : 8 * w + 17], reduction="none"))
    assert torch.allclose(stats["ce"][3], torch.cat(want), atol=1e-5)
    row = measure.exit_metrics(model, ids, 1.0, 4, stride=8)
    assert row["ppl"] == pytest.approx(measure.ppl(stats["ce"][3]), rel=1e-5)


def test_a_subset_of_the_exits_routes_through_those_exits_only():
    """bench/exit_layers.py reads every single exit and pair from one pass over a model with a head
    on every layer: routing through exit 2 alone must never send a character out at exit 1."""
    model = make_model(n_layer=4, exits=[1, 2, 3])
    x = torch.randint(0, 23, (4, 16), generator=torch.Generator().manual_seed(0))
    stats = measure.token_stats(model, x.flatten(), 64)
    sub = ee.GPTConfig(**{**vars(model.config), "exits": [2]})
    depth = measure.routed_depth(stats, 0.0, sub)
    assert torch.equal(depth, torch.full_like(depth, 2))  # threshold 0: everyone leaves at the first exit it has
    row = measure.routed_metrics(stats, 0.0, sub)
    assert row["ppl"] == pytest.approx(measure.ppl(stats["ce"][2])) and row["compute"] == pytest.approx(50.0)


def test_sample_generates_with_a_learned_router(routed, capsys):
    """sample.py --confidence router-loss: the text and depths decode.generate gives with that router."""
    import decode
    import routers as learned
    import sample

    ckpt = ck.load_checkpoint(routed)
    model, vocab = ck.model_from_checkpoint(ckpt)
    router = learned.from_checkpoint(ckpt)["router-loss"]
    prompt = vocab.encode("the ").unsqueeze(0)
    for threshold in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99):  # one where the router sends some characters out, not all
        ids, depths = decode.generate(model, prompt, 30, threshold, temperature=0, confidence=router)
        if 0 < (depths == 1).sum() < 30:
            break
    assert 0 < (depths == 1).sum() < 30
    capsys.readouterr()
    sample.main(sample.parse_args([str(routed), "--prompt", "the ", "--max-new-tokens", "30", "--threshold", str(threshold),
                                   "--temperature", "0", "--confidence", "router-loss", "--color", "never"]))
    printed = capsys.readouterr().out
    assert printed.split("\n")[0] == "the " + vocab.decode(ids[0, 4:].tolist())
    assert f"exited at layer 1: {100 * (depths == 1).float().mean().item():.1f}%" in printed
    msg = cli_error(sample.main, sample.parse_args, [str(routed), "--confidence", "router-x", "--max-new-tokens", "5"])
    assert "no confidence measure 'router-x'" in msg and "router-loss" in msg


def test_the_ascii_plot_draws_every_measure_or_says_which_it_could_not(capsys):
    import report
    oracle = [{"compute": 100.0, "ppl": 5.0}, {"compute": 50.0, "ppl": 5.5}]
    series = [(f"m{i} (masked)", [(100.0 - i, 5.0 + 0.05 * i)]) for i in range(len(report.MARKERS) + 2)]
    report.frontier_plot(series[:8], oracle)  # every measure and router of --confidence all
    legend = capsys.readouterr().out.split("Compute (%)")[1]
    assert all(f"{m} m{i} (masked)" in legend for i, m in enumerate(report.MARKERS[:8])) and "not drawn" not in legend
    report.frontier_plot(series, oracle)
    n = len(report.MARKERS)
    assert f"(not drawn, no symbol left: m{n} (masked), m{n + 1} (masked))" in capsys.readouterr().out
