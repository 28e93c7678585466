"""Multi-memory attention: each token reads its working memory (the last W tokens),
the long-term memory it may see and the persistent slots, in one softmax."""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

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


# flex_attention's tile of keys: each query block's long-term group is padded to whole
# tiles, so that a block's group and its window start on tile boundaries.
FLEX_TILE = 128
# The fused forward kernel's tiles on CUDA: smaller than flex_attention's default for
# d = 64, faster at small's shapes on an H100 (bench/results/read_cuda_h100.md).
FLEX_CUDA_KERNEL = {"BLOCK_M": 64, "BLOCK_N": 64}


def flex_blocked_attention(q: Tensor, group: Tensor | None, tokens: Tensor | None, mask: Tensor, window: int) -> Tensor:
    """``blocked_attention`` through flex_attention's block-sparse kernel, over the keys in
    place rather than a copy per block: block b's candidates are its group ``group[:, b]``
    (mask columns [0, G)) and its window, the tokens ``tokens[:, b Q : b Q + Q + W - 1]``
    (mask columns [G, G + Q + W - 1)).

    q ``[B, T, H, d]``; group ``[B, nb, G, 2, D]`` (None: none); tokens ``[B, W - 1 + T, 2, D]``,
    the working memory oldest first then the chunk (None: none); mask ``[nb, Q, G + Q + W - 1]``
    -> ``[B, T, H, d]``. Query t sees token s iff t <= s <= t + W - 1 and s exists, which
    the kernel computes (existence from the first query's mask row) rather than reading the
    mask's window columns. It skips the tiles nothing sees and evaluates the mask only on
    the tiles it cuts; compiled code fuses it, eager code materialises every score.
    """
    B, T, H, d = q.shape
    nb, Q, _ = mask.shape
    G = 0 if group is None else group.shape[2]
    padded_group = -(-G // FLEX_TILE) * FLEX_TILE
    parts = [] if group is None else [F.pad(group, (0, 0, 0, 0, 0, padded_group - G)).flatten(1, 2)]
    parts += [] if tokens is None else [tokens]
    kv = torch.cat(parts, dim=1).to(q.dtype)
    keys, values = (kv[:, :, i].unflatten(-1, (H, d)).transpose(1, 2) for i in (0, 1))
    group_keys = nb * padded_group

    def mask_mod(batch: Tensor, head: Tensor, query: Tensor, key: Tensor) -> Tensor:
        block, row = query // Q, query % Q
        column = key - block * padded_group
        in_group = (key < group_keys) & (column >= 0) & (column < G)
        sees = in_group & mask[block, row, torch.where(in_group, column, 0)]
        if tokens is None:
            return sees
        token = key - group_keys
        in_window = (key >= group_keys) & (token >= query) & (token <= query + window - 1)
        # The first block's first query sees those of the tokens 0 .. W - 1 that exist.
        exists = (token >= window - 1) | mask[0, 0, G + torch.clamp(token, 0, window - 1)]
        return sees | (in_window & exists)

    block_mask = create_block_mask(mask_mod, None, None, nb * Q, kv.shape[1], device=q.device)
    queries = F.pad(q, (0, 0, 0, 0, 0, nb * Q - T)).transpose(1, 2)
    options = FLEX_CUDA_KERNEL if q.is_cuda else None
    return flex_attention(queries, keys, values, block_mask=block_mask, kernel_options=options).transpose(1, 2)[:, :T]


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
    never O(T^2). Compiled code with ``kernel`` 'flex' reads a chunk with
    ``flex_blocked_attention``, everything else with ``blocked_attention``.
    """

    def __init__(self, dim: int, persistent_slots: int, window: int, gated: bool, kernel: str = "sdpa"):
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
        if self.kernel == "flex" and torch.compiler.is_compiling():
            attend = functools.partial(flex_blocked_attention, window=self.window)
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
        ``window_tokens`` for flex), visible where ``mask`` ``[nb, Q, P + K_l + K_w]``, in one
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
