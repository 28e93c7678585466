"""The Triton kernels of mmrec::memory_read and memory_read_backward, run by Triton's
interpreter on CPU tensors (TRITON_INTERPRET=1), against the float64 reference: a broken
CUDA kernel fails CI, which has no GPU. Tolerances as in the ops' (tests/ops/specs.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import DTYPES, INTERPRETER_ONLY, nan_poison
from tests.ops.samples import MEMORY_READ_SAMPLES, memory_read_inputs, params
from tests.ops.specs import MEMORY_READ, Variant, check_against_reference

pytestmark = [pytest.mark.triton, INTERPRETER_ONLY]
OP = "memory_read"  # the launchers under test: mmrec_ops.triton.<OP> (the `interpreted` fixture)


def check_launchers(interpreted, inputs, dtype):
    """The launchers' forward and backward (NaN-poisoned) against the reference."""
    q, group, group_mask, tokens, first_token, window = inputs
    with nan_poison():
        out, lse = interpreted.memory_read(*inputs)
        grad_out, grad_lse = MEMORY_READ.grad_outputs(None, (out, lse))
        grads = interpreted.memory_read_backward(
            grad_out, grad_lse, q, group, group_mask, tokens, first_token, out, lse, window
        )
    grads = dict(zip(MEMORY_READ.differentiable, grads))
    check_against_reference(MEMORY_READ, inputs, Variant(), dtype, (out, lse), grads, (grad_out, grad_lse))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample", params(MEMORY_READ_SAMPLES, "triton"))
def test_memory_read_kernels_match_reference(interpreted, sample, dtype):
    check_launchers(interpreted, memory_read_inputs(sample, "cpu", dtype), dtype)


@pytest.mark.parametrize("sample", params(MEMORY_READ_SAMPLES, "triton_strided"))
def test_memory_read_kernels_strided(interpreted, sample):
    inputs = memory_read_inputs(sample, "cpu", torch.float32)
    assert not any(t.is_contiguous() for t in inputs[:4])  # all but first_token, a 0-dim tensor
    check_launchers(interpreted, inputs, torch.float32)


@pytest.mark.parametrize("sample", params(MEMORY_READ_SAMPLES, "triton_tiles"))
def test_memory_read_kernels_over_several_tiles(interpreted, sample):
    """More queries, candidates and window tokens than one tile of 64 each."""
    check_launchers(interpreted, memory_read_inputs(sample, "cpu", torch.float32), torch.float32)
