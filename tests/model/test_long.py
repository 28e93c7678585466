"""Long sequences on CPU: 16K tokens in chunks give the same logits as one call, and
streaming memory does not grow with the context."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmrec_model import MMRecConfig, MMRecModel
from tests.helpers import assert_close_rel, output_tolerance

pytestmark = [pytest.mark.model, pytest.mark.long]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", ["exact", "parallel"])
def test_16k_tokens_in_chunks_agree(mode):
    """The tiny preset with a store of 4096 tokens (wrapped 3 times), each token
    retrieving 2 segments, over 16,384 tokens in one call and in chunks of 2048. In
    float64: the choice of segments is discrete, and float32 rounding, which differs
    between a chunked and a whole call (the carried recurrence), flips a near tie in
    the top-k about once in 32K tokens; float64's does not."""
    model = MMRecModel(MMRecConfig.preset("tiny", mode=mode, memory_tokens=4096, top_k=2)).double()
    ids = torch.randint(0, 256, (1, 16384))
    with torch.no_grad():
        logits, state = model(ids)
        chunked, chunked_state = model(ids, chunk_size=2048)
    assert logits.shape == (1, 16384, 256) and logits.isfinite().all()
    assert state.position.item() == chunked_state.position.item() == 16384
    assert_close_rel(chunked, logits, output_tolerance(torch.float64), "logits, chunks of 2048")


def streaming_peak_mib(n_tokens: int, chunk: int) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "tests.model.stream_memory", str(n_tokens), str(chunk)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return float(result.stdout.strip().splitlines()[-1])


def test_streaming_memory_does_not_grow_with_context():
    """Peak memory growth while streaming 32,768 tokens in chunks of 4096 (the store of
    8192 wrapped 3 times) stays within 1.5x of that for 8,192 tokens (each measured in a
    fresh process)."""
    short = streaming_peak_mib(8192, 4096)
    long = streaming_peak_mib(32768, 4096)
    print(f"peak memory growth: {short:.1f} MiB for 8,192 tokens, {long:.1f} MiB for 32,768")
    assert long <= 1.5 * short, (short, long)
