"""mmrec::decode_read, the read of one decode step: one query per row against a cache.

Registers, for the schema in csrc/ops.cpp: the fake kernel, the CUDA kernel (Triton
launchers, triton/decode_read.py) the vmap rule and the autograd kernel, whose backward is composite
(PyTorch ops, so it has second derivatives too). The CPU kernel is C++
(csrc/decode_read.cpp).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import register_autograd
from ._checks import check_floating, check_like, check_shape
from ._triton import triton_launchers
from ._vmap import fold, per_instance, unfold

DECODE_READ = "mmrec::decode_read"


def decode_read(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Attention of one query per (batch row, head) over a cache of K slots.

        out[b, h] = sum_s p_s values[b, h, s],   p = softmax_s(q[b, h] . keys[b, h, s] / sqrt(d) + mask[s])

    What a decoder reads at each token: its query against the keys and values
    it keeps. On CUDA the slots are split among programs (flash-decoding), so
    that a batch of a few rows still streams the cache at the memory's rate.

    Args:
        q: ``[B, H, d]``.
        keys, values: ``[B, H, K, d]``, K >= 1.
        mask: ``[K]``, added to every row's scores: 0 for a slot that holds a
            key, -inf for one that does not.

    All tensors share one dtype (float32, float64, bfloat16 or float16) and
    device; any strides. On CUDA each must span fewer than 2**31 elements (its
    kernels' offsets are int32; a ValueError says so).

    Returns:
        ``[B, H, d]``, a new contiguous tensor in q's dtype; scores, softmax and
        sums in float32 (float64 for float64). A row whose slots are all
        masked gives NaN, as softmax does. Differentiable in every input.
    """
    return torch.ops.mmrec.decode_read.default(q, keys, values, mask)


def check_decode_read_args(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> None:
    """The checks of csrc/decode_read.cpp, for the kernels written in Python."""
    op = DECODE_READ
    check_floating(q, op, "q")
    if q.dim() != 3:
        raise ValueError(f"{op}: expected q of shape [B, H, d] (3 dims), got {list(q.shape)}")
    if keys.dim() != 4:
        raise ValueError(f"{op}: expected keys of shape [B, H, K, d] (4 dims), got {list(keys.shape)}")
    check_like(keys, q, op, "keys", "q")
    B, H, d = q.shape
    K = keys.shape[2]
    check_shape(keys, (B, H, K, d), op, "keys")
    if K == 0:
        raise ValueError(f"{op}: expected keys with at least one slot (K >= 1), got K = 0")
    check_like(values, q, op, "values", "q")
    check_shape(values, keys.shape, op, "values")
    check_like(mask, q, op, "mask", "q")
    check_shape(mask, (K,), op, "mask")


@torch.library.register_fake(DECODE_READ)
def _decode_read_fake(q, keys, values, mask):
    check_decode_read_args(q, keys, values, mask)
    return q.new_empty(q.shape)


@torch.library.register_kernel(DECODE_READ, "cuda")
def _decode_read_cuda(q, keys, values, mask):
    check_decode_read_args(q, keys, values, mask)
    if q.numel() == 0:
        return q.new_empty(q.shape)
    return triton_launchers("decode_read").decode_read(q, keys, values, mask)


def _decode_read_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _decode_read_backward(ctx, grad_out):
    """With s = q k / sqrt(d) + mask, p = softmax(s), out = p v:
    grad_v = p grad_out, grad_s = p (grad_out . v - grad_out . out),
    grad_q = grad_s k / sqrt(d), grad_k = grad_s q / sqrt(d), grad_mask = sum_{b, h} grad_s;
    in float32 for bfloat16/float16 inputs (float64 for float64), with p and out recomputed
    there: grad_s subtracts two close terms, which the rounded output would not keep."""
    q, keys, values, mask = ctx.saved_tensors
    dtype = q.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q, keys, values, mask, grad_out = (t.to(acc) for t in (q, keys, values, mask, grad_out))
    scale = max(q.shape[-1], 1) ** -0.5  # d = 0: no products to scale
    p = torch.softmax(torch.einsum("bhd,bhkd->bhk", q, keys) * scale + mask, dim=-1)
    out = torch.einsum("bhk,bhkd->bhd", p, values)
    grad_values = torch.einsum("bhk,bhd->bhkd", p, grad_out)
    grad_p = torch.einsum("bhd,bhkd->bhk", grad_out, values)
    grad_s = p * (grad_p - (grad_out * out).sum(-1, keepdim=True))
    grad_q = torch.einsum("bhk,bhkd->bhd", grad_s, keys) * scale
    grad_keys = torch.einsum("bhk,bhd->bhkd", grad_s, q) * scale
    grad_mask = grad_s.sum((0, 1))
    return tuple(g.to(dtype) for g in (grad_q, grad_keys, grad_values, grad_mask))


register_autograd(DECODE_READ, _decode_read_backward, setup_context=_decode_read_setup_context)


@torch.library.register_vmap(DECODE_READ)
def _decode_read_vmap(info, in_dims, q, keys, values, mask):
    """Every (row, head) reads on its own: V folds into the batch, [V, B, ...] ->
    [V * B, ...]. The mask is shared by all rows: a vmapped one takes a call per instance."""
    V = info.batch_size
    q_dim, keys_dim, values_dim, mask_dim = in_dims
    if mask_dim is not None:
        return per_instance(torch.ops.mmrec.decode_read.default, (q, keys, values, mask), in_dims, V)
    out = torch.ops.mmrec.decode_read.default(
        fold(q, q_dim, V, into=0), fold(keys, keys_dim, V, into=0), fold(values, values_dim, V, into=0), mask
    )
    return unfold(out, 0, V), 0
