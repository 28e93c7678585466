"""Triton kernels of mmrec::decode_read (CUDA): one query per row against a cache.

    out[b, h] = softmax(q[b, h] . keys[b, h, s] / sqrt(d) + mask[s]) . values[b, h, s]   over slots s

Split over the slots (flash-decoding). A decode step has one query per (batch row,
head), so one program per row leaves most of a GPU idle while it streams the row's
K x d keys and values. Here the slots of a row are cut into SPLITS chunks: program
(row, chunk) streams its chunk's keys and values once, in tiles of BLOCK_K slots, with
an online softmax, and writes a partial (running max m, normalizer total, unnormalized
output acc); a second kernel merges a row's partials,

    out = sum_c exp(m_c - M) acc_c / sum_c exp(m_c - M) l_c,   M = max_c m_c,

where a chunk whose slots are all masked (m_c = -inf) weighs 0. Scores, softmax and
sums are in float32 (float64 for float64); only the output is rounded to the storage
dtype.

This module does not import mmrec_ops: the callers validate the arguments.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    Plan,
    cast_out,
    cdiv,
    check_offsets_fit,
    kernel_dtypes,
    next_power_of_2,
    num_sms,
    soft_bf16,
    tensor_span,
)

__all__ = ["decode_read", "split_slots", "check_offsets"]

# Slots per tile of a program (64 x d keys and values per step), programs to aim for per
# streaming multiprocessor (enough loads in flight to stream the cache at the memory's
# rate) and warps per program: the fastest of a sweep at a decoder's shapes, batch 1 and
# 16 (python -m bench.tune_decode_read; bench/results/tune_decode_read_h100.md).
BLOCK_K = 64
PROGRAMS_PER_SM = 4
NUM_WARPS = 2


@triton.jit
def _partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    part_ptr,
    H,
    K,
    D,
    CHUNK,
    q_sb,
    q_sh,
    q_sd,
    k_sb,
    k_sh,
    k_ss,
    k_sd,
    v_sb,
    v_sh,
    v_ss,
    v_sd,
    mask_s,
    SPLITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    row, chunk = tl.program_id(0), tl.program_id(1)
    b, h = row // H, row % H
    dims = tl.arange(0, BLOCK_D)
    in_d = dims < D
    # 1 / sqrt(d) in the accumulation dtype (a float argument would be float32; D may be
    # a constexpr, which Triton makes of an int argument equal to 1).
    scale = 1.0 / tl.sqrt(tl.zeros((), ACC) + D)
    q = tl.load(q_ptr + b * q_sb + h * q_sh + dims * q_sd, mask=in_d, other=0.0).to(ACC) * scale
    k_row, v_row = k_ptr + b * k_sb + h * k_sh, v_ptr + b * v_sb + h * v_sh
    m = tl.full((), float("-inf"), ACC)
    total = tl.zeros((), ACC)
    acc = tl.zeros((BLOCK_D,), ACC)
    start = chunk * CHUNK
    for offset in range(0, CHUNK, BLOCK_K):
        slots = start + offset + tl.arange(0, BLOCK_K)
        in_k = slots < K
        tile = in_k[:, None] & in_d[None, :]
        keys = tl.load(k_row + slots[:, None] * k_ss + dims[None, :] * k_sd, mask=tile, other=0.0).to(ACC)
        bias = tl.load(mask_ptr + slots * mask_s, mask=in_k, other=float("-inf")).to(ACC)
        scores = tl.sum(keys * q[None, :], axis=1) + bias
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        # While every slot so far is masked, m_new is -inf: shift by 0 so that no
        # exp(-inf - -inf) makes a NaN (the weights are exp(-inf) = 0 either way).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - shift)
        alpha = tl.exp(m - shift)
        values = tl.load(v_row + slots[:, None] * v_ss + dims[None, :] * v_sd, mask=tile, other=0.0).to(ACC)
        total = total * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * values, axis=0)
        m = m_new
    # part: [rows, SPLITS, 2 + BLOCK_D] = (m, total, acc).
    out = part_ptr + (row * SPLITS + chunk) * (2 + BLOCK_D)
    tl.store(out, m)
    tl.store(out + 1, total)
    tl.store(out + 2 + dims, acc)


@triton.jit
def _merge_kernel(
    part_ptr,
    out_ptr,
    H,
    D,
    o_sb,
    o_sh,
    o_sd,
    SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    row = tl.program_id(0)
    b, h = row // H, row % H
    chunks, dims = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    in_s = chunks < SPLITS
    part = part_ptr + (row * SPLITS + chunks) * (2 + BLOCK_D)
    m = tl.load(part, mask=in_s, other=float("-inf"))
    total = tl.load(part + 1, mask=in_s, other=0.0)
    acc = tl.load(part[:, None] + 2 + dims[None, :], mask=in_s[:, None], other=0.0)
    top = tl.max(m, axis=0)
    weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.sum(weight * total, axis=0)
    o = out_ptr + b * o_sb + h * o_sh + dims * o_sd
    tl.store(o, cast_out(out, out_ptr, SOFT_BF16), mask=dims < D)


def split_slots(rows: int, K: int, sms: int) -> tuple[int, int]:
    """(chunks, slots per chunk) of each row's K slots: about PROGRAMS_PER_SM programs a
    streaming multiprocessor in all, each a whole number of tiles, none empty."""
    splits = max(1, min(cdiv(K, BLOCK_K), cdiv(PROGRAMS_PER_SM * sms, rows)))
    chunk = cdiv(cdiv(K, splits), BLOCK_K) * BLOCK_K
    return cdiv(K, chunk), chunk


def check_offsets(B, H, K, D, strides) -> None:
    """Refuses a tensor whose last element lies 2**31 elements or more past its first (a
    cache of 8 GiB in float32): its offsets would overflow int32."""
    q_s, k_s, v_s, mask_s, _ = strides
    shapes = {
        "q": ((B, H, D), q_s),
        "keys": ((B, H, K, D), k_s),
        "values": ((B, H, K, D), v_s),
        "mask": ((K,), (mask_s,)),
    }
    spans = {name: tensor_span(shape, stride) for name, (shape, stride) in shapes.items()}
    check_offsets_fit("mmrec::decode_read", spans, "split the batch")


@functools.cache
def _plans(B, H, K, D, strides, dtype, sms):
    """The two launch plans of one shape: (partial, merge, splits, BLOCK_D)."""
    check_offsets(B, H, K, D, strides)
    block_d = max(next_power_of_2(D), 16)
    rows = B * H
    splits, chunk = split_slots(rows, K, sms)
    _, acc = kernel_dtypes(dtype)
    q_s, k_s, v_s, mask_s, o_s = strides
    partial = Plan(
        _partial_kernel,
        (rows, splits),
        (H, K, D, chunk, *q_s, *k_s, *v_s, mask_s),
        (splits, BLOCK_K, block_d, acc),
        num_warps=NUM_WARPS,
    )
    merge = Plan(
        _merge_kernel, (rows,), (H, D, *o_s), (splits, max(next_power_of_2(splits), 2), block_d, soft_bf16(dtype)), 1
    )
    return partial, merge, splits, block_d


def decode_read(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """q ``[B, H, d]``, keys and values ``[B, H, K, d]``, mask ``[K]``, any strides
    -> ``[B, H, d]`` in q's dtype."""
    B, H, K, D = keys.shape
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    strides = (q.stride(), keys.stride(), values.stride(), mask.stride(0), out.stride())
    partial, merge, splits, block_d = _plans(B, H, K, D, strides, q.dtype, num_sms(q))
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    part = torch.empty(B * H, splits, 2 + block_d, dtype=acc_dtype, device=q.device)
    partial.launch(q, keys, values, mask, part)
    merge.launch(part, out)
    return out
