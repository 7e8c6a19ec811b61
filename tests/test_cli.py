"""Every script from the command line: a tiny run of each as its own process (exit code, the lines a
user reads, one error line for bad input), and the shared vocabulary of flags and --help.

Run: python -m pytest tests/test_cli.py -q
"""

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import cli
from conftest import TINY_TRAIN, cli_error, flag_error

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train.py", "sweep.py", "sample.py", "exit_classifier.py", "reproduce.py", "docs.py",
           "bench/train_step.py", "bench/sweep_speed.py", "bench/generate.py", "bench/ablation.py", "bench/exit_gap.py",
           "bench/exit_layers.py", "bench/acceptance.py", "bench/router_data.py", "bench/step_cost.py"]


def run(script, *argv):
    r = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    return r.returncode, r.stdout, r.stderr.strip()


def load(script):
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint written by `python train.py` itself."""
    from conftest import tiny_text

    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "tiny.txt").write_text(tiny_text())
    code, out, err = run("train.py", "--data", tmp / "tiny.txt", "--out", tmp / "ckpt.pt", *TINY_TRAIN)
    assert code == 0, err
    assert "## Threshold Analysis" in out and "saved" in out.splitlines()[-1]
    return tmp


def test_sweep_sample_and_benchmarks_run_on_it(trained):
    ckpt = trained / "ckpt.pt"
    code, out, err = run("sweep.py", ckpt, "--thresholds", "0,0.5,1")
    assert code == 0 and "## Threshold sweep" in out and "oracle frontier" in out, err
    code, out, err = run("sample.py", ckpt, "--max-new-tokens", "20", "--color", "never")
    assert code == 0 and "tok/s" in out, err
    code, out, err = run("bench/sweep_speed.py", ckpt, "--repeats", "1")
    assert code == 0 and "ratio" in out, err
    code, out, err = run("bench/generate.py", ckpt, "--batch-sizes", "1,2", "--rounds", "1", "--new-tokens", "8",
                         "--draft-lengths", "2", "--draft-stops", "0.99")
    lines = [line.split(" | ") for line in out.splitlines() if line[:4] in ("| 1 ", "| 2 ")]
    rows, costs = [c[:2] for c in lines if len(c) == 7], [c for c in lines if len(c) == 3]  # the two tables
    assert code == 0 and len(rows) == 8 and "OUTPUT DIFFERS" not in out, err
    assert "| batch | n = 1 | n = 3 |" in out and len(costs) == 2 and all(c[1].endswith("(1.0x)") for c in costs)
    assert [m for _, m in rows[:4]] == ["full depth", "confidence exit (per row)", "CALM batch rule",
                                        "self-speculative (exit 1, K=2, stop 0.99)"]
    code, out, err = run("bench/generate.py", ckpt, "--batch-sizes", "2", "--rounds", "1", "--new-tokens", "8",
                         "--draft-lengths", "1,3", "--draft-stops", "0,0.5", "--every-draft")
    cells = [line.split(" | ") for line in out.splitlines() if line.startswith("| 2 | self")]
    assert code == 0 and "OUTPUT DIFFERS" not in out, err
    assert [c[1] for c in cells] == [f"self-speculative (exit 1, K={k}{s})" for k in (1, 3) for s in ("", ", stop 0.5")]
    per_pass = [float(c[4].split(", ")[1].split()[0]) for c in cells]  # each row ran its own K: 1 draft gives <= 2
    assert max(per_pass[:2]) <= 2.0 < per_pass[2]
    code, out, err = run("bench/train_step.py", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size",
                         "4", "--steps", "1", "--rounds", "1")
    assert code == 0 and "step-time ratio" in out, err


def test_acceptance_benchmark_prints_what_decoding_accepts(trained, capsys):
    """bench/acceptance.py's row: the exit's agreement with the last layer on the text, and the share of
    greedy drafts decode.speculative accepts from the same prompts."""
    import checkpoint as ck
    import decode
    import measure

    module = load("bench/acceptance.py")
    args = module.parse_args([str(trained / "ckpt.pt"), "--prompts", "3", "--new-tokens", "12", "--draft-length", "3"])
    module.main(args)
    row = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][-1]
    ckpt = ck.load_checkpoint(trained / "ckpt.pt")
    model, vocab = ck.model_from_checkpoint(ckpt)
    ids, _ = ck.eval_text(args, ckpt, vocab)
    stats = measure.token_stats(model, ids)
    prompt = torch.stack([ids[s : s + 32] for s in (torch.arange(3) * (len(ids) - 32) // 3).tolist()])
    _, spec = decode.speculative(model, prompt, 12, 1, 3, temperature=0)
    assert row[2:6] == ["1", f"{measure.ppl(stats['ce'][1]):.3f}",
                        f"{100 * (stats['top'][1] == stats['top'][3]).float().mean():.1f}%", f"{100 * spec.acceptance:.1f}%"]


def test_generate_benchmark_drafts_and_routes_only_with_a_trained_exit(trained):
    module = load("bench/generate.py")
    msg = cli_error(module.main, module.parse_args, [str(trained / "ckpt.pt"), "--draft-exits", "2", "--device", "cpu"])
    assert msg.startswith("error: --draft-exits 2: ") and msg.endswith("trained exits are [1]; draft with those")
    msg = cli_error(module.main, module.parse_args, [str(trained / "ckpt.pt"), "--route-exits", "2", "--device", "cpu"])
    assert msg.startswith("error: --route-exits 2: ") and msg.endswith("trained exits are [1]; route through those")
    msg = cli_error(module.main, module.parse_args, [str(trained / "ckpt.pt"), "--draft-lengths", "2,15", "--device", "cpu"])
    assert "a draft must fit in the model's context of 16" in msg


def test_step_cost_benchmark_adds_up_its_steps(trained):
    """bench/step_cost.py: its FLOPs add up as measure.flops_percent counts a routing (an exited character
    followed by a deep one, of a 3-layer model with exit 1, is half its characters leaving); a character
    that leaves at exit 1 of 3 is charged (layer + head) / (3 layers + head) of a full step; the exit rates
    add the steps up as hand arithmetic does; an untrained exit and a context with no room are refused."""
    import measure
    from conftest import make_model

    module = load("bench/step_cost.py")
    cost = dict(zip(module.KINDS, (10.0, 2.0, 11.0, 12.5)))
    assert module.predict(cost, 1.0, 0.5) == (0.5 * (2 + 1) + 0.5 * 11) / 10
    assert module.predict(cost, 1.0, 0.0) == 1.1 and module.layer_count(0.5, 6, 1) == 6 / 3.5
    cfg = make_model(n_layer=6, exits=[2]).config
    flops, kv = module.step_flops(cfg, 2, 8)
    for depth, rate in (([2, 6], 0.5), ([2, 2, 6, 6], 0.5), ([2, 6, 6, 6], 0.25), ([6, 6], 0.0)):
        want = measure.flops_percent(torch.tensor([depth]), cfg, context=8, checked=[2]) / 100
        assert abs(module.predict(flops, kv, rate) - want) < 1e-12, depth
    code, out, err = run("bench/step_cost.py", trained / "ckpt.pt", "--steps", "3", "--exit-rates", "0,0.5")
    assert code == 0, err
    rows = {r[0]: r[1:] for r in (line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| "))}
    tiny = module.ck.model_from_checkpoint(module.ck.load_checkpoint(trained / "ckpt.pt"))[0].config
    layer, head, kv = measure.flops_per_token(tiny, 8)
    assert rows["full depth"][1:] == ["1.000", "1.000"]
    assert rows["leaves at the exit"][2] == f"{(layer + head) / (3 * layer + head):.3f}"
    assert rows["K/V of one exited character in layers 2-3 (row 4 - row 3)"][2] == f"{2 * kv / (3 * layer + head):.3f}"
    assert rows["0%"][0] == "1.00x" and rows["0%"][1].startswith(f"{(3 * layer + head) / (3 * layer + 2 * head):.2f}x")
    assert rows["50%"][0] == f"{3 / 2:.2f}x"
    for argv, match in ((["--exit", "2"], "--exit 2: "), (["--context", "15"], "--context 15: the steps need room")):
        assert match in cli_error(module.main, module.parse_args, [str(trained / "ckpt.pt"), *argv, "--device", "cpu"])


def test_router_data_benchmark_refuses_to_learn_from_the_scored_text(trained):
    module = load("bench/router_data.py")
    msg = cli_error(module.main, module.parse_args, [str(trained / "ckpt.pt"), "--skip", "500", "--device", "cpu"])
    assert msg == "error: --skip 500 would train routers on the scored valid text; give --skip at least --val-chars (1,000)"
    msg = cli_error(module.main, module.parse_args, [str(trained / "ckpt.pt"), "--val-chars", "0", "--device", "cpu"])
    assert msg.startswith("error: --val-chars 0 scores the whole valid split")
    msg = cli_error(module.main, module.parse_args, [str(trained / "ckpt.pt"), "--split", "test", "--skip", "500"])
    assert "would train routers on the scored test text" in msg  # its stand-in text runs on into the test split
    msg = cli_error(module.main, module.parse_args, [str(trained / "ckpt.pt"), "--sizes", "10000000", "--device", "cpu"])
    assert "the longest slice here has" in msg and "give smaller sizes" in msg


def test_scripts_refuse_an_untrained_exit_and_bad_places_before_any_work(trained, tmp_path):
    """A model whose exit no loss reached has nothing to draft or route with; an output that is a file
    where a folder goes, or not the kind written, or a --remeasure with nothing finished, is refused
    before anything is trained or written."""
    import checkpoint as ck
    from conftest import make_model
    from data import Vocab

    plain = tmp_path / "final.pt"
    ck.save_checkpoint(plain, make_model(loss_weights={3: 1.0}), Vocab([chr(97 + i) for i in range(23)]), args={})
    for script, match in (("bench/acceptance.py", "has no trained exit to draft with"),
                          ("bench/router_data.py", "takes a model with one trained exit"),
                          ("bench/sweep_speed.py", "has no trained exit, so there is no sweep to time"),
                          ("bench/generate.py", "has no trained exit to benchmark"),
                          ("bench/step_cost.py", "has no trained exit to benchmark")):
        module = load(script)
        assert match in cli_error(module.main, module.parse_args, [str(plain), "--device", "cpu"])
    (tmp_path / "a.txt").write_text("a file")
    data = str(trained / "tiny.txt")
    for script, argv, match in (
            ("reproduce.py", ["--quick", "--out-dir", tmp_path / "a.txt"], "cannot make the folder"),
            ("reproduce.py", ["--quick", "--out-dir", tmp_path / "r", "--results", plain], "give a file ending in .md"),
            ("reproduce.py", ["--remeasure", "--out-dir", tmp_path / "r", "--results", tmp_path / "r.md"],
             "holds none of these"),
            ("bench/ablation.py", ["--out-dir", tmp_path / "a.txt"], "cannot make the folder")):
        module = load(script)
        assert match in cli_error(module.main, module.parse_args, ["--data", data, *map(str, argv)])
    assert plain.read_bytes()[:2] == b"PK" and not list(tmp_path.glob("r/*.pt"))  # nothing trained, nothing replaced
    docs = load("docs.py")
    assert "its blocks: quickstart" in cli_error(docs.main, docs.parse_args, ["--only", "nosuch"])
    assert "quotes no output" in cli_error(docs.main, docs.parse_args, ["--readme", str(tmp_path / "a.txt")])


def test_exit_classifier_runs(wiki_folder, tmp_path):
    code, out, err = run("exit_classifier.py", "--data", wiki_folder, "--out", tmp_path / "ec.pt", "--train-seqs", "40",
                         "--seq-len", "8", "--n-embd", "16", "--n-head", "2", "--ffn-dim", "32", "--max-epochs", "1",
                         "--exit-epochs", "1", "--val-chars", "400")
    assert code == 0 and "| Final PPL |" in out and (tmp_path / "ec.pt").exists(), err


@pytest.mark.parametrize("script, argv", [
    ("train.py", ["--data", "/nonexistent/eemini", "--out", "/nonexistent/x.pt"]),
    ("sweep.py", ["/nonexistent/ckpt.pt"]),
    ("sample.py", ["/nonexistent/ckpt.pt"]),
    ("exit_classifier.py", ["--data", "/nonexistent/eemini", "--out", "/nonexistent/ec.pt"]),
    ("reproduce.py", ["--data", "/nonexistent/eemini", "--out-dir", "/nonexistent/runs"]),
    ("bench/generate.py", ["/nonexistent/ckpt.pt"]),
    ("bench/sweep_speed.py", ["/nonexistent/ckpt.pt"]),
])
def test_bad_input_is_one_line(script, argv):
    module = load(script)
    assert cli_error(module.main, module.parse_args, [*argv, "--device", "cpu"]).startswith("error: no ")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default(script, capsys):
    module = load(script)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default:" in text
    assert "Traceback" not in text and text.splitlines()[0].startswith("usage:")
    flat = " ".join(text.split())  # a default is shown as one would type it, once, and never as nothing
    for shown in ("(default: None)", "(default: False)", "(default: )", "(default: [", "(default: '", "SUPPRESS"):
        assert shown not in flat, (shown, script)
    if script == "train.py":  # a zero is a default like any other; a list is written as typed
        assert "(0 = 4 * n-embd) (default: 0)" in flat and "(default: 1)" in flat


@pytest.mark.parametrize("script, flag", [("bench/generate.py", "--batch-sizes"), ("bench/generate.py", "--draft-lengths"),
                                          ("bench/exit_gap.py", "--thresholds")])
def test_a_benchmark_refuses_an_empty_list(script, flag, capsys):
    assert f"argument {flag}: is empty; give at least one value" in flag_error(load(script).parse_args, ["x.pt", flag, ""], capsys)


def test_shared_argument_types():
    assert cli.comma_list(cli.number(int, 0))("1, 2,3") == [1, 2, 3] and cli.comma_list(int)("") == []
    assert cli.threshold("0.25") == 0.25 and cli.number(float, 0.0, 1.0, hi_open=True)("0.5") == 0.5
    for bad, rule in (("nan", cli.threshold), ("1.01", cli.threshold), ("inf", cli.number(float)),
                      ("1.0", cli.number(float, 0.0, 1.0, hi_open=True)), ("2.5", cli.number(int)),
                      (" ", cli.comma_list(int, empty=False))):
        with pytest.raises(argparse.ArgumentTypeError):
            rule(bad)


def test_router_data_corrected_kl_recovers_a_known_line():
    """bench/router_data.py's signed KL: when what the KL misses of the realised loss difference is
    exactly a line in the exit's max softmax (here 0.3 - 0.5 * softmax), the ridge fit recovers it, and
    the scored characters get their KL plus that line, computed by hand."""
    module = load("bench/router_data.py")
    gen = torch.Generator().manual_seed(0)
    def examples(n):
        logits, h, h_prev = torch.randn(n, 7, generator=gen) * 2, torch.randn(n, 5, generator=gen), torch.randn(n, 5, generator=gen)
        kl = torch.rand(n, generator=gen)
        return logits, h, h_prev, kl
    logits, h, h_prev, kl = examples(4000)
    gain = kl + 0.3 - 0.5 * F.softmax(logits, -1).max(-1).values
    s_logits, s_h, s_prev, s_kl = examples(50)
    import routers
    train = (routers.features(logits, h, h_prev), torch.ones(4000, dtype=torch.bool), gain, kl)
    got = module.corrected_kl({"kl": {1: s_kl}}, 1, train, routers.features(s_logits, s_h, s_prev), ridge=1e-9)
    want = s_kl + 0.3 - 0.5 * F.softmax(s_logits, -1).max(-1).values
    assert torch.allclose(got, want, atol=1e-4)


def test_exit_gap_attention_probe_at_either_end():
    """The probe's shares, for the deep characters' queries above the exit: at threshold 1 nothing exits
    (no attention on exited characters); at threshold 0 everything does, so there is no deep query
    and nothing to average (None, printed as a dash), not a share of 0."""
    from conftest import make_model

    probe = load("bench/exit_gap.py").attention_probe
    model, ids = make_model(), torch.randint(0, 23, (200,))
    on_exited, on_previous, distance = probe(model, ids, 1.0, batch_size=4)
    assert on_exited == 0.0 and 0 < on_previous < 1 and distance > 0
    assert probe(model, ids, 0.0, batch_size=4) == [None, None, None]


def test_router_data_saves_a_checkpoint_whose_routers_learned_from_the_stand_in_text(tmp_path, capsys):
    """--save-routers: the same weights (and checksum), and train.py's four routers fitted, as fit_examples
    fits them, on the stand-in slice (valid past --skip, then test past --skip), never on scored text."""
    import checkpoint as ck
    import routers
    import train
    from conftest import tiny_text
    for split, seed in (("train", 0), ("valid", 1), ("test", 2)):
        (tmp_path / f"wiki.{split}.raw").write_text(tiny_text(4000, seed))
    model_path, out = tmp_path / "m.pt", tmp_path / "m-routers.pt"
    train.main(train.parse_args(["--data", str(tmp_path), "--out", str(model_path), *TINY_TRAIN, "--router-chars", "0"]))
    module = load("bench/router_data.py")
    argv = [str(model_path), "--sizes", "3500", "--seeds", "1", "--skip", "1000", "--save-routers", str(out)]
    module.main(module.parse_args(argv))
    assert f"wrote {out}: m.pt with routers learned from 3,488 characters of the valid, then test" in capsys.readouterr().out
    saved, original = ck.load_checkpoint(out), ck.load_checkpoint(model_path)
    assert saved["checksum"] == original["checksum"] and saved["routers"]["learned_from"].startswith("3,488 characters")
    model, vocab = ck.model_from_checkpoint(original)
    stand_in = (tiny_text(4000, 1)[1000:] + tiny_text(4000, 2)[1000:])[:3500]  # 3,000 valid characters, then test's
    want = routers.fit_examples(routers.exit_examples(model, vocab.encode(stand_in)), 16)
    got = routers.from_checkpoint(saved)
    x = torch.randn(5, 20)
    for label in routers.LABELS:
        assert torch.equal(got[f"router-{label}"][1].score(x), want[label][1].score(x)), label
    msg = cli_error(module.main, module.parse_args, argv)  # never over a file that is there
    assert "is there already; give another name" in msg
