"""exit_classifier.py and cascade.py (seed 004's cascade): labels, threshold, repacking, early stopping,
routing and its figures, CLI.

Run: python -m pytest tests/test_exit_classifier.py -q
"""

import math

import pytest
import torch
import torch.nn as nn

import cascade
import eemini as ee
import exit_classifier as ec
from conftest import cli_error, flag_error

TINY = ["--train-seqs", "60", "--seq-len", "8", "--n-embd", "16", "--n-head", "2", "--ffn-dim", "32",
        "--batch-size", "16", "--max-epochs", "2", "--exit-epochs", "2", "--exit-hidden", "8",
        "--val-chars", "600", "--device", "cpu"]


def tiny_cfg(vocab_size=11, seq_len=8):
    return ee.GPTConfig(vocab_size=vocab_size, block_size=seq_len, n_layer=4, n_head=2, n_embd=16, ffn_dim=32,
                        exits=[2])


def tokens(S=5, T=8, C=16, seed=0, p_live=0.5):
    g = torch.Generator().manual_seed(seed)
    return cascade.Tokens(torch.randn(S, T, C, generator=g), torch.randint(0, 11, (S, T), generator=g),
                     torch.rand(S, T, generator=g) < p_live, torch.arange(S * T).view(S, T))


class FixedLogits(nn.Module):
    """A stand-in block whose logits are given: softmax of [log 1, log 2, log 1] is [1/4, 1/2, 1/4]."""

    def forward(self, x, live=None):
        logits = torch.log(torch.tensor([1.0, 2.0, 1.0])).expand(*x.shape[:2], 3)
        return x.float().unsqueeze(-1).expand(*x.shape, 4), logits


def test_labels_against_hand_computation():
    tok = cascade.windows(torch.tensor([0, 0, 1, 2, 0]), 4)  # targets 0, 1, 2, 0
    out = cascade.block_outputs(FixedLogits(), tok, 8, "cpu")
    assert torch.allclose(cascade.label_distill(out["ce"], out["pmax"]), torch.full((1, 4), 0.5))
    assert torch.allclose(cascade.label_loss(out["ce"], out["pmax"]), torch.tensor([[0.25, 0.5, 0.25, 0.25]]))
    assert torch.allclose(out["ce"], -torch.log(torch.tensor([[0.25, 0.5, 0.25, 0.25]])))


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.9])
def test_threshold_leaves_hard_ratio_below_it(ratio):
    conf = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    thr = ec.hard_threshold(conf, ratio)
    assert (conf < thr).sum().item() == round(1000 * ratio)
    assert (~ee.exit_mask(conf, thr)).sum().item() == round(1000 * ratio)  # routing agrees: below = hard


def test_repack_keeps_every_hard_token_once_in_order():
    tok = tokens(S=6, T=8)
    packed = cascade.repack(tok, 8)
    n = tok.live.sum().item()
    assert packed.y.shape == (math.ceil(n / 8), 8) and packed.live.sum().item() == n
    assert torch.equal(packed.pos[packed.live], tok.pos[tok.live])  # each once, in text order
    assert torch.equal(packed.x[packed.live], tok.x[tok.live]) and torch.equal(packed.y[packed.live], tok.y[tok.live])
    assert not packed.live.flatten()[:n].logical_not().any()  # padding only at the end
    assert torch.equal(cascade.advance(tok, tok.x, torch.ones_like(tok.live), "inplace").live, tok.live)


def test_early_stopping_stops_after_patience_and_restores_best(monkeypatch):
    args = ec.parse_args(["--patience", "3", "--max-epochs", "20", "--batch-size", "4"])
    block = cascade.CascadeBlock(tiny_cfg(), 1, embed=True)
    scripted, seen = iter([5.0, 4.0, 4.5, 4.2, 4.1, 1.0, 1.0]), []

    def fake_val_ppl(b, tok, args, device):
        seen.append({k: v.clone() for k, v in b.state_dict().items()})
        return next(scripted)

    monkeypatch.setattr(ec, "val_ppl", fake_val_ppl)
    data = cascade.windows(torch.randint(0, 11, (200,), generator=torch.Generator().manual_seed(0)), 8)
    best = ec.fit("test", block, data, data, args, "cpu")
    assert best == 4.0 and len(seen) == 5  # best at epoch 2, then 3 epochs without improvement
    now = block.state_dict()
    assert all(torch.equal(now[k], seen[1][k]) for k in now)
    assert not all(torch.equal(now[k], seen[4][k]) for k in now)
    assert not any(p.requires_grad for p in block.parameters())  # frozen, head included


@pytest.mark.parametrize("context", ["inplace", "repack"])
def test_final_evaluation_routes_exactly_what_the_classifier_says(context):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    b0, b1, clf = cascade.CascadeBlock(cfg, 2, embed=True), cascade.CascadeBlock(cfg, 2), cascade.ExitClassifier(16, 8)
    held = cascade.windows(torch.randint(0, 11, (161,)), 8)
    args = ec.parse_args(["--batch-size", "4", "--hard-context", context, "--block-layers", "2,2"])
    with torch.no_grad():
        h0, logits0 = b0(held.x)
        conf = clf(h0)
        thr = conf.median().item()
        hard = conf < thr
        ce0 = nn.functional.cross_entropy(logits0.transpose(1, 2), held.y, reduction="none")
        if context == "inplace":  # block 1 on the whole text, updating hard tokens only
            ce1 = nn.functional.cross_entropy(b1(h0, hard)[1].transpose(1, 2), held.y, reduction="none")[hard]
        else:  # block 1 on the hard tokens alone, repacked in order
            n = hard.sum().item()
            x = torch.cat([h0[hard], torch.zeros(-n % 8, 16)]).view(-1, 8, 16)
            ce1 = nn.functional.cross_entropy(b1(x)[1].flatten(0, 1)[:n], held.y[hard], reduction="none")
    r = cascade.evaluate([b0, b1], [(clf, thr)], held, context, args.eval_batch_size, "cpu")
    assert torch.equal(r["exit_at"], hard.flatten().long())
    assert torch.allclose(r["ce"][~hard.flatten()], ce0[~hard], atol=1e-5)
    assert torch.allclose(r["ce"][hard.flatten()], ce1, atol=1e-5)
    assert torch.allclose(r["ce0"], ce0.flatten(), atol=1e-5)
    rep = cascade.figures(r, cfg, args.block_layers, args.hard_context)
    assert rep["shallow"] == pytest.approx(100 * (~hard).float().mean().item())
    assert rep["saved"] == pytest.approx(rep["shallow"] * 2 / 4)  # shallow x (layers after block 0) / all


def test_compare_end_to_end_and_checkpoint(wiki_folder, tmp_path, capsys):
    out = tmp_path / "ec.pt"
    results = ec.main(ec.parse_args(["--data", str(wiki_folder), "--compare", "--out", str(out), *TINY]))
    printed = capsys.readouterr().out
    assert "| Final PPL |" in printed and "| seed distill |" in printed and "exit epoch  2/2" in printed
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["methods"] == ["A", "B", "C"] and ckpt["block_layers"] == [2, 2]
    cascades, vocab = cascade.load(out)
    for m, (blocks, routers) in cascades.items():
        assert len(blocks) == 2 and routers[0][1] == results[m]["thresholds"][0]
        assert (routers[0][0] is None) == (m == "C")
    assert 0 < results["A"]["shallow"] < 100
    before = out.read_bytes()  # a second run never replaces it by accident
    argv = ["--data", str(wiki_folder), "--out", str(out), *TINY]
    assert "already exists" in cli_error(ec.main, ec.parse_args, argv) and out.read_bytes() == before
    ec.main(ec.parse_args([*argv, "--overwrite", "--seed", "7"]))
    assert out.read_bytes() != before


def test_joint_mode_and_three_blocks(wiki_folder, tmp_path):
    argv = ["--data", str(wiki_folder), "--out", str(tmp_path / "j.pt"), "--exit-classifier-mode", "joint",
            "--block-layers", "1,1,1", "--exit-label", "loss", "--hard-context", "inplace", *TINY]
    r = ec.main(ec.parse_args(argv))["B"]
    assert len(r["thresholds"]) == 2 and len(r["block_ppl"]) == 3


@pytest.mark.parametrize("argv, match", [
    (["--hard-ratio", "1.0"], "--hard-ratio 1.0 is outside (0, 1)"),
    (["--block-layers", "2"], "at least two blocks"),
    (["--block-layers", "2,x"], "argument --block-layers: wants an integer, got 'x'"),
    (["--block-layers", "2,0"], "argument --block-layers: 0 is outside [1, inf]"),
])
def test_bad_flags_give_one_line(argv, match, capsys):
    assert match in flag_error(ec.parse_args, argv, capsys)


def test_missing_data_is_one_error_line(tmp_path):
    argv = ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "ec.pt"), *TINY]
    assert cli_error(ec.main, ec.parse_args, argv).startswith("error: no data at")
