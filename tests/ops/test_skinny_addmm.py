"""torch.ops.mmrec.skinny_addmm against the float64 reference.

The kernels multiply and sum in float32 (float64 for float64; exact products, no
TF32) and round only the stored output: float32 accumulation and one rounding
(output_tolerance). The backward is composite, one PyTorch product or sum per
gradient, each rounded once: output_tolerance again.
"""

from __future__ import annotations

import pytest
import torch

import mmrec_ops
from mmrec_ops.reference import skinny_addmm_reference
from tests.helpers import (
    DEVICES,
    DTYPES,
    assert_compiled_matches_eager,
    call_kernel,
    check_output,
    check_output_and_gradients,
)
from tests.ops.samples import (
    SKINNY_ADDMM_NAMES,
    SKINNY_ADDMM_SAMPLES,
    ProductSample,
    entries,
    params,
    skinny_addmm_inputs,
)


def out_shape(inputs):
    _, x, weight = inputs
    return x.shape[0], weight.shape[1]


def check_forward(inputs, dtype):
    check_output(mmrec_ops.skinny_addmm, skinny_addmm_reference, inputs, dtype)


def check_gradients(inputs, dtype):
    check_output_and_gradients(mmrec_ops.skinny_addmm, skinny_addmm_reference, inputs, SKINNY_ADDMM_NAMES, dtype)


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample", params(SKINNY_ADDMM_SAMPLES, "forward"))
def test_skinny_addmm_matches_reference(sample, dtype, device):
    check_forward(skinny_addmm_inputs(sample, device, dtype), dtype)


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample", params(SKINNY_ADDMM_SAMPLES, "gradients"))
def test_skinny_addmm_gradients_match_reference(sample, dtype, device):
    check_gradients(skinny_addmm_inputs(sample, device, dtype), dtype)


@pytest.mark.ops
@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample", params(SKINNY_ADDMM_SAMPLES, "strided"))
def test_skinny_addmm_strided_inputs(sample, dtype, device):
    inputs = skinny_addmm_inputs(sample, device, dtype)
    assert not any(t.is_contiguous() for t in inputs)
    check_forward(inputs, dtype)
    check_gradients(inputs, dtype)


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", params(SKINNY_ADDMM_SAMPLES, "gradcheck"))
def test_skinny_addmm_gradcheck(sample, device):
    inputs = [t.requires_grad_() for t in skinny_addmm_inputs(sample, device, torch.float64)]
    assert torch.autograd.gradcheck(mmrec_ops.skinny_addmm, inputs)
    assert torch.autograd.gradgradcheck(mmrec_ops.skinny_addmm, inputs)


@pytest.mark.opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "requires_grad"])
def test_skinny_addmm_opcheck(requires_grad, dtype, device):
    for sample in entries(SKINNY_ADDMM_SAMPLES, "opcheck"):
        args = tuple(t.requires_grad_(requires_grad) for t in skinny_addmm_inputs(sample, device, dtype))
        torch.library.opcheck(torch.ops.mmrec.skinny_addmm.default, args)


@pytest.mark.compile
@pytest.mark.parametrize("device", DEVICES)
def test_skinny_addmm_compiles_without_graph_break(device):
    def loss_fn(bias, x, weight):
        return mmrec_ops.skinny_addmm(bias, torch.tanh(x), weight).square().mean()

    assert_compiled_matches_eager(
        loss_fn,
        [
            [t.requires_grad_() for t in skinny_addmm_inputs(sample, device, torch.float32)]
            for sample in entries(SKINNY_ADDMM_SAMPLES, "compile")
        ],
    )


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", params(SKINNY_ADDMM_SAMPLES, "empty"))
def test_skinny_addmm_empty(sample, device):
    """M, K or N = 0: with K = 0 every output is its bias, and no gradient reaches x or
    weight; otherwise the output is empty."""
    leaves = [t.requires_grad_() for t in skinny_addmm_inputs(sample, device, torch.float32)]
    out = mmrec_ops.skinny_addmm(*leaves)
    assert out.shape == out_shape(leaves)
    assert torch.equal(out, leaves[0].detach().expand(out.shape))
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    for leaf, grad in zip(leaves, grads):
        assert grad.shape == leaf.shape
    assert torch.equal(grads[0], torch.full_like(leaves[0], out.shape[0]))


def bad_skinny_addmm_inputs():
    b, x, w = skinny_addmm_inputs(ProductSample((2, 5, 4)), "cpu", torch.float32)
    return [
        ("int_x", (b, x.long(), w), "x to be float32"),
        ("x_rank3", (b, x[None], w), r"x of shape \[M, K\] \(2 dims\)"),
        ("weight_rank1", (b, x, w[0]), r"weight of shape \[K, N\] \(2 dims\)"),
        ("weight_dtype", (b, x, w.double()), "weight to have the dtype of x"),
        ("weight_rows", (b, x, w[:4]), r"weight of shape \[5, 4\]"),
        ("bias_shape", (b[:3], x, w), r"bias of shape \[4\]"),
        ("bias_dtype", (b.half(), x, w), "bias to have the dtype of x"),
    ]


@pytest.mark.ops
@pytest.mark.parametrize("kernel", ["cpu", "fake"])
@pytest.mark.parametrize("case", bad_skinny_addmm_inputs(), ids=[c[0] for c in bad_skinny_addmm_inputs()])
def test_skinny_addmm_bad_inputs_raise_clear_errors(case, kernel):
    _, args, message = case
    with pytest.raises(ValueError, match=message):
        call_kernel(torch.ops.mmrec.skinny_addmm, args, kernel)


@pytest.mark.ops
def test_skinny_addmm_mixed_devices_raise_clear_errors():
    """A tensor on another device (meta stands in for one on machines without a GPU)."""
    b, x, w = skinny_addmm_inputs(ProductSample((2, 5, 4)), "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"weight to be on the device of x \(cpu\), got meta"):
        torch.ops.mmrec.skinny_addmm(b, x, w.to("meta"))
