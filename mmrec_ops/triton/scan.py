"""Triton kernels of mmrec::scan and mmrec::scan_backward (CUDA).

    forward   h_t = gamma_t * h_{t-1} + x_t                  (reverse: h_{t+1})
    backward  dx_t = grad_h_t + gamma_{t+1} * dx_{t+1}        (reverse: t-1)
              dgamma_t = dx_t * h_{t-1},  grad_h0 = gamma_0 * dx_0

Layout. A sequence tensor is [B, T, ...]. The trailing channel dims of all the
tensors of one call are folded jointly into at most two dims [G, C], each with
one stride per tensor (the inputs are made contiguous only when more than two
groups remain), so a contiguous [B, T, H, d] is [B, T, 1, H*d] and its
[B, H, T, d].transpose(1, 2) view is [B, T, H, d] with time stride d.

Kernels. One program per (b, g, block of BLOCK_C channels) walks time in
tiles of R * NT steps, in the order in which the recurrence runs (a reverse
scan indexes its tiles with descending time, so the in-tile scan always runs
along increasing tile positions; no T-dependent constexpr: T is a runtime int
and is not specialized). A tile is [NT, R, BLOCK_C]: step s0 + n * R + r; the
threads cover the channels with 16-byte vectors and NT rows of steps, each
thread holding the R consecutive steps of its row in registers (R sits on the
middle dim because Triton 3.6 gives a tile's lanes to the contiguous dim and
then to dim 0: [R, NT, C] put R across lanes). It is scanned on the affine
maps h -> a * h + b, composed as (a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2):
with R > 1 (the tuned default but for float64) sequentially in registers along
r, then across the rows on the row totals (one tl.associative_scan that also
gives the exclusive prefix); with R = 1 by one scan across the rows. The carry
of the previous tile is folded in (h = A * carry + B) and the last step
becomes the next carry; the backward pads steps past the end with the
identity map (1, 0), so that the last step of every tile holds it (the
forward pads them with zeros, as cp.async fills masked elements: only its
last tile has such steps, and the carry it leaves is not used). Addresses are
a program's scalar base pointers, plus a tile's first time step (scalar), plus
element offsets from there that do not change from tile to tile (int32, or
int64 when a stride makes them overflow int32; one set for all tensors when
their strides agree). Loads are kept in flight either by Triton's software
pipelining (tl.range num_stages, cp.async) or by issuing the next tile's loads
before the current tile is scanned (a register double buffer).
The backward is one fused kernel walking time the other way: the scan of
grad_h with gamma shifted by one step (a masked load of the neighbouring row),
dgamma = dx * h_prev with h shifted by one step (h0, or its implicit 0 / 1, at
the boundary), and grad_h0 = gamma_first * dx_first after the last tile; it
reads grad_h, gamma, h (and h0) once and writes each output once.
Accumulation is in float32 (float64 for float64 inputs); outputs are new
contiguous tensors in the inputs' dtype.

Why this shape of kernel: R consecutive steps per thread (R = 8 in bfloat16)
cut the instructions per element, which with R = 1 are mostly the cross-thread
scan; channel blocks of 64 (128-byte rows of bfloat16: a whole cache line per
time step) with one program per SM beat blocks of 32 with two. More stages,
more or fewer warps, R = 4 or 16 and blocks of 128 channels measured slower
(the sweeps: bench/results/tune_scan_rows_h100.json and
tune_scan_blocks_h100.json); other kernels tried and not adopted are listed in
bench/results/decisions.md.

Host path. The launch plans are cached and launched directly (_common.py),
which costs a fraction of the host time of JITFunction.run's per-call
specialisation. A small forward+backward through autograd stays host-bound:
torch's autograd engine runs CUDA backward nodes on its device thread, and that
hand-off and back is most of what remains.
Figures through the op, beside a copy of the same bytes: bench/results/scan_cuda_h100.md.

This module does not import mmrec_ops: the callers validate the arguments.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, Plan, cast_out, cdiv, kernel_dtypes, next_power_of_2, num_sms, soft_bf16

__all__ = ["scan_forward", "scan_backward"]


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # Apply (a1, b1) first, then (a2, b2): h -> a2 * (a1 * h + b1) + b2.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _affine_combine_excl(a1, b1, e1a, e1b, a2, b2, e2a, e2b):
    # Elements are (whole segment, segment without its last step), both affine
    # maps; a single step (a, b) starts as ((a, b), identity). The second part of
    # an inclusive scan is then the exclusive scan.
    return a1 * a2, a2 * b1 + b2, a1 * e2a, e2a * b1 + e2b


@triton.jit
def _mul_combine_excl(a1, e1, a2, e2):
    return a1 * a2, a1 * e2


@triton.jit
def _second(a1, b1, a2, b2):
    return a2, b2


@triton.jit
def _tile_scan(a, b, carry, n, R: tl.constexpr, NT: tl.constexpr, HAS_B: tl.constexpr):
    """Scan of one tile [NT, R, BLOCK_C], step s = s0 + n * R + r, carry [1, 1, BLOCK_C].

    Each thread holds the R consecutive steps of its (n, channels): they are
    scanned in registers, the NT chunk totals across the threads (one scan that
    also yields the exclusive prefix), and the two are combined. Returns the
    tile's values and the carry for the next tile (the value at the last step).
    """
    if R == 1:
        # One step per thread and tile row: a plain scan across the threads.
        if HAS_B:
            pa, pb = tl.associative_scan((a, b), 0, _affine_combine)
            h = pa * carry + pb
        else:
            h = tl.cumprod(a, 0) * carry
        carry = tl.sum(tl.where(n == NT - 1, h, 0.0), axis=0, keep_dims=True)
        return h, carry
    if HAS_B:
        pa, pb = tl.associative_scan((a, b), 1, _affine_combine)
    else:
        pa = tl.cumprod(a, 1)
        pb = pa
    # The row totals are the scans' last steps; R lies within a thread, so
    # this reduction (in step order) only picks registers.
    ta, tb = tl.reduce((pa, pb), 1, _second, keep_dims=True)
    if HAS_B:
        ia, ib, ea, eb = tl.associative_scan(
            (ta, tb, tl.full(ta.shape, 1.0, ta.dtype), tl.zeros(ta.shape, ta.dtype)), 0, _affine_combine_excl
        )
        h = pa * (ea * carry + eb) + pb
        carry = tl.sum(tl.where(n == NT - 1, ia * carry + ib, 0.0), axis=0, keep_dims=True)
    else:
        ia, ea = tl.associative_scan((ta, tl.full(ta.shape, 1.0, ta.dtype)), 0, _mul_combine_excl)
        h = pa * (ea * carry)
        carry = tl.sum(tl.where(n == NT - 1, ia, 0.0), axis=0, keep_dims=True) * carry
    return h, carry


@triton.jit
def _time_at(s0, T, REVERSE: tl.constexpr):
    # The time of processing step s0 (the start of a tile).
    if REVERSE:
        return tl.cast(T - 1 - s0, tl.int64)
    else:
        return tl.cast(s0, tl.int64)


@triton.jit
def _offsets(k, j, st, sc, REVERSE: tl.constexpr, OFF64: tl.constexpr):
    # Element offsets within a tile from its first step: step k of the tile
    # (time moves by -st per step in reverse) and channel j. int32 unless the
    # host found that they may overflow it.
    if OFF64:
        k = k.to(tl.int64)
        j = j.to(tl.int64)
    if REVERSE:
        return j * sc - k * st
    else:
        return k * st + j * sc


@triton.jit
def _program_tile(G, C, NCB, R: tl.constexpr, NT: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's batch row b, channel group g and first channel c0 (int64
    scalars), and the index tensors of its tiles: row n ([NT, 1, 1]), step
    k = n * R + r within the tile (r the step within the row), channel j
    ([1, 1, BLOCK_C]) and the mask of the channels that exist."""
    pid = tl.program_id(0)
    cb = pid % NCB
    bg = pid // NCB
    g = (bg % G).to(tl.int64)
    b = (bg // G).to(tl.int64)
    c0 = (cb * BLOCK_C).to(tl.int64)
    n = tl.arange(0, NT)[:, None, None]
    r = tl.arange(0, R)[None, :, None]
    j = tl.arange(0, BLOCK_C)[None, None, :]
    return b, g, c0, n, n * R + r, j, j < C - cb * BLOCK_C


@triton.jit
def _fwd_load(g_tile, x_tile, g_off, x_off, m, HAS_X: tl.constexpr):
    # Masked elements are zero (rather than the identity map) as cp.async
    # fills them, which saves a select per element: only the last tile has
    # steps past the end, and the carry it leaves is not used.
    a = tl.load(g_tile + g_off, mask=m, other=0.0)
    if HAS_X:
        b = tl.load(x_tile + x_off, mask=m, other=0.0)
    else:
        b = a
    return a, b


@triton.jit(do_not_specialize=["T"])
def _scan_fwd_kernel(
    g_ptr,
    x_ptr,
    h0_ptr,
    o_ptr,
    T,
    G,
    C,
    NCB,
    g_sb,
    g_st,
    g_sg,
    g_sc,
    x_sb,
    x_st,
    x_sg,
    x_sc,
    h0_sb,
    h0_sg,
    h0_sc,
    o_sb,
    o_st,
    o_sg,
    o_sc,
    HAS_X: tl.constexpr,
    HAS_H0: tl.constexpr,
    H0_VALUE: tl.constexpr,
    REVERSE: tl.constexpr,
    ACC: tl.constexpr,
    R: tl.constexpr,
    NT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PREFETCH: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    OFF64: tl.constexpr,
    SHARED_OFFSETS: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    BLOCK_T: tl.constexpr = R * NT
    b, g, c0, n, k, j, cm = _program_tile(G, C, NCB, R, NT, BLOCK_C)

    # Scalar bases of this program's (b, g, channel block); a tile adds its
    # first time, its elements the loop-invariant offsets.
    g_base = g_ptr + (b * g_sb + g * g_sg + c0 * g_sc)
    x_base = x_ptr + (b * x_sb + g * x_sg + c0 * x_sc)
    o_base = o_ptr + (b * o_sb + g * o_sg + c0 * o_sc)
    g_off = _offsets(k, j, g_st, g_sc, REVERSE, OFF64)
    if SHARED_OFFSETS:  # one set of registers when the strides agree
        x_off = g_off
        o_off = g_off
    else:
        x_off = _offsets(k, j, x_st, x_sc, REVERSE, OFF64)
        o_off = _offsets(k, j, o_st, o_sc, REVERSE, OFF64)

    if HAS_H0:
        carry = tl.load(h0_ptr + (b * h0_sb + g * h0_sg + c0 * h0_sc) + j * h0_sc, mask=cm, other=0.0).to(ACC)
    else:
        carry = tl.full([1, 1, BLOCK_C], H0_VALUE, ACC)

    if PREFETCH:
        t0 = _time_at(0, T, REVERSE)
        a_n, b_n = _fwd_load(g_base + t0 * g_st, x_base + t0 * x_st, g_off, x_off, (k < T) & cm, HAS_X)
        for s0 in range(0, T, BLOCK_T):
            a_c = a_n
            b_c = b_n
            t1 = _time_at(s0 + BLOCK_T, T, REVERSE)
            a_n, b_n = _fwd_load(
                g_base + t1 * g_st, x_base + t1 * x_st, g_off, x_off, (k < T - s0 - BLOCK_T) & cm, HAS_X
            )
            h, carry = _tile_scan(a_c.to(ACC), b_c.to(ACC), carry, n, R, NT, HAS_X)
            o_tile = o_base + _time_at(s0, T, REVERSE) * o_st
            tl.store(o_tile + o_off, cast_out(h, o_ptr, SOFT_BF16), mask=(k < T - s0) & cm)
    else:
        for s0 in tl.range(0, T, BLOCK_T, num_stages=NUM_STAGES):
            t0 = _time_at(s0, T, REVERSE)
            m = (k < T - s0) & cm
            a_c, b_c = _fwd_load(g_base + t0 * g_st, x_base + t0 * x_st, g_off, x_off, m, HAS_X)
            h, carry = _tile_scan(a_c.to(ACC), b_c.to(ACC), carry, n, R, NT, HAS_X)
            tl.store(o_base + t0 * o_st + o_off, cast_out(h, o_ptr, SOFT_BF16), mask=m)


@triton.jit
def _bwd_load(gh_base, g_base, h_base, s0, T, gh_st, g_st, h_st, gh_off, g_off, h_off, k, cm, REVERSE: tl.constexpr):
    # The backward visits time in the opposite order of the forward: step s is
    # t = map(s). a(s) = gamma at the time visited at step s - 1 (the forward's
    # next time), hp(s) = h at the time visited at step s + 1 (the forward's
    # previous time). The offsets run in the backward's direction.
    t = _time_at(s0, T, not REVERSE)
    if REVERSE:
        t_next = t - 1  # the forward ran t = T-1 .. 0
        t_prev = t + 1
    else:
        t_next = t + 1
        t_prev = t - 1
    gh = tl.load(gh_base + t * gh_st + gh_off, mask=(k < T - s0) & cm, other=0.0)
    a = tl.load(g_base + t_next * g_st + g_off, mask=((k >= 1 - s0) & (k < T - s0)) & cm, other=1.0)
    hp = tl.load(h_base + t_prev * h_st + h_off, mask=(k < T - 1 - s0) & cm, other=0.0)
    return gh, a, hp


@triton.jit
def _bwd_tile(
    gh,
    a,
    hp,
    carry,
    h0v,
    dg_base,
    dx_base,
    s0,
    T,
    o_st,
    o_off,
    k,
    n,
    cm,
    R: tl.constexpr,
    NT: tl.constexpr,
    REVERSE: tl.constexpr,
    ACC: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    dx, carry = _tile_scan(a.to(ACC), gh.to(ACC), carry, n, R, NT, True)
    hp = tl.where(k == T - 1 - s0, h0v, hp.to(ACC))
    m = (k < T - s0) & cm
    t = _time_at(s0, T, not REVERSE)
    tl.store(dg_base + t * o_st + o_off, cast_out(dx * hp, dg_base, SOFT_BF16), mask=m)
    tl.store(dx_base + t * o_st + o_off, cast_out(dx, dx_base, SOFT_BF16), mask=m)
    return carry


@triton.jit(do_not_specialize=["T"])
def _scan_bwd_kernel(
    gh_ptr,
    g_ptr,
    h_ptr,
    h0_ptr,
    dg_ptr,
    dx_ptr,
    dh0_ptr,
    T,
    G,
    C,
    NCB,
    gh_sb,
    gh_st,
    gh_sg,
    gh_sc,
    g_sb,
    g_st,
    g_sg,
    g_sc,
    h_sb,
    h_st,
    h_sg,
    h_sc,
    h0_sb,
    h0_sg,
    h0_sc,
    o_sb,
    o_st,
    o_sg,
    o_sc,
    d0_sb,
    d0_sg,
    d0_sc,
    HAS_H0: tl.constexpr,
    H0_VALUE: tl.constexpr,
    REVERSE: tl.constexpr,
    ACC: tl.constexpr,
    R: tl.constexpr,
    NT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PREFETCH: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    OFF64: tl.constexpr,
    SHARED_OFFSETS: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    BLOCK_T: tl.constexpr = R * NT
    b, g, c0, n, k, j, cm = _program_tile(G, C, NCB, R, NT, BLOCK_C)

    gh_base = gh_ptr + (b * gh_sb + g * gh_sg + c0 * gh_sc)
    g_base = g_ptr + (b * g_sb + g * g_sg + c0 * g_sc)
    h_base = h_ptr + (b * h_sb + g * h_sg + c0 * h_sc)
    dg_base = dg_ptr + (b * o_sb + g * o_sg + c0 * o_sc)
    dx_base = dx_ptr + (b * o_sb + g * o_sg + c0 * o_sc)
    # Offsets in the backward's direction of time (that of a forward scan in
    # the other direction).
    gh_off = _offsets(k, j, gh_st, gh_sc, not REVERSE, OFF64)
    if SHARED_OFFSETS:  # one set of registers when the strides agree
        g_off = gh_off
        h_off = gh_off
        o_off = gh_off
    else:
        g_off = _offsets(k, j, g_st, g_sc, not REVERSE, OFF64)
        h_off = _offsets(k, j, h_st, h_sc, not REVERSE, OFF64)
        o_off = _offsets(k, j, o_st, o_sc, not REVERSE, OFF64)

    if HAS_H0:
        h0v = tl.load(h0_ptr + (b * h0_sb + g * h0_sg + c0 * h0_sc) + j * h0_sc, mask=cm, other=0.0).to(ACC)
    else:
        h0v = tl.full([1, 1, BLOCK_C], H0_VALUE, ACC)
    carry = tl.zeros([1, 1, BLOCK_C], ACC)

    if PREFETCH:
        gh_n, a_n, hp_n = _bwd_load(
            gh_base, g_base, h_base, 0, T, gh_st, g_st, h_st, gh_off, g_off, h_off, k, cm, REVERSE
        )
        for s0 in range(0, T, BLOCK_T):
            gh_c = gh_n
            a_c = a_n
            hp_c = hp_n
            gh_n, a_n, hp_n = _bwd_load(
                gh_base, g_base, h_base, s0 + BLOCK_T, T, gh_st, g_st, h_st, gh_off, g_off, h_off, k, cm, REVERSE
            )
            carry = _bwd_tile(
                gh_c,
                a_c,
                hp_c,
                carry,
                h0v,
                dg_base,
                dx_base,
                s0,
                T,
                o_st,
                o_off,
                k,
                n,
                cm,
                R,
                NT,
                REVERSE,
                ACC,
                SOFT_BF16,
            )
    else:
        for s0 in tl.range(0, T, BLOCK_T, num_stages=NUM_STAGES):
            gh_c, a_c, hp_c = _bwd_load(
                gh_base, g_base, h_base, s0, T, gh_st, g_st, h_st, gh_off, g_off, h_off, k, cm, REVERSE
            )
            carry = _bwd_tile(
                gh_c,
                a_c,
                hp_c,
                carry,
                h0v,
                dg_base,
                dx_base,
                s0,
                T,
                o_st,
                o_off,
                k,
                n,
                cm,
                R,
                NT,
                REVERSE,
                ACC,
                SOFT_BF16,
            )

    # grad_h0 = gamma at the forward's first time * dx there (the last step visited).
    g_first_ptr = g_base + j * g_sc
    if REVERSE:
        g_first_ptr += (T - 1).to(tl.int64) * g_st
    g_first = tl.load(g_first_ptr, mask=cm, other=0.0).to(ACC)
    tl.store(
        dh0_ptr + (b * d0_sb + g * d0_sg + c0 * d0_sc) + j * d0_sc,
        cast_out(g_first * carry, dh0_ptr, SOFT_BF16),
        mask=cm,
    )


# ----------------------------------------------------------------------------
# Host side: stride folding, block sizes, launch plans.
#
# This runs on every call, so it is kept short: everything that follows from
# the shapes, strides, dtype and flags (the folding, the block sizes, the grid,
# the integer and constexpr kernel arguments) is one cached Plan
# (_common.py), which launches the compiled kernel.


def _contiguous_strides(sizes) -> list[int]:
    strides, acc = [], 1
    for n in reversed(sizes):
        strides.append(acc)
        acc *= n
    return strides[::-1]


def _fold(sizes, stride_lists):
    """Fold the channel dims ``sizes`` jointly over all tensors.

    ``stride_lists``: one list of channel strides (len(sizes)) per tensor.
    Returns (G, C, [(stride_g, stride_c) per tensor]) or None when more than
    two groups remain.
    """
    groups = []  # [size, [stride per tensor]], innermost first
    for d in reversed(range(len(sizes))):
        n = sizes[d]
        if n == 1:
            continue
        if groups:
            gsize, gstrides = groups[-1]
            if all(st[d] == gs * gsize for st, gs in zip(stride_lists, gstrides)):
                groups[-1][0] = gsize * n
                continue
        groups.append([n, [st[d] for st in stride_lists]])
    if len(groups) > 2:
        return None
    k = len(stride_lists)
    if not groups:
        return 1, 1, [(0, 0)] * k
    if len(groups) == 1:
        ((C, sc),) = groups
        return 1, C, [(0, c) for c in sc]
    (C, sc), (G, sg) = groups
    return G, C, list(zip(sg, sc))


def _fold_call(shape, seq_strides, h0_strides):
    """_fold for one call: the channel dims of ``shape`` folded jointly over the
    sequence tensors (``seq_strides``: their strides, None for an omitted one) and
    the step tensor h0 (None when omitted).

    Returns (G, C, [(stride_g, stride_c) per sequence tensor, (0, 0) for an omitted
    one], h0's (stride_g, stride_c)) or None when more than two groups remain.
    """
    lists = [st[2:] for st in seq_strides if st is not None]
    if h0_strides is not None:
        lists.append(h0_strides[1:])
    folded = _fold(list(shape[2:]), lists)
    if folded is None:
        return None
    G, C, folds = folded
    folds = iter(folds)
    seq = [(0, 0) if st is None else next(folds) for st in seq_strides]
    return G, C, seq, (0, 0) if h0_strides is None else next(folds)


class _Tuning(NamedTuple):
    """The launch knobs of one kernel for one element size."""

    rows: int  # R: consecutive steps per thread, scanned in registers
    num_warps: int
    tile: int  # elements per tile (R * NT * BLOCK_C), about
    stages: int  # > 0: Triton's software pipelining, that deep; 0: a register double buffer


# Tuning per kernel and element size in bytes, measured on an H100 at
# [B, T, H, d] = [8, 4096, 16, 64] (see the module docstring; the sweeps are in
# bench/results/tune_scan_rows_h100.json and tune_scan_blocks_h100.json, and
# python -m bench.tune_scan runs one). Channel blocks hold up to _MAX_BLOCK_C
# channels, narrowed while the grid has fewer than _MIN_PROGRAMS_PER_SM
# programs per SM: at that shape 64 channels and 128 programs (a row of a
# tile is then 128 bytes of bfloat16, a whole cache line), which beat twice
# the programs on half the channels. float64 keeps one step per thread
# (R = 1), as before the sweeps; it was not swept.
# The plans are cached: call _clear_plans() after changing a knob.
_FWD_TUNING = {2: _Tuning(8, 4, 8192, 3), 4: _Tuning(4, 8, 4096, 3), 8: _Tuning(1, 4, 2048, 3)}
_BWD_TUNING = {2: _Tuning(4, 8, 4096, 0), 4: _Tuning(4, 8, 4096, 0), 8: _Tuning(1, 4, 2048, 0)}
_MAX_BLOCK_C = {2: 64, 4: 64, 8: 32}
_MIN_PROGRAMS_PER_SM = {2: 0.5, 4: 0.5, 8: 0.5}
# Under the interpreter (CPU tensors, numpy), where a scan costs one Python
# call per tile element: channel blocks of up to 16 and tiles of 16 steps, with
# R = min(the tuned R, 4), so that CI runs the in-register path (R > 1) and the
# one-step path (R = 1) wherever the GPU does.
_INTERPRET_BLOCK_C, _INTERPRET_TILE_STEPS, _INTERPRET_MAX_ROWS = 16, 16, 4


def _config(B: int, G: int, C: int, elem_size: int, sms: int, tuning: _Tuning):
    """(BLOCK_C, R, NT, num_warps): tiles of R * NT steps by BLOCK_C channels."""
    # A single channel (C = 1, e.g. a [B, T] scan) takes one step per thread:
    # with R > 1, Triton 3.6 compiled wrong results for [NT, R, 1] tiles when
    # the time stride is 1 (float32 forward and backward, bfloat16 and float16
    # backward, on an H100), which the interpreter does not reproduce.
    rows = tuning.rows if C > 1 else 1
    if INTERPRET:
        rows = min(rows, _INTERPRET_MAX_ROWS)
        return min(next_power_of_2(C), _INTERPRET_BLOCK_C), rows, _INTERPRET_TILE_STEPS // rows, 1
    vec = max(16 // elem_size, 1)  # elements of one 16-byte access
    block_c = min(next_power_of_2(C), _MAX_BLOCK_C[elem_size])
    # Narrow the channel block (down to one 16-byte vector) while the grid is
    # too small to give every SM a program.
    min_programs = _MIN_PROGRAMS_PER_SM[elem_size] * sms
    while block_c > vec and B * G * cdiv(C, block_c) < min_programs:
        block_c //= 2
    # Threads cover the channels with 16-byte vectors, the rest of the CTA's
    # threads go along time: NT rows (a multiple of them), each thread holding
    # R consecutive steps of its rows.
    threads_t = 32 * tuning.num_warps // max(1, block_c // vec)
    nt = max(threads_t, min(tuning.tile // (block_c * rows), 256))
    return block_c, rows, nt, tuning.num_warps


def _pipelining(stages: int):
    """(PREFETCH, NUM_STAGES) kernel arguments for a stage setting."""
    if INTERPRET or stages == 0:
        return True, 1
    return False, stages


def _needs_int64_offsets(block_t: int, block_c: int, time_strides, channel_strides) -> bool:
    """Whether an element offset within a tile (up to block_t steps and block_c
    channels from its first element, either direction) may overflow int32."""
    reach = (block_t - 1) * max(abs(st) for st in time_strides) + (block_c - 1) * max(abs(sc) for sc in channel_strides)
    return reach >= 2**31


@functools.lru_cache(maxsize=512)
def _forward_plan(shape, g_st, x_st, h0_st, dtype, sms, reverse) -> Plan | None:
    """The plan of scan_forward for gamma's shape and the strides of gamma, x
    and h0 (None when omitted); None when the channel dims do not fold into
    two groups."""
    B, T = shape[0], shape[1]
    o_st = _contiguous_strides(shape)  # the output is a new contiguous tensor
    folded = _fold_call(shape, [g_st, x_st, o_st], h0_st)
    if folded is None:
        return None
    G, C, (g_f, x_f, o_f), h0_f = folded
    tuning = _FWD_TUNING[dtype.itemsize]
    block_c, rows, nt, num_warps = _config(B, G, C, dtype.itemsize, sms, tuning)
    ncb = cdiv(C, block_c)
    prefetch, stages = _pipelining(tuning.stages)
    has_x, has_h0 = x_st is not None, h0_st is not None
    ints = (
        T,
        G,
        C,
        ncb,
        g_st[0],
        g_st[1],
        *g_f,
        x_st[0] if has_x else 0,
        x_st[1] if has_x else 0,
        *x_f,
        h0_st[0] if has_h0 else 0,
        *h0_f,
        o_st[0],
        o_st[1],
        *o_f,
    )
    seq = [(g_st[1], g_f[1]), (o_st[1], o_f[1])] + ([(x_st[1], x_f[1])] if has_x else [])
    off64 = _needs_int64_offsets(rows * nt, block_c, [st for st, _ in seq], [sc for _, sc in seq] + [h0_f[1]])
    constexprs = (
        has_x,
        has_h0,
        0.0 if has_x else 1.0,
        reverse,
        kernel_dtypes(dtype)[1],
        rows,
        nt,
        block_c,
        prefetch,
        stages,
        off64,
        len(set(seq)) == 1,
        soft_bf16(dtype),
    )
    return Plan(_scan_fwd_kernel, (B * G * ncb,), ints, constexprs, num_warps)


@functools.lru_cache(maxsize=512)
def _backward_plan(shape, gh_st, g_st, h_st, h0_st, dtype, sms, has_x, reverse) -> Plan | None:
    """The plan of scan_backward (see _forward_plan)."""
    B, T = shape[0], shape[1]
    o_st = _contiguous_strides(shape)  # grad_gamma and grad_x
    d0_sb = _contiguous_strides([B, *shape[2:]])[0]  # grad_h0
    folded = _fold_call(shape, [gh_st, g_st, h_st, o_st], h0_st)
    if folded is None:
        return None
    # grad_gamma, grad_x and grad_h0 share the channel strides o_f.
    G, C, (gh_f, g_f, h_f, o_f), h0_f = folded
    has_h0 = h0_st is not None
    tuning = _BWD_TUNING[dtype.itemsize]
    block_c, rows, nt, num_warps = _config(B, G, C, dtype.itemsize, sms, tuning)
    ncb = cdiv(C, block_c)
    prefetch, stages = _pipelining(tuning.stages)
    ints = (
        T,
        G,
        C,
        ncb,
        gh_st[0],
        gh_st[1],
        *gh_f,
        g_st[0],
        g_st[1],
        *g_f,
        h_st[0],
        h_st[1],
        *h_f,
        h0_st[0] if has_h0 else 0,
        *h0_f,
        o_st[0],
        o_st[1],
        *o_f,
        d0_sb,
        *o_f,
    )
    seq = [(gh_st[1], gh_f[1]), (g_st[1], g_f[1]), (h_st[1], h_f[1]), (o_st[1], o_f[1])]
    off64 = _needs_int64_offsets(rows * nt, block_c, [st for st, _ in seq], [sc for _, sc in seq] + [h0_f[1]])
    constexprs = (
        has_h0,
        0.0 if has_x else 1.0,
        reverse,
        kernel_dtypes(dtype)[1],
        rows,
        nt,
        block_c,
        prefetch,
        stages,
        off64,
        len(set(seq)) == 1,
        soft_bf16(dtype),
    )
    return Plan(_scan_bwd_kernel, (B * G * ncb,), ints, constexprs, num_warps)


def _clear_plans() -> None:
    """Forget the cached plans (after a change of the tuning knobs)."""
    _forward_plan.cache_clear()
    _backward_plan.cache_clear()


def _strides(t: Tensor | None):
    return None if t is None else t.stride()


def scan_forward(gamma: Tensor, x: Tensor | None, h0: Tensor | None, reverse: bool) -> Tensor:
    out = torch.empty(gamma.shape, dtype=gamma.dtype, device=gamma.device)
    if out.numel() == 0:
        return out
    sms, reverse = num_sms(gamma), bool(reverse)
    plan = _forward_plan(gamma.shape, gamma.stride(), _strides(x), _strides(h0), gamma.dtype, sms, reverse)
    if plan is None:
        gamma = gamma.contiguous()
        x = x.contiguous() if x is not None else None
        h0 = h0.contiguous() if h0 is not None else None
        plan = _forward_plan(gamma.shape, gamma.stride(), _strides(x), _strides(h0), gamma.dtype, sms, reverse)
    plan.launch(gamma, gamma if x is None else x, gamma if h0 is None else h0, out)
    return out


def scan_backward(
    grad_h: Tensor, gamma: Tensor, h: Tensor, h0: Tensor | None, has_x: bool, reverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    shape = gamma.shape
    step_shape = [shape[0], *shape[2:]]
    grad_gamma = torch.empty(shape, dtype=gamma.dtype, device=gamma.device)
    grad_x = torch.empty(shape, dtype=gamma.dtype, device=gamma.device)
    if shape[1] == 0:
        return grad_gamma, grad_x, torch.zeros(step_shape, dtype=gamma.dtype, device=gamma.device)
    grad_h0 = torch.empty(step_shape, dtype=gamma.dtype, device=gamma.device)
    if grad_gamma.numel() == 0:
        return grad_gamma, grad_x, grad_h0
    sms, has_x, reverse = num_sms(gamma), bool(has_x), bool(reverse)
    plan = _backward_plan(
        shape, grad_h.stride(), gamma.stride(), h.stride(), _strides(h0), gamma.dtype, sms, has_x, reverse
    )
    if plan is None:
        grad_h, gamma, h = grad_h.contiguous(), gamma.contiguous(), h.contiguous()
        h0 = h0.contiguous() if h0 is not None else None
        plan = _backward_plan(
            shape, grad_h.stride(), gamma.stride(), h.stride(), _strides(h0), gamma.dtype, sms, has_x, reverse
        )
    plan.launch(grad_h, gamma, h, gamma if h0 is None else h0, grad_gamma, grad_x, grad_h0)
    return grad_gamma, grad_x, grad_h0
