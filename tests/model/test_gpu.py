"""The model on CUDA (Triton kernels): the same results as on CPU, chunked or not,
eager and compiled. Skipped without a CUDA device."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from mmrec_model import MMRecModel
from mmrec_model.decode import Decoder
from mmrec_model.decode.decoder import token_plan
from tests.helpers import assert_close_rel, output_tolerance
from tests.model.models import MODES, assert_logits_and_grads_close, next_token_loss, small_config

pytestmark = [
    pytest.mark.model,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """float32 products in float32 (not TF32), so CUDA and CPU differ by rounding order alone."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def loss_and_grads(model, ids, chunk_size=None):
    model.zero_grad()
    logits, _ = model(ids, chunk_size=chunk_size)
    next_token_loss(logits, ids).backward()
    return logits.detach().cpu(), [p.grad.cpu() for p in model.parameters()]


@pytest.mark.grad
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_cpu(mode):
    model = MMRecModel(small_config(mode))
    cuda_model = copy.deepcopy(model).cuda()
    ids = torch.randint(0, 256, (2, 301))
    expected_logits, expected_grads = loss_and_grads(model, ids)
    for chunk_size in (None, 64):
        logits, grads = loss_and_grads(cuda_model, ids.cuda(), chunk_size)
        assert_logits_and_grads_close(model, logits, grads, expected_logits, expected_grads, f"chunks {chunk_size}")


@pytest.mark.parametrize("mode", MODES)
def test_cuda_token_by_token(mode):
    model = MMRecModel(small_config(mode)).cuda()
    ids = torch.randint(0, 256, (2, 150), device="cuda")
    with torch.no_grad():
        full, _ = model(ids)
        steps, state = [], None
        for t in range(ids.shape[1]):
            step, state = model(ids[:, t : t + 1], state)
            steps.append(step)
    assert_close_rel(torch.cat(steps, dim=1), full, output_tolerance(torch.float32), "logits, token by token")


@pytest.mark.compile
@pytest.mark.grad
@pytest.mark.parametrize("mode", MODES)
def test_cuda_compiled_matches_eager(mode):
    torch._dynamo.reset()
    model = MMRecModel(small_config(mode, n_layers=1)).cuda()
    compiled = torch.compile(model, fullgraph=True)
    for T in (13, 70):
        ids = torch.randint(0, 256, (2, T), device="cuda")
        logits, grads = loss_and_grads(compiled, ids)
        expected_logits, expected_grads = loss_and_grads(model, ids)
        assert_logits_and_grads_close(model, logits, grads, expected_logits, expected_grads, f"T = {T}")


@pytest.mark.parametrize("mode", MODES)
def test_cuda_bfloat16_autocast(mode):
    model = MMRecModel(small_config(mode)).cuda()
    ids = torch.randint(0, 256, (2, 100), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, state = model(ids)
        loss = next_token_loss(logits, ids)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and state.blocks[0].h.dtype == torch.float32
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


GRAPH_CONFIGS = {
    "exact": dict(mode="exact"),
    "parallel": dict(mode="parallel"),
    "no-long-term": dict(mode="exact", top_k=0),
}


@pytest.mark.parametrize("name", list(GRAPH_CONFIGS))
def test_cuda_graph_generate_matches_eager(name):
    """generate's default on CUDA (CUDA graphs) gives the eager decoder's greedy tokens and
    logits, token for token, over every plan (S = 8, 3 levels: 300 tokens), batch 2; a
    second call at another context reuses the same decoder and its graphs."""
    torch.manual_seed(0)
    model = MMRecModel(small_config(**GRAPH_CONFIGS[name])).cuda().eval()
    prompt = torch.randint(0, 256, (2, 37), device="cuda")
    eager = model.generate(prompt, 300, temperature=0, cuda_graphs=False)
    graphed = model.generate(prompt, 300, temperature=0)
    assert torch.equal(graphed, eager)
    decoder = model._graph_decoders[2][1]
    plans = Counter(token_plan(model.config, position) for position in range(37, 37 + 299))
    assert set(decoder.graphs) == {plan for plan, count in plans.items() if count > 1}  # the second time, captured
    longer = torch.randint(0, 256, (2, 141), device="cuda")
    again = model.generate(longer, 200, temperature=0)
    assert torch.equal(again, model.generate(longer, 200, temperature=0, cuda_graphs=False))
    assert model._graph_decoders[2][1] is decoder
    with torch.no_grad():
        state = model(longer)[1]
        fresh, reused = Decoder(model, state), model._decoder(state, None)
        for t in range(120):
            token = torch.randint(0, 256, (2, 1), device="cuda")
            assert_close_rel(reused.step(token), fresh.step(token), output_tolerance(torch.float32), f"logits at {t}")


@pytest.mark.parametrize("batch", [1, 2, 17, 33])
def test_cuda_decoder_matches_forward(batch):
    """The decoder's logits are the model's, token by token, through every plan, with its
    projections by mmrec_ops.skinny_addmm (2 to 32 rows: one tile of 16 rows, or two) or by
    addmm (1 and 33)."""
    torch.manual_seed(0)
    model = MMRecModel(small_config("exact")).cuda().eval()
    ids = torch.randint(0, 256, (batch, 150), device="cuda")
    with torch.no_grad():
        full, _ = model(ids)
        decoder = Decoder(model, model.initial_state(batch, "cuda"))
        steps = torch.stack([decoder.step(ids[:, t : t + 1]) for t in range(ids.shape[1])], dim=1)
    assert_close_rel(steps, full, output_tolerance(torch.float32), "logits, decoder against forward")


def test_cuda_graph_decoder_follows_an_optimizer_step():
    """The graphs read folded copies of the weights: after a (fused AdamW) step, generate
    refreshes them in place and reuses the decoder and its graphs."""
    torch.manual_seed(0)
    model = MMRecModel(small_config("exact")).cuda()
    prompt = torch.randint(0, 256, (1, 20), device="cuda")
    model.generate(prompt, 20)
    before = model._graph_decoders[1][1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    next_token_loss(model(prompt)[0], prompt).backward()
    optimizer.step()
    model.eval()
    graphed = model.generate(prompt, 60, temperature=0)
    assert torch.equal(graphed, model.generate(prompt, 60, temperature=0, cuda_graphs=False))
    assert model._graph_decoders[1][1] is before


def test_cuda_graph_streams_interleaved_keep_their_own_decoders():
    """Two streams of one batch size read in turn: the second does not reuse the first's
    buffers (each gives the eager path's greedy tokens)."""
    torch.manual_seed(0)
    model = MMRecModel(small_config("exact")).cuda().eval()
    prompts = [torch.randint(0, 256, (1, n), device="cuda") for n in (30, 50)]
    streams = [model.stream(prompt, 80, temperature=0) for prompt in prompts]
    tokens = [[], []]
    for _ in range(80):
        for i, stream in enumerate(streams):
            tokens[i].append(next(stream))
    for prompt, made in zip(prompts, tokens):
        eager = model.generate(prompt, 80, temperature=0, cuda_graphs=False)
        assert torch.equal(torch.cat(made, dim=1), eager[:, prompt.shape[1] :])
