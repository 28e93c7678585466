"""Triton kernels of mmrec::skinny_addmm (CUDA): out = bias + x @ weight for a few rows.

    out[m, n] = bias[n] + sum_k x[m, k] weight[k, n]      x [M, K], weight [K, N], bias [N]

Split over K. With a few rows the product is a stream of the weight, and what counts is
how many loads a GPU keeps in flight. For 2 to 32 float32 rows cuBLAS picks kernels that
stream the weight far below the memory's rate (bench/results/skinny_addmm_cuda_h100.md). Here program (column tile,
part of K, row tile) streams a [K / parts, BLOCK_N] slice of the weight in tiles of
BLOCK_K rows, software pipelined, and multiplies it by its rows of x (tl.dot on the
inputs in the accumulation dtype: float32, exact products and sums without TF32; float64
for float64). With one part the program adds the bias and stores the output; with
several each stores its partial sums and a second kernel adds them in the order of the
parts, then the bias, so that the result does not depend on the order in which programs
finish.

This module does not import mmrec_ops: the callers validate the arguments.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import Plan, cast_out, cdiv, check_offsets_fit, kernel_dtypes, soft_bf16, tensor_span

__all__ = ["skinny_addmm", "split_k", "check_offsets"]

# Rows of x per program (tl.dot's smallest tile), weight tile and pipeline depth, and the
# part of K each program sums: the fastest single setting over a base decoder's products
# in a sweep at 16 float32 rows, weights out of L2 (the op's figures:
# bench/results/skinny_addmm_cuda_h100.md).
BLOCK_M = 16
BLOCK_N = 32
BLOCK_K = 32
NUM_STAGES = 4
NUM_WARPS = 4
K_PER_PART = 192
MAX_PARTS = 4
REDUCE_BLOCK = 1024


@triton.jit
def _product_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    K_PER,
    x_sm,
    x_sk,
    w_sk,
    w_sn,
    b_s,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    ACC: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    n_tile, part, m_tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m, in_n = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    k_start = part * K_PER
    k_end = tl.minimum(k_start + K_PER, K)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        ks = k0 + tl.arange(0, BLOCK_K)
        in_k = ks < k_end
        x = tl.load(x_ptr + rows[:, None] * x_sm + ks[None, :] * x_sk, mask=in_m[:, None] & in_k[None, :], other=0.0)
        w = tl.load(w_ptr + ks[:, None] * w_sk + cols[None, :] * w_sn, mask=in_k[:, None] & in_n[None, :], other=0.0)
        acc = tl.dot(x.to(ACC), w.to(ACC), acc, input_precision="ieee", out_dtype=ACC)
    tile = in_m[:, None] & in_n[None, :]
    if SPLIT:
        # Partial sums [parts, M, N], contiguous, in the accumulation dtype.
        tl.store(out_ptr + (part * M + rows[:, None]) * N + cols[None, :], acc, mask=tile)
    else:
        acc += tl.load(b_ptr + cols * b_s, mask=in_n, other=0.0).to(ACC)[None, :]
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], cast_out(acc, out_ptr, SOFT_BF16), mask=tile)


@triton.jit
def _sum_parts_kernel(
    part_ptr,
    b_ptr,
    out_ptr,
    MN,
    N,
    b_s,
    PARTS: tl.constexpr,
    BLOCK: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < MN
    acc = tl.load(part_ptr + offs, mask=live, other=0.0)
    for p in tl.static_range(1, PARTS):
        acc += tl.load(part_ptr + p * MN + offs, mask=live, other=0.0)
    acc += tl.load(b_ptr + (offs % N) * b_s, mask=live, other=0.0).to(acc.dtype)
    tl.store(out_ptr + offs, cast_out(acc, out_ptr, SOFT_BF16), mask=live)


def split_k(K: int) -> tuple[int, int]:
    """(parts, rows of the weight per part) of K: parts of about K_PER_PART rows, at most
    MAX_PARTS, each a whole number of BLOCK_K tiles, none empty."""
    parts = max(1, min(MAX_PARTS, cdiv(K, K_PER_PART)))
    per_part = cdiv(cdiv(K, parts), BLOCK_K) * BLOCK_K
    return cdiv(K, per_part), per_part


# A CUDA grid's third axis (the row tiles) holds at most 65535 programs.
MAX_ROWS = 65535 * BLOCK_M


def check_offsets(M, K, N, parts, strides) -> None:
    """Refuses more rows than the grid holds, and a tensor whose last element lies 2**31
    elements or more past its first: its offsets would overflow int32."""
    if M > MAX_ROWS:
        raise ValueError(
            f"mmrec::skinny_addmm on CUDA: x has {M} rows, more than the kernel's grid holds "
            f"({MAX_ROWS}); for that many rows torch.addmm is the faster anyway"
        )
    x_s, w_s, b_s = strides
    spans = {
        "x": tensor_span((M, K), x_s),
        "weight": tensor_span((K, N), w_s),
        "bias": tensor_span((N,), (b_s,)),
        "the output": parts * M * N - 1,
    }
    check_offsets_fit("mmrec::skinny_addmm", spans, "split the product")


@functools.cache
def _plans(M, K, N, strides, dtype):
    """The launch plans of one shape: (product, sum of the parts or None, parts)."""
    parts, per_part = split_k(K)
    check_offsets(M, K, N, parts, strides)
    _, acc = kernel_dtypes(dtype)
    x_s, w_s, b_s = strides
    split = parts > 1
    product = Plan(
        _product_kernel,
        (cdiv(N, BLOCK_N), parts, cdiv(M, BLOCK_M)),
        (M, N, K, per_part, *x_s, *w_s, b_s),
        (split, BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES, acc, soft_bf16(dtype)),
        num_warps=NUM_WARPS,
    )
    if not split:
        return product, None, 1
    total = Plan(
        _sum_parts_kernel, (cdiv(M * N, REDUCE_BLOCK),), (M * N, N, b_s), (parts, REDUCE_BLOCK, soft_bf16(dtype)), 4
    )
    return product, total, parts


def skinny_addmm(bias: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """bias ``[N]``, x ``[M, K]``, weight ``[K, N]``, any strides, K >= 1
    -> ``[M, N]`` in x's dtype, contiguous."""
    (M, K), N = x.shape, weight.shape[1]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    strides = (x.stride(), weight.stride(), bias.stride(0))
    product, total, parts = _plans(M, K, N, strides, x.dtype)
    if total is None:
        product.launch(x, weight, bias, out)
        return out
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = torch.empty(parts, M, N, dtype=acc_dtype, device=x.device)
    product.launch(x, weight, bias, partial)
    total.launch(partial, bias, out)
    return out
