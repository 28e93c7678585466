"""Packed documents: ``MMRecModel.forward(ids, starts=...)`` reads each document of a row
as if it ran alone from an empty state, in one call, in chunks and across calls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from mmrec_model import MMRecModel, PackedState
from mmrec_model.decode import Decoder
from tests.helpers import assert_close_rel, output_tolerance
from tests.model.models import assert_logits_and_grads_close, small_config

pytestmark = pytest.mark.model

FLOAT32_TOL = output_tolerance(torch.float32)

# Segments are cut at multiples of S = 8 in the row: documents that start at such a
# multiple hold the segments they hold alone. The last one wraps the store (64 tokens)
# and the window (20) several times.
ALIGNED = [8, 40, 152]
# Documents that start anywhere: without a long-term memory they read what they read alone.
UNALIGNED = [5, 37, 150]
CASES = [
    pytest.param("exact", 3, ALIGNED, id="exact"),
    pytest.param("parallel", 3, ALIGNED, id="parallel"),
    pytest.param("none", 3, ALIGNED, id="no_recurrence"),
    pytest.param("exact", 0, UNALIGNED, id="exact_no_long_term"),
    pytest.param("parallel", 0, UNALIGNED, id="parallel_no_long_term"),
]


def packed(documents: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One row ``[1, sum of lengths]`` of documents ``[1, n]`` and its starts."""
    starts = [F.pad(torch.ones(1, 1, dtype=torch.bool), (0, d.shape[1] - 1)) for d in documents]
    return torch.cat(documents, dim=1), torch.cat(starts, dim=1)


def rows_and_alone(model: MMRecModel, lengths: list[int]):
    """Two rows of the same documents, the second in reverse order (so each row has its
    own starts), and the logits of each row's documents run one by one from
    ``initial_state``, concatenated."""
    documents = [torch.randint(0, 256, (1, n)) for n in lengths]
    with torch.no_grad():
        alone = [model(d)[0] for d in documents]
    rows = [packed(documents), packed(documents[::-1])]
    ids, starts = (torch.cat(parts) for parts in zip(*rows))
    return ids, starts, torch.cat([torch.cat(alone, dim=1), torch.cat(alone[::-1], dim=1)])


@pytest.mark.parametrize("mode,top_k,lengths", CASES)
def test_packed_rows_match_their_documents_alone(mode, top_k, lengths):
    """In one call, in chunks of 32 (a start inside a later chunk), and in three calls
    with the state carried (the last of one token)."""
    model = MMRecModel(small_config(mode, top_k=top_k))
    ids, starts, alone = rows_and_alone(model, lengths)
    T = ids.shape[1]
    with torch.no_grad():
        logits, _ = model(ids, starts=starts)
        assert_close_rel(logits, alone, FLOAT32_TOL, "logits, one call")
        logits, _ = model(ids, starts=starts, chunk_size=32)
        assert_close_rel(logits, alone, FLOAT32_TOL, "logits, chunks of 32")
        state, calls = None, []
        for begin, end in ((0, 100), (100, T - 1), (T - 1, T)):
            call_logits, state = model(ids[:, begin:end], state, starts=starts[:, begin:end])
            calls.append(call_logits)
    assert_close_rel(torch.cat(calls, dim=1), alone, FLOAT32_TOL, "logits, three calls")
    assert isinstance(state, PackedState)
    assert torch.equal(state.document_start, torch.tensor([T - lengths[-1], T - lengths[0]]))


@pytest.mark.parametrize("mode", ["exact", "parallel"])
def test_a_document_reads_nothing_from_before_its_start(mode):
    """Documents that start inside a segment: changing the first two documents leaves
    the third's logits as they were (no segment straddling its start is retrieved);
    without starts they change."""
    model = MMRecModel(small_config(mode))
    ids = torch.randint(0, 256, (2, sum(UNALIGNED)))
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, [0, 5, 42]] = True
    changed = ids.clone()
    changed[:, :42] = torch.randint(0, 256, (2, 42))
    with torch.no_grad():
        logits, changed_logits = (model(x, starts=starts)[0][:, 42:] for x in (ids, changed))
        unpacked, changed_unpacked = (model(x)[0][:, 42:] for x in (ids, changed))
    assert_close_rel(changed_logits, logits, FLOAT32_TOL, "the last document's logits")
    assert not torch.allclose(changed_unpacked, unpacked)


def test_one_document_a_row_reads_as_without_starts():
    model = MMRecModel(small_config("parallel"))
    ids = torch.randint(0, 256, (2, 150))
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 0] = True
    with torch.no_grad():
        assert_close_rel(model(ids, starts=starts)[0], model(ids)[0], FLOAT32_TOL, "logits")


def document_losses(logits: torch.Tensor, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The sum over documents of each one's mean next-byte loss (row 0 of logits ``[1, T, V]``)."""
    total, begin = logits.new_zeros(()), 0
    for n in lengths:
        end = begin + n
        total = total + F.cross_entropy(logits[0, begin : end - 1], ids[0, begin + 1 : end])
        begin = end
    return total


@pytest.mark.grad
@pytest.mark.parametrize("mode", ["exact", "parallel"])
def test_packed_gradients_are_the_sum_of_the_documents(mode):
    model = MMRecModel(small_config(mode))
    documents = [torch.randint(0, 256, (1, n)) for n in ALIGNED]
    ids, starts = packed(documents)
    logits, _ = model(ids, starts=starts)
    document_losses(logits, ids, ALIGNED).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = [model(d)[0] for d in documents]
    sum(document_losses(a, d, [d.shape[1]]) for a, d in zip(alone, documents)).backward()
    expected = [p.grad for p in model.parameters()]
    assert_logits_and_grads_close(model, logits.detach(), grads, torch.cat(alone, 1).detach(), expected, "packed")


def test_bad_starts_and_packed_states_are_named():
    model = MMRecModel(small_config("parallel", n_layers=1))
    ids = torch.zeros(2, 5, dtype=torch.int64)
    for starts in (torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.bool), [[True]]):
        with pytest.raises(ValueError, match="expected starts to be None or a bool tensor"):
            model(ids, starts=starts)
    with torch.no_grad():
        _, state = model(ids, starts=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected a MemoryState, got a PackedState"):
        Decoder(model, state)
    with pytest.raises(ValueError, match="expected a MemoryState, got a PackedState"):
        model.generate(ids, 2, state=state)


@pytest.mark.compile
def test_compiled_packed_rows_match_eager_in_one_graph():
    """Mode 'parallel' (the scan's reset is an input, gamma = 0): torch.compile(fullgraph=True)."""
    torch._dynamo.reset()
    model = MMRecModel(small_config("parallel", n_layers=1))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    ids, starts, _ = rows_and_alone(model, UNALIGNED)
    with torch.no_grad():
        logits = compiled(ids, return_state=False, starts=starts)[0]
        expected = model(ids, return_state=False, starts=starts)[0]
    assert_close_rel(logits, expected, FLOAT32_TOL, "logits")
    assert counter.frame_count == 1
