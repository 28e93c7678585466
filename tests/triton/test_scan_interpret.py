"""The Triton kernels of mmrec::scan, run by Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1), against the float64 reference: a broken CUDA
kernel fails CI, which has no GPU."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import DTYPES, INTERPRETER_ONLY, assert_close_rel, grad_tolerance, nan_poison, output_tolerance
from tests.ops.samples import SCAN_MODES, SCAN_SAMPLES, draw, entries, params, scan_inputs
from tests.ops.test_scan import reference_with_grads

pytestmark = [pytest.mark.triton, INTERPRETER_ONLY]
OP = "scan"  # the launchers under test: mmrec_ops.triton.<OP> (the `interpreted` fixture)


def run_both(interpreted, gamma, x, h0, reverse, grad_h):
    with nan_poison():
        out = interpreted.scan_forward(gamma, x, h0, reverse)
        grads = interpreted.scan_backward(grad_h, gamma, out, h0, x is not None, reverse)
    return out, grads


def check_against_reference(interpreted, gamma, x, h0, reverse, dtype):
    grad_h = draw(gamma.shape, "cpu", dtype)
    out, (grad_gamma, grad_x, grad_h0) = run_both(interpreted, gamma, x, h0, reverse, grad_h)
    assert out.is_contiguous() and out.dtype == dtype
    ref_out, ref_grads = reference_with_grads(gamma, x, h0, reverse, grad_h)
    assert_close_rel(out, ref_out, output_tolerance(dtype))
    expected = dict(zip([n for n, t in (("gamma", gamma), ("x", x), ("h0", h0)) if t is not None], ref_grads))
    actual = {"gamma": grad_gamma, "x": grad_x, "h0": grad_h0}
    for name, ref in expected.items():
        assert_close_rel(actual[name], ref, grad_tolerance(dtype), what=f"grad of {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", SCAN_MODES, ids=[m[0] for m in SCAN_MODES])
@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "triton"))
def test_triton_scan_matches_reference(interpreted, sample, mode, reverse, dtype):
    _, with_x, with_h0 = mode
    gamma, x, h0 = scan_inputs(sample, "cpu", dtype, with_x, with_h0)
    check_against_reference(interpreted, gamma, x, h0, reverse, dtype)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "triton_strided"))
def test_triton_scan_strided(interpreted, sample, reverse):
    gamma, x, h0 = scan_inputs(sample, "cpu", torch.float32, True, True)
    check_against_reference(interpreted, gamma, x, h0, reverse, torch.float32)


@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "triton_broadcast"))
def test_triton_scan_backward_broadcast_grad(interpreted, sample):
    gamma, x, h0 = scan_inputs(sample, "cpu", torch.float32, True, True)
    grad_h = draw(4, "cpu", torch.float32).expand(gamma.shape)
    out, grads = run_both(interpreted, gamma, x, h0, False, grad_h)
    _, ref_grads = reference_with_grads(gamma, x, h0, False, grad_h)
    for grad, ref in zip(grads, ref_grads):
        assert_close_rel(grad, ref, grad_tolerance(torch.float32))


@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "triton_empty"))
def test_triton_scan_empty(interpreted, sample):
    gamma, x, h0 = scan_inputs(sample, "cpu", torch.float32, True, True)
    out, (grad_gamma, grad_x, grad_h0) = run_both(interpreted, gamma, x, h0, False, torch.ones(sample.shape))
    assert out.shape == grad_gamma.shape == grad_x.shape == gamma.shape
    assert grad_h0.shape == h0.shape and torch.equal(grad_h0, torch.zeros_like(h0))


@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "triton_long"))
def test_triton_scan_long_tiles(interpreted, sample):
    """More steps than one tile, in both directions, so that carries cross tiles."""
    gamma, x, h0 = scan_inputs(sample, "cpu", torch.float32, True, True)
    for reverse in (False, True):
        check_against_reference(interpreted, gamma, x, h0, reverse, torch.float32)


@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "triton_unfoldable"))
def test_triton_scan_unfoldable_layout(interpreted, sample):
    """Channel strides that fold into three groups: the launchers copy to contiguous."""
    gamma, x, h0 = scan_inputs(sample, "cpu", torch.float32, True, True)
    check_against_reference(interpreted, gamma, x, h0, False, torch.float32)


def test_triton_scan_int64_offsets(interpreted, monkeypatch):
    """The kernels with 64-bit element offsets, the path of strides too large
    for int32 ones (forced here: the tensors are small)."""
    decisions = []
    monkeypatch.setattr(interpreted, "_needs_int64_offsets", lambda *args: decisions.append(args) or True)
    interpreted._clear_plans()
    try:
        for sample in entries(SCAN_SAMPLES, "triton_int64"):
            gamma, x, h0 = scan_inputs(sample, "cpu", torch.float32, True, True)
            for reverse in (False, True):
                check_against_reference(interpreted, gamma, x, h0, reverse, torch.float32)
    finally:
        interpreted._clear_plans()
    assert decisions, "the launch plans did not ask for the offset width"
