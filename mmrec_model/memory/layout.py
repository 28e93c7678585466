"""Where a chunk's (or one token's) tokens fall in the memories, as arithmetic on absolute
token positions: which long-term entries it completes, who may see what, where the ring
buffers write (``memory_layout``, ``token_layout``, computed once per chunk for all blocks).

The position itself is a tensor in the state: no Python branch depends on it, so one
compiled graph serves every chunk at every position, and a sequence gives the same
outputs whether it is run in one call, in chunks, or token by token.

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
from torch import Tensor

from ..config import MMRecConfig
from .working import earlier_tokens, filled_slots, ring_slots, working_mask

# A level-l entry is the mean of this many level-(l-1) entries.
BRANCHING = 4


# Queries per block of the read (one token when decoding): long enough to amortise a
# block's long-term candidates, short enough that most of its working keys are used.
QUERY_BLOCK = 128


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
                 the persistent slots, its long-term candidates, its working keys.
    working_order: ``[W - 1]``, the ring slots of the W - 1 tokens before the chunk, oldest
                 first.
    working_slots: ``[W]``, for each ring slot after the chunk, which of the last W tokens
                 (those W - 1, then the chunk's) it holds.
    first_token: int64 ``[]``, the first of those W - 1 tokens then the chunk's that
                 exists: none before the sequence's first token, so max(W - 1 - position, 0).
    """

    in_head: Tensor
    carry_in: Tensor
    last_span: Tensor
    levels: tuple[LevelLayout, ...]
    read_source: Tensor
    read_mask: Tensor
    working_order: Tensor
    working_slots: Tensor
    first_token: Tensor


class TokenLayout(NamedTuple):
    """What one token's read and memory update derive from its position p alone
    (``token_layout``), the same for every block: the lean path of decoding.

    read_mask:   ``[1, 1, P + L M + W]``, True where a slot holds a key once the token has
                 written its own (``slots_with_keys``).
    working_slot: ``[1]``, p mod W, the token's slot in the working memory's ring.
    span_start:  ``[]``, whether the token starts a level-0 span.
    completes:   ``[L]``, whether the token completes the level's current entry ...
    first_child: ``[L]``, ... levels >= 1: whether the level-(l-1) entry it completes
                 starts the level's span (its running sum restarts there) ...
    entry_slot:  ``[L]``, ... and the ring slot of the entry it completes.
    widths:      ``[L]``, S 4^l, the tokens of a level-l entry.
    """

    read_mask: Tensor
    working_slot: Tensor
    span_start: Tensor
    completes: Tensor
    first_child: Tensor
    entry_slot: Tensor
    widths: Tensor


def slots_with_keys(position: Tensor, config: MMRecConfig, with_token: bool) -> Tensor:
    """``[P + L M + W]`` bool: which slots of a one-token read hold a key when the token at
    absolute ``position`` p (int64 scalar tensor) reads: every persistent slot; level l's
    ring slots of the entries i < p // (S 4^l) (the M most recent of which the ring holds);
    the working ring's slots of tokens up to p (``with_token``: its own written) or p - 1."""
    device, L, M = position.device, config.n_levels, config.level_slots
    widths = config.segment_len * BRANCHING ** torch.arange(L, device=device)
    written = torch.arange(M, device=device) < (position // widths).unsqueeze(1)
    persistent = torch.ones(config.persistent_slots, dtype=torch.bool, device=device)
    working = filled_slots(position if with_token else position - 1, config.window)
    return torch.cat([persistent, written.flatten(), working])


def token_layout(position: Tensor, config: MMRecConfig) -> TokenLayout:
    """The ``TokenLayout`` of the token at absolute ``position`` (int64 scalar tensor)."""
    device, S, L, M = position.device, config.segment_len, config.n_levels, config.level_slots
    widths = S * BRANCHING ** torch.arange(L, device=device)
    end = position + 1
    children = (widths // BRANCHING).clamp(min=1)  # the width of a level's child (level 0's unused)
    return TokenLayout(
        read_mask=slots_with_keys(position, config, with_token=True).view(1, 1, -1),
        working_slot=(position % max(config.window, 1)).view(1),
        span_start=position % S == 0,
        completes=end % widths == 0,
        first_child=(end // children - 1) % BRANCHING == 0,
        entry_slot=(end // widths - 1) % M,
        widths=widths,
    )


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
    working = [working_mask(starts, Q, config.window)] if config.window > 0 else []
    earlier = earlier_tokens(config.window)
    head_len = S - position % S
    return MemoryLayout(
        in_head=torch.arange(S, device=device) < head_len,
        carry_in=(chunk_entry_slots(position, T, S)[0] == position // S) & (head_len < S),
        last_span=((position + T - 1) // S - position // S).view(1),
        levels=tuple(levels),
        read_source=torch.cat(sources, dim=1).flatten()
        if sources
        else torch.zeros(0, dtype=torch.int64, device=device),
        read_mask=torch.cat([persistent, *masks, *working], dim=2),
        working_order=ring_slots(position - earlier, earlier, config.window),
        working_slots=ring_slots(-(position + T), config.window, config.window),
        first_token=(earlier - position).clamp(min=0),
    )
