"""Learned long-term entries (``MMRecConfig.entry_summary = 'learned'``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .mdi import bottleneck_mlp


class LearnedEntries(nn.Module):
    """What a long-term entry holds, learned: each token's key and value weighted per head
    by a learned weight of its place in its level-0 span, averaged over the entry's span,
    then a residual MLP each for keys and values:

        mean_l = mean over the span of w[p mod S] kv_p          w: [S, 2, H]
        entry  = mean_l + (MLP_k(mean_l,k), MLP_v(mean_l,v))

    The weighted mean is what HDS's running sums accumulate (``weigh`` before
    ``update_long_term``), so it stays exact across chunks; ``finish`` maps the means of
    every level to its entries. At init w = 1 and the MLPs' outputs are small: about
    the plain means.
    """

    def __init__(self, dim: int, n_heads: int, segment_len: int):
        super().__init__()
        self.place_weight = nn.Parameter(torch.empty(segment_len, 2, n_heads))
        self.key_mlp = bottleneck_mlp(dim)
        self.value_mlp = bottleneck_mlp(dim)

    @torch.no_grad()
    def init_weights(self, init_std: float) -> None:
        nn.init.ones_(self.place_weight)
        for mlp in (self.key_mlp, self.value_mlp):
            for linear in (mlp[0], mlp[2]):
                nn.init.normal_(linear.weight, std=init_std)
                nn.init.zeros_(linear.bias)

    def weigh(self, kv: Tensor, phase: Tensor) -> Tensor:
        """kv ``[B, T, 2, D]`` of tokens at places ``phase`` ``[T]`` in their spans -> the
        weighted kv ``[B, T, 2, D]``."""
        weight = self.place_weight[phase].to(kv.dtype).unsqueeze(-1)  # [T, 2, H, 1]
        return (kv.unflatten(-1, (weight.shape[2], -1)) * weight).flatten(-2)

    def finish(self, level: int, means: Tensor) -> Tensor:
        """The entries ``[B, n, 2, D]`` of the weighted means ``[B, n, 2, D]`` (any level)."""
        residual = torch.stack([self.key_mlp(means[:, :, 0]), self.value_mlp(means[:, :, 1])], dim=2)
        return means + residual.to(means.dtype)
