"""Plain PyTorch references of the mmrec operators, for tests and benchmarks only.

Readable loops over time in the dtype they are given: the tests run them on
float64 copies of the inputs, and autograd through them gives the reference
gradients. Nothing in the package calls them: there is no fallback to Python.
"""

from __future__ import annotations

import torch
from torch import Tensor


def scan_reference(gamma: Tensor, x: Tensor | None = None, h0: Tensor | None = None, reverse: bool = False) -> Tensor:
    """h_t = gamma_t * h_{t-1} + x_t over dim 1 of ``[B, T, ...]``; see ``mmrec_ops.scan``.

    x omitted means 0; h0 (``[B, ...]``) omitted means 0 with x and 1 without,
    so ``scan_reference(gamma)`` is ``torch.cumprod(gamma, 1)``.
    """
    step = gamma[:, 0] if gamma.shape[1] > 0 else gamma.sum(1)
    if h0 is None:
        h0 = torch.zeros_like(step) if x is not None else torch.ones_like(step)
    h = h0
    outputs = [None] * gamma.shape[1]
    times = range(gamma.shape[1] - 1, -1, -1) if reverse else range(gamma.shape[1])
    for t in times:
        h = gamma[:, t] * h
        if x is not None:
            h = h + x[:, t]
        outputs[t] = h
    if not outputs:
        return gamma.new_empty(gamma.shape)
    return torch.stack(outputs, dim=1)
