"""The torch.func transforms of the ops' contract (tests/ops/test_contract.py), by name.

Each takes fn(*values) -> a tuple of outputs (an op or its reference as a function of its
differentiable arguments) and the values, and returns what the transform gives, a pytree
of tensors, with respect to every value. Scalar losses weigh each element differently and
square the outputs, so that a second derivative reads the op's dependence on its inputs at
both levels (a loss linear in the outputs would pass with the inner level alone). vmap
runs over V = 2 instances of every value.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd import forward_ad
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap

FORWARD_MODE = ("jvp", "jacfwd", "forward_ad")
SECOND_ORDER = ("grad(grad)", "jacrev(grad)", "jacrev(jacrev)")


def ramp(t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's shape, -1 to 2 in order: weights that differ per element."""
    return torch.linspace(-1, 2, t.numel(), device=t.device, dtype=t.dtype).view(t.shape)


def loss_of(fn):
    """sum over outputs of sum(out^2 * ramp)."""

    def loss(*values):
        return sum((out.square() * ramp(out)).sum() for out in fn(*values))

    return loss


def gradient_loss(fn):
    """A scalar of loss_of(fn)'s gradient, sum(g * ramp) over its parts: grad(grad) of it."""

    def loss(*values):
        grads = grad(loss_of(fn), every(values))(*values)
        return sum((g * ramp(g)).sum() for g in grads)

    return loss


def every(values) -> tuple[int, ...]:
    return tuple(range(len(values)))


def instances(values) -> tuple:
    """V = 2 instances of each value, stacked at dim 0: the value and half of it."""
    return tuple(torch.stack([v, 0.5 * v]) for v in values)


@contextlib.contextmanager
def without_vmap_fallback():
    """vmap may not fall back to running an mmrec op once per sample (what it does, with
    a warning, for an op without a batching rule): the fallback raises instead."""
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(True)


def vjp_of(fn, values):
    outputs, pullback = vjp(fn, *values)
    return outputs, pullback(tuple(ramp(out) for out in outputs))


def dual_tangents(fn, values):
    """The tangents of fn's outputs through torch.autograd.forward_ad (no torch.func)."""
    with forward_ad.dual_level():
        outputs = fn(*(forward_ad.make_dual(v, ramp(v)) for v in values))
        return tuple(forward_ad.unpack_dual(out).tangent for out in outputs)


TRANSFORMS = {
    "grad": lambda fn, values: grad(loss_of(fn), every(values))(*values),
    "vjp": vjp_of,
    "jacrev": lambda fn, values: jacrev(fn, every(values))(*values),
    "jvp": lambda fn, values: jvp(fn, values, tuple(ramp(v) for v in values)),
    "jacfwd": lambda fn, values: jacfwd(fn, every(values))(*values),
    "forward_ad": dual_tangents,
    "vmap": lambda fn, values: vmap(fn)(*instances(values)),
    "grad(grad)": lambda fn, values: grad(gradient_loss(fn), every(values))(*values),
    "jacrev(grad)": lambda fn, values: jacrev(grad(loss_of(fn), every(values)), every(values))(*values),
    "jacrev(jacrev)": lambda fn, values: jacrev(jacrev(fn, every(values)), every(values))(*values),
    "vmap(grad)": lambda fn, values: vmap(grad(loss_of(fn), every(values)))(*instances(values)),
    "vmap(jacrev)": lambda fn, values: vmap(jacrev(fn, every(values)))(*instances(values)),
}
