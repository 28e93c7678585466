"""The working memory: the keys and values of the last W tokens, which each token reads
exactly (``MultiMemoryAttention``).

Between calls it is a ring of W slots, ``BlockState.recent_kv`` ``[B, W, 2, D]``: the
token at position t in slot t mod W. Before the token at p the ring holds tokens
p - W .. p - 1; the token writes its own slot (that of p - W, which it may not see),
then reads the W slots. A chunk reads the W - 1 tokens before it oldest first
(``MemoryLayout.working_order``), then its own.
"""

from __future__ import annotations

import torch
from torch import Tensor


def earlier_tokens(window: int) -> int:
    """W - 1: how many tokens before it a token reads in its working memory (0 without one)."""
    return max(window - 1, 0)


def ring_slots(first: Tensor, n: int, window: int) -> Tensor:
    """``[n]``: (first + j) mod W, the ring slots of the n tokens from absolute position
    ``first`` (int64 scalar tensor) on."""
    return (first + torch.arange(n, device=first.device)) % max(window, 1)


def filled_slots(last: Tensor, window: int) -> Tensor:
    """``[W]`` bool: which ring slots hold a token once the tokens up to absolute position
    ``last`` (int64 scalar tensor, -1: none) are written: slot s holds the newest token
    t <= last with t = s mod W, last - ((last - s) mod W), where that is >= 0."""
    slot = torch.arange(window, device=last.device)
    return last - (last - slot) % max(window, 1) >= 0


def working_mask(starts: Tensor, Q: int, window: int) -> Tensor:
    """``[nb, Q, Q + W - 1]``: query i of the block starting at ``starts[b]`` sees working
    key j (the token at starts[b] - (W - 1) + j) iff t - W < s <= t, i.e.
    i <= j <= i + W - 1, and the token exists (s >= 0)."""
    i = torch.arange(Q, device=starts.device).view(-1, 1)
    j = torch.arange(Q + window - 1, device=starts.device)
    band = (j >= i) & (j < i + window)
    return band & (starts.view(-1, 1, 1) - (window - 1) + j >= 0)


def update_ring(ordered: Tensor, kv: Tensor, slots: Tensor) -> Tensor:
    """The ring ``[B, W, 2, D]`` after a chunk: the last W of (``ordered`` ``[B, W - 1, 2, D]``,
    the W - 1 tokens before the chunk oldest first, then the chunk's ``kv`` ``[B, T, 2, D]``),
    slot s taking the ``slots[s]``-th of them (``MemoryLayout.working_slots``), in
    ``ordered``'s dtype. A gather, so a new tensor: a view would keep the whole chunk alive
    in the state."""
    window = slots.shape[0]
    if window == 0:
        return ordered
    return torch.cat([ordered, kv.to(ordered.dtype)], dim=1)[:, -window:][:, slots]
