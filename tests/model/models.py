"""Small model configurations and float64 references shared by the model tests."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch._inductor.compile_fx import compile_fx

from mmrec_model import MMRecConfig
from mmrec_model.memory import QUERY_BLOCK, memory_layout
from mmrec_model.training import next_byte_loss
from mmrec_ops.reference import recurrence_reference, scan_reference
from tests.helpers import assert_close_rel, grad_tolerance, output_tolerance

MODES = ["exact", "parallel"]
# The modes, the gated read (MMRecConfig.memory_read) and the other long-term entries
# (MMRecConfig.entry_summary) beside the defaults.
VARIANTS = {
    "exact": dict(mode="exact"),
    "parallel": dict(mode="parallel"),
    "exact-gated": dict(mode="exact", memory_read="gated"),
    "exact-learned-entries": dict(mode="exact", entry_summary="learned"),
    "parallel-state-entries": dict(mode="parallel", entry_summary="state"),
    "exact-best-entries": dict(mode="exact", entry_summary="best"),
}


def variant_config(variant: str, **overrides) -> MMRecConfig:
    """small_config of a VARIANTS entry."""
    return small_config(**{**VARIANTS[variant], **overrides})


def distinct_byte_chunks(batch: int, lengths: list[int]) -> list[Tensor]:
    """Chunks ``[batch, T]`` of byte ids, for T in ``lengths``, with no byte twice in a row
    of the whole sequence (sum(lengths) <= 256). In a one-block model a key is a function
    of its byte alone, so the same byte twice ties the 'best' entries' scores: exactly
    within one code path, only to the last bit across two (a compiled chunk against the
    eager state it carries), where the choice, and with it where the gradient goes, may
    differ. Distinct bytes rule such ties out."""
    return list(torch.argsort(torch.rand(batch, 256), dim=1)[:, : sum(lengths)].split(lengths, dim=1))


def small_config(mode: str, **overrides) -> MMRecConfig:
    """A fast configuration whose memory fills and wraps within a few hundred tokens:
    segments of 8 tokens, levels of 8/32/128 tokens, 4 slots per level, a window of
    20 tokens; d = 24 (not a power of two)."""
    fields = dict(
        mode=mode,
        dim=72,
        n_layers=2,
        n_heads=3,
        window=20,
        segment_len=8,
        n_levels=3,
        level_slots=4,
        persistent_slots=3,
    )
    return MMRecConfig.preset("tiny", **{**fields, **overrides})


def noting_backend(ops: list[str]):
    """A torch.compile backend: inductor, after appending the ops of each graph it is
    given to ``ops``, to show which path compiled code took."""

    def backend(graph_module: torch.fx.GraphModule, example_inputs):
        ops.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return compile_fx(graph_module, example_inputs)

    return backend


def compile_noting_ops(module: torch.nn.Module, **options) -> tuple[torch.nn.Module, list[str]]:
    """``torch.compile(module, **options)`` through ``noting_backend``, and the ops of every
    graph it captures (filled as it compiles)."""
    ops = []
    return torch.compile(module, backend=noting_backend(ops), **options), ops


def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """The training loss of logits ``[B, T, V]`` of ids ``[B, T]``: the mean next-byte loss of ids[:, 1:]."""
    return next_byte_loss(logits[:, :-1], ids[:, 1:]).mean()


def assert_logits_and_grads_close(model, logits, grads, expected_logits, expected_grads, what: str) -> None:
    """Two float32 runs of a training step agree: the logits, and the gradient of every
    parameter of ``model`` (in ``named_parameters`` order), to float32 rounding."""
    assert_close_rel(logits, expected_logits, output_tolerance(torch.float32), f"logits, {what}")
    for (name, _), g, e in zip(model.named_parameters(), grads, expected_grads):
        assert_close_rel(g, e, grad_tolerance(torch.float32), f"grad of {name}, {what}")


def reference_visible(kv: Tensor, p: int, segment_len: int, n_levels: int, slots: int, summary=None) -> Tensor:
    """The memory entries token p may read, straight from DESIGN.md 2.2: kv ``[B, N, 2, D]``
    holds the whole history; level-l entry i is the mean over tokens [i S 4^l, (i+1) S 4^l)
    (or ``summary(span, last)`` of the span's kv ``[B, S 4^l, 2, D]`` and its last token),
    visible iff floor(j / 4^l) - M <= i < floor(j / 4^l) with j = floor(p / S).
    Returns ``[B, n, 2, D]``."""
    j = p // segment_len
    entries = []
    for level in range(n_levels):
        width, newest = segment_len * 4**level, j // 4**level
        for i in range(max(0, newest - slots), newest):
            span = kv[:, i * width : (i + 1) * width]
            entries.append(span.mean(1) if summary is None else summary(span, (i + 1) * width - 1))
    if not entries:
        return kv.new_zeros(kv.shape[0], 0, *kv.shape[2:])
    return torch.stack(entries, dim=1)


def reference_attention(q: Tensor, kv: Tensor) -> Tensor:
    """Softmax attention of one token's queries q ``[B, H, d]`` over kv ``[B, K, 2, D]``
    -> ``[B, H, d]``, per head, written out."""
    B, H, d = q.shape
    keys = kv[:, :, 0].unflatten(-1, (H, d))
    values = kv[:, :, 1].unflatten(-1, (H, d))
    weights = torch.softmax(torch.einsum("bhd,bkhd->bhk", q, keys) / math.sqrt(d), dim=-1)
    return torch.einsum("bhk,bkhd->bhd", weights, values)


def reference_short_term(block, z: Tensor, k: Tensor, config: MMRecConfig) -> Tensor:
    """h ``[B, T, H, d]`` of DESIGN.md 2.1 with the float64 reference loops (0 in mode 'none')."""
    H, d = config.n_heads, config.head_dim
    if config.mode == "none":
        return z.new_zeros(*z.shape[:2], H, d)
    gamma = block.mdi(z, k).unflatten(-1, (H, d))
    z = z.unflatten(-1, (H, d))
    if config.mode == "exact":
        return recurrence_reference(z, gamma, block.gate_weight, block.gate_bias)
    gate = torch.sigmoid(torch.einsum("hoi,bthi->btho", block.gate_weight, z) + block.gate_bias)
    return scan_reference(gamma, z * gate)


def reference_entries(block, kv: Tensor, h: Tensor, config: MMRecConfig):
    """What the long-term entries summarise, and how (``reference_visible``'s summary), as
    MMRecConfig.entry_summary says: 'learned', kv_p weighted by its head's w[p mod S], then
    mean + MLP(mean); 'state', the mean key and the state h at the span's last token;
    'best', per head the key and the gated value of the span's last highest-scoring token
    (scores compared in float32)."""
    H, d = config.n_heads, config.head_dim
    if config.entry_summary == "mean":
        return kv, None
    if config.entry_summary == "state":
        return kv, lambda span, last: torch.stack([span.mean(1)[:, 0], h[:, last].flatten(-2)], dim=1)
    if config.entry_summary == "best":
        weight = block.best_entries.score_weight

        def best(span: Tensor, last: int) -> Tensor:
            heads = span.unflatten(-1, (H, d))  # [B, w, 2, H, d]
            scores = (heads[:, :, 0] * weight).sum(-1)  # [B, w, H]
            chosen = span.shape[1] - 1 - scores.float().flip(1).argmax(1)  # the last of the highest, [B, H]
            picked = torch.stack([heads[b, chosen[b, i], :, i] for b in range(span.shape[0]) for i in range(H)])
            key, value = picked.view(span.shape[0], H, 2, d).unbind(2)  # [B, H, d] each
            gate = torch.sigmoid((key * weight).sum(-1, keepdim=True))
            return torch.stack([key.flatten(-2), (gate * value).flatten(-2)], dim=1)

        return kv, best
    entries = block.learned_entries
    weighted = torch.stack(
        [
            (kv[:, p].unflatten(-1, (H, d)) * entries.place_weight[p % config.segment_len].unsqueeze(-1)).flatten(-2)
            for p in range(kv.shape[1])
        ],
        dim=1,
    )

    def learned(span: Tensor, last: int) -> Tensor:
        mean = span.mean(1)
        return mean + torch.stack([entries.key_mlp(mean[:, 0]), entries.value_mlp(mean[:, 1])], 1)

    return weighted, learned


def reference_block(block, x: Tensor, config: MMRecConfig) -> Tensor:
    """MMRecBlock's forward from an empty state, as loops over time that follow
    DESIGN.md 2.1-2.2 literally (the block's own submodules supply the weights): token p
    reads the persistent slots, the long-term entries it may see and the keys and values
    of tokens p - W < s <= p, in one softmax (memory_read 'joint'), or the last in one
    softmax and the others in another, mixed by the token's gates (memory_read 'gated')."""
    B, T, D = x.shape
    H, d = config.n_heads, config.head_dim
    u = block.norm_mix(x)
    q, k, v, z = block.w_in(u).chunk(4, dim=-1)
    h = reference_short_term(block, z, k, config)
    kv = torch.stack([k, v], dim=2)
    entry_kv, summary = reference_entries(block, kv, h, config)
    persistent = block.memory.persistent.unsqueeze(0).expand(B, -1, -1, -1)
    m = []
    for p in range(T):
        seen = reference_visible(entry_kv, p, config.segment_len, config.n_levels, config.level_slots, summary)
        window = kv[:, max(0, p - config.window + 1) : p + 1] if config.window > 0 else kv[:, :0]
        query = q[:, p].unflatten(-1, (H, d))
        if config.memory_read == "joint":
            m.append(reference_attention(query, torch.cat([persistent, seen, window], dim=1)))
            continue
        gates = torch.sigmoid(block.read_gate(u[:, p])).unflatten(-1, (H, 2))
        read = gates[..., 1:] * reference_attention(query, torch.cat([persistent, seen], dim=1))
        if config.window > 0:
            read = read + gates[..., :1] * reference_attention(query, window)
        m.append(read)
    y = x + block.w_out((h + torch.stack(m, dim=1)).flatten(-2))
    return y + block.ffn(block.norm_ffn(y))


def read_inputs(T: int, window: int, position: int, dtype: torch.dtype, device="cpu", parts: str = "joint"):
    """A chunk's read as MultiMemoryAttention.forward sees it, with random keys: q, each
    query block's long-term group (persistent slots and HDS candidates), the working
    memory and chunk tokens, and the chunk's read mask; for ``parts`` 'joint' all of them,
    for 'long-term' or 'working' the gated read's one (the other None, its mask columns
    left out)."""
    config = small_config("exact", window=window)
    layout = memory_layout(torch.tensor(position, device=device), T, config)
    n_blocks, _, n_keys = layout.read_mask.shape
    B, H, d = 2, config.n_heads, config.head_dim
    n_group = n_keys - (QUERY_BLOCK + window - 1)
    q = torch.randn(B, T, H, d, dtype=dtype, device=device)
    group = torch.randn(B, n_blocks, n_group, 2, H * d, dtype=dtype, device=device)
    tokens = torch.randn(B, window - 1 + T, 2, H * d, dtype=dtype, device=device)
    mask = layout.read_mask
    return {
        "joint": (q, group, tokens, mask),
        "long-term": (q, group, None, mask[..., :n_group]),
        "working": (q, None, tokens, mask[..., n_group:]),
    }[parts]
