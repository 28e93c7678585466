"""MemoryState and HDS, the hierarchical long-term memory (DESIGN.md 2.2).

Level l of the memory holds entries that each summarise S * 4^l consecutive
tokens: entry i of level l is the mean of the keys and values of tokens
[i S 4^l, (i+1) S 4^l). (It equals the mean of four consecutive level-(l-1)
entries, which is how it is computed.) A level keeps its M most recent
entries in a ring buffer, entry i in slot i mod M.

Everything about which entry exists, where it lives and who may see it is
arithmetic on absolute token positions, with the position itself a tensor in
the state: no Python branch depends on it, so one compiled graph serves every
chunk at every position, and a sequence gives the same outputs whether it is
run in one call, in chunks, or token by token.

A query at absolute position p, in segment j = floor(p / S), sees the level-l
entry i iff

    floor(j / 4^l) - M <= i < floor(j / 4^l)

i.e. entries whose span ended at or before the start of its segment, at most
the M most recent per level.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

import mmrec_ops

# A level-l entry is the mean of this many level-(l-1) entries.
BRANCHING = 4


class BlockState(NamedTuple):
    """The memory of one block after some tokens; ``[..., 2, D]`` is (key, value).

    h:      ``[B, H, d]``, the recurrence state h_{t-1}.
    memory: ``[B, L, M, 2, D]``, level l's ring buffer: entry i (the mean over its
            span) in slot i mod M. Which slots hold an entry follows from the position.
    sums:   ``[B, L, 2, D]``, per level, the sum of keys and values over the level's
            current span so far (or over the span just completed, until the next one
            starts).
    """

    h: Tensor
    memory: Tensor
    sums: Tensor


class MemoryState(NamedTuple):
    """The state of an ``MMRecModel``: passed into ``forward`` and returned, never
    stored on a module. A pytree of tensors, so ``torch.compile`` accepts it.

    position: int64 scalar tensor, the number of tokens seen so far (the absolute
              position of the next token). A tensor, not an int, so that compiled
              code does not specialise on it. The number of level-l entries written so
              far is ``position // (S * 4^l)``.
    blocks:   one ``BlockState`` per block.
    """

    position: Tensor
    blocks: tuple[BlockState, ...]

    def detach(self) -> "MemoryState":
        """The same values, cut from the autograd graph (truncated backpropagation
        through time across calls)."""
        return MemoryState(
            self.position, tuple(BlockState(*(t.detach() for t in block)) for block in self.blocks)
        )


class LevelEntries(NamedTuple):
    """Candidate level-l entries completed within a chunk.

    index: ``[n]`` int64, absolute entry indices ``first + arange(n)``.
    valid: ``[n]`` bool, whether the entry's span ends inside the chunk.
    sums:  ``[B, n, 2, D]``, sums of keys and values over each span (garbage where not valid).
    """

    index: Tensor
    valid: Tensor
    sums: Tensor


def span_len(segment_len: int, level: int) -> int:
    """Tokens covered by one level-l entry: S * 4^l."""
    return segment_len * BRANCHING**level


def chunk_entry_slots(position: Tensor, T: int, width: int) -> tuple[Tensor, Tensor]:
    """Indices and validity of the entries of span length ``width`` that complete in
    tokens [position, position + T).

    At most ``T // width + 1`` can, a bound static in T; an entry is valid iff its last
    token, ``(index + 1) * width - 1``, falls inside the chunk. One more slot than that
    bound, always invalid, keeps the count above 1 for every T: torch.compile would
    otherwise specialise on a size of 1 and compile a new graph at T = width, 4 width, ...
    """
    index = position // width + torch.arange(T // width + 2, device=position.device)
    valid = (index + 1) * width - 1 - position < T
    return index, valid


def only_valid(index: Tensor, valid: Tensor) -> Tensor:
    """Gather positions where ``valid``, 0 elsewhere (an in-range position whose value
    is never used).

    A select rather than a clamp: inductor turns a clamp of arange arithmetic into a
    sympy Min/Max index, which torch 2.11's CUDA scheduler fails on (when the position
    is a constant, as in a compiled call that starts from an empty state).
    """
    return torch.where(valid, index, 0)


def reset_gamma(resets: Tensor, like: Tensor) -> Tensor:
    """Decay of a segmented sum: 0 where a new span starts (``resets`` ``[n]``), else 1,
    broadcast to ``like`` (``[B, n, ...]``) without copying."""
    gamma = (~resets).to(like.dtype)
    return gamma.view(1, -1, *([1] * (like.dim() - 2))).expand(like.shape)


def segment_sums(kv: Tensor, carry: Tensor, position: Tensor, segment_len: int) -> LevelEntries:
    """Level 0: the sums of keys and values over each S-token span the chunk's tokens fall in.

    Args:
        kv: ``[B, T, 2, D]``, keys and values of tokens [position, position + T).
        carry: ``[B, 2, D]``, the running sum of the span in progress before the chunk.
        position: int64 scalar, absolute position of the chunk's first token.

    Returns the candidate entries ``first + k`` (``chunk_entry_slots``), sums in float32
    (float64 for float64 kv), including the carry for the span in progress at the chunk's
    start and partial sums for the one in progress at its end.

    The chunk, zero-padded to T // S + 2 blocks of S tokens, is cut into blocks; the spans are
    the blocks shifted by o = S - position % S tokens (o = S: the chunk starts a span). Each
    block splits into a head (its first o tokens) and a tail, summed by two masked
    reductions, and span k is tail_{k-1} + head_k (with the carry as tail_{-1}). That reads
    kv once and writes only the sums, where a scan would write a running sum per token.
    """
    T = kv.shape[1]
    n_slots = T // segment_len + 2  # as many blocks as candidate entries: the last ones are padding
    acc = torch.float64 if kv.dtype == torch.float64 else torch.float32
    blocks = F.pad(kv, (0, 0, 0, 0, 0, n_slots * segment_len - T)).unflatten(1, (n_slots, segment_len))
    head_len = segment_len - position % segment_len
    in_head = (torch.arange(segment_len, device=kv.device) < head_len).view(1, 1, -1, 1, 1)
    heads = torch.where(in_head, blocks, 0).sum(2, dtype=acc)
    tails = torch.where(in_head, 0, blocks).sum(2, dtype=acc)
    # The last block is all padding, so rolling the tails by one block puts zeros first;
    # the carry goes there instead (no slice of a size that could be 1: compile would
    # specialise on it).
    first = (torch.arange(n_slots, device=kv.device) == 0) & (head_len < segment_len)
    sums = heads + tails.roll(1, dims=1) + torch.where(first.view(1, -1, 1, 1), carry.to(acc).unsqueeze(1), 0)
    index, valid = chunk_entry_slots(position, T, segment_len)
    return LevelEntries(index, valid, sums)


def summarise(kv: Tensor, sums: Tensor, position: Tensor, segment_len: int) -> tuple[list[LevelEntries], Tensor]:
    """The entries that complete within a chunk, at every level, and the new running sums.

    Args:
        kv: ``[B, T, 2, D]``, keys and values of tokens [position, position + T).
        sums: ``[B, L, 2, D]``, running span sums from the state.
        position: int64 scalar, absolute position of the chunk's first token.

    Returns:
        per level l, ``LevelEntries`` (sums over S 4^l tokens), and the new ``[B, L, 2, D]`` sums.

    Level 0 comes from ``segment_sums``; its new running sum is the sum of the span of the
    chunk's last token. Level l is a running sum over the level-(l-1) entries of the chunk
    (``mmrec.scan``, restarting at every fourth entry, float32 accumulation), read at every
    fourth; entries that are not valid add nothing.
    """
    T = kv.shape[1]
    level0 = segment_sums(kv, sums[:, 0], position, segment_len)
    last = (position + T - 1) // segment_len - position // segment_len
    levels = [level0]
    new_sums = [level0.sums.index_select(1, last.view(1)).squeeze(1).to(sums.dtype)]
    for level in range(1, sums.shape[1]):
        below = levels[-1]
        x = torch.where(below.valid.view(1, -1, 1, 1), below.sums, 0.0).to(sums.dtype)
        starts = below.valid & (below.index % BRANCHING == 0)
        run = mmrec_ops.scan(reset_gamma(starts, x), x, sums[:, level])
        index, valid = chunk_entry_slots(position, T, span_len(segment_len, level))
        last_child = only_valid(BRANCHING * index + BRANCHING - 1 - below.index[0], valid)
        levels.append(LevelEntries(index, valid, run[:, last_child]))
        new_sums.append(run[:, -1])
    return levels, torch.stack(new_sums, dim=1)


def ring_entry_index(count: Tensor, slots: int) -> Tensor:
    """``[slots]`` absolute index of the newest entry in each ring slot once ``count``
    entries have been written (negative: the slot is still empty)."""
    slot = torch.arange(slots, device=count.device)
    return count - 1 - (count - 1 - slot) % slots


def update_ring(ring: Tensor, entries: LevelEntries, means: Tensor, count_after: Tensor) -> Tensor:
    """Level ring buffer ``[B, M, 2, D]`` after the chunk's entries are written.

    Computed as a gather (each slot takes the newest entry that maps to it), not a
    scatter, so that when a chunk completes more than M entries the last one wins
    deterministically.
    """
    newest = ring_entry_index(count_after, ring.shape[1])
    from_chunk = newest >= entries.index[0]
    source = only_valid(newest - entries.index[0], from_chunk)
    return torch.where(from_chunk.view(1, -1, 1, 1), means[:, source], ring)


def visible(index: Tensor, valid: Tensor, tokens: Tensor, width: int, slots: int) -> Tensor:
    """``[T, n]`` visibility of level entries (absolute ``index`` ``[n]``, ``valid``) to
    the tokens at absolute positions ``tokens`` ``[T]``: the rule of the module docstring."""
    newest_allowed = (tokens // width).view(-1, 1)  # floor(j / 4^l) with j = floor(p / S)
    return valid & (index >= newest_allowed - slots) & (index < newest_allowed)


def read_and_update(
    kv: Tensor, memory: Tensor, sums: Tensor, position: Tensor, segment_len: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One chunk of HDS: the memory candidates its tokens may attend to, and the new memory.

    Args:
        kv: ``[B, T, 2, D]`` keys and values of the chunk's tokens.
        memory: ``[B, L, M, 2, D]`` ring buffers; sums: ``[B, L, 2, D]``.
        position: int64 scalar, absolute position of the chunk's first token.

    Returns:
        candidates ``[B, K, 2, D]`` (per level: the ring buffer as it was, then the
        entries completed in the chunk), mask ``[T, K]`` (True: visible), and the new
        memory and sums. K = sum_l (M + T // (S 4^l) + 2).
    """
    T, slots = kv.shape[1], memory.shape[2]
    tokens = position + torch.arange(T, device=kv.device)
    levels, new_sums = summarise(kv, sums, position, segment_len)
    candidates, masks, rings = [], [], []
    for level, entries in enumerate(levels):
        width = span_len(segment_len, level)
        means = entries.sums / width
        old_index = ring_entry_index(position // width, slots)
        candidates += [memory[:, level], means]
        masks += [
            visible(old_index, old_index >= 0, tokens, width, slots),
            visible(entries.index, entries.valid, tokens, width, slots),
        ]
        rings.append(update_ring(memory[:, level], entries, means, (position + T) // width))
    return torch.cat(candidates, dim=1), torch.cat(masks, dim=1), torch.stack(rings, dim=1), new_sums
