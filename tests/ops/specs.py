"""The contract of the mmrec ops: one OpSpec per op, and the checks that hold for all.

An OpSpec names what the common checks of tests/ops/test_contract.py need of an op, as
pytorch/extension-cpp's and fla's op tests do: the op and its float64 reference
(mmrec_ops.reference), its sample table and input function (tests/ops/samples.py), its
arguments and which of them are differentiable, the ways it is called (`variants`: the
optional arguments left out, keyword arguments), its outputs' dtypes and tolerances, its
backward op, a loss to compile and its bad inputs. The checks here (outputs, gradients,
against the reference) are shared with the op files and the Triton interpreter tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import mmrec_ops
from mmrec_ops.reference import (
    decode_read_reference,
    memory_read_reference,
    recurrence_reference,
    scan_reference,
    segment_read_reference,
    skinny_addmm_reference,
)
from tests.helpers import (
    accumulation_error,
    assert_close_rel,
    grad_tolerance,
    nan_poison,
    output_tolerance,
)
from tests.ops.samples import (
    DECODE_READ_SAMPLES,
    MEMORY_READ_SAMPLES,
    RECURRENCE_SAMPLES,
    SCAN_SAMPLES,
    SEGMENT_READ_SAMPLES,
    SKINNY_ADDMM_SAMPLES,
    decode_read_inputs,
    draw,
    entries,
    memory_read_inputs,
    recurrence_grad_output,
    recurrence_inputs,
    scan_inputs,
    segment_read_inputs,
    skinny_addmm_inputs,
)


@dataclass(frozen=True)
class Variant:
    """One way of calling an op: its optional arguments in `omitted` left out (None), and
    keyword arguments."""

    name: str = ""
    omitted: tuple[str, ...] = ()
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BadInput:
    """Arguments `op` refuses with a ValueError whose message matches `message`."""

    id: str
    op: torch._ops.OpOverload
    args: tuple
    message: str


def draw_like(sample, outputs) -> tuple:
    """Upstream gradients: standard normal, contiguous, one per output in its dtype."""
    return tuple(draw(out.shape, out.device, out.dtype) for out in outputs)


def same_grad_outputs(outputs, ref_outputs, grad_outputs) -> tuple:
    """The reference's backward is given the op's upstream gradients."""
    return grad_outputs


@dataclass(frozen=True)
class OpSpec:
    """What the common checks need of one op; see the module's docstring.

    `inputs(sample, device, dtype)` gives every argument (optional ones given), in the
    order of `arg_names`; `device_of` is the argument whose device and dtype the others
    must share. `grad_outputs(sample, outputs)` draws the upstream gradients;
    `reference_grad_outputs(outputs, ref_outputs, grad_outputs)` those the reference's
    backward is given (the op's, unless its backward reads a rounded saved output);
    `unreached(args)` the gradients that are exactly zero, {name: index}.
    `backward(args, kwargs, outputs)` gives (the backward op, its arguments) for opcheck;
    `second_derivatives` whether the op has them (gradgradcheck, opcheck of the backward
    op with requires_grad, nested torch.func transforms; else they are refused by name);
    `forward_mode` whether it has forward-mode derivatives (else refused by name).
    `strided` names, per layout of the table, the arguments that layout leaves
    non-contiguous.
    """

    name: str
    op: Callable
    overload: torch._ops.OpOverload
    reference: Callable
    samples: list
    inputs: Callable
    arg_names: tuple[str, ...]
    differentiable: tuple[str, ...]
    device_of: str
    strided: dict[str, tuple[str, ...]]
    compile_loss: Callable
    bad_inputs: Callable[[tuple], list[BadInput]]
    variants: tuple[Variant, ...] = (Variant(),)
    output_names: tuple[str, ...] = ("output",)
    output_dtypes: Callable = lambda dtype: (dtype,)
    output_tolerances: tuple[Callable, ...] = (output_tolerance,)
    gradient_tolerance: Callable = grad_tolerance
    grad_outputs: Callable = draw_like
    reference_grad_outputs: Callable = same_grad_outputs
    unreached: Callable | None = None
    backward: Callable | None = None
    second_derivatives: bool = False
    forward_mode: bool = False

    def args(self, sample, device, dtype, variant: Variant = Variant()) -> tuple:
        """The sample's arguments, those the variant omits None."""
        inputs = self.inputs(sample, device, dtype)
        return tuple(None if name in variant.omitted else t for name, t in zip(self.arg_names, inputs))

    def differentiable_args(self, args) -> dict:
        """{name: argument} of the differentiable arguments given."""
        return {name: t for name, t in zip(self.arg_names, args) if name in self.differentiable and t is not None}

    def leaves(self, args) -> dict:
        """{name: a detached copy requiring grad} of the differentiable arguments given."""
        return {name: t.detach().requires_grad_() for name, t in self.differentiable_args(args).items()}

    def with_args(self, args, replaced: dict) -> tuple:
        """args with the named ones replaced."""
        return tuple(replaced.get(name, t) for name, t in zip(self.arg_names, args))

    def bad_sample(self):
        (sample,) = entries(self.samples, "bad_inputs")
        return sample


def as_tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def upcast(arg):
    """A float64 CPU copy of a floating-point tensor, a CPU copy of another, else arg."""
    if not isinstance(arg, torch.Tensor):
        return arg
    return arg.detach().double().cpu() if arg.is_floating_point() else arg.cpu()


def check_outputs(spec: OpSpec, outputs, expected, dtype) -> None:
    """Each output new, contiguous, of its dtype and the reference's shape, within its tolerance."""
    dtypes = spec.output_dtypes(dtype)
    for name, out, ref, out_dtype, tolerance in zip(
        spec.output_names, outputs, expected, dtypes, spec.output_tolerances, strict=True
    ):
        assert out.dtype == out_dtype and out.shape == ref.shape and out.is_contiguous(), name
        assert_close_rel(out, ref, tolerance(dtype), what=name)


def check_forward(spec: OpSpec, args, variant: Variant, dtype, op: Callable | None = None) -> None:
    """op (the spec's unless given) on args, its outputs NaN-poisoned, against the float64
    reference on upcast CPU copies."""
    with nan_poison():
        outputs = as_tuple((op or spec.op)(*args, **variant.kwargs))
    expected = as_tuple(spec.reference(*map(upcast, args), **variant.kwargs))
    check_outputs(spec, outputs, expected, dtype)


def reference_gradients(spec: OpSpec, args, variant: Variant, grad_outputs, outputs=None):
    """(outputs, {name: gradient}) of the float64 reference on upcast CPU copies of args,
    for the upstream gradients (changed by spec.reference_grad_outputs given the op's
    outputs); zero for what reaches no output."""
    leaves = {name: upcast(t).requires_grad_() for name, t in spec.differentiable_args(args).items()}
    ref_outputs = as_tuple(spec.reference(*spec.with_args(tuple(map(upcast, args)), leaves), **variant.kwargs))
    grad_outputs = tuple(upcast(g) for g in grad_outputs)
    if outputs is not None:
        grad_outputs = spec.reference_grad_outputs(outputs, ref_outputs, grad_outputs)
    pairs = [(out, g) for out, g in zip(ref_outputs, grad_outputs) if out.requires_grad]
    grads = [None] * len(leaves)
    if pairs:
        grads = torch.autograd.grad(
            [out for out, _ in pairs], list(leaves.values()), [g for _, g in pairs], allow_unused=True
        )
    zeros = {name: torch.zeros_like(leaf) for name, leaf in leaves.items()}
    ref_outputs = tuple(out.detach() for out in ref_outputs)
    return ref_outputs, {name: zeros[name] if g is None else g for name, g in zip(leaves, grads)}


def check_against_reference(spec: OpSpec, args, variant: Variant, dtype, outputs, grads: dict, grad_outputs) -> None:
    """Outputs and the gradients {name: gradient} of the differentiable arguments, for
    grad_outputs, against the float64 reference's; the gradients spec.unreached names
    exactly zero."""
    outputs = tuple(out.detach() for out in outputs)
    ref_outputs, ref_grads = reference_gradients(spec, args, variant, grad_outputs, outputs)
    check_outputs(spec, outputs, ref_outputs, dtype)
    given = spec.differentiable_args(args)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == dtype and grad.shape == given[name].shape, name
        assert_close_rel(grad, ref_grads[name], spec.gradient_tolerance(dtype), what=f"grad of {name}")
    for name, index in (spec.unreached(args) if spec.unreached else {}).items():
        assert (grads[name][index] == 0).all(), f"grad of {name}: nonzero where no output reads it"


def check_gradients(spec: OpSpec, sample, args, variant: Variant, dtype, grad_outputs=None) -> None:
    """The op's outputs and gradients (NaN-poisoned) against the reference's, for
    grad_outputs (drawn by the spec unless given)."""
    leaves = spec.leaves(args)
    with nan_poison():
        outputs = as_tuple(spec.op(*spec.with_args(args, leaves), **variant.kwargs))
        if grad_outputs is None:
            grad_outputs = spec.grad_outputs(sample, outputs)
        grads = torch.autograd.grad(outputs, list(leaves.values()), grad_outputs)
    check_against_reference(spec, args, variant, dtype, outputs, dict(zip(leaves, grads)), grad_outputs)


# ---------------------------------------------------------------------------
# mmrec::scan


def scan_reference_by_chunks(gamma, x=None, h0=None, reverse=False, steps=64):
    """scan_reference over chunks of at most `steps` time steps, each started from the
    state the chunk before it left: the same float64 operations in the same order, so the
    same result. Autograd through it reads each step out of its chunk rather than out of
    the whole sequence (a step's select backward fills a gradient of its operand's shape),
    so its backward costs O(T) rather than O(T^2)."""
    T = gamma.shape[1]
    if T <= steps:
        return scan_reference(gamma, x, h0, reverse)
    starts = range(0, T, steps)
    chunks, h = {}, h0
    for start in reversed(starts) if reverse else starts:
        part = slice(start, start + steps)
        chunks[start] = scan_reference(gamma[:, part], None if x is None else x[:, part], h, reverse)
        h = chunks[start][:, 0] if reverse else chunks[start][:, -1]
    return torch.cat([chunks[start] for start in starts], dim=1)


def scan_bad_inputs(args) -> list[BadInput]:
    g, x, h0 = args
    op = torch.ops.mmrec.scan.default
    backward = torch.ops.mmrec.scan_backward.default
    return [
        BadInput("int_gamma", op, (g.long(),), "gamma to be float32"),
        BadInput("int_x", op, (g, x.int()), "x to have the dtype of gamma"),
        BadInput("mixed_dtype", op, (g, x.double()), "x to have the dtype of gamma"),
        BadInput("gamma_rank1", op, (g[0, :, 0],), r"gamma of shape \[B, T, ...\]"),
        BadInput("x_shape", op, (g, x[:, :4]), r"x of shape \[2, 5, 3\]"),
        BadInput("h0_shape", op, (g, x, x), r"h0 of shape \[2, 3\]"),
        BadInput("h0_dtype", op, (g, None, h0.half()), "h0 to have the dtype of gamma"),
        BadInput(
            "backward_grad_h_shape", backward, (g[:, :4], g, g, None, True, False), r"grad_h of shape \[2, 5, 3\]"
        ),
        BadInput("backward_h_dtype", backward, (g, g, g.double(), None, True, False), "h to have the dtype of gamma"),
    ]


def scan_backward_args(args, kwargs, outputs):
    gamma, x, h0 = args
    (h,) = outputs
    return torch.ops.mmrec.scan_backward.default, (torch.randn_like(h), gamma, h, h0, x is not None, kwargs["reverse"])


def scan_compile_loss(gamma, x, h0):
    h = mmrec_ops.scan(gamma, x, h0)
    return (h * mmrec_ops.cumprod(gamma, reverse=True)).square().mean()


# (name, the optional arguments left out): every way scan's defaults combine.
SCAN_MODES = [("cumprod", ("x", "h0")), ("x", ("h0",)), ("x_h0", ()), ("h0", ("x",))]
SCAN = OpSpec(
    name="scan",
    op=mmrec_ops.scan,
    overload=torch.ops.mmrec.scan.default,
    reference=scan_reference_by_chunks,
    samples=SCAN_SAMPLES,
    inputs=lambda sample, device, dtype: scan_inputs(sample, device, dtype, True, True),
    arg_names=("gamma", "x", "h0"),
    differentiable=("gamma", "x", "h0"),
    device_of="gamma",
    strided={"BHTd_transposed": ("gamma", "x"), "channel_sliced": ("gamma", "x")},
    variants=tuple(
        Variant(f"{mode}-{direction}", omitted, {"reverse": direction == "reverse"})
        for mode, omitted in SCAN_MODES
        for direction in ("forward", "reverse")
    ),
    output_names=("h",),
    backward=scan_backward_args,
    second_derivatives=True,
    forward_mode=True,
    compile_loss=scan_compile_loss,
    bad_inputs=scan_bad_inputs,
)


# ---------------------------------------------------------------------------
# mmrec::recurrence. Inputs are drawn in the regime the model runs in: gamma in (0, 1), z
# standard normal, W with entries of scale 1/sqrt(d) (spectral norm about 2, times the
# gate's slope of at most 1/4), so the recurrence is contractive and an error made at one
# step does not grow along the sequence. In that regime the tolerances of tests/helpers.py
# hold for the same reasons as for the scan: the kernels keep the state in float32, so a
# low-precision output carries one rounding (output_tolerance), and a gradient carries
# the rounding of the saved h_{t-1} it reads (and of the gate recomputed from it, damped
# by the slope above) plus its own (grad_tolerance).


def recurrence_bad_inputs(args) -> list[BadInput]:
    z, g, w, b, h0 = args
    op = torch.ops.mmrec.recurrence.default
    backward = torch.ops.mmrec.recurrence_backward.default
    return [
        BadInput("int_z", op, (z.long(), g, w), "z to be float32"),
        BadInput("z_rank3", op, (z[0], g[0], w), r"z of shape \[B, T, H, d\]"),
        BadInput("gamma_dtype", op, (z, g.double(), w), "gamma to have the dtype of z"),
        BadInput("gamma_shape", op, (z, g[:, :4], w), r"gamma of shape \[2, 5, 3, 4\]"),
        BadInput("weight_dtype", op, (z, g, w.half()), "weight to have the dtype of z"),
        BadInput("weight_shape", op, (z, g, w[:, :3]), r"weight of shape \[3, 4, 4\]"),
        BadInput("bias_shape", op, (z, g, w, b[:2]), r"bias of shape \[3, 4\]"),
        BadInput("h0_shape", op, (z, g, w, b, h0[:, :, :3]), r"h0 of shape \[2, 3, 4\]"),
        BadInput("h0_dtype", op, (z, g, w, None, h0.bfloat16()), "h0 to have the dtype of z"),
        BadInput("backward_grad_h_shape", backward, (z[:, :4], z, g, w, b, h0, z), r"grad_h of shape \[2, 5, 3, 4\]"),
        BadInput("backward_h_dtype", backward, (z, z, g, w, b, h0, z.double()), "h to have the dtype of z"),
    ]


def recurrence_backward_args(args, kwargs, outputs):
    (h,) = outputs
    return torch.ops.mmrec.recurrence_backward.default, (torch.randn_like(h), *args, h)


def recurrence_compile_loss(z, gamma, weight, bias, h0):
    return mmrec_ops.recurrence(torch.tanh(z), torch.sigmoid(gamma), weight, bias, h0).square().mean()


RECURRENCE_NAMES = ("z", "gamma", "weight", "bias", "h0")
# (name, the optional arguments left out)
RECURRENCE_MODES = [("plain", ("bias", "h0")), ("bias", ("h0",)), ("h0", ("bias",)), ("bias_h0", ())]
RECURRENCE = OpSpec(
    name="recurrence",
    op=mmrec_ops.recurrence,
    overload=torch.ops.mmrec.recurrence.default,
    reference=recurrence_reference,
    samples=RECURRENCE_SAMPLES,
    inputs=recurrence_inputs,
    arg_names=RECURRENCE_NAMES,
    differentiable=RECURRENCE_NAMES,
    device_of="z",
    strided={"strided": RECURRENCE_NAMES},
    variants=tuple(Variant(mode, omitted) for mode, omitted in RECURRENCE_MODES),
    output_names=("h",),
    grad_outputs=lambda sample, outputs: (recurrence_grad_output(sample, outputs[0].device, outputs[0].dtype),),
    backward=recurrence_backward_args,
    compile_loss=recurrence_compile_loss,
    bad_inputs=recurrence_bad_inputs,
)


# ---------------------------------------------------------------------------
# mmrec::decode_read. The kernels compute the scores, the softmax and the weighted sum
# in float32 (float64 for float64) and round only the stored output: float32
# accumulation and one rounding (output_tolerance). The backward is composite and
# recomputes the softmax and the output in float32 from the inputs, then rounds each
# gradient once: output_tolerance again.


def decode_read_bad_inputs(args) -> list[BadInput]:
    q, k, v, m = args
    op = torch.ops.mmrec.decode_read.default
    return [
        BadInput("int_q", op, (q.long(), k, v, m), "q to be float32"),
        BadInput("q_rank2", op, (q[0], k, v, m), r"q of shape \[B, H, d\] \(3 dims\)"),
        BadInput("keys_rank3", op, (q, k[0], v, m), r"keys of shape \[B, H, K, d\] \(4 dims\)"),
        BadInput("keys_dtype", op, (q, k.double(), v, m), "keys to have the dtype of q"),
        BadInput("keys_heads", op, (q, k[:, :2], v, m), r"keys of shape \[2, 3, 5, 4\]"),
        BadInput("keys_empty", op, (q, k[:, :, :0], v[:, :, :0], m[:0]), r"at least one slot \(K >= 1\), got K = 0"),
        BadInput("values_shape", op, (q, k, v[:, :, :4], m), r"values of shape \[2, 3, 5, 4\]"),
        BadInput("values_dtype", op, (q, k, v.half(), m), "values to have the dtype of q"),
        BadInput("mask_shape", op, (q, k, v, m[:4]), r"mask of shape \[5\]"),
        BadInput("mask_dtype", op, (q, k, v, m.bool()), "mask to have the dtype of q"),
    ]


DECODE_READ_NAMES = ("q", "keys", "values", "mask")
DECODE_READ = OpSpec(
    name="decode_read",
    op=mmrec_ops.decode_read,
    overload=torch.ops.mmrec.decode_read.default,
    reference=decode_read_reference,
    samples=DECODE_READ_SAMPLES,
    inputs=decode_read_inputs,
    arg_names=DECODE_READ_NAMES,
    differentiable=DECODE_READ_NAMES,
    device_of="q",
    strided={"strided": DECODE_READ_NAMES},
    gradient_tolerance=output_tolerance,
    second_derivatives=True,
    forward_mode=True,
    compile_loss=lambda q, keys, values, mask: mmrec_ops.decode_read(torch.tanh(q), keys, values, mask).square().mean(),
    bad_inputs=decode_read_bad_inputs,
)


# ---------------------------------------------------------------------------
# mmrec::skinny_addmm. The kernels multiply and sum in float32 (float64 for float64;
# exact products, no TF32) and round only the stored output: float32 accumulation and
# one rounding (output_tolerance). The backward is composite, one PyTorch product or sum
# per gradient, each rounded once: output_tolerance again.


def skinny_addmm_bad_inputs(args) -> list[BadInput]:
    b, x, w = args
    op = torch.ops.mmrec.skinny_addmm.default
    return [
        BadInput("int_x", op, (b, x.long(), w), "x to be float32"),
        BadInput("x_rank3", op, (b, x[None], w), r"x of shape \[M, K\] \(2 dims\)"),
        BadInput("weight_rank1", op, (b, x, w[0]), r"weight of shape \[K, N\] \(2 dims\)"),
        BadInput("weight_dtype", op, (b, x, w.double()), "weight to have the dtype of x"),
        BadInput("weight_rows", op, (b, x, w[:4]), r"weight of shape \[5, 4\]"),
        BadInput("bias_shape", op, (b[:3], x, w), r"bias of shape \[4\]"),
        BadInput("bias_dtype", op, (b.half(), x, w), "bias to have the dtype of x"),
    ]


SKINNY_ADDMM_NAMES = ("bias", "x", "weight")
SKINNY_ADDMM = OpSpec(
    name="skinny_addmm",
    op=mmrec_ops.skinny_addmm,
    overload=torch.ops.mmrec.skinny_addmm.default,
    reference=skinny_addmm_reference,
    samples=SKINNY_ADDMM_SAMPLES,
    inputs=skinny_addmm_inputs,
    arg_names=SKINNY_ADDMM_NAMES,
    differentiable=SKINNY_ADDMM_NAMES,
    device_of="x",
    strided={"strided": SKINNY_ADDMM_NAMES},
    gradient_tolerance=output_tolerance,
    second_derivatives=True,
    forward_mode=True,
    compile_loss=lambda bias, x, weight: mmrec_ops.skinny_addmm(bias, torch.tanh(x), weight).square().mean(),
    bad_inputs=skinny_addmm_bad_inputs,
)


# ---------------------------------------------------------------------------
# mmrec::memory_read. Inputs are drawn standard normal, so a score q . k / sqrt(d) is of
# order 1, as in the model. The kernels compute the scores, the softmax and its sums in
# float32 (float64 for float64) and round only the stored output: out carries float32
# accumulation and one rounding (output_tolerance), lse (float32, float64 for float64:
# never rounded to the input dtype) float32 accumulation alone (accumulation_error).
#
# The backward recomputes the probabilities from the saved lse and forms
# delta = grad_out . out - grad_lse from the saved out, rounded to the input dtype. That
# rounding is no error of the backward but of its input, and grad_s = p (grad_out . v - delta)
# amplifies it where the two terms cancel (a peaked softmax: a query's gradient then is
# small and the rounding of out can exceed it several times, bfloat16 at T = 1 for one
# seed in a hundred). As delta with the saved out equals delta with the exact out less
# grad_out . (out_saved - out), the expected gradients are the reference's for grad_lse
# changed by that much (memory_read_reference_grad_outputs): the saved out's rounding
# exactly accounted for, so what remains is float32 accumulation, the rounding of each
# stored gradient and, on CUDA, of the bfloat16 and float16 operands p and grad_s of the
# tensor-core products: two roundings, grad_tolerance.


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_read_reference_grad_outputs(outputs, ref_outputs, grad_outputs):
    """grad_lse less grad_out . (saved out - out): the backward's delta from the saved out."""
    (saved_out, _), (ref_out, _), (grad_out, grad_lse) = outputs, ref_outputs, grad_outputs
    return grad_out, grad_lse - (grad_out * (upcast(saved_out) - ref_out.detach())).sum(-1).transpose(1, 2)


def memory_read_unreached(args) -> dict:
    """The entries no query sees, whose gradients are exactly zero: the candidates no
    query of a block selects (all of the blocks past the last query's), and the tokens
    before first_token (each other token is in its own query's window)."""
    q, _, group_mask, tokens, first_token, _ = args
    nb, Q, _ = group_mask.shape
    rows = torch.arange(nb * Q, device=group_mask.device).view(nb, Q, 1) < q.shape[1]
    group_unseen = ~(group_mask & rows).any(1)
    token_unseen = torch.arange(tokens.shape[1], device=tokens.device) < first_token
    return {"group": (slice(None), group_unseen), "tokens": (slice(None), token_unseen)}


def memory_read_bad_inputs(args) -> list[BadInput]:
    # B = 2, T = 5, H = 2, d = 4, G = 3, Q = 4, W = 3: nb = 2, H d = 8, W - 1 + T = 7.
    q, g, gm, tk, tm, W = args
    op = torch.ops.mmrec.memory_read.default
    backward = torch.ops.mmrec.memory_read_backward.default
    out, lse = torch.randn_like(q), torch.randn(2, 2, 5)
    return [
        BadInput("int_q", op, (q.long(), g, gm, tk, tm, W), "q to be float32, float64, bfloat16 or float16"),
        BadInput("q_rank3", op, (q[0], g, gm, tk, tm, W), r"q of shape \[B, T, H, d\] \(4 dims\)"),
        BadInput(
            "d_0", op, (q[..., :0], g[..., :0], gm, tk[..., :0], tm, W), r"q with d >= 1 channels per head, got d = 0"
        ),
        BadInput("window_0", op, (q, g, gm, tk, tm, 0), r"window >= 1, got 0"),
        BadInput("window_negative", op, (q, g, gm, tk, tm, -2), r"window >= 1, got -2"),
        BadInput("group_rank4", op, (q, g[:, 0], gm, tk, tm, W), r"group of shape \[B, nb, G, 2, H d\] \(5 dims\)"),
        BadInput("group_dtype", op, (q, g.double(), gm, tk, tm, W), "group to have the dtype of q"),
        BadInput("group_width", op, (q, g[..., :6], gm, tk, tm, W), r"group of shape \[2, 2, 3, 2, 8\]"),
        BadInput("group_batch", op, (q, g[:1], gm, tk, tm, W), r"group of shape \[2, 2, 3, 2, 8\]"),
        BadInput("group_pair", op, (q, g[:, :, :, :1], gm, tk, tm, W), r"group of shape \[2, 2, 3, 2, 8\]"),
        BadInput("group_mask_float", op, (q, g, gm.float(), tk, tm, W), "group_mask to be bool"),
        BadInput("group_mask_rank2", op, (q, g, gm[0], tk, tm, W), r"group_mask of shape \[nb, Q, G\] \(3 dims\)"),
        BadInput("group_mask_candidates", op, (q, g, gm[..., :2], tk, tm, W), r"group_mask of shape \[2, 4, 3\]"),
        BadInput("group_mask_blocks", op, (q, g, gm[:1], tk, tm, W), r"group_mask of shape \[2, 4, 3\]"),
        BadInput(
            "too_few_blocks",
            op,
            (q, g[:, :1], gm[:1], tk, tm, W),
            r"group_mask's nb Q >= T \(blocks covering every query\), got nb = 1, Q = 4, T = 5",
        ),
        BadInput("tokens_dtype", op, (q, g, gm, tk.half(), tm, W), "tokens to have the dtype of q"),
        BadInput("tokens_length", op, (q, g, gm, tk[:, 2:], tm, W), r"tokens of shape \[2, 7, 2, 8\]"),
        BadInput("tokens_rank3", op, (q, g, gm, tk[0], tm, W), r"tokens of shape \[2, 7, 2, 8\]"),
        BadInput("tokens_window", op, (q, g, gm, tk, tm, W + 1), r"tokens of shape \[2, 8, 2, 8\]"),
        BadInput(
            "first_token_float",
            op,
            (q, g, gm, tk, tm.float(), W),
            "first_token to be an int64 tensor of 0 dims, got torch.float32",
        ),
        BadInput(
            "first_token_int32",
            op,
            (q, g, gm, tk, tm.int(), W),
            "first_token to be an int64 tensor of 0 dims, got torch.int32",
        ),
        BadInput(
            "first_token_1dim",
            op,
            (q, g, gm, tk, tm.reshape(1), W),
            r"first_token to be an int64 tensor of 0 dims, got torch.int64 of shape \[1\]",
        ),
        BadInput(
            "backward_grad_out_shape",
            backward,
            (out[:, :4], lse, q, g, gm, tk, tm, out, lse, W),
            r"grad_out of shape \[2, 5, 2, 4\]",
        ),
        BadInput(
            "backward_grad_out_dtype",
            backward,
            (out.double(), lse, q, g, gm, tk, tm, out, lse, W),
            "grad_out to have the dtype of q",
        ),
        BadInput(
            "backward_grad_lse_dtype",
            backward,
            (out, lse.double(), q, g, gm, tk, tm, out, lse, W),
            r"grad_lse in torch.float32 on cpu",
        ),
        BadInput(
            "backward_grad_lse_shape",
            backward,
            (out, lse[:, :, :4], q, g, gm, tk, tm, out, lse, W),
            r"grad_lse of shape \[2, 2, 5\]",
        ),
        BadInput(
            "backward_out_dtype",
            backward,
            (out, lse, q, g, gm, tk, tm, out.half(), lse, W),
            "out to have the dtype of q",
        ),
        BadInput(
            "backward_lse_shape",
            backward,
            (out, lse, q, g, gm, tk, tm, out, lse.transpose(1, 2), W),
            r"lse of shape \[2, 2, 5\]",
        ),
        BadInput(
            "backward_lse_dtype",
            backward,
            (out, lse, q, g, gm, tk, tm, out, lse.half(), W),
            r"lse in torch.float32 on cpu",
        ),
        BadInput(
            "backward_tokens_length",
            backward,
            (out, lse, q, g, gm, tk[:, 1:], tm, out, lse, W),
            r"tokens of shape \[2, 7, 2, 8\]",
        ),
        BadInput("backward_window_0", backward, (out, lse, q, g, gm, tk, tm, out, lse, 0), r"window >= 1, got 0"),
    ]


def memory_read_backward_args(args, kwargs, outputs):
    q, group, group_mask, tokens, first_token, window = args
    out, lse = outputs
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    return torch.ops.mmrec.memory_read_backward.default, (
        grad_out,
        grad_lse,
        q,
        group,
        group_mask,
        tokens,
        first_token,
        out,
        lse,
        window,
    )


def memory_read_compile_loss(q, group, group_mask, tokens, first_token, window):
    out, lse = mmrec_ops.memory_read(torch.tanh(q), group, group_mask, tokens, first_token, window)
    return out.square().mean() + torch.sin(lse).mean()


MEMORY_READ = OpSpec(
    name="memory_read",
    op=mmrec_ops.memory_read,
    overload=torch.ops.mmrec.memory_read.default,
    reference=memory_read_reference,
    samples=MEMORY_READ_SAMPLES,
    inputs=memory_read_inputs,
    arg_names=("q", "group", "group_mask", "tokens", "first_token", "window"),
    differentiable=("q", "group", "tokens"),
    device_of="q",
    strided={"BHTd_transposed": ("q",), "strided": ("q", "group", "group_mask", "tokens")},
    output_names=("out", "lse"),
    output_dtypes=lambda dtype: (dtype, lse_dtype(dtype)),
    output_tolerances=(output_tolerance, accumulation_error),
    reference_grad_outputs=memory_read_reference_grad_outputs,
    unreached=memory_read_unreached,
    backward=memory_read_backward_args,
    compile_loss=memory_read_compile_loss,
    bad_inputs=memory_read_bad_inputs,
)


# ---------------------------------------------------------------------------
# mmrec::segment_read. As memory_read's: inputs standard normal, scores, softmax and sums
# in float32 (float64 for float64), only the stored outputs rounded (out: output_tolerance;
# lse, never rounded: accumulation_error); the backward reads the saved out through delta,
# whose rounding the expected gradients account for (memory_read_reference_grad_outputs,
# the same for both reads), and rounds each gradient once, the segments' after summing
# over the queries that read them: grad_tolerance. A query with no segment gives lse -inf,
# which no relative error measures: the common checks' samples have none
# (tests/ops/test_segment_read.py checks them).


def segment_read_unreached(args) -> dict:
    """The segments no query reads, whose gradients are exactly zero."""
    _, segments, segment_ids = args
    B, M = segments.shape[:2]
    read = torch.zeros((B, M + 1), dtype=torch.bool, device=segments.device)
    read.scatter_(1, torch.where(segment_ids >= 0, segment_ids, M).flatten(1), True)  # -1: the extra column M
    return {"segments": ~read[:, :M]}


def segment_read_bad_inputs(args) -> list[BadInput]:
    # B = 2, T = 5, H = 2, d = 4, M = 4, S = 3, k = 2: H d = 8.
    q, seg, ids = args
    op = torch.ops.mmrec.segment_read.default
    backward = torch.ops.mmrec.segment_read_backward.default
    out, lse = torch.randn_like(q), torch.randn(2, 2, 5)
    return [
        BadInput("int_q", op, (q.long(), seg, ids), "q to be float32, float64, bfloat16 or float16"),
        BadInput("q_rank3", op, (q[0], seg, ids), r"q of shape \[B, T, H, d\] \(4 dims\)"),
        BadInput("d_0", op, (q[..., :0], seg[..., :0], ids), r"q with d >= 1 channels per head, got d = 0"),
        BadInput("segments_rank4", op, (q, seg[:, 0], ids), r"segments of shape \[B, M, S, 2, H d\] \(5 dims\)"),
        BadInput("segments_dtype", op, (q, seg.double(), ids), "segments to have the dtype of q"),
        BadInput("segments_width", op, (q, seg[..., :6], ids), r"segments of shape \[2, 4, 3, 2, 8\]"),
        BadInput("segments_batch", op, (q, seg[:1], ids), r"segments of shape \[2, 4, 3, 2, 8\]"),
        BadInput("segments_pair", op, (q, seg[:, :, :, :1], ids), r"segments of shape \[2, 4, 3, 2, 8\]"),
        BadInput("segments_no_tokens", op, (q, seg[:, :, :0], ids), r"segments of S >= 1 tokens, got S = 0"),
        BadInput("ids_int32", op, (q, seg, ids.int()), "segment_ids to be int64, got torch.int32"),
        BadInput("ids_float", op, (q, seg, ids.float()), "segment_ids to be int64, got torch.float32"),
        BadInput("ids_rank2", op, (q, seg, ids[0]), r"segment_ids of shape \[B, T, k\] \(3 dims\)"),
        BadInput("ids_length", op, (q, seg, ids[:, :4]), r"segment_ids of shape \[2, 5, 2\], got \[2, 4, 2\]"),
        BadInput("ids_batch", op, (q, seg, ids[:1]), r"segment_ids of shape \[2, 5, 2\], got \[1, 5, 2\]"),
        BadInput(
            "backward_grad_out_shape",
            backward,
            (out[:, :4], lse, q, seg, ids, out, lse),
            r"grad_out of shape \[2, 5, 2, 4\]",
        ),
        BadInput(
            "backward_grad_out_dtype",
            backward,
            (out.double(), lse, q, seg, ids, out, lse),
            "grad_out to have the dtype of q",
        ),
        BadInput(
            "backward_grad_lse_dtype",
            backward,
            (out, lse.double(), q, seg, ids, out, lse),
            r"grad_lse in torch.float32 on cpu",
        ),
        BadInput(
            "backward_grad_lse_shape",
            backward,
            (out, lse[:, :, :4], q, seg, ids, out, lse),
            r"grad_lse of shape \[2, 2, 5\]",
        ),
        BadInput(
            "backward_out_dtype", backward, (out, lse, q, seg, ids, out.half(), lse), "out to have the dtype of q"
        ),
        BadInput(
            "backward_lse_shape",
            backward,
            (out, lse, q, seg, ids, out, lse.transpose(1, 2)),
            r"lse of shape \[2, 2, 5\]",
        ),
        BadInput(
            "backward_lse_dtype", backward, (out, lse, q, seg, ids, out, lse.half()), r"lse in torch.float32 on cpu"
        ),
        BadInput("backward_ids_dtype", backward, (out, lse, q, seg, ids.int(), out, lse), "segment_ids to be int64"),
    ]


def check_reads_with_empty_queries(args, dtype, outputs, grads: dict, grad_outputs) -> None:
    """check_against_reference for a read some of whose queries read no segment: out 0 and
    lse -inf for them, and gradients 0 for their q; lse's finite entries, out and every
    gradient against the reference's."""
    _, _, segment_ids = args
    out, lse = (t.detach() for t in outputs)
    empty = (segment_ids < 0).all(-1)  # [B, T]
    assert empty.any(), "the sample has no query without a segment"
    assert (out[empty] == 0).all() and (lse.transpose(1, 2)[empty] == float("-inf")).all()
    assert (grads["q"][empty] == 0).all()
    (ref_out, ref_lse), ref_grads = reference_gradients(SEGMENT_READ, args, Variant(), grad_outputs, (out, lse))
    assert out.dtype == dtype and lse.dtype == lse_dtype(dtype) and out.is_contiguous() and lse.is_contiguous()
    assert_close_rel(out, ref_out, output_tolerance(dtype), what="out")
    seen = ~empty.unsqueeze(1).expand_as(lse)
    assert_close_rel(lse[seen], ref_lse[seen.cpu()], accumulation_error(dtype), what="lse")
    for name, grad in grads.items():
        assert grad.dtype == dtype and grad.shape == args[SEGMENT_READ.arg_names.index(name)].shape, name
        assert_close_rel(grad, ref_grads[name], grad_tolerance(dtype), what=f"grad of {name}")


def segment_read_backward_args(args, kwargs, outputs):
    out, lse = outputs
    return torch.ops.mmrec.segment_read_backward.default, (
        torch.randn_like(out),
        torch.randn_like(lse),
        *args,
        *outputs,
    )


def segment_read_compile_loss(q, segments, segment_ids):
    out, lse = mmrec_ops.segment_read(torch.tanh(q), segments, segment_ids)
    return out.square().mean() + torch.sin(lse).mean()


SEGMENT_READ = OpSpec(
    name="segment_read",
    op=mmrec_ops.segment_read,
    overload=torch.ops.mmrec.segment_read.default,
    reference=segment_read_reference,
    samples=SEGMENT_READ_SAMPLES,
    inputs=segment_read_inputs,
    arg_names=("q", "segments", "segment_ids"),
    differentiable=("q", "segments"),
    device_of="q",
    strided={"strided": ("q", "segments", "segment_ids")},
    output_names=("out", "lse"),
    output_dtypes=lambda dtype: (dtype, lse_dtype(dtype)),
    output_tolerances=(output_tolerance, accumulation_error),
    reference_grad_outputs=memory_read_reference_grad_outputs,
    unreached=segment_read_unreached,
    backward=segment_read_backward_args,
    compile_loss=segment_read_compile_loss,
    bad_inputs=segment_read_bad_inputs,
)

SPECS = [SCAN, RECURRENCE, DECODE_READ, SKINNY_ADDMM, MEMORY_READ, SEGMENT_READ]
