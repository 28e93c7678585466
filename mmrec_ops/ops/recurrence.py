"""mmrec::recurrence, the exact MM-Rec core formula, and its backward op.

Registers, for the schemas in csrc/ops.cpp: the fake kernels (shapes for
torch.compile), the CUDA kernels (Triton launchers, triton/recurrence.py), the
vmap rules and recurrence_backward's autograd kernel, which refuses second
derivatives. The CPU kernels and recurrence's autograd kernel (off the Python
hot path) are C++ (csrc/recurrence.cpp).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import refuse_second_derivatives
from ._checks import check_floating, check_like, check_shape
from ._triton import triton_launchers
from ._vmap import fold, padded, unfold

RECURRENCE = "mmrec::recurrence"
RECURRENCE_BACKWARD = "mmrec::recurrence_backward"


def recurrence(
    z: Tensor, gamma: Tensor, weight: Tensor, bias: Tensor | None = None, h0: Tensor | None = None
) -> Tensor:
    """The gated recurrence of MM-Rec, per head, fused over the whole sequence.

        h_t = z_t * sigmoid(W h_{t-1} + b) + gamma_t * h_{t-1}        t = 0 .. T-1,  h_{-1} = h0

    Nonlinear in h, so sequential in t: one kernel walks the sequence with each
    head's d x d weight on chip (C++ on CPU, Triton on CUDA).

    Args:
        z: input, ``[B, T, H, d]``, any strides.
        gamma: decay, ``[B, T, H, d]``, z's dtype and device.
        weight: ``[H, d, d]``, row = output unit (``W h`` is ``einsum('hoi,bhi->bho')``).
        bias: ``[H, d]``; omitted means 0.
        h0: initial state ``[B, H, d]``; omitted means 0.

    All tensors share one dtype (float32, float64, bfloat16 or float16; cast the
    weight to z's dtype under autocast) and device.

    Returns:
        h, a new contiguous ``[B, T, H, d]`` tensor in z's dtype, accumulated in
        float32 (float64 for float64). Differentiable in z, gamma, weight, bias and
        h0 (backward through time in one reverse pass, ``mmrec::recurrence_backward``).
    """
    return torch.ops.mmrec.recurrence.default(z, gamma, weight, bias, h0)


def check_recurrence_args(
    op: str, z: Tensor, gamma: Tensor, weight: Tensor, bias: Tensor | None, h0: Tensor | None
) -> None:
    """The checks of csrc/recurrence.cpp, for the kernels written in Python."""
    check_floating(z, op, "z")
    if z.dim() != 4:
        raise ValueError(f"{op}: expected z of shape [B, T, H, d] (4 dims), got {list(z.shape)}")
    B, _, H, d = z.shape
    check_like(gamma, z, op, "gamma", "z")
    check_shape(gamma, z.shape, op, "gamma")
    check_like(weight, z, op, "weight", "z")
    check_shape(weight, (H, d, d), op, "weight")
    if bias is not None:
        check_like(bias, z, op, "bias", "z")
        check_shape(bias, (H, d), op, "bias")
    if h0 is not None:
        check_like(h0, z, op, "h0", "z")
        check_shape(h0, (B, H, d), op, "h0")


def check_recurrence_backward_args(grad_h, z, gamma, weight, bias, h0, h) -> None:
    check_recurrence_args(RECURRENCE_BACKWARD, z, gamma, weight, bias, h0)
    for name, t in (("grad_h", grad_h), ("h", h)):
        check_like(t, z, RECURRENCE_BACKWARD, name, "z")
        check_shape(t, z.shape, RECURRENCE_BACKWARD, name)


def check_device_limits(z: Tensor) -> None:
    """What the kernel of z's device refuses beyond the checks of the
    arguments, for the fake kernels: on CUDA, a head width the Triton kernels
    cannot hold (their own check and message), so that torch.compile fails
    when it traces the graph rather than when it runs it."""
    if z.device.type == "cuda":
        triton_launchers("recurrence").check_head_width(z.shape[3])


@torch.library.register_fake(RECURRENCE)
def _recurrence_fake(z, gamma, weight, bias=None, h0=None):
    check_recurrence_args(RECURRENCE, z, gamma, weight, bias, h0)
    check_device_limits(z)
    return z.new_empty(z.shape)


@torch.library.register_fake(RECURRENCE_BACKWARD)
def _recurrence_backward_fake(grad_h, z, gamma, weight, bias, h0, h):
    check_recurrence_backward_args(grad_h, z, gamma, weight, bias, h0, h)
    check_device_limits(z)
    B, _, H, d = z.shape
    return (
        z.new_empty(z.shape),
        z.new_empty(z.shape),
        z.new_empty((H, d, d)),
        z.new_empty((H, d)),
        z.new_empty((B, H, d)),
    )


@torch.library.register_kernel(RECURRENCE, "cuda")
def _recurrence_cuda(z, gamma, weight, bias=None, h0=None):
    check_recurrence_args(RECURRENCE, z, gamma, weight, bias, h0)
    return triton_launchers("recurrence").recurrence_forward(z, gamma, weight, bias, h0)


@torch.library.register_kernel(RECURRENCE_BACKWARD, "cuda")
def _recurrence_backward_cuda(grad_h, z, gamma, weight, bias, h0, h):
    check_recurrence_backward_args(grad_h, z, gamma, weight, bias, h0, h)
    return triton_launchers("recurrence").recurrence_backward(grad_h, z, gamma, weight, bias, h0, h)


refuse_second_derivatives(RECURRENCE, RECURRENCE_BACKWARD)


# vmap. Heads are independent recurrences, each with its own weight, so the
# vmapped dimension V can always fold into the heads: [V, B, T, H, d] ->
# [B, T, V * H, d], weight [V, H, d, d] -> [V * H, d, d]. When the weight and
# bias are shared by the V instances, the forward folds V into the batch
# instead ([V * B, T, H, d]), which needs no copy of the weight and, for
# contiguous inputs vmapped at dim 0, none of z and gamma. The backward always
# folds into the heads: grad_weight and grad_bias sum over the batch, and each
# instance needs its own.


@torch.library.register_vmap(RECURRENCE)
def _recurrence_vmap(info, in_dims, z, gamma, weight, bias=None, h0=None):
    V = info.batch_size
    z_dim, gamma_dim, weight_dim, bias_dim, h0_dim = padded(in_dims, 5)
    if weight_dim is None and bias_dim is None:
        h = torch.ops.mmrec.recurrence.default(
            fold(z, z_dim, V, into=0), fold(gamma, gamma_dim, V, into=0), weight, bias, fold(h0, h0_dim, V, into=0)
        )
        return unfold(h, 0, V), 0
    h = torch.ops.mmrec.recurrence.default(
        fold(z, z_dim, V, into=2),
        fold(gamma, gamma_dim, V, into=2),
        fold(weight, weight_dim, V, into=0),
        fold(bias, bias_dim, V, into=0),
        fold(h0, h0_dim, V, into=1),
    )
    return unfold(h, 2, V), 2


@torch.library.register_vmap(RECURRENCE_BACKWARD)
def _recurrence_backward_vmap(info, in_dims, grad_h, z, gamma, weight, bias, h0, h):
    V = info.batch_size
    grad_h_dim, z_dim, gamma_dim, weight_dim, bias_dim, h0_dim, h_dim = in_dims
    grads = torch.ops.mmrec.recurrence_backward.default(
        fold(grad_h, grad_h_dim, V, into=2),
        fold(z, z_dim, V, into=2),
        fold(gamma, gamma_dim, V, into=2),
        fold(weight, weight_dim, V, into=0),
        fold(bias, bias_dim, V, into=0),
        fold(h0, h0_dim, V, into=1),
        fold(h, h_dim, V, into=2),
    )
    # grad_z, grad_gamma: [B, T, V * H, d]; grad_weight, grad_bias: [V * H, ...]; grad_h0: [B, V * H, d]
    out_dims = (2, 2, 0, 0, 1)
    return tuple(unfold(g, dim, V) for g, dim in zip(grads, out_dims)), out_dims
