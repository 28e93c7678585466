"""MemoryState and HDS, the hierarchical long-term memory (DESIGN.md 2.2).

Level l of the memory holds entries that each summarise S * 4^l consecutive
tokens: entry i of level l is the mean of the keys and values of tokens
[i S 4^l, (i+1) S 4^l). (It equals the mean of four consecutive level-(l-1)
entries, which is how it is computed.) A level keeps its M most recent
entries in a ring buffer, entry i in slot i mod M.

Everything about which entry exists, where it lives and who may see it is
arithmetic on absolute token positions (``memory_layout``, computed once per
chunk for all blocks), with the position itself a tensor in the state: no
Python branch depends on it, so one compiled graph serves every chunk at every
position, and a sequence gives the same outputs whether it is run in one call,
in chunks, or token by token.

A query at absolute position p, in segment j = floor(p / S), sees the level-l
entry i iff

    floor(j / 4^l) - M <= i < floor(j / 4^l)

i.e. entries whose span ended at or before the start of its segment, at most
the M most recent per level.

The read (``MultiMemoryAttention``) takes a chunk's queries in blocks of Q tokens.
Each block attends to P persistent slots, the K_l long-term entries that any of its
tokens may see (at most M + (Q - 1) // (S 4^l) + 1 per level, gathered from the
rings and the entries the chunk completes) and Q + W - 1 working-memory keys (its own
tokens and the W - 1 before them), so a chunk costs O(T (P + L M + Q + W)) time and
memory, whatever the context.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

import mmrec_ops

from .config import MMRecConfig

# A level-l entry is the mean of this many level-(l-1) entries.
BRANCHING = 4
# Queries per block of the read (one token when decoding): long enough to amortise a
# block's long-term candidates, short enough that most of its window keys are used.
QUERY_BLOCK = 128


class BlockState(NamedTuple):
    """The memory of one block after some tokens; ``[..., 2, D]`` is (key, value).

    h:      ``[B, H, d]``, the recurrence state h_{t-1}.
    window: ``[B, W - 1, 2, D]``, the working memory, a ring buffer: the keys and values
            of the last W - 1 tokens (the only earlier tokens the next one reads), the
            token at position t in slot t mod (W - 1).
    memory: ``[B, L, M, 2, D]``, level l's ring buffer: entry i (the mean over its
            span) in slot i mod M. Which slots hold an entry follows from the position.
    sums:   ``[B, L, 2, D]``, per level, the running sum over the level's current span
            (or over the span just completed, until the next one starts): of its
            tokens' keys and values at level 0, of its completed level-(l-1) entries'
            sums at level l >= 1.
    """

    h: Tensor
    window: Tensor
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

    def clone(self) -> MemoryState:
        """A copy of every tensor: for a state that in-place updates (a CUDA graph's
        outputs, a decoder's buffers) must not change."""
        blocks = tuple(BlockState(*(t.clone() for t in block)) for block in self.blocks)
        return MemoryState(self.position.clone(), blocks)

    def detach(self) -> MemoryState:
        """The same values, cut from the autograd graph (truncated backpropagation
        through time across calls)."""
        return MemoryState(self.position, tuple(BlockState(*(t.detach() for t in block)) for block in self.blocks))


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


class LevelLayout(NamedTuple):
    """Where a chunk falls in one memory level (see ``MemoryLayout``).

    index, valid: ``[n]``, the candidate entries completed in the chunk (``chunk_entry_slots``).
    resets:       ``[n_below]``, levels >= 1: the entries of the level below that start one
                  of this level's spans (its running sum restarts there); None for level 0.
    last_child:   ``[n]``, levels >= 1: where that running sum holds each entry's total.
    ring_source:  ``[M]``, for each ring slot after the chunk, which new entry it takes ...
    ring_new:     ``[M]``, ... where True (else it keeps its old entry).
    """

    index: Tensor
    valid: Tensor
    resets: Tensor | None
    last_child: Tensor | None
    ring_source: Tensor
    ring_new: Tensor


class MemoryLayout(NamedTuple):
    """Everything a chunk's memory read and update derive from its position and length
    alone: which entries it completes, how its tokens split into spans, who sees what,
    where the ring buffers write. The same for every block, so a model computes it once
    per chunk.

    in_head:     ``[S]``, level 0: the tokens of a block before the next span starts.
    carry_in:    ``[n_0]``, level 0: where the running sum of the span in progress goes
                 (the first entry, unless the chunk starts a span).
    last_span:   ``[1]``, level 0: the entry of the chunk's last token (the new running sum).
    levels:      one ``LevelLayout`` per level.
    read_source: ``[nb * K_l]``, for each of the nb query blocks, where its K_l long-term
                 candidates lie in the pool of ``update_long_term``.
    read_mask:   ``[nb, Q, P + K_l + Q + W - 1]``, True where a block's query sees a key:
                 the persistent slots, its long-term candidates, its window keys.
    window_order: ``[W - 1]``, the working memory's ring slots, oldest token first.
    window_slots: ``[W - 1]``, for each ring slot after the chunk, which of the last W - 1
                 tokens (the working memory oldest first, then the chunk) it holds.
    first_token: int64 ``[]``, the first of the working memory's tokens (oldest first) then
                 the chunk's that exists: none before the sequence's first token, so
                 max(W - 1 - position, 0).
    """

    in_head: Tensor
    carry_in: Tensor
    last_span: Tensor
    levels: tuple[LevelLayout, ...]
    read_source: Tensor
    read_mask: Tensor
    window_order: Tensor
    window_slots: Tensor
    first_token: Tensor


class TokenLayout(NamedTuple):
    """What one token's read and memory update derive from its position p alone
    (``token_layout``), the same for every block: the lean path of decoding.

    read_mask:   ``[1, 1, P + L M + W]``, True where a slot holds a key: the persistent
                 slots, the ring slots written so far (level-l entries i < p // (S 4^l),
                 the M most recent of which the rings hold), the working memory's slots
                 that hold a token, and the token itself (the last W; none when W = 0).
    window_slot: ``[1]``, p mod (W - 1), the token's slot in the working memory.
    span_start:  ``[]``, whether the token starts a level-0 span.
    completes:   ``[L]``, whether the token completes the level's current entry ...
    first_child: ``[L]``, ... levels >= 1: whether the level-(l-1) entry it completes
                 starts the level's span (its running sum restarts there) ...
    entry_slot:  ``[L]``, ... and the ring slot of the entry it completes.
    widths:      ``[L]``, S 4^l, the tokens of a level-l entry.
    """

    read_mask: Tensor
    window_slot: Tensor
    span_start: Tensor
    completes: Tensor
    first_child: Tensor
    entry_slot: Tensor
    widths: Tensor


def token_layout(position: Tensor, config: MMRecConfig) -> TokenLayout:
    """The ``TokenLayout`` of the token at absolute ``position`` (int64 scalar tensor)."""
    device, S, L, M = position.device, config.segment_len, config.n_levels, config.level_slots
    kept = max(config.window - 1, 0)
    widths = S * BRANCHING ** torch.arange(L, device=device)
    end = position + 1
    written = torch.arange(M, device=device) < (position // widths).unsqueeze(1)
    children = (widths // BRANCHING).clamp(min=1)  # the width of a level's child (level 0's unused)
    window = torch.cat([torch.arange(kept, device=device) < position, torch.ones(1, dtype=torch.bool, device=device)])
    parts = [torch.ones(config.persistent_slots, dtype=torch.bool, device=device), written.flatten()]
    return TokenLayout(
        read_mask=torch.cat(parts + ([window] if config.window > 0 else [])).view(1, 1, -1),
        window_slot=(position % max(kept, 1)).view(1),
        span_start=position % S == 0,
        completes=end % widths == 0,
        first_child=(end // children - 1) % BRANCHING == 0,
        entry_slot=(end // widths - 1) % M,
        widths=widths,
    )


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


def window_ring(position: Tensor, kept: int) -> Tensor:
    """``[kept]``: (position + j) mod kept, the ring slot of the j-th oldest of the kept
    tokens before ``position`` (and, read the other way, where the j-th slot's token lies
    among the kept tokens before position + kept)."""
    return (position + torch.arange(kept, device=position.device)) % max(kept, 1)


def visible(index: Tensor, tokens: Tensor, width: int, slots: int) -> Tensor:
    """``[..., T, n]`` visibility of level entries of absolute ``index`` ``[..., 1, n]`` to
    the tokens at absolute positions ``tokens`` ``[..., T]``: the rule of the module
    docstring."""
    newest_allowed = (tokens // width).unsqueeze(-1)  # floor(j / 4^l) with j = floor(p / S)
    return (index >= 0) & (index >= newest_allowed - slots) & (index < newest_allowed)


def ring_entry_index(count: Tensor, slots: int) -> Tensor:
    """``[slots]`` absolute index of the newest entry in each ring slot once ``count``
    entries have been written (negative: the slot is still empty)."""
    slot = torch.arange(slots, device=count.device)
    return count - 1 - (count - 1 - slot) % slots


def query_block_len(T: int) -> int:
    """Q: one token when decoding, else QUERY_BLOCK (a constant, so that compiled code
    with a dynamic T has one block length)."""
    return 1 if T == 1 else QUERY_BLOCK


def block_starts(position: Tensor, T: int) -> tuple[Tensor, int]:
    """Absolute position of the first token of each query block ``[nb]``, and Q.

    Compiled code gets one more block, of padding only, so that nb >= 2 for every T:
    with a dynamic T, torch.compile would otherwise specialise on nb = 1 and compile a
    new graph once T passes Q. (Dynamo hides whether T is symbolic; eager pays nothing.)
    """
    Q = query_block_len(T)
    n_blocks = (T + Q - 1) // Q + (1 if torch.compiler.is_compiling() else 0)
    return position + Q * torch.arange(n_blocks, device=position.device), Q


def window_mask(starts: Tensor, Q: int, window: int) -> Tensor:
    """``[nb, Q, Q + W - 1]``: query i of the block starting at ``starts[b]`` sees window
    key j (the token at starts[b] - (W - 1) + j) iff t - W < s <= t, i.e.
    i <= j <= i + W - 1, and the token exists (s >= 0)."""
    i = torch.arange(Q, device=starts.device).view(-1, 1)
    j = torch.arange(Q + window - 1, device=starts.device)
    band = (j >= i) & (j < i + window)
    return band & (starts.view(-1, 1, 1) - (window - 1) + j >= 0)


def long_term_read(starts: Tensor, Q: int, level: LevelLayout, width: int, slots: int) -> tuple[Tensor, Tensor]:
    """For each query block, the level entries any of its tokens may see: their places
    ``[nb, n]`` in the level's pool (the ring's M slots, then the chunk's new entries
    ``level.index``) and their visibility ``[nb, Q, n]``, n = M + (Q - 1) // width + 1.

    The tokens of a block see entries from floor(start / width) - M on; an index past the
    chunk's new entries is seen by none of its tokens and reads slot 0.
    """
    n = slots + (Q - 1) // width + 1
    index = (starts // width - slots).view(-1, 1) + torch.arange(n, device=starts.device)
    first_new, n_new = level.index[0], level.index.shape[0]
    source = torch.where(index < first_new, index % slots, slots + index - first_new)
    source = torch.where(source < slots + n_new, source, 0)
    tokens = starts.view(-1, 1) + torch.arange(Q, device=starts.device)
    return source, visible(index.unsqueeze(1), tokens, width, slots)


def memory_layout(position: Tensor, T: int, config: MMRecConfig) -> MemoryLayout:
    """The ``MemoryLayout`` of the T tokens from absolute ``position`` (int64 scalar tensor).

    Ring slots are filled by a gather (each slot takes the newest entry that maps to
    it), not a scatter, so that when a chunk completes more than M entries the last
    one wins deterministically.
    """
    device, S, slots = position.device, config.segment_len, config.level_slots
    starts, Q = block_starts(position, T)
    levels, sources, masks, pool_offset = [], [], [], 0
    below = None
    for level in range(config.n_levels):
        width = span_len(S, level)
        index, valid = chunk_entry_slots(position, T, width)
        resets = last_child = None
        if below is not None:
            resets = below.valid & (below.index % BRANCHING == 0)
            last_child = only_valid(BRANCHING * index + BRANCHING - 1 - below.index[0], valid)
        newest = ring_entry_index((position + T) // width, slots)
        ring_new = newest >= index[0]
        below = LevelLayout(index, valid, resets, last_child, only_valid(newest - index[0], ring_new), ring_new)
        levels.append(below)
        source, mask = long_term_read(starts, Q, below, width, slots)
        sources.append(source + pool_offset)
        masks.append(mask)
        pool_offset += slots + index.shape[0]
    persistent = torch.ones(starts.shape[0], Q, config.persistent_slots, dtype=torch.bool, device=device)
    window = [window_mask(starts, Q, config.window)] if config.window > 0 else []
    head_len = S - position % S
    return MemoryLayout(
        in_head=torch.arange(S, device=device) < head_len,
        carry_in=(chunk_entry_slots(position, T, S)[0] == position // S) & (head_len < S),
        last_span=((position + T - 1) // S - position // S).view(1),
        levels=tuple(levels),
        read_source=torch.cat(sources, dim=1).flatten()
        if sources
        else torch.zeros(0, dtype=torch.int64, device=device),
        read_mask=torch.cat([persistent, *masks, *window], dim=2),
        window_order=window_ring(position, max(config.window - 1, 0)),
        window_slots=window_ring(-(position + T), max(config.window - 1, 0)),
        first_token=(max(config.window - 1, 0) - position).clamp(min=0),
    )


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


def update_window(ordered: Tensor, kv: Tensor, layout: MemoryLayout) -> Tensor:
    """The working memory (ring buffer) after a chunk: the last W - 1 of (``ordered``
    ``[B, W - 1, 2, D]``, the working memory oldest first, then ``kv`` ``[B, T, 2, D]``),
    each in its slot, in ``ordered``'s dtype. A gather, so a new tensor: a view would
    keep the whole chunk alive in the state."""
    kept = ordered.shape[1]
    if kept == 0:
        return ordered
    return torch.cat([ordered, kv.to(ordered.dtype)], dim=1)[:, -kept:][:, layout.window_slots]
