"""Multi-memory attention: each token reads its working memory (the last W tokens),
the segments it retrieved from the long-term memory and the persistent slots, in one
softmax."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import mmrec_ops

from ..memory.layout import MemoryLayout, block_starts
from ..memory.working import working_mask


def blocked_attention(q: Tensor, keys_values: Tensor, mask: Tensor) -> Tensor:
    """Softmax attention of queries in blocks, each over its own keys, with SDPA:

        out_t = sum_c softmax_c(q_t . k_c / sqrt(d) | mask[b, i, c]) v_c,   t = b Q + i

    q ``[B, T, H, d]``; keys_values ``[B, nb, K, 2, D]`` (key, value of each block's K
    candidates; D = H d); mask ``[nb, Q, K]`` bool (True: visible), or ``[B, nb, Q, K]`` (a
    mask per row), nb Q >= T; every row must see a key. Returns ``[B, T, H, d]``.

    SDPA sees the blocks as its batch and the B H (batch row, head) pairs as its heads,
    so that a mask ``[nb, Q, K]`` broadcasts over them instead of being copied B times.
    """
    B, T, H, d = q.shape
    nb, Q, K = mask.shape[-3:]
    queries = F.pad(q, (0, 0, 0, 0, 0, nb * Q - T)).reshape(B, nb, Q, H, d).permute(1, 0, 3, 2, 4)
    keys, values = (keys_values[:, :, :, i].unflatten(-1, (H, d)).permute(1, 0, 3, 2, 4) for i in (0, 1))
    if mask.dim() == 4:
        mask = mask.transpose(0, 1).unsqueeze(2).expand(nb, B, H, Q, K).reshape(nb, B * H, Q, K)
    else:
        mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(
        *(t.reshape(nb, B * H, -1, d).to(q.dtype) for t in (queries, keys, values)), attn_mask=mask
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


def blocked_attend(q: Tensor, keys_values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``attend`` of queries in blocks, each over its own keys, with a mask per row: q
    ``[B, T, H, d]``, keys_values ``[B, nb, K, 2, D]``, mask ``[B, nb, Q, K]`` (nb Q >= T)
    -> out ``[B, T, H, d]``, lse ``[B, H, T]``."""
    B, T, H, d = q.shape
    nb, Q, K = mask.shape[1:]
    queries = F.pad(q, (0, 0, 0, 0, 0, nb * Q - T)).view(B * nb, Q, H, d)
    out, lse = attend(queries, keys_values.flatten(0, 1), mask.flatten(0, 1))
    lse = lse.view(B, nb, H, Q).transpose(1, 2).reshape(B, H, nb * Q)
    return out.reshape(B, nb * Q, H, d)[:, :T], lse[..., :T]


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


def attend(q: Tensor, keys_values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention of each query over its visible keys, with its log-sum-exp:

        out_t = sum_c softmax_c(q_t . k_c / sqrt(d) | mask[b, t, c]) v_c
        lse_t = log sum_c exp(q_t . k_c / sqrt(d)) over the visible c

    q ``[B, T, H, d]``; keys_values ``[B, K, 2, D]`` (keys and values shared by the queries)
    or ``[B, T, K, 2, D]`` (each query's own); mask ``[B, T, K]`` bool. Returns out
    ``[B, T, H, d]`` (0 where a query sees no key) and lse ``[B, H, T]`` float32 (float64 for
    float64 q; -inf there).
    """
    B, T, H, d = q.shape
    kv = keys_values.to(q.dtype).unflatten(-1, (H, d))
    keys, values = kv.select(-3, 0), kv.select(-3, 1)
    pattern = "bkhd" if keys.dim() == 4 else "btkhd"
    accumulate = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum(f"bthd,{pattern}->bhtk", q, keys).to(accumulate) / math.sqrt(d)
    mask = mask.unsqueeze(1)
    seen = mask.any(-1)
    # Rows that see no key are filled with zeros, so that neither they nor their gradients are NaN.
    scores = torch.where(seen.unsqueeze(-1), scores.masked_fill(~mask, float("-inf")), 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1)) * seen.unsqueeze(-1)
    out = torch.einsum(f"bhtk,{pattern}->bthd", weights.to(q.dtype), values)
    return out, torch.where(seen, lse, float("-inf"))


def flex_attend(q: Tensor, keys_values: Tensor, chosen: Tensor, key_candidates: Tensor) -> tuple[Tensor, Tensor]:
    """``attend`` over shared keys_values ``[B, K, 2, D]`` where query t sees key j iff
    ``chosen[b, t, key_candidates[j]]`` (``key_candidates`` ``[K]``, -1: seen by none;
    chosen ``[B, T, C]`` bool), with flex_attention: the blocks of keys that no query of a
    block of queries sees are skipped, so a query costs about its chosen keys, not K."""
    B, T, H, d = q.shape

    def sees(b, h, t, j):
        candidate = key_candidates[j]
        return (candidate >= 0) & chosen[b, t, candidate.clamp(min=0)]

    block_mask = create_block_mask(sees, B, None, T, keys_values.shape[1], device=q.device)
    keys, values = (keys_values[:, :, i].to(q.dtype).unflatten(-1, (H, d)).transpose(1, 2) for i in (0, 1))
    out, lse = flex_attention(q.transpose(1, 2), keys, values, block_mask=block_mask, return_lse=True)
    return out.transpose(1, 2), lse


def merge_reads(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """The read over the union of two disjoint sets of keys, from each set's read: out
    ``[B, T, H, d]`` and lse ``[B, H, T]`` (``attend``'s; lse_a finite, lse_b -inf where b
    saw nothing), their softmax weights renormalised."""
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a, weight_b = (torch.exp(lse_x - lse).transpose(1, 2).unsqueeze(-1) for lse_x in (lse_a, lse_b))
    return out_a * weight_a.to(out_a.dtype) + out_b * weight_b.to(out_b.dtype)


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
    empty); the tokens of the long-term segments it retrieved (``memory.store``); and the
    working memory, the keys and values of tokens t - W < s <= t:

        m_t = sum_c softmax_c(q_t . k_c / sqrt(d) | visible(t, c)) v_c

    Queries go in blocks (``MemoryLayout``) for the persistent slots and the working
    memory, so the cost is O(T (P + Q + W + top_k S)), never O(T^2). ``kernel``
    (``MMRecConfig.read_kernel``) picks how a chunk's persistent slots and working memory
    are read: 'memory_read' (``op_blocked_attention``), 'sdpa' (``sdpa_blocked_attention``),
    or 'auto' ('memory_read' on CUDA, 'sdpa' on the CPU). With a long-term memory they are
    read by ``memory_read`` (which gives their log-sum-exp) and merged with the retrieved
    tokens' read (``attend``).
    """

    def __init__(self, dim: int, persistent_slots: int, window: int, kernel: str = "auto"):
        super().__init__()
        self.window, self.kernel = window, kernel
        self.persistent = nn.Parameter(torch.empty(persistent_slots, 2, dim))

    def forward(
        self, q: Tensor, kv: Tensor, earlier: Tensor, layout: MemoryLayout, retrieved: tuple[Tensor, Tensor] | None
    ) -> Tensor:
        """q ``[B, T, H, d]``; kv ``[B, T, 2, D]`` the chunk's keys and values; earlier
        ``[B, W - 1, 2, D]`` the W - 1 tokens before the chunk, oldest first (unused
        when W = 0); retrieved: the read of the long-term tokens each query retrieved,
        out and lse as ``attend`` gives them (None: no long-term memory) -> ``[B, T, H, d]``."""
        n_blocks, Q, _ = layout.read_mask.shape[-3:]
        group = self.group(q, None, n_blocks)
        tokens = working_tokens(earlier, kv.to(q.dtype)) if self.window > 0 else None
        if retrieved is not None:
            near, near_lse = self.read_near(q, group, tokens, layout)
            return merge_reads(near, near_lse, *retrieved)
        # On the CPU, SDPA's fused attention reads faster than memory_read's block products;
        # memory_read takes one mask for all rows, not packed documents' mask per row.
        per_row = layout.read_mask.dim() == 4
        if not per_row and (self.kernel == "memory_read" or (self.kernel == "auto" and q.is_cuda)):
            return op_blocked_attention(q, group, tokens, layout.read_mask, self.window, layout.first_token)
        working = None if tokens is None else working_keys(tokens, n_blocks, Q, self.window)
        return sdpa_blocked_attention(q, group, working, layout.read_mask)

    def read_near(self, q: Tensor, group: Tensor, tokens: Tensor | None, layout: MemoryLayout) -> tuple[Tensor, Tensor]:
        """The read of the persistent slots (``group`` ``[B, nb, P, 2, D]``) and the
        working memory (``working_tokens``; None: none), and its lse (``attend``'s)."""
        if tokens is None:
            B, T = q.shape[:2]
            persistent = group[:, 0]
            return attend(q, persistent, torch.ones(B, T, persistent.shape[1], dtype=torch.bool, device=q.device))
        if layout.read_mask.dim() == 4:
            n_blocks, Q = layout.read_mask.shape[1:3]
            keys = torch.cat([group, working_keys(tokens, n_blocks, Q, self.window)], dim=2)
            return blocked_attend(q, keys, layout.read_mask)
        mask = layout.read_mask[..., : group.shape[2]]
        return mmrec_ops.memory_read(q, group, mask, tokens, layout.first_token, self.window)

    def read_token(self, q: Tensor, ring: Tensor, retrieved: Tensor | None, mask: Tensor) -> Tensor:
        """One token's read: q ``[B, 1, H, d]``, the working memory's ring ``[B, W, 2, D]``
        with the token's own key and value written, and the tokens of the segments it
        retrieved ``[B, k S, 2, D]`` (None: no long-term memory); mask ``[1, 1, P + k S + W]``
        (``TokenLayout.read_mask``: True where a key is read) -> ``[B, 1, H, d]``."""
        entries = None if retrieved is None else retrieved.to(q.dtype).unsqueeze(1)
        working = ring.to(q.dtype).unsqueeze(1) if self.window > 0 else None
        return sdpa_blocked_attention(q, self.group(q, entries, 1), working, mask)

    def group(self, q: Tensor, entries: Tensor | None, n_blocks: int) -> Tensor:
        """``[B, nb, P + K_l, 2, D]``: for each of the nb query blocks, the persistent slots
        then its long-term keys ``entries`` ``[B, nb, K_l, 2, D]`` (None: none), in q's
        dtype."""
        persistent = [self.persistent.to(q.dtype).expand(q.shape[0], n_blocks, -1, -1, -1)]
        return torch.cat(persistent + ([] if entries is None else [entries]), dim=2)
