"""The model's memories: the state types, the working memory's ring, the long-term
store, and the layouts that place a chunk's tokens in them."""

from .layout import MemoryLayout, TokenLayout, document_layout, memory_layout, token_layout
from .state import BlockState, MemoryState, PackedState
from .store import (
    StoreLayout,
    candidate_keys,
    candidate_segments,
    select_segments,
    store_layout,
    update_store,
)
from .working import update_ring

__all__ = [
    "BlockState",
    "MemoryLayout",
    "MemoryState",
    "PackedState",
    "StoreLayout",
    "TokenLayout",
    "candidate_keys",
    "candidate_segments",
    "document_layout",
    "memory_layout",
    "select_segments",
    "store_layout",
    "token_layout",
    "update_ring",
    "update_store",
]
