"""train.py end to end, checkpoints, resume, and the one-line errors for bad input.

Run: python -m pytest tests/test_train.py -q
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eemini as ee
import train
from conftest import SHARED_DATA, TINY_TRAIN, make_model

ROOT = Path(__file__).resolve().parents[1]


def run_train(*argv):
    return train.main(train.parse_args(list(argv)))


def cli_error(main, parse_args, argv):
    """The one-line message a script prints for bad input (SystemExit, never a traceback)."""
    with pytest.raises(SystemExit) as e:
        ee.run_cli(main, lambda: parse_args(argv))
    msg = str(e.value.code)
    assert msg.startswith("error:") and "\n" not in msg, msg
    return msg


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
    args = [*TINY_TRAIN, "--n-layer", "4", "--exit-layer", "2", "--layer-weights", "0,0.7,0,0.3"]
    model = run_train("--data", str(wiki_folder), "--out", str(out), *args)
    assert model.config.head_layers == [2]  # no head where the weight is 0
    assert "wiki.valid.raw" in capsys.readouterr().out


def test_plain_one_layer_model(text_file, tmp_path, capsys):
    """Seed 000's 'Standard 1L': one layer, no exit point, loss on the last layer only."""
    out = tmp_path / "l1.pt"
    model = run_train("--data", str(text_file), "--out", str(out), *TINY_TRAIN, "--n-layer", "1",
                      "--exit-layer", "0", "--loss", "final")
    printed = capsys.readouterr().out
    assert "| Full depth (1L) |" in printed and "Exit only" not in printed and "Threshold Analysis" not in printed
    assert model.config.exits == [] and list(model.exit_heads) == []


def test_save_load_gives_identical_logits(tmp_path):
    model = make_model(head_layers=[2])
    vocab = ee.Vocab([chr(97 + i) for i in range(23)])
    ee.save_checkpoint(tmp_path / "m.pt", model, vocab, step=3)
    loaded, vocab2 = ee.model_from_checkpoint(ee.load_checkpoint(tmp_path / "m.pt"))
    x = torch.randint(0, 23, (2, 16))
    a, b = model.forward_all_layers(x), loaded.forward_all_layers(x)
    assert vocab2.itos == vocab.itos and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_exactly_where_it_stopped(text_file, tmp_path):
    """6 steps, then resume to 10 == 10 steps straight: same weights, no replayed batches, the same
    dropout masks, and training mode back on after each evaluation. (A constant learning rate,
    since the cosine's length depends on --max-iters.)"""
    base = ["--data", str(text_file), *TINY_TRAIN, "--eval-interval", "3", "--warmup-iters", "0",
            "--lr", "1e-3", "--min-lr", "1e-3", "--dropout", "0.1"]
    run_train(*base, "--out", str(tmp_path / "a.pt"), "--max-iters", "10")
    run_train(*base, "--out", str(tmp_path / "b.pt"), "--max-iters", "6")
    resumed = run_train(*base, "--out", str(tmp_path / "b.pt"), "--max-iters", "10", "--resume")
    straight = ee.load_checkpoint(tmp_path / "a.pt")
    assert ee.load_checkpoint(tmp_path / "b.pt")["step"] == 10
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


def test_batches_differ_between_steps():
    data = torch.arange(1000)
    g = torch.Generator()
    g.manual_seed(1), (a := train.get_batch(data, 8, 4, g, "cpu"))
    g.manual_seed(2), (b := train.get_batch(data, 8, 4, g, "cpu"))
    assert not torch.equal(a[0], b[0]) and torch.equal(a[1][:, :-1], a[0][:, 1:])


def test_lr_schedule():
    args = train.parse_args(["--lr", "1e-3", "--min-lr", "1e-4", "--warmup-iters", "10", "--max-iters", "110"])
    assert train.get_lr(0, args) == pytest.approx(1e-4)
    assert train.get_lr(9, args) == pytest.approx(1e-3)
    assert train.get_lr(60, args) == pytest.approx(5.5e-4)
    assert train.get_lr(110, args) == pytest.approx(1e-4)


@pytest.mark.parametrize("argv, match", [
    (["--alpha", "1.5"], "--alpha 1.5 is outside"),
    (["--threshold", "-0.1"], "--threshold -0.1 is outside"),
    (["--exit-layer", "3"], "--exit-layer 3 must be between 1 and"),
    (["--layer-weights", "1,2"], "--layer-weights has 2 entries"),
    (["--n-embd", "30", "--n-head", "4"], "not divisible"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--ffn-dim", "-4"], "--ffn-dim at least 0"),
    (["--n-layer", "2", "--layer-weights", "nan,1"], "finite"),
])
def test_bad_flags_give_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


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


def test_bad_checkpoints(tmp_path):
    corrupt, foreign = tmp_path / "corrupt.pt", tmp_path / "foreign.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    torch.save({"model": {}}, foreign)
    for path, match in ((tmp_path / "missing.pt", "no checkpoint at"), (corrupt, "not a readable checkpoint"),
                        (foreign, "not an eemini checkpoint")):
        with pytest.raises(ee.EEminiError, match=match):
            ee.load_checkpoint(path)
    msg = cli_error(train.main, train.parse_args, ["--resume", "--out", str(corrupt), *TINY_TRAIN])
    assert "not a readable checkpoint" in msg
    cascade = tmp_path / "cascade.pt"  # an eemini checkpoint of another kind (exit_classifier.py)
    ee.save_checkpoint(cascade, make_model(), ee.Vocab(list("abc")), kind="cascade")
    with pytest.raises(ee.EEminiError, match="cascade checkpoint, not a train.py model"):
        ee.model_from_checkpoint(ee.load_checkpoint(cascade))


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    model, vocab = make_model(), ee.Vocab([chr(97 + i) for i in range(23)])
    ee.save_checkpoint(path, model, vocab, step=1)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ee.save_checkpoint(path, model, vocab, step=2)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_cli_prints_one_line_and_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "c.pt")],
                       cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: no data at")
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data/wikitext-2")
def test_wikitext_loads_raw_variant_and_counts_unknowns():
    vocab, train_ids, val_ids = ee.load_data(SHARED_DATA, 500_000, 50_000)
    assert len(train_ids) == 500_000 and len(val_ids) == 50_000
    assert (val_ids == 0).sum().item() == 11  # 11 validation characters never occur in train
    assert vocab.decode(train_ids[:30].tolist()).startswith(" \n = Valkyria Chronicles III")


def test_grad_accum_matches_one_big_batch(text_file, tmp_path):
    """8 sequences at once == 2 micro-batches of 4 (the generator draws the same windows)."""
    base = ["--data", str(text_file), *TINY_TRAIN, "--max-iters", "3", "--eval-interval", "100"]
    big = run_train(*base, "--out", str(tmp_path / "a.pt"), "--batch-size", "8")
    acc = run_train(*base, "--out", str(tmp_path / "b.pt"), "--batch-size", "4", "--grad-accum", "2")
    for k, v in big.state_dict().items():
        assert torch.allclose(v, acc.state_dict()[k], atol=1e-5), k


def test_sample_cli_colours_by_depth(text_file, tmp_path, capsys):
    import sample

    out = tmp_path / "ckpt.pt"
    run_train("--data", str(text_file), "--out", str(out), *TINY_TRAIN)
    capsys.readouterr()
    argv = [str(out), "--prompt", "the ", "--max-new-tokens", "40", "--threshold", "0.0", "--color", "always"]
    sample.main(sample.parse_args(argv))
    printed = capsys.readouterr().out
    assert printed.count(sample.SHALLOW) == 40 + 1  # threshold 0: every character exits (+ legend)
    assert "exited at layer 1: 100.0%" in printed
    sample.main(sample.parse_args([*argv[:-4], "--threshold", "1.0", "--color", "always"]))
    printed = capsys.readouterr().out
    assert sample.SHALLOW not in printed.split("-" * 60)[0] and "exited at layer 1: 0.0%" in printed


def test_sample_refuses_an_untrained_exit_head(text_file, tmp_path):
    import sample

    out = tmp_path / "final.pt"
    run_train("--data", str(text_file), "--out", str(out), *TINY_TRAIN, "--loss", "final")
    msg = cli_error(sample.main, sample.parse_args, [str(out), "--threshold", "0.5", "--max-new-tokens", "5"])
    assert "--loss final: its exit head" in msg and "--threshold 1.0" in msg
    sample.main(sample.parse_args([str(out), "--threshold", "1.0", "--max-new-tokens", "5"]))  # full depth is fine


class FakeResponse:
    def __init__(self, blob):
        self.blob = blob

    def read(self):
        return self.blob

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def fake_wikitext_zip(tmp_path):
    import zipfile

    path = tmp_path / "fake.zip"
    with zipfile.ZipFile(path, "w") as z:
        for split in ("train", "valid", "test"):
            z.writestr(f"wikitext-2-raw/wiki.{split}.raw", f" = {split} = \n some text \n")
    return path.read_bytes()


def test_download_is_checked_and_unpacked_once(tmp_path, monkeypatch):
    import hashlib
    import urllib.request

    blob = fake_wikitext_zip(tmp_path)
    calls = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: calls.append(url) or FakeResponse(blob))
    with pytest.raises(ee.EEminiError, match="failed its sha256 check"):
        ee.download_wikitext(tmp_path / "cache")
    assert not (tmp_path / "cache" / "wikitext-2-raw").exists()
    monkeypatch.setattr(ee, "WIKITEXT_SHA256", hashlib.sha256(blob).hexdigest())
    folder = ee.download_wikitext(tmp_path / "cache")
    assert ee.read_split(folder, "valid")[0] == " = valid = \n some text \n"
    assert ee.download_wikitext(tmp_path / "cache") == folder and len(calls) == 2  # cached: no third fetch


def test_offline_download_is_one_clear_error(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ee.EEminiError, match="could not download WikiText-2.*pass --data"):
        ee.download_wikitext(tmp_path / "cache")


def test_folder_with_both_variants_reads_raw_for_every_split(wiki_folder):
    for split in ("train", "valid", "test"):
        (wiki_folder / f"wiki.{split}.tokens").write_text("<unk> " * 50)
    for split in ("train", "valid", "test"):
        text, source = ee.read_split(wiki_folder, split)
        assert source.endswith(f"wiki.{split}.raw") and "<unk>" not in text
    for split in ("train", "valid", "test"):
        (wiki_folder / f"wiki.{split}.raw").unlink()
    assert ee.read_split(wiki_folder, "valid")[1].endswith("wiki.valid.tokens")
