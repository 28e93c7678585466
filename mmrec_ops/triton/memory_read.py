"""Triton kernels of mmrec::memory_read and mmrec::memory_read_backward (CUDA).

    query t = n Q + i sees group[b, n, c] where group_mask[n, i, c], and tokens[b, j]
    where t <= j <= t + W - 1 and j >= first_token;
    out_t = sum_c p_c v_c,  p = softmax(q_t . k_c / sqrt(d)),  lse_t = log sum_c exp(q_t . k_c / sqrt(d))

Forward. One program per (tile of BM queries, batch row and head) runs one online
softmax (flash attention's) over the group of each block its tile touches (one, when
BM divides Q), then over the key tiles of its window, t0 <= j < t0 + BM - 1 + W, in
place in ``tokens``: no copy per block, no merge of two softmaxes. Visibility is the
group mask's bits for the group and arithmetic on t, j and first_token for
the window. Scores are kept in base 2 (exp2, the scale times log2(e) folded in; float64 keeps
exp); lse is stored in natural units, [B, H, T].

Backward, from lse (the weights recomputed, never stored) and
delta = grad_out . out - grad_lse (a pass of its own over grad_out and out):
- dq: per query tile, the same walk as the forward;
- d tokens: per key tile of the tokens, over the query tiles whose window holds it
  (t in [j - W + 1, j]);
- d group: per (tile of candidates, block), over the block's Q queries.
Each writes every element of its output once, so no atomics and no zero fill.

float32 products run as IEEE float32 (no TF32), float64 as float64; bfloat16 and
float16 on the tensor cores, accumulating in float32. Tile sizes: a sweep on an H100
at small's shapes (bench/results/read_cuda_h100.md).

This module does not import mmrec_ops: the callers validate the arguments.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, Plan, cast_out, cdiv, check_offsets_fit, next_power_of_2, soft_bf16

__all__ = ["memory_read", "memory_read_backward"]

# (BM queries, BN keys, warps) per kernel; float64 (no tl.dot) takes FLOAT64_TILES.
FORWARD_TILES = (64, 64, 4)
DQ_TILES = (64, 64, 4)
DTOKENS_TILES = (32, 64, 4)
DGROUP_TILES = (64, 64, 4)
FLOAT64_TILES = (16, 16, 4)
DELTA_ROWS = 64


@triton.jit
def _scales(D: tl.constexpr, ACC: tl.constexpr, BASE2: tl.constexpr):
    # (1/sqrt(d) in the accumulation type, the scores' factor, lse's factor) in the
    # kernels' exponent base: base 2 with exp2 (float32), e with exp (float64, where a
    # float32 log2(e) would cost precision).
    scale = 1.0 / tl.sqrt(tl.full([], D, ACC))
    if BASE2:
        return scale, scale * 1.4426950408889634, 1.4426950408889634
    else:
        return scale, scale, 1.0


@triton.jit
def _operand(x, DOT_F32: tl.constexpr):
    # A loaded tile as a tl.dot operand: float32 under the interpreter for bfloat16 and
    # float16, whose tl.dot there returns garbage (Triton 3.9's interpreter).
    if DOT_F32:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def _dot_nt(a, b, IEEE: tl.constexpr, NO_DOT: tl.constexpr):
    # a [M, K] times b [N, K] transposed. float64 multiplies and sums in registers:
    # Triton 3.6's float64 tl.dot fails to compile in these kernels (an assertion in its
    # MMAv2 lowering), so float64 is the exact path with small tiles, not the fast one.
    if NO_DOT:
        return tl.sum(a[:, None, :] * b[None, :, :], 2)
    else:
        return tl.dot(a, tl.trans(b), input_precision="ieee" if IEEE else "tf32")


@triton.jit
def _dot_nn(a, b, IEEE: tl.constexpr, NO_DOT: tl.constexpr):
    # a [M, K] times b [K, N], a rounded to b's dtype as the tensor cores take it.
    if NO_DOT:
        return tl.sum(a[:, :, None] * b[None, :, :], 1)
    else:
        return tl.dot(a.to(b.dtype), b, input_precision="ieee" if IEEE else "tf32")


@triton.jit
def _exp(x, BASE2: tl.constexpr):
    if BASE2:
        return tl.exp2(x)
    else:
        return tl.exp(x)


@triton.jit
def _key_tile(base_ptr, idx, ok, stride, kv_stride, h, dims, D: tl.constexpr, DOT_F32: tl.constexpr):
    # Keys and values [len(idx), BD] of rows idx (of stride `stride`) of a [..., 2, H d] tensor.
    kv = base_ptr + idx[:, None] * stride + h * D + dims[None, :]
    mask = ok[:, None] & (dims < D)[None, :]
    k = _operand(tl.load(kv, mask=mask, other=0.0), DOT_F32)
    v = _operand(tl.load(kv + kv_stride, mask=mask, other=0.0), DOT_F32)
    return k, v


@triton.jit
def _query_tile(
    q_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    b,
    h,
    pid_bh,
    rows,
    row_ok,
    dims,
    T,
    sqb,
    sqt,
    sqh,
    unit,
    D: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    # What the backward reads of query rows: q, grad_out, lse (in the exponent base) and delta.
    q_off = b * sqb + rows[:, None] * sqt + h * sqh + dims[None, :]
    q_mask = row_ok[:, None] & (dims < D)[None, :]
    q = _operand(tl.load(q_ptr + q_off, mask=q_mask, other=0.0), DOT_F32)
    do = _operand(tl.load(do_ptr + q_off, mask=q_mask, other=0.0), DOT_F32)
    lse2 = tl.load(lse_ptr + pid_bh * T + rows, mask=row_ok, other=0.0) * unit
    delta = tl.load(delta_ptr + pid_bh * T + rows, mask=row_ok, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _group_iterations(t0, n_first, n_tiles, T, Q, BM: tl.constexpr):
    # A query tile's group pass is one loop over (block, candidate tile) pairs, the blocks
    # its rows fall in: nested loops (blocks, then tiles) run slower (read_cuda_h100.md).
    return ((tl.minimum(t0 + BM, T) - 1) // Q + 1 - n_first) * n_tiles


@triton.jit
def _group_keys(
    g_ptr,
    gm_ptr,
    it,
    n_first,
    n_tiles,
    b,
    h,
    rows,
    row_ok,
    cols,
    dims,
    G,
    Q,
    sgb,
    sgn,
    sgc,
    sgkv,
    smn,
    smq,
    D: tl.constexpr,
    BN: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    # Iteration it of the group pass (block n, candidates c): keys, values [BN, BD] and the
    # [BM, BN] visibility, the group mask's bits for the query rows of block n.
    n = n_first + it // n_tiles
    c = (it % n_tiles) * BN + cols
    c_ok = c < G
    k, v = _key_tile(g_ptr + b * sgb + n * sgn, c, c_ok, sgc, sgkv, h, dims, D, DOT_F32)
    row_in = row_ok & (rows // Q == n)
    bits = tl.load(
        gm_ptr + n * smn + (rows - n * Q)[:, None] * smq + c[None, :], mask=row_in[:, None] & c_ok[None, :], other=0
    )
    return k, v, bits != 0


@triton.jit
def _window_keys(
    tok_ptr, first, j0, b, h, rows, cols, dims, NTOK, W, stb, stt, stkv, D: tl.constexpr, DOT_F32: tl.constexpr
):
    # The window's key tile from token j0: keys, values [BN, BD] and the [BM, BN] visibility,
    # query t sees token j iff t <= j <= t + W - 1 and the token exists (j >= first):
    # arithmetic, where a mask loaded per key tile slows the loop (read_cuda_h100.md).
    j = j0 + cols
    k, v = _key_tile(tok_ptr + b * stb, j, j < NTOK, stt, stkv, h, dims, D, DOT_F32)
    exists = (j >= first) & (j < NTOK)
    return k, v, (j[None, :] >= rows[:, None]) & (j[None, :] < rows[:, None] + W) & exists[None, :]


@triton.jit
def _online_step(q, k, v, vis, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr, BASE2: tl.constexpr, NO_DOT: tl.constexpr):
    # One key tile into the running (max, sum, weighted sum), scores in the exponent base.
    s = _dot_nt(q, k, IEEE, NO_DOT) * qk_scale
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = _exp(m_i - m_safe, BASE2)
    p = _exp(s - m_safe[:, None], BASE2)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot_nn(p, v, IEEE, NO_DOT)
    return m_new, l_i, acc


@triton.jit
def _forward_kernel(
    q_ptr,
    g_ptr,
    gm_ptr,
    tok_ptr,
    first_ptr,
    o_ptr,
    lse_ptr,
    T,
    H,
    G,
    NTOK,
    W,
    Q,
    sqb,
    sqt,
    sqh,
    sgb,
    sgn,
    sgc,
    sgkv,
    smn,
    smq,
    stb,
    stt,
    stkv,
    D: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    ACC: tl.constexpr,
    IEEE: tl.constexpr,
    BASE2: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    DOT_F32: tl.constexpr,
    NO_DOT: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    scale, qk_scale, unit = _scales(D, ACC, BASE2)
    t0 = pid_m * BM
    rows = t0 + tl.arange(0, BM)
    dims = tl.arange(0, BD)
    cols = tl.arange(0, BN)
    row_ok = rows < T
    dim_ok = dims < D
    q_off = b * sqb + rows[:, None] * sqt + h * sqh + dims[None, :]
    q = _operand(tl.load(q_ptr + q_off, mask=row_ok[:, None] & dim_ok[None, :], other=0.0), DOT_F32)
    m_i = tl.full([BM], float("-inf"), ACC)
    l_i = tl.zeros([BM], ACC)
    acc = tl.zeros([BM, BD], ACC)
    n_first, n_tiles = t0 // Q, tl.cdiv(G, BN)
    for it in range(0, _group_iterations(t0, n_first, n_tiles, T, Q, BM)):
        k, v, vis = _group_keys(
            g_ptr,
            gm_ptr,
            it,
            n_first,
            n_tiles,
            b,
            h,
            rows,
            row_ok,
            cols,
            dims,
            G,
            Q,
            sgb,
            sgn,
            sgc,
            sgkv,
            smn,
            smq,
            D,
            BN,
            DOT_F32,
        )
        m_i, l_i, acc = _online_step(q, k, v, vis, m_i, l_i, acc, qk_scale, IEEE, BASE2, NO_DOT)
    first = tl.load(first_ptr)
    for j0 in range(t0, tl.minimum(t0 + BM - 1 + W, NTOK), BN):
        k, v, vis = _window_keys(tok_ptr, first, j0, b, h, rows, cols, dims, NTOK, W, stb, stt, stkv, D, DOT_F32)
        m_i, l_i, acc = _online_step(q, k, v, vis, m_i, l_i, acc, qk_scale, IEEE, BASE2, NO_DOT)
    out = acc / l_i[:, None]
    tl.store(o_ptr + q_off, cast_out(out, o_ptr, SOFT_BF16), mask=row_ok[:, None] & dim_ok[None, :])
    if BASE2:
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    else:
        lse = m_i + tl.log(l_i)
    tl.store(lse_ptr + pid_bh * T + rows, lse, mask=row_ok)


@triton.jit
def _grad_scores(
    q, do, k, v, vis, lse2, delta, qk_scale, IEEE: tl.constexpr, BASE2: tl.constexpr, NO_DOT: tl.constexpr
):
    # [BM, BN] grad_s of one key tile: p (grad_out . v - delta), p = exp(s - lse) in the exponent base.
    s = _dot_nt(q, k, IEEE, NO_DOT) * qk_scale
    p = tl.where(vis, _exp(s - lse2[:, None], BASE2), 0.0)
    dp = _dot_nt(do, v, IEEE, NO_DOT)
    return p * (dp - delta[:, None])


@triton.jit
def _dq_kernel(
    q_ptr,
    g_ptr,
    gm_ptr,
    tok_ptr,
    first_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    T,
    H,
    G,
    NTOK,
    W,
    Q,
    sqb,
    sqt,
    sqh,
    sgb,
    sgn,
    sgc,
    sgkv,
    smn,
    smq,
    stb,
    stt,
    stkv,
    D: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    ACC: tl.constexpr,
    IEEE: tl.constexpr,
    BASE2: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    DOT_F32: tl.constexpr,
    NO_DOT: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    scale, qk_scale, unit = _scales(D, ACC, BASE2)
    t0 = pid_m * BM
    rows = t0 + tl.arange(0, BM)
    dims = tl.arange(0, BD)
    cols = tl.arange(0, BN)
    row_ok = rows < T
    q, do, lse2, delta = _query_tile(
        q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, pid_bh, rows, row_ok, dims, T, sqb, sqt, sqh, unit, D, DOT_F32
    )
    dq = tl.zeros([BM, BD], ACC)
    n_first, n_tiles = t0 // Q, tl.cdiv(G, BN)
    for it in range(0, _group_iterations(t0, n_first, n_tiles, T, Q, BM)):
        k, v, vis = _group_keys(
            g_ptr,
            gm_ptr,
            it,
            n_first,
            n_tiles,
            b,
            h,
            rows,
            row_ok,
            cols,
            dims,
            G,
            Q,
            sgb,
            sgn,
            sgc,
            sgkv,
            smn,
            smq,
            D,
            BN,
            DOT_F32,
        )
        ds = _grad_scores(q, do, k, v, vis, lse2, delta, qk_scale, IEEE, BASE2, NO_DOT)
        dq += _dot_nn(ds, k, IEEE, NO_DOT)
    first = tl.load(first_ptr)
    for j0 in range(t0, tl.minimum(t0 + BM - 1 + W, NTOK), BN):
        k, v, vis = _window_keys(tok_ptr, first, j0, b, h, rows, cols, dims, NTOK, W, stb, stt, stkv, D, DOT_F32)
        ds = _grad_scores(q, do, k, v, vis, lse2, delta, qk_scale, IEEE, BASE2, NO_DOT)
        dq += _dot_nn(ds, k, IEEE, NO_DOT)
    q_off = b * sqb + rows[:, None] * sqt + h * sqh + dims[None, :]
    tl.store(dq_ptr + q_off, cast_out(dq * scale, dq_ptr, SOFT_BF16), mask=row_ok[:, None] & (dims < D)[None, :])


@triton.jit
def _key_grads(
    k, v, q, do, vis, lse2, delta, dk, dv, qk_scale, IEEE: tl.constexpr, BASE2: tl.constexpr, NO_DOT: tl.constexpr
):
    # Adds one query tile's contribution to a key tile's [BN, BD] dk (unscaled) and dv.
    st = _dot_nt(k, q, IEEE, NO_DOT) * qk_scale  # [BN, BM]
    pt = tl.where(vis, _exp(st - lse2[None, :], BASE2), 0.0)
    dv += _dot_nn(pt, do, IEEE, NO_DOT)
    dpt = _dot_nt(v, do, IEEE, NO_DOT)
    dst = pt * (dpt - delta[None, :])
    dk += _dot_nn(dst, q, IEEE, NO_DOT)
    return dk, dv


@triton.jit
def _dtokens_kernel(
    q_ptr,
    tok_ptr,
    first_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dtok_ptr,
    T,
    H,
    NTOK,
    W,
    sqb,
    sqt,
    sqh,
    stb,
    stt,
    stkv,
    D: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    ACC: tl.constexpr,
    IEEE: tl.constexpr,
    BASE2: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    DOT_F32: tl.constexpr,
    NO_DOT: tl.constexpr,
):
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    scale, qk_scale, unit = _scales(D, ACC, BASE2)
    j0 = pid_n * BN
    j = j0 + tl.arange(0, BN)
    dims = tl.arange(0, BD)
    j_ok = j < NTOK
    dim_ok = dims < D
    kv_off = b * stb + j[:, None] * stt + h * D + dims[None, :]
    kv_mask = j_ok[:, None] & dim_ok[None, :]
    k = _operand(tl.load(tok_ptr + kv_off, mask=kv_mask, other=0.0), DOT_F32)
    v = _operand(tl.load(tok_ptr + kv_off + stkv, mask=kv_mask, other=0.0), DOT_F32)
    exists = j >= tl.load(first_ptr)
    dk = tl.zeros([BN, BD], ACC)
    dv = tl.zeros([BN, BD], ACC)
    for t0 in range(tl.maximum(j0 - W + 1, 0) // BM * BM, tl.minimum(j0 + BN, T), BM):
        rows = t0 + tl.arange(0, BM)
        row_ok = rows < T
        q, do, lse2, delta = _query_tile(
            q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, pid_bh, rows, row_ok, dims, T, sqb, sqt, sqh, unit, D, DOT_F32
        )
        vis = (j[:, None] >= rows[None, :]) & (j[:, None] < rows[None, :] + W) & exists[:, None] & row_ok[None, :]
        dk, dv = _key_grads(k, v, q, do, vis, lse2, delta, dk, dv, qk_scale, IEEE, BASE2, NO_DOT)
    tl.store(dtok_ptr + kv_off, cast_out(dk * scale, dtok_ptr, SOFT_BF16), mask=kv_mask)
    tl.store(dtok_ptr + kv_off + stkv, cast_out(dv, dtok_ptr, SOFT_BF16), mask=kv_mask)


@triton.jit
def _dgroup_kernel(
    q_ptr,
    g_ptr,
    gm_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dg_ptr,
    T,
    H,
    G,
    Q,
    sqb,
    sqt,
    sqh,
    sgb,
    sgn,
    sgc,
    sgkv,
    smn,
    smq,
    D: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    ACC: tl.constexpr,
    IEEE: tl.constexpr,
    BASE2: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    DOT_F32: tl.constexpr,
    NO_DOT: tl.constexpr,
):
    pid_c, n, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = pid_bh // H, pid_bh % H
    scale, qk_scale, unit = _scales(D, ACC, BASE2)
    c = pid_c * BN + tl.arange(0, BN)
    dims = tl.arange(0, BD)
    c_ok = c < G
    dim_ok = dims < D
    kv_off = b * sgb + n * sgn + c[:, None] * sgc + h * D + dims[None, :]
    kv_mask = c_ok[:, None] & dim_ok[None, :]
    k = _operand(tl.load(g_ptr + kv_off, mask=kv_mask, other=0.0), DOT_F32)
    v = _operand(tl.load(g_ptr + kv_off + sgkv, mask=kv_mask, other=0.0), DOT_F32)
    dk = tl.zeros([BN, BD], ACC)
    dv = tl.zeros([BN, BD], ACC)
    for i0 in range(0, Q, BM):
        i = i0 + tl.arange(0, BM)
        rows = n * Q + i
        row_ok = (i < Q) & (rows < T)
        q, do, lse2, delta = _query_tile(
            q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, pid_bh, rows, row_ok, dims, T, sqb, sqt, sqh, unit, D, DOT_F32
        )
        bits = tl.load(gm_ptr + n * smn + i[None, :] * smq + c[:, None], mask=c_ok[:, None] & row_ok[None, :], other=0)
        dk, dv = _key_grads(k, v, q, do, bits != 0, lse2, delta, dk, dv, qk_scale, IEEE, BASE2, NO_DOT)
    tl.store(dg_ptr + kv_off, cast_out(dk * scale, dg_ptr, SOFT_BF16), mask=kv_mask)
    tl.store(dg_ptr + kv_off + sgkv, cast_out(dv, dg_ptr, SOFT_BF16), mask=kv_mask)


@triton.jit
def _delta_kernel(
    do_ptr, o_ptr, glse_ptr, delta_ptr, T, H, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, ACC: tl.constexpr
):
    # delta [B, H, T] = grad_out . out - grad_lse per query, of contiguous [B, T, H, d] rows:
    # one pass, where eager ops would cast, multiply, sum and subtract in turn.
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    rows = pid_m * BM + tl.arange(0, BM)
    dims = tl.arange(0, BD)
    row_ok = rows < T
    off = (b * T + rows[:, None]) * H * D + h * D + dims[None, :]
    mask = row_ok[:, None] & (dims < D)[None, :]
    do = tl.load(do_ptr + off, mask=mask, other=0.0).to(ACC)
    o = tl.load(o_ptr + off, mask=mask, other=0.0).to(ACC)
    grad_lse = tl.load(glse_ptr + pid_bh * T + rows, mask=row_ok, other=0.0)
    tl.store(delta_ptr + pid_bh * T + rows, tl.sum(do * o, 1) - grad_lse, mask=row_ok)


def _check_offsets(q_shape, group_shape, tokens_shape) -> None:
    # The kernels take contiguous tensors, whose last element lies numel - 1 past the first.
    spans = {"q": math.prod(q_shape) - 1, "group": math.prod(group_shape) - 1, "tokens": math.prod(tokens_shape) - 1}
    check_offsets_fit("mmrec::memory_read", spans, "split the batch")


@functools.cache
def _plans(q_shape, group_shape, Q, window, dtype):
    """The five launch plans of one call's shapes (contiguous tensors): forward, dq,
    d tokens, d group, delta."""
    _check_offsets(q_shape, group_shape, (q_shape[0], window - 1 + q_shape[1], 2, group_shape[-1]))
    B, T, H, d = q_shape
    _, nb, G, _, D = group_shape
    n_tokens = window - 1 + T
    q_strides = (T * H * d, H * d, d)
    group_strides = (nb * G * 2 * D, G * 2 * D, 2 * D, D)
    mask_strides = (Q * G, G)
    token_strides = (n_tokens * 2 * D, 2 * D, D)
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    half = dtype in (torch.bfloat16, torch.float16)
    fp64 = dtype == torch.float64
    flags = (acc, not half, not fp64, soft_bf16(dtype), INTERPRET and half, fp64)
    block_d = max(16, next_power_of_2(d))
    bm, bn, warps = FLOAT64_TILES if fp64 else FORWARD_TILES
    forward = Plan(
        _forward_kernel,
        (cdiv(T, bm), B * H),
        (T, H, G, n_tokens, window, Q, *q_strides, *group_strides, *mask_strides, *token_strides),
        (d, block_d, bm, bn, *flags),
        warps,
    )
    bm, bn, warps = FLOAT64_TILES if fp64 else DQ_TILES
    dq = Plan(
        _dq_kernel,
        (cdiv(T, bm), B * H),
        (T, H, G, n_tokens, window, Q, *q_strides, *group_strides, *mask_strides, *token_strides),
        (d, block_d, bm, bn, *flags),
        warps,
    )
    bm, bn, warps = FLOAT64_TILES if fp64 else DTOKENS_TILES
    dtokens = Plan(
        _dtokens_kernel,
        (cdiv(n_tokens, bn), B * H),
        (T, H, n_tokens, window, *q_strides, *token_strides),
        (d, block_d, bm, bn, *flags),
        warps,
    )
    bm, bn, warps = FLOAT64_TILES if fp64 else DGROUP_TILES
    dgroup = Plan(
        _dgroup_kernel,
        (cdiv(G, bn), nb, B * H),
        (T, H, G, Q, *q_strides, *group_strides, *mask_strides),
        (d, block_d, bm, bn, *flags),
        warps,
    )
    delta = Plan(_delta_kernel, (cdiv(T, DELTA_ROWS), B * H), (T, H), (d, block_d, DELTA_ROWS, acc), 4)
    return forward, dq, dtokens, dgroup, delta


def _operands(q, group, group_mask, tokens, first_token):
    # Contiguous values; the bool mask as bytes (a view).
    return (
        q.contiguous(),
        group.contiguous(),
        group_mask.contiguous().view(torch.uint8),
        tokens.contiguous(),
        first_token,
    )


def memory_read(q: Tensor, group: Tensor, group_mask: Tensor, tokens: Tensor, first_token: Tensor, window: int):
    """(out ``[B, T, H, d]``, lse ``[B, H, T]``) of mmrec::memory_read."""
    q, group, group_mask, tokens, first_token = _operands(q, group, group_mask, tokens, first_token)
    B, T, H, _ = q.shape
    forward, *_ = _plans(tuple(q.shape), tuple(group.shape), group_mask.shape[1], window, q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    forward.launch(q, group, group_mask, tokens, first_token, out, lse)
    return out, lse


def memory_read_backward(grad_out, grad_lse, q, group, group_mask, tokens, first_token, out, lse, window):
    """(grad_q, grad_group, grad_tokens) of mmrec::memory_read."""
    q, group, group_mask, tokens, first_token = _operands(q, group, group_mask, tokens, first_token)
    _, dq_plan, dtokens_plan, dgroup_plan, delta_plan = _plans(
        tuple(q.shape), tuple(group.shape), group_mask.shape[1], window, q.dtype
    )
    grad_out, lse = grad_out.contiguous(), lse.contiguous()
    delta = torch.empty_like(lse)
    delta_plan.launch(grad_out, out.contiguous(), grad_lse.contiguous(), delta)
    grad_q, grad_group, grad_tokens = torch.empty_like(q), torch.empty_like(group), torch.empty_like(tokens)
    dq_plan.launch(q, group, group_mask, tokens, first_token, grad_out, lse, delta, grad_q)
    dtokens_plan.launch(q, tokens, first_token, grad_out, lse, delta, grad_tokens)
    if group.shape[2] > 0:
        dgroup_plan.launch(q, group, group_mask, grad_out, lse, delta, grad_group)
    return grad_q, grad_group, grad_tokens
