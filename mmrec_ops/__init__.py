"""MM-Rec operators: fused recurrent-memory kernels registered as torch.ops.mmrec.*.

    import mmrec_ops
    h = mmrec_ops.scan(gamma, x)          # torch.ops.mmrec.scan
    p = mmrec_ops.cumprod(gamma)          # scan without x: cumulative product
    h = mmrec_ops.recurrence(z, gamma, W) # torch.ops.mmrec.recurrence
    m = mmrec_ops.decode_read(q, k, v, mask)  # one query per row against a cache
    o, lse = mmrec_ops.memory_read(q, group, group_mask, tokens, first_token, W)  # a training step's read
    o, lse = mmrec_ops.segment_read(q, segments, segment_ids)  # each query over its chosen segments
    y = mmrec_ops.skinny_addmm(b, x, w)   # bias + x @ w for a few rows of x

The compiled library (mmrec_ops._C) is required; importing this package
without it raises ImportError with build instructions.
"""

from ._library import load_library
from ._version import __version__

_C = load_library()

if _C is not None:  # None only inside `python -m mmrec_ops.check`, which reports why
    from .ops.decode_read import decode_read
    from .ops.memory_read import memory_read
    from .ops.recurrence import recurrence
    from .ops.scan import cumprod, scan
    from .ops.segment_read import segment_read
    from .ops.skinny_addmm import skinny_addmm

__all__ = [
    "__version__",
    "cumprod",
    "decode_read",
    "memory_read",
    "recurrence",
    "scan",
    "segment_read",
    "skinny_addmm",
]
