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

# (name, [B, T, ...]): T = 1, prime T, no channel dims (one tile and several),
# two channels, d not a power of two.
SHAPES = [
    ("T1", (3, 1, 5)),
    ("primeT", (2, 13, 7)),
    ("BT", (4, 9)),
    ("BT_long", (2, 601)),
    ("C2", (3, 29, 2)),
    ("BTHd_odd", (2, 31, 3, 5)),
    ("BTHd", (2, 64, 4, 24)),
    ("wide", (1, 17, 1000)),
]
# (name, x given, h0 given)
MODES = [("cumprod", False, False), ("x", True, False), ("x_h0", True, True), ("h0", False, True)]
LAYOUTS = ["contiguous", "BHTd_transposed", "channel_sliced"]


def make_seq(shape, layout, device, dtype, kind):
    """A [B, T, ...] tensor with the given memory layout. kind: "gamma" in
    (0, 1), else standard normal."""

    def draw(s):
        if kind == "gamma":
            return torch.rand(s, device=device, dtype=torch.float64).to(dtype)
        return torch.randn(s, device=device, dtype=torch.float64).to(dtype)

    if layout == "contiguous":
        return draw(shape)
    if layout == "BHTd_transposed":  # [B, H, T, d] storage seen as [B, T, H, d]
        B, T, H, d = shape
        return draw((B, H, T, d)).transpose(1, 2)
    if layout == "channel_sliced":  # every other channel of a wider tensor
        return draw((*shape[:-1], 2 * shape[-1]))[..., ::2]
    raise ValueError(layout)


def make_scan_inputs(shape, device, dtype, with_x, with_h0, layout="contiguous"):
    gamma = make_seq(shape, layout, device, dtype, "gamma")
    x = make_seq(shape, layout, device, dtype, "x") if with_x else None
    h0 = torch.randn((shape[0], *shape[2:]), device=device, dtype=torch.float64).to(dtype) if with_h0 else None
    return gamma, x, h0


def as_double_leaf(t):
    return None if t is None else t.detach().double().cpu().requires_grad_()


def reference_with_grads(gamma, x, h0, reverse, grad_h):
    """Output and gradients of the float64 loop reference on upcast copies."""
    g64, x64, h064 = (as_double_leaf(t) for t in (gamma, x, h0))
    out = scan_reference(g64, x64, h064, reverse)
    leaves = [t for t in (g64, x64, h064) if t is not None]
    grads = torch.autograd.grad(out, leaves, grad_h.double().cpu()) if out.numel() else [torch.zeros_like(t) for t in leaves]
    return out.detach(), grads


def scan_of_given(inputs, reverse):
    """(fn, leaves): scan as a function of the inputs that are not None, for gradcheck."""
    leaves = [t.detach().requires_grad_() for t in inputs if t is not None]

    def fn(*args):
        given = iter(args)
        return mmrec_ops.scan(*(next(given) if t is not None else None for t in inputs), reverse=reverse)

    return fn, leaves


def scan_samples(device, dtype, requires_grad):
    """(args, kwargs) for opcheck: every mode, both directions, odd sizes, a transposed view."""
    samples = []
    for shape, layout in [((2, 7, 3), "contiguous"), ((2, 5, 3, 4), "BHTd_transposed"), ((3, 1, 2), "contiguous")]:
        for _, with_x, with_h0 in MODES:
            for reverse in (False, True):
                gamma, x, h0 = make_scan_inputs(shape, device, dtype, with_x, with_h0, layout)
                args = [t.requires_grad_(requires_grad) if t is not None else None for t in (gamma, x, h0)]
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
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_scan_matches_reference(shape, mode, reverse, dtype, device):
    _, with_x, with_h0 = mode
    gamma, x, h0 = make_scan_inputs(shape[1], device, dtype, with_x, with_h0)
    check_forward(gamma, x, h0, reverse, dtype)


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("mode", MODES[1:], ids=[m[0] for m in MODES[1:]])
def test_scan_strided_inputs(mode, layout, reverse, dtype, device):
    _, with_x, with_h0 = mode
    gamma, x, h0 = make_scan_inputs((2, 23, 3, 6), device, dtype, with_x, with_h0, layout)
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
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_scan_gradients_match_reference(shape, mode, reverse, dtype, device):
    _, with_x, with_h0 = mode
    gamma, x, h0 = make_scan_inputs(shape[1], device, dtype, with_x, with_h0)
    grad_h = torch.randn(gamma.shape, device=device, dtype=torch.float64).to(dtype)
    check_gradients(gamma, x, h0, reverse, dtype, grad_h)


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", ["contiguous", "BHTd_transposed"])
def test_scan_many_tiles(layout, reverse, dtype, device):
    """T = 3079 (prime) spans several time tiles of the CUDA kernels (at most
    1024 steps each at this shape), so the carry between tiles is checked in
    every dtype."""
    gamma, x, h0 = make_scan_inputs((2, 3079, 2, 40), device, dtype, True, True, layout)
    grad_h = torch.randn(gamma.shape, device=device, dtype=torch.float64).to(dtype)
    check_gradients(gamma, x, h0, reverse, dtype, grad_h)


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_scan_gradients_strided(layout, reverse, device):
    gamma, x, h0 = make_scan_inputs((2, 19, 3, 6), device, torch.float32, True, True, layout)
    # An upstream gradient of another layout again, and one broadcast with stride 0.
    grad_h = torch.randn(2, 3, 19, 6, device=device).transpose(1, 2)
    check_gradients(gamma, x, h0, reverse, torch.float32, grad_h)
    check_gradients(gamma, x, h0, reverse, torch.float32, torch.randn(6, device=device).expand(gamma.shape))


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_scan_unfoldable_layout(reverse, device):
    """Three channel dims whose strides fold into no fewer than three groups
    (the kernels then copy the inputs to contiguous ones)."""
    gamma = torch.rand(2, 4, 3, 5, 2, device=device).permute(0, 3, 2, 1, 4)
    x = torch.randn(2, 4, 3, 5, 2, device=device).permute(0, 3, 2, 1, 4)
    assert gamma.shape == (2, 5, 3, 4, 2)
    check_gradients(gamma, x, torch.randn(2, 3, 4, 2, device=device), reverse, torch.float32, torch.randn(gamma.shape, device=device))


@pytest.mark.ops
@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", ["contiguous", "BHTd_transposed"])
def test_scan_large_outputs(layout, reverse, device):
    """Outputs over 8 MiB, which the CPU kernels write with streaming stores;
    a channel count of 1025 leaves rows unaligned to 16 bytes."""
    shape = (2, 1024, 1, 1025)
    gamma, x, h0 = make_scan_inputs(shape, device, torch.float32, True, True, layout)
    assert gamma.numel() * 4 >= 8 << 20
    check_gradients(gamma, x, h0, reverse, torch.float32, torch.randn(shape, device=device))


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES[1:])  # the C++ CPU kernels index in 64 bits throughout
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_scan_offsets_past_int32(reverse, device):
    """gamma with a time stride of over 2**30 elements, so that element offsets
    from a tile's first element pass 2**31 (the CUDA kernels then compute them
    in 64 bits). Its storage, 4 GiB of bfloat16, holds the elements in use and
    the gaps between them."""
    T, C, time_stride = 3, 16, 2**30 + 64
    storage = torch.zeros((T - 1) * time_stride + C, device=device, dtype=torch.bfloat16)
    gamma = storage.as_strided((1, T, C), (T * time_stride, time_stride, 1))
    gamma.copy_(make_seq((1, T, C), "contiguous", device, torch.bfloat16, "gamma"))
    _, x, h0 = make_scan_inputs((1, T, C), device, torch.bfloat16, True, True)
    grad_h = torch.randn((1, T, C), device=device, dtype=torch.float64).to(torch.bfloat16)
    check_gradients(gamma, x, h0, reverse, torch.bfloat16, grad_h)


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("shape", [(1, 7, 3, 50), (2, 23, 3, 6)], ids=["B1_split_groups", "B2"])
def test_scan_mixed_layouts(shape, reverse, device):
    """Each tensor in its own layout: gamma a transposed [B, H, T, d] view, x
    contiguous, h0 a slice; B = 1 makes the CPU kernel split the channels of
    one batch row across threads mid-group."""
    gamma = make_seq(shape, "BHTd_transposed", device, torch.float32, "gamma")
    x = make_seq(shape, "contiguous", device, torch.float32, "x")
    h0 = torch.randn(shape[0], shape[2], 2 * shape[3], device=device)[..., ::2]
    check_gradients(gamma, x, h0, reverse, torch.float32, torch.randn(shape, device=device))


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scan_pointer_alignment(dtype, device):
    """Equal shapes and strides, with 16-byte aligned data, then data one
    element off, then aligned again: Triton specializes a compiled kernel on
    the alignment of each pointer, and the CUDA launchers keep the compiled
    kernels of one launch plan by it."""
    shape = (2, 21, 3, 33)
    g_full = make_seq(shape, "contiguous", device, dtype, "gamma")
    x_full = make_seq(shape, "contiguous", device, dtype, "x")
    gh_full = make_seq(shape, "contiguous", device, dtype, "x")
    h0_full = torch.randn(shape[0], *shape[2:], device=device, dtype=torch.float64).to(dtype)
    for offset in (0, 1, 0):
        gamma, x, h0, grad_h = (t[..., offset:offset + 32] for t in (g_full, x_full, h0_full, gh_full))
        assert (gamma.data_ptr() % 16 == 0) == (offset == 0)
        check_gradients(gamma, x, h0, False, dtype, grad_h)


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("layout", ["contiguous", "BHTd_transposed"])
def test_scan_gradcheck(layout, mode, reverse, device):
    _, with_x, with_h0 = mode
    inputs = make_scan_inputs((2, 6, 2, 3), device, torch.float64, with_x, with_h0, layout)
    assert torch.autograd.gradcheck(*scan_of_given(inputs, reverse))


@pytest.mark.opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "requires_grad"])
def test_scan_opcheck(requires_grad, dtype, device):
    for args, kwargs in scan_samples(device, dtype, requires_grad):
        torch.library.opcheck(torch.ops.mmrec.scan.default, args, kwargs)


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
def test_scan_gradgradcheck(mode, reverse, device):
    """Second derivatives, through scan_backward's own autograd formula."""
    _, with_x, with_h0 = mode
    inputs = make_scan_inputs((2, 5, 3), device, torch.float64, with_x, with_h0)
    assert torch.autograd.gradgradcheck(*scan_of_given(inputs, reverse))


@pytest.mark.opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "requires_grad"])
def test_scan_backward_opcheck(requires_grad, dtype, device):
    for (gamma, x, h0), kwargs in scan_samples(device, dtype, requires_grad=False):
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
        [[t.requires_grad_() for t in make_scan_inputs((2, T, 3, 4), device, torch.float32, True, True)] for T in (5, 11)],
    )


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize(
    "shape",
    [(2, 0, 3), (0, 5, 3), (0, 0, 2, 2), (2, 5, 0), (2, 5, 3, 0), (2, 5, 0, 3)],
    ids=["T0", "B0", "B0T0", "C0", "inner_C0", "outer_C0"],
)
def test_scan_empty(shape, reverse, device):
    """Empty batch, time or channel dims give empty results (an empty channel
    dim once divided by zero in the CPU kernels' tiling)."""
    gamma, x, h0 = make_scan_inputs(shape, device, torch.float32, True, True)
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
