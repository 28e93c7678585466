"""MMRecModel: the MM-Rec language model, with streaming state and generation."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MMRecConfig
from ..decode import Decoder, check_sampling, sample
from ..memory import BlockState, MemoryState, PackedState, document_layout, memory_layout, token_layout
from .block import MMRecBlock

# The dtypes nn.Embedding takes as indices.
INDEX_DTYPES = (torch.int64, torch.int32)


class MMRecModel(nn.Module):
    """Token embedding, ``n_layers`` MMRecBlocks, final RMSNorm, output head tied to the
    embedding (docs/design.md 2.3).

        logits, state = model(ids)                       # ids [B, T] -> logits [B, T, V]
        logits, state = model(more_ids, state)           # continues the same sequences
        out = model.generate(prompt_ids, 100, temperature=0.8, top_k=40)

    Running a sequence in one call, in chunks with the state carried, or token by token
    gives the same logits (to float rounding).
    """

    def __init__(self, config: MMRecConfig):
        super().__init__()
        if not isinstance(config, MMRecConfig):
            raise TypeError(f"MMRecModel: expected config to be an MMRecConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(MMRecBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.init_weights()
        # generate's CUDA-graph decoders, one per batch size: (weights' key, Decoder).
        self._graph_decoders: dict[int, tuple[tuple, Decoder]] = {}

    def __getstate__(self) -> dict:
        # CUDA graphs do not pickle (deepcopy, torch.save of the module): a copy captures its own.
        return {**super().__getstate__(), "_graph_decoders": {}}

    def release_graphs(self) -> None:
        """Frees generate's CUDA graphs and their decoding buffers (captured again when needed)."""
        self._graph_decoders.clear()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every parameter's initial value, here and in ``MMRecBlock.init_weights``: the
        embedding (also the output head) N(0, init_std), the final norm 1."""
        c = self.config
        nn.init.normal_(self.embed.weight, std=c.init_std)
        self.norm.reset_parameters()
        for block in self.blocks:
            block.init_weights(c.init_std, c.n_layers)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def initial_state(
        self, batch_size: int, device: torch.device | str | None = None, with_store: bool = True
    ) -> MemoryState:
        """The state before any token: zeros, position 0. Float32 (the parameters'
        dtype) whatever the compute dtype, so long sums stay accurate under autocast.
        ``with_store`` False: an empty long-term store (0 slots), for a fresh chunk whose
        state is not returned."""
        c = self.config
        device = self.embed.weight.device if device is None else device
        dtype = self.embed.weight.dtype
        # Without a long-term memory the store is empty: [B, 0, S, 2, D].
        store_shape = (c.store_slots if c.top_k > 0 and with_store else 0, c.segment_len)
        block = BlockState(
            h=torch.zeros(batch_size, c.n_heads, c.head_dim, device=device, dtype=dtype),
            recent_kv=torch.zeros(batch_size, c.window, 2, c.dim, device=device, dtype=dtype),
            store=torch.zeros(batch_size, *store_shape, 2, c.dim, device=device, dtype=dtype),
            index=torch.zeros(batch_size, store_shape[0], c.dim, device=device, dtype=dtype),
        )
        return MemoryState(torch.zeros((), dtype=torch.int64, device=device), tuple(block for _ in self.blocks))

    def forward(
        self,
        ids: Tensor,
        state: MemoryState | PackedState | None = None,
        chunk_size: int | None = None,
        return_state: bool = True,
        starts: Tensor | None = None,
    ) -> tuple[Tensor, MemoryState | PackedState | None]:
        """ids ``[B, T]`` (int, in [0, vocab_size)) and the state after the tokens before them
        (None: start of the sequences) -> (logits ``[B, T, vocab_size]``, state after ids).

        ``chunk_size``: run the blocks on at most this many tokens at a time, carrying the
        state (memory then scales with chunk_size, not T); the logits are the same.
        ``return_state`` False (training on windows read from their start): the state is
        None, so that a call from a fresh state never builds the long-term store.
        ``starts`` ``[B, T]`` bool (rows of packed documents): True at the first token of a
        document, which starts from an empty state: no token reads anything from before
        its document's first token (recurrence, working memory, long-term segments; a
        segment that straddles a start is retrievable by neither document), only the
        persistent slots are shared. The state returned is then a ``PackedState``, which
        remembers where each row's last document began, so that a later call continues
        it; ``generate`` and ``decode.Decoder`` refuse it.

        A one-token call (T = 1) returns a new state, so it copies the long-term store
        (``memory_tokens`` keys and values a block); ``generate`` and ``decode.Decoder``
        stream without that copy, in place.
        """
        self._check_inputs(ids, state, chunk_size, starts)
        documents = document_positions(ids, state, starts)
        fresh = state is None
        if fresh and not return_state and 1 < ids.shape[1] <= (chunk_size or ids.shape[1]):
            state = self.initial_state(ids.shape[0], ids.device, with_store=False)
            return self._forward_chunk(ids, state, True, documents)[0], None
        if fresh:
            state = self.initial_state(ids.shape[0], ids.device)
        if chunk_size is None or ids.shape[1] <= chunk_size:
            logits, state = self._forward_chunk(ids, state, fresh, documents)
            return logits, state if return_state else None
        logits = []
        chunks = ids.split(chunk_size, dim=1)
        pieces = [None] * len(chunks) if documents is None else documents.split(chunk_size, dim=1)
        for chunk, chunk_documents in zip(chunks, pieces):
            chunk_logits, state = self._forward_chunk(chunk, state, fresh, chunk_documents)
            logits.append(chunk_logits)
            fresh = False
        return torch.cat(logits, dim=1), state if return_state else None

    def _forward_chunk(
        self, ids: Tensor, state: MemoryState | PackedState, fresh: bool, documents: Tensor | None = None
    ) -> tuple[Tensor, MemoryState | PackedState]:
        """The blocks over ids ``[B, T]`` at once; one token per row (T = 1) takes their
        lean step (``MMRecBlock.step``). ``fresh``: the state is ``initial_state``'s (its
        store may be empty, 0 slots: then the state returned has no store either).
        ``documents`` ``[B, T]`` int64 (``document_positions``; None: one document a row):
        where each token's document begins."""
        x = self.embed(ids)
        blocks = []
        if ids.shape[1] == 1 and documents is None:
            layout = token_layout(state.position, self.config)
            for block, block_state in zip(self.blocks, state.blocks):
                x, block_state = block.step(x, block_state, layout)
                blocks.append(block_state)
        else:
            layout = memory_layout(state.position, ids.shape[1], self.config)
            if documents is not None:
                layout = document_layout(layout, state.position, documents, self.config)
            for block, block_state in zip(self.blocks, state.blocks):
                x, block_state = block(x, block_state, layout, fresh)
                blocks.append(block_state)
        position = state.position + ids.shape[1]
        if documents is None:
            return self.head(x), MemoryState(position, tuple(blocks))
        return self.head(x), PackedState(position, tuple(blocks), documents[:, -1])

    def head(self, x: Tensor) -> Tensor:
        """Logits ``[..., V]`` of the last block's output ``[..., D]``: final norm, tied embedding."""
        return F.linear(self.norm(x), self.embed.weight)

    def _check_inputs(
        self, ids: Tensor, state: MemoryState | PackedState | None, chunk_size: int | None, starts: Tensor | None = None
    ) -> None:
        vocab_size = self.config.vocab_size
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in INDEX_DTYPES:
            raise ValueError(
                f"MMRecModel: expected ids to be an integer tensor [B, T] (int64 or int32) of token ids "
                f"in [0, {vocab_size}) (vocab_size {vocab_size}), got {_describe(ids)}"
            )
        if ids.shape[1] == 0:
            raise ValueError("MMRecModel: expected ids with at least one token (T >= 1), got T = 0")
        # Reading the values back is a graph break: a compiled graph leaves the
        # check to eager calls (the embedding still refuses such ids, less clearly).
        if ids.numel() > 0 and not torch.compiler.is_compiling():
            low, high = torch.stack(torch.aminmax(ids)).tolist()  # one read back
            if low < 0 or high >= vocab_size:
                raise ValueError(
                    f"MMRecModel: expected ids in [0, {vocab_size}) (vocab_size {vocab_size}), "
                    f"got values from {low} to {high}"
                )
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"MMRecModel: expected chunk_size to be a positive int or None, got {chunk_size!r}")
        if starts is not None and (
            not isinstance(starts, Tensor) or starts.dtype != torch.bool or starts.shape != ids.shape
        ):
            raise ValueError(
                f"MMRecModel: expected starts to be None or a bool tensor of ids' shape {list(ids.shape)} "
                f"(True at the first token of a document), got {_describe(starts)}"
            )
        if state is None:
            return
        if not isinstance(state, (MemoryState, PackedState)) or len(state.blocks) != len(self.blocks):
            raise ValueError(
                f"MMRecModel: expected state to be a MemoryState or PackedState with {len(self.blocks)} blocks "
                "(from initial_state or a previous call), got " + type(state).__name__
            )
        if state.blocks[0].h.shape[0] != ids.shape[0]:
            raise ValueError(
                f"MMRecModel: expected state for batch size {ids.shape[0]} (that of ids), "
                f"got one for {state.blocks[0].h.shape[0]}"
            )

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        state: MemoryState | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        cuda_graphs: bool | None = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``prompt_ids`` ``[B, T0]`` -> ``[B, T0 + n]``
        (prompt, then the new tokens); ``stream``'s tokens, concatenated."""
        tokens = self.stream(prompt_ids, max_new_tokens, temperature, top_k, state, top_p, generator, cuda_graphs)
        return torch.cat([prompt_ids, *tokens], dim=1)

    @torch.no_grad()
    def stream(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        state: MemoryState | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        cuda_graphs: bool | None = None,
    ) -> Iterator[Tensor]:
        """Yield ``max_new_tokens`` sampled tokens ``[B, 1]``, one at a time, after
        ``prompt_ids`` ``[B, T0]`` (every row's prompt of the same length).

        The prompt is read once; each new token then costs one step of O(1) work on the
        state. Sampling stays on the model's device: ``temperature = 0`` is greedy;
        ``top_k`` keeps the k most likely tokens, ``top_p`` the fewest whose probabilities
        sum to at least p (nucleus sampling); ``generator`` draws the samples (None:
        torch's default). ``state``: the state before the prompt (None: the prompt starts
        the sequences). ``cuda_graphs`` (default: on CUDA): each token's step replays CUDA
        graphs, captured once per batch size and kept on the model, reused by later calls
        at any context (reading the weights as they are then; ``release_graphs`` frees
        them); False: the same step launched op by op.
        """
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        logits, state = self(prompt_ids, state)
        logits, decoder = logits[:, -1], self._decoder(state, cuda_graphs)
        decoder.streaming = True  # a stream started meanwhile (interleaved) gets a decoder of its own
        try:
            for step in range(max_new_tokens):
                token = sample(logits, temperature, top_k, top_p, generator)
                yield token
                if step + 1 < max_new_tokens:
                    logits = decoder.step(token)
        finally:
            decoder.streaming = False

    def _decoder(self, state: MemoryState, cuda_graphs: bool | None) -> Decoder:
        """A Decoder from ``state``: the CUDA-graph one of its batch size, reloaded (with the
        weights as they are now), unless a parameter has moved or changed dtype since it was
        built or another stream is still using it."""
        on_cuda = state.position.device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise ValueError(f"generate: cuda_graphs needs a model on CUDA, got one on {state.position.device}")
        if not (on_cuda if cuda_graphs is None else cuda_graphs):
            return Decoder(self, state)
        weights = tuple((p.data_ptr(), p.dtype) for p in self.parameters())
        batch_size = state.blocks[0].h.shape[0]
        built, decoder = self._graph_decoders.get(batch_size, (None, None))
        if built != weights or decoder.streaming:
            decoder = Decoder(self, state, cuda_graphs=True)
            self._graph_decoders[batch_size] = weights, decoder
        else:
            decoder.load(state)
        return decoder


def document_positions(ids: Tensor, state: MemoryState | PackedState | None, starts: Tensor | None) -> Tensor | None:
    """``[B, T]`` int64: the absolute position of the first token of each token's document,
    the latest start (``starts`` ``[B, T]`` bool) at or before it, else the state's
    ``document_start`` (a ``PackedState``'s; 0 for a ``MemoryState``). None where neither
    the call nor the state has document starts (each row one document)."""
    carried = state.document_start if isinstance(state, PackedState) else None
    if starts is None and carried is None:
        return None
    B, T = ids.shape
    position = torch.zeros((), dtype=torch.int64, device=ids.device) if state is None else state.position
    if carried is None:
        carried = torch.zeros(B, dtype=torch.int64, device=ids.device)
    if starts is None:
        return carried.view(B, 1).expand(B, T)
    positions = position + torch.arange(T, device=ids.device)
    return torch.where(starts, positions, carried.view(B, 1)).cummax(dim=1).values


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} tensor of shape {list(t.shape)}"
    return type(t).__name__
