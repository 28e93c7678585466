"""What the contract (tests/ops/test_contract.py) does not check of torch.ops.mmrec.memory_read:
gradients through one output alone, first_token given as an int, and queries that see no
key. Its tolerances: tests/ops/specs.py. The Triton kernels also run under Triton's
interpreter on CPU tensors, with these checks: tests/triton/test_memory_read_interpret.py.
"""

from __future__ import annotations

import pytest
import torch

import mmrec_ops
from mmrec_ops.reference import memory_read_reference
from tests.helpers import DEVICES, accumulation_error, assert_close_rel, nan_poison, output_tolerance
from tests.ops.samples import MEMORY_READ_SAMPLES, MemoryReadSample, draw, memory_read_inputs, params
from tests.ops.specs import MEMORY_READ, Variant, check_gradients, lse_dtype


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("through", ["out", "lse"])
@pytest.mark.parametrize("sample", params(MEMORY_READ_SAMPLES, "one_output"))
def test_memory_read_gradients_through_one_output(sample, through, dtype, device):
    """Through out alone, then lse alone (a read merged with others by its lse): each
    path checked on its own, not only in the sum."""
    args = memory_read_inputs(sample, device, dtype)
    B, T, H, _ = args[0].shape
    grad_out, grad_lse = draw(args[0].shape, device, dtype), draw((B, H, T), device, lse_dtype(dtype))
    (grad_lse if through == "out" else grad_out).zero_()
    check_gradients(MEMORY_READ, sample, args, Variant(), dtype, (grad_out, grad_lse))


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
def test_memory_read_takes_first_token_as_an_int(device):
    """The Python wrapper takes first_token as an int too, the same read as the tensor's."""
    q, group, group_mask, tokens, first_token, window = memory_read_inputs(
        MemoryReadSample((2, 9, 2, 8, 3, 4, 3), missing=2), device, torch.float32
    )
    out, lse = mmrec_ops.memory_read(q, group, group_mask, tokens, first_token, window)
    out_int, lse_int = mmrec_ops.memory_read(q, group, group_mask, tokens, int(first_token), window)
    assert torch.equal(out, out_int) and torch.equal(lse, lse_int)


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
def test_memory_read_query_seeing_nothing_gives_nan(device):
    """As softmax over nothing: NaN and -inf, not an arbitrary value, for the query that
    sees no key (query 0: no candidate, its window's tokens missing), and the others'
    results unchanged (they share its tiles)."""
    sample = MemoryReadSample((2, 9, 2, 8, 3, 4, 3), missing=2)
    q, group, group_mask, tokens, first_token, window = memory_read_inputs(sample, device, torch.float32)
    group_mask[0, 0] = False
    first_token.fill_(window)  # query 0's window: tokens 0 .. W - 1; query 1 still sees token W
    with nan_poison():
        out, lse = mmrec_ops.memory_read(q, group, group_mask, tokens, first_token, window)
    assert out[:, 0].isnan().all() and (lse[:, :, 0] == float("-inf")).all()
    ref_out, ref_lse = memory_read_reference(
        q.double().cpu(), group.double().cpu(), group_mask.cpu(), tokens.double().cpu(), first_token.cpu(), window
    )
    assert_close_rel(out[:, 1:], ref_out[:, 1:], output_tolerance(torch.float32))
    assert_close_rel(lse[:, :, 1:], ref_lse[:, :, 1:], accumulation_error(torch.float32), what="lse")
    group_mask[:] = False
    first_token.fill_(tokens.shape[1])
    out, lse = mmrec_ops.memory_read(q, group, group_mask, tokens, first_token, window)
    assert out.isnan().all() and (lse == float("-inf")).all()
