"""MDI, multi-memory attention (the working memory's window, HDS's visibility rule) and
MMRecBlock, each against a float64 reference written from docs/design.md."""

from __future__ import annotations

import itertools

import pytest
import torch

from mmrec_model import MDI, MMRecBlock, MMRecConfig, MMRecModel
from mmrec_model.memory import candidate_keys, memory_layout, select_segments, store_layout, update_store
from mmrec_model.memory.layout import QUERY_BLOCK
from mmrec_model.model.mdi import EPS, GAMMA_INIT
from mmrec_model.model.read import (
    attend,
    flex_attend,
    op_blocked_attention,
    sdpa_blocked_attention,
    sliding_window_attention,
    working_keys,
)
from tests.helpers import FLOAT64_ACCUMULATION, assert_close_rel
from tests.model.models import read_inputs, reference_attention, reference_block, small_config

pytestmark = pytest.mark.model


@pytest.mark.parametrize("dim", [4, 72, 128], ids=lambda d: f"D{d}")
def test_mdi_shape_range_and_init(dim):
    mdi = MDI(dim)
    mdi.init_weights(init_std=0.02)
    z, k = torch.randn(3, 11, dim), torch.randn(3, 11, dim)
    gamma = mdi(z, k)
    assert gamma.shape == (3, 11, dim)
    # A fresh MDI decays by about GAMMA_INIT whatever the input: each sigmoid ~ sqrt(0.9).
    assert abs(gamma.mean().item() - GAMMA_INIT) < 0.02, gamma.mean().item()
    expected = EPS + (1 - 2 * EPS) * torch.sigmoid(mdi.A(z)) * torch.sigmoid(mdi.C(k))
    assert torch.equal(gamma, expected)


def test_mdi_gamma_stays_inside_open_interval():
    mdi = MDI(8)
    with torch.no_grad():
        for mlp in (mdi.A, mdi.C):
            mlp[2].weight.fill_(1.0)
            mlp[2].bias.zero_()
    huge = torch.linspace(-1e4, 1e4, 8 * 9).view(1, 9, 8)
    for z, k in [(huge, huge), (-huge, -huge), (huge, -huge)]:
        gamma = mdi(z, k)
        assert (gamma > 0).all() and (gamma < 1).all()
        assert gamma.min() >= EPS * (1 - 1e-6) and gamma.max() <= 1 - EPS * (1 - 1e-6)


@pytest.mark.parametrize(
    "T,window",
    [(1, 1), (13, 5), (13, 40), (QUERY_BLOCK + 45, 1), (2 * QUERY_BLOCK + 7, 29), (QUERY_BLOCK + 3, 300)],
    ids=lambda v: str(v),
)
def test_sliding_window_attention_against_reference(T, window):
    """Query blocks of QUERY_BLOCK tokens with windows shorter and longer than a block,
    against attention written out per token over keys t - W < s <= t."""
    B, H, d = 2, 3, 5
    q, k, v = (torch.randn(B, T, H, d, dtype=torch.float64) for _ in range(3))
    out = sliding_window_attention(q, k, v, window)
    kv = torch.stack([k.flatten(-2), v.flatten(-2)], dim=2)
    expected = torch.stack(
        [reference_attention(q[:, t], kv[:, max(0, t - window + 1) : t + 1]) for t in range(T)], dim=1
    )
    assert out.shape == (B, T, H, d)
    assert_close_rel(out, expected, FLOAT64_ACCUMULATION)


@pytest.mark.parametrize("window", [1, 7, QUERY_BLOCK + 9], ids=lambda w: f"W{w}")
def test_window_edge(window):
    """Token t reads token t - W + 1 but not t - W: a value seen by exactly the W tokens
    s .. s + W - 1 (a key that wins every softmax, a value only it has)."""
    T, s, H, d = 2 * QUERY_BLOCK + 30, QUERY_BLOCK - 3, 1, 4
    q, k, v = torch.ones(1, T, H, d), torch.zeros(1, T, H, d), torch.zeros(1, T, H, d)
    k[0, s], v[0, s, 0, 0] = 50.0, 1.0
    reads = sliding_window_attention(q, k, v, window)[0, :, 0, 0] > 0.5
    assert reads.nonzero().flatten().tolist() == list(range(s, min(T, s + window)))


@pytest.mark.parametrize("T,window,position", [(5, 20, 0), (131, 20, 300), (300, 150, 37)], ids=lambda v: str(v))
@pytest.mark.parametrize("with_window", [True, False], ids=["with-window", "no-window"])
def test_memory_read_kernel_matches_blocked_sdpa(T, window, position, with_window):
    """The 'memory_read' read kernel (mmrec_ops.memory_read over the tokens in place) against
    blocked SDPA over per-block copies, output and every input's gradient, with and
    without the working memory's keys."""
    q, group, tokens, mask = read_inputs(T, window, position, torch.float64, with_window=with_window)
    first_token = memory_layout(torch.tensor(position), T, small_config("exact", window=window)).first_token
    leaves = [t.requires_grad_() for t in (q, group, tokens) if t is not None]
    n_blocks, Q, _ = mask.shape
    working = None if tokens is None else working_keys(tokens, n_blocks, Q, window)
    expected = sdpa_blocked_attention(q, group, working, mask)
    out = op_blocked_attention(q, group, tokens, mask, window, first_token)
    assert_close_rel(out, expected, FLOAT64_ACCUMULATION)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(expected, leaves, grad)):
        assert_close_rel(got, want, FLOAT64_ACCUMULATION)


def test_persistent_slots_learned_and_always_visible():
    config = small_config("parallel", persistent_slots=5)
    block = MMRecBlock(config)
    assert block.memory.persistent.shape == (5, 2, config.dim)
    assert block.memory.persistent.requires_grad
    # Tokens of the first segment see no memory entry, only the persistent slots:
    # the attention stays finite and depends on them.
    model = MMRecModel(config)
    ids = torch.randint(0, 256, (2, config.segment_len))
    logits, _ = model(ids)
    assert logits.isfinite().all()
    logits.sum().backward()
    assert all(b.memory.persistent.grad.abs().sum() > 0 for b in model.blocks)


CHUNK_SCHEDULES = {
    "tokens": [1],
    "mixed": [1, 3, 7, 16, 2, 29, 64],
    "whole": [10_000],
}


def reference_choice(q: torch.Tensor, kv: torch.Tensor, p: int, config: MMRecConfig) -> list[set[int]]:
    """Per row, the segments token p retrieves (docs/design.md 2.2, written out): those it
    may retrieve, the top_k by q . mean key."""
    S, N, W = config.segment_len, config.store_slots, config.window
    own = p // S
    segments = [n for n in range(max(0, own - N + 1), own) if (n + 1) * S <= p - W + 1]
    rows = []
    for b in range(kv.shape[0]):
        scores = {n: float(q[b] @ kv[b, n * S : (n + 1) * S, 0].mean(0)) for n in segments}
        rows.append(set(sorted(segments, key=lambda n: -scores[n])[: config.top_k]))
    return rows


@pytest.mark.parametrize("schedule", list(CHUNK_SCHEDULES), ids=str)
def test_store_retrieves_the_segments_the_design_allows(schedule):
    """Each token chooses exactly the segments docs/design.md 2.2 gives it (store filled and
    wrapped: S = 3, N = 5 slots, W = 4, top_k = 2), whatever the chunking: from the
    candidates of its chunk's ``StoreLayout``, its pool and the carried store and index."""
    config = MMRecConfig(dim=4, n_heads=1, window=4, segment_len=3, memory_tokens=15, top_k=2, persistent_slots=1)
    B, T, D = 2, 200, 4
    kv = torch.randn(B, T, 2, D, dtype=torch.float64)
    q = torch.randn(B, T, 1, D, dtype=torch.float64)
    store = torch.zeros(B, config.store_slots, config.segment_len, 2, D, dtype=torch.float64)
    index = torch.zeros(B, config.store_slots, D, dtype=torch.float64)
    start = 0
    for size in itertools.cycle(CHUNK_SCHEDULES[schedule]):
        if start >= T:
            break
        chunk = kv[:, start : start + size]
        layout = store_layout(torch.tensor(start), chunk.shape[1], config)
        pool = torch.cat([store.flatten(1, 2), chunk], dim=1)
        keys = candidate_keys(pool, index, layout, config.segment_len)
        chosen, ok = select_segments(q[:, start : start + size], keys, layout.retrievable, config.top_k)
        for t in range(chunk.shape[1]):
            expected = reference_choice(q[:, start + t, 0], kv, start + t, config)
            for b in range(B):
                got = {int(layout.candidates[c]) for c, o in zip(chosen[b, t], ok[b, t]) if o}
                assert got == expected[b], f"token {start + t}, row {b}: chose {got}, expected {expected[b]}"
        store, index = update_store(pool, index, layout)
        start += chunk.shape[1]


BLOCK_VARIANTS = {
    "exact": dict(mode="exact"),
    "parallel": dict(mode="parallel"),
    "parallel-long-window": dict(mode="parallel", window=QUERY_BLOCK + 30),
    "no-window": dict(mode="exact", window=0),
    "no-long-term": dict(mode="exact", top_k=0),
    "no-recurrence": dict(mode="none"),
}


@pytest.mark.grad
@pytest.mark.parametrize("variant", list(BLOCK_VARIANTS))
def test_block_against_reference(variant):
    """The whole block, outputs and gradients of every parameter and of x, in float64,
    against the loops of reference_block (T prime and past one query block, store
    wrapped: S = 4, N = 6), in both modes and each ablation."""
    config = small_config(**{"segment_len": 4, "memory_tokens": 24, **BLOCK_VARIANTS[variant]})
    model = MMRecModel(config).double()
    block = model.blocks[0]
    T = QUERY_BLOCK + 41
    x = torch.randn(2, T, config.dim, dtype=torch.float64, requires_grad=True)
    state = model.initial_state(2).blocks[0]
    out, new_state = block(x, state, memory_layout(torch.tensor(0), T, config))
    expected = reference_block(block, x, config)
    assert out.shape == x.shape
    assert_close_rel(out, expected, FLOAT64_ACCUMULATION)
    grad_out = torch.randn_like(out)
    wrt = [x, *block.parameters()]
    grads = torch.autograd.grad(out, wrt, grad_out)
    expected_grads = torch.autograd.grad(expected, wrt, grad_out)
    names = ["x"] + [name for name, _ in block.named_parameters()]
    for name, g, e in zip(names, grads, expected_grads):
        assert_close_rel(g, e, FLOAT64_ACCUMULATION, f"grad of {name}")
    assert new_state.h.shape == (2, config.n_heads, config.head_dim)
    assert new_state.recent_kv.shape == (2, config.window, 2, config.dim)
    slots = config.store_slots if config.top_k else 0
    assert new_state.store.shape == (2, slots, config.segment_len, 2, config.dim)
    assert new_state.index.shape == (2, slots, config.dim)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_block_accepts_non_contiguous_input(layout):
    config = small_config("exact")
    model = MMRecModel(config)
    block, state = model.blocks[0], model.initial_state(2).blocks[0]
    x = torch.randn(2, 31, config.dim)
    strided = x.transpose(0, 1).contiguous().transpose(0, 1) if layout == "transposed" else x
    assert strided.is_contiguous() == (layout == "contiguous")
    layout = memory_layout(torch.tensor(5), 31, config)
    out, _ = block(strided, state, layout)
    expected, _ = block(x, state, layout)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("T,K", [(1, 70), (37, 130), (200, 64)])
def test_flex_read_of_chosen_segments_matches_the_dense_read(T, K):
    """``flex_attend`` (CUDA's read of the retrieved tokens) against ``attend`` with the
    same mask written out, forward in float64 (flex_attention has no CPU backward)."""
    B, H, d, C = 2, 3, 8, 9
    q = torch.randn(B, T, H, d, dtype=torch.float64)
    keys_values = torch.randn(B, K, 2, H * d, dtype=torch.float64)
    chosen = torch.rand(B, T, C) < 0.4
    key_candidates = torch.randint(-1, C, (K,))
    seen = chosen.gather(-1, key_candidates.clamp(min=0).expand(B, T, -1)) & (key_candidates >= 0)
    with torch.no_grad():
        out, lse = flex_attend(q, keys_values, chosen, key_candidates)
        expected_out, expected_lse = attend(q, keys_values, seen)
    assert_close_rel(out, expected_out, FLOAT64_ACCUMULATION, "out")
    assert torch.equal(lse.isinf(), expected_lse.isinf())
    finite = expected_lse.isfinite()
    assert_close_rel(lse[finite], expected_lse[finite], FLOAT64_ACCUMULATION, "lse")
