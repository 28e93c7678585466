"""The long-term memory (docs/design.md 2.2): a store of raw past segments with an index,
read by top-k selection.

Segment n is the keys and values of tokens nS .. nS + S - 1. The store
(``BlockState.store``) keeps N slots, segment n in slot n mod N, the segment in progress
included, and each complete segment's index key, the mean of its keys. The query of the
token at absolute position a may retrieve segment n iff

    max(0, a // S - N + 1) <= n < a // S    and    (n + 1) S <= a - W + 1

complete before a's own segment started, still in the store, and wholly older than a's
working memory (which reads the last W tokens exactly). The token scores those segments by
q_a . index_n, summed over the heads (one selection for all heads), and reads every token
of the ``top_k`` best, exactly, in the same softmax as its working memory and persistent
slots. The selection is a function of the token's own query and of older tokens only, so a
sequence retrieves the same segments in one call, in chunks or token by token, and a token
costs O(N + top_k S) whatever the context.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..config import MMRecConfig


class StoreLayout(NamedTuple):
    """Where a chunk of T tokens from position p falls in the store: a function of p and T
    alone, the same for every block (``store_layout``).

    candidates:    ``[C]`` segment ids a query of the chunk may retrieve, C = N + T // S + 2:
                   the N slots' segments as they were before the chunk, then the segments
                   p // S, p // S + 1, ... that complete inside it.
    retrievable:   ``[T, C]`` which candidates each query may retrieve (the rule above).
    new_keys:      ``[n, S]`` the pool index of each token of the segments the chunk
                   completes (the last C - N candidates), for their index keys.
    key_candidates: ``[N S + T]`` the candidate each token of the pool belongs to (-1: none).
    written_from:  ``[N S]`` for each store token after the chunk, its pool index ...
    written:       ``[N S]`` ... where it holds a token (else 0: the rest of the segment in
                   progress, so that the state is the same however the tokens came).
    completed:     ``[N]`` the slots whose segment completes inside the chunk (their index
                   keys are written) ...
    complete:      ``[N]`` ... and those that hold a complete segment after it (else the
                   index key is 0).
    """

    candidates: Tensor
    retrievable: Tensor
    new_keys: Tensor
    key_candidates: Tensor
    written_from: Tensor
    written: Tensor
    completed: Tensor
    complete: Tensor


def retrievable(segments: Tensor, positions: Tensor, config: MMRecConfig) -> Tensor:
    """``[T, C]`` bool: may the token at each of ``positions`` ``[T]`` retrieve each of
    ``segments`` ``[C]`` (the rule of the module docstring)."""
    S, N, W = config.segment_len, config.store_slots, config.window
    n, a = segments.view(1, -1), positions.view(-1, 1)
    own = a // S
    return (n >= 0) & (n >= own - N + 1) & (n < own) & ((n + 1) * S <= a - W + 1)


def token_retrievable(position: Tensor, config: MMRecConfig) -> Tensor:
    """``[1, N]`` bool: which slots' segments the token at absolute ``position`` (int64, 0
    dims or ``[1]``) may retrieve, the store holding the tokens before it."""
    return retrievable(slot_segments(position, config), position.view(1), config)


def slot_segments(written: Tensor, config: MMRecConfig) -> Tensor:
    """``[N]``: the segment in each slot once ``written`` (int64 scalar tensor) tokens are
    stored, the newest n = s mod N with a token written (negative: none yet)."""
    S, N = config.segment_len, config.store_slots
    count = (written + S - 1) // S  # segments with at least one token written
    slot = torch.arange(N, device=written.device)
    return count - 1 - (count - 1 - slot) % N


def pool_index(tokens: Tensor, position: Tensor, T: int, config: MMRecConfig) -> Tensor:
    """Where the tokens at absolute positions ``tokens`` lie in the pool of the T tokens
    from ``position``: the store as it was before them (flattened, ``[N S]``), then their
    own keys and values. A token before the chunk is at its store place, a token of the
    chunk after the store; a later one maps to 0 (its value is never used)."""
    S, N = config.segment_len, config.store_slots
    in_store = (tokens // S) % N * S + tokens % S
    in_chunk = torch.where(tokens < position + T, N * S + tokens - position, 0)
    return torch.where(tokens < position, in_store, in_chunk)


def store_layout(position: Tensor, T: int, config: MMRecConfig) -> StoreLayout:
    """The ``StoreLayout`` of the T tokens from absolute ``position`` (int64 scalar tensor)."""
    device, S, N = position.device, config.segment_len, config.store_slots
    old = slot_segments(position, config)
    old_complete = (old >= 0) & ((old + 1) * S <= position)
    new = position // S + torch.arange(T // S + 2, device=device)
    new_complete = (new + 1) * S <= position + T
    candidates = torch.cat([torch.where(old_complete, old, -1), torch.where(new_complete, new, -1)])
    queries = position + torch.arange(T, device=device)
    offsets = torch.arange(S, device=device)
    # A pool token of segment n belongs to slot n mod N's candidate if that segment was
    # complete before the chunk, else to new candidate n - p // S if the chunk completes it.
    tokens_new = torch.cat([(old.view(-1, 1) * S + offsets).flatten(), queries]) // S - position // S
    new_candidate = torch.where(new_complete[tokens_new.clamp(0, T // S + 1)], N + tokens_new, -1)
    slot_candidate = torch.arange(N, device=device).repeat_interleave(S)
    in_old_slot = torch.cat([old_complete.repeat_interleave(S), torch.zeros_like(queries, dtype=torch.bool)])
    after = slot_segments(position + T, config)
    tokens = (after.view(-1, 1) * S + offsets).flatten()
    in_chunk = (tokens >= position) & (tokens < position + T)
    return StoreLayout(
        candidates=candidates,
        retrievable=retrievable(candidates, queries, config),
        new_keys=pool_index(new.view(-1, 1) * S + offsets, position, T, config),
        key_candidates=torch.where(
            in_old_slot, torch.cat([slot_candidate, queries]), torch.where(tokens_new >= 0, new_candidate, -1)
        ),
        written_from=torch.where(in_chunk, N * S + tokens - position, torch.arange(N * S, device=device)),
        written=(tokens >= 0) & (tokens < position + T),
        completed=((after + 1) * S <= position + T) & ((after + 1) * S > position),
        complete=(after >= 0) & ((after + 1) * S <= position + T),
    )


def update_store(pool: Tensor, index: Tensor, layout: StoreLayout) -> tuple[Tensor, Tensor]:
    """The store ``[B, N, S, 2, D]`` and index ``[B, N, D]`` after a chunk, from its pool
    ``[B, N S + T, 2, D]`` (the store before, flattened, then the chunk's keys and values in
    the store's dtype) and the index before."""
    B, N, D = index.shape
    store = torch.where(layout.written.view(1, -1, 1, 1), pool[:, layout.written_from], 0).view(B, N, -1, 2, D)
    index = torch.where(layout.completed.view(1, -1, 1), store[:, :, :, 0].sum(2), index)
    return store, torch.where(layout.complete.view(1, -1, 1), index, 0)


def candidate_keys(
    pool: Tensor, index: Tensor | None, layout: StoreLayout, segment_len: int, pool_start: int = 0
) -> Tensor:
    """``[B, C, D]``, the index key (mean key) of each candidate: from the state's ``index``
    ``[B, N, D]`` for the slots (None: a fresh state, whose slots hold none), summed from
    the pool for the segments the chunk completes. ``pool``: the chunk's pool
    ``[B, N S + T, 2, D]`` from ``pool_start`` on (N S: the chunk's tokens alone)."""
    B, D = pool.shape[0], pool.shape[-1]
    N = layout.completed.shape[0]
    new_sums = pool[:, (layout.new_keys.flatten() - pool_start).clamp(min=0), 0].view(B, -1, segment_len, D).sum(2)
    slots = pool.new_zeros(B, N, D, dtype=new_sums.dtype) if index is None else index
    return torch.cat([slots, new_sums], dim=1) / segment_len


def candidate_segments(pool: Tensor, layout: StoreLayout, segment_len: int, pool_start: int = 0) -> Tensor:
    """``[B, C, S, 2, D]``: the keys and values of each candidate's S tokens, cut from the
    chunk's pool ``[B, N S + T, 2, D]`` from ``pool_start`` on (as ``candidate_keys``): a
    slot's from its place in the store, a segment the chunk completes from
    ``layout.new_keys`` (it may begin in the store's segment in progress and end in the
    chunk, so its tokens need not be adjacent in the pool). A candidate no query may
    retrieve (a slot of a fresh state, a segment the chunk does not complete) holds tokens
    that are never read."""
    N = layout.completed.shape[0]
    slots = torch.arange(N * segment_len, device=pool.device).view(N, segment_len)
    return pool[:, (torch.cat([slots, layout.new_keys]) - pool_start).clamp(min=0)]


def select_segments(q: Tensor, keys: Tensor, retrievable: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """The top_k candidates of each query by q . key summed over heads.

    q ``[B, T, H, d]``; keys ``[B, C, D]`` (index keys); retrievable ``[T, C]`` bool, or
    ``[B, T, C]`` (rows of packed documents, ``document_layout``).
    Returns the chosen candidates ``[B, T, k]`` (k = min(top_k, C)) and whether each is
    retrievable ``[B, T, k]`` (False where fewer than k are). No gradient flows through the
    choice.
    """
    with torch.no_grad():
        accumulate = torch.promote_types(q.dtype, torch.float32)
        scores = torch.einsum("btd,bcd->btc", q.flatten(-2).to(accumulate), keys.to(accumulate))
        scores = scores.masked_fill(~retrievable, float("-inf"))
        best, chosen = scores.topk(min(top_k, keys.shape[1]), dim=-1)
    return chosen, best > float("-inf")
