"""torch.ops.mmrec.memory_read and memory_read_backward against the float64 reference.

Inputs are drawn standard normal, so a score q . k / sqrt(d) is of order 1, as in the
model. The kernels compute the scores, the softmax and its sums in float32 (float64 for
float64) and round only the stored output: out carries float32 accumulation and one
rounding (output_tolerance), lse (float32, float64 for float64: never rounded to the
input dtype) float32 accumulation alone (accumulation_error).

The backward recomputes the probabilities from the saved lse and forms
delta = grad_out . out - grad_lse from the saved out, rounded to the input dtype. That
rounding is no error of the backward but of its input, and grad_s = p (grad_out . v - delta)
amplifies it where the two terms cancel (a peaked softmax: a query's gradient then is small
and the rounding of out can exceed it several times, bfloat16 at T = 1 for one seed in a
hundred). As delta with the saved out equals delta with the exact out less
grad_out . (out_saved - out), the expected gradients are the reference's for grad_lse
changed by that much: the saved out's rounding exactly accounted for, so what remains is
float32 accumulation, the rounding of each stored gradient and, on CUDA, of the bfloat16
and float16 operands p and grad_s of the tensor-core products: two roundings,
grad_tolerance.

The Triton kernels also run under Triton's interpreter on CPU tensors, with these checks:
tests/triton/test_memory_read_interpret.py.
"""

from __future__ import annotations

import pytest
import torch

import mmrec_ops
from mmrec_ops.reference import memory_read_reference
from tests.helpers import (
    DEVICES,
    DTYPES,
    accumulation_error,
    assert_close_rel,
    call_kernel,
    grad_tolerance,
    nan_poison,
    output_tolerance,
)
from tests.ops.samples import (
    MEMORY_READ_NAMES,
    MEMORY_READ_SAMPLES,
    MemoryReadSample,
    draw,
    entries,
    memory_read_inputs,
    params,
)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def differentiable(inputs):
    """(q, group, tokens) of memory_read's arguments."""
    q, group, _, tokens, _, _ = inputs
    return q, group, tokens


def with_differentiable(inputs, q, group, tokens):
    """memory_read's arguments with q, group and tokens replaced."""
    _, _, group_mask, _, first_token, window = inputs
    return q, group, group_mask, tokens, first_token, window


def reference_with_grads(inputs, grad_out, grad_lse, saved_out=None):
    """out, lse and the gradients of q, group and tokens of the float64 reference on
    upcast CPU copies, for upstream gradients grad_out and grad_lse. With saved_out (the
    out a backward reads), the gradients the backward formula gives from it: the
    reference's for grad_lse less grad_out . (saved_out - out) (the module's docstring)."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in differentiable(inputs)]
    _, _, group_mask, _, first_token, window = inputs
    out, lse = memory_read_reference(leaves[0], leaves[1], group_mask.cpu(), leaves[2], first_token.cpu(), window)
    grad_out, grad_lse = grad_out.double().cpu(), grad_lse.double().cpu()
    if saved_out is not None:
        grad_lse = grad_lse - (grad_out * (saved_out.double().cpu() - out.detach())).sum(-1).transpose(1, 2)
    grads = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse))
    return out.detach(), lse.detach(), grads


def check_outputs(out, lse, ref_out, ref_lse, q, dtype):
    B, T, H, _ = q.shape
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == lse_dtype(dtype) and lse.shape == (B, H, T) and lse.is_contiguous()
    assert_close_rel(out, ref_out, output_tolerance(dtype))
    assert_close_rel(lse, ref_lse, accumulation_error(dtype), what="lse")


def check_forward(inputs, dtype):
    """memory_read (NaN-poisoned outputs) against the float64 reference on upcast copies."""
    with nan_poison():
        out, lse = mmrec_ops.memory_read(*inputs)
    q, group, group_mask, tokens, first_token, window = inputs
    ref_out, ref_lse = memory_read_reference(
        q.double().cpu(), group.double().cpu(), group_mask.cpu(), tokens.double().cpu(), first_token.cpu(), window
    )
    check_outputs(out, lse, ref_out, ref_lse, q, dtype)


def unseen(inputs):
    """(group_unseen [nb, G], token_unseen [W - 1 + T]): the entries no query sees, whose
    gradients are exactly zero: the candidates no query of a block selects (all of the
    blocks past the last query's), and the tokens before first_token (each other token is
    in its own query's window)."""
    q, _, group_mask, tokens, first_token, _ = inputs
    nb, Q, G = group_mask.shape
    T = q.shape[1]
    rows = torch.arange(nb * Q, device=group_mask.device).view(nb, Q, 1) < T
    return ~(group_mask & rows).any(1), torch.arange(tokens.shape[1], device=tokens.device) < first_token


def check_gradients_of(inputs, dtype, out, lse, grads, grad_out, grad_lse):
    """Outputs and gradients of q, group and tokens (for grad_out, grad_lse) against the
    reference's (from the saved out); the gradients of what no query sees exactly zero."""
    ref_out, ref_lse, ref_grads = reference_with_grads(inputs, grad_out, grad_lse, saved_out=out)
    check_outputs(out, lse, ref_out, ref_lse, inputs[0], dtype)
    for name, leaf, grad, ref in zip(MEMORY_READ_NAMES, differentiable(inputs), grads, ref_grads):
        assert grad.dtype == dtype and grad.shape == leaf.shape, name
        assert_close_rel(grad, ref, grad_tolerance(dtype), what=f"grad of {name}")
    _, grad_group, grad_tokens = grads
    group_unseen, token_unseen = unseen(inputs)
    assert (grad_group[:, group_unseen] == 0).all(), "grad of group: nonzero where no query sees the candidate"
    assert (grad_tokens[:, token_unseen] == 0).all(), "grad of tokens: nonzero before first_token"


def upstream_grads(inputs, dtype, through=("out", "lse")):
    """Random upstream gradients of out ([B, T, H, d] in dtype) and lse ([B, H, T] in lse's
    dtype); zero for the output not in `through`."""
    q = inputs[0]
    B, T, H, _ = q.shape
    grad_out = draw(q.shape, q.device, dtype)
    grad_lse = draw((B, H, T), q.device, lse_dtype(dtype))
    if "out" not in through:
        grad_out.zero_()
    if "lse" not in through:
        grad_lse.zero_()
    return grad_out, grad_lse


def check_gradients(inputs, dtype, through=("out", "lse")):
    """memory_read's outputs and its gradients through out and lse (NaN-poisoned)."""
    grad_out, grad_lse = upstream_grads(inputs, dtype, through)
    leaves = [t.detach().requires_grad_() for t in differentiable(inputs)]
    with nan_poison():
        out, lse = mmrec_ops.memory_read(*with_differentiable(inputs, *leaves))
        grads = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse))
    check_gradients_of(inputs, dtype, out.detach(), lse.detach(), grads, grad_out, grad_lse)


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample", params(MEMORY_READ_SAMPLES, "forward"))
def test_memory_read_matches_reference(sample, dtype, device):
    check_forward(memory_read_inputs(sample, device, dtype), dtype)


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample", params(MEMORY_READ_SAMPLES, "gradients"))
def test_memory_read_gradients_match_reference(sample, dtype, device):
    check_gradients(memory_read_inputs(sample, device, dtype), dtype)


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("through", ["out", "lse"])
@pytest.mark.parametrize("sample", params(MEMORY_READ_SAMPLES, "one_output"))
def test_memory_read_gradients_through_one_output(sample, through, dtype, device):
    """Through out alone, then lse alone (a read merged with others by its lse): each
    path checked on its own, not only in the sum."""
    check_gradients(memory_read_inputs(sample, device, dtype), dtype, through=(through,))


@pytest.mark.ops
@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample", params(MEMORY_READ_SAMPLES, "strided"))
def test_memory_read_strided_inputs(sample, dtype, device):
    inputs = memory_read_inputs(sample, device, dtype)
    assert not inputs[0].is_contiguous()
    if sample.layout == "strided":  # all but first_token, a 0-dim tensor
        assert not any(t.is_contiguous() for t in inputs[:4])
    check_forward(inputs, dtype)
    check_gradients(inputs, dtype)


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
def test_memory_read_takes_first_token_as_an_int(device):
    """The Python wrapper takes first_token as an int too, the same read as the tensor's."""
    q, group, group_mask, tokens, first_token, window = memory_read_inputs(
        MemoryReadSample((2, 9, 2, 8, 3, 4, 3), missing=2), device, torch.float32
    )
    out, lse = mmrec_ops.memory_read(q, group, group_mask, tokens, first_token, window)
    out_int, lse_int = mmrec_ops.memory_read(q, group, group_mask, tokens, int(first_token), window)
    assert torch.equal(out, out_int) and torch.equal(lse, lse_int)


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
def test_memory_read_query_seeing_nothing_gives_nan(device):
    """As softmax over nothing: NaN and -inf, not an arbitrary value, for the query that
    sees no key (query 0: no candidate, its window's tokens missing), and the others'
    results unchanged (they share its tiles)."""
    sample = MemoryReadSample((2, 9, 2, 8, 3, 4, 3), missing=2)
    q, group, group_mask, tokens, first_token, window = memory_read_inputs(sample, device, torch.float32)
    group_mask[0, 0] = False
    first_token.fill_(window)  # query 0's window: tokens 0 .. W - 1; query 1 still sees token W
    with nan_poison():
        out, lse = mmrec_ops.memory_read(q, group, group_mask, tokens, first_token, window)
    assert out[:, 0].isnan().all() and (lse[:, :, 0] == float("-inf")).all()
    ref_out, ref_lse = memory_read_reference(
        q.double().cpu(), group.double().cpu(), group_mask.cpu(), tokens.double().cpu(), first_token.cpu(), window
    )
    assert_close_rel(out[:, 1:], ref_out[:, 1:], output_tolerance(torch.float32))
    assert_close_rel(lse[:, :, 1:], ref_lse[:, :, 1:], accumulation_error(torch.float32), what="lse")
    group_mask[:] = False
    first_token.fill_(tokens.shape[1])
    out, lse = mmrec_ops.memory_read(q, group, group_mask, tokens, first_token, window)
    assert out.isnan().all() and (lse == float("-inf")).all()


def gradcheck_fn(inputs):
    """(fn, leaves): memory_read as a function of q, group and tokens, for gradcheck;
    both outputs are checked."""
    leaves = [t.detach().requires_grad_() for t in differentiable(inputs)]

    def fn(q, group, tokens):
        return mmrec_ops.memory_read(*with_differentiable(inputs, q, group, tokens))

    return fn, leaves


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", params(MEMORY_READ_SAMPLES, "gradcheck"))
def test_memory_read_gradcheck(sample, device):
    fn, leaves = gradcheck_fn(memory_read_inputs(sample, device, torch.float64))
    assert torch.autograd.gradcheck(fn, leaves)


def opcheck_args(device, dtype, requires_grad):
    """memory_read's arguments for each of the table's opcheck entries, q, group and
    tokens requiring grad or not."""
    samples = []
    for sample in entries(MEMORY_READ_SAMPLES, "opcheck"):
        inputs = memory_read_inputs(sample, device, dtype)
        samples.append(with_differentiable(inputs, *(t.requires_grad_(requires_grad) for t in differentiable(inputs))))
    return samples


@pytest.mark.opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "requires_grad"])
def test_memory_read_opcheck(requires_grad, dtype, device):
    for args in opcheck_args(device, dtype, requires_grad):
        torch.library.opcheck(torch.ops.mmrec.memory_read.default, args)


@pytest.mark.opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_memory_read_backward_opcheck(dtype, device):
    """Without requires_grad: memory_read_backward has no derivative of its own."""
    for args in opcheck_args(device, dtype, requires_grad=False):
        q, group, group_mask, tokens, first_token, window = args
        out, lse = mmrec_ops.memory_read(*args)
        grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
        torch.library.opcheck(
            torch.ops.mmrec.memory_read_backward.default,
            (grad_out, grad_lse, q, group, group_mask, tokens, first_token, out, lse, window),
        )


@pytest.mark.compile
@pytest.mark.parametrize("device", DEVICES)
def test_memory_read_compiles_without_graph_break(device):
    """torch.compile(fullgraph=True, dynamic=True) gives eager's loss and gradients of q,
    group and tokens, at two lengths and block counts of one graph (the masks are inputs
    too, not differentiated; the window, one int, is the same in both)."""
    samples = entries(MEMORY_READ_SAMPLES, "compile")
    assert len({s.shape[-1] for s in samples}) == 1

    def loss_fn(q, group, group_mask, tokens, first_token, window):
        out, lse = mmrec_ops.memory_read(torch.tanh(q), group, group_mask, tokens, first_token, window)
        return out.square().mean() + torch.sin(lse).mean()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True)
    for sample in samples:
        inputs = memory_read_inputs(sample, device, torch.float32)
        leaves = [t.requires_grad_() for t in differentiable(inputs)]
        args = with_differentiable(inputs, *leaves)
        expected = loss_fn(*args)
        expected_grads = torch.autograd.grad(expected, leaves)
        actual = compiled(*args)
        actual_grads = torch.autograd.grad(actual, leaves)
        assert_close_rel(actual.detach(), expected.detach(), 1e-6)
        for name, a, e in zip(MEMORY_READ_NAMES, actual_grads, expected_grads):
            assert_close_rel(a, e, 1e-6, what=f"compiled gradient of {name}")


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", params(MEMORY_READ_SAMPLES, "empty"))
def test_memory_read_empty(sample, device):
    """Empty time (no block, or blocks past the end only), batch or heads: empty results,
    and zero gradients (nothing reaches an output)."""
    inputs = memory_read_inputs(sample, device, torch.float32)
    leaves = [t.requires_grad_() for t in differentiable(inputs)]
    out, lse = mmrec_ops.memory_read(*with_differentiable(inputs, *leaves))
    B, T, H, _ = leaves[0].shape
    assert out.shape == leaves[0].shape and out.dtype == torch.float32
    assert lse.shape == (B, H, T) and lse.dtype == torch.float32
    grads = torch.autograd.grad((out, lse), leaves, (torch.ones_like(out), torch.ones_like(lse)))
    for name, leaf, grad in zip(MEMORY_READ_NAMES, leaves, grads):
        assert grad.shape == leaf.shape, name
        assert torch.equal(grad, torch.zeros_like(leaf)), f"grad of {name}: nothing reaches an output"


# ---------------------------------------------------------------------------
# Bad inputs: a ValueError naming the argument, from the CPU kernel and the fake one alike.


def bad_memory_read_inputs():
    # B = 2, T = 5, H = 2, d = 4, G = 3, Q = 4, W = 3: nb = 2, H d = 8, W - 1 + T = 7.
    q, g, gm, tk, tm, W = memory_read_inputs(MemoryReadSample((2, 5, 2, 4, 3, 4, 3)), "cpu", torch.float32)
    return [
        ("int_q", (q.long(), g, gm, tk, tm, W), "q to be float32, float64, bfloat16 or float16"),
        ("q_rank3", (q[0], g, gm, tk, tm, W), r"q of shape \[B, T, H, d\] \(4 dims\)"),
        ("d_0", (q[..., :0], g[..., :0], gm, tk[..., :0], tm, W), r"q with d >= 1 channels per head, got d = 0"),
        ("window_0", (q, g, gm, tk, tm, 0), r"window >= 1, got 0"),
        ("window_negative", (q, g, gm, tk, tm, -2), r"window >= 1, got -2"),
        ("group_rank4", (q, g[:, 0], gm, tk, tm, W), r"group of shape \[B, nb, G, 2, H d\] \(5 dims\)"),
        ("group_dtype", (q, g.double(), gm, tk, tm, W), "group to have the dtype of q"),
        ("group_width", (q, g[..., :6], gm, tk, tm, W), r"group of shape \[2, 2, 3, 2, 8\]"),
        ("group_batch", (q, g[:1], gm, tk, tm, W), r"group of shape \[2, 2, 3, 2, 8\]"),
        ("group_pair", (q, g[:, :, :, :1], gm, tk, tm, W), r"group of shape \[2, 2, 3, 2, 8\]"),
        ("group_mask_float", (q, g, gm.float(), tk, tm, W), "group_mask to be bool"),
        ("group_mask_rank2", (q, g, gm[0], tk, tm, W), r"group_mask of shape \[nb, Q, G\] \(3 dims\)"),
        ("group_mask_candidates", (q, g, gm[..., :2], tk, tm, W), r"group_mask of shape \[2, 4, 3\]"),
        ("group_mask_blocks", (q, g, gm[:1], tk, tm, W), r"group_mask of shape \[2, 4, 3\]"),
        (
            "too_few_blocks",
            (q, g[:, :1], gm[:1], tk, tm, W),
            r"group_mask's nb Q >= T \(blocks covering every query\), got nb = 1, Q = 4, T = 5",
        ),
        ("tokens_dtype", (q, g, gm, tk.half(), tm, W), "tokens to have the dtype of q"),
        ("tokens_length", (q, g, gm, tk[:, 2:], tm, W), r"tokens of shape \[2, 7, 2, 8\]"),
        ("tokens_rank3", (q, g, gm, tk[0], tm, W), r"tokens of shape \[2, 7, 2, 8\]"),
        ("tokens_window", (q, g, gm, tk, tm, W + 1), r"tokens of shape \[2, 8, 2, 8\]"),
        (
            "first_token_float",
            (q, g, gm, tk, tm.float(), W),
            "first_token to be an int64 tensor of 0 dims, got torch.float32",
        ),
        (
            "first_token_int32",
            (q, g, gm, tk, tm.int(), W),
            "first_token to be an int64 tensor of 0 dims, got torch.int32",
        ),
        (
            "first_token_1dim",
            (q, g, gm, tk, tm.reshape(1), W),
            r"first_token to be an int64 tensor of 0 dims, got torch.int64 of shape \[1\]",
        ),
    ]


@pytest.mark.ops
@pytest.mark.parametrize("kernel", ["cpu", "fake"])
@pytest.mark.parametrize("case", bad_memory_read_inputs(), ids=[c[0] for c in bad_memory_read_inputs()])
def test_memory_read_bad_inputs_raise_clear_errors(case, kernel):
    _, args, message = case
    with pytest.raises(ValueError, match=message):
        call_kernel(torch.ops.mmrec.memory_read, args, kernel)


@pytest.mark.ops
@pytest.mark.parametrize("name", ["group", "group_mask", "tokens", "first_token"])
def test_memory_read_mixed_devices_raise_clear_errors(name):
    """A tensor on another device (meta stands in for one on machines without a GPU)."""
    args = dict(
        zip(
            ("q", "group", "group_mask", "tokens", "first_token", "window"),
            memory_read_inputs(MemoryReadSample((2, 5, 2, 4, 3, 4, 3)), "cpu", torch.float32),
        )
    )
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=rf"{name} to be on the device of q \(cpu\), got meta"):
        torch.ops.mmrec.memory_read(*args.values())


def bad_memory_read_backward_inputs():
    q, g, gm, tk, tm, W = memory_read_inputs(MemoryReadSample((2, 5, 2, 4, 3, 4, 3)), "cpu", torch.float32)
    out, lse = torch.randn_like(q), torch.randn(2, 2, 5)
    return [
        ("grad_out_shape", (out[:, :4], lse, q, g, gm, tk, tm, out, lse, W), r"grad_out of shape \[2, 5, 2, 4\]"),
        ("grad_out_dtype", (out.double(), lse, q, g, gm, tk, tm, out, lse, W), "grad_out to have the dtype of q"),
        ("grad_lse_dtype", (out, lse.double(), q, g, gm, tk, tm, out, lse, W), r"grad_lse in torch.float32 on cpu"),
        ("grad_lse_shape", (out, lse[:, :, :4], q, g, gm, tk, tm, out, lse, W), r"grad_lse of shape \[2, 2, 5\]"),
        ("out_dtype", (out, lse, q, g, gm, tk, tm, out.half(), lse, W), "out to have the dtype of q"),
        ("lse_shape", (out, lse, q, g, gm, tk, tm, out, lse.transpose(1, 2), W), r"lse of shape \[2, 2, 5\]"),
        ("lse_dtype", (out, lse, q, g, gm, tk, tm, out, lse.half(), W), r"lse in torch.float32 on cpu"),
        ("tokens_length", (out, lse, q, g, gm, tk[:, 1:], tm, out, lse, W), r"tokens of shape \[2, 7, 2, 8\]"),
        ("window_0", (out, lse, q, g, gm, tk, tm, out, lse, 0), r"window >= 1, got 0"),
    ]


@pytest.mark.ops
@pytest.mark.parametrize("kernel", ["cpu", "fake"])
@pytest.mark.parametrize(
    "case", bad_memory_read_backward_inputs(), ids=[c[0] for c in bad_memory_read_backward_inputs()]
)
def test_memory_read_backward_bad_inputs(case, kernel):
    _, args, message = case
    with pytest.raises(ValueError, match=message):
        call_kernel(torch.ops.mmrec.memory_read_backward, args, kernel)
