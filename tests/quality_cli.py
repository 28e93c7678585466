"""Running `python -m bench.quality` in fresh processes, as a user does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_quality(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.quality", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def refused(process: subprocess.Popen) -> str:
    """The one line a refused command printed last on stderr (its exit status 1)."""
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr[-3000:]
    return stderr.strip().splitlines()[-1]
