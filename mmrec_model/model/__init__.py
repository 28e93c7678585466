"""The MM-Rec language model: ``MMRecModel`` (``lm``), its blocks (``block``), MDI's decay
(``mdi``) and the multi-memory read (``read``)."""

from .block import MMRecBlock
from .lm import MMRecModel
from .mdi import MDI
from .read import MultiMemoryAttention

__all__ = ["MDI", "MMRecBlock", "MMRecModel", "MultiMemoryAttention"]
