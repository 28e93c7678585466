"""Triton kernels of mmrec::recurrence and mmrec::recurrence_backward (CUDA).

Per head, with W: [d, d] (row = output unit), h_{-1} = h0 (default 0):

    forward   a_t = W h_{t-1} + b,   s_t = sigmoid(a_t),   h_t = z_t * s_t + gamma_t * h_{t-1}
    backward  (t = T-1 .. 0, carry c_T = 0)
              g_t = grad_h_t + c_{t+1}
              grad_z_t = g_t * s_t,   grad_gamma_t = g_t * h_{t-1}
              da_t = g_t * z_t * s_t * (1 - s_t)
              c_t = gamma_t * g_t + W^T da_t,   grad_h0 = c_0
              grad_W = sum_{b,t} da_t (outer) h_{t-1},   grad_b = sum_{b,t} da_t

Kernels. One program per (tile of BLOCK_B batch rows, head) walks time; the
head's d x d weight is loaded once and stays on chip, and each step is a
[BLOCK_B, d] x [d, d] tl.dot (the tensor cores need BLOCK_B >= 16: rows past
B are masked, as are channels past d in the power-of-two BLOCK_D >= 16). The
state h (forward) and the carry c (backward) stay in float32 registers (float64
for float64): only the outputs are rounded to the storage dtype, never the
state fed back. The backward recomputes s_t from the saved h_{t-1} (one more
dot per step, off the dependent chain: it reads memory, not the carry) instead
of storing the gate (float64 at d > 64 excepted: there the host computes the
gate with one batched matmul and the kernel reads it, since that kernel cannot
hold W in both orientations, 2 x 128 KB, in shared memory). It accumulates
grad_W in a [d, d] register tile (a dot with K = BLOCK_B per step) and grad_b
in a [d] vector per program, in the accumulation dtype; programs of different
batch tiles write partials that the host sums.

Precision of the dots. For bfloat16/float16 the weight is exact in its storage
dtype, and an operand computed in float32 (h in the forward, da in the
backward) is split into two storage-dtype terms, x = hi + lo with
hi = x.to(dtype) and lo = (x - hi).to(dtype): two tensor-core dots with
float32 accumulation then give W x to about 2^-16 (bf16) / 2^-22 (fp16)
relative, far below one rounding of the output. The saved h_{t-1} the backward
reads is exact in the storage dtype and needs no split. float32 and float64 use
exact ("ieee") dots (tf32 would cost about 1e-3 relative).

Loads of z, gamma (and grad_h, h_{t-1} in the backward) do not depend on the
recurrence: they are kept in flight ahead of the dependent chain, either by
Triton's software pipelining (tl.range num_stages; the default, faster than the
prefetch wherever its buffers fit) or by issuing the next step's loads before the
current step is computed (PREFETCH, a register double buffer; float64 at
d = 128, where pipelining buffers do not fit in shared memory).

The kernels run far below the memory's rate (bench/results/recurrence_cuda_h100.md):
the time is the sequential chain of each step (dot, sigmoid, update, h's change of
layout from the dot's output to its input), one program per (16 batch rows, head)
walking all T steps.

This module does not import mmrec_ops: the callers validate the arguments.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import Plan, cast_out, cdiv, kernel_dtypes, next_power_of_2, soft_bf16

__all__ = ["recurrence_forward", "recurrence_backward", "check_head_width", "MAX_HEAD_DIM"]

# The largest head width d the kernels keep on chip (the weight tile and, in
# the backward, the grad_W accumulator are [BLOCK_D, BLOCK_D] per program).
MAX_HEAD_DIM = 128


@triton.jit
def _dot(x, w, SPLIT: tl.constexpr, LOW: tl.constexpr):
    """x @ w in the accumulation dtype, with x in that dtype and w exact in LOW.

    SPLIT (bfloat16/float16): x = hi + lo, both in LOW, two tensor-core dots.
    Otherwise w is in x's dtype and the dot is exact (ieee). The operands are
    cast to w's dtype, which under the interpreter is float32 for bfloat16
    (its numpy dot cannot multiply bfloat16): the split is still exercised.
    """
    if SPLIT:
        hi = x.to(LOW)
        lo = (x - hi.to(x.dtype)).to(LOW)
        # Two independent dots (not one accumulating chain): they overlap on
        # the tensor cores, and this product is on the dependent chain.
        return tl.dot(hi.to(w.dtype), w) + tl.dot(lo.to(w.dtype), w)
    else:
        return tl.dot(x, w, input_precision="ieee", out_dtype=x.dtype)


@triton.jit
def _dot_acc(x, w, acc, SPLIT: tl.constexpr, LOW: tl.constexpr):
    # acc + x @ w as _dot, accumulating in place: for a large accumulator off
    # the dependent chain (grad_W), where temporaries would cost registers.
    if SPLIT:
        hi = x.to(LOW)
        lo = (x - hi.to(x.dtype)).to(LOW)
        return tl.dot(lo.to(w.dtype), w, tl.dot(hi.to(w.dtype), w, acc))
    else:
        return tl.dot(x, w, acc, input_precision="ieee", out_dtype=acc.dtype)


@triton.jit
def _dot_exact(x, w, SPLIT: tl.constexpr):
    # x @ w with both operands exact in w's dtype (a saved h times the weight).
    if SPLIT:
        return tl.dot(x.to(w.dtype), w)
    else:
        return tl.dot(x, w, input_precision="ieee", out_dtype=x.dtype)


@triton.jit
def _load_weight(w_ptr, w_so, w_si, o, i, D, W_TY: tl.constexpr):
    # A [BLOCK_D, BLOCK_D] tile of W[o, i], its layout set by the shapes of the
    # index vectors o and i (a column and a row, either way round); zero-padded.
    w = tl.load(w_ptr + o * w_so + i * w_si, mask=(o < D) & (i < D), other=0.0)
    return w.to(W_TY)


@triton.jit
def _fwd_load(z_base, g_base, t, T, z_st, g_st, m):
    # z_t, gamma_t; a prefetch past the end (t = T) reads step T-1 again, unused.
    t64 = tl.minimum(tl.cast(t, tl.int64), T - 1)
    zt = tl.load(z_base + t64 * z_st, mask=m, other=0.0)
    gt = tl.load(g_base + t64 * g_st, mask=m, other=0.0)
    return zt, gt


@triton.jit
def _fwd_step(h, zt, gt, wt, bias, h_base, t, h_st, m, SPLIT: tl.constexpr, LOW: tl.constexpr, SOFT_BF16: tl.constexpr):
    s = tl.sigmoid(_dot(h, wt, SPLIT, LOW) + bias)
    h = zt.to(h.dtype) * s + gt.to(h.dtype) * h
    tl.store(h_base + tl.cast(t, tl.int64) * h_st, cast_out(h, h_base, SOFT_BF16), mask=m)
    return h


@triton.jit(do_not_specialize=["B", "T"])
def _recurrence_fwd_kernel(
    z_ptr,
    g_ptr,
    w_ptr,
    b_ptr,
    h0_ptr,
    h_ptr,
    B,
    T,
    D,
    z_sb,
    z_st,
    z_sh,
    z_sd,
    g_sb,
    g_st,
    g_sh,
    g_sd,
    w_sh,
    w_so,
    w_si,
    b_sh,
    b_sd,
    h0_sb,
    h0_sh,
    h0_sd,
    h_sb,
    h_st,
    h_sh,
    h_sd,
    HAS_BIAS: tl.constexpr,
    HAS_H0: tl.constexpr,
    ACC: tl.constexpr,
    SPLIT: tl.constexpr,
    LOW: tl.constexpr,
    W_TY: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREFETCH: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    pid_b = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    rows = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)[None, :]
    cmask = cols < D
    m = (rows < B) & cmask

    # W^T as the dot's right operand: wt[i, o] = W[o, i].
    ii = tl.arange(0, BLOCK_D)[:, None]
    wt = _load_weight(w_ptr + head * w_sh, w_so, w_si, cols, ii, D, W_TY)
    if HAS_BIAS:
        bias = tl.load(b_ptr + head * b_sh + cols * b_sd, mask=cmask, other=0.0).to(ACC)
    else:
        bias = tl.zeros([1, BLOCK_D], ACC)
    if HAS_H0:
        h = tl.load(h0_ptr + rows * h0_sb + head * h0_sh + cols * h0_sd, mask=m, other=0.0).to(ACC)
    else:
        h = tl.zeros([BLOCK_B, BLOCK_D], ACC)

    z_base = z_ptr + rows * z_sb + head * z_sh + cols * z_sd
    g_base = g_ptr + rows * g_sb + head * g_sh + cols * g_sd
    h_base = h_ptr + rows * h_sb + head * h_sh + cols * h_sd
    if PREFETCH:
        zn, gn = _fwd_load(z_base, g_base, 0, T, z_st, g_st, m)
        for t in range(0, T):
            zt = zn
            gt = gn
            zn, gn = _fwd_load(z_base, g_base, t + 1, T, z_st, g_st, m)
            h = _fwd_step(h, zt, gt, wt, bias, h_base, t, h_st, m, SPLIT, LOW, SOFT_BF16)
    else:
        for t in tl.range(0, T, num_stages=NUM_STAGES):
            zt, gt = _fwd_load(z_base, g_base, t, T, z_st, g_st, m)
            h = _fwd_step(h, zt, gt, wt, bias, h_base, t, h_st, m, SPLIT, LOW, SOFT_BF16)


@triton.jit
def _bwd_load(
    gh_base, z_base, g_base, h_base, s_base, h0v, t, gh_st, z_st, g_st, h_st, s_st, m, STORED_GATE: tl.constexpr
):
    # The inputs of step t: grad_h_t, z_t, gamma_t, h_{t-1} (h0 at t = 0) and,
    # with STORED_GATE, s_t, in their storage dtype. A prefetch past the end
    # (t = -1) reads step 0 again, unused.
    t64 = tl.maximum(tl.cast(t, tl.int64), 0)
    gh = tl.load(gh_base + t64 * gh_st, mask=m, other=0.0)
    zt = tl.load(z_base + t64 * z_st, mask=m, other=0.0)
    gt = tl.load(g_base + t64 * g_st, mask=m, other=0.0)
    hp = tl.load(h_base + tl.maximum(t64 - 1, 0) * h_st, mask=m, other=0.0)
    hp = tl.where(t64 == 0, h0v, hp)
    if STORED_GATE:
        sg = tl.load(s_base + t64 * s_st, mask=m, other=0.0)
    else:
        sg = hp  # unused: _bwd_step recomputes the gate from hp
    return gh, zt, gt, hp, sg


@triton.jit
def _bwd_step(
    c,
    dw,
    db,
    gh,
    zt,
    gt,
    hp,
    sg,
    wt,
    w,
    bias,
    dz_base,
    dg_base,
    t,
    o_st,
    m,
    SPLIT: tl.constexpr,
    LOW: tl.constexpr,
    ACC: tl.constexpr,
    STORED_GATE: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    if STORED_GATE:
        s = sg.to(ACC)
    else:
        s = tl.sigmoid(_dot_exact(hp, wt, SPLIT) + bias)
    g = gh.to(ACC) + c
    hpa = hp.to(ACC)
    t64 = tl.cast(t, tl.int64)
    tl.store(dz_base + t64 * o_st, cast_out(g * s, dz_base, SOFT_BF16), mask=m)
    tl.store(dg_base + t64 * o_st, cast_out(g * hpa, dg_base, SOFT_BF16), mask=m)
    da = g * zt.to(ACC) * s * (1.0 - s)
    c = gt.to(ACC) * g + _dot(da, w, SPLIT, LOW)
    # grad_W[o, i] += sum_b da[b, o] * h_{t-1}[b, i]; h_{t-1} is exact in w's dtype.
    dw = _dot_acc(tl.trans(da), hp.to(w.dtype), dw, SPLIT, LOW)
    db += tl.sum(da, axis=0, keep_dims=True)
    return c, dw, db


@triton.jit(do_not_specialize=["B", "T"])
def _recurrence_bwd_kernel(
    gh_ptr,
    z_ptr,
    g_ptr,
    w_ptr,
    b_ptr,
    h0_ptr,
    h_ptr,
    s_ptr,
    dz_ptr,
    dg_ptr,
    dw_ptr,
    db_ptr,
    dh0_ptr,
    B,
    T,
    D,
    gh_sb,
    gh_st,
    gh_sh,
    gh_sd,
    z_sb,
    z_st,
    z_sh,
    z_sd,
    g_sb,
    g_st,
    g_sh,
    g_sd,
    w_sh,
    w_so,
    w_si,
    b_sh,
    b_sd,
    h0_sb,
    h0_sh,
    h0_sd,
    h_sb,
    h_st,
    h_sh,
    h_sd,
    s_sb,
    s_st,
    s_sh,
    s_sd,
    o_sb,
    o_st,
    o_sh,
    o_sd,
    d0_sb,
    d0_sh,
    d0_sd,
    HAS_BIAS: tl.constexpr,
    HAS_H0: tl.constexpr,
    ACC: tl.constexpr,
    SPLIT: tl.constexpr,
    LOW: tl.constexpr,
    W_TY: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STORED_GATE: tl.constexpr,
    PREFETCH: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    pid_b = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    rows = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)[None, :]
    cmask = cols < D
    m = (rows < B) & cmask

    ii = tl.arange(0, BLOCK_D)[:, None]
    w = _load_weight(w_ptr + head * w_sh, w_so, w_si, ii, cols, D, W_TY)  # w[o, i] = W[o, i]
    if STORED_GATE:
        wt = w  # unused: the gate is read
    else:
        wt = tl.trans(w)
    if HAS_BIAS:
        bias = tl.load(b_ptr + head * b_sh + cols * b_sd, mask=cmask, other=0.0).to(ACC)
    else:
        bias = tl.zeros([1, BLOCK_D], ACC)
    if HAS_H0:
        h0v = tl.load(h0_ptr + rows * h0_sb + head * h0_sh + cols * h0_sd, mask=m, other=0.0)
    else:
        h0v = tl.zeros([BLOCK_B, BLOCK_D], h_ptr.dtype.element_ty)

    gh_base = gh_ptr + rows * gh_sb + head * gh_sh + cols * gh_sd
    z_base = z_ptr + rows * z_sb + head * z_sh + cols * z_sd
    g_base = g_ptr + rows * g_sb + head * g_sh + cols * g_sd
    h_base = h_ptr + rows * h_sb + head * h_sh + cols * h_sd
    dz_base = dz_ptr + rows * o_sb + head * o_sh + cols * o_sd
    dg_base = dg_ptr + rows * o_sb + head * o_sh + cols * o_sd
    s_base = s_ptr + rows * s_sb + head * s_sh + cols * s_sd

    c = tl.zeros([BLOCK_B, BLOCK_D], ACC)
    dw = tl.zeros([BLOCK_D, BLOCK_D], ACC)
    db = tl.zeros([1, BLOCK_D], ACC)
    if PREFETCH:
        ghn, zn, gn, hpn, sn = _bwd_load(
            gh_base, z_base, g_base, h_base, s_base, h0v, T - 1, gh_st, z_st, g_st, h_st, s_st, m, STORED_GATE
        )
        for r in range(0, T):
            t = T - 1 - r
            gh = ghn
            zt = zn
            gt = gn
            hp = hpn
            sg = sn
            ghn, zn, gn, hpn, sn = _bwd_load(
                gh_base, z_base, g_base, h_base, s_base, h0v, t - 1, gh_st, z_st, g_st, h_st, s_st, m, STORED_GATE
            )
            c, dw, db = _bwd_step(
                c,
                dw,
                db,
                gh,
                zt,
                gt,
                hp,
                sg,
                wt,
                w,
                bias,
                dz_base,
                dg_base,
                t,
                o_st,
                m,
                SPLIT,
                LOW,
                ACC,
                STORED_GATE,
                SOFT_BF16,
            )
    else:
        for r in tl.range(0, T, num_stages=NUM_STAGES):
            t = T - 1 - r
            gh, zt, gt, hp, sg = _bwd_load(
                gh_base, z_base, g_base, h_base, s_base, h0v, t, gh_st, z_st, g_st, h_st, s_st, m, STORED_GATE
            )
            c, dw, db = _bwd_step(
                c,
                dw,
                db,
                gh,
                zt,
                gt,
                hp,
                sg,
                wt,
                w,
                bias,
                dz_base,
                dg_base,
                t,
                o_st,
                m,
                SPLIT,
                LOW,
                ACC,
                STORED_GATE,
                SOFT_BF16,
            )

    # grad_h0 = c_0; this program's partial sums of grad_W and grad_b.
    tl.store(dh0_ptr + rows * d0_sb + head * d0_sh + cols * d0_sd, cast_out(c, dh0_ptr, SOFT_BF16), mask=m)
    H = tl.num_programs(1)
    part = pid_b * H + head
    tl.store(dw_ptr + (part * BLOCK_D + ii) * BLOCK_D + cols, dw)
    tl.store(db_ptr + part * BLOCK_D + cols, db)


# ----------------------------------------------------------------------------
# Host side: block sizes, launch plans (_common.py), the partial sums of grad_W
# and grad_b. Everything that follows from the shapes, strides and dtype is one
# cached Plan per kernel, so a call computes no block size or grid.

# Tuning, measured on an H100 (bench/results/recurrence_cuda_h100.md). One
# program per 16 batch rows (_BLOCK_B: the smallest tensor-core tile, so the
# most programs for a given B). Per element size in bytes, then BLOCK_D:
# (forward warps, forward stages, backward warps, backward stages), where
# k > 0 stages is tl.range(num_stages=k) and 0 the register prefetch of the
# next step. At bfloat16 and d = 64, 4 stages beat the prefetch in both
# kernels, and 4 warps beat 2 and 8. float64 at d = 128 keeps the prefetch: pipelining buffers next to
# its 128 KB weight tile would exceed the 227 KB of shared memory.
# The plans are cached: call _clear_plans() after changing a knob.
_BLOCK_B = 16
_CONFIG = {
    2: {16: (4, 4, 4, 4), 32: (4, 4, 4, 4), 64: (4, 4, 4, 4), 128: (8, 4, 8, 4)},
    4: {16: (4, 4, 4, 4), 32: (4, 4, 4, 4), 64: (4, 4, 4, 4), 128: (8, 4, 16, 4)},
    8: {16: (4, 4, 4, 4), 32: (4, 4, 4, 4), 64: (4, 4, 8, 4), 128: (8, 0, 16, 0)},
}


def _pipelining(stages: int):
    """(PREFETCH, NUM_STAGES) kernel arguments for a stage setting."""
    if stages == 0:
        return True, 1
    return False, stages


def check_head_width(d: int) -> None:
    """Refuses a head width the kernels cannot keep on chip. The op's fake
    kernel calls it for CUDA tensors, so that a compiled graph fails when it is
    traced, with this message, rather than when it launches."""
    if d > MAX_HEAD_DIM:
        raise ValueError(f"mmrec::recurrence on CUDA: head width d = {d} exceeds the supported {MAX_HEAD_DIM}")


def _block_d(d: int) -> int:
    check_head_width(d)
    return max(16, next_power_of_2(d))


def _dtype_args(dtype: torch.dtype):
    """(ACC, SPLIT, LOW, W_TY) kernel arguments for a storage dtype."""
    storage, acc = kernel_dtypes(dtype)
    split = dtype in (torch.bfloat16, torch.float16)
    # The interpreter's numpy dot cannot multiply bfloat16: float32 operands
    # holding the same (exact) values.
    w_ty = tl.float32 if soft_bf16(dtype) else storage
    return acc, split, storage, w_ty


def _stores_gate(dtype: torch.dtype, block_d: int) -> bool:
    """float64 at d > 64: the backward kernel cannot keep the two orientations
    of W it reads in shared memory (2 x 128 KB), so it reads the gate instead."""
    return dtype == torch.float64 and block_d > 64


def _contiguous_strides(sizes) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(sizes):
        strides.append(acc)
        acc *= n
    return tuple(strides[::-1])


def _param_strides(w_st, b_st, h0_st) -> tuple[int, ...]:
    # The strides of weight, bias and h0; zeros for an omitted one.
    return (*w_st, *(b_st or (0, 0)), *(h0_st or (0, 0, 0)))


@functools.lru_cache(maxsize=512)
def _forward_plan(shape, z_st, g_st, w_st, b_st, h0_st, dtype) -> Plan:
    """The plan of recurrence_forward for z's shape, the strides of z, gamma,
    weight, bias and h0 (None when omitted) and the dtype."""
    B, T, H, D = shape
    block_d = _block_d(D)
    num_warps, stages, _, _ = _CONFIG[dtype.itemsize][block_d]
    ints = (B, T, D, *z_st, *g_st, *_param_strides(w_st, b_st, h0_st), *_contiguous_strides(shape))
    constexprs = (
        b_st is not None,
        h0_st is not None,
        *_dtype_args(dtype),
        _BLOCK_B,
        block_d,
        *_pipelining(stages),
        soft_bf16(dtype),
    )
    return Plan(_recurrence_fwd_kernel, (cdiv(B, _BLOCK_B), H), ints, constexprs, num_warps)


@functools.lru_cache(maxsize=512)
def _backward_plan(shape, gh_st, z_st, g_st, w_st, b_st, h0_st, h_st, dtype) -> tuple[Plan, int]:
    """The plan of recurrence_backward (see _forward_plan) and its BLOCK_D. The
    outputs, and the gate when the kernel reads one, are contiguous."""
    B, T, H, D = shape
    block_d = _block_d(D)
    _, _, num_warps, stages = _CONFIG[dtype.itemsize][block_d]
    stored_gate = _stores_gate(dtype, block_d)
    seq = _contiguous_strides(shape)
    ints = (
        B,
        T,
        D,
        *gh_st,
        *z_st,
        *g_st,
        *_param_strides(w_st, b_st, h0_st),
        *h_st,
        *(seq if stored_gate else (0, 0, 0, 0)),
        *seq,
        *_contiguous_strides((B, H, D)),
    )
    constexprs = (
        b_st is not None,
        h0_st is not None,
        *_dtype_args(dtype),
        _BLOCK_B,
        block_d,
        stored_gate,
        *_pipelining(stages),
        soft_bf16(dtype),
    )
    return Plan(_recurrence_bwd_kernel, (cdiv(B, _BLOCK_B), H), ints, constexprs, num_warps), block_d


def _clear_plans() -> None:
    """Forget the cached plans (after a change of the tuning knobs)."""
    _forward_plan.cache_clear()
    _backward_plan.cache_clear()


def _strides(t: Tensor | None):
    return None if t is None else t.stride()


def _stored_gate(z: Tensor, weight: Tensor, bias: Tensor | None, h0: Tensor | None, h: Tensor) -> Tensor:
    """s_t = sigmoid(W h_{t-1} + b) for all t, one batched matmul, contiguous
    [B, T, H, d] (see _stores_gate)."""
    first = h0.unsqueeze(1) if h0 is not None else torch.zeros_like(h[:, :1])
    h_prev = torch.cat([first, h[:, :-1]], dim=1)
    pre = torch.einsum("hoi,bthi->btho", weight, h_prev)
    return torch.sigmoid(pre + bias if bias is not None else pre).contiguous()


def recurrence_forward(z: Tensor, gamma: Tensor, weight: Tensor, bias: Tensor | None, h0: Tensor | None) -> Tensor:
    """h: [B, T, H, d], a new contiguous tensor; see the module docstring for the formula.

    z, gamma: [B, T, H, d]; weight: [H, d, d]; bias: [H, d] or None; h0: [B, H, d]
    or None (0); any strides, one dtype and CUDA device (validated by the caller).
    """
    h = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    if h.numel() == 0:
        return h
    plan = _forward_plan(z.shape, z.stride(), gamma.stride(), weight.stride(), _strides(bias), _strides(h0), z.dtype)
    plan.launch(z, gamma, weight, weight if bias is None else bias, z if h0 is None else h0, h)
    return h


def recurrence_backward(
    grad_h: Tensor, z: Tensor, gamma: Tensor, weight: Tensor, bias: Tensor | None, h0: Tensor | None, h: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_z, grad_gamma, grad_weight, grad_bias, grad_h0), new contiguous tensors in z's dtype.

    grad_h, h: [B, T, H, d] (h the forward's output); the other arguments as in
    recurrence_forward. grad_bias [H, d] and grad_h0 [B, H, d] are returned even
    when bias / h0 are None (a zero h0 then).
    """
    B, T, H, D = z.shape
    dtype, device = z.dtype, z.device
    grad_z = torch.empty(z.shape, dtype=dtype, device=device)
    grad_gamma = torch.empty(z.shape, dtype=dtype, device=device)
    if grad_z.numel() == 0:
        # No step, or nothing to compute: the sums are empty and c_0 = c_T = 0.
        return (
            grad_z,
            grad_gamma,
            torch.zeros(H, D, D, dtype=dtype, device=device),
            torch.zeros(H, D, dtype=dtype, device=device),
            torch.zeros(B, H, D, dtype=dtype, device=device),
        )
    grad_h0 = torch.empty(B, H, D, dtype=dtype, device=device)
    plan, block_d = _backward_plan(
        z.shape,
        grad_h.stride(),
        z.stride(),
        gamma.stride(),
        weight.stride(),
        _strides(bias),
        _strides(h0),
        h.stride(),
        dtype,
    )
    gate = _stored_gate(z, weight, bias, h0, h) if _stores_gate(dtype, block_d) else None
    part_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tiles = plan.grid[0]
    dw_part = torch.empty(tiles, H, block_d, block_d, dtype=part_dtype, device=device)
    db_part = torch.empty(tiles, H, block_d, dtype=part_dtype, device=device)
    plan.launch(
        grad_h,
        z,
        gamma,
        weight,
        weight if bias is None else bias,
        z if h0 is None else h0,
        h,
        z if gate is None else gate,
        grad_z,
        grad_gamma,
        dw_part,
        db_part,
        grad_h0,
    )
    grad_weight = dw_part[:, :, :D, :D].sum(0).to(dtype)
    grad_bias = db_part[:, :, :D].sum(0).to(dtype)
    return grad_z, grad_gamma, grad_weight, grad_bias, grad_h0
