"""The working memory: the keys and values of the last W tokens, which each token reads
exactly (``MultiMemoryAttention``), kept between calls in a ring buffer."""

from __future__ import annotations

import torch
from torch import Tensor


def window_ring(position: Tensor, kept: int) -> Tensor:
    """``[kept]``: (position + j) mod kept, the ring slot of the j-th oldest of the kept
    tokens before ``position`` (and, read the other way, where the j-th slot's token lies
    among the kept tokens before position + kept)."""
    return (position + torch.arange(kept, device=position.device)) % max(kept, 1)


def window_mask(starts: Tensor, Q: int, window: int) -> Tensor:
    """``[nb, Q, Q + W - 1]``: query i of the block starting at ``starts[b]`` sees window
    key j (the token at starts[b] - (W - 1) + j) iff t - W < s <= t, i.e.
    i <= j <= i + W - 1, and the token exists (s >= 0)."""
    i = torch.arange(Q, device=starts.device).view(-1, 1)
    j = torch.arange(Q + window - 1, device=starts.device)
    band = (j >= i) & (j < i + window)
    return band & (starts.view(-1, 1, 1) - (window - 1) + j >= 0)


def update_window(ordered: Tensor, kv: Tensor, slots: Tensor) -> Tensor:
    """The working memory (ring buffer) after a chunk: the last W - 1 of (``ordered``
    ``[B, W - 1, 2, D]``, the working memory oldest first, then ``kv`` ``[B, T, 2, D]``),
    each in its slot (``slots``, ``MemoryLayout.window_slots``), in ``ordered``'s dtype. A
    gather, so a new tensor: a view would keep the whole chunk alive in the state."""
    kept = ordered.shape[1]
    if kept == 0:
        return ordered
    return torch.cat([ordered, kv.to(ordered.dtype)], dim=1)[:, -kept:][:, slots]
