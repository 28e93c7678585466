"""torch.compile(model, fullgraph=True): forward and backward with no graph break
(fullgraph raises on one), the same results as eager, and no new compilation for
every new sequence length."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from mmrec_model import MMRecModel
from tests.helpers import assert_close_rel, output_tolerance
from tests.model.models import MODES, assert_logits_and_grads_close, next_token_loss, small_config

pytestmark = [pytest.mark.model, pytest.mark.compile]


def loss_and_grads(model, ids, state):
    model.zero_grad()
    logits, new_state = model(ids, state)
    next_token_loss(logits, ids).backward()
    return logits.detach(), new_state.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.grad
@pytest.mark.parametrize("mode", MODES)
def test_compiled_model_matches_eager(mode):
    """Inductor, forward and backward, over chunks of 13, 5 and 70 tokens with the
    state carried (eager's): one compilation (the length marked dynamic) serves them all."""
    torch._dynamo.reset()
    model = MMRecModel(small_config(mode, n_layers=1))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    state = model.initial_state(2)  # not None: one input structure for every call
    for ids in torch.randint(0, 256, (2, 88)).split([13, 5, 70], dim=1):
        T = ids.shape[1]
        torch._dynamo.mark_dynamic(ids, 1)
        logits, new_state, grads = loss_and_grads(compiled, ids, state)
        expected_logits, expected_state, expected_grads = loss_and_grads(model, ids, state)
        assert_logits_and_grads_close(model, logits, grads, expected_logits, expected_grads, f"T = {T}")
        assert torch.equal(new_state.position, expected_state.position)
        state = expected_state
    assert counter.frame_count == 1, f"{counter.frame_count} compilations"


@pytest.mark.parametrize("mode", MODES)
def test_new_lengths_do_not_recompile(mode):
    """Default (automatic) dynamic shapes: the first length compiles a static graph,
    the second a dynamic one, and lengths across every memory level's span (S = 8:
    8, 32, 128 tokens) reuse it. aot_eager captures the same graphs, forward and
    backward, as inductor, without generating code."""
    torch._dynamo.reset()
    model = MMRecModel(small_config(mode, n_layers=1))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    state = None
    for T in (5, 9, 13, 31, 70, 130, 300):
        ids = torch.randint(0, 256, (2, T))
        logits, state = compiled(ids, state)
        next_token_loss(logits, ids).backward()
        state = state.detach()
    assert counter.frame_count == 2, f"{counter.frame_count} compilations for 7 lengths"


@pytest.mark.parametrize("mode", MODES)
def test_compiled_token_steps_match_eager_and_compile_once(mode):
    """Decoding's one-token step under torch.compile(fullgraph=True): the logits and
    state of eager steps at every position (memory spans completing, rings wrapping),
    from one graph (the position is a tensor, so no step recompiles)."""
    torch._dynamo.reset()
    model = MMRecModel(small_config(mode, n_layers=1)).eval()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        state = expected_state = model(ids[:, :3])[1]
        for t in range(3, ids.shape[1]):
            logits, state = compiled(ids[:, t : t + 1], state)
            expected, expected_state = model(ids[:, t : t + 1], expected_state)
            assert_close_rel(logits, expected, output_tolerance(torch.float32), f"logits at {t}")
    for block, expected_block in zip(state.blocks, expected_state.blocks):
        for name, actual, wanted in zip(block._fields, block, expected_block):
            assert_close_rel(actual, wanted, output_tolerance(torch.float32), f"state {name}")
    assert counter.frame_count == 1, f"{counter.frame_count} compilations"
