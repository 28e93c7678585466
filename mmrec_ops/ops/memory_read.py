"""mmrec::memory_read, the read of a training step: each token over its group of memory
entries and its window of the tokens before it, in one softmax.

Registers, for the schemas in csrc/ops.cpp: the fake kernels, the CUDA kernels (Triton
launchers, triton/memory_read.py), the vmap rules and the autograd kernels (memory_read_backward's refuses
second derivatives). The CPU kernels are C++
(csrc/memory_read.cpp).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import refuse_second_derivatives, register_autograd
from ._checks import accumulation_dtype, check_floating, check_like, check_read_outputs, check_shape
from ._triton import triton_launchers
from ._vmap import fold, per_instance, unfold

MEMORY_READ = "mmrec::memory_read"
MEMORY_READ_BACKWARD = "mmrec::memory_read_backward"


def memory_read(
    q: Tensor, group: Tensor, group_mask: Tensor, tokens: Tensor, first_token: Tensor | int, window: int
) -> tuple[Tensor, Tensor]:
    """Softmax attention of each query over its block's group and its own window:

        out_t = sum_c p_c v_c,   p = softmax_c(q_t . k_c / sqrt(d)),   lse_t = log sum_c exp(q_t . k_c / sqrt(d))

    over the keys query t = n Q + i sees: ``group[b, n, c]`` where ``group_mask[n, i, c]``,
    and ``tokens[b, j]`` where t <= j <= t + W - 1 and j >= ``first_token`` (the token
    j - (W - 1) of the chunk: the last W tokens up to t, its own included, that exist).
    Time and memory are O(T (G + W)); on CUDA one pass per query tile, nothing materialised.

    Args:
        q: ``[B, T, H, d]``.
        group: ``[B, nb, G, 2, H d]``, the keys (``[..., 0, :]``) and values (``[..., 1, :]``)
            of each block of Q queries' G candidates (memory entries, learned slots); G >= 0.
        group_mask: ``[nb, Q, G]`` bool, True where query i of block n sees candidate c;
            nb Q >= T (blocks past the end are ignored).
        tokens: ``[B, W - 1 + T, 2, H d]``, the keys and values of the W - 1 tokens before the
            chunk (oldest first), then the chunk's T.
        first_token: int64 tensor of 0 dims, the first of ``tokens`` that exists (at the
            start of a sequence the W - 1 before it do not: then W - 1 - position; 0 when
            they all exist). A tensor, so that it may follow a position held on the device
            (an int is taken as one on q's device).
        window: W >= 1.

    q, group and tokens share one dtype (float32, float64, bfloat16 or float16) and device,
    any strides; group_mask is bool and first_token int64 on that device.

    Returns:
        out ``[B, T, H, d]`` in q's dtype and lse ``[B, H, T]`` in float32 (float64 for
        float64), new contiguous tensors; scores and sums accumulate in lse's dtype. A query
        that sees no key gives NaN and -inf, as softmax does. Differentiable in q, group and
        tokens, through out and lse (so reads can be merged through their lse).
    """
    if isinstance(first_token, int) and not isinstance(first_token, bool):
        first_token = torch.tensor(first_token, device=q.device)
    return torch.ops.mmrec.memory_read.default(q, group, group_mask, tokens, first_token, window)


def check_memory_read_args(
    q: Tensor, group: Tensor, group_mask: Tensor, tokens: Tensor, first_token: Tensor, window: int
) -> None:
    """The checks of csrc/memory_read.cpp, for the kernels written in Python."""
    op = MEMORY_READ
    check_floating(q, op, "q")
    if q.dim() != 4:
        raise ValueError(f"{op}: expected q of shape [B, T, H, d] (4 dims), got {list(q.shape)}")
    if window < 1:
        raise ValueError(f"{op}: expected window >= 1, got {window}")
    B, T, H, d = q.shape
    if d < 1:
        raise ValueError(f"{op}: expected q with d >= 1 channels per head, got d = 0")
    if group.dim() != 5:
        raise ValueError(f"{op}: expected group of shape [B, nb, G, 2, H d] (5 dims), got {list(group.shape)}")
    check_like(group, q, op, "group", "q")
    nb, G = group.shape[1], group.shape[2]
    check_shape(group, (B, nb, G, 2, H * d), op, "group")
    if group_mask.dim() != 3:
        raise ValueError(f"{op}: expected group_mask of shape [nb, Q, G] (3 dims), got {list(group_mask.shape)}")
    check_bool_mask(group_mask, q, "group_mask")
    Q = group_mask.shape[1]
    check_shape(group_mask, (nb, Q, G), op, "group_mask")
    if nb * Q < T:
        raise ValueError(
            f"{op}: expected group_mask's nb Q >= T (blocks covering every query), got nb = {nb}, Q = {Q}, T = {T}"
        )
    check_like(tokens, q, op, "tokens", "q")
    check_shape(tokens, (B, window - 1 + T, 2, H * d), op, "tokens")
    if first_token.dtype != torch.int64 or first_token.dim() != 0:
        raise ValueError(
            f"{op}: expected first_token to be an int64 tensor of 0 dims, got {first_token.dtype} "
            f"of shape {list(first_token.shape)}"
        )
    if first_token.device != q.device:
        raise ValueError(f"{op}: expected first_token to be on the device of q ({q.device}), got {first_token.device}")


def check_bool_mask(mask: Tensor, q: Tensor, name: str) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"{MEMORY_READ}: expected {name} to be bool, got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"{MEMORY_READ}: expected {name} to be on the device of q ({q.device}), got {mask.device}")


def _empty_outputs(q: Tensor) -> tuple[Tensor, Tensor]:
    B, T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=accumulation_dtype(q.dtype))


@torch.library.register_fake(MEMORY_READ)
def _memory_read_fake(q, group, group_mask, tokens, first_token, window):
    check_memory_read_args(q, group, group_mask, tokens, first_token, window)
    return _empty_outputs(q)


@torch.library.register_kernel(MEMORY_READ, "cuda")
def _memory_read_cuda(q, group, group_mask, tokens, first_token, window):
    check_memory_read_args(q, group, group_mask, tokens, first_token, window)
    if q.numel() == 0:
        return _empty_outputs(q)
    return triton_launchers("memory_read").memory_read(q, group, group_mask, tokens, first_token, window)


def check_memory_read_backward_args(grad_out, grad_lse, q, group, group_mask, tokens, first_token, out, lse, window):
    check_memory_read_args(q, group, group_mask, tokens, first_token, window)
    check_read_outputs(MEMORY_READ_BACKWARD, q, grad_out, out, grad_lse, lse)


@torch.library.register_fake(MEMORY_READ_BACKWARD)
def _memory_read_backward_fake(grad_out, grad_lse, q, group, group_mask, tokens, first_token, out, lse, window):
    check_memory_read_backward_args(grad_out, grad_lse, q, group, group_mask, tokens, first_token, out, lse, window)
    return q.new_empty(q.shape), group.new_empty(group.shape), tokens.new_empty(tokens.shape)


@torch.library.register_kernel(MEMORY_READ_BACKWARD, "cuda")
def _memory_read_backward_cuda(grad_out, grad_lse, q, group, group_mask, tokens, first_token, out, lse, window):
    check_memory_read_backward_args(grad_out, grad_lse, q, group, group_mask, tokens, first_token, out, lse, window)
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(group), torch.zeros_like(tokens)
    return triton_launchers("memory_read").memory_read_backward(
        grad_out, grad_lse, q, group, group_mask, tokens, first_token, out, lse, window
    )


def _memory_read_setup_context(ctx, inputs, output):
    q, group, group_mask, tokens, first_token, window = inputs
    ctx.save_for_backward(q, group, group_mask, tokens, first_token, *output)
    ctx.window = window


def _memory_read_backward(ctx, grad_out, grad_lse):
    """With s the scores of the keys a query sees, p = exp(s - lse), delta = grad_out . out - grad_lse:
    grad_v = p grad_out, grad_s = p (grad_out . v - delta), grad_q = grad_s k / sqrt(d),
    grad_k = grad_s q / sqrt(d); memory_read_backward recomputes p from lse."""
    q, group, group_mask, tokens, first_token, out, lse = ctx.saved_tensors
    grad_q, grad_group, grad_tokens = torch.ops.mmrec.memory_read_backward.default(
        grad_out, grad_lse, q, group, group_mask, tokens, first_token, out, lse, ctx.window
    )
    return grad_q, grad_group, None, grad_tokens, None, None


register_autograd(MEMORY_READ, _memory_read_backward, setup_context=_memory_read_setup_context)
refuse_second_derivatives(MEMORY_READ, MEMORY_READ_BACKWARD)


# vmap: every batch row reads on its own, so the vmapped dimension V folds into the
# batch, [V, B, ...] -> [V * B, ...], lse's too. group_mask and first_token are shared
# by all rows: vmapped ones take a call per instance.


@torch.library.register_vmap(MEMORY_READ)
def _memory_read_vmap(info, in_dims, q, group, group_mask, tokens, first_token, window):
    V = info.batch_size
    q_dim, group_dim, mask_dim, tokens_dim, first_dim, _ = in_dims
    if mask_dim is not None or first_dim is not None:
        args = (q, group, group_mask, tokens, first_token, window)
        return per_instance(torch.ops.mmrec.memory_read.default, args, in_dims, V)
    out, lse = torch.ops.mmrec.memory_read.default(
        fold(q, q_dim, V, into=0),
        fold(group, group_dim, V, into=0),
        group_mask,
        fold(tokens, tokens_dim, V, into=0),
        first_token,
        window,
    )
    return (unfold(out, 0, V), unfold(lse, 0, V)), (0, 0)


@torch.library.register_vmap(MEMORY_READ_BACKWARD)
def _memory_read_backward_vmap(
    info, in_dims, grad_out, grad_lse, q, group, group_mask, tokens, first_token, out, lse, window
):
    V = info.batch_size
    args = (grad_out, grad_lse, q, group, group_mask, tokens, first_token, out, lse, window)
    if in_dims[4] is not None or in_dims[6] is not None:  # group_mask, first_token
        return per_instance(torch.ops.mmrec.memory_read_backward.default, args, in_dims, V)
    grad_out_dim, grad_lse_dim, q_dim, group_dim, _, tokens_dim, _, out_dim, lse_dim, _ = in_dims
    grads = torch.ops.mmrec.memory_read_backward.default(
        fold(grad_out, grad_out_dim, V, into=0),
        fold(grad_lse, grad_lse_dim, V, into=0),
        fold(q, q_dim, V, into=0),
        fold(group, group_dim, V, into=0),
        group_mask,
        fold(tokens, tokens_dim, V, into=0),
        first_token,
        fold(out, out_dim, V, into=0),
        fold(lse, lse_dim, V, into=0),
        window,
    )
    return tuple(unfold(g, 0, V) for g in grads), (0, 0, 0)
