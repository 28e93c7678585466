"""MMRecBlock: recurrence (short-term memory) plus HDS attention (long-term memory)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import mmrec_ops

from .attention import MemoryAttention
from .config import MMRecConfig
from .mdi import MDI
from .memory import BlockState, MemoryLayout, read_and_update


class MMRecBlock(nn.Module):
    """One MM-Rec block (DESIGN.md 2.1), x ``[B, T, D]`` -> ``[B, T, D]``:

        u          = RMSNorm(x)
        q, k, v, z = split(u W_in)
        gamma      = MDI(z, k)
        h          = recurrence(z, gamma, W_g, b_g, h0)      per head, [B, T, H, d]
        m          = MemoryAttention(q, HDS memory)
        y          = x + W_o (h + m)
        out        = y + FFN(RMSNorm(y))

    ``recurrence`` is, in mode 'exact', h_t = z_t sigmoid(W_g h_{t-1} + b_g) + gamma_t h_{t-1}
    (``mmrec.recurrence``), and in mode 'parallel' the gate reads the input instead,
    h_t = z_t sigmoid(W_g z_t + b_g) + gamma_t h_{t-1} (``mmrec.scan``). Same parameters.
    """

    def __init__(self, config: MMRecConfig):
        super().__init__()
        D, H, d, std = config.dim, config.n_heads, config.head_dim, config.init_std
        self.n_heads, self.mode, self.segment_len = H, config.mode, config.segment_len
        self.norm_mix = nn.RMSNorm(D, eps=config.norm_eps)
        self.w_in = nn.Linear(D, 4 * D, bias=False)
        self.mdi = MDI(D, std)
        self.gate_weight = nn.Parameter(torch.randn(H, d, d) / math.sqrt(d))
        self.gate_bias = nn.Parameter(torch.zeros(H, d))
        self.memory = MemoryAttention(D, config.persistent_slots, std)
        self.w_out = nn.Linear(D, D, bias=False)
        self.norm_ffn = nn.RMSNorm(D, eps=config.norm_eps)
        self.ffn = nn.Sequential(
            nn.Linear(D, config.ffn_mult * D), nn.GELU(), nn.Linear(config.ffn_mult * D, D)
        )
        # Residual branches scaled down with depth (GPT-2), so the residual stream
        # keeps its scale at init whatever the number of layers.
        residual_std = std / math.sqrt(2 * config.n_layers)
        nn.init.normal_(self.w_in.weight, std=std)
        nn.init.normal_(self.w_out.weight, std=residual_std)
        nn.init.normal_(self.ffn[0].weight, std=std)
        nn.init.zeros_(self.ffn[0].bias)
        nn.init.normal_(self.ffn[2].weight, std=residual_std)
        nn.init.zeros_(self.ffn[2].bias)

    def recurrence(self, z: Tensor, gamma: Tensor, h0: Tensor) -> Tensor:
        """h ``[B, T, H, d]`` from z, gamma ``[B, T, H, d]`` and h0 ``[B, H, d]``, in z's dtype
        (autocast leaves the parameters in float32; the ops want one dtype)."""
        weight, bias = self.gate_weight.to(z.dtype), self.gate_bias.to(z.dtype)
        gamma, h0 = gamma.to(z.dtype), h0.to(z.dtype)
        if self.mode == "exact":
            return mmrec_ops.recurrence(z, gamma, weight, bias, h0)
        gate = torch.sigmoid(torch.einsum("hoi,bthi->btho", weight, z) + bias)
        return mmrec_ops.scan(gamma, z * gate, h0)

    def forward(
        self, x: Tensor, state: BlockState, position: Tensor, layout: MemoryLayout | None = None
    ) -> tuple[Tensor, BlockState]:
        """x ``[B, T, D]``, state of this block, position (int64 scalar) of x's first token
        -> (out ``[B, T, D]``, new state). ``layout``: the chunk's ``memory_layout``, which
        the model computes once for all its blocks (computed here when omitted)."""
        q, k, v, z = self.w_in(self.norm_mix(x)).chunk(4, dim=-1)
        gamma = self.mdi(z, k)
        heads = (self.n_heads, -1)
        h = self.recurrence(z.unflatten(-1, heads), gamma.unflatten(-1, heads), state.h)
        kv = torch.stack([k, v], dim=2)
        candidates, mask, memory, sums = read_and_update(
            kv, state.memory, state.sums, position, self.segment_len, layout
        )
        m = self.memory(q.unflatten(-1, heads), candidates, mask)
        y = x + self.w_out((h + m.to(h.dtype)).flatten(-2))
        out = y + self.ffn(self.norm_ffn(y))
        # A copy, not a view: the state must not keep the whole [B, T, H, d] h alive.
        return out, BlockState(h[:, -1].to(state.h.dtype, memory_format=torch.contiguous_format, copy=True), memory, sums)
