"""One torchrun rank of tests/test_ddp.py: train.py's main(), then this rank's weights to a file."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

if __name__ == "__main__":
    *argv, dump = sys.argv[1:]
    model = train.main(train.parse_args(argv))
    torch.save(model.state_dict(), f"{dump}.rank{os.environ['RANK']}")
