"""mmrec::segment_read, the read of the long-term memory: each query over the tokens of
the segments it chose, in one softmax.

Registers, for the schemas in csrc/ops.cpp: the fake kernels, the CUDA kernels (Triton
launchers, triton/segment_read.py), the vmap rules and the autograd kernels
(segment_read_backward's refuses second derivatives). The CPU kernels are C++
(csrc/segment_read.cpp).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import refuse_second_derivatives, register_autograd
from ._checks import accumulation_dtype, check_floating, check_like, check_read_outputs, check_shape
from ._triton import triton_launchers
from ._vmap import fold, unfold

SEGMENT_READ = "mmrec::segment_read"
SEGMENT_READ_BACKWARD = "mmrec::segment_read_backward"


def segment_read(q: Tensor, segments: Tensor, segment_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention of each query over every token of the segments it chose:

        out_t = sum_c p_c v_c,   p = softmax_c(q_t . k_c / sqrt(d)),   lse_t = log sum_c exp(q_t . k_c / sqrt(d))

    over the S tokens c of each segment ``segments[b, segment_ids[b, t, j]]``, j < k, whose
    id is not -1. Time O(T k S d); memory O(T) beyond the inputs and outputs on CUDA (one
    pass per query, nothing gathered), a bounded slice of gathered tokens on the CPU.

    Args:
        q: ``[B, T, H, d]``, d >= 1.
        segments: ``[B, M, S, 2, H d]``, the keys (``[..., 0, :]``) and values
            (``[..., 1, :]``) of M segments of S >= 1 tokens each, which every query of
            the batch row may read; M >= 0.
        segment_ids: ``[B, T, k]`` int64, the segments query t reads (k >= 0), each in
            ``[0, M)``, or -1 for none. A segment may be chosen by many queries.

    q and segments share one dtype (float32, float64, bfloat16 or float16) and device, any
    strides; segment_ids is int64 on that device. The CPU kernel refuses an id outside
    [-1, M) (ValueError); the CUDA kernel does not check (that would wait for the device)
    and reads nothing for it, as for -1.

    Returns:
        out ``[B, T, H, d]`` in q's dtype and lse ``[B, H, T]`` in float32 (float64 for
        float64), new contiguous tensors; scores and sums accumulate in lse's dtype. A query
        with no segment (all its ids -1) gives out 0 and lse -inf, so that a read merged
        with others by lse weighs nothing there (not NaN, as ``memory_read`` gives).
        Differentiable in q and segments, through out and lse; on CUDA the segments'
        gradient is summed over the queries with float32 (float64 for float64) atomic
        additions, so its rounding may differ from run to run.
    """
    return torch.ops.mmrec.segment_read.default(q, segments, segment_ids)


def check_segment_read_args(q: Tensor, segments: Tensor, segment_ids: Tensor) -> None:
    """The checks of csrc/segment_read.cpp, for the kernels written in Python (but the
    ids' range, which would read the device's data)."""
    op = SEGMENT_READ
    check_floating(q, op, "q")
    if q.dim() != 4:
        raise ValueError(f"{op}: expected q of shape [B, T, H, d] (4 dims), got {list(q.shape)}")
    B, T, H, d = q.shape
    if d < 1:
        raise ValueError(f"{op}: expected q with d >= 1 channels per head, got d = 0")
    if segments.dim() != 5:
        raise ValueError(f"{op}: expected segments of shape [B, M, S, 2, H d] (5 dims), got {list(segments.shape)}")
    check_like(segments, q, op, "segments", "q")
    M, S = segments.shape[1], segments.shape[2]
    check_shape(segments, (B, M, S, 2, H * d), op, "segments")
    if S < 1:
        raise ValueError(f"{op}: expected segments of S >= 1 tokens, got S = 0")
    if segment_ids.dtype != torch.int64:
        raise ValueError(f"{op}: expected segment_ids to be int64, got {segment_ids.dtype}")
    if segment_ids.device != q.device:
        raise ValueError(f"{op}: expected segment_ids to be on the device of q ({q.device}), got {segment_ids.device}")
    if segment_ids.dim() != 3:
        raise ValueError(f"{op}: expected segment_ids of shape [B, T, k] (3 dims), got {list(segment_ids.shape)}")
    check_shape(segment_ids, (B, T, segment_ids.shape[2]), op, "segment_ids")


def _empty_outputs(q: Tensor) -> tuple[Tensor, Tensor]:
    B, T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=accumulation_dtype(q.dtype))


def _nothing_read(q: Tensor) -> tuple[Tensor, Tensor]:
    """The outputs of a call in which no query reads a token: out 0, lse -inf."""
    B, T, H, _ = q.shape
    return torch.zeros_like(q, memory_format=torch.contiguous_format), q.new_full(
        (B, H, T), float("-inf"), dtype=accumulation_dtype(q.dtype)
    )


@torch.library.register_fake(SEGMENT_READ)
def _segment_read_fake(q, segments, segment_ids):
    check_segment_read_args(q, segments, segment_ids)
    return _empty_outputs(q)


@torch.library.register_kernel(SEGMENT_READ, "cuda")
def _segment_read_cuda(q, segments, segment_ids):
    check_segment_read_args(q, segments, segment_ids)
    if q.numel() == 0 or segment_ids.shape[2] == 0 or segments.shape[1] == 0:
        return _nothing_read(q)
    return triton_launchers("segment_read").segment_read(q, segments, segment_ids)


def check_segment_read_backward_args(grad_out, grad_lse, q, segments, segment_ids, out, lse):
    check_segment_read_args(q, segments, segment_ids)
    check_read_outputs(SEGMENT_READ_BACKWARD, q, grad_out, out, grad_lse, lse)


@torch.library.register_fake(SEGMENT_READ_BACKWARD)
def _segment_read_backward_fake(grad_out, grad_lse, q, segments, segment_ids, out, lse):
    check_segment_read_backward_args(grad_out, grad_lse, q, segments, segment_ids, out, lse)
    return q.new_empty(q.shape), segments.new_empty(segments.shape)


@torch.library.register_kernel(SEGMENT_READ_BACKWARD, "cuda")
def _segment_read_backward_cuda(grad_out, grad_lse, q, segments, segment_ids, out, lse):
    check_segment_read_backward_args(grad_out, grad_lse, q, segments, segment_ids, out, lse)
    if q.numel() == 0 or segment_ids.shape[2] == 0 or segments.shape[1] == 0:
        return torch.zeros_like(q, memory_format=torch.contiguous_format), torch.zeros_like(
            segments, memory_format=torch.contiguous_format
        )
    return triton_launchers("segment_read").segment_read_backward(
        grad_out, grad_lse, q, segments, segment_ids, out, lse
    )


def _segment_read_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _segment_read_backward(ctx, grad_out, grad_lse):
    """With s the scores of the tokens a query reads, p = exp(s - lse), delta = grad_out . out - grad_lse:
    grad_v = p grad_out, grad_s = p (grad_out . v - delta), grad_q = grad_s k / sqrt(d),
    grad_k = grad_s q / sqrt(d), summed over the queries that read each token;
    segment_read_backward recomputes p from lse."""
    q, segments, segment_ids, out, lse = ctx.saved_tensors
    grad_q, grad_segments = torch.ops.mmrec.segment_read_backward.default(
        grad_out, grad_lse, q, segments, segment_ids, out, lse
    )
    return grad_q, grad_segments, None


register_autograd(SEGMENT_READ, _segment_read_backward, setup_context=_segment_read_setup_context)
refuse_second_derivatives(SEGMENT_READ, SEGMENT_READ_BACKWARD)


# vmap: every argument has the batch dimension and each batch row reads on its own, so the
# vmapped dimension V folds into the batch, [V, B, ...] -> [V * B, ...], lse's too.


@torch.library.register_vmap(SEGMENT_READ)
def _segment_read_vmap(info, in_dims, q, segments, segment_ids):
    V = info.batch_size
    args = (fold(t, dim, V, into=0) for t, dim in zip((q, segments, segment_ids), in_dims))
    out, lse = torch.ops.mmrec.segment_read.default(*args)
    return (unfold(out, 0, V), unfold(lse, 0, V)), (0, 0)


@torch.library.register_vmap(SEGMENT_READ_BACKWARD)
def _segment_read_backward_vmap(info, in_dims, grad_out, grad_lse, q, segments, segment_ids, out, lse):
    V = info.batch_size
    args = (grad_out, grad_lse, q, segments, segment_ids, out, lse)
    grads = torch.ops.mmrec.segment_read_backward.default(*(fold(t, dim, V, into=0) for t, dim in zip(args, in_dims)))
    return tuple(unfold(g, 0, V) for g in grads), (0, 0)
