"""Where a chunk's (or one token's) tokens fall in the memories, as arithmetic on absolute
token positions: who may see what in the working memory, where its ring writes, and where
the tokens fall in the long-term store (``memory_layout``, ``token_layout``, computed once
per chunk for all blocks).

The position itself is a tensor in the state: no Python branch depends on it, so one
compiled graph serves every chunk at every position, and a sequence gives the same
outputs whether it is run in one call, in chunks, or token by token.

The read (``MultiMemoryAttention``) takes a chunk's queries in blocks of Q tokens. Each
block attends to the P persistent slots and Q + W - 1 working-memory keys (its own tokens
and the W - 1 before them); each token also reads the top_k segments it retrieves from the
long-term store (``store``), so a chunk costs O(T (P + Q + W + N + top_k S)) time,
whatever the context.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import MMRecConfig
from .store import StoreLayout, store_layout, token_retrievable
from .working import earlier_tokens, filled_slots, ring_slots, working_mask

# Queries per block of the read (one token when decoding): long enough to amortise a
# block's long-term candidates, short enough that most of its working keys are used.
QUERY_BLOCK = 128


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


class MemoryLayout(NamedTuple):
    """Everything a chunk's memory read and update derive from its position and length
    alone: who sees what, where the ring buffer writes, where the tokens fall in the
    long-term store. The same for every block, so a model computes it once per chunk.

    read_mask:   ``[nb, Q, P + Q + W - 1]``, True where a block's query sees a key: the
                 persistent slots, its working keys.
    working_order: ``[W - 1]``, the ring slots of the W - 1 tokens before the chunk, oldest
                 first.
    working_slots: ``[W]``, for each ring slot after the chunk, which of the last W tokens
                 (those W - 1, then the chunk's) it holds.
    first_token: int64 ``[]``, the first of those W - 1 tokens then the chunk's that
                 exists: none before the sequence's first token, so max(W - 1 - position, 0).
    store:       the chunk's ``StoreLayout`` (None without a long-term memory).
    resets:      ``[B, T]`` bool, the tokens that start a document, where the recurrence
                 restarts from h = 0 (None: no document starts; ``document_layout``).

    A ``document_layout`` (rows of packed documents) has a read_mask per row,
    ``[B, nb, Q, P + Q + W - 1]``, and a store whose ``retrievable`` is ``[B, T, C]``.
    """

    read_mask: Tensor
    working_order: Tensor
    working_slots: Tensor
    first_token: Tensor
    store: StoreLayout | None
    resets: Tensor | None = None


class TokenLayout(NamedTuple):
    """What one token's read and memory update derive from its position p alone
    (``token_layout``), the same for every block: the lean path of decoding.

    read_mask:    ``[1, 1, P + k S + W]``, True where a key is read: the persistent slots,
                  the tokens of the k = top_k segments retrieved (the first
                  min(k, retrievable) of them hold one), the working ring's slots that hold
                  a token once the token has written its own.
    working_slot: ``[1]``, p mod W, the token's slot in the working memory's ring.
    store_slot:   ``[1]``, (p // S) mod N, the token's slot in the long-term store ...
    store_offset: ``[1]``, ... and p mod S, its place there.
    starts:       ``[]``, whether the token starts its segment (its slot is cleared).
    completes:    ``[]``, whether the token completes its segment (its index key is written).
    retrievable:  ``[1, N]``, which slots' segments the token may retrieve.
    """

    read_mask: Tensor
    working_slot: Tensor
    store_slot: Tensor
    store_offset: Tensor
    starts: Tensor
    completes: Tensor
    retrievable: Tensor


def retrieved_slots(retrievable_slots: Tensor, config: MMRecConfig) -> Tensor:
    """``[k S]`` bool: which of a one-token read's retrieved keys hold a token, from the
    slots it may retrieve ``[1, N]`` (``token_retrievable``): the segments of the first
    min(k, number retrievable) choices."""
    count = retrievable_slots.sum()
    chosen = torch.arange(min(config.top_k, config.store_slots), device=count.device) < count
    return chosen.repeat_interleave(config.segment_len)


def slots_with_keys(position: Tensor, config: MMRecConfig, with_token: bool) -> Tensor:
    """``[P + k S + W]`` bool: which keys of a one-token read hold a key when the token at
    absolute ``position`` p (int64 scalar tensor) reads: every persistent slot; the
    retrieved segments' tokens (``retrieved_slots``; none without a long-term memory); the
    working ring's slots of tokens up to p (``with_token``: its own written) or p - 1."""
    persistent = torch.ones(config.persistent_slots, dtype=torch.bool, device=position.device)
    retrieved = [retrieved_slots(token_retrievable(position, config), config)] if config.top_k > 0 else []
    working = filled_slots(position if with_token else position - 1, config.window)
    return torch.cat([persistent, *retrieved, working])


def token_layout(position: Tensor, config: MMRecConfig) -> TokenLayout:
    """The ``TokenLayout`` of the token at absolute ``position`` (int64 scalar tensor)."""
    S, N = config.segment_len, config.store_slots
    return TokenLayout(
        read_mask=slots_with_keys(position, config, with_token=True).view(1, 1, -1),
        working_slot=(position % max(config.window, 1)).view(1),
        store_slot=(position // S % N).view(1),
        store_offset=(position % S).view(1),
        starts=position % S == 0,
        completes=(position + 1) % S == 0,
        retrievable=token_retrievable(position, config),
    )


def memory_layout(position: Tensor, T: int, config: MMRecConfig) -> MemoryLayout:
    """The ``MemoryLayout`` of the T tokens from absolute ``position`` (int64 scalar tensor)."""
    device = position.device
    starts, Q = block_starts(position, T)
    persistent = torch.ones(starts.shape[0], Q, config.persistent_slots, dtype=torch.bool, device=device)
    working = [working_mask(starts, Q, config.window)] if config.window > 0 else []
    earlier = earlier_tokens(config.window)
    return MemoryLayout(
        read_mask=torch.cat([persistent, *working], dim=2),
        working_order=ring_slots(position - earlier, earlier, config.window),
        working_slots=ring_slots(-(position + T), config.window, config.window),
        first_token=(earlier - position).clamp(min=0),
        store=store_layout(position, T, config) if config.top_k > 0 else None,
    )


def document_layout(layout: MemoryLayout, position: Tensor, documents: Tensor, config: MMRecConfig) -> MemoryLayout:
    """``layout`` (``memory_layout``'s, of the T tokens from absolute ``position``) for rows
    of packed documents: ``documents`` ``[B, T]`` int64, the absolute position of the first
    token of each token's document. A token reads nothing from before it: no working key
    at a position < documents[b, t] (read_mask per row, ``[B, nb, Q, P + Q + W - 1]``), no
    segment that begins before it (store.retrievable per row, ``[B, T, C]``: a segment
    that straddles a document's start is retrievable by neither document), and the
    recurrence restarts at each start (resets ``[B, T]``). The persistent slots stay
    visible to every token."""
    B, T = documents.shape
    n_blocks, Q, n_keys = layout.read_mask.shape
    keys = torch.ones(B, n_blocks, Q, n_keys, dtype=torch.bool, device=documents.device)
    if config.window > 0:
        # Working key j of block n is the token at starts[n] - (W - 1) + j (``working_mask``).
        starts, _ = block_starts(position, T)
        working = starts.view(-1, 1) - (config.window - 1) + torch.arange(Q + config.window - 1, device=starts.device)
        first = F.pad(documents, (0, n_blocks * Q - T)).view(B, n_blocks, Q, 1)
        keys[..., config.persistent_slots :] = working.view(1, n_blocks, 1, -1) >= first
    store = layout.store
    if store is not None:
        begins = store.candidates * config.segment_len
        store = store._replace(retrievable=store.retrievable & (begins >= documents.unsqueeze(-1)))
    resets = documents == position + torch.arange(T, device=documents.device)
    return layout._replace(read_mask=layout.read_mask & keys, store=store, resets=resets)
