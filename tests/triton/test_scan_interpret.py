"""The Triton kernels of mmrec::scan, run by Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1), against the float64 reference: a broken CUDA
kernel fails CI, which has no GPU."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import DTYPES, INTERPRETER_ONLY, nan_poison
from tests.ops import specs
from tests.ops.samples import SCAN_SAMPLES, draw, entries, params, scan_inputs
from tests.ops.specs import SCAN, Variant

pytestmark = [pytest.mark.triton, INTERPRETER_ONLY]
OP = "scan"  # the launchers under test: mmrec_ops.triton.<OP> (the `interpreted` fixture)
DIRECTIONS = [Variant(direction, kwargs={"reverse": direction == "reverse"}) for direction in ("forward", "reverse")]


def run_both(interpreted, gamma, x, h0, reverse, grad_h):
    with nan_poison():
        out = interpreted.scan_forward(gamma, x, h0, reverse)
        grads = interpreted.scan_backward(grad_h, gamma, out, h0, x is not None, reverse)
    return out, grads


def check_against_reference(interpreted, args, variant, dtype, grad_h=None):
    """The launchers' output and the gradients of the given inputs (for grad_h, drawn
    unless given) against the float64 loop's."""
    gamma, x, h0 = args
    if grad_h is None:
        grad_h = draw(gamma.shape, "cpu", dtype)
    out, grads = run_both(interpreted, gamma, x, h0, variant.kwargs["reverse"], grad_h)
    given = SCAN.differentiable_args(args)
    grads = {name: grad for name, grad in zip(SCAN.arg_names, grads) if name in given}
    specs.check_against_reference(SCAN, args, variant, dtype, (out,), grads, (grad_h,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", SCAN.variants, ids=lambda variant: variant.name)
@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "triton"))
def test_triton_scan_matches_reference(interpreted, sample, variant, dtype):
    check_against_reference(interpreted, SCAN.args(sample, "cpu", dtype, variant), variant, dtype)


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda variant: variant.name)
@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "triton_strided"))
def test_triton_scan_strided(interpreted, sample, direction):
    check_against_reference(
        interpreted, scan_inputs(sample, "cpu", torch.float32, True, True), direction, torch.float32
    )


@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "triton_broadcast"))
def test_triton_scan_backward_broadcast_grad(interpreted, sample):
    args = scan_inputs(sample, "cpu", torch.float32, True, True)
    grad_h = draw(4, "cpu", torch.float32).expand(sample.shape)
    check_against_reference(interpreted, args, DIRECTIONS[0], torch.float32, grad_h)


@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "triton_empty"))
def test_triton_scan_empty(interpreted, sample):
    gamma, x, h0 = scan_inputs(sample, "cpu", torch.float32, True, True)
    out, (grad_gamma, grad_x, grad_h0) = run_both(interpreted, gamma, x, h0, False, torch.ones(sample.shape))
    assert out.shape == grad_gamma.shape == grad_x.shape == gamma.shape
    assert grad_h0.shape == h0.shape and torch.equal(grad_h0, torch.zeros_like(h0))


@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "triton_long"))
def test_triton_scan_long_tiles(interpreted, sample):
    """More steps than one tile, in both directions, so that carries cross tiles."""
    args = scan_inputs(sample, "cpu", torch.float32, True, True)
    for direction in DIRECTIONS:
        check_against_reference(interpreted, args, direction, torch.float32)


@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "triton_unfoldable"))
def test_triton_scan_unfoldable_layout(interpreted, sample):
    """Channel strides that fold into three groups: the launchers copy to contiguous."""
    args = scan_inputs(sample, "cpu", torch.float32, True, True)
    check_against_reference(interpreted, args, DIRECTIONS[0], torch.float32)


def test_triton_scan_int64_offsets(interpreted, monkeypatch):
    """The kernels with 64-bit element offsets, the path of strides too large
    for int32 ones (forced here: the tensors are small)."""
    decisions = []
    monkeypatch.setattr(interpreted, "_needs_int64_offsets", lambda *args: decisions.append(args) or True)
    interpreted._clear_plans()
    try:
        for sample in entries(SCAN_SAMPLES, "triton_int64"):
            args = scan_inputs(sample, "cpu", torch.float32, True, True)
            for direction in DIRECTIONS:
                check_against_reference(interpreted, args, direction, torch.float32)
    finally:
        interpreted._clear_plans()
    assert decisions, "the launch plans did not ask for the offset width"
