"""The checks every mmrec op passes, run for each op of tests/ops/specs.py.

Against the float64 reference (outputs NaN-poisoned), gradients against the reference's,
strided inputs, gradcheck in float64 (and gradgradcheck where the op has second
derivatives), opcheck of the op and its backward op, torch.compile(fullgraph=True),
empty inputs, bad inputs (a ValueError naming the argument, from the CPU kernel and the
fake one), arguments on different devices, a GPU other than the current one, and every
torch.func transform (tests/ops/transforms.py) right or refused by name. A
test's id names the op, the sample's sizes and layout, and the variant:
scan-B2-T13-D7-x_h0-reverse.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch.func import vmap
from torch.utils import _pytree as pytree

from tests.helpers import DEVICES, DTYPES, assert_close_rel, call_kernel, grad_tolerance, output_tolerance
from tests.ops.samples import entries
from tests.ops.specs import (
    SPECS,
    OpSpec,
    Variant,
    as_tuple,
    check_forward,
    check_gradients,
    reference_gradients,
    upcast,
)
from tests.ops.transforms import FORWARD_MODE, SECOND_ORDER, TRANSFORMS, without_vmap_fallback

SECOND_DERIVATIVES = [spec for spec in SPECS if spec.second_derivatives]
WITH_BACKWARD_OP = [spec for spec in SPECS if spec.backward]


def cases(use: str, specs: list[OpSpec] = SPECS, variants: bool = True) -> list:
    """pytest params (spec, sample, variant): each op's entries for `use` in each of its
    variants (or its arguments all given), with ids such as scan-B2-T13-D7-x_h0-reverse."""
    params = []
    for spec in specs:
        for sample in entries(spec.samples, use):
            for variant in spec.variants if variants else (Variant(),):
                name = "-".join(part for part in (spec.name, sample.id, variant.name) if part)
                params.append(pytest.param(spec, sample, variant, id=name))
    return params


def of_differentiable(spec: OpSpec, args, variant: Variant):
    """(fn, leaves): the op as a function of its differentiable arguments, for gradcheck."""
    leaves = spec.leaves(args)

    def fn(*values):
        return spec.op(*spec.with_args(args, dict(zip(leaves, values))), **variant.kwargs)

    return fn, list(leaves.values())


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec, sample, variant", cases("forward"))
def test_matches_reference(spec, sample, variant, dtype, device):
    check_forward(spec, spec.args(sample, device, dtype, variant), variant, dtype)


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec, sample, variant", cases("gradients"))
def test_gradients_match_reference(spec, sample, variant, dtype, device):
    check_gradients(spec, sample, spec.args(sample, device, dtype, variant), variant, dtype)


@pytest.mark.ops
@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec, sample, variant", cases("strided"))
def test_strided_inputs(spec, sample, variant, dtype, device):
    args = spec.args(sample, device, dtype, variant)
    for name, t in zip(spec.arg_names, args):
        if name in spec.strided[sample.layout] and t is not None:
            assert not t.is_contiguous(), f"{name} should be strided"
    check_forward(spec, args, variant, dtype)
    check_gradients(spec, sample, args, variant, dtype)


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec, sample, variant", cases("gradcheck"))
def test_gradcheck(spec, sample, variant, device):
    assert torch.autograd.gradcheck(
        *of_differentiable(spec, spec.args(sample, device, torch.float64, variant), variant)
    )


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec, sample, variant", cases("gradgradcheck", SECOND_DERIVATIVES))
def test_gradgradcheck(spec, sample, variant, device):
    """Second derivatives, through the backward's own autograd formula."""
    args = spec.args(sample, device, torch.float64, variant)
    assert torch.autograd.gradgradcheck(*of_differentiable(spec, args, variant))


def with_requires_grad(spec: OpSpec, args, requires_grad: bool) -> tuple:
    """args, the differentiable ones requiring grad or not."""
    return spec.with_args(args, {n: t.requires_grad_(requires_grad) for n, t in spec.differentiable_args(args).items()})


@pytest.mark.opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "requires_grad"])
@pytest.mark.parametrize("spec, sample, variant", cases("opcheck"))
def test_opcheck(spec, sample, variant, requires_grad, dtype, device):
    args = with_requires_grad(spec, spec.args(sample, device, dtype, variant), requires_grad)
    torch.library.opcheck(spec.overload, args, variant.kwargs)


def backward_cases() -> list:
    """cases("opcheck") of the ops with a backward op, with requires_grad for those whose
    backward op has a derivative (the others' refuse or have none)."""
    params = []
    for param in cases("opcheck", WITH_BACKWARD_OP):
        spec = param.values[0]
        for requires_grad in (False, True) if spec.second_derivatives else (False,):
            grad_id = "requires_grad" if requires_grad else "no_grad"
            params.append(pytest.param(*param.values, requires_grad, id=f"{param.id}-{grad_id}"))
    return params


@pytest.mark.opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("spec, sample, variant, requires_grad", backward_cases())
def test_backward_opcheck(spec, sample, variant, requires_grad, dtype, device):
    args = spec.args(sample, device, dtype, variant)
    outputs = as_tuple(spec.op(*args, **variant.kwargs))
    backward, backward_args = spec.backward(args, variant.kwargs, outputs)
    backward_args = tuple(
        t.requires_grad_(requires_grad) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for t in backward_args
    )
    torch.library.opcheck(backward, backward_args)


@pytest.mark.compile
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_compiles_without_graph_break(spec, device):
    """torch.compile(fullgraph=True, dynamic=True) of a loss through the op gives eager's
    loss and gradients at two sizes of one graph (fullgraph: a graph break is an error)."""
    torch._dynamo.reset()
    compiled = torch.compile(spec.compile_loss, fullgraph=True, dynamic=True)
    for sample in entries(spec.samples, "compile"):
        inputs = spec.args(sample, device, torch.float32)
        leaves = spec.leaves(inputs)
        args = spec.with_args(inputs, leaves)
        expected = spec.compile_loss(*args)
        expected_grads = torch.autograd.grad(expected, list(leaves.values()))
        actual = compiled(*args)
        actual_grads = torch.autograd.grad(actual, list(leaves.values()))
        assert_close_rel(actual.detach(), expected.detach(), 1e-6)
        for name, a, e in zip(leaves, actual_grads, expected_grads):
            assert_close_rel(a, e, 1e-6, what=f"compiled gradient of {name}")


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec, sample, variant", cases("empty"))
def test_empty(spec, sample, variant, device):
    """Empty batch, time or channel dims: the reference's outputs exactly (empty, or a
    bias alone), and zero gradients when every output is empty (nothing reaches one),
    else the reference's. An empty channel dim once divided by zero in the CPU kernels'
    tiling."""
    args = spec.args(sample, device, torch.float32, variant)
    leaves = spec.leaves(args)
    outputs = as_tuple(spec.op(*spec.with_args(args, leaves), **variant.kwargs))
    grad_outputs = tuple(torch.ones_like(out) for out in outputs)
    grads = torch.autograd.grad(outputs, list(leaves.values()), grad_outputs)
    ref_outputs, ref_grads = reference_gradients(spec, args, variant, grad_outputs)
    if all(out.numel() == 0 for out in outputs):
        ref_grads = {name: torch.zeros_like(g) for name, g in ref_grads.items()}
    for out, ref, dtype in zip(outputs, ref_outputs, spec.output_dtypes(torch.float32), strict=True):
        assert out.dtype == dtype and out.shape == ref.shape
        assert torch.equal(upcast(out), ref)
    for (name, leaf), grad in zip(leaves.items(), grads):
        assert grad.shape == leaf.shape, name
        assert torch.equal(upcast(grad), ref_grads[name]), f"grad of {name}"


def refusal(spec: OpSpec, transform: str) -> str | None:
    """The error message (a pattern) `transform` must raise for the op, None where it must
    give the reference's result: it names the op and the transform."""
    op = spec.overload.name()
    if transform in FORWARD_MODE and not spec.forward_mode:
        return rf"{op} has no forward-mode derivative: torch\.func\.jvp, torch\.func\.jacfwd"
    if transform in SECOND_ORDER and not spec.second_derivatives:
        return rf"{op}: second derivatives are not supported.*{re.escape(transform[:-1])}\(f\)\)"
    return None


def of_values(spec: OpSpec, args, op):
    """op as a function of the values of the differentiable arguments, outputs a tuple."""
    names = list(spec.differentiable_args(args))

    def fn(*values):
        return as_tuple(op(*spec.with_args(args, dict(zip(names, values)))))

    return fn


@pytest.mark.grad
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_torch_func(spec, transform, device):
    """Each torch.func transform, and nestings of them, of the op (float64) gives the
    float64 reference's result under the same transform, with no warning about the op,
    or raises an error that names the op and the transform: never zeros, never a warning
    alone."""
    (sample,) = entries(spec.samples, "func")
    args = spec.args(sample, device, torch.float64)
    values = tuple(spec.differentiable_args(args).values())
    message = refusal(spec, transform)
    if message is not None:
        with pytest.raises((RuntimeError, NotImplementedError), match=message):
            TRANSFORMS[transform](of_values(spec, args, spec.op), values)
        return
    with warnings.catch_warnings(record=True) as caught, without_vmap_fallback():
        warnings.simplefilter("always")
        actual = TRANSFORMS[transform](of_values(spec, args, spec.op), values)
    assert not [str(w.message) for w in caught if "mmrec" in str(w.message)]
    expected = TRANSFORMS[transform](of_values(spec, args, spec.reference), values)
    actual, expected = pytree.tree_leaves(actual), pytree.tree_leaves(expected)
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{transform}: part {i}"
        assert_close_rel(a, e, 1e-12, what=f"{transform}: part {i}")


def one_argument_cases() -> list:
    return [pytest.param(spec, name, id=f"{spec.name}-{name}") for spec in SPECS for name in spec.differentiable]


@pytest.mark.ops
@pytest.mark.parametrize("spec, name", one_argument_cases())
def test_vmap_of_one_argument(spec, name):
    """vmap over one argument at its last dim, the others shared: the op's batching rule
    (folding V into the kernels' rows, or a call per instance of an argument every row
    shares), never torch's per-sample fallback, against the reference."""
    (sample,) = entries(spec.samples, "func")
    args = spec.args(sample, "cpu", torch.float64)
    value = args[spec.arg_names.index(name)]
    stacked = torch.stack([value, 0.5 * value], dim=-1)

    def on(op):
        return lambda v: as_tuple(op(*spec.with_args(args, {name: v})))

    with without_vmap_fallback():
        actual = vmap(on(spec.op), in_dims=-1)(stacked)
    expected = vmap(on(spec.reference), in_dims=-1)(stacked)
    for a, e in zip(actual, expected, strict=True):
        assert_close_rel(a, e, 1e-12, what=f"vmap over {name}")


@pytest.mark.grad
@pytest.mark.parametrize("spec", [spec for spec in SPECS if not spec.second_derivatives], ids=lambda spec: spec.name)
def test_second_derivatives_are_refused_by_autograd(spec):
    """torch.autograd.grad with create_graph=True gives the first derivatives; a second
    grad through them raises the op's error (without it, autograd would warn and give
    zeros)."""
    (sample,) = entries(spec.samples, "func")
    args = spec.args(sample, "cpu", torch.float64)
    leaves = spec.leaves(args)
    outputs = as_tuple(spec.op(*spec.with_args(args, leaves)))
    grad_outputs = tuple(2 * out.detach() for out in outputs)
    grads = torch.autograd.grad(outputs, list(leaves.values()), grad_outputs, create_graph=True)
    _, ref_grads = reference_gradients(spec, args, Variant(), grad_outputs, outputs)
    for name, g in zip(leaves, grads):
        assert_close_rel(g, ref_grads[name], grad_tolerance(torch.float64), what=f"grad of {name}")
    op = spec.overload.name()
    with pytest.raises(RuntimeError, match=rf"{op}: second derivatives are not supported"):
        torch.autograd.grad(sum(g.sum() for g in grads), list(leaves.values()))


def bad_input_cases() -> list:
    return [
        pytest.param(case, id=f"{spec.name}-{case.id}")
        for spec in SPECS
        for case in spec.bad_inputs(spec.args(spec.bad_sample(), "cpu", torch.float32))
    ]


@pytest.mark.ops
@pytest.mark.parametrize("kernel", ["cpu", "fake"])
@pytest.mark.parametrize("case", bad_input_cases())
def test_bad_inputs_raise_clear_errors(case, kernel):
    with pytest.raises(ValueError, match=case.message):
        call_kernel(case.op, case.args, kernel)


def device_cases() -> list:
    """(spec, argument): each tensor argument but the one whose device the others follow."""
    params = []
    for spec in SPECS:
        args = spec.args(spec.bad_sample(), "cpu", torch.float32)
        for name, t in zip(spec.arg_names, args):
            if isinstance(t, torch.Tensor) and name != spec.device_of:
                params.append(pytest.param(spec, name, id=f"{spec.name}-{name}"))
    return params


@pytest.mark.ops
@pytest.mark.parametrize("spec, name", device_cases())
def test_mixed_devices_raise_clear_errors(spec, name):
    """One argument on another device than the rest, each way round (meta stands in for a
    device on machines without a GPU)."""
    args = spec.args(spec.bad_sample(), "cpu", torch.float32)
    alone = spec.with_args(args, {name: args[spec.arg_names.index(name)].to("meta")})
    with pytest.raises(ValueError, match=rf"{name} to be on the device of {spec.device_of} \(cpu\), got meta"):
        spec.overload(*alone)
    others = tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in args)
    others = spec.with_args(others, {name: args[spec.arg_names.index(name)]})
    with pytest.raises(ValueError, match=rf"{name} to be on the device of {spec.device_of} \(meta\), got cpu"):
        spec.overload(*others)


@pytest.mark.ops
@pytest.mark.grad
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_runs_on_a_gpu_other_than_the_current_one(spec):
    """Forward and backward on cuda:1 while cuda:0 is current: the same results as on the CPU."""
    torch.cuda.set_device(0)
    (sample,) = entries(spec.samples, "other_device")
    args = spec.args(sample, "cpu", torch.float32)
    results = []
    for device in ("cpu", "cuda:1"):
        on_device = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in args)
        leaves = spec.leaves(on_device)
        outputs = as_tuple(spec.op(*spec.with_args(on_device, leaves)))
        grads = torch.autograd.grad(outputs, list(leaves.values()), [torch.ones_like(out) for out in outputs])
        results.append((outputs, grads))
    assert torch.cuda.current_device() == 0
    (outputs, grads), (outputs1, grads1) = results
    for out1, out in zip(outputs1, outputs):
        assert out1.device == torch.device("cuda:1")
        assert_close_rel(out1, out.detach(), output_tolerance(torch.float32))
    for g1, g in zip(grads1, grads):
        assert_close_rel(g1, g, grad_tolerance(torch.float32), what="gradient")
