"""torch.compile(model, fullgraph=True): forward and backward with no graph break
(fullgraph raises on one), the same results as eager, and no new compilation for
every new sequence length."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from mmrec_model import MMRecModel
from tests.model.models import (
    MODES,
    VARIANTS,
    assert_logits_and_grads_close,
    next_token_loss,
    small_config,
    variant_config,
)

pytestmark = [pytest.mark.model, pytest.mark.compile]


def loss_and_grads(model, ids, state):
    model.zero_grad()
    logits, new_state = model(ids, state)
    next_token_loss(logits, ids).backward()
    return logits.detach(), new_state.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.grad
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_model_matches_eager(variant):
    """Inductor, forward and backward, over chunks of 13, 5 and 70 tokens with the
    state carried: one compilation (the length marked dynamic) serves them all."""
    torch._dynamo.reset()
    model = MMRecModel(variant_config(variant, n_layers=1))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    state = model.initial_state(2)  # not None: one input structure for every call
    for T in (13, 5, 70):
        ids = torch.randint(0, 256, (2, T))
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
