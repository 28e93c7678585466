"""What the contract (tests/ops/test_contract.py) does not check of torch.ops.mmrec.recurrence
and recurrence_backward: float32 accuracy over long sequences, second derivatives refused,
and head widths the CUDA kernels cannot hold refused when tracing."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mmrec_ops
from tests.helpers import DEVICES, assert_close_rel, grad_tolerance
from tests.ops.samples import RECURRENCE_SAMPLES, Sample, draw, params, recurrence_inputs
from tests.ops.specs import RECURRENCE, Variant, check_forward, reference_gradients


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", params(RECURRENCE_SAMPLES, "long"))
def test_recurrence_float32_accuracy_over_long_sequences(sample, device):
    """float32 keeps 1e-5 (relative, in norm) over 4096 steps with gamma close to
    1, where errors carry the longest."""
    inputs = list(recurrence_inputs(sample, device, torch.float32))
    inputs[1] = (1 - 0.01 * draw(inputs[1].shape, device, torch.float64, "gamma")).float()
    check_forward(RECURRENCE, inputs, Variant(), torch.float32)


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", RECURRENCE.variants, ids=lambda variant: variant.name)
@pytest.mark.parametrize("sample", params(RECURRENCE_SAMPLES, "second_derivatives"))
def test_recurrence_second_derivatives_are_refused(sample, variant, device):
    """Second derivatives raise a clear error (they were silently zero); first
    derivatives taken with create_graph=True are the ordinary ones."""
    inputs = RECURRENCE.args(sample, device, torch.float64, variant)
    leaves = RECURRENCE.leaves(inputs)
    out = mmrec_ops.recurrence(*RECURRENCE.with_args(inputs, leaves))
    grads = torch.autograd.grad(out.square().sum(), list(leaves.values()), create_graph=True)
    _, ref_grads = reference_gradients(RECURRENCE, inputs, variant, (2 * out.detach(),))
    for grad, ref in zip(grads, ref_grads.values()):
        assert_close_rel(grad, ref, grad_tolerance(torch.float64))
    with pytest.raises(RuntimeError, match=r"mmrec::recurrence: second derivatives are not supported"):
        torch.autograd.grad(sum(g.sum() for g in grads), list(leaves.values()))


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
