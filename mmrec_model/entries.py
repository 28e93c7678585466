"""Long-term entries other than means: learned summaries (``MMRecConfig.entry_summary =
'learned'``) and one chosen token (``'best'``)."""

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


def order_key(score: Tensor) -> Tensor:
    """int64 keys in [-2^31, 2^31) that order like the float32 ``score``: its bit
    patterns, with the magnitude bits of the negatives flipped."""
    bits = score.float().contiguous().view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)


class BestTokenEntries(nn.Module):
    """Long-term entries that each keep one token: per head, the key and value of the
    token of the entry's span whose key scores highest, the value gated by its score,

        t* = argmax_{t in span} s_t,h,   s_t,h = k_t,h . a_h,   entry_h = (k_t*,h, sigmoid(s_t*,h) v_t*,h)

    (the last such token on a tie; scores compared in float32). A level-l entry is the best of its 4 children, the
    same token. The score is a function of the key, so a span's running state is its
    best (key, value) so far, which HDS keeps where the means keep running sums; the
    choice is not differentiable, and a_h learns through the gate."""

    def __init__(self, n_heads: int, head_dim: int):
        super().__init__()
        self.score_weight = nn.Parameter(torch.empty(n_heads, head_dim))

    @torch.no_grad()
    def init_weights(self, init_std: float) -> None:
        nn.init.normal_(self.score_weight, std=init_std)

    def score(self, keys: Tensor) -> Tensor:
        """s ``[..., H]`` of keys ``[..., D]``, in float32 or wider."""
        dtype = torch.promote_types(keys.dtype, torch.float32)
        heads = keys.unflatten(-1, (self.score_weight.shape[0], -1)).to(dtype)
        return (heads * self.score_weight.to(dtype)).sum(-1)

    def key(self, kv: Tensor) -> Tensor:
        """``order_key`` of the scores ``[..., H]`` of kv ``[..., 2, D]``, rounded to float32
        (the choice compares them there, whatever the compute dtype)."""
        return order_key(self.score(kv[..., 0, :]).float())

    def better(self, best: Tensor, new: Tensor) -> Tensor:
        """Per head, ``new`` where it scores at least as high as ``best`` (both ``[..., 2, D]``)."""
        wins = (self.key(new) >= self.key(best)).unsqueeze(-1)  # [..., H, 1]
        chosen = torch.where(
            wins.unsqueeze(-3), new.unflatten(-1, (wins.shape[-2], -1)), best.unflatten(-1, (wins.shape[-2], -1))
        )
        return chosen.flatten(-2)

    def finish(self, level: int, chosen: Tensor) -> Tensor:
        """The entries ``[B, n, 2, D]`` of the chosen tokens' kv ``[B, n, 2, D]`` (any level)."""
        gate = torch.sigmoid(self.score(chosen[..., 0, :])).to(chosen.dtype).unsqueeze(-1)  # [B, n, H, 1]
        values = (chosen[..., 1, :].unflatten(-1, (gate.shape[-2], -1)) * gate).flatten(-2)
        return torch.stack([chosen[..., 0, :], values], dim=-2)
