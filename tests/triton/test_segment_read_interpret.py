"""The Triton kernels of mmrec::segment_read and segment_read_backward, run by Triton's
interpreter on CPU tensors (TRITON_INTERPRET=1), against the float64 reference: a broken
CUDA kernel fails CI, which has no GPU. Tolerances as in the ops' (tests/ops/specs.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import DTYPES, INTERPRETER_ONLY, nan_poison
from tests.ops.samples import SEGMENT_READ_SAMPLES, SegmentReadSample, params, segment_read_inputs
from tests.ops.specs import SEGMENT_READ, Variant, check_against_reference, check_reads_with_empty_queries

pytestmark = [pytest.mark.triton, INTERPRETER_ONLY]
OP = "segment_read"  # the launchers under test: mmrec_ops.triton.<OP> (the `interpreted` fixture)


def run_launchers(interpreted, inputs):
    """(outputs, {name: gradient}, upstream gradients) of the launchers, NaN-poisoned."""
    with nan_poison():
        out, lse = interpreted.segment_read(*inputs)
        grad_out, grad_lse = SEGMENT_READ.grad_outputs(None, (out, lse))
        grads = interpreted.segment_read_backward(grad_out, grad_lse, *inputs, out, lse)
    return (out, lse), dict(zip(SEGMENT_READ.differentiable, grads)), (grad_out, grad_lse)


def check_launchers(interpreted, sample, inputs, dtype):
    outputs, grads, grad_outputs = run_launchers(interpreted, inputs)
    if sample.empty_queries:
        check_reads_with_empty_queries(inputs, dtype, outputs, grads, grad_outputs)
    else:
        check_against_reference(SEGMENT_READ, inputs, Variant(), dtype, outputs, grads, grad_outputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample", params(SEGMENT_READ_SAMPLES, "triton"))
def test_segment_read_kernels_match_reference(interpreted, sample, dtype):
    check_launchers(interpreted, sample, segment_read_inputs(sample, "cpu", dtype), dtype)


@pytest.mark.parametrize("sample", params(SEGMENT_READ_SAMPLES, "triton_strided"))
def test_segment_read_kernels_strided(interpreted, sample):
    inputs = segment_read_inputs(sample, "cpu", torch.float32)
    assert not any(t.is_contiguous() for t in inputs)
    check_launchers(interpreted, sample, inputs, torch.float32)


def test_segment_read_kernels_read_nothing_for_ids_out_of_range(interpreted):
    """The CUDA kernels do not check the ids (that would wait for the device): an id
    outside [0, M) reads nothing, as -1 does, and gets no gradient."""
    sample = SegmentReadSample((1, 4, 2, 8, 3, 5, 2))
    q, segments, ids = segment_read_inputs(sample, "cpu", torch.float32)
    ids[0, 1, 1], ids[0, 2, 1], ids[0, 3, 1] = 3, -7, 1000
    bad = torch.zeros_like(ids, dtype=torch.bool)
    bad[0, 1:, 1] = True
    outputs, grads, grad_outputs = run_launchers(interpreted, (q, segments, ids))
    check_against_reference(
        SEGMENT_READ, (q, segments, ids.masked_fill(bad, -1)), Variant(), torch.float32, outputs, grads, grad_outputs
    )
