"""The model's memories: the state types, the working memory's ring, the long-term
memory HDS, and the layouts that place a chunk's tokens in them."""

from .hds import update_long_term, update_long_term_token
from .layout import MemoryLayout, TokenLayout, memory_layout, span_len, token_layout
from .state import BlockState, MemoryState
from .working import update_ring

__all__ = [
    "BlockState",
    "MemoryLayout",
    "MemoryState",
    "TokenLayout",
    "memory_layout",
    "span_len",
    "token_layout",
    "update_long_term",
    "update_long_term_token",
    "update_ring",
]
