"""Data-parallel training: two gloo processes on the CPU through torchrun.

Run: python -m pytest tests/test_ddp.py -q
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_TRAIN

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("extra", [[], ["--exit-layers", "1,2", "--exit-curriculum", "rotational"]])
def test_two_process_gloo_run(text_file, tmp_path, extra):
    """Two processes stay in step; under a curriculum too, where a resting exit's head gets no
    gradient on some steps (DDP must be told to expect unused parameters)."""
    out, dump = tmp_path / "ckpt.pt", tmp_path / "weights"
    argv = ["--data", str(text_file), "--out", str(out), *TINY_TRAIN, "--max-iters", "12",
            "--log-interval", "1", "--eval-interval", "100", "--lr", "1e-2", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_worker.py"), *argv, str(dump)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es)" in r.stdout and r.stdout.count("data: ") == 1  # rank 0 speaks for both
    steps = re.findall(r"^step +\d+/12 \| loss ([\d.]+)", r.stdout, flags=re.M)
    assert len(steps) == 12  # rank 0 logs, rank 1 stays quiet
    assert float(steps[-2]) < float(steps[0])  # the loss falls (steps 1 and 11 train the same heads)
    assert sorted(p.name for p in tmp_path.glob("ckpt*")) == ["ckpt.pt"]  # one checkpoint, no temp left
    ranks = [torch.load(f"{dump}.rank{r}", weights_only=True) for r in (0, 1)]
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    saved = torch.load(out, weights_only=True)["model"]
    assert all(torch.equal(saved[k], ranks[0][k]) for k in saved)  # no 'module.' prefixes
