"""torch.ops.mmrec.scan and scan_backward against the float64 loop reference."""

from __future__ import annotations

import pytest
import torch

import mmrec_ops
from mmrec_ops.reference import scan_reference
from tests.helpers import (
    DEVICES,
    DTYPES,
    UNIT_ROUNDOFF,
    assert_close_rel,
    assert_compiled_matches_eager,
    call_kernel,
    grad_tolerance,
    nan_poison,
    output_tolerance,
)
from tests.ops.samples import SCAN_MODES, SCAN_SAMPLES, Sample, draw, entries, params, scan_inputs, scan_seq


def as_double_leaf(t):
    return None if t is None else t.detach().double().cpu().requires_grad_()


def reference_with_grads(gamma, x, h0, reverse, grad_h):
    """Output and gradients of the float64 loop reference on upcast copies."""
    g64, x64, h064 = (as_double_leaf(t) for t in (gamma, x, h0))
    out = scan_reference(g64, x64, h064, reverse)
    leaves = [t for t in (g64, x64, h064) if t is not None]
    grads = (
        torch.autograd.grad(out, leaves, grad_h.double().cpu())
        if out.numel()
        else [torch.zeros_like(t) for t in leaves]
    )
    return out.detach(), grads


def scan_of_given(inputs, reverse):
    """(fn, leaves): scan as a function of the inputs that are not None, for gradcheck."""
    leaves = [t.detach().requires_grad_() for t in inputs if t is not None]

    def fn(*args):
        given = iter(args)
        return mmrec_ops.scan(*(next(given) if t is not None else None for t in inputs), reverse=reverse)

    return fn, leaves


def opcheck_samples(device, dtype, requires_grad):
    """(args, kwargs) for opcheck: the table's opcheck entries in every mode and both directions."""
    samples = []
    for sample in entries(SCAN_SAMPLES, "opcheck"):
        for _, with_x, with_h0 in SCAN_MODES:
            for reverse in (False, True):
                inputs = scan_inputs(sample, device, dtype, with_x, with_h0)
                args = [t.requires_grad_(requires_grad) if t is not None else None for t in inputs]
                samples.append((tuple(args), {"reverse": reverse}))
    return samples


def check_forward(gamma, x, h0, reverse, dtype):
    """scan (NaN-poisoned outputs) against the float64 loop on upcast copies."""
    with nan_poison():
        out = mmrec_ops.scan(gamma, x, h0, reverse=reverse)
    assert out.dtype == dtype and out.shape == gamma.shape and out.is_contiguous()
    ref = scan_reference(*(t.double().cpu() if t is not None else None for t in (gamma, x, h0)), reverse=reverse)
    assert_close_rel(out, ref, output_tolerance(dtype))


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", SCAN_MODES, ids=[m[0] for m in SCAN_MODES])
@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "forward"))
def test_scan_matches_reference(sample, mode, reverse, dtype, device):
    _, with_x, with_h0 = mode
    check_forward(*scan_inputs(sample, device, dtype, with_x, with_h0), reverse, dtype)


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", SCAN_MODES[1:], ids=[m[0] for m in SCAN_MODES[1:]])
@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "strided"))
def test_scan_strided_inputs(sample, mode, reverse, dtype, device):
    _, with_x, with_h0 = mode
    gamma, x, h0 = scan_inputs(sample, device, dtype, with_x, with_h0)
    assert not gamma.is_contiguous()
    check_forward(gamma, x, h0, reverse, dtype)


def check_gradients(gamma, x, h0, reverse, dtype, grad_h):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (gamma, x, h0)]
    with nan_poison():
        out = mmrec_ops.scan(*leaves, reverse=reverse)
        grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_h)
    ref_out, ref_grads = reference_with_grads(gamma, x, h0, reverse, grad_h)
    assert_close_rel(out, ref_out, output_tolerance(dtype))
    names = [n for n, t in zip(("gamma", "x", "h0"), leaves) if t is not None]
    for name, grad, ref in zip(names, grads, ref_grads):
        assert grad.dtype == dtype
        assert_close_rel(grad, ref, grad_tolerance(dtype), what=f"grad of {name}")


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", SCAN_MODES, ids=[m[0] for m in SCAN_MODES])
@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "gradients"))
def test_scan_gradients_match_reference(sample, mode, reverse, dtype, device):
    _, with_x, with_h0 = mode
    gamma, x, h0 = scan_inputs(sample, device, dtype, with_x, with_h0)
    check_gradients(gamma, x, h0, reverse, dtype, draw(gamma.shape, device, dtype))


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


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", SCAN_MODES, ids=[m[0] for m in SCAN_MODES])
@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "gradcheck"))
def test_scan_gradcheck(sample, mode, reverse, device):
    _, with_x, with_h0 = mode
    inputs = scan_inputs(sample, device, torch.float64, with_x, with_h0)
    assert torch.autograd.gradcheck(*scan_of_given(inputs, reverse))


@pytest.mark.opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "requires_grad"])
def test_scan_opcheck(requires_grad, dtype, device):
    for args, kwargs in opcheck_samples(device, dtype, requires_grad):
        torch.library.opcheck(torch.ops.mmrec.scan.default, args, kwargs)


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", SCAN_MODES, ids=[m[0] for m in SCAN_MODES])
@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "gradgradcheck"))
def test_scan_gradgradcheck(sample, mode, reverse, device):
    """Second derivatives, through scan_backward's own autograd formula."""
    _, with_x, with_h0 = mode
    inputs = scan_inputs(sample, device, torch.float64, with_x, with_h0)
    assert torch.autograd.gradgradcheck(*scan_of_given(inputs, reverse))


@pytest.mark.opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "requires_grad"])
def test_scan_backward_opcheck(requires_grad, dtype, device):
    for (gamma, x, h0), kwargs in opcheck_samples(device, dtype, requires_grad=False):
        h = mmrec_ops.scan(gamma, x, h0, **kwargs)
        grad_h = torch.randn_like(h)
        tensors = [t.requires_grad_(requires_grad) if t is not None else None for t in (grad_h, gamma, h, h0)]
        args = (*tensors, x is not None, kwargs["reverse"])
        torch.library.opcheck(torch.ops.mmrec.scan_backward.default, args)


@pytest.mark.compile
@pytest.mark.parametrize("device", DEVICES)
def test_scan_compiles_without_graph_break(device):
    def loss_fn(gamma, x, h0):
        h = mmrec_ops.scan(gamma, x, h0)
        return (h * mmrec_ops.cumprod(gamma, reverse=True)).square().mean()

    assert_compiled_matches_eager(
        loss_fn,
        [
            [t.requires_grad_() for t in scan_inputs(sample, device, torch.float32, True, True)]
            for sample in entries(SCAN_SAMPLES, "compile")
        ],
    )


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("sample", params(SCAN_SAMPLES, "empty"))
def test_scan_empty(sample, reverse, device):
    """Empty batch, time or channel dims give empty results (an empty channel
    dim once divided by zero in the CPU kernels' tiling)."""
    gamma, x, h0 = scan_inputs(sample, device, torch.float32, True, True)
    for args in ((gamma,), (gamma, x, h0)):
        leaves = [t.requires_grad_() for t in args]
        out = mmrec_ops.scan(*leaves, reverse=reverse)
        assert out.shape == gamma.shape
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        for leaf, grad in zip(leaves, grads):
            assert grad.shape == leaf.shape
        if len(args) == 3:  # h0 does not reach any output when T = 0
            assert torch.equal(grads[2], torch.zeros_like(h0))


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
    """DESIGN 1.1: relative error at most 1e-5 for float32 and T up to 65536,
    with gamma close to 1 so that errors carry over many steps."""
    T = 65536
    gamma = 1 - 0.01 * torch.rand(1, T, 16, dtype=torch.float64)
    x = torch.randn(1, T, 16, dtype=torch.float64)
    out = mmrec_ops.scan(gamma.float(), x.float())
    ref = scan_reference(gamma.float().double(), x.float().double())
    assert_close_rel(out, ref, 1e-5)


def bad_scan_inputs():
    g = torch.rand(2, 5, 3)
    return [
        ("int_gamma", (torch.ones(2, 5, 3, dtype=torch.int64),), "gamma to be float32"),
        ("int_x", (g, torch.ones(2, 5, 3, dtype=torch.int32)), "x to have the dtype of gamma"),
        ("mixed_dtype", (g, torch.rand(2, 5, 3, dtype=torch.float64)), "x to have the dtype of gamma"),
        ("gamma_rank1", (torch.rand(5),), r"gamma of shape \[B, T, ...\]"),
        ("x_shape", (g, torch.rand(2, 4, 3)), r"x of shape \[2, 5, 3\]"),
        ("h0_shape", (g, torch.rand(2, 5, 3), torch.rand(2, 5, 3)), r"h0 of shape \[2, 3\]"),
        ("h0_dtype", (g, None, torch.rand(2, 3, dtype=torch.float16)), "h0 to have the dtype of gamma"),
    ]


@pytest.mark.ops
@pytest.mark.parametrize("kernel", ["cpu", "fake"])
@pytest.mark.parametrize("case", bad_scan_inputs(), ids=[c[0] for c in bad_scan_inputs()])
def test_scan_bad_inputs_raise_clear_errors(case, kernel):
    _, args, message = case
    with pytest.raises(ValueError, match=message):
        call_kernel(torch.ops.mmrec.scan, args, kernel)


@pytest.mark.ops
def test_scan_mixed_devices_raise_clear_errors():
    """A tensor on another device (meta stands in for one on machines without a GPU)."""
    with pytest.raises(ValueError, match=r"x to be on the device of gamma \(cpu\), got meta"):
        torch.ops.mmrec.scan(torch.rand(2, 3, 4), torch.rand(2, 3, 4, device="meta"))
    with pytest.raises(ValueError, match=r"h0 to be on the device of gamma \(meta\), got cpu"):
        torch.ops.mmrec.scan(torch.rand(2, 3, 4, device="meta"), None, torch.rand(2, 4))


@pytest.mark.ops
def test_scan_backward_bad_inputs():
    g = torch.rand(2, 5, 3)
    with pytest.raises(ValueError, match=r"grad_h of shape \[2, 5, 3\]"):
        torch.ops.mmrec.scan_backward(torch.rand(2, 4, 3), g, g, None, True, False)
    with pytest.raises(ValueError, match="h to have the dtype of gamma"):
        torch.ops.mmrec.scan_backward(g, g, g.double(), None, True, False)
