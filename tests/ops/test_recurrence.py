"""torch.ops.mmrec.recurrence and recurrence_backward against the float64 loop reference.

Inputs are drawn in the regime the model runs in: gamma in (0, 1), z standard
normal, W with entries of scale 1/sqrt(d) (spectral norm about 2, times the
gate's slope of at most 1/4), so the recurrence is contractive and an error
made at one step does not grow along the sequence. In that regime the
tolerances of tests/helpers.py hold for the same reasons as for the scan: the
kernels keep the state in float32, so a low-precision output carries one
rounding (output_tolerance), and a gradient carries the rounding of the saved
h_{t-1} it reads (and of the gate recomputed from it, damped by the slope
above) plus its own (grad_tolerance).
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mmrec_ops
from mmrec_ops.reference import recurrence_reference
from tests.helpers import (
    DEVICES,
    DTYPES,
    assert_close_rel,
    assert_compiled_matches_eager,
    call_kernel,
    grad_tolerance,
    nan_poison,
    output_tolerance,
)
from tests.ops.samples import (
    RECURRENCE_MODES,
    RECURRENCE_NAMES,
    RECURRENCE_SAMPLES,
    Sample,
    draw,
    entries,
    params,
    recurrence_grad_output,
    recurrence_inputs,
)


def given(inputs):
    return [(name, t) for name, t in zip(RECURRENCE_NAMES, inputs) if t is not None]


def reference_with_grads(inputs, grad_h):
    """Output and gradients (of the inputs that are not None) of the float64 loop on upcast copies."""
    leaves = [None if t is None else t.detach().double().cpu().requires_grad_() for t in inputs]
    out = recurrence_reference(*leaves)
    wrt = [t for t in leaves if t is not None]
    if out.numel() == 0:
        return out.detach(), [torch.zeros_like(t) for t in wrt]
    return out.detach(), torch.autograd.grad(out, wrt, grad_h.double().cpu(), allow_unused=True)


def check_forward(inputs, dtype):
    with nan_poison():
        out = mmrec_ops.recurrence(*inputs)
    assert out.dtype == dtype and out.shape == inputs[0].shape and out.is_contiguous()
    ref = recurrence_reference(*(None if t is None else t.double().cpu() for t in inputs))
    assert_close_rel(out, ref, output_tolerance(dtype))


def check_gradients(inputs, dtype, grad_h):
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    with nan_poison():
        out = mmrec_ops.recurrence(*leaves)
        grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_h)
    ref_out, ref_grads = reference_with_grads(inputs, grad_h)
    assert_close_rel(out, ref_out, output_tolerance(dtype))
    for (name, leaf), grad, ref in zip(given(leaves), grads, ref_grads):
        assert grad.dtype == dtype and grad.shape == leaf.shape
        assert_close_rel(grad, ref, grad_tolerance(dtype), what=f"grad of {name}")


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", RECURRENCE_MODES, ids=[m[0] for m in RECURRENCE_MODES])
@pytest.mark.parametrize("sample", params(RECURRENCE_SAMPLES, "forward"))
def test_recurrence_matches_reference(sample, mode, dtype, device):
    _, with_bias, with_h0 = mode
    check_forward(recurrence_inputs(sample, device, dtype, with_bias, with_h0), dtype)


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", RECURRENCE_MODES, ids=[m[0] for m in RECURRENCE_MODES])
@pytest.mark.parametrize("sample", params(RECURRENCE_SAMPLES, "gradients"))
def test_recurrence_gradients_match_reference(sample, mode, dtype, device):
    _, with_bias, with_h0 = mode
    inputs = recurrence_inputs(sample, device, dtype, with_bias, with_h0)
    check_gradients(inputs, dtype, recurrence_grad_output(sample, device, dtype))


@pytest.mark.ops
@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample", params(RECURRENCE_SAMPLES, "strided"))
def test_recurrence_strided_inputs(sample, dtype, device):
    inputs = recurrence_inputs(sample, device, dtype)
    assert not any(t.is_contiguous() for t in inputs)
    check_forward(inputs, dtype)
    check_gradients(inputs, dtype, recurrence_grad_output(sample, device, dtype))


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", params(RECURRENCE_SAMPLES, "long"))
def test_recurrence_float32_accuracy_over_long_sequences(sample, device):
    """float32 keeps 1e-5 (relative, in norm) over 4096 steps with gamma close to
    1, where errors carry the longest."""
    inputs = list(recurrence_inputs(sample, device, torch.float32))
    inputs[1] = (1 - 0.01 * draw(inputs[1].shape, device, torch.float64, "gamma")).float()
    check_forward(inputs, torch.float32)


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", RECURRENCE_MODES, ids=[m[0] for m in RECURRENCE_MODES])
@pytest.mark.parametrize("sample", params(RECURRENCE_SAMPLES, "gradcheck"))
def test_recurrence_gradcheck(sample, mode, device):
    _, with_bias, with_h0 = mode
    inputs = recurrence_inputs(sample, device, torch.float64, with_bias, with_h0)
    leaves = [t.detach().requires_grad_() for _, t in given(inputs)]

    def fn(*args):
        values = iter(args)
        return mmrec_ops.recurrence(*(None if t is None else next(values) for t in inputs))

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", RECURRENCE_MODES, ids=[m[0] for m in RECURRENCE_MODES])
@pytest.mark.parametrize("sample", params(RECURRENCE_SAMPLES, "second_derivatives"))
def test_recurrence_second_derivatives_are_refused(sample, mode, device):
    """Second derivatives raise a clear error (they were silently zero); first
    derivatives taken with create_graph=True are the ordinary ones."""
    _, with_bias, with_h0 = mode
    inputs = recurrence_inputs(sample, device, torch.float64, with_bias, with_h0)
    leaves = [t.detach().requires_grad_() for _, t in given(inputs)]
    values = iter(leaves)
    out = mmrec_ops.recurrence(*(None if t is None else next(values) for t in inputs))
    grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
    _, ref_grads = reference_with_grads(inputs, 2 * out.detach())
    for grad, ref in zip(grads, ref_grads):
        assert_close_rel(grad, ref, grad_tolerance(torch.float64))
    with pytest.raises(
        RuntimeError, match=r"mmrec::recurrence: second derivatives \(double backward\) are not supported"
    ):
        torch.autograd.grad(sum(g.sum() for g in grads), leaves)


def opcheck_samples(device, dtype, requires_grad):
    """(args, kwargs) for opcheck: the table's opcheck entries in every mode."""
    samples = []
    for sample in entries(RECURRENCE_SAMPLES, "opcheck"):
        for _, with_bias, with_h0 in RECURRENCE_MODES:
            inputs = recurrence_inputs(sample, device, dtype, with_bias, with_h0)
            args = tuple(None if t is None else t.requires_grad_(requires_grad) for t in inputs)
            samples.append((args, {}))
    return samples


@pytest.mark.opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "requires_grad"])
def test_recurrence_opcheck(requires_grad, dtype, device):
    for args, kwargs in opcheck_samples(device, dtype, requires_grad):
        torch.library.opcheck(torch.ops.mmrec.recurrence.default, args, kwargs)


@pytest.mark.opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_recurrence_backward_opcheck(dtype, device):
    """Without requires_grad: recurrence_backward's autograd formula refuses
    (no second derivatives of the recurrence)."""
    for args, _ in opcheck_samples(device, dtype, requires_grad=False):
        h = mmrec_ops.recurrence(*args)
        torch.library.opcheck(torch.ops.mmrec.recurrence_backward.default, (torch.randn_like(h), *args, h))


@pytest.mark.compile
@pytest.mark.parametrize("device", DEVICES)
def test_recurrence_compiles_without_graph_break(device):
    def loss_fn(z, gamma, weight, bias, h0):
        h = mmrec_ops.recurrence(torch.tanh(z), torch.sigmoid(gamma), weight, bias, h0)
        return h.square().mean()

    assert_compiled_matches_eager(
        loss_fn,
        [
            [t.requires_grad_() for t in recurrence_inputs(sample, device, torch.float32)]
            for sample in entries(RECURRENCE_SAMPLES, "compile")
        ],
    )


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", params(RECURRENCE_SAMPLES, "empty"))
def test_recurrence_empty(sample, device):
    leaves = [t.requires_grad_() for t in recurrence_inputs(sample, device, torch.float32)]
    out = mmrec_ops.recurrence(*leaves)
    assert out.shape == sample.shape
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    for leaf, grad in zip(leaves, grads):
        assert grad.shape == leaf.shape
        assert torch.equal(grad, torch.zeros_like(leaf)), "nothing reaches an output when T, B, H or d is 0"


def bad_recurrence_inputs():
    z, g, w, b, h0 = recurrence_inputs(Sample((2, 5, 3, 4)), "cpu", torch.float32)
    return [
        ("int_z", (z.long(), g, w), "z to be float32"),
        ("z_rank3", (z[0], g[0], w), r"z of shape \[B, T, H, d\]"),
        ("gamma_dtype", (z, g.double(), w), "gamma to have the dtype of z"),
        ("gamma_shape", (z, g[:, :4], w), r"gamma of shape \[2, 5, 3, 4\]"),
        ("weight_dtype", (z, g, w.half()), "weight to have the dtype of z"),
        ("weight_shape", (z, g, w[:, :3]), r"weight of shape \[3, 4, 4\]"),
        ("bias_shape", (z, g, w, b[:2]), r"bias of shape \[3, 4\]"),
        ("h0_shape", (z, g, w, b, h0[:, :, :3]), r"h0 of shape \[2, 3, 4\]"),
        ("h0_dtype", (z, g, w, None, h0.bfloat16()), "h0 to have the dtype of z"),
    ]


@pytest.mark.ops
@pytest.mark.parametrize("kernel", ["cpu", "fake"])
@pytest.mark.parametrize("case", bad_recurrence_inputs(), ids=[c[0] for c in bad_recurrence_inputs()])
def test_recurrence_bad_inputs_raise_clear_errors(case, kernel):
    _, args, message = case
    with pytest.raises(ValueError, match=message):
        call_kernel(torch.ops.mmrec.recurrence, args, kernel)


@pytest.mark.ops
def test_recurrence_mixed_devices_raise_clear_errors():
    """A tensor on another device (meta stands in for one on machines without a GPU)."""
    z, g, w, _, _ = recurrence_inputs(Sample((2, 5, 3, 4)), "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"weight to be on the device of z \(cpu\), got meta"):
        torch.ops.mmrec.recurrence(z, g, w.to("meta"))


@pytest.mark.ops
def test_recurrence_backward_bad_inputs():
    z, g, w, b, h0 = recurrence_inputs(Sample((2, 5, 3, 4)), "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"grad_h of shape \[2, 5, 3, 4\]"):
        torch.ops.mmrec.recurrence_backward(z[:, :4], z, g, w, b, h0, z)
    with pytest.raises(ValueError, match="h to have the dtype of z"):
        torch.ops.mmrec.recurrence_backward(z, z, g, w, b, h0, z.double())


def wide_head_inputs(device):
    """Inputs of one head wider than the CUDA kernels hold, created under the
    active FakeTensorMode when there is one, with the message the kernels
    refuse them with."""
    from mmrec_ops.triton.recurrence import MAX_HEAD_DIM

    d = MAX_HEAD_DIM + 1
    inputs = recurrence_inputs(Sample((2, 3, 1, d)), device, torch.float32)
    return inputs, rf"mmrec::recurrence on CUDA: head width d = {d} exceeds the supported {MAX_HEAD_DIM}"


@pytest.mark.ops
@pytest.mark.compile
def test_recurrence_fake_kernel_refuses_what_cuda_refuses():
    """The fake kernel of CUDA tensors refuses a head width the CUDA kernels
    cannot hold, with their message, so that torch.compile fails when it
    traces the graph rather than when it launches; CPU tensors take any d."""
    with FakeTensorMode():
        inputs, message = wide_head_inputs("cuda")
        with pytest.raises(ValueError, match=message):
            torch.ops.mmrec.recurrence(*inputs)
        h = torch.empty(inputs[0].shape, device="cuda")
        with pytest.raises(ValueError, match=message):
            torch.ops.mmrec.recurrence_backward(h, *inputs, h)
        cpu_inputs, _ = wide_head_inputs("cpu")
        assert torch.ops.mmrec.recurrence(*cpu_inputs).shape == cpu_inputs[0].shape


@pytest.mark.compile
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_recurrence_compile_refuses_wide_heads_when_tracing(monkeypatch):
    from mmrec_ops.triton import recurrence as launchers

    def launched(*args):
        raise AssertionError("the kernel was launched: the refusal should come from tracing")

    monkeypatch.setattr(launchers, "recurrence_forward", launched)
    inputs, message = wide_head_inputs("cuda")
    torch._dynamo.reset()
    with pytest.raises(Exception, match=message):
        torch.compile(mmrec_ops.recurrence, fullgraph=True)(*inputs)
