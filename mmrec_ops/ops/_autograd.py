"""Autograd kernels written in Python, composing with torch.func.

scan and recurrence have C++ autograd kernels (csrc/autograd.h): they are on
every training step's hot path. The other ops' autograd kernels, and those of
the backward ops scan_backward, recurrence_backward and memory_read_backward
(differentiated only for second derivatives: create_graph=True, nested
torch.func transforms), are registered here.

`torch.library.register_autograd` (torch 2.11 to 2.13) wraps the formula in an
autograd.Function whose Python `apply` torch.func refuses ("... must override
the setup_context staticmethod", pytorch/pytorch#170834), and it runs the op
below autograd whenever no input requires grad, so a forward-mode tangent is
silently dropped. `register_autograd` here takes the same backward and
setup_context functions and registers as the op's Autograd kernel a
single-level autograd function. Inside a torch.func transform the kernel runs
at one transform level, with that level's tensors; the function records one
autograd node there, and the levels below (vmap, an outer grad) see the ops
that forward and backward call, each with its own batching rule. A
single-level function runs its forward with gradients off; the forward turns
them back on, as torch.func does for an autograd.Function, so that the levels
below record the op too (without that, grad(grad(f)) silently gave zeros:
pytorch/pytorch#191995). Forward mode takes the op's jvp formula where it has
one, else raises an error that names the op; `refuse_second_derivatives` gives
the backward of a backward op that has no derivative.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd import forward_ad
from torch.autograd.forward_ad import _set_fwd_grad_enabled
from torch.autograd.function import _SingleLevelFunction

NAMESPACE = "mmrec"
# Registrations made here must outlive this module's import.
LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


def refuse_forward_mode(qualname: str) -> Callable:
    """A jvp staticmethod that raises: forward-mode AD is not implemented for qualname."""

    def jvp(ctx, *tangents):
        raise NotImplementedError(
            f"{qualname} has no forward-mode derivative: torch.func.jvp, torch.func.jacfwd and "
            f"torch.autograd.forward_ad are not supported for it. Use reverse mode instead "
            f"(torch.func.grad, vjp, jacrev, or loss.backward())."
        )

    return jvp


def second_derivatives_unsupported(qualname: str, backward_qualname: str) -> str:
    """The error raised where a derivative of qualname's derivative is asked for."""
    return (
        f"{qualname}: second derivatives are not supported, {backward_qualname} has no derivative: "
        f"torch.func.grad, vjp, jacrev or jacfwd of a function that takes a derivative through {qualname} "
        f"(grad(grad(f)), jacrev(grad(f)), jacrev(jacrev(f)), hessian), or a second torch.autograd.grad "
        f"through create_graph=True. First derivatives are supported, also with create_graph=True."
    )


def refuse_second_derivatives(qualname: str, backward_qualname: str) -> None:
    """Registers the autograd kernel of backward_qualname, the backward op of
    qualname: it records a node whose backward raises (first derivatives with
    create_graph=True still work), where a backward op without one would only
    warn and give zeros."""

    def refuse(ctx, *grads):
        raise RuntimeError(second_derivatives_unsupported(qualname, backward_qualname))

    def keep_nothing(ctx, inputs, output):
        pass

    register_autograd(backward_qualname, refuse, setup_context=keep_nothing)


def needs_autograd(args) -> bool:
    """True when the call must record a backward node or carry forward-mode tangents."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def register_autograd(qualname: str, backward: Callable, setup_context: Callable, jvp: Callable | None = None) -> None:
    """Registers the Autograd kernel of `qualname` ("mmrec::<op>").

    backward(ctx, *grad_outputs) and setup_context(ctx, inputs, output) are
    those torch.library.register_autograd takes (inputs with every default
    filled in); jvp(ctx, *input_tangents), an autograd.Function's (a tangent
    None where an input has none; setup_context saves what it reads with
    ctx.save_for_forward), gives forward mode. Without it forward mode raises
    NotImplementedError naming the op.
    """
    name = qualname.split("::")[1]
    op = getattr(getattr(torch.ops, NAMESPACE), name).default
    arguments = op._schema.arguments

    def below_autograd(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    def forward(*args):
        # Gradients back on for the levels below (the module's docstring).
        with torch.enable_grad(), _set_fwd_grad_enabled(True):
            return below_autograd(*args)

    function = type(
        f"{name}_autograd",
        (_SingleLevelFunction,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp or refuse_forward_mode(qualname)),
        },
    )

    def autograd_kernel(*args):
        # The dispatcher drops trailing arguments equal to their defaults.
        args = (*args, *(a.default_value for a in arguments[len(args) :]))
        if needs_autograd(args):
            with enable_single_level_autograd_function():
                return function.apply(*args)
        return below_autograd(*args)

    LIBRARY.impl(name, autograd_kernel, "Autograd")
