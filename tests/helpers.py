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
