"""optim.py: Muon against torch.optim.Muon, which parameters each optimiser trains, the schedule.

Run: python -m pytest tests/test_optim.py -q
"""

import argparse

import pytest
import torch

import optim
from conftest import make_model


def test_muon_takes_torchs_step_up_to_its_bfloat16_rounding():
    torch.manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(48, 16)) for _ in range(2))
    b.data.copy_(a.data)
    start = a.detach().clone()
    ours, theirs = optim.Muon([a], lr=0.05, weight_decay=0.1), torch.optim.Muon([b], lr=0.05, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(48, 16)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert torch.allclose(ours.state[a]["momentum_buffer"], theirs.state[b]["momentum_buffer"])
    assert torch.allclose(a.detach(), b.detach(), atol=2e-3)  # bf16 keeps ~3 significant digits
    assert (a.detach() - start).abs().mean() > 0.01  # three real steps of ~0.0125 an entry (lr * sqrt(3) * 0.14)
    assert set(ours.state_dict()["state"][0]) == set(theirs.state_dict()["state"][0])


def test_newton_schulz_makes_the_update_nearly_orthogonal():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.zeros(32, 8))
    p.grad = torch.randn(32, 8)
    optim.Muon([p], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False).step()
    s = torch.linalg.svdvals(-p.detach() / optim.shape_scale(None, 32, 8))
    assert ((s > 0.5) & (s < 1.5)).all()  # Jordan's quintic: singular values ~U(0.5, 1.5), not 1 exactly


def test_muon_trains_the_blocks_matrices_and_adamw_the_rest():
    model = make_model(exits=[1])
    args = argparse.Namespace(optimizer="muon", lr=3e-3, muon_lr=0.02, weight_decay=0.1)
    muon, adam = optim.configure_optimizers(model, args)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert in_muon and all(".h." in f".{n}" and n.endswith("weight") for n in in_muon)
    in_adam = {names[id(p)] for g in adam.param_groups for p in g["params"]}
    assert in_muon | in_adam == set(names.values()) and not in_muon & in_adam
    assert {"transformer.wte.weight", "lm_head.weight", "exit_heads.1.head.weight"} <= in_adam
    optim.set_lr([muon, adam], 1e-3)
    assert muon.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.02 / 3e-3) and adam.param_groups[0]["lr"] == 1e-3
    (only,) = optim.configure_optimizers(model, argparse.Namespace(**{**vars(args), "optimizer": "adamw"}))
    assert sum(len(g["params"]) for g in only.param_groups) == len(names)


def test_lr_schedule():
    args = argparse.Namespace(lr=1e-3, min_lr=1e-4, warmup_iters=10, schedule_iters=110)
    assert optim.get_lr(0, args) == pytest.approx(1e-4)
    assert optim.get_lr(9, args) == pytest.approx(1e-3)
    assert optim.get_lr(60, args) == pytest.approx(5.5e-4)
    assert optim.get_lr(110, args) == pytest.approx(1e-4) and optim.get_lr(500, args) == pytest.approx(1e-4)


@pytest.mark.parametrize("kind, step, want", [
    ("none", 7, {1: 0.1, 2: 0.1, 3: 0.1, 4: 0.1, 5: 0.1, 6: 0.5}),
    ("rotational", 0, {2: 1 / 7, 4: 1 / 7, 6: 5 / 7}),  # (k - 0) % 2 == 0; the total 1 shared by what trains
    ("rotational", 1, {1: 0.125, 3: 0.125, 5: 0.125, 6: 0.625}),
    ("gradual", 0, {6: 1.0}),  # the last layer alone, then exits from the deepest down ...
    ("gradual", 10, {5: 1 / 6, 6: 5 / 6}),  # 2 * 5 exits * 10 // 100 = 1 switched on
    ("gradual", 49, {2: 0.1, 3: 0.1, 4: 0.1, 5: 0.1, 6: 0.5} | {k: 0.1 / 0.9 for k in (2, 3, 4, 5)} | {6: 0.5 / 0.9}),
    ("gradual", 50, {1: 0.1, 2: 0.1, 3: 0.1, 4: 0.1, 5: 0.1, 6: 0.5}),  # ... every one from the middle on
])
def test_exit_curriculum_tables(kind, step, want):
    weights = {1: 0.1, 2: 0.1, 3: 0.1, 4: 0.1, 5: 0.1, 6: 0.5}
    assert optim.curriculum(weights, 6, kind, step, 100) == pytest.approx(want)
