"""The Triton kernels of mmrec::recurrence, run by Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1), against the float64 reference: a broken CUDA
kernel fails CI, which has no GPU.

Inputs are those of tests/ops/samples.py (the model's regime: gamma in
(0, 1), z standard normal, W of scale 1/sqrt(d)). Tolerances:

- Output h, against recurrence_reference on float64 copies of the inputs:
  output_tolerance(dtype). The kernel carries the state in float32 and only
  rounds what it stores, never the state it feeds back; its dots are exact in
  float32 terms (float32 "ieee" dots, or for bfloat16/float16 a weight exact in
  its dtype times the float32 state split into two terms of that dtype, which
  leaves 2^-16 relative at most). So the error is float32 accumulation plus
  one rounding of each stored element, the two terms of output_tolerance.
- Gradients, against autograd through recurrence_reference in float64 run one
  step at a time with the state passed on taking the value of the h the
  kernel saved (the h its backward reads) while keeping its derivative: the
  exact backward of the given inputs. In bfloat16/float16 the saved h is
  rounded, and the gate the backward recomputes from it moves by up to one
  rounding times the slope of the recurrence, amplified along the reverse pass
  by the Jacobians of the step; the reference sees the same saved h, so that
  effect is not an error of the kernel and the bound stays output_tolerance:
  float32 accumulation (the carry, grad_W and grad_b sums stay in float32) and
  one rounding of each stored gradient.
- float32/float64 gradients are also checked against plain autograd through
  recurrence_reference with grad_tolerance: the saved h there is the float32
  state itself, so the two references agree to float32 rounding. (The
  end-to-end bfloat16/float16 comparison, where the rounding of the saved h
  enters, is tests/ops/test_recurrence.py's, run on a GPU.)
"""

from __future__ import annotations

import pytest
import torch

from mmrec_ops.reference import recurrence_reference
from tests.helpers import DTYPES, INTERPRETER_ONLY, assert_close_rel, grad_tolerance, nan_poison, output_tolerance
from tests.ops.samples import RECURRENCE_SAMPLES, draw, params, recurrence_grad_output, recurrence_inputs
from tests.ops.specs import RECURRENCE, RECURRENCE_NAMES, Variant, reference_gradients
from tests.ops.test_recurrence import wide_head_inputs

pytestmark = [pytest.mark.triton, INTERPRETER_ONLY]
OP = "recurrence"  # the launchers under test: mmrec_ops.triton.<OP> (the `interpreted` fixture)


@pytest.fixture(params=[4, 0], ids=["pipelined", "prefetch"])
def both_loops(interpreted, request, monkeypatch):
    """The launchers with either form of the time loop at every size: tl.range
    with num_stages (Triton's software pipelining) or the register prefetch of
    the next step."""
    stages = request.param
    config = {
        size: {
            block_d: (fwd_warps, stages, bwd_warps, stages) for block_d, (fwd_warps, _, bwd_warps, _) in by_d.items()
        }
        for size, by_d in interpreted._CONFIG.items()
    }
    monkeypatch.setattr(interpreted, "_CONFIG", config)
    interpreted._clear_plans()  # the plans are cached per shape, not per knob
    yield interpreted
    interpreted._clear_plans()


def run_both(interpreted, inputs, grad_h):
    """h and the five gradients from the launchers, every output NaN-poisoned beforehand."""
    with nan_poison():
        h = interpreted.recurrence_forward(*inputs)
        grads = interpreted.recurrence_backward(grad_h, *inputs, h)
    return h, grads


def reference_at_saved_state(inputs, h_saved, grad_h):
    """The five gradients of the float64 reference whose step t reads
    h_saved[:, t-1] as its state: recurrence_reference one step at a time, the
    state handed on with h_saved's value and the graph's derivative. An omitted
    bias or h0 is a zero leaf, whose gradient the launchers return too."""
    z, gamma, weight, bias, h0 = inputs
    B, _, H, d = z.shape
    bias = torch.zeros(H, d) if bias is None else bias
    h0 = torch.zeros(B, H, d) if h0 is None else h0
    leaves = [t.detach().double().requires_grad_() for t in (z, gamma, weight, bias, h0)]
    z, gamma, weight, bias, state = leaves
    outputs = []
    for t in range(z.shape[1]):
        h = recurrence_reference(z[:, t : t + 1], gamma[:, t : t + 1], weight, bias, state)[:, 0]
        outputs.append(h)
        state = h + (h_saved[:, t].double() - h).detach()
    return torch.autograd.grad(torch.stack(outputs, 1), leaves, grad_h.double(), allow_unused=True)


def check_against_reference(interpreted, inputs, dtype, grad_h=None):
    z = inputs[0]
    if grad_h is None:
        grad_h = draw(z.shape, "cpu", dtype)
    h, grads = run_both(interpreted, inputs, grad_h)
    assert h.dtype == dtype and h.shape == z.shape and h.is_contiguous()
    (ref_h,), ref_grads = reference_gradients(RECURRENCE, inputs, Variant(), (grad_h,))
    assert_close_rel(h, ref_h, output_tolerance(dtype))

    for name, grad, ref in zip(RECURRENCE_NAMES, grads, reference_at_saved_state(inputs, h, grad_h)):
        assert grad.dtype == dtype and grad.is_contiguous(), name
        assert_close_rel(grad, ref, output_tolerance(dtype), what=f"grad of {name} (at the saved h)")
    if dtype in (torch.float32, torch.float64):
        actual = dict(zip(RECURRENCE_NAMES, grads))
        for name, ref in ref_grads.items():
            assert_close_rel(actual[name], ref, grad_tolerance(dtype), what=f"grad of {name}")


# The table's triton entries: T = 1, prime T, more than one batch tile of 16;
# d = 24 is not a power of two (padded to 32 with masks).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_params", [False, True], ids=["plain", "bias_h0"])
@pytest.mark.parametrize("sample", params(RECURRENCE_SAMPLES, "triton"))
def test_triton_recurrence_matches_reference(both_loops, sample, with_params, dtype):
    check_against_reference(both_loops, recurrence_inputs(sample, "cpu", dtype, with_params, with_params), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", [(True, False), (False, True)], ids=["bias_only", "h0_only"])
@pytest.mark.parametrize("sample", params(RECURRENCE_SAMPLES, "triton_bias_or_h0"))
def test_triton_recurrence_bias_or_h0(interpreted, sample, mode, dtype):
    check_against_reference(interpreted, recurrence_inputs(sample, "cpu", dtype, *mode), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sample", params(RECURRENCE_SAMPLES, "triton_strided"))
def test_triton_recurrence_strided(both_loops, sample, dtype):
    """z, gamma and grad_h as [B, H, T, d] seen through .transpose(1, 2), W as a
    per-head transpose, bias and h0 as every other element of wider tensors."""
    inputs = recurrence_inputs(sample, "cpu", dtype)
    assert not any(t.is_contiguous() for t in inputs)
    check_against_reference(both_loops, inputs, dtype, recurrence_grad_output(sample, "cpu", dtype))


@pytest.mark.parametrize("sample", params(RECURRENCE_SAMPLES, "triton_saved_h"))
def test_triton_recurrence_backward_reads_strided_h(interpreted, sample):
    """The saved h may come back to the backward in any layout."""
    inputs = recurrence_inputs(sample, "cpu", torch.float32)
    grad_h = recurrence_grad_output(sample, "cpu", torch.float32)
    h, grads = run_both(interpreted, inputs, grad_h)
    h_strided = h.transpose(1, 2).contiguous().transpose(1, 2)
    with nan_poison():
        again = interpreted.recurrence_backward(grad_h, *inputs, h_strided)
    for a, b in zip(grads, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sample", params(RECURRENCE_SAMPLES, "triton_padded"))
def test_triton_recurrence_padded_head_width(interpreted, sample, dtype):
    """d below the smallest tile (16) and d = 80 padded to 128 (in float64 the
    backward then reads a gate computed beforehand instead of recomputing it)."""
    check_against_reference(interpreted, recurrence_inputs(sample, "cpu", dtype), dtype)


@pytest.mark.parametrize("sample", params(RECURRENCE_SAMPLES, "triton_empty"))
def test_triton_recurrence_empty(interpreted, sample):
    inputs = recurrence_inputs(sample, "cpu", torch.float32)
    h, (grad_z, grad_gamma, grad_w, grad_b, grad_h0) = run_both(interpreted, inputs, torch.ones(sample.shape))
    assert h.shape == grad_z.shape == grad_gamma.shape == sample.shape
    for grad, t in ((grad_w, inputs[2]), (grad_b, inputs[3]), (grad_h0, inputs[4])):
        assert torch.equal(grad, torch.zeros_like(t)), "nothing reaches an output when T = 0 or B = 0"


def test_triton_recurrence_rejects_wide_heads(interpreted):
    inputs, message = wide_head_inputs("cpu")
    with pytest.raises(ValueError, match=message):
        interpreted.recurrence_forward(*inputs)
