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


def bottleneck_mlp(dim: int) -> nn.Sequential:
    """D -> D/4 -> D with GELU (its owner initialises it)."""
    return nn.Sequential(nn.Linear(dim, dim // 4), nn.GELU(), nn.Linear(dim // 4, dim))


class MDI(nn.Module):
    """gamma = eps + (1 - 2 eps) * sigmoid(A(z)) * sigmoid(C(k)), in (0, 1).

    A and C are two-layer MLPs (D -> D/4 -> D, GELU). Input-only, so computed for
    all t at once: z, k ``[B, T, D]`` -> gamma ``[B, T, D]``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.A = bottleneck_mlp(dim)
        self.C = bottleneck_mlp(dim)

    @torch.no_grad()
    def init_weights(self, init_std: float) -> None:
        """Small weights and each last bias at logit(sqrt(GAMMA_INIT)), so that gamma
        starts near GAMMA_INIT whatever the input."""
        logit = math.log(math.sqrt(GAMMA_INIT) / (1 - math.sqrt(GAMMA_INIT)))
        for mlp in (self.A, self.C):
            nn.init.normal_(mlp[0].weight, std=init_std)
            nn.init.zeros_(mlp[0].bias)
            nn.init.normal_(mlp[2].weight, std=init_std)
            nn.init.constant_(mlp[2].bias, logit)

    def forward(self, z: Tensor, k: Tensor) -> Tensor:
        return EPS + (1 - 2 * EPS) * torch.sigmoid(self.A(z)) * torch.sigmoid(self.C(k))
