"""Running the pretraining and generation commands in fresh processes, as a user does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
# A model small enough that a step takes milliseconds, with windows longer
# than one memory segment (64) so that the long-term memory is written and read.
SMALL = [
    "--dim",
    "32",
    "--n-layers",
    "1",
    "--n-heads",
    "2",
    "--seq-len",
    "80",
    "--batch-size",
    "4",
    "--eval-batches",
    "1",
    "--sample-tokens",
    "16",
    "--device",
    "cpu",
]


def environment(**extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.update(extra)
    return env


def run_module(module: str, args: list, cwd: Path, env: dict | None = None, timeout: int = 300):
    command = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env or environment(), capture_output=True, text=True, timeout=timeout)


def pretrain(args: list, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return run_module("mmrec_model.pretrain", args, cwd, **kwargs)


def generate(args: list, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return run_module("mmrec_model.generate", args, cwd, **kwargs)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def metrics(run: Path, split: str) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == split]


def load(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, to show that nothing was written over."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
