"""torch.ops.mmrec.decode_read against the float64 reference.

The kernels compute the scores, the softmax and the weighted sum in float32
(float64 for float64) and round only the stored output, so the output carries
float32 accumulation and one rounding (output_tolerance). The backward is
composite and recomputes the softmax and the output in float32 from the
inputs, then rounds each gradient once: output_tolerance again.
"""

from __future__ import annotations

import pytest
import torch

import mmrec_ops
from mmrec_ops.reference import decode_read_reference
from tests.helpers import (
    DEVICES,
    DTYPES,
    assert_compiled_matches_eager,
    call_kernel,
    check_output,
    check_output_and_gradients,
)
from tests.ops.samples import (
    DECODE_READ_NAMES,
    DECODE_READ_SAMPLES,
    ReadSample,
    decode_read_inputs,
    entries,
    params,
)


def check_forward(inputs, dtype):
    check_output(mmrec_ops.decode_read, decode_read_reference, inputs, dtype)


def check_gradients(inputs, dtype):
    check_output_and_gradients(mmrec_ops.decode_read, decode_read_reference, inputs, DECODE_READ_NAMES, dtype)


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample", params(DECODE_READ_SAMPLES, "forward"))
def test_decode_read_matches_reference(sample, dtype, device):
    check_forward(decode_read_inputs(sample, device, dtype), dtype)


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample", params(DECODE_READ_SAMPLES, "gradients"))
def test_decode_read_gradients_match_reference(sample, dtype, device):
    check_gradients(decode_read_inputs(sample, device, dtype), dtype)


@pytest.mark.ops
@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample", params(DECODE_READ_SAMPLES, "strided"))
def test_decode_read_strided_inputs(sample, dtype, device):
    inputs = decode_read_inputs(sample, device, dtype)
    assert not any(t.is_contiguous() for t in inputs)
    check_forward(inputs, dtype)
    check_gradients(inputs, dtype)


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
def test_decode_read_all_slots_masked_gives_nan(device):
    """As softmax over nothing but -inf: NaN, not an arbitrary value."""
    q, keys, values, mask = decode_read_inputs(ReadSample((2, 3, 9, 8)), device, torch.float32)
    out = mmrec_ops.decode_read(q, keys, values, torch.full_like(mask, float("-inf")))
    assert out.isnan().all()


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", params(DECODE_READ_SAMPLES, "gradcheck"))
def test_decode_read_gradcheck(sample, device):
    inputs = [t.requires_grad_() for t in decode_read_inputs(sample, device, torch.float64)]
    assert torch.autograd.gradcheck(mmrec_ops.decode_read, inputs)
    assert torch.autograd.gradgradcheck(mmrec_ops.decode_read, inputs)


@pytest.mark.opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "requires_grad"])
def test_decode_read_opcheck(requires_grad, dtype, device):
    for sample in entries(DECODE_READ_SAMPLES, "opcheck"):
        args = tuple(t.requires_grad_(requires_grad) for t in decode_read_inputs(sample, device, dtype))
        torch.library.opcheck(torch.ops.mmrec.decode_read.default, args)


@pytest.mark.compile
@pytest.mark.parametrize("device", DEVICES)
def test_decode_read_compiles_without_graph_break(device):
    def loss_fn(q, keys, values, mask):
        return mmrec_ops.decode_read(torch.tanh(q), keys, values, mask).square().mean()

    assert_compiled_matches_eager(
        loss_fn,
        [
            [t.requires_grad_() for t in decode_read_inputs(sample, device, torch.float32)]
            for sample in entries(DECODE_READ_SAMPLES, "compile")
        ],
    )


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", params(DECODE_READ_SAMPLES, "empty"))
def test_decode_read_empty(sample, device):
    leaves = [t.requires_grad_() for t in decode_read_inputs(sample, device, torch.float32)]
    out = mmrec_ops.decode_read(*leaves)
    assert out.shape == leaves[0].shape
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    for leaf, grad in zip(leaves, grads):
        assert grad.shape == leaf.shape
        assert torch.equal(grad, torch.zeros_like(leaf)), "nothing reaches an output when B, H or d is 0"


def bad_decode_read_inputs():
    q, k, v, m = decode_read_inputs(ReadSample((2, 3, 5, 4)), "cpu", torch.float32)
    return [
        ("int_q", (q.long(), k, v, m), "q to be float32"),
        ("q_rank2", (q[0], k, v, m), r"q of shape \[B, H, d\] \(3 dims\)"),
        ("keys_rank3", (q, k[0], v, m), r"keys of shape \[B, H, K, d\] \(4 dims\)"),
        ("keys_dtype", (q, k.double(), v, m), "keys to have the dtype of q"),
        ("keys_heads", (q, k[:, :2], v, m), r"keys of shape \[2, 3, 5, 4\]"),
        ("keys_empty", (q, k[:, :, :0], v[:, :, :0], m[:0]), r"at least one slot \(K >= 1\), got K = 0"),
        ("values_shape", (q, k, v[:, :, :4], m), r"values of shape \[2, 3, 5, 4\]"),
        ("values_dtype", (q, k, v.half(), m), "values to have the dtype of q"),
        ("mask_shape", (q, k, v, m[:4]), r"mask of shape \[5\]"),
        ("mask_dtype", (q, k, v, m.bool()), "mask to have the dtype of q"),
    ]


@pytest.mark.ops
@pytest.mark.parametrize("kernel", ["cpu", "fake"])
@pytest.mark.parametrize("case", bad_decode_read_inputs(), ids=[c[0] for c in bad_decode_read_inputs()])
def test_decode_read_bad_inputs_raise_clear_errors(case, kernel):
    _, args, message = case
    with pytest.raises(ValueError, match=message):
        call_kernel(torch.ops.mmrec.decode_read, args, kernel)


@pytest.mark.ops
def test_decode_read_mixed_devices_raise_clear_errors():
    """A tensor on another device (meta stands in for one on machines without a GPU)."""
    q, k, v, m = decode_read_inputs(ReadSample((2, 3, 5, 4)), "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"values to be on the device of q \(cpu\), got meta"):
        torch.ops.mmrec.decode_read(q, k, v.to("meta"), m)
