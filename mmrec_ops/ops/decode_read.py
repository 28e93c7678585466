"""mmrec::decode_read, the read of one decode step: one query per row against a cache.

Registers, for the schema in csrc/ops.cpp: the fake kernel, the CUDA kernel (Triton
launchers, triton/decode_read.py), the vmap rule and the autograd kernel, whose backward and
forward-mode formulas are composite (PyTorch ops, so they have derivatives of their own:
second derivatives, forward over reverse). The CPU kernel is C++ (csrc/decode_read.cpp).
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
    ctx.save_for_forward(*inputs)


def _softmax_in_accumulation_dtype(q, keys, values, mask):
    """(q, keys, values, mask in float32 for bfloat16/float16 (float64 for float64),
    p = softmax(q k / sqrt(d) + mask), out = p v, the scale 1 / sqrt(d)): the derivatives
    recompute p and out there, as grad_s and p_t subtract two close terms, which the
    rounded output would not keep."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, keys, values, mask = (t.to(acc) for t in (q, keys, values, mask))
    scale = max(q.shape[-1], 1) ** -0.5  # d = 0: no products to scale
    p = torch.softmax(torch.einsum("bhd,bhkd->bhk", q, keys) * scale + mask, dim=-1)
    return q, keys, values, mask, p, torch.einsum("bhk,bhkd->bhd", p, values), scale


def _decode_read_backward(ctx, grad_out):
    """With s = q k / sqrt(d) + mask, p = softmax(s), out = p v:
    grad_v = p grad_out, grad_s = p (grad_out . v - grad_out . out),
    grad_q = grad_s k / sqrt(d), grad_k = grad_s q / sqrt(d), grad_mask = sum_{b, h} grad_s;
    in the accumulation dtype, each gradient rounded once to the inputs' dtype."""
    dtype = ctx.saved_tensors[0].dtype
    q, keys, values, mask, p, out, scale = _softmax_in_accumulation_dtype(*ctx.saved_tensors)
    grad_out = grad_out.to(q.dtype)
    grad_values = torch.einsum("bhk,bhd->bhkd", p, grad_out)
    grad_p = torch.einsum("bhd,bhkd->bhk", grad_out, values)
    grad_s = p * (grad_p - (grad_out * out).sum(-1, keepdim=True))
    grad_q = torch.einsum("bhk,bhkd->bhd", grad_s, keys) * scale
    grad_keys = torch.einsum("bhk,bhd->bhkd", grad_s, q) * scale
    grad_mask = grad_s.sum((0, 1))
    return tuple(g.to(dtype) for g in (grad_q, grad_keys, grad_values, grad_mask))


def _decode_read_jvp(ctx, q_t, keys_t, values_t, mask_t):
    """Forward mode, with s, p and out as above: s_t = (q_t k + q k_t) / sqrt(d) + mask_t,
    p_t = p (s_t - sum_s p s_t), out_t = p_t v + p v_t (absent tangents left out); in the
    accumulation dtype, rounded once to the inputs' dtype."""
    dtype = ctx.saved_tensors[0].dtype
    q, keys, values, mask, p, out, scale = _softmax_in_accumulation_dtype(*ctx.saved_tensors)
    s_t = torch.zeros_like(p)
    if q_t is not None:
        s_t = s_t + torch.einsum("bhd,bhkd->bhk", q_t.to(q.dtype), keys) * scale
    if keys_t is not None:
        s_t = s_t + torch.einsum("bhd,bhkd->bhk", q, keys_t.to(q.dtype)) * scale
    if mask_t is not None:
        s_t = s_t + mask_t.to(q.dtype)
    p_t = p * (s_t - (p * s_t).sum(-1, keepdim=True))
    out_t = torch.einsum("bhk,bhkd->bhd", p_t, values)
    if values_t is not None:
        out_t = out_t + torch.einsum("bhk,bhkd->bhd", p, values_t.to(q.dtype))
    return out_t.to(dtype)


register_autograd(DECODE_READ, _decode_read_backward, setup_context=_decode_read_setup_context, jvp=_decode_read_jvp)


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
