"""Validation: the mean next-byte loss of a model on fixed windows of a split."""

from __future__ import annotations

import torch
from torch import Tensor

from .data import window_starts, windows
from .device import all_reduce_sum, autocast
from .optim import next_byte_loss, window_logits


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    split: Tensor,
    offsets: Tensor,
    seq_len: int,
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
    document_starts: Tensor | None = None,
) -> float:
    """Mean next-byte loss (nats per byte) over the windows of `seq_len` + 1 bytes of
    `split` starting at `offsets`, in eval mode (the model's mode is restored after).

    Shared among `world_size` torchrun processes: rank r takes windows r, r + world_size, ...,
    batch_size / world_size at a time (batch_size is the global batch), and the float64
    sums are all-reduced, so every rank returns the same mean. `document_starts` (the
    split's, ``Corpus.split_starts``; None: windows read across documents): each document
    is read from an empty state (window_logits' starts).
    """
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for chunk in offsets[rank::world_size].split(batch_size // world_size):
        inputs, targets = (t.to(device) for t in windows(split, chunk, seq_len))
        starts = None if document_starts is None else window_starts(document_starts, chunk, seq_len).to(device)
        with autocast(device, autocast_dtype):
            logits = window_logits(model, inputs, starts)
        total += next_byte_loss(logits, targets).sum().double()
    model.train(was_training)
    return all_reduce_sum(total, world_size).item() / len(offsets)
