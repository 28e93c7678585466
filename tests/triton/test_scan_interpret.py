"""The Triton kernels of mmrec::scan, run by Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1), against the float64 reference: a broken CUDA
kernel fails CI, which has no GPU."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import DTYPES, INTERPRETER_ONLY, assert_close_rel, grad_tolerance, nan_poison, output_tolerance
from tests.ops.test_scan import MODES, make_scan_inputs, reference_with_grads

pytestmark = [pytest.mark.triton, INTERPRETER_ONLY]
OP = "scan"  # the launchers under test: mmrec_ops.triton.<OP> (the `interpreted` fixture)


def run_both(interpreted, gamma, x, h0, reverse, grad_h):
    with nan_poison():
        out = interpreted.scan_forward(gamma, x, h0, reverse)
        grads = interpreted.scan_backward(grad_h, gamma, out, h0, x is not None, reverse)
    return out, grads


def check_against_reference(interpreted, gamma, x, h0, reverse, dtype):
    grad_h = torch.randn(gamma.shape, dtype=torch.float64).to(dtype)
    out, (grad_gamma, grad_x, grad_h0) = run_both(interpreted, gamma, x, h0, reverse, grad_h)
    assert out.is_contiguous() and out.dtype == dtype
    ref_out, ref_grads = reference_with_grads(gamma, x, h0, reverse, grad_h)
    assert_close_rel(out, ref_out, output_tolerance(dtype))
    expected = dict(zip([n for n, t in (("gamma", gamma), ("x", x), ("h0", h0)) if t is not None], ref_grads))
    actual = {"gamma": grad_gamma, "x": grad_x, "h0": grad_h0}
    for name, ref in expected.items():
        assert_close_rel(actual[name], ref, grad_tolerance(dtype), what=f"grad of {name}")


SHAPES = [("T1", (2, 1, 3)), ("primeT", (2, 37, 3, 5)), ("BT", (3, 13)), ("d24", (1, 20, 2, 24))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_triton_scan_matches_reference(interpreted, shape, mode, reverse, dtype):
    _, with_x, with_h0 = mode
    gamma, x, h0 = make_scan_inputs(shape[1], "cpu", dtype, with_x, with_h0)
    check_against_reference(interpreted, gamma, x, h0, reverse, dtype)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", ["BHTd_transposed", "channel_sliced"])
def test_triton_scan_strided(interpreted, layout, reverse):
    gamma, x, h0 = make_scan_inputs((2, 11, 3, 6), "cpu", torch.float32, True, True, layout)
    check_against_reference(interpreted, gamma, x, h0, reverse, torch.float32)


def test_triton_scan_backward_broadcast_grad(interpreted):
    gamma, x, h0 = make_scan_inputs((2, 9, 4), "cpu", torch.float32, True, True)
    grad_h = torch.randn(4).expand(gamma.shape)
    out, grads = run_both(interpreted, gamma, x, h0, False, grad_h)
    _, ref_grads = reference_with_grads(gamma, x, h0, False, grad_h)
    for grad, ref in zip(grads, ref_grads):
        assert_close_rel(grad, ref, grad_tolerance(torch.float32))


@pytest.mark.parametrize("shape", [(2, 0, 3), (0, 4, 3)], ids=["T0", "B0"])
def test_triton_scan_empty(interpreted, shape):
    gamma, x, h0 = make_scan_inputs(shape, "cpu", torch.float32, True, True)
    out, (grad_gamma, grad_x, grad_h0) = run_both(interpreted, gamma, x, h0, False, torch.ones(shape))
    assert out.shape == grad_gamma.shape == grad_x.shape == gamma.shape
    assert grad_h0.shape == h0.shape and torch.equal(grad_h0, torch.zeros_like(h0))


def test_triton_scan_long_tiles(interpreted):
    """More steps than one tile, in both directions, so that carries cross tiles."""
    gamma, x, h0 = make_scan_inputs((1, 300, 4), "cpu", torch.float32, True, True)
    for reverse in (False, True):
        check_against_reference(interpreted, gamma, x, h0, reverse, torch.float32)


def test_triton_scan_unfoldable_layout(interpreted):
    """Channel strides that fold into three groups: the launchers copy to contiguous."""
    gamma = torch.rand(2, 4, 3, 5, 2).permute(0, 3, 2, 1, 4)
    x = torch.randn(2, 4, 3, 5, 2).permute(0, 3, 2, 1, 4)
    check_against_reference(interpreted, gamma, x, torch.randn(2, 3, 4, 2), False, torch.float32)


def test_triton_scan_int64_offsets(interpreted, monkeypatch):
    """The kernels with 64-bit element offsets, the path of strides too large
    for int32 ones (forced here: the tensors are small)."""
    decisions = []
    monkeypatch.setattr(interpreted, "_needs_int64_offsets", lambda *args: decisions.append(args) or True)
    interpreted._clear_plans()
    try:
        for layout in ("contiguous", "BHTd_transposed"):
            gamma, x, h0 = make_scan_inputs((2, 19, 3, 6), "cpu", torch.float32, True, True, layout)
            for reverse in (False, True):
                check_against_reference(interpreted, gamma, x, h0, reverse, torch.float32)
    finally:
        interpreted._clear_plans()
    assert decisions, "the launch plans did not ask for the offset width"
