"""Sampling the next token from a model's logits."""

from __future__ import annotations

import torch
from torch import Tensor


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: expected max_new_tokens to be an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"generate: expected temperature >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: expected top_k to be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"generate: expected top_p in (0, 1] or None, got {top_p!r}")


def sample(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> Tensor:
    """One token per row of logits ``[B, V]`` -> ``[B, 1]``."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ranked, order = logits.sort(dim=-1, descending=True)
        probabilities = torch.softmax(ranked, dim=-1)
        # A token stays if the tokens likelier than it hold less than top_p: the first always does.
        before = probabilities.cumsum(dim=-1) - probabilities
        logits = logits.scatter(-1, order, ranked.masked_fill(before >= top_p, float("-inf")))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
