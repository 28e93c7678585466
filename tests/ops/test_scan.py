"""What the contract (tests/ops/test_contract.py) does not check of torch.ops.mmrec.scan
and scan_backward: long sequences over several tiles, upstream gradients in other
layouts, large outputs, offsets past int32, each input in its own layout, pointer
alignment, and the original system's validations."""

from __future__ import annotations

import pytest
import torch

import mmrec_ops
from mmrec_ops.reference import scan_reference
from tests.helpers import DEVICES, DTYPES, UNIT_ROUNDOFF, assert_close_rel, output_tolerance
from tests.ops import specs
from tests.ops.samples import SCAN_SAMPLES, Sample, draw, params, scan_inputs, scan_seq
from tests.ops.specs import SCAN, Variant


def check_gradients(gamma, x, h0, reverse, dtype, grad_h):
    """scan's output and gradients (NaN-poisoned) for grad_h against the float64 loop's."""
    specs.check_gradients(SCAN, None, (gamma, x, h0), Variant(kwargs={"reverse": reverse}), dtype, (grad_h,))


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "many_tiles"))
def test_scan_many_tiles(sample, reverse, dtype, device):
    """T = 3079 (prime) spans several time tiles of the CUDA kernels (at most
    1024 steps each at this shape), so the carry between tiles is checked in
    every dtype."""
    gamma, x, h0 = scan_inputs(sample, device, dtype, True, True)
    check_gradients(gamma, x, h0, reverse, dtype, draw(gamma.shape, device, dtype))


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "strided_gradients"))
def test_scan_gradients_strided(sample, reverse, device):
    """Strided inputs; with the unfoldable layout, three channel dims whose
    strides fold into no fewer than three groups (the kernels then copy the
    inputs to contiguous ones)."""
    gamma, x, h0 = scan_inputs(sample, device, torch.float32, True, True)
    assert not gamma.is_contiguous()
    # An upstream gradient in another layout again ([B, H, T, d] transposed, or
    # contiguous), and one broadcast with stride 0.
    other = Sample(tuple(gamma.shape), "BHTd_transposed" if gamma.dim() == 4 else "contiguous")
    grad_h = scan_seq(other, device, torch.float32, "normal")
    check_gradients(gamma, x, h0, reverse, torch.float32, grad_h)
    check_gradients(
        gamma, x, h0, reverse, torch.float32, draw(gamma.shape[-1], device, torch.float32).expand(gamma.shape)
    )


@pytest.mark.ops
@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "large"))
def test_scan_large_outputs(sample, reverse, device):
    """Outputs over 8 MiB, which the CPU kernels write with streaming stores;
    a channel count of 1025 leaves rows unaligned to 16 bytes."""
    gamma, x, h0 = scan_inputs(sample, device, torch.float32, True, True)
    assert gamma.numel() * 4 >= 8 << 20
    check_gradients(gamma, x, h0, reverse, torch.float32, draw(gamma.shape, device, torch.float32))


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES[1:])  # the C++ CPU kernels index in 64 bits throughout
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "int32_offsets"))
def test_scan_offsets_past_int32(sample, reverse, device):
    """gamma with a time stride of over 2**30 elements, so that element offsets
    from a tile's first element pass 2**31 (the CUDA kernels then compute them
    in 64 bits). Its storage, 4 GiB of bfloat16, holds the elements in use and
    the gaps between them."""
    (_, T, C), time_stride = sample.shape, 2**30 + 64
    storage = torch.zeros((T - 1) * time_stride + C, device=device, dtype=torch.bfloat16)
    gamma = storage.as_strided((1, T, C), (T * time_stride, time_stride, 1))
    gamma.copy_(draw((1, T, C), device, torch.bfloat16, "gamma"))
    _, x, h0 = scan_inputs(sample, device, torch.bfloat16, True, True)
    grad_h = draw((1, T, C), device, torch.bfloat16)
    check_gradients(gamma, x, h0, reverse, torch.bfloat16, grad_h)


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "mixed_layouts"))
def test_scan_mixed_layouts(sample, reverse, device):
    """Each tensor in its own layout: gamma a transposed [B, H, T, d] view, x
    contiguous, h0 a slice; B = 1 makes the CPU kernel split the channels of
    one batch row across threads mid-group."""
    shape = sample.shape
    gamma = scan_seq(Sample(shape, "BHTd_transposed"), device, torch.float32, "gamma")
    x = scan_seq(sample, device, torch.float32, "normal")
    h0 = draw((shape[0], shape[2], 2 * shape[3]), device, torch.float32)[..., ::2]
    check_gradients(gamma, x, h0, reverse, torch.float32, draw(shape, device, torch.float32))


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "pointer_alignment"))
def test_scan_pointer_alignment(sample, dtype, device):
    """Equal shapes and strides, with 16-byte aligned data, then data one
    element off, then aligned again (32 of the sample's 33 channels): Triton
    specializes a compiled kernel on the alignment of each pointer, and the
    CUDA launchers keep the compiled kernels of one launch plan by it."""
    g_full, x_full, h0_full = scan_inputs(sample, device, dtype, True, True)
    gh_full = draw(g_full.shape, device, dtype)
    for offset in (0, 1, 0):
        gamma, x, h0, grad_h = (t[..., offset : offset + 32] for t in (g_full, x_full, h0_full, gh_full))
        assert (gamma.data_ptr() % 16 == 0) == (offset == 0)
        check_gradients(gamma, x, h0, False, dtype, grad_h)


@pytest.mark.ops
@pytest.mark.parametrize("T", [128, 1024, 8192])
def test_seed_validation_bf16_cumprod(T):
    """The original system's validation: bf16 gamma in [0.05, 0.95] against a cumulative product."""
    gamma = (0.05 + 0.9 * torch.rand(4, T, 8, 16, dtype=torch.float64)).to(torch.bfloat16)
    out = mmrec_ops.cumprod(gamma)
    expected = torch.cumprod(gamma.double(), dim=1)
    assert torch.isfinite(out).all()
    assert_close_rel(out, expected, output_tolerance(torch.bfloat16))
    # Elementwise too: each stored product is the exact one rounded once (or
    # it underflowed below bf16's smallest normal, where the absolute error is tiny).
    err = (out.double() - expected).abs()
    assert (err <= UNIT_ROUNDOFF[torch.bfloat16] * expected + 2.0**-126).all()


@pytest.mark.ops
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [0.001, 0.999])
def test_seed_validation_extreme_decay(value, dtype):
    """gamma = 0.001 (underflows to 0) and 0.999 over 1000 steps: never NaN or Inf."""
    gamma = torch.full((2, 1000, 8), value, dtype=dtype)
    x = torch.randn(2, 1000, 8, dtype=torch.float64).to(dtype)
    for args in ((gamma,), (gamma, x)):
        out = mmrec_ops.scan(*args)
        grad = torch.autograd.grad(mmrec_ops.scan(*(a.requires_grad_() for a in args)).sum(), args)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grad)
        ref = scan_reference(*(a.detach().double() for a in args))
        assert_close_rel(out, ref, output_tolerance(dtype))
    assert (mmrec_ops.cumprod(gamma)[:, -1] == 0).all() if value == 0.001 else True


@pytest.mark.long
@pytest.mark.ops
def test_scan_float32_accuracy_at_65536_steps():
    """docs/design.md 1.1: relative error at most 1e-5 for float32 and T up to 65536,
    with gamma close to 1 so that errors carry over many steps."""
    T = 65536
    gamma = 1 - 0.01 * torch.rand(1, T, 16, dtype=torch.float64)
    x = torch.randn(1, T, 16, dtype=torch.float64)
    out = mmrec_ops.scan(gamma.float(), x.float())
    ref = scan_reference(gamma.float().double(), x.float().double())
    assert_close_rel(out, ref, 1e-5)
