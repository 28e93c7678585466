"""The state of an MMRecModel: what each block remembers after some tokens."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class BlockState(NamedTuple):
    """The memory of one block after some tokens; ``[..., 2, D]`` is (key, value).

    h:         ``[B, H, d]``, the recurrence state h_{t-1}.
    recent_kv: ``[B, W, 2, D]``, the working memory's ring (``memory.working``): the keys
               and values of the last W tokens, the token at position t in slot t mod W.
    store:     ``[B, N, S, 2, D]``, the long-term store (``memory.store``): segment n (the
               tokens nS .. nS + S - 1) in slot n mod N, token nS + i at [n mod N, i], the
               segment in progress included. Which segment a slot holds follows from the
               position.
    index:     ``[B, N, D]``, each slot's index key times S: the sum of its segment's keys,
               written when the segment completes.
    """

    h: Tensor
    recent_kv: Tensor
    store: Tensor
    index: Tensor


class MemoryState(NamedTuple):
    """The state of an ``MMRecModel``: passed into ``forward`` and returned, never
    stored on a module. A pytree of tensors, so ``torch.compile`` accepts it.

    position: int64 scalar tensor, the number of tokens seen so far (the absolute
              position of the next token). A tensor, not an int, so that compiled
              code does not specialise on it. The number of complete segments is
              ``position // S``.
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


class PackedState(NamedTuple):
    """The state after rows of packed documents (``MMRecModel.forward`` with ``starts``):
    a ``MemoryState``'s position and blocks, and where each row's current document began,
    so that a later call goes on reading it alone.

    document_start: ``[B]`` int64, the absolute position of the first token of each row's
                    current document.
    """

    position: Tensor
    blocks: tuple[BlockState, ...]
    document_start: Tensor

    def clone(self) -> PackedState:
        return PackedState(*MemoryState(self.position, self.blocks).clone(), self.document_start.clone())

    def detach(self) -> PackedState:
        return PackedState(*MemoryState(self.position, self.blocks).detach(), self.document_start)
