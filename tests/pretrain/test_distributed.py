"""`torchrun --nproc-per-node 2` on the CPU (gloo) matches one process with the same global batch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers import UNIT_ROUNDOFF, assert_close_rel
from tests.pretrain.cli import SMALL, environment, load, metrics, pretrain, succeeded

pytestmark = pytest.mark.pretrain

# The two runs see the same windows and the same initial weights; they differ
# only in the order of float32 sums: the batch mean (one sum of 4 windows, or
# two of 2 then an all-reduce) and the gradient average (likewise). That is a
# few roundings of u = 2^-24 per step; Adam's normalised update passes a
# relative gradient error on without amplifying it, and clipping rescales both
# runs alike, so over 6 steps 16 u bounds the relative error of the losses
# and of the weights. (Measured: 5e-8 and 7e-9.)
TOLERANCE = 16 * UNIT_ROUNDOFF[torch.float32]


def flat(state: dict) -> torch.Tensor:
    return torch.cat([state[name].double().flatten() for name in sorted(state)])


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, corpus_file, fresh_seed):
    args = [
        *SMALL,
        "--eval-batches",
        2,
        "--data",
        corpus_file,
        "--steps",
        6,
        "--eval-every",
        3,
        "--log-every",
        1,
        "--seed",
        fresh_seed,
    ]
    env = environment(OMP_NUM_THREADS="1")  # torchrun gives each of its processes one thread
    succeeded(pretrain([*args, "--out", tmp_path / "one"], tmp_path, env=env))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    two = tmp_path / "two"
    command = [*torchrun, "-m", "mmrec_model.pretrain", *map(str, args), "--out", str(two)]
    result = succeeded(subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300))
    assert "2 process(es)" in result.stdout
    assert result.stdout.count("val bits/byte") == 3  # rank 0 alone reports
    for split in ("train", "val"):
        one_losses = torch.tensor([r["loss"] for r in metrics(tmp_path / "one", split)], dtype=torch.float64)
        two_losses = torch.tensor([r["loss"] for r in metrics(two, split)], dtype=torch.float64)
        assert len(one_losses) == (6 if split == "train" else 3)
        assert_close_rel(two_losses, one_losses, TOLERANCE, what=f"{split} losses")
    a, b = load(tmp_path / "one")["model"], load(two)["model"]
    assert a.keys() == b.keys()
    assert_close_rel(flat(b), flat(a), TOLERANCE, what="weights")
    written = sorted(p.name for p in two.iterdir())
    assert written == [".lock", "checkpoint.pt", "config.json", "loss.png", "metrics.jsonl", "sample.txt"]
