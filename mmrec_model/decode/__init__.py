"""Decoding: ``Decoder``, a model's one-token step on fixed buffers updated in place
(optionally replayed as CUDA graphs), and the sampling of the next token."""

from .decoder import Decoder
from .sampling import check_sampling, sample

__all__ = ["Decoder", "check_sampling", "sample"]
