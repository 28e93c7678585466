"""mmrec::skinny_addmm, a matrix product of a few rows: a decode step's projections.

Registers, for the schema in csrc/ops.cpp: the fake kernel, the CUDA kernel (Triton
launchers, triton/skinny_addmm.py), the vmap rule and the autograd kernel, whose backward and
forward-mode formulas are composite (PyTorch ops, so they have derivatives of their own:
second derivatives, forward over reverse). The CPU kernel is C++ (csrc/skinny_addmm.cpp).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import register_autograd
from ._checks import check_floating, check_like, check_shape
from ._triton import triton_launchers
from ._vmap import fold, per_instance, unfold

SKINNY_ADDMM = "mmrec::skinny_addmm"


def skinny_addmm(bias: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """``torch.addmm(bias, x, weight)`` for a few rows of x, split over K on CUDA.

        out[m, n] = bias[n] + sum_k x[m, k] weight[k, n]

    What a decoder's projections are at a batch of a few rows: a stream of the
    weight, which cuBLAS's kernels for 2 to 32 rows read slowly (the figures:
    bench/results/skinny_addmm_cuda_h100.md). On CUDA programs split K among them and each
    streams its slice of the weight once for all rows; partial sums are added
    in a fixed order (the result does not depend on scheduling). The split pays
    while the weight dominates the bytes, i.e. for M well below K and N.
    On CPU the kernel is ATen's addmm (BLAS).

    Args:
        bias: ``[N]``.
        x: ``[M, K]``.
        weight: ``[K, N]``, e.g. a linear layer's ``weight.t()``.

    All tensors share one dtype (float32, float64, bfloat16 or float16) and
    device; any strides. On CUDA each must span fewer than 2**31 elements (its
    kernels' offsets are int32) and x may have up to 1,048,560 rows (the grid's
    row tiles); a ValueError says which.

    Returns:
        ``[M, N]``, a new contiguous tensor in x's dtype; products and sums in
        float32 (exact float32 products, no TF32; float64 for float64).
        Differentiable in every input.
    """
    return torch.ops.mmrec.skinny_addmm.default(bias, x, weight)


def check_skinny_addmm_args(bias: Tensor, x: Tensor, weight: Tensor) -> None:
    """The checks of csrc/skinny_addmm.cpp, for the kernels written in Python."""
    op = SKINNY_ADDMM
    check_floating(x, op, "x")
    if x.dim() != 2:
        raise ValueError(f"{op}: expected x of shape [M, K] (2 dims), got {list(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: expected weight of shape [K, N] (2 dims), got {list(weight.shape)}")
    check_like(weight, x, op, "weight", "x")
    check_shape(weight, (x.shape[1], weight.shape[1]), op, "weight")
    check_like(bias, x, op, "bias", "x")
    check_shape(bias, (weight.shape[1],), op, "bias")


@torch.library.register_fake(SKINNY_ADDMM)
def _skinny_addmm_fake(bias, x, weight):
    check_skinny_addmm_args(bias, x, weight)
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.register_kernel(SKINNY_ADDMM, "cuda")
def _skinny_addmm_cuda(bias, x, weight):
    check_skinny_addmm_args(bias, x, weight)
    M, K = x.shape
    N = weight.shape[1]
    if M == 0 or N == 0 or K == 0:  # no products: bias alone (or nothing)
        return bias.expand(M, N).contiguous()
    return triton_launchers("skinny_addmm").skinny_addmm(bias, x, weight)


def _skinny_addmm_setup_context(ctx, inputs, output):
    _, x, weight = inputs
    ctx.save_for_backward(x, weight)
    ctx.save_for_forward(x, weight)


def _skinny_addmm_backward(ctx, grad_out):
    """grad_bias = sum_m grad_out, grad_x = grad_out weight^T, grad_weight = x^T grad_out."""
    x, weight = ctx.saved_tensors
    return grad_out.sum(0), grad_out @ weight.t(), x.t() @ grad_out


def _skinny_addmm_jvp(ctx, bias_t, x_t, weight_t):
    """Forward mode: out_t = bias_t + x_t weight + x weight_t, absent tangents left out."""
    x, weight = ctx.saved_tensors
    out_t = torch.zeros(x.shape[0], weight.shape[1], dtype=x.dtype, device=x.device)
    if bias_t is not None:
        out_t = out_t + bias_t
    if x_t is not None:
        out_t = out_t + x_t @ weight
    if weight_t is not None:
        out_t = out_t + x @ weight_t
    return out_t


register_autograd(
    SKINNY_ADDMM, _skinny_addmm_backward, setup_context=_skinny_addmm_setup_context, jvp=_skinny_addmm_jvp
)


@torch.library.register_vmap(SKINNY_ADDMM)
def _skinny_addmm_vmap(info, in_dims, bias, x, weight):
    """Rows are independent: V folds into the rows of x, [V, M, K] -> [V * M, K]. A
    vmapped weight or bias is shared by all rows: it takes a call per instance."""
    V = info.batch_size
    bias_dim, x_dim, weight_dim = in_dims
    if bias_dim is not None or weight_dim is not None:
        return per_instance(torch.ops.mmrec.skinny_addmm.default, (bias, x, weight), in_dims, V)
    return unfold(torch.ops.mmrec.skinny_addmm.default(bias, fold(x, x_dim, V, into=0), weight), 0, V), 0
