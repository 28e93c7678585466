"""torch.compile(model, fullgraph=True): forward and backward with no graph break
(fullgraph raises on one), the same results as eager, and no new compilation for
every new sequence length."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from mmrec_model import MMRecModel
from mmrec_model.memory import BlockState
from tests.helpers import assert_close_rel, output_tolerance
from tests.model.models import (
    MODES,
    VARIANTS,
    assert_logits_and_grads_close,
    compile_noting_ops,
    distinct_byte_chunks,
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
    state carried (eager's, so distinct bytes: ``distinct_byte_chunks``): one compilation
    (the length marked dynamic) serves them all."""
    torch._dynamo.reset()
    model = MMRecModel(variant_config(variant, n_layers=1))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    state = model.initial_state(2)  # not None: one input structure for every call
    for ids in distinct_byte_chunks(2, [13, 5, 70]):
        T = ids.shape[1]
        torch._dynamo.mark_dynamic(ids, 1)
        logits, new_state, grads = loss_and_grads(compiled, ids, state)
        expected_logits, expected_state, expected_grads = loss_and_grads(model, ids, state)
        assert_logits_and_grads_close(model, logits, grads, expected_logits, expected_grads, f"T = {T}")
        assert torch.equal(new_state.position, expected_state.position)
        state = expected_state
    assert counter.frame_count == 1, f"{counter.frame_count} compilations"


@pytest.mark.parametrize("memory_read", ["joint", "gated"])
def test_compiled_flex_read_on_cpu_matches_eager(memory_read):
    """read_kernel 'flex' on the CPU: compiled code reads with blocked SDPA, as eager code
    does (flex_attention on the CPU has no backward and no compiled log-sum-exp; CUDA's
    flex read is tests/model/test_gpu.py's); the same logits and state over chunks."""
    torch._dynamo.reset()
    model = MMRecModel(small_config("exact", n_layers=1, memory_read=memory_read, read_kernel="flex")).eval()
    compiled, ops = compile_noting_ops(model, fullgraph=True)
    state = model.initial_state(2)
    with torch.no_grad():
        for chunk in range(2):  # the second reads the first's working and long-term memory
            ids = torch.randint(0, 256, (2, 150))
            logits, new_state = compiled(ids, state)
            expected_logits, expected_state = model(ids, state)
            assert_close_rel(logits, expected_logits, output_tolerance(torch.float32), f"logits, chunk {chunk}")
            for name, actual, expected in zip(BlockState._fields, new_state.blocks[0], expected_state.blocks[0]):
                assert_close_rel(actual, expected, output_tolerance(torch.float32), f"state {name}, chunk {chunk}")
            state = expected_state
    assert not any("flex_attention" in op for op in ops), "the compiled model read with flex_attention on the CPU"


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


@pytest.mark.parametrize("variant", ["exact", "exact-gated", "parallel-state-entries"])
def test_compiled_token_steps_match_eager_and_compile_once(variant):
    """Decoding's one-token step under torch.compile(fullgraph=True): the logits and
    state of eager steps at every position (memory spans completing, rings wrapping),
    from one graph (the position is a tensor, so no step recompiles)."""
    torch._dynamo.reset()
    model = MMRecModel(variant_config(variant, n_layers=1)).eval()
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
