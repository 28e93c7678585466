"""What the contract (tests/ops/test_contract.py) does not check of torch.ops.mmrec.segment_read:
gradients through one output alone, queries that read no segment (out 0, lse -inf) and
segment ids out of range. Its tolerances: tests/ops/specs.py. The Triton kernels also run
under Triton's interpreter on CPU tensors, with these checks:
tests/triton/test_segment_read_interpret.py.
"""

from __future__ import annotations

import pytest
import torch

import mmrec_ops
from tests.helpers import DEVICES, DTYPES, nan_poison
from tests.ops.samples import SEGMENT_READ_SAMPLES, SegmentReadSample, draw, params, segment_read_inputs
from tests.ops.specs import SEGMENT_READ, Variant, check_gradients, check_reads_with_empty_queries, lse_dtype


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("through", ["out", "lse"])
@pytest.mark.parametrize("sample", params(SEGMENT_READ_SAMPLES, "one_output"))
def test_segment_read_gradients_through_one_output(sample, through, dtype, device):
    """Through out alone, then lse alone (a read merged with others by its lse): each
    path checked on its own, not only in the sum."""
    args = segment_read_inputs(sample, device, dtype)
    B, T, H, _ = args[0].shape
    grad_out, grad_lse = draw(args[0].shape, device, dtype), draw((B, H, T), device, lse_dtype(dtype))
    (grad_lse if through == "out" else grad_out).zero_()
    check_gradients(SEGMENT_READ, sample, args, Variant(), dtype, (grad_out, grad_lse))


@pytest.mark.ops
@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample", params(SEGMENT_READ_SAMPLES, "no_segment"))
def test_segment_read_query_without_segment_reads_nothing(sample, dtype, device):
    """A query whose ids are all -1 gives out 0 and lse -inf, and gradients 0 for it and
    from it; the other queries (sharing its segments) are the reference's."""
    inputs = segment_read_inputs(sample, device, dtype)
    leaves = SEGMENT_READ.leaves(inputs)
    with nan_poison():
        outputs = mmrec_ops.segment_read(*SEGMENT_READ.with_args(inputs, leaves))
        grad_outputs = SEGMENT_READ.grad_outputs(sample, outputs)
        grads = dict(zip(leaves, torch.autograd.grad(outputs, list(leaves.values()), grad_outputs)))
    check_reads_with_empty_queries(inputs, dtype, outputs, grads, grad_outputs)


@pytest.mark.ops
@pytest.mark.parametrize("kernel", ["forward", "backward"])
@pytest.mark.parametrize("bad_id", [-2, 4, 100])
def test_segment_read_refuses_ids_out_of_range(bad_id, kernel):
    """On the CPU an id other than -1 outside [0, M) is a ValueError that names the argument
    and the values found (the CUDA kernels do not check: that would wait for the device)."""
    q, segments, ids = segment_read_inputs(SegmentReadSample((2, 5, 2, 4, 4, 3, 2)), "cpu", torch.float32)
    ids[1, 3, 0] = bad_id
    message = rf"segment_ids in \[-1, M\) = \[-1, 4\), got values from {int(ids.min())} to {int(ids.max())}"
    with pytest.raises(ValueError, match=message):
        if kernel == "forward":
            torch.ops.mmrec.segment_read.default(q, segments, ids)
        else:
            out, lse = torch.zeros_like(q), torch.zeros(2, 2, 5)
            torch.ops.mmrec.segment_read_backward.default(out, lse, q, segments, ids, out, lse)
