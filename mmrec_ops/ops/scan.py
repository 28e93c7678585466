"""mmrec::scan, the first-order linear recurrence, and its backward op.

Registers, for the schemas in csrc/ops.cpp: the fake kernels (shapes for
torch.compile), the CUDA kernels (Triton launchers, triton/scan.py), the
vmap rules and scan_backward's autograd formula (second derivatives). The CPU
kernels and scan's autograd kernel (reverse and forward mode, off the Python
hot path) are C++ (csrc/scan.cpp).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import register_autograd
from ._checks import check_floating, check_like, check_shape, step_shape
from ._triton import triton_launchers
from ._vmap import fold, padded, unfold

SCAN = "mmrec::scan"
SCAN_BACKWARD = "mmrec::scan_backward"


def scan(gamma: Tensor, x: Tensor | None = None, h0: Tensor | None = None, reverse: bool = False) -> Tensor:
    """Linear recurrence over time (dim 1), computed in one pass.

        h_t = gamma_t * h_{t-1} + x_t        t = 0 .. T-1,  h_{-1} = h0

    With ``reverse=True`` time runs backwards: ``h_t = gamma_t * h_{t+1} + x_t``.

    Args:
        gamma: decay, ``[B, T, ...]`` (e.g. ``[B, T, D]`` or ``[B, T, H, d]``), any strides.
        x: input of gamma's shape, dtype and device; omitted means x = 0.
        h0: initial state ``[B, ...]`` (one time step); omitted means 0 when x is
            given and 1 when it is not, so ``scan(gamma)`` is the cumulative product.
        reverse: scan from t = T-1 down to 0.

    Returns:
        h, a new contiguous tensor of gamma's shape and dtype. Accumulation is in
        float32 (float64 for float64 inputs). Differentiable in gamma, x and h0.
    """
    return torch.ops.mmrec.scan.default(gamma, x, h0, reverse)


def cumprod(gamma: Tensor, reverse: bool = False) -> Tensor:
    """Cumulative product over time: ``out_t = prod_{i <= t} gamma_i`` (``i >= t`` if reverse).

    ``gamma``: ``[B, T, ...]``. Equal to ``scan(gamma)``; underflow gives 0, never NaN.
    """
    return torch.ops.mmrec.scan.default(gamma, None, None, reverse)


def check_scan_args(op: str, gamma: Tensor, x: Tensor | None, h0: Tensor | None) -> None:
    """The checks of csrc/scan.cpp, for the kernels written in Python."""
    check_floating(gamma, op, "gamma")
    if gamma.dim() < 2:
        raise ValueError(f"{op}: expected gamma of shape [B, T, ...] (at least 2 dims), got {list(gamma.shape)}")
    if x is not None:
        check_like(x, gamma, op, "x", "gamma")
        check_shape(x, gamma.shape, op, "x")
    if h0 is not None:
        check_like(h0, gamma, op, "h0", "gamma")
        check_shape(h0, step_shape(gamma.shape), op, "h0")


def check_scan_backward_args(grad_h: Tensor, gamma: Tensor, h: Tensor, h0: Tensor | None) -> None:
    check_scan_args(SCAN_BACKWARD, gamma, None, h0)
    for name, t in (("grad_h", grad_h), ("h", h)):
        check_like(t, gamma, SCAN_BACKWARD, name, "gamma")
        check_shape(t, gamma.shape, SCAN_BACKWARD, name)


@torch.library.register_fake(SCAN)
def _scan_fake(gamma, x=None, h0=None, reverse=False):
    check_scan_args(SCAN, gamma, x, h0)
    return gamma.new_empty(gamma.shape)


@torch.library.register_fake(SCAN_BACKWARD)
def _scan_backward_fake(grad_h, gamma, h, h0, has_x, reverse):
    check_scan_backward_args(grad_h, gamma, h, h0)
    return gamma.new_empty(gamma.shape), gamma.new_empty(gamma.shape), gamma.new_empty(step_shape(gamma.shape))


@torch.library.register_kernel(SCAN, "cuda")
def _scan_cuda(gamma, x=None, h0=None, reverse=False):
    check_scan_args(SCAN, gamma, x, h0)
    return triton_launchers("scan").scan_forward(gamma, x, h0, reverse)


@torch.library.register_kernel(SCAN_BACKWARD, "cuda")
def _scan_backward_cuda(grad_h, gamma, h, h0, has_x, reverse):
    check_scan_backward_args(grad_h, gamma, h, h0)
    return triton_launchers("scan").scan_backward(grad_h, gamma, h, h0, has_x, reverse)


def _shift(y: Tensor, fill: Tensor, later: bool, reverse: bool) -> Tensor:
    """out_t = y at the step before t in the scan's direction (later=False), or
    at the step after it (later=True); the step with no such neighbour gets
    fill ([B, ...])."""
    if later == reverse:  # out_t = y_{t-1}
        return torch.cat([fill.unsqueeze(1), y[:, :-1]], dim=1)
    return torch.cat([y[:, 1:], fill.unsqueeze(1)], dim=1)


def _add_at_step(y: Tensor, t: int, value: Tensor) -> Tensor:
    y = y.clone()
    y[:, t] += value
    return y


def _scan_backward_setup_context(ctx, inputs, output):
    grad_h, gamma, h, h0, has_x, reverse = inputs
    ctx.save_for_backward(gamma, h, h0, output[1])
    ctx.has_x = has_x
    ctx.reverse = reverse


def _scan_backward_backward(ctx, u_gamma, u_x, u_h0):
    """Double backward. scan_backward computes dx = adjoint scan of grad_h,
    dgamma_t = dx_t * h_prev(t) and dh0 = gamma_first * dx_first; with v the
    upstream gradient reaching dx through all three, the adjoint of the
    adjoint scan is the forward scan a = scan(gamma, v), so that
    grad_h <- a, gamma_t <- a_prev(t) * dx_t (and gamma_first <- u_h0 * dx_first),
    h_s <- u_gamma_next(s) * dx_next(s), h0 <- u_gamma_first * dx_first."""
    gamma, h, h0, dx = ctx.saved_tensors
    reverse = ctx.reverse
    zeros_seq, zeros_step = torch.zeros_like(gamma), gamma.new_zeros(step_shape(gamma.shape))
    u_gamma = zeros_seq if u_gamma is None else u_gamma
    u_x = zeros_seq if u_x is None else u_x
    u_h0 = zeros_step if u_h0 is None else u_h0
    if gamma.shape[1] == 0:
        return zeros_seq, zeros_seq, zeros_seq, None if h0 is None else zeros_step, None, None
    first = -1 if reverse else 0
    implicit_h0 = torch.full_like(zeros_step, 0.0 if ctx.has_x else 1.0)
    h_prev = _shift(h, implicit_h0 if h0 is None else h0, later=False, reverse=reverse)
    v = u_x + u_gamma * h_prev
    a = torch.ops.mmrec.scan.default(gamma, _add_at_step(v, first, u_h0 * gamma[:, first]), None, reverse)
    grad_gamma = _add_at_step(_shift(a, zeros_step, later=False, reverse=reverse) * dx, first, u_h0 * dx[:, first])
    grad_h = _shift(u_gamma * dx, zeros_step, later=True, reverse=reverse)
    grad_h0 = None if h0 is None else u_gamma[:, first] * dx[:, first]
    return a, grad_gamma, grad_h, grad_h0, None, None


register_autograd(SCAN_BACKWARD, _scan_backward_backward, setup_context=_scan_backward_setup_context)


# vmap: every row of the batch is its own recurrence, so the vmapped dimension
# V folds into the batch, [V, B, T, ...] -> [V * B, T, ...], and the op runs once.


@torch.library.register_vmap(SCAN)
def _scan_vmap(info, in_dims, gamma, x=None, h0=None, reverse=False):
    V = info.batch_size
    gamma_dim, x_dim, h0_dim, _ = padded(in_dims, 4)
    h = torch.ops.mmrec.scan.default(
        fold(gamma, gamma_dim, V, into=0), fold(x, x_dim, V, into=0), fold(h0, h0_dim, V, into=0), reverse
    )
    return unfold(h, 0, V), 0


@torch.library.register_vmap(SCAN_BACKWARD)
def _scan_backward_vmap(info, in_dims, grad_h, gamma, h, h0, has_x, reverse):
    V = info.batch_size
    folded = (fold(t, dim, V, into=0) for t, dim in zip((grad_h, gamma, h, h0), in_dims))
    grads = torch.ops.mmrec.scan_backward.default(*folded, has_x, reverse)
    return tuple(unfold(g, 0, V) for g in grads), (0, 0, 0)
