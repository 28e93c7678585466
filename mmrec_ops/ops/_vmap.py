"""Helpers of the vmap batching rules (torch.library.register_vmap).

A rule folds the vmapped dimension, of size V, into a dimension the kernels
already treat as independent rows (the batch, or the heads of the recurrence),
calls the op once, and unfolds it from the outputs. Where a vmapped argument
is shared by every row of a call (a mask, a product's weight), the rule calls
the op once per instance instead (`per_instance`), as torch's fallback would,
without its warning.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fold(t: Tensor | None, vmapped_dim: int | None, size: int, into: int) -> Tensor | None:
    """t with its vmapped dim (size V) merged into dim `into` of the per-sample
    shape: [..., n, ...] -> [..., V * n, ...], V outermost. An input that is not
    vmapped (vmapped_dim None) is repeated V times; None stays None."""
    if t is None:
        return None
    if vmapped_dim is None:
        t = t.unsqueeze(into).expand(*t.shape[:into], size, *t.shape[into:])
    else:
        t = t.movedim(vmapped_dim, into)
    return t.flatten(into, into + 1)


def unfold(t: Tensor, dim: int, size: int) -> Tensor:
    """Inverse of fold on an output: [..., V * n, ...] -> [..., V, n, ...] at dim."""
    return t.unflatten(dim, (size, t.shape[dim] // size))


def padded(in_dims: tuple, count: int) -> tuple:
    """in_dims for all `count` arguments: those the caller left at their
    defaults (dropped by the dispatcher) are not vmapped."""
    return (*in_dims, *([None] * (count - len(in_dims))))


def per_instance(op, args: tuple, in_dims: tuple, size: int) -> tuple:
    """(outputs, out_dims) of op called on each of the V instances of args
    (in_dims as the rule got them), the outputs stacked at dim 0."""
    results = [
        op(*(a if d is None else a.select(d, i) for a, d in zip(args, padded(in_dims, len(args))))) for i in range(size)
    ]
    if isinstance(results[0], tuple):
        return tuple(torch.stack(outs) for outs in zip(*results)), (0,) * len(results[0])
    return torch.stack(results), 0
