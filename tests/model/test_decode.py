"""Decoder: the lean in-place decoding path gives the logits and the state of the
model's own one-token calls, in every configuration."""

from __future__ import annotations

import pytest
import torch

from mmrec_model import MMRecModel
from mmrec_model.decode import Decoder
from mmrec_model.decode import decoder as decode
from tests.helpers import assert_close_rel, output_tolerance
from tests.model.models import small_config

pytestmark = pytest.mark.model

FLOAT32_TOL = output_tolerance(torch.float32)

CONFIGS = {
    "exact": dict(mode="exact"),
    "parallel": dict(mode="parallel"),
    "no-window-no-recurrence": dict(mode="none", window=0),
    "window-1": dict(mode="exact", window=1),
    "no-long-term": dict(mode="exact", top_k=0),
}


def assert_reloaded_steps_as_fresh(reused: Decoder, model, state, tokens) -> None:
    """``reused``, loaded with ``state``, gives over ``tokens`` ``[B, n]`` (its CUDA-graph body,
    run eagerly) the logits of a fresh decoder of the state, token after token."""
    reused.load(state)
    fresh = Decoder(model, state)
    for t in range(tokens.shape[1]):
        token = tokens[:, t : t + 1]
        assert_close_rel(reused.static_step(token), fresh.step(token), FLOAT32_TOL, f"logits at token {t}")


@pytest.mark.parametrize("start", [1, 37])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoder_matches_one_call(name, start):
    """From a state after `start` tokens, 150 - start decoded tokens (S = 8: entries of
    every level written, level 0's ring wrapped): the logits of one call, and its state."""
    torch.manual_seed(0)
    model = MMRecModel(small_config(**CONFIGS[name])).eval()
    ids = torch.randint(0, 256, (2, 150))
    with torch.no_grad():
        full, full_state = model(ids)
        decoder = Decoder(model, model(ids[:, :start])[1])
        logits = torch.stack([decoder.step(ids[:, t : t + 1]) for t in range(start, ids.shape[1])], dim=1)
    assert_close_rel(logits, full[:, start:], FLOAT32_TOL, "logits")
    state = decoder.state()
    assert state.position.item() == ids.shape[1]
    for i, (block, expected) in enumerate(zip(state.blocks, full_state.blocks)):
        for field, actual, wanted in zip(block._fields, block, expected):
            assert_close_rel(actual, wanted, FLOAT32_TOL, f"state.blocks[{i}].{field}")


@pytest.mark.parametrize("parts", [2, 8])
def test_split_ffn_product_matches_one_call(monkeypatch, parts):
    """The FFN's output product in parts (``down_parts``: CUDA from batch 16) gives the
    logits of one call."""
    monkeypatch.setattr(decode, "down_parts", lambda batch, hidden, device: parts)
    torch.manual_seed(0)
    model = MMRecModel(small_config("exact")).eval()
    ids = torch.randint(0, 256, (3, 40))
    with torch.no_grad():
        full = model(ids)[0]
        decoder = Decoder(model, model(ids[:, :5])[1])
        logits = torch.stack([decoder.step(ids[:, t : t + 1]) for t in range(5, ids.shape[1])], dim=1)
    assert all(block.down_parts == parts for block in decoder.blocks)
    assert_close_rel(logits, full[:, 5:], FLOAT32_TOL, "logits")


def test_decoder_leaves_the_state_it_started_from():
    model = MMRecModel(small_config("exact")).eval()
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        state = model(ids)[1]
        kept = [t.clone() for block in state.blocks for t in block]
        decoder = Decoder(model, state)
        for t in range(5):
            decoder.step(ids[:, t : t + 1])
    assert all(torch.equal(a, b) for a, b in zip(kept, (t for block in state.blocks for t in block)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_static_step_matches_step(name):
    """The CUDA graphs' body run eagerly (slots from the device position, buffers in place)
    gives step's logits and state, over every plan of S = 8 and L levels (150 tokens)."""
    torch.manual_seed(0)
    model = MMRecModel(small_config(**CONFIGS[name])).eval()
    ids = torch.randint(0, 256, (2, 150))
    with torch.no_grad():
        state = model(ids[:, :3])[1]
        eager, static = Decoder(model, state), Decoder(model, state)
        for t in range(3, ids.shape[1]):
            token = ids[:, t : t + 1]
            assert_close_rel(static.static_step(token), eager.step(token), FLOAT32_TOL, f"logits at {t}")
    for i, (block, expected) in enumerate(zip(static.state().blocks, eager.state().blocks)):
        for field, actual, wanted in zip(block._fields, block, expected):
            assert_close_rel(actual, wanted, FLOAT32_TOL, f"state.blocks[{i}].{field}")


def test_load_restarts_the_decoder_from_another_state():
    """A decoder reloaded (its buffers reused, as a cached CUDA-graph decoder is) continues
    from the new state as a fresh decoder does, whether it steps or static-steps."""
    torch.manual_seed(0)
    model = MMRecModel(small_config("exact")).eval()
    ids = torch.randint(0, 256, (2, 120))
    with torch.no_grad():
        reused = Decoder(model, model(ids[:, :70])[1])
        for t in range(70, 90):
            reused.static_step(ids[:, t : t + 1])
        state = model(ids[:, :9])[1]
        assert_reloaded_steps_as_fresh(reused, model, state, ids[:, 9:80])


def test_cuda_graphs_need_cuda():
    model = MMRecModel(small_config("exact")).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="cuda_graphs needs a model and state on CUDA"):
        Decoder(model, model(torch.zeros(1, 3, dtype=torch.int64))[1], cuda_graphs=True)


def test_load_refreshes_the_folded_weights():
    """After the parameters change in place (an optimizer step), a reloaded decoder reads the
    new weights, as a fresh one does."""
    torch.manual_seed(0)
    model = MMRecModel(small_config(**CONFIGS["parallel"])).eval()
    ids = torch.randint(0, 256, (2, 60))
    with torch.no_grad():
        state = model(ids[:, :20])[1]
        reused = Decoder(model, state)
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        state = model(ids[:, :20])[1]
        assert_reloaded_steps_as_fresh(reused, model, state, ids[:, 20:60])
