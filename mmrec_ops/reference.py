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


def recurrence_reference(
    z: Tensor, gamma: Tensor, weight: Tensor, bias: Tensor | None = None, h0: Tensor | None = None
) -> Tensor:
    """h_t = z_t * sigmoid(W h_{t-1} + b) + gamma_t * h_{t-1} per head; see ``mmrec_ops.recurrence``.

    z, gamma: ``[B, T, H, d]``; weight: ``[H, d, d]`` (row = output unit);
    bias: ``[H, d]``; h0: ``[B, H, d]``, omitted means 0.
    """
    h = torch.zeros_like(z[:, 0] if z.shape[1] > 0 else z.sum(1)) if h0 is None else h0
    outputs = []
    for t in range(z.shape[1]):
        pre = torch.einsum("hoi,bhi->bho", weight, h)
        if bias is not None:
            pre = pre + bias
        h = z[:, t] * torch.sigmoid(pre) + gamma[:, t] * h
        outputs.append(h)
    if not outputs:
        return z.new_empty(z.shape)
    return torch.stack(outputs, dim=1)


def decode_read_reference(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k / sqrt(d) + mask) v per (batch row, head); see ``mmrec_ops.decode_read``.

    q: ``[B, H, d]``; keys, values: ``[B, H, K, d]``; mask: ``[K]``.
    """
    scores = torch.einsum("bhd,bhkd->bhk", q, keys) / q.shape[-1] ** 0.5 + mask
    return torch.einsum("bhk,bhkd->bhd", torch.softmax(scores, dim=-1), values)


def skinny_addmm_reference(bias: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """bias + x @ weight, term by term; see ``mmrec_ops.skinny_addmm``.

    bias: ``[N]``; x: ``[M, K]``; weight: ``[K, N]``.
    """
    return bias + (x.unsqueeze(2) * weight.unsqueeze(0)).sum(1)


def memory_read_reference(
    q: Tensor, group: Tensor, group_mask: Tensor, tokens: Tensor, first_token: Tensor | int, window: int
) -> tuple[Tensor, Tensor]:
    """Each query's softmax over its group and its window, one query at a time; see
    ``mmrec_ops.memory_read``. Returns (out ``[B, T, H, d]``, lse ``[B, H, T]``)."""
    B, T, H, d = q.shape
    Q = group_mask.shape[1]
    outs, lses = [], []
    for t in range(T):
        n, i = divmod(t, Q)
        keys = torch.cat([group[:, n, :, 0], tokens[:, t : t + window, 0]], dim=1).unflatten(-1, (H, d))
        values = torch.cat([group[:, n, :, 1], tokens[:, t : t + window, 1]], dim=1).unflatten(-1, (H, d))
        exists = torch.arange(t, t + window, device=q.device) >= first_token
        visible = torch.cat([group_mask[n, i], exists])
        scores = torch.einsum("bhd,bkhd->bhk", q[:, t], keys) / d**0.5
        scores = scores.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.einsum("bhk,bkhd->bhd", torch.exp(scores - lse.unsqueeze(-1)), values))
        lses.append(lse)
    if not outs:
        return q.new_empty(q.shape), q.new_empty(B, H, 0)
    return torch.stack(outs, dim=1), torch.stack(lses, dim=2)


def segment_read_reference(q: Tensor, segments: Tensor, segment_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Each query's softmax over the tokens of its segments, one query at a time; see
    ``mmrec_ops.segment_read``. Returns (out ``[B, T, H, d]``, lse ``[B, H, T]``); out 0 and
    lse -inf for a query with no segment."""
    B, T, H, d = q.shape
    M, S = segments.shape[1], segments.shape[2]
    table = segments if M > 0 else segments.new_zeros(B, 1, *segments.shape[2:])  # every id is -1
    rows = torch.arange(B, device=q.device).view(B, 1)
    outs, lses = [], []
    for t in range(T):
        ids = segment_ids[:, t]  # [B, k]
        tokens = table[rows, ids.clamp(min=0)].flatten(1, 2).unflatten(-1, (H, d))  # [B, k S, 2, H, d]
        read = (ids >= 0).repeat_interleave(S, dim=1).unsqueeze(1)  # [B, 1, k S]
        seen = read.any(-1, keepdim=True)
        scores = torch.einsum("bhd,bjhd->bhj", q[:, t], tokens[:, :, 0]) / d**0.5
        # A query that reads nothing takes scores 0, so that neither it nor its gradients are NaN.
        scores = torch.where(seen, scores.masked_fill(~read, float("-inf")), 0.0)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        weights = torch.exp(scores - lse) * seen
        outs.append(torch.einsum("bhj,bjhd->bhd", weights, tokens[:, :, 1]))
        lses.append(torch.where(seen, lse, float("-inf")).squeeze(-1))
    if not outs:
        return q.new_empty(q.shape), q.new_empty(B, H, 0)
    return torch.stack(outs, dim=1), torch.stack(lses, dim=2)
