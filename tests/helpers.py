"""Shared test helpers: tolerances justified by each dtype's rounding, error
measure, devices, NaN poisoning."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

# Unit roundoff u = 2^-p of a storage dtype with p significand bits (round to
# nearest): the largest relative error of storing one exact value in it.
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}

# Error of float32 accumulation over long sequences, which the design bounds
# by 1e-5 (relative, in norm) up to T = 65536.
FLOAT32_ACCUMULATION = 1e-5
FLOAT64_ACCUMULATION = 1e-12

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def accumulation_error(dtype: torch.dtype) -> float:
    return FLOAT64_ACCUMULATION if dtype == torch.float64 else FLOAT32_ACCUMULATION


def output_tolerance(dtype: torch.dtype) -> float:
    """Relative-norm tolerance of an output computed from `dtype` inputs.

    The reference runs in float64 on the same (upcast) inputs, so the only
    errors are float32 accumulation and one rounding of the stored result
    (at most u per element, hence at most u in norm); float32/64 outputs
    carry only the accumulation bound.
    """
    if dtype in (torch.float32, torch.float64):
        return accumulation_error(dtype)
    return UNIT_ROUNDOFF[dtype] + accumulation_error(dtype)


def grad_tolerance(dtype: torch.dtype) -> float:
    """Like output_tolerance, but a gradient sees two roundings in low
    precision: of the saved forward output it reads (h_{t-1}) and of its own
    stored value."""
    if dtype in (torch.float32, torch.float64):
        return accumulation_error(dtype)
    return 2 * UNIT_ROUNDOFF[dtype] + accumulation_error(dtype)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (absolute when expected is 0)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert not actual.isnan().any(), "NaN in result"
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close_rel(actual, expected, tol: float, what: str = "output") -> None:
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} exceeds {tol:.3e}"


def check_output(op, reference, inputs, dtype: torch.dtype) -> None:
    """op(*inputs) against the float64 reference on upcast CPU copies: a new contiguous
    tensor of the reference's shape in dtype (NaN-poisoned: an element never written
    fails), within output_tolerance. For ops that accumulate in float32 (float64) and
    round only the stored output."""
    with nan_poison():
        out = op(*inputs)
    expected = reference(*(t.detach().double().cpu() for t in inputs))
    assert out.dtype == dtype and out.shape == expected.shape and out.is_contiguous()
    assert_close_rel(out, expected, output_tolerance(dtype))


def check_output_and_gradients(op, reference, inputs, names, dtype: torch.dtype) -> None:
    """op's output and every input's gradient against the float64 reference's, each within
    output_tolerance: for ops whose backward rounds each gradient once from float32 sums."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    with nan_poison():
        out = op(*leaves)
        grad_out = torch.randn(out.shape, dtype=torch.float64, device=out.device).to(dtype)
        grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in inputs]
    ref_out = reference(*ref_leaves)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad_out.double().cpu())
    assert_close_rel(out, ref_out.detach(), output_tolerance(dtype))
    for name, leaf, grad, ref in zip(names, leaves, grads, ref_grads):
        assert grad.dtype == dtype and grad.shape == leaf.shape
        assert_close_rel(grad, ref, output_tolerance(dtype), what=f"grad of {name}")


@contextlib.contextmanager
def nan_poison():
    """New tensors from torch.empty/at::empty come filled with NaN inside this
    block (torch's deterministic mode fills uninitialised memory), so an
    output element a kernel never writes shows up as NaN."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# The Triton kernels under the interpreter, on CPU tensors: where a GPU is, the
# gpu tests run them compiled instead.
INTERPRETER_ONLY = pytest.mark.skipif(
    torch.cuda.is_available(), reason="with a GPU, the gpu tests run these kernels compiled"
)
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, _no_cuda]),
]


def call_kernel(op, args, kernel: str):
    """op(*args) on its CPU kernel (kernel="cpu") or on its fake kernel
    (kernel="fake": the tensors become fake tensors), so that one test checks
    the errors of both."""
    if kernel == "fake":
        mode = FakeTensorMode()
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        with mode:
            return op(*fake_args)
    return op(*args)


def assert_compiled_matches_eager(loss_fn, input_sets) -> None:
    """torch.compile(loss_fn, fullgraph=True, dynamic=True) gives eager's loss
    and gradients on each set of inputs (all requiring grad): fullgraph makes
    any graph break an error, and the sets differ in length."""
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True)
    for inputs in input_sets:
        expected = loss_fn(*inputs)
        expected_grads = torch.autograd.grad(expected, inputs)
        actual = compiled(*inputs)
        actual_grads = torch.autograd.grad(actual, inputs)
        assert_close_rel(actual.detach(), expected.detach(), 1e-6)
        for a, e in zip(actual_grads, expected_grads):
            assert_close_rel(a, e, 1e-6, what="compiled gradient")
