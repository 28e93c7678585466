"""Multi-memory attention: each token reads its working memory (the last W tokens),
the long-term memory it may see and the persistent slots, in one softmax."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

import mmrec_ops

from .memory import MemoryLayout, block_starts, window_mask


def blocked_attention(q: Tensor, keys_values: Tensor, mask: Tensor) -> Tensor:
    """Softmax attention of queries in blocks, each over its own keys, with SDPA:

        out_t = sum_c softmax_c(q_t . k_c / sqrt(d) | mask[b, i, c]) v_c,   t = b Q + i

    q ``[B, T, H, d]``; keys_values ``[B, nb, K, 2, D]`` (key, value of each block's K
    candidates; D = H d); mask ``[nb, Q, K]`` bool (True: visible), nb Q >= T; every row
    must see a key. Returns ``[B, T, H, d]``.

    SDPA sees the blocks as its batch and the B H (batch row, head) pairs as its heads,
    so that the mask broadcasts over them instead of being copied B times.
    """
    B, T, H, d = q.shape
    nb, Q, K = mask.shape
    queries = F.pad(q, (0, 0, 0, 0, 0, nb * Q - T)).reshape(B, nb, Q, H, d).permute(1, 0, 3, 2, 4)
    keys, values = (keys_values[:, :, :, i].unflatten(-1, (H, d)).permute(1, 0, 3, 2, 4) for i in (0, 1))
    out = F.scaled_dot_product_attention(
        *(t.reshape(nb, B * H, -1, d).to(q.dtype) for t in (queries, keys, values)), attn_mask=mask.unsqueeze(1)
    )
    return out.view(nb, B, H, Q, d).permute(1, 0, 3, 2, 4).reshape(B, nb * Q, H, d)[:, :T]


# The fused forward kernel's tiles on CUDA: smaller than flex_attention's default for
# d = 64, faster at small's shapes on an H100 (bench/results/read_cuda_h100.md).
FLEX_CUDA_KERNEL = {"BLOCK_M": 64, "BLOCK_N": 64}


def group_attention(q: Tensor, group: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each block of queries over its own group of keys, dense (a group is small):

        o_t = sum_c softmax_c(q_t . k_c / sqrt(d) | mask[b, i, c]) v_c,   lse_t = log sum_c exp(...)

    q ``[B, T, H, d]``; group ``[B, nb, G, 2, D]``; mask ``[nb, Q, G]``, every row must see a
    key (the persistent slots) -> o ``[B, T, H, d]`` and lse ``[B, T, H]`` in float32 (float64
    for float64 q)."""
    B, T, H, d = q.shape
    nb, Q, G = mask.shape
    queries = F.pad(q, (0, 0, 0, 0, 0, nb * Q - T)).view(B, nb, Q, H, d)
    keys, values = (group[:, :, :, i].to(q.dtype).unflatten(-1, (H, d)) for i in (0, 1))
    accumulate = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bnqhd,bnghd->bnhqg", queries, keys).to(accumulate) * d**-0.5
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    weights = torch.exp(scores - lse)
    out = torch.einsum("bnhqg,bnghd->bnqhd", weights.to(q.dtype), values)
    out = out.reshape(B, nb * Q, H, d)[:, :T].to(accumulate)
    return out, lse.squeeze(-1).transpose(2, 3).reshape(B, nb * Q, H)[:, :T]


def flex_window_attention(q: Tensor, tokens: Tensor, window_columns: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Each query over its working memory with flex_attention's block-sparse kernel, over
    the tokens in place: query t sees token j of ``tokens`` (the W - 1 before the chunk,
    then the chunk) iff t <= j <= t + W - 1 and j exists, arithmetic in the kernel.

    q ``[B, T, H, d]``; tokens ``[B, W - 1 + T, 2, D]``; window_columns ``[nb, Q, Q + W - 1]``
    (the read mask's window columns: which of the W - 1 tokens before the chunk exist is
    read from its first row) -> o ``[B, T, H, d]`` and lse ``[B, T, H]`` in float32 (float64
    for float64 q).
    Compiled code fuses it and skips the tiles nothing sees; eager code materialises every
    score.
    """
    B, T, H, d = q.shape
    keys, values = (tokens[:, :, i].to(q.dtype).unflatten(-1, (H, d)).transpose(1, 2) for i in (0, 1))
    missing = (~window_columns[0, 0, : window - 1]).sum()

    def mask_mod(batch: Tensor, head: Tensor, query: Tensor, key: Tensor) -> Tensor:
        return (key >= query) & (key < query + window) & (key >= missing)

    block_mask = create_block_mask(mask_mod, None, None, T, keys.shape[2], device=q.device)
    options = FLEX_CUDA_KERNEL if q.is_cuda else None
    out, aux = flex_attention(
        q.transpose(1, 2), keys, values, block_mask=block_mask, kernel_options=options, return_aux=AuxRequest(lse=True)
    )
    accumulate = torch.promote_types(q.dtype, torch.float32)
    return out.transpose(1, 2).to(accumulate), aux.lse.transpose(1, 2).to(accumulate)


def flex_blocked_attention(q: Tensor, group: Tensor | None, tokens: Tensor | None, mask: Tensor, window: int) -> Tensor:
    """``blocked_attention`` over each block's group and its working memory, with the keys
    in place rather than a copy per block: ``group_attention`` and ``flex_window_attention``,
    each with its log-sum-exp, merged into the one softmax over both,

        o = o_g exp(lse_g - lse) + o_w exp(lse_w - lse),   lse = log(exp(lse_g) + exp(lse_w)).

    q ``[B, T, H, d]``; group ``[B, nb, G, 2, D]`` (None: none); tokens ``[B, W - 1 + T, 2, D]``,
    the working memory oldest first then the chunk (None: none); mask ``[nb, Q, G + Q + W - 1]``
    (without the group's or the window's columns where that is None) -> ``[B, T, H, d]``.
    """
    parts = []
    if group is not None:
        parts.append(group_attention(q, group, mask[..., : group.shape[2]]))
    if tokens is not None:
        parts.append(
            flex_window_attention(q, tokens, mask[..., mask.shape[-1] - (mask.shape[1] + window - 1) :], window)
        )
    if len(parts) == 1:
        return parts[0][0].to(q.dtype)
    (out_g, lse_g), (out_w, lse_w) = parts
    lse = torch.logaddexp(lse_g, lse_w).unsqueeze(-1)
    out = out_g * torch.exp(lse_g.unsqueeze(-1) - lse) + out_w * torch.exp(lse_w.unsqueeze(-1) - lse)
    return out.to(q.dtype)


def op_blocked_attention(
    q: Tensor, group: Tensor | None, tokens: Tensor | None, mask: Tensor, window: int, first_token: Tensor
) -> Tensor:
    """``flex_blocked_attention``'s read through ``mmrec_ops.memory_read`` (the group and
    the window in one pass); first_token int64 ``[]``: the first of the tokens that exists. A read
    without a window (the long-term part of a gated read, or W = 0) is
    ``blocked_attention``'s (``group_attention``'s einsums specialise a compiled
    graph's dynamic T on the CPU)."""
    if tokens is None:
        return sdpa_blocked_attention(q, group, None, mask)
    if group is None:
        group = tokens.new_empty(tokens.shape[0], mask.shape[0], 0, 2, tokens.shape[-1])
    return mmrec_ops.memory_read(q, group, mask[..., : group.shape[2]], tokens, first_token, window)[0]


def window_tokens(window: Tensor, kv: Tensor) -> Tensor:
    """``[B, W - 1 + T, 2, D]``: the working memory ``window`` ``[B, W - 1, 2, D]`` (oldest
    first), then the chunk's ``kv`` ``[B, T, 2, D]``, in kv's dtype."""
    return torch.cat([window.to(kv.dtype), kv], dim=1)


def window_keys(tokens: Tensor, n_blocks: int, Q: int, window: int) -> Tensor:
    """``[B, nb, Q + W - 1, 2, D]``: for each block of Q queries, the keys and values of
    the W - 1 tokens before it and its own, cut from ``window_tokens``'s ``[B, W - 1 + T, 2, D]``
    (zero-padded to W - 1 + nb Q tokens)."""
    padding = window - 1 + n_blocks * Q - tokens.shape[1]
    return F.pad(tokens, (0, 0, 0, 0, 0, padding)).unfold(1, Q + window - 1, Q).movedim(-1, 2)


def sdpa_blocked_attention(q: Tensor, group: Tensor | None, working: Tensor | None, mask: Tensor) -> Tensor:
    """``blocked_attention`` over each block's group ``[B, nb, G, 2, D]`` then its
    ``window_keys`` ``[B, nb, Q + W - 1, 2, D]`` (either None: none)."""
    return blocked_attention(q, torch.cat([keys for keys in (group, working) if keys is not None], dim=2), mask)


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Causal attention over the last ``window`` tokens: token t reads s with
    t - W < s <= t. q, k, v ``[B, T, H, d]`` -> ``[B, T, H, d]``; O(T W) time and memory."""
    B, T, H, d = q.shape
    starts, Q = block_starts(torch.zeros((), dtype=torch.int64, device=q.device), T)
    kv = torch.stack([k.flatten(-2), v.flatten(-2)], dim=2)
    tokens = window_tokens(kv.new_zeros(B, window - 1, 2, H * d), kv)
    return blocked_attention(q, window_keys(tokens, starts.shape[0], Q, window), window_mask(starts, Q, window))


class MultiMemoryAttention(nn.Module):
    """Multi-head softmax attention of each token over three memories: the P persistent
    (learned) key/value slots, always visible (so no query row is empty); the long-term
    entries the token may see (HDS); and the working memory, the keys and values of
    tokens t - W < s <= t. With ``gated`` False, one softmax over them all:

        m_t = sum_c softmax_c(q_t . k_c / sqrt(d) | visible(t, c)) v_c

    With ``gated``, one softmax over the working memory (w) and one over the long-term
    and persistent memories (l), mixed by the token's per-head gates g_t in (0, 1)^2:

        m_t = g_t,w read_w(q_t) + g_t,l read_l(q_t)

    so that the few long-term entries are not outweighed by the W exact keys.
    Queries go in blocks (``MemoryLayout``), so the cost is O(T (P + L M + Q + W)),
    never O(T^2). ``kernel`` (``MMRecConfig.read_kernel``) picks how a chunk is read:
    'memory_read' (``op_blocked_attention``), 'sdpa' (``blocked_attention``), 'flex'
    (``flex_blocked_attention`` in compiled CUDA code, else 'sdpa'), or 'auto'
    ('memory_read' on CUDA, 'sdpa' on the CPU).
    """

    def __init__(self, dim: int, persistent_slots: int, window: int, gated: bool, kernel: str = "auto"):
        super().__init__()
        self.window, self.gated, self.kernel = window, gated, kernel
        self.persistent = nn.Parameter(torch.empty(persistent_slots, 2, dim))

    def forward(
        self, q: Tensor, kv: Tensor, window: Tensor, pool: Tensor | None, layout: MemoryLayout, gates: Tensor | None
    ) -> Tensor:
        """q ``[B, T, H, d]``; kv ``[B, T, 2, D]`` the chunk's keys and values; window
        ``[B, W - 1, 2, D]`` the working memory before the chunk, oldest first (unused
        when W = 0); pool ``[B, N, 2, D]`` the long-term entries (``update_long_term``;
        None: no long-term memory); gates ``[B, T, H, 2]`` (working, long-term) when
        gated, else None -> ``[B, T, H, d]``."""
        n_blocks, Q, _ = layout.read_mask.shape
        entries = None if pool is None else pool.to(q.dtype)[:, layout.read_source].unflatten(1, (n_blocks, -1))
        tokens = window_tokens(window, kv.to(q.dtype)) if self.window > 0 else None
        # On the CPU, SDPA's fused attention reads faster than memory_read's block products.
        if self.kernel == "memory_read" or (self.kernel == "auto" and q.is_cuda):
            attend = partial(op_blocked_attention, window=self.window, first_token=layout.first_token)
            return self.read(q, entries, tokens, layout.read_mask, gates, attend)
        # flex_attention on the CPU has neither a backward nor a compiled log-sum-exp.
        if self.kernel == "flex" and q.is_cuda and torch.compiler.is_compiling():
            attend = partial(flex_blocked_attention, window=self.window)
            return self.read(q, entries, tokens, layout.read_mask, gates, attend)
        working = None if tokens is None else window_keys(tokens, n_blocks, Q, self.window)
        return self.read(q, entries, working, layout.read_mask, gates)

    def read_token(
        self, q: Tensor, kv: Tensor, window: Tensor, memory: Tensor | None, mask: Tensor, gates: Tensor | None
    ) -> Tensor:
        """One token's read: q ``[B, 1, H, d]``, its kv ``[B, 1, 2, D]``, the working memory
        ``[B, W - 1, 2, D]`` (any order) and the long-term rings ``[B, L, M, 2, D]`` (None:
        no long-term memory) as they were before it; mask ``[1, 1, P + L M + W]`` (True:
        the slot holds a key) -> ``[B, 1, H, d]``."""
        entries = None if memory is None else memory.to(q.dtype).flatten(1, 2).unsqueeze(1)
        working = torch.cat([window.to(q.dtype), kv.to(q.dtype)], dim=1).unsqueeze(1) if self.window > 0 else None
        return self.read(q, entries, working, mask, gates)

    def read(
        self,
        q: Tensor,
        entries: Tensor | None,
        working: Tensor | None,
        mask: Tensor,
        gates: Tensor | None,
        attend: Callable[..., Tensor] = sdpa_blocked_attention,
    ) -> Tensor:
        """The read of q ``[B, T, H, d]`` in nb blocks, each over the persistent slots, its
        long-term candidates ``entries`` ``[B, nb, K_l, 2, D]`` and its working memory
        ``working`` (None: none; ``attend``'s form of it: ``window_keys`` for SDPA,
        ``window_tokens`` for memory_read and flex), visible where ``mask`` ``[nb, Q, P + K_l + K_w]``, in one
        softmax or two gated ones."""
        long_term = [self.persistent.to(q.dtype).expand(q.shape[0], mask.shape[0], -1, -1, -1)]
        group = torch.cat(long_term + ([] if entries is None else [entries]), dim=2)
        if not self.gated:
            return attend(q, group, working, mask)
        n_long_term = group.shape[2]
        m = gates[..., 1:] * attend(q, group, None, mask[..., :n_long_term])
        if working is not None:
            m = m + gates[..., :1] * attend(q, None, working, mask[..., n_long_term:])
        return m
