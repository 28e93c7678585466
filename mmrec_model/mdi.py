"""MDI (memory decay/integration): the input-dependent decay gamma of the recurrence."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Keeps gamma strictly inside (0, 1) in float32, so that the state never
# freezes (gamma = 1) or forgets in one step (gamma = 0).
EPS = 1e-6
# gamma starts near this value: each of the two sigmoids starts near its square root.
GAMMA_INIT = 0.9


def _mlp(dim: int, init_std: float, bias_init: float) -> nn.Sequential:
    """D -> D/4 -> D with GELU; the last layer's weights small and its bias at
    ``bias_init``, so the output starts near ``bias_init`` whatever the input."""
    hidden = dim // 4
    mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
    nn.init.normal_(mlp[0].weight, std=init_std)
    nn.init.zeros_(mlp[0].bias)
    nn.init.normal_(mlp[2].weight, std=init_std)
    nn.init.constant_(mlp[2].bias, bias_init)
    return mlp


class MDI(nn.Module):
    """gamma = eps + (1 - 2 eps) * sigmoid(A(z)) * sigmoid(C(k)), in (0, 1).

    A and C are two-layer MLPs (D -> D/4 -> D, GELU). Input-only, so computed for
    all t at once: z, k ``[B, T, D]`` -> gamma ``[B, T, D]``.
    """

    def __init__(self, dim: int, init_std: float):
        super().__init__()
        logit = math.log(math.sqrt(GAMMA_INIT) / (1 - math.sqrt(GAMMA_INIT)))
        self.A = _mlp(dim, init_std, logit)
        self.C = _mlp(dim, init_std, logit)

    def forward(self, z: Tensor, k: Tensor) -> Tensor:
        return EPS + (1 - 2 * EPS) * torch.sigmoid(self.A(z)) * torch.sigmoid(self.C(k))
