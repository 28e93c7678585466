"""Multi-memory attention: each token reads the long-term memory it may see."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MemoryAttention(nn.Module):
    """Multi-head softmax attention of the queries over memory candidates and P
    persistent slots, with PyTorch's SDPA and a visibility mask.

        m_t = sum_c softmax_c(q_t . k_c / sqrt(d) | visible(t, c)) v_c

    The P >= 1 persistent (learned) key/value slots are always visible, so no query
    row is fully masked (which SDPA would turn into NaN). Cost O(T K), K candidates.
    """

    def __init__(self, dim: int, persistent_slots: int, init_std: float):
        super().__init__()
        # The scale of a projection u W of a unit-RMS input u, like the keys and
        # values the memory summarises.
        self.persistent = nn.Parameter(torch.randn(persistent_slots, 2, dim) * (init_std * math.sqrt(dim)))

    def forward(self, q: Tensor, candidates: Tensor, mask: Tensor) -> Tensor:
        """q ``[B, T, H, d]``; candidates ``[B, K, 2, D]`` (key, value); mask ``[T, K]``
        bool (True: visible) -> ``[B, T, H, d]``."""
        B, T, H, d = q.shape
        persistent = self.persistent.unsqueeze(0).expand(B, -1, -1, -1)
        kv = torch.cat([persistent, candidates.to(persistent.dtype)], dim=1).to(q.dtype)
        keys = kv[:, :, 0].unflatten(-1, (H, d)).transpose(1, 2)
        values = kv[:, :, 1].unflatten(-1, (H, d)).transpose(1, 2)
        always = torch.ones(T, self.persistent.shape[0], dtype=torch.bool, device=mask.device)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=torch.cat([always, mask], dim=1)
        )
        return out.transpose(1, 2)
