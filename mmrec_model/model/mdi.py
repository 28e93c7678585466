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

    def folded(self, w_in: Tensor) -> dict[str, Tensor]:
        """Both MLPs at once for a one-token step, their first layers folded into the block's
        input projection ``w_in`` ``[4 D, D]`` (rows q, k, v, z): the rows and bias to append
        to it, ``rows`` ``[2 hidden, D]`` and ``bias`` ``[2 hidden]`` (A's first layer of z's
        rows, C's of k's); the second layers as one block-diagonal product, transposed,
        ``second_t`` ``[2 hidden, 2 D]``, its bias ``second_bias`` ``[2 D]``; and ``eps``, EPS
        as a tensor ``[]`` (``gamma_of_logits``)."""
        A, C = self.A, self.C
        D, hidden = w_in.shape[1], A[0].out_features
        second = A[2].weight.new_zeros(2 * D, 2 * hidden)
        second[:D, :hidden], second[D:, hidden:] = A[2].weight, C[2].weight
        return dict(
            rows=torch.cat([A[0].weight @ w_in[3 * D :], C[0].weight @ w_in[D : 2 * D]]),
            bias=torch.cat([A[0].bias, C[0].bias]),
            second_t=second.t().contiguous(),
            second_bias=torch.cat([A[2].bias, C[2].bias]),
            eps=w_in.new_tensor(EPS),
        )

    @staticmethod
    def gamma_of_logits(logits: Tensor, eps: Tensor) -> Tensor:
        """gamma ``[B, D]`` of the second layers' outputs ``[B, 2 D]`` (A's, then C's; ``folded``),
        eps + (1 - 2 eps) sigmoid(a) sigmoid(c) in one sigmoid and one addcmul; ``eps``: EPS
        ``[]`` on logits' device."""
        both = torch.sigmoid(logits)
        D = both.shape[-1] // 2
        return torch.addcmul(eps, both[:, :D], both[:, D:], value=1 - 2 * EPS)
