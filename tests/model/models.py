"""Small model configurations and float64 references shared by the model tests."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmrec_model import MMRecConfig
from mmrec_model.memory import memory_layout
from mmrec_model.memory.layout import QUERY_BLOCK
from mmrec_model.training import next_byte_loss
from mmrec_ops.reference import recurrence_reference, scan_reference
from tests.helpers import assert_close_rel, grad_tolerance, output_tolerance

MODES = ["exact", "parallel"]


def small_config(mode: str, **overrides) -> MMRecConfig:
    """A fast configuration whose memory fills and wraps within a few hundred tokens:
    segments of 8 tokens, a store of 8 segments from which each token retrieves 3, a
    window of 20 tokens; d = 24 (not a power of two)."""
    fields = dict(
        mode=mode,
        dim=72,
        n_layers=2,
        n_heads=3,
        window=20,
        segment_len=8,
        memory_tokens=64,
        top_k=3,
        persistent_slots=3,
    )
    return MMRecConfig.preset("tiny", **{**fields, **overrides})


def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """The training loss of logits ``[B, T, V]`` of ids ``[B, T]``: the mean next-byte loss of ids[:, 1:]."""
    return next_byte_loss(logits[:, :-1], ids[:, 1:]).mean()


def assert_logits_and_grads_close(model, logits, grads, expected_logits, expected_grads, what: str) -> None:
    """Two float32 runs of a training step agree: the logits, and the gradient of every
    parameter of ``model`` (in ``named_parameters`` order), to float32 rounding."""
    assert_close_rel(logits, expected_logits, output_tolerance(torch.float32), f"logits, {what}")
    for (name, _), g, e in zip(model.named_parameters(), grads, expected_grads):
        assert_close_rel(g, e, grad_tolerance(torch.float32), f"grad of {name}, {what}")


def reference_retrieved(q: Tensor, kv: Tensor, p: int, config: MMRecConfig) -> Tensor:
    """The long-term tokens token p reads, straight from docs/design.md 2.2: q ``[B, H, d]``;
    kv ``[B, N, 2, D]`` the whole history. Segment n (tokens nS .. nS + S - 1) may be
    retrieved iff max(0, p // S - N + 1) <= n < p // S and (n + 1) S <= p - W + 1; row b
    takes the top_k of them by q . mean of its keys (summed over heads), and reads all
    their tokens. Returns one ``[K_b, 2, D]`` per row."""
    S, N, W = config.segment_len, config.store_slots, config.window
    own = p // S
    segments = [n for n in range(max(0, own - N + 1), own) if (n + 1) * S <= p - W + 1]
    rows = []
    for b in range(kv.shape[0]):
        scores = [float(q[b].flatten().detach() @ kv[b, n * S : (n + 1) * S, 0].detach().mean(0)) for n in segments]
        best = sorted(range(len(segments)), key=lambda i: -scores[i])[: config.top_k]
        rows.append(torch.cat([kv[b, segments[i] * S : (segments[i] + 1) * S] for i in best] + [kv[b, :0]]))
    return rows


def reference_attention(q: Tensor, kv: Tensor) -> Tensor:
    """Softmax attention of one token's queries q ``[B, H, d]`` over kv ``[B, K, 2, D]``
    -> ``[B, H, d]``, per head, written out."""
    B, H, d = q.shape
    keys = kv[:, :, 0].unflatten(-1, (H, d))
    values = kv[:, :, 1].unflatten(-1, (H, d))
    weights = torch.softmax(torch.einsum("bhd,bkhd->bhk", q, keys) / math.sqrt(d), dim=-1)
    return torch.einsum("bhk,bkhd->bhd", weights, values)


def reference_short_term(block, z: Tensor, k: Tensor, config: MMRecConfig) -> Tensor:
    """h ``[B, T, H, d]`` of docs/design.md 2.1 with the float64 reference loops (0 in mode 'none')."""
    H, d = config.n_heads, config.head_dim
    if config.mode == "none":
        return z.new_zeros(*z.shape[:2], H, d)
    gamma = block.mdi(z, k).unflatten(-1, (H, d))
    z = z.unflatten(-1, (H, d))
    if config.mode == "exact":
        return recurrence_reference(z, gamma, block.gate_weight, block.gate_bias)
    gate = torch.sigmoid(torch.einsum("hoi,bthi->btho", block.gate_weight, z) + block.gate_bias)
    return scan_reference(gamma, z * gate)


def reference_block(block, x: Tensor, config: MMRecConfig) -> Tensor:
    """MMRecBlock's forward from an empty state, as loops over time that follow
    docs/design.md 2.1-2.2 literally (the block's own submodules supply the weights): token p
    reads the persistent slots, the tokens of the long-term segments it retrieves and the
    keys and values of tokens p - W < s <= p, in one softmax."""
    B, T, D = x.shape
    H, d = config.n_heads, config.head_dim
    u = block.norm_mix(x)
    q, k, v, z = block.w_in(u).chunk(4, dim=-1)
    h = reference_short_term(block, z, k, config)
    kv = torch.stack([k, v], dim=2)
    persistent = block.memory.persistent.unsqueeze(0).expand(B, -1, -1, -1)
    m = []
    for p in range(T):
        working = kv[:, max(0, p - config.window + 1) : p + 1] if config.window > 0 else kv[:, :0]
        query = q[:, p].unflatten(-1, (H, d))
        retrieved = reference_retrieved(query, kv, p, config) if config.top_k > 0 else [kv[b, :0] for b in range(B)]
        m.append(
            torch.cat(
                [
                    reference_attention(query[b : b + 1], torch.cat([persistent[b], seen, working[b]]).unsqueeze(0))
                    for b, seen in enumerate(retrieved)
                ]
            )
        )
    y = x + block.w_out((h + torch.stack(m, dim=1)).flatten(-2))
    return y + block.ffn(block.norm_ffn(y))


def read_inputs(T: int, window: int, position: int, dtype: torch.dtype, device="cpu", with_window: bool = True):
    """A chunk's read as MultiMemoryAttention.forward sees it, with random keys: q, each
    query block's group (the persistent slots), the working
    memory and chunk tokens, and the chunk's read mask; ``with_window`` False: the read
    without a working memory (tokens None, the mask without their columns)."""
    config = small_config("exact", window=window)
    layout = memory_layout(torch.tensor(position, device=device), T, config)
    n_blocks, _, n_keys = layout.read_mask.shape
    B, H, d = 2, config.n_heads, config.head_dim
    n_group = n_keys - (QUERY_BLOCK + window - 1)
    q = torch.randn(B, T, H, d, dtype=dtype, device=device)
    group = torch.randn(B, n_blocks, n_group, 2, H * d, dtype=dtype, device=device)
    tokens = torch.randn(B, window - 1 + T, 2, H * d, dtype=dtype, device=device)
    if not with_window:
        return q, group, None, layout.read_mask[..., :n_group]
    return q, group, tokens, layout.read_mask
