"""HDS, the hierarchical long-term memory (docs/design.md 2.2).

Level l of the memory holds entries that each summarise S * 4^l consecutive
tokens: entry i of level l is the mean of the keys and values of tokens
[i S 4^l, (i+1) S 4^l). (It equals the mean of four consecutive level-(l-1)
entries, which is how it is computed.) A level keeps its M most recent
entries in a ring buffer, entry i in slot i mod M. Which entry exists, where it
lives and who may see it follow from the position alone (``layout``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import mmrec_ops

from .layout import MemoryLayout, TokenLayout, span_len


def reset_gamma(resets: Tensor, like: Tensor) -> Tensor:
    """Decay of a segmented sum: 0 where a new span starts (``resets`` ``[n]``), else 1,
    broadcast to ``like`` (``[B, n, ...]``) without copying."""
    gamma = (~resets).to(like.dtype)
    return gamma.view(1, -1, *([1] * (like.dim() - 2))).expand(like.shape)


def segment_sums(kv: Tensor, carry: Tensor, layout: MemoryLayout, segment_len: int) -> Tensor:
    """Level 0: ``[B, n_0, 2, D]``, the sums of keys and values over each S-token span the
    chunk's tokens fall in (entries ``layout.levels[0].index``), in float32 (float64 for
    float64 kv), with the carry ``[B, 2, D]`` (the running sum of the span in progress
    before the chunk) in the first, and a partial sum in the one in progress at the end.

    The chunk, zero-padded to n_0 = T // S + 2 blocks of S tokens, is cut into blocks;
    the spans are the blocks shifted by the tokens before the next span starts. Each block
    splits into that head and a tail, summed by two masked reductions, and span k is
    tail_{k-1} + head_k (with the carry as tail_{-1}). That reads kv once and writes only
    the sums, where a scan would write a running sum per token.
    """
    T, n_slots = kv.shape[1], layout.carry_in.shape[0]
    acc = torch.float64 if kv.dtype == torch.float64 else torch.float32
    blocks = F.pad(kv, (0, 0, 0, 0, 0, n_slots * segment_len - T)).unflatten(1, (n_slots, segment_len))
    in_head = layout.in_head.view(1, 1, -1, 1, 1)
    heads = torch.where(in_head, blocks, 0).sum(2, dtype=acc)
    tails = torch.where(in_head, 0, blocks).sum(2, dtype=acc)
    # The last block is all padding, so rolling the tails by one block puts zeros first;
    # the carry goes there instead (no slice of a size that could be 1: compile would
    # specialise on it).
    carry = torch.where(layout.carry_in.view(1, -1, 1, 1), carry.to(acc).unsqueeze(1), 0)
    return heads + tails.roll(1, dims=1) + carry


def summarise(kv: Tensor, sums: Tensor, layout: MemoryLayout, segment_len: int) -> tuple[list[Tensor], Tensor]:
    """The sums of the entries that complete within a chunk, at every level, and the new
    running sums.

    Args:
        kv: ``[B, T, 2, D]``, keys and values of the chunk's tokens.
        sums: ``[B, L, 2, D]``, running span sums from the state.
        layout: the chunk's ``MemoryLayout``.

    Returns:
        per level l, ``[B, n_l, 2, D]`` sums over S 4^l tokens of the entries
        ``layout.levels[l].index`` (garbage where not valid), and the new ``[B, L, 2, D]`` sums.

    Level 0 comes from ``segment_sums``; its new running sum is the sum of the span of the
    chunk's last token. Level l is a running sum over the level-(l-1) entries of the chunk
    (``mmrec.scan``, restarting at every fourth entry, float32 accumulation), read at every
    fourth; entries that are not valid add nothing.
    """
    level_sums = [segment_sums(kv, sums[:, 0], layout, segment_len)]
    new_sums = [level_sums[0].index_select(1, layout.last_span).squeeze(1).to(sums.dtype)]
    for level in range(1, sums.shape[1]):
        below, this = layout.levels[level - 1], layout.levels[level]
        x = torch.where(below.valid.view(1, -1, 1, 1), level_sums[-1], 0.0).to(sums.dtype)
        run = mmrec_ops.scan(reset_gamma(this.resets, x), x, sums[:, level])
        level_sums.append(run[:, this.last_child])
        new_sums.append(run[:, -1])
    return level_sums, torch.stack(new_sums, dim=1)


def update_long_term(
    kv: Tensor,
    memory: Tensor,
    sums: Tensor,
    layout: MemoryLayout,
    segment_len: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk of HDS: the pool of entries its tokens may read, and the new memory.

    Args:
        kv: ``[B, T, 2, D]`` keys and values of the chunk's tokens.
        memory: ``[B, L, M, 2, D]`` ring buffers; sums: ``[B, L, 2, D]``.
        layout: ``memory_layout`` of the chunk.
        segment_len: S.

    Returns:
        pool ``[B, sum_l (M + n_l), 2, D]`` (per level: the ring buffer as it was, then
        the ``n_l`` entries ``layout.levels[l].index``, completed in the chunk where
        valid), from which ``layout.read_source`` gathers; and the new memory and sums.
    """
    level_sums, new_sums = summarise(kv, sums, layout, segment_len)
    pool, rings = [], []
    for level, (entry_sums, placed) in enumerate(zip(level_sums, layout.levels)):
        entries = entry_sums / span_len(segment_len, level)
        ring = memory[:, level]
        pool += [ring, entries.to(ring.dtype)]
        rings.append(torch.where(placed.ring_new.view(1, -1, 1, 1), entries[:, placed.ring_source], ring))
    return torch.cat(pool, dim=1), torch.stack(rings, dim=1), new_sums


def update_long_term_token(x: Tensor, memory: Tensor, sums: Tensor, layout: TokenLayout) -> tuple[Tensor, Tensor]:
    """HDS after one token (``update_long_term`` for T = 1, in a few ops): the running
    sums gain the token's x ``[B, 1, 2, D]`` (level 0) or the entry it completes (levels
    >= 1), and each entry it completes, its level's mean ``[B, L, 2, D]``, goes to its
    ring slot. -> (memory, sums)."""
    L = sums.shape[1]
    new = [torch.where(layout.span_start, 0, sums[:, 0]) + x[:, 0].to(sums.dtype)]
    for level in range(1, L):
        running = torch.where(layout.first_child[level], 0, sums[:, level]) + new[-1]
        new.append(torch.where(layout.completes[level - 1], running, sums[:, level]))
    sums = torch.stack(new, dim=1)
    entries = sums / layout.widths.view(1, L, 1, 1)
    levels = torch.arange(L, device=sums.device)
    kept = memory[:, levels, layout.entry_slot]
    memory = memory.clone()
    memory[:, levels, layout.entry_slot] = torch.where(
        layout.completes.view(1, L, 1, 1), entries.to(memory.dtype), kept
    )
    return memory, sums
