import os
import random

import pytest
import torch

# Without a GPU, Triton kernels can only run in Triton's interpreter, on CPU
# tensors (the `triton` tests). Triton reads this when it is first imported
# (its own library of @triton.jit helpers is decorated then), so it is set
# here, before anything imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def fresh_seed():
    """Every test draws fresh random inputs; the seed is printed (shown on
    failure) and MMREC_TEST_SEED=<seed> replays it."""
    seed = int(os.environ.get("MMREC_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"MMREC_TEST_SEED={seed}")
    torch.manual_seed(seed)
    yield seed


def pytest_collection_modifyitems(items):
    """The `install` test first: it compiles the library in a fresh venv for minutes, so
    with `-n 2` (scripts/test.sh) one worker builds while the other runs the rest."""
    items.sort(key=lambda item: item.get_closest_marker("install") is None)
