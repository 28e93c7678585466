"""Triton kernels of mmrec::segment_read and mmrec::segment_read_backward (CUDA).

    query t reads the S tokens of each segment segments[b, segment_ids[b, t, j]], j < k,
    whose id is in [0, M) (-1, or an id out of range: none);
    out_t = sum_c p_c v_c,  p = softmax(q_t . k_c / sqrt(d)),  lse_t = log sum_c exp(q_t . k_c / sqrt(d));
    out_t = 0, lse_t = -inf for a query that reads no token.

Forward. One program per (query, batch row and head) runs one online softmax over its k
segments, each in tiles of BS tokens x d channels read in place in ``segments``: nothing
gathered, memory O(T) beyond the inputs and outputs. A query's segments are its own
(queries of one tile would share none), so the scores are vector products, not tl.dot.

Backward, from lse (the weights recomputed, never stored) and
delta = grad_out . out - grad_lse: the same walk per query gives grad_q, and adds each
tile's key and value gradients into a zeroed buffer of the segments' shape in the
accumulation dtype with atomic additions (several queries read one segment), rounded to
the storage dtype at the end. The order of those additions varies from run to run, so
the segments' gradient is not bitwise reproducible.

Scores, softmax and sums in float32 (float64 for float64); only the outputs are rounded
to the storage dtype.

This module does not import mmrec_ops: the callers validate the arguments.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import Plan, cast_out, check_offsets_fit, kernel_dtypes, next_power_of_2, soft_bf16

__all__ = ["segment_read", "segment_read_backward"]

# Tokens per tile (a segment of the model's 64 tokens in one tile) and warps per program.
MAX_BLOCK_S = 64
NUM_WARPS = 4


@triton.jit
def _segment_tile(ids_ptr, j, s0, b, t, h, M, S, ssb, ssm, sss, sib, sit, dims, D: tl.constexpr, BS: tl.constexpr):
    # The offsets in the segments of the keys [BS, BD] of tokens s0 .. s0 + BS - 1 of query
    # t's segment j, which tokens are read (the segment exists, the token is in it), and
    # the tile's mask (a token read, a channel of d).
    sid = tl.load(ids_ptr + b * sib + t * sit + j)
    ok = (sid >= 0) & (sid < M)
    tokens = s0 + tl.arange(0, BS)
    # One comparison, not (tokens < S) & ok: Triton 3.9's interpreter makes an int32 mask of
    # a vector & a scalar condition, which tl.load refuses.
    read = tokens < tl.where(ok, S, 0)
    offsets = b * ssb + tl.where(ok, sid, 0) * ssm + tokens[:, None] * sss + h * D + dims[None, :]
    return offsets, read, read[:, None] & (dims < D)[None, :]


@triton.jit
def _forward_kernel(
    q_ptr,
    seg_ptr,
    ids_ptr,
    o_ptr,
    lse_ptr,
    T,
    H,
    M,
    S,
    K,
    sqb,
    sqt,
    ssb,
    ssm,
    sss,
    sskv,
    sib,
    sit,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    ACC: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    dims = tl.arange(0, BD)
    dim_ok = dims < D
    scale = 1.0 / tl.sqrt(tl.full([], D, ACC))
    q_off = b * sqb + t * sqt + h * D + dims
    q = tl.load(q_ptr + q_off, mask=dim_ok, other=0.0).to(ACC) * scale
    m = tl.full([], float("-inf"), ACC)
    total = tl.zeros([], ACC)
    acc = tl.zeros([BD], ACC)
    for j in range(0, K):
        for s0 in range(0, S, BS):
            kv, read, tile = _segment_tile(ids_ptr, j, s0, b, t, h, M, S, ssb, ssm, sss, sib, sit, dims, D, BS)
            keys = tl.load(seg_ptr + kv, mask=tile, other=0.0).to(ACC)
            scores = tl.where(read, tl.sum(keys * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            # While no token is read, m_new is -inf: shift by 0 so that no exp(-inf - -inf)
            # makes a NaN (the weights are exp(-inf) = 0 either way).
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - shift)
            alpha = tl.exp(m - shift)
            values = tl.load(seg_ptr + kv + sskv, mask=tile, other=0.0).to(ACC)
            total = total * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * values, axis=0)
            m = m_new
    seen = total > 0
    out = tl.where(seen, acc / tl.where(seen, total, 1.0), 0.0)
    tl.store(o_ptr + q_off, cast_out(out, o_ptr, SOFT_BF16), mask=dim_ok)
    lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + pid_bh * T + t, lse)


@triton.jit
def _backward_kernel(
    q_ptr,
    seg_ptr,
    ids_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    dseg_ptr,
    T,
    H,
    M,
    S,
    K,
    sqb,
    sqt,
    ssb,
    ssm,
    sss,
    sskv,
    sib,
    sit,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    ACC: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    dims = tl.arange(0, BD)
    dim_ok = dims < D
    scale = 1.0 / tl.sqrt(tl.full([], D, ACC))
    q_off = b * sqb + t * sqt + h * D + dims
    q = tl.load(q_ptr + q_off, mask=dim_ok, other=0.0).to(ACC)
    do = tl.load(do_ptr + q_off, mask=dim_ok, other=0.0).to(ACC)
    lse = tl.load(lse_ptr + pid_bh * T + t)
    delta = tl.load(delta_ptr + pid_bh * T + t)
    dq = tl.zeros([BD], ACC)
    for j in range(0, K):
        for s0 in range(0, S, BS):
            kv, read, tile = _segment_tile(ids_ptr, j, s0, b, t, h, M, S, ssb, ssm, sss, sib, sit, dims, D, BS)
            keys = tl.load(seg_ptr + kv, mask=tile, other=0.0).to(ACC)
            values = tl.load(seg_ptr + kv + sskv, mask=tile, other=0.0).to(ACC)
            # A query that reads no token has lse -inf and no token read: p = 0, not exp(inf).
            p = tl.where(read, tl.exp(tl.sum(keys * q[None, :], axis=1) * scale - lse), 0.0)
            grad_s = p * (tl.sum(values * do[None, :], axis=1) - delta)
            dq += tl.sum(grad_s[:, None] * keys, axis=0)
            tl.atomic_add(dseg_ptr + kv, grad_s[:, None] * q[None, :] * scale, mask=tile)
            tl.atomic_add(dseg_ptr + kv + sskv, p[:, None] * do[None, :], mask=tile)
    tl.store(dq_ptr + q_off, cast_out(dq * scale, dq_ptr, SOFT_BF16), mask=dim_ok)


def _check_offsets(q_shape, segments_shape, ids_shape) -> None:
    # The kernels take contiguous tensors, whose last element lies numel - 1 past the first.
    spans = {name: math.prod(shape) - 1 for name, shape in (("q", q_shape), ("segments", segments_shape))}
    spans["segment_ids"] = math.prod(ids_shape) - 1
    check_offsets_fit("mmrec::segment_read", spans, "split the batch")


@functools.cache
def _plans(q_shape, segments_shape, k, dtype):
    """The forward and backward launch plans of one call's shapes (contiguous tensors)."""
    B, T, H, d = q_shape
    _, M, S, _, D = segments_shape
    _check_offsets(q_shape, segments_shape, (B, T, k))
    strides = (T * H * d, H * d, M * S * 2 * D, S * 2 * D, 2 * D, D, T * k, k)
    _, acc = kernel_dtypes(dtype)
    block_s = min(MAX_BLOCK_S, max(16, next_power_of_2(S)))
    constexprs = (d, max(16, next_power_of_2(d)), block_s, acc, soft_bf16(dtype))
    forward = Plan(_forward_kernel, (T, B * H), (T, H, M, S, k, *strides), constexprs, NUM_WARPS)
    backward = Plan(_backward_kernel, (T, B * H), (T, H, M, S, k, *strides), constexprs, NUM_WARPS)
    return forward, backward


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_read(q: Tensor, segments: Tensor, segment_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(out ``[B, T, H, d]``, lse ``[B, H, T]``) of mmrec::segment_read."""
    q, segments, segment_ids = q.contiguous(), segments.contiguous(), segment_ids.contiguous()
    B, T, H, _ = q.shape
    forward, _ = _plans(tuple(q.shape), tuple(segments.shape), segment_ids.shape[2], q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, T, device=q.device, dtype=accumulation_dtype(q.dtype))
    forward.launch(q, segments, segment_ids, out, lse)
    return out, lse


def segment_read_backward(grad_out, grad_lse, q, segments, segment_ids, out, lse) -> tuple[Tensor, Tensor]:
    """(grad_q, grad_segments) of mmrec::segment_read."""
    q, segments, segment_ids = q.contiguous(), segments.contiguous(), segment_ids.contiguous()
    _, backward = _plans(tuple(q.shape), tuple(segments.shape), segment_ids.shape[2], q.dtype)
    acc = accumulation_dtype(q.dtype)
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1).transpose(1, 2) - grad_lse
    grad_q = torch.empty_like(q)
    grad_segments = torch.zeros(segments.shape, device=q.device, dtype=acc)
    backward.launch(
        q, segments, segment_ids, grad_out.contiguous(), lse.contiguous(), delta.contiguous(), grad_q, grad_segments
    )
    return grad_q, grad_segments.to(q.dtype)
