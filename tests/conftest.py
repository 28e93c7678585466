import os
import random

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_seed():
    """Every test draws fresh random inputs; the seed is printed (shown on
    failure) and MMREC_TEST_SEED=<seed> replays it."""
    seed = int(os.environ.get("MMREC_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"MMREC_TEST_SEED={seed}")
    torch.manual_seed(seed)
    yield seed
