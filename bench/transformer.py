"""The Transformer that bench.model_gpu and bench.quality compare MM-Rec with: a
GPT of the same width and depth (byte vocabulary, rotary position embeddings, PyTorch
SDPA, RMSNorm, GELU FFN, tied head).

Written for the comparison only, not part of the package. Causal self-attention
runs through ``F.scaled_dot_product_attention(is_causal=True)`` (flash kernels on
CUDA). Generation keeps a preallocated KV cache ``[B, H, T_max, d]`` per layer.
With ``window = W`` set, token t attends to tokens t - W < s <= t only, through
MM-Rec's ``sliding_window_attention`` (O(T W)); that variant has no KV-cache decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import mmrec_ops
from mmrec_model.model.read import sliding_window_attention

DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class TransformerConfig:
    vocab_size: int = 256
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_mult: int = 4
    norm_eps: float = 1e-6
    init_std: float = 0.02
    rope_base: float = 10000.0
    window: int | None = None  # None: full causal attention; W: the last W tokens

    def __post_init__(self) -> None:
        if self.window is not None and not (type(self.window) is int and self.window >= 1):
            raise ValueError(f"TransformerConfig.window: expected a positive int or None, got {self.window!r}")


def rotary_tables(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin ``[T, d/2]`` of the rotation angles positions_t * base^(-2i/d)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq
    return angles.cos(), angles.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE (rotate-half pairing) of queries or keys ``[B, H, T, d]``, in x's dtype
    (as common implementations do: no float32 copies of q and k)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys and values of the tokens seen so far, per layer ``[B, H, T_max, d]``."""

    def __init__(self, config: TransformerConfig, batch_size: int, max_len: int, device, dtype):
        d = config.dim // config.n_heads
        shape = (batch_size, config.n_heads, max_len, d)
        # Zeros, not empty: StaticDecoder reads every slot (masked), and 0 * NaN is NaN.
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0

    def nbytes(self, length: int | None = None) -> int:
        """Bytes the cache of ``length`` tokens (default: those seen) holds."""
        length = self.length if length is None else length
        per_token = sum(t[:, :, :1].nbytes for t in self.keys + self.values)
        return per_token * length


class Block(nn.Module):
    """x + Attn(RMSNorm(x)), then + FFN(RMSNorm(.)); x ``[B, T, D]``."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        D = config.dim
        self.n_heads = config.n_heads
        self.window = config.window
        self.norm_attn = nn.RMSNorm(D, eps=config.norm_eps)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.proj = nn.Linear(D, D, bias=False)
        self.norm_ffn = nn.RMSNorm(D, eps=config.norm_eps)
        self.ffn = nn.Sequential(nn.Linear(D, config.ffn_mult * D), nn.GELU(), nn.Linear(config.ffn_mult * D, D))
        residual_std = config.init_std / math.sqrt(2 * config.n_layers)
        nn.init.normal_(self.qkv.weight, std=config.init_std)
        nn.init.normal_(self.proj.weight, std=residual_std)
        nn.init.normal_(self.ffn[0].weight, std=config.init_std)
        nn.init.zeros_(self.ffn[0].bias)
        nn.init.normal_(self.ffn[2].weight, std=residual_std)
        nn.init.zeros_(self.ffn[2].bias)

    def rotated_qkv(self, x: Tensor, rotation: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """q, k (rotated), v ``[B, H, T, d]`` of x ``[B, T, D]``."""
        q, k, v = (
            t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2) for t in self.qkv(self.norm_attn(x)).chunk(3, -1)
        )
        return rotate(q, *rotation), rotate(k, *rotation), v

    def residual(self, x: Tensor, attn: Tensor) -> Tensor:
        """The block's output from its input x ``[B, T, D]`` and attention ``[B, H, T, d]``."""
        x = x + self.proj(attn.transpose(1, 2).flatten(-2))
        return x + self.ffn(self.norm_ffn(x))

    def decode(self, x: Tensor, rotation, keys: Tensor, values: Tensor, position: Tensor, bias: Tensor) -> Tensor:
        """One token x ``[B, 1, D]`` at ``position`` (``[1]``, a tensor) against the whole
        preallocated cache ``[B, H, T_max, d]``, the slots after it masked out (``bias``
        ``[T_max]``, -inf there). The read as MM-Rec's decoder computes it,
        ``mmrec_ops.decode_read`` (SDPA's kernels are slow for one query row)."""
        q, k, v = self.rotated_qkv(x, rotation)
        keys.index_copy_(2, position, k)
        values.index_copy_(2, position, v)
        return self.residual(x, mmrec_ops.decode_read(q.squeeze(2), keys, values, bias.to(q.dtype)).unsqueeze(2))

    def forward(
        self, x: Tensor, rotation: tuple[Tensor, Tensor], cache: KVCache | None = None, layer: int = 0
    ) -> Tensor:
        """x ``[B, T, D]``; rotation: cos and sin of x's positions (``rotary_tables``)."""
        q, k, v = self.rotated_qkv(x, rotation)
        if self.window is not None:
            # The window function takes and returns [B, T, H, d], and views its inputs as blocks.
            qkv = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            attn = sliding_window_attention(*qkv, self.window).transpose(1, 2)
        elif cache is None:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            start, end = cache.length, cache.length + x.shape[1]
            cache.keys[layer][:, :, start:end] = k
            cache.values[layer][:, :, start:end] = v
            keys, values = cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end]
            # One new token attends to every cached one; a longer chunk (the prompt,
            # starting from an empty cache) is causal within itself. Not cuDNN's kernel:
            # it builds a new plan for every cache length (milliseconds per token).
            with sdpa_kernel(DECODE_BACKENDS):
                attn = F.scaled_dot_product_attention(q, keys, values, is_causal=x.shape[1] > 1)
        return self.residual(x, attn)


class Transformer(nn.Module):
    """ids ``[B, T]`` -> logits ``[B, T, vocab]``; with a ``KVCache``, continues its sequences."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        nn.init.normal_(self.embed.weight, std=config.init_std)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, ids: Tensor, cache: KVCache | None = None) -> Tensor:
        if cache is not None and cache.length > 0 and ids.shape[1] > 1:
            raise ValueError("Transformer: with a non-empty cache, expected one token per call")
        if cache is not None and self.config.window is not None:
            raise ValueError("Transformer: a windowed model (config.window) has no KV-cache decoding")
        x = self.embed(ids)
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        rotation = rotary_tables(positions, self.config.dim // self.config.n_heads, self.config.rope_base)
        for layer, block in enumerate(self.blocks):
            x = block(x, rotation, cache, layer)
        if cache is not None:
            cache.length += ids.shape[1]
        return F.linear(self.norm(x), self.embed.weight)


class StaticDecoder(nn.Module):
    """``model``'s one-token step against ``cache`` (filled by a prompt through
    ``model(ids, cache)``) with static shapes, gpt-fast's layout: the cache's tensors as
    buffers (fixed addresses), the position a tensor ``[1]``, every slot read under a mask,
    so that ``torch.compile(decoder, mode="reduce-overhead")`` runs one CUDA graph at
    every position. The comparison's counterpart to MM-Rec's CUDA-graph decoding.

        decoder = torch.compile(StaticDecoder(model, cache), mode="reduce-overhead", fullgraph=True)
        logits = decoder(token, position)    # token [B, 1], position [1] -> logits [B, V]
    """

    def __init__(self, model: Transformer, cache: KVCache):
        super().__init__()
        self.model = model
        for layer, (keys, values) in enumerate(zip(cache.keys, cache.values)):
            self.register_buffer(f"keys_{layer}", keys, persistent=False)
            self.register_buffer(f"values_{layer}", values, persistent=False)
        slots = torch.arange(cache.keys[0].shape[2], device=cache.keys[0].device)
        self.register_buffer("slots", slots, persistent=False)

    def forward(self, token: Tensor, position: Tensor) -> Tensor:
        model = self.model
        x = model.embed(token)
        rotation = rotary_tables(position, model.config.dim // model.config.n_heads, model.config.rope_base)
        bias = torch.where(self.slots <= position, 0.0, float("-inf"))  # [T_max]
        for layer, block in enumerate(model.blocks):
            keys, values = getattr(self, f"keys_{layer}"), getattr(self, f"values_{layer}")
            x = block.decode(x, rotation, keys, values, position, bias)
        return F.linear(model.norm(x), model.embed.weight)[:, -1]
