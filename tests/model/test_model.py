"""MMRecModel: causality, invariance to chunking, gradient flow, generation, state
handling, initialisation and input errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.utils._pytree as pytree

from mmrec_model import MemoryState, MMRecConfig, MMRecModel
from tests.helpers import assert_close_rel, output_tolerance
from tests.model.models import MODES, next_token_loss, small_config

pytestmark = pytest.mark.model

# Chunked and token-by-token runs differ from one call only by float32 rounding
# (other summation orders in matmuls and SDPA), accumulated in float32.
FLOAT32_TOL = output_tolerance(torch.float32)


def assert_states_close(actual: MemoryState, expected: MemoryState) -> None:
    assert torch.equal(actual.position, expected.position)
    for i, (a, e) in enumerate(zip(actual.blocks, expected.blocks)):
        for name, x, y in zip(a._fields, a, e):
            assert_close_rel(x, y, FLOAT32_TOL, f"state.blocks[{i}].{name}")


@pytest.mark.parametrize("mode", MODES)
def test_causality(mode):
    model = MMRecModel(small_config(mode))
    ids = torch.randint(0, 256, (2, 150))
    t = 77
    changed = ids.clone()
    changed[:, t + 1 :] = torch.randint(0, 256, (2, ids.shape[1] - t - 1))
    with torch.no_grad():
        logits, _ = model(ids)
        logits_changed, _ = model(changed)
    assert torch.equal(logits[:, : t + 1], logits_changed[:, : t + 1])
    assert not torch.allclose(logits[:, t + 1 :], logits_changed[:, t + 1 :])


@pytest.mark.parametrize("mode", MODES)
def test_chunked_and_token_by_token_agree(mode):
    """One call, chunks of 7, 64 and 1000 with the state carried, and token by token:
    the same logits and final state, across many memory segments (S = 8) with every
    level's ring buffer wrapped."""
    model = MMRecModel(small_config(mode))
    ids = torch.randint(0, 256, (2, 1100))
    with torch.no_grad():
        full, full_state = model(ids)
        for chunk_size in (7, 64, 1000):
            logits, state = model(ids, chunk_size=chunk_size)
            assert_close_rel(logits, full, FLOAT32_TOL, f"logits, chunks of {chunk_size}")
            assert_states_close(state, full_state)
        state, steps = None, []
        for t in range(ids.shape[1]):
            step, state = model(ids[:, t : t + 1], state)
            steps.append(step)
    assert_close_rel(torch.cat(steps, dim=1), full, FLOAT32_TOL, "logits, token by token")
    assert_states_close(state, full_state)


@pytest.mark.parametrize(
    "ablation",
    [dict(window=0), dict(window=1), dict(top_k=0), dict(mode="none")],
    ids=["no-window", "window-1", "no-long-term", "no-recurrence"],
)
def test_token_steps_agree_with_one_call_in_every_ablation(ablation):
    """The lean one-token step (``MMRecBlock.step``) against the chunk path, for the
    configurations without one of the memories, and a window of one token (itself)."""
    model = MMRecModel(small_config(**{"mode": "exact", **ablation}))
    ids = torch.randint(0, 256, (2, 150))
    with torch.no_grad():
        full, full_state = model(ids)
        state, steps = model(ids[:, :70])[1], []
        for t in range(70, ids.shape[1]):
            step, state = model(ids[:, t : t + 1], state)
            steps.append(step)
    assert_close_rel(torch.cat(steps, dim=1), full[:, 70:], FLOAT32_TOL, "logits, token by token after a chunk")
    assert_states_close(state, full_state)


@pytest.mark.grad
@pytest.mark.parametrize("mode", MODES)
def test_every_parameter_gets_a_gradient(mode):
    config = small_config(mode)
    model = MMRecModel(config)
    ids = torch.randint(0, 256, (2, 5 * config.segment_len + 3))
    next_token_loss(model(ids)[0], ids).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert p.grad.isfinite().all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"


@pytest.mark.grad
def test_gradient_flows_through_the_carried_state():
    """A loss on the second chunk reaches the tokens of the first through the state
    (the memory and the recurrence), as in one call."""
    model = MMRecModel(small_config("exact"))
    ids = torch.randint(0, 256, (1, 40))
    embed = model.embed
    grads = []
    for chunk_size in (None, 16):
        model.zero_grad()
        logits, _ = model(ids, chunk_size=chunk_size)
        logits[:, -1].sum().backward()
        grads.append(embed.weight.grad.clone())
    assert_close_rel(grads[1], grads[0], FLOAT32_TOL, "embedding gradient, chunked")


def test_state_is_a_pytree_and_not_stored_on_modules():
    config = small_config("exact")
    model = MMRecModel(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, state = model(torch.randint(0, 256, (3, 20)))
    assert list(model.buffers()) == []
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    leaves, spec = pytree.tree_flatten(state)
    assert len(leaves) == 1 + 4 * config.n_layers and all(isinstance(t, torch.Tensor) for t in leaves)
    assert pytree.tree_unflatten(leaves, spec) == state
    assert state.position.dtype == torch.int64 and state.position.item() == 20
    assert all(not t.requires_grad for t in pytree.tree_leaves(state.detach()))
    copy = state.clone()
    for kept, copied in zip(pytree.tree_leaves(state), pytree.tree_leaves(copy)):
        assert torch.equal(kept, copied) and kept.data_ptr() != copied.data_ptr()


def test_fresh_model_loss_is_uniform():
    model = MMRecModel(MMRecConfig.preset("tiny"))
    ids = torch.randint(0, 256, (4, 256))
    with torch.no_grad():
        loss = next_token_loss(model(ids)[0], ids).item()
    assert abs(loss - math.log(256)) < 0.1, loss


@pytest.mark.parametrize("mode", MODES)
def test_short_training_lowers_the_loss(mode):
    """AdamW at lr 1e-3 on a repeated text: the loss falls steadily from about ln 256."""
    model = MMRecModel(small_config(mode))
    text = b"def add(a, b):\n    return a + b\n\n" * 20
    ids = torch.tensor(list(text[:512])).view(2, 256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = next_token_loss(model(ids)[0], ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.6 * losses[0], losses


def test_generate_greedy_matches_teacher_forcing_and_reads_the_prompt_once():
    model = MMRecModel(small_config("exact"))
    prompt = torch.randint(0, 256, (2, 19))
    lengths = []
    hook = model.embed.register_forward_hook(lambda mod, args, out: lengths.append(args[0].shape[1]))
    out = model.generate(prompt, 12, temperature=0)
    hook.remove()
    assert out.shape == (2, 19 + 12) and torch.equal(out[:, :19], prompt)
    assert lengths == [19] + [1] * 11  # the prompt once, then one token per step
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    assert torch.equal(logits[:, 18:].argmax(-1), out[:, 19:])
    assert torch.equal(model.generate(prompt, 12, top_k=1), out)


def test_generate_samples_within_top_k_and_continues_a_state():
    model = MMRecModel(small_config("parallel"))
    ids = torch.randint(0, 256, (3, 30))
    with torch.no_grad():
        _, state = model(ids[:, :10])
    out = model.generate(ids[:, 10:], 8, temperature=0.7, top_k=3, state=state)
    assert out.shape == (3, 28)
    with torch.no_grad():
        logits, _ = model(out[:, :-1], state)
    top3 = logits[:, 19:].topk(3, dim=-1).indices
    assert (top3 == out[:, 20:, None]).any(-1).all()
    assert model.generate(ids, 0).shape == ids.shape


def test_generate_top_p_samples_within_the_nucleus_and_streams_the_same_tokens():
    """Every sampled token lies in the smallest set of likeliest tokens holding p of the
    probability; the stream yields generate's tokens from the same generator."""
    model = MMRecModel(small_config("exact"))
    prompt = torch.randint(0, 256, (4, 9))
    out = model.generate(prompt, 10, top_p=0.3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probabilities = torch.softmax(model(out[:, :-1])[0][:, 8:], dim=-1)
    ranked = probabilities.sort(dim=-1, descending=True).values
    mass_before = ranked.cumsum(-1) - ranked  # of the tokens likelier than each
    least_in_nucleus = torch.where(mass_before < 0.3, ranked, 2.0).min(-1, keepdim=True).values
    assert (probabilities.gather(-1, out[:, 9:, None]) >= least_in_nucleus * (1 - 1e-4)).all()
    streamed = list(model.stream(prompt, 10, top_p=0.3, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.cat([prompt, *streamed], dim=1), out)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda m: m(torch.rand(2, 5)), "expected ids to be an integer tensor"),
        (lambda m: m(torch.zeros(5, dtype=torch.int64)), "expected ids to be an integer tensor"),
        (
            lambda m: m(torch.zeros(2, 5, dtype=torch.uint8)),
            r"expected ids to be an integer tensor .*vocab_size 256.*uint8",
        ),
        (
            lambda m: m(torch.zeros(2, 5, dtype=torch.bool)),
            r"expected ids to be an integer tensor .*vocab_size 256.*bool",
        ),
        (
            lambda m: m(torch.tensor([[0, 256]])),
            r"expected ids in \[0, 256\) \(vocab_size 256\), got values from 0 to 256",
        ),
        (lambda m: m(torch.tensor([[-1, 3]], dtype=torch.int32)), r"expected ids in \[0, 256\).*from -1 to 3"),
        (lambda m: m.generate(torch.tensor([[300]]), 2), r"expected ids in \[0, 256\)"),
        (lambda m: m(torch.zeros(2, 0, dtype=torch.int64)), "at least one token"),
        (lambda m: m(torch.zeros(2, 5, dtype=torch.int64), chunk_size=0), "chunk_size"),
        (lambda m: m(torch.zeros(2, 5, dtype=torch.int64), m.initial_state(3)), "batch size 2"),
        (lambda m: m(torch.zeros(2, 5, dtype=torch.int64), (1, 2)), "expected state to be a MemoryState"),
        (lambda m: m.generate(torch.zeros(1, 2, dtype=torch.int64), -1), "max_new_tokens"),
        (lambda m: m.generate(torch.zeros(1, 2, dtype=torch.int64), 2, temperature=-1.0), "temperature"),
        (lambda m: m.generate(torch.zeros(1, 2, dtype=torch.int64), 2, top_k=0), "top_k"),
        (lambda m: m.generate(torch.zeros(1, 2, dtype=torch.int64), 2, top_p=0.0), "top_p"),
    ],
    ids=[
        "float_ids",
        "1d_ids",
        "uint8_ids",
        "bool_ids",
        "id_too_large",
        "negative_id",
        "generate_id",
        "empty",
        "chunk_size",
        "state_batch",
        "state_type",
        "max_new",
        "temperature",
        "top_k",
        "top_p",
    ],
)
def test_bad_input_is_named(call, message):
    model = MMRecModel(small_config("exact", n_layers=1))
    with pytest.raises(ValueError, match=message):
        call(model)


@pytest.mark.grad
@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_autocast_keeps_the_state_in_float32(mode):
    """Under CPU bf16 autocast the ops get one dtype (the gate weight is cast to z's),
    the carried state stays float32, and every gradient is finite."""
    model = MMRecModel(small_config(mode))
    ids = torch.randint(0, 256, (2, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, state = model(ids[:, :20])
        logits, state = model(ids[:, 20:], state)
        loss = next_token_loss(logits, ids[:, 20:])
    loss.backward()
    assert logits.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for block in state.blocks for t in block)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
