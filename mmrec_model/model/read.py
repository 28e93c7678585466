"""Multi-memory attention: each token reads its working memory (the last W tokens),
the long-term memory it may see and the persistent slots, in one softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mmrec_ops

from ..memory.layout import MemoryLayout, block_starts
from ..memory.working import working_mask


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


def op_blocked_attention(
    q: Tensor, group: Tensor, tokens: Tensor | None, mask: Tensor, window: int, first_token: Tensor
) -> Tensor:
    """``sdpa_blocked_attention``'s read through ``mmrec_ops.memory_read``, the group and
    the working memory in one pass, the working memory's keys read in place from
    ``working_tokens``' tokens ``[B, W - 1 + T, 2, D]``; first_token int64 ``[]``: the first
    of the tokens that exists. Without a working memory (W = 0, tokens None), SDPA's."""
    if tokens is None:
        return sdpa_blocked_attention(q, group, None, mask)
    return mmrec_ops.memory_read(q, group, mask[..., : group.shape[2]], tokens, first_token, window)[0]


def working_tokens(earlier: Tensor, kv: Tensor) -> Tensor:
    """``[B, W - 1 + T, 2, D]``: the W - 1 tokens before the chunk ``earlier``
    ``[B, W - 1, 2, D]`` (oldest first), then the chunk's ``kv`` ``[B, T, 2, D]``, in kv's dtype."""
    return torch.cat([earlier.to(kv.dtype), kv], dim=1)


def working_keys(tokens: Tensor, n_blocks: int, Q: int, window: int) -> Tensor:
    """``[B, nb, Q + W - 1, 2, D]``: for each block of Q queries, the keys and values of
    the W - 1 tokens before it and its own, cut from ``working_tokens``'s ``[B, W - 1 + T, 2, D]``
    (zero-padded to W - 1 + nb Q tokens)."""
    padding = window - 1 + n_blocks * Q - tokens.shape[1]
    return F.pad(tokens, (0, 0, 0, 0, 0, padding)).unfold(1, Q + window - 1, Q).movedim(-1, 2)


def sdpa_blocked_attention(q: Tensor, group: Tensor, working: Tensor | None, mask: Tensor) -> Tensor:
    """``blocked_attention`` over each block's group ``[B, nb, G, 2, D]`` then its
    ``working_keys`` ``[B, nb, Q + W - 1, 2, D]`` (None: none)."""
    return blocked_attention(q, group if working is None else torch.cat([group, working], dim=2), mask)


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Causal attention over the last ``window`` tokens: token t reads s with
    t - W < s <= t. q, k, v ``[B, T, H, d]`` -> ``[B, T, H, d]``; O(T W) time and memory."""
    B, T, H, d = q.shape
    starts, Q = block_starts(torch.zeros((), dtype=torch.int64, device=q.device), T)
    kv = torch.stack([k.flatten(-2), v.flatten(-2)], dim=2)
    tokens = working_tokens(kv.new_zeros(B, window - 1, 2, H * d), kv)
    return blocked_attention(q, working_keys(tokens, starts.shape[0], Q, window), working_mask(starts, Q, window))


class MultiMemoryAttention(nn.Module):
    """Multi-head softmax attention of each token over three memories, in one softmax:
    the P persistent (learned) key/value slots, always visible (so no query row is
    empty); the long-term entries the token may see (HDS); and the working memory, the
    keys and values of tokens t - W < s <= t:

        m_t = sum_c softmax_c(q_t . k_c / sqrt(d) | visible(t, c)) v_c

    Queries go in blocks (``MemoryLayout``), so the cost is O(T (P + L M + Q + W)),
    never O(T^2). ``kernel`` (``MMRecConfig.read_kernel``) picks how a chunk is read:
    'memory_read' (``op_blocked_attention``), 'sdpa' (``sdpa_blocked_attention``), or
    'auto' ('memory_read' on CUDA, 'sdpa' on the CPU).
    """

    def __init__(self, dim: int, persistent_slots: int, window: int, kernel: str = "auto"):
        super().__init__()
        self.window, self.kernel = window, kernel
        self.persistent = nn.Parameter(torch.empty(persistent_slots, 2, dim))

    def forward(self, q: Tensor, kv: Tensor, earlier: Tensor, pool: Tensor | None, layout: MemoryLayout) -> Tensor:
        """q ``[B, T, H, d]``; kv ``[B, T, 2, D]`` the chunk's keys and values; earlier
        ``[B, W - 1, 2, D]`` the W - 1 tokens before the chunk, oldest first (unused
        when W = 0); pool ``[B, N, 2, D]`` the long-term entries (``update_long_term``;
        None: no long-term memory) -> ``[B, T, H, d]``."""
        n_blocks, Q, _ = layout.read_mask.shape
        entries = None if pool is None else pool.to(q.dtype)[:, layout.read_source].unflatten(1, (n_blocks, -1))
        group = self.group(q, entries, n_blocks)
        tokens = working_tokens(earlier, kv.to(q.dtype)) if self.window > 0 else None
        # On the CPU, SDPA's fused attention reads faster than memory_read's block products.
        if self.kernel == "memory_read" or (self.kernel == "auto" and q.is_cuda):
            return op_blocked_attention(q, group, tokens, layout.read_mask, self.window, layout.first_token)
        working = None if tokens is None else working_keys(tokens, n_blocks, Q, self.window)
        return sdpa_blocked_attention(q, group, working, layout.read_mask)

    def read_token(self, q: Tensor, ring: Tensor, memory: Tensor | None, mask: Tensor) -> Tensor:
        """One token's read: q ``[B, 1, H, d]``, the working memory's ring ``[B, W, 2, D]``
        with the token's own key and value written, and the long-term rings
        ``[B, L, M, 2, D]`` (None: no long-term memory) as they were before it; mask
        ``[1, 1, P + L M + W]`` (``TokenLayout.read_mask``: True where a slot holds a key)
        -> ``[B, 1, H, d]``."""
        entries = None if memory is None else memory.to(q.dtype).flatten(1, 2).unsqueeze(1)
        working = ring.to(q.dtype).unsqueeze(1) if self.window > 0 else None
        return sdpa_blocked_attention(q, self.group(q, entries, 1), working, mask)

    def group(self, q: Tensor, entries: Tensor | None, n_blocks: int) -> Tensor:
        """``[B, nb, P + K_l, 2, D]``: for each of the nb query blocks, the persistent slots
        then its long-term candidates ``entries`` ``[B, nb, K_l, 2, D]`` (None: none), in q's
        dtype."""
        persistent = [self.persistent.to(q.dtype).expand(q.shape[0], n_blocks, -1, -1, -1)]
        return torch.cat(persistent + ([] if entries is None else [entries]), dim=2)
