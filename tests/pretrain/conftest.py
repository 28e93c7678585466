import json
import os
import random
from pathlib import Path

import pytest

from tests.pretrain.cli import SMALL, pretrain, succeeded


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """About 48 KB of Python source (the json package): big enough for windows of 80 bytes in both splits."""
    folder = Path(json.__file__).parent
    path = tmp_path_factory.mktemp("data") / "json_source.txt"
    path.write_bytes(b"\n\n".join(p.read_bytes() for p in sorted(folder.glob("*.py"))))
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus_file) -> Path:
    """A finished short run (read-only for the tests that share it)."""
    seed = int(os.environ.get("MMREC_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"trained_run: MMREC_TEST_SEED={seed}")
    out = tmp_path_factory.mktemp("trained") / "run"
    args = [
        *SMALL,
        "--data",
        corpus_file,
        "--steps",
        6,
        "--eval-every",
        3,
        "--lr",
        "5e-3",
        "--seed",
        seed,
        "--out",
        out,
    ]
    succeeded(pretrain(args, out.parent))
    return out
