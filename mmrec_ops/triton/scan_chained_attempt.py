"""Prototype (session 12): the scan forward with one program per tile, tiles chained
through published maps (deterministic: a tile's carry is always the end state of
the tile SPAN back, advanced by the maps of the SPAN - 1 tiles between)."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mmrec_ops.triton._common import Plan, cast_out, cdiv, kernel_dtypes, num_sms, soft_bf16
from mmrec_ops.triton.scan import (
    _FWD_TUNING, _affine_combine, _affine_combine_excl, _config, _contiguous_strides, _fold_call, _fwd_load,
    _mul_combine_excl, _needs_int64_offsets, _offsets, _second, _strides, _time_at,
)


@triton.jit
def _tile_prefix(a, b, n, R: tl.constexpr, NT: tl.constexpr, HAS_B: tl.constexpr):
    """Inclusive prefix maps of one tile [NT, R, C]: h_s = PA_s * c + PB_s for the
    state c before the tile; and the whole tile's map (A, B), [1, 1, C]."""
    if R == 1:
        if HAS_B:
            pa, pb = tl.associative_scan((a, b), 0, _affine_combine)
        else:
            pa = tl.cumprod(a, 0)
            pb = pa
        A = tl.sum(tl.where(n == NT - 1, pa, 0.0), axis=0, keep_dims=True)
        B = tl.sum(tl.where(n == NT - 1, pb, 0.0), axis=0, keep_dims=True)
        return pa, pb, A, B
    if HAS_B:
        pa, pb = tl.associative_scan((a, b), 1, _affine_combine)
    else:
        pa = tl.cumprod(a, 1)
        pb = pa
    ta, tb = tl.reduce((pa, pb), 1, _second, keep_dims=True)
    if HAS_B:
        ia, ib, ea, eb = tl.associative_scan(
            (ta, tb, tl.full(ta.shape, 1.0, ta.dtype), tl.zeros(ta.shape, ta.dtype)), 0, _affine_combine_excl)
        PA = pa * ea
        PB = pa * eb + pb
        A = tl.sum(tl.where(n == NT - 1, ia, 0.0), axis=0, keep_dims=True)
        B = tl.sum(tl.where(n == NT - 1, ib, 0.0), axis=0, keep_dims=True)
    else:
        ia, ea = tl.associative_scan((ta, tl.full(ta.shape, 1.0, ta.dtype)), 0, _mul_combine_excl)
        PA = pa * ea
        PB = PA
        A = tl.sum(tl.where(n == NT - 1, ia, 0.0), axis=0, keep_dims=True)
        B = A
    return PA, PB, A, B


@triton.jit
def _wait(flag_ptr, level):
    f = tl.atomic_add(flag_ptr, 0, sem="acquire")
    while f < level:
        f = tl.atomic_add(flag_ptr, 0, sem="acquire")


@triton.jit(do_not_specialize=["T"])
def _scan_fwd_chained_kernel(
    g_ptr, x_ptr, h0_ptr, o_ptr, maps_ptr, ends_ptr, flags_ptr,
    T, G, C, NCB, NROWS, NTILES,
    g_sb, g_st, g_sg, g_sc,
    x_sb, x_st, x_sg, x_sc,
    h0_sb, h0_sg, h0_sc,
    o_sb, o_st, o_sg, o_sc,
    HAS_X: tl.constexpr, HAS_H0: tl.constexpr, H0_VALUE: tl.constexpr,
    REVERSE: tl.constexpr, ACC: tl.constexpr,
    R: tl.constexpr, NT: tl.constexpr, BLOCK_C: tl.constexpr,
    OFF64: tl.constexpr, SHARED_OFFSETS: tl.constexpr, SOFT_BF16: tl.constexpr, SPAN: tl.constexpr,
):
    BLOCK_T: tl.constexpr = R * NT
    # Tiles are taken in ticket order, so a tile waits only on tiles whose
    # programs have started.
    ticket = tl.atomic_add(flags_ptr + NROWS * NTILES, 1)
    tile = ticket // NROWS
    row = ticket % NROWS
    cb = row % NCB
    bg = row // NCB
    g = (bg % G).to(tl.int64)
    b = (bg // G).to(tl.int64)
    c0 = (cb * BLOCK_C).to(tl.int64)
    n = tl.arange(0, NT)[:, None, None]
    r = tl.arange(0, R)[None, :, None]
    j = tl.arange(0, BLOCK_C)[None, None, :]
    k = n * R + r
    cm = j < C - cb * BLOCK_C

    g_base = g_ptr + (b * g_sb + g * g_sg + c0 * g_sc)
    x_base = x_ptr + (b * x_sb + g * x_sg + c0 * x_sc)
    o_base = o_ptr + (b * o_sb + g * o_sg + c0 * o_sc)
    g_off = _offsets(k, j, g_st, g_sc, REVERSE, OFF64)
    if SHARED_OFFSETS:
        x_off = g_off
        o_off = g_off
    else:
        x_off = _offsets(k, j, x_st, x_sc, REVERSE, OFF64)
        o_off = _offsets(k, j, o_st, o_sc, REVERSE, OFF64)

    s0 = tile * BLOCK_T
    t0 = _time_at(s0, T, REVERSE)
    m = (k < T - s0) & cm
    a, x = _fwd_load(g_base + t0 * g_st, x_base + t0 * x_st, g_off, x_off, m, HAS_X)
    PA, PB, A, B = _tile_prefix(a.to(ACC), x.to(ACC), n, R, NT, HAS_X)

    slot = (row * NTILES).to(tl.int64)
    maps = maps_ptr + slot * 2 * BLOCK_C + j
    ends = ends_ptr + slot * BLOCK_C + j
    flags = flags_ptr + slot
    tl.store(maps + tile * 2 * BLOCK_C, A)
    tl.store(maps + tile * 2 * BLOCK_C + BLOCK_C, B)
    tl.debug_barrier()
    tl.atomic_xchg(flags + tile, 1, sem="release")

    lo = tl.maximum(tile - SPAN + 1, 0)
    if lo == 0:
        if HAS_H0:
            carry = tl.load(h0_ptr + (b * h0_sb + g * h0_sg + c0 * h0_sc) + j * h0_sc, mask=cm, other=0.0).to(ACC)
        else:
            carry = tl.full([1, 1, BLOCK_C], H0_VALUE, ACC)
    else:
        _wait(flags + lo - 1, 2)
        carry = tl.load(ends + (lo - 1) * BLOCK_C, cache_modifier=".cg")
    for p in range(lo, tile):
        _wait(flags + p, 1)
        ap = tl.load(maps + p * 2 * BLOCK_C, cache_modifier=".cg")
        if HAS_X:
            bp = tl.load(maps + p * 2 * BLOCK_C + BLOCK_C, cache_modifier=".cg")
            carry = ap * carry + bp
        else:
            carry = ap * carry
    if HAS_X:
        tl.store(ends + tile * BLOCK_C, A * carry + B)
    else:
        tl.store(ends + tile * BLOCK_C, A * carry)
    tl.debug_barrier()
    tl.atomic_xchg(flags + tile, 2, sem="release")

    if HAS_X:
        h = PA * carry + PB
    else:
        h = PA * carry
    tl.store(o_base + t0 * o_st + o_off, cast_out(h, o_ptr, SOFT_BF16), mask=m)


SPAN = 4


@functools.lru_cache(maxsize=512)
def _chained_plan(shape, g_st, x_st, h0_st, dtype, sms, reverse, span, tuning=None):
    B, T = shape[0], shape[1]
    o_st = _contiguous_strides(shape)
    folded = _fold_call(shape, [g_st, x_st, o_st], h0_st)
    G, C, (g_f, x_f, o_f), h0_f = folded
    tuning = tuning or _FWD_TUNING[dtype.itemsize]
    block_c, rows, nt, num_warps = _config(B, G, C, dtype.itemsize, sms, tuning)
    ncb = cdiv(C, block_c)
    nrows, ntiles = B * G * ncb, cdiv(T, rows * nt)
    has_x, has_h0 = x_st is not None, h0_st is not None
    ints = (
        T, G, C, ncb, nrows, ntiles,
        g_st[0], g_st[1], *g_f,
        x_st[0] if has_x else 0, x_st[1] if has_x else 0, *x_f,
        h0_st[0] if has_h0 else 0, *h0_f,
        o_st[0], o_st[1], *o_f,
    )
    seq = [(g_st[1], g_f[1]), (o_st[1], o_f[1])] + ([(x_st[1], x_f[1])] if has_x else [])
    off64 = _needs_int64_offsets(rows * nt, block_c, [st for st, _ in seq], [sc for _, sc in seq] + [h0_f[1]])
    acc = kernel_dtypes(dtype)[1]
    constexprs = (
        has_x, has_h0, 0.0 if has_x else 1.0, reverse, acc,
        rows, nt, block_c, off64, len(set(seq)) == 1, soft_bf16(dtype), span,
    )
    plan = Plan(_scan_fwd_chained_kernel, (nrows * ntiles,), ints, constexprs, num_warps)
    return plan, nrows * ntiles, block_c


def scan_forward_chained(gamma, x, h0, reverse, span=SPAN, tuning=None):
    out = torch.empty(gamma.shape, dtype=gamma.dtype, device=gamma.device)
    if out.numel() == 0:
        return out
    plan, slots, block_c = _chained_plan(gamma.shape, gamma.stride(), _strides(x), _strides(h0), gamma.dtype,
                                         num_sms(gamma), bool(reverse), span, tuning)
    acc = torch.float64 if gamma.dtype == torch.float64 else torch.float32
    maps = torch.empty(slots * 2 * block_c, dtype=acc, device=gamma.device)
    ends = torch.empty(slots * block_c, dtype=acc, device=gamma.device)
    flags = torch.zeros(slots + 1, dtype=torch.int32, device=gamma.device)
    plan.launch(gamma, gamma if x is None else x, gamma if h0 is None else h0, out, maps, ends, flags)
    return out
