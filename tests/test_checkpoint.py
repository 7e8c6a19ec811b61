"""checkpoint.py: save -> load gives the same model, atomic writes, clear errors for bad files, and
checkpoints written by earlier versions still load and compute what they computed then.

Run: python -m pytest tests/test_checkpoint.py -q
"""

from pathlib import Path

import pytest
import torch

import checkpoint as ck
import sweep
from conftest import make_model
from data import Vocab
from eemini import EEminiError

DATA = Path(__file__).resolve().parent / "data"
VOCAB = Vocab([chr(97 + i) for i in range(23)])


def test_save_load_gives_identical_logits(tmp_path):
    model = make_model(loss_weights={2: 0.5, 3: 0.5})
    ck.save_checkpoint(tmp_path / "m.pt", model, VOCAB, step=3)
    loaded, vocab = ck.model_from_checkpoint(ck.load_checkpoint(tmp_path / "m.pt"))
    x = torch.randint(0, 23, (2, 16))
    a, b = model.forward_all_layers(x), loaded.forward_all_layers(x)
    assert vocab.itos == VOCAB.itos and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.config == model.config and loaded.config.loss_weights == {2: 0.5, 3: 0.5}


def test_bad_checkpoints(tmp_path):
    corrupt, foreign = tmp_path / "corrupt.pt", tmp_path / "foreign.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    torch.save({"model": {}}, foreign)
    for path, match in ((tmp_path / "missing.pt", "no checkpoint at"), (corrupt, "not a readable checkpoint"),
                        (foreign, "not an eemini checkpoint")):
        with pytest.raises(EEminiError, match=match):
            ck.load_checkpoint(path)
    cascade = tmp_path / "cascade.pt"  # an eemini checkpoint of another kind (exit_classifier.py)
    ck.save_checkpoint(cascade, make_model(), Vocab(list("abc")), kind="cascade")
    with pytest.raises(EEminiError, match=r"cascade\.pt is a cascade checkpoint .*not a train\.py model"):
        ck.model_from_checkpoint(ck.load_checkpoint(cascade))


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    model = make_model()
    ck.save_checkpoint(path, model, VOCAB, step=1)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ck.save_checkpoint(path, model, VOCAB, step=2)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_a_checkpoint_of_the_first_format_still_loads_and_computes_the_same():
    """tests/data/v1_asym.pt was written by train.py at commit e59e0c9 (format eemini-1: one
    exit_layer, loss weights re-derived from the saved args); v1_reference.pt holds the logits that
    code computed from it. Loading upgrades it once: the weights come out resolved in the config."""
    ckpt = ck.load_checkpoint(DATA / "v1_asym.pt")
    assert ckpt["format"] == ck.FORMAT and ckpt["args"]["exit_layers"] == [1]
    model, _ = ck.model_from_checkpoint(ckpt)
    assert model.config.exits == [1] and model.config.loss_weights == pytest.approx({1: 0.7, 3: 0.3})
    ref = torch.load(DATA / "v1_reference.pt", weights_only=True)
    logits = model.forward_all_layers(ref["idx"])
    assert all(torch.allclose(logits[k], ref["logits"][k], atol=1e-6) for k in ref["logits"])
    exit_logits, depth, _ = model.forward_exit(ref["idx"], ref["threshold"])
    assert torch.equal(depth, ref["exit_depth"]) and torch.allclose(exit_logits, ref["exit_logits"], atol=1e-6)
    assert 0 < (depth < 3).sum() < depth.numel()


def test_v1_loss_final_checkpoint_keeps_its_untrained_exit_head(tmp_path):
    """A v1 checkpoint trained with --loss final had an exit head no loss reached: after the upgrade
    its config says so, and sweep.py refuses it as it did."""
    ckpt = torch.load(DATA / "v1_asym.pt", weights_only=True)
    ckpt["args"] = {**ckpt["args"], "loss": "final"}
    torch.save(ckpt, tmp_path / "final.pt")
    model, _ = ck.model_from_checkpoint(ck.load_checkpoint(tmp_path / "final.pt"))
    assert model.config.loss_weights == {3: 1.0} and model.config.exits == [1] and model.config.trained_exits == []
    with pytest.raises(EEminiError, match="never trained"):
        sweep.check_exit_trained(model.config, "final.pt")
