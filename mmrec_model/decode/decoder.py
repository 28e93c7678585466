"""Decoding one token at a time, lean: ``Decoder`` holds a model's state in fixed buffers
that each token updates in place, so that a token costs a few ops per block.

Per block the decoder keeps a key and value cache ``[2, B, H, K, d]``, K = P + k S + W:
the persistent slots, the tokens of the k = top_k segments the token retrieves from the
long-term store, and the working memory's ring of W slots as ``BlockState.recent_kv`` lays
it out (the token at position t in slot t mod W); and the long-term store and its index as
``BlockState`` holds them. A token first writes its key and value into its ring slot
(whose old token, at t - W, it may not see) and into the store, then chooses its segments
by the index and copies their tokens into the cache, then reads every slot that holds a key
(``mask``) in one softmax; a segment's index key is written by the token that completes it,
once in S tokens. The position is a Python int: whether a token starts or completes its
segment is host arithmetic, not an op. ``state`` gives the state back in the model's format, equal to
what ``MMRecModel.forward`` returns for the same tokens.

On CUDA the step can run as CUDA graphs (``cuda_graphs=True``): the host decisions a
position makes (whether the token starts or completes a segment: a ``TokenPlan``) pick one
of three graphs, each captured the second time its plan comes (the first runs eagerly, the graph's
warm-up), and the slots the token writes and the segments it may retrieve are computed on
the device from a position counter that the graph advances, so that one graph serves every
position with its plan. ``load`` puts another state into the same buffers: the graphs stay
valid.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

import mmrec_ops

from ..memory.layout import retrieved_slots, slots_with_keys
from ..memory.state import BlockState, MemoryState
from ..memory.store import select_segments, token_retrievable


def down_parts(batch: int, hidden: int, device: torch.device) -> int:
    """In how many parts the FFN's output product splits its inner dimension ``hidden``: 8
    on CUDA from 16 rows a step (and when 8 divides it), where cuBLAS's one product of
    [B, 4 D] x [4 D, D] occupies few of the GPU's cores and the parts as one batched
    product, summed, spread over them; else 1 (measured in
    bench/results/generate_graphs_cuda_h100.md)."""
    return 8 if device.type == "cuda" and batch >= 16 and hidden % 8 == 0 else 1


def few_rows_product(batch: int, device: torch.device):
    """The product bias + x W of the step's projections: ``mmrec_ops.skinny_addmm`` on
    CUDA from 2 to 32 rows, where it beats cuBLAS's addmm, else ``torch.addmm`` (at one row
    cuBLAS's matrix-vector kernel is the faster); measured in
    bench/results/skinny_addmm_cuda_h100.md."""
    return mmrec_ops.skinny_addmm if device.type == "cuda" and 2 <= batch <= 32 else torch.addmm


class TokenPlan(NamedTuple):
    """What the token at a position does to the long-term memory, a function of the
    position alone: the host's branch of a step, one CUDA graph per distinct plan."""

    starts: bool  # the token starts its segment: the segment's slot and index key are cleared
    completes: bool  # the token completes its segment: the segment's index key is written


def token_plan(config, position: int) -> TokenPlan:
    """The plan of the token at ``position``."""
    S, on = config.segment_len, config.top_k > 0
    return TokenPlan(on and position % S == 0, on and (position + 1) % S == 0)


class TokenSlots(NamedTuple):
    """Where the token writes and what it may retrieve, from its position: int64 tensors
    on the device (a CUDA graph's advance with its position counter)."""

    working: int | Tensor  # its own key and value: P + k S + position mod W (an int when eager)
    store_slot: Tensor  # ``[1]``, (position // S) mod N
    store_offset: Tensor  # ``[1]``, position mod S
    retrievable: Tensor  # ``[1, N]`` bool, the slots whose segments it may retrieve
    retrieved: Tensor  # ``[k S]`` bool, which retrieved keys hold a token


def token_slots(config, position, device: torch.device) -> TokenSlots:
    """The slots of the token at ``position`` (an int, or a tensor ``[1]`` on ``device``)."""
    P, W, S, N = config.persistent_slots, config.window, config.segment_len, config.store_slots
    at = position if isinstance(position, Tensor) else torch.tensor([position], device=device)
    working = P + retrieved_keys(config) + position % W if W > 0 else None
    if config.top_k == 0:
        return TokenSlots(working, at, at, at, at)
    retrievable_slots = token_retrievable(at, config)
    return TokenSlots(working, at // S % N, at % S, retrievable_slots, retrieved_slots(retrievable_slots, config))


def retrieved_keys(config) -> int:
    """k S: the cache slots of the retrieved segments' tokens (0 without a long-term memory)."""
    return min(config.top_k, config.store_slots) * config.segment_len if config.top_k > 0 else 0


def open_slot(mask: Tensor, slot: int | Tensor) -> None:
    """Marks cache slot ``slot`` as holding a key in the additive mask ``[K]``."""
    if isinstance(slot, Tensor):
        mask.index_fill_(0, slot, 0.0)
    else:
        mask[slot] = 0


def unit_rms(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim: RMSNorm without its weight."""
    return F.rms_norm(x, (x.shape[-1],), None, eps)


def unit_rms_cpu(x: Tensor, eps: Tensor) -> Tensor:
    """``unit_rms`` in four ops that cost less on a CPU than F.rms_norm's composite of a row."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.rsqrt(torch.addcmul(eps, norm, norm, value=1 / x.shape[-1]))


class BlockDecoder:
    """One block's buffers (from its ``BlockState``), the block's weights as its
    ``decode_weights`` folds them, and its one-token step."""

    def __init__(self, block, state: BlockState, config):
        B, H, d = state.h.shape
        self.block, self.config, self.heads = block, config, (H, d)
        P, W = config.persistent_slots, config.window
        self.retrieved_start, self.working_start = P, P + retrieved_keys(config)
        # [2, B, H, K, d]: keys, values.
        self.cache = torch.zeros(2, B, H, self.working_start + W, d, dtype=state.h.dtype, device=state.h.device)
        self.keys, self.values = self.cache  # views, kept: unbinding costs an op a token
        self.h, self.store, self.index = (torch.empty_like(t) for t in (state.h, state.store, state.index))
        self.rows = torch.arange(B, device=state.h.device).view(-1, 1)
        if state.h.is_cuda:
            self.unit_rms = partial(unit_rms, eps=block.norm_eps)
        else:
            self.unit_rms = partial(unit_rms_cpu, eps=state.h.new_tensor(block.norm_eps))
        self.mode, self.window, self.has_long_term = block.mode, config.window, config.top_k > 0
        self.decay_of_logits = block.decay_of_logits
        self.down_parts = down_parts(B, config.ffn_mult * config.dim, state.h.device)
        self.addmm = few_rows_product(B, state.h.device)
        self.fold_weights()
        self.load(state)

    @torch.no_grad()
    def fold_weights(self) -> None:
        """The block's ``decode_weights`` as plain attributes (a module's attribute lookup
        costs as much as an op here), the FFN's output weight in ``down_parts`` slices. Later
        calls refresh them in place (after an optimizer step), so that CUDA graphs that read
        them stay valid."""
        weights = self.block.decode_weights()
        weights["ffn_w2_t"] = self.split_down(weights["ffn_w2_t"])
        self.n_mdi = weights["w_in_t"].shape[1] - 4 * self.config.dim
        for name, value in weights.items():
            if hasattr(self, name):
                getattr(self, name).copy_(value)
            else:
                setattr(self, name, value)

    def decay(self, hidden_in: Tensor) -> Tensor:
        """MDI's gamma ``[B, D]`` from its first layers' outputs ``[B, 2 hidden]`` (``MDI.folded``)."""
        return self.decay_of_logits(self.addmm(self.decay_b, F.gelu(hidden_in), self.decay_w_t), self.decay_eps)

    def load(self, state: BlockState) -> None:
        """Fills the buffers, in place, from ``state``."""
        config, (H, d) = self.config, self.heads
        B, P, W = state.h.shape[0], config.persistent_slots, config.window
        self.cache.zero_()
        for i in (0, 1):
            self.cache[i][:, :, :P] = self.persistent[:, i].view(P, H, d).transpose(0, 1)
        self.cache[:, :, :, self.working_start :] = state.recent_kv.view(B, W, 2, H, d).permute(2, 0, 3, 1, 4)
        self.h.copy_(state.h)
        self.store.copy_(state.store)
        self.index.copy_(state.index)

    def write(self, slot: int | Tensor, kv: Tensor) -> None:
        """kv ``[B, 2, D]`` into cache slot ``slot``."""
        kv = kv.view(kv.shape[0], 2, *self.heads).transpose(0, 1)
        if isinstance(slot, Tensor):
            self.cache.index_copy_(3, slot, kv.unsqueeze(3).to(self.cache.dtype))
        else:
            self.cache.select(3, slot).copy_(kv)

    def step(self, x: Tensor, plan: TokenPlan, slots: TokenSlots, mask: Tensor) -> Tensor:
        """x ``[B, D]`` of a token -> the block's output ``[B, D]``; ``mask`` ``[K]``: 0 on
        the slots that hold a key, this token's included, -inf elsewhere (added to the
        scores).

        ``MMRecBlock.forward``'s maths for one token, written with the functional ops
        (a module call costs more than its op at this size)."""
        (H, d), (B, D) = self.heads, x.shape
        projected = self.addmm(self.b_in, self.unit_rms(x), self.w_in_t)
        q, z = projected[:, :D].view(B, H, d), projected[:, 3 * D : 4 * D].view(B, H, d)
        kv = projected[:, D : 3 * D].view(B, 2, D)
        if self.window > 0:
            self.write(slots.working, kv)
        if self.has_long_term:
            self.retrieve(q, kv, plan, slots)
        m = mmrec_ops.decode_read(q, self.keys, self.values, mask)
        h = None if self.mode == "none" else self.recurrence(projected[:, 4 * D : 4 * D + self.n_mdi], z)
        y = torch.addmm(x, (m if h is None else h + m).view(B, D), self.w_out_t)
        hidden = F.gelu(self.addmm(self.ffn_b0, self.unit_rms(y), self.ffn_w0_t))
        out = y + self.ffn_down(hidden)
        if plan.completes:
            key_sum = self.store[:, slots.store_slot, :, 0].sum(2)
            self.index.index_copy_(1, slots.store_slot, key_sum)
        if h is not None:
            self.h.copy_(h)
        return out

    def split_down(self, weight_t: Tensor) -> Tensor:
        """The FFN's output weight, transposed, ``[F, D]``, as ``ffn_down`` reads it: as is,
        or in ``down_parts`` slices of F, ``[parts, F / parts, D]``."""
        return weight_t if self.down_parts == 1 else weight_t.unflatten(0, (self.down_parts, -1))

    def ffn_down(self, hidden: Tensor) -> Tensor:
        """The FFN's output layer of hidden ``[B, F]`` -> ``[B, D]``: one product, or
        ``down_parts`` products over slices of F, summed."""
        if self.down_parts == 1:
            return torch.addmm(self.ffn_b2, hidden, self.ffn_w2_t)
        parts = torch.bmm(hidden.view(hidden.shape[0], self.down_parts, -1).transpose(0, 1), self.ffn_w2_t)
        return parts.sum(0) + self.ffn_b2

    def recurrence(self, mdi_hidden: Tensor, z: Tensor) -> Tensor:
        """The new state h ``[B, H, d]``: h' = z sigmoid(W_g s + b_g) + gamma h, s = h (mode
        'exact') or z ('parallel'), gamma = MDI(z, k) from its first layers' outputs
        ``[B, 2 hidden]``."""
        gate_input = self.h if self.mode == "exact" else z
        gate = torch.sigmoid(torch.baddbmm(self.gate_b, gate_input.transpose(0, 1), self.gate_w_t))
        gamma = self.decay(mdi_hidden).view_as(z)
        return torch.addcmul(gamma * self.h, z, gate.transpose(0, 1))

    def retrieve(self, q: Tensor, kv: Tensor, plan: TokenPlan, slots: TokenSlots) -> None:
        """The token's kv ``[B, 2, D]`` into the store; the tokens of the segments its query
        q ``[B, H, d]`` chooses (``store.select_segments``) into the cache."""
        (H, d), S = self.heads, self.config.segment_len
        if plan.starts:
            self.store.index_fill_(1, slots.store_slot, 0)
            self.index.index_fill_(1, slots.store_slot, 0)
        self.store[self.rows, slots.store_slot, slots.store_offset] = kv.unsqueeze(1).to(self.store.dtype)
        chosen, _ = select_segments(q.unsqueeze(1), self.index / S, slots.retrievable, self.config.top_k)
        tokens = self.store[self.rows, chosen[:, 0]].flatten(1, 2)  # [B, k S, 2, D]
        B, K = tokens.shape[:2]
        self.cache[:, :, :, self.retrieved_start : self.working_start] = tokens.view(B, K, 2, H, d).permute(
            2, 0, 3, 1, 4
        )

    def state(self) -> BlockState:
        """This block's ``BlockState``, a copy of the buffers."""
        (H, d), B, W = self.heads, self.h.shape[0], self.config.window
        ring = self.cache[:, :, :, self.working_start :].permute(1, 3, 0, 2, 4)  # [B, W, 2, H, d]
        recent_kv = ring.clone(memory_format=torch.contiguous_format).view(B, W, 2, H * d)
        return BlockState(self.h.clone(), recent_kv, self.store.clone(), self.index.clone())


def check_one_document(state: MemoryState) -> None:
    """A ValueError for a state of packed documents, which the decoder does not take."""
    if not isinstance(state, MemoryState):
        raise ValueError(
            f"Decoder: expected a MemoryState, got a {type(state).__name__} "
            "(packed documents, from a call with starts, are read by MMRecModel.forward only)"
        )


class Decoder:
    """``model`` decoding from ``state`` (after at least one token), a token at a time:

        decoder = Decoder(model, state)
        logits = decoder.step(token)        # token [B, 1] -> logits [B, V]; in place
        state = decoder.state()             # the model's MemoryState after those tokens
        decoder.load(other_state)           # the same buffers (and graphs), another state

    The same logits and state as ``model(token, state)`` token after token (float32
    rounding), in inference mode (its logits are inference tensors). ``cuda_graphs``
    (a model on CUDA): ``step`` replays CUDA graphs of ``static_step``. Rows of packed
    documents are not decoded: a ``PackedState`` (from a call with ``starts``) is refused.
    """

    def __init__(self, model, state: MemoryState, cuda_graphs: bool = False):
        check_one_document(state)
        device = state.position.device
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"Decoder: cuda_graphs needs a model and state on CUDA, got a state on {device}")
        self.model, self.config, self.cuda_graphs = model, model.config, cuda_graphs
        self.position = int(state.position)
        with torch.no_grad():
            self.blocks = [BlockDecoder(b, s, self.config) for b, s in zip(model.blocks, state.blocks)]
        # The read's mask as scores to add, [K]: 0 where a slot holds a key, else -inf; in
        # the caches' dtype, as decode_read takes it.
        self.mask = torch.empty(len(self.initial_mask()), dtype=state.blocks[0].h.dtype, device=device)
        # static_step's inputs: the token, and the position as the device sees it (its
        # graphs advance it; ``device_position_at`` is the host's copy of its value).
        B = state.blocks[0].h.shape[0]
        self.token = torch.zeros(B, 1, dtype=torch.int64, device=device)
        self.device_position = torch.zeros(1, dtype=torch.int64, device=device)
        self.device_position_at = None
        self.graphs: dict[TokenPlan, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.warmed_up: set[TokenPlan] = set()
        self.streaming = False  # MMRecModel.stream's: whether a stream is reading from it
        self.load_mask()

    def initial_mask(self) -> Tensor:
        """``[K]``: the slots that hold a key before the next token writes its own."""
        return slots_with_keys(torch.tensor(self.position), self.config, with_token=False)

    def load_mask(self) -> None:
        self.mask.zero_().masked_fill_(~self.initial_mask().to(self.mask.device), float("-inf"))

    @torch.no_grad()
    def load(self, state: MemoryState) -> None:
        """Decode from ``state`` (of this batch size) on: its values, and the model's weights
        as they are now, into the same buffers."""
        check_one_document(state)
        if state.blocks[0].h.shape != self.blocks[0].h.shape:
            raise ValueError(
                f"Decoder.load: expected a state of batch size {self.token.shape[0]}, got {state.blocks[0].h.shape[0]}"
            )
        self.position = int(state.position)
        for block, block_state in zip(self.blocks, state.blocks):
            block.fold_weights()
            block.load(block_state)
        self.load_mask()

    def advance(self, token: Tensor, plan: TokenPlan, slots: TokenSlots) -> Tensor:
        """The token ``[B, 1]`` through every block -> logits ``[B, V]``."""
        c = self.config
        if c.window > 0 and (isinstance(slots.working, Tensor) or self.position < c.window):
            open_slot(self.mask, slots.working)  # later, every ring slot holds a key already
        if c.top_k > 0:
            retrieved = self.mask[c.persistent_slots : c.persistent_slots + retrieved_keys(c)]
            retrieved.copy_(torch.where(slots.retrieved, 0.0, float("-inf")))
        x = self.model.embed(token).squeeze(1)
        for block in self.blocks:
            x = block.step(x, plan, slots, self.mask)
        return self.model.head(x)

    @torch.inference_mode()
    def step(self, token: Tensor) -> Tensor:
        """token ``[B, 1]`` at the current position -> logits ``[B, V]``."""
        plan = token_plan(self.config, self.position)
        if self.cuda_graphs:
            logits = self.replay(token, plan)
        else:
            logits = self.advance(token, plan, token_slots(self.config, self.position, self.mask.device))
        self.position += 1
        return logits

    @torch.inference_mode()
    def static_step(self, token: Tensor) -> Tensor:
        """``step``'s maths as its CUDA graphs run it, eagerly, on any device: the buffers
        updated in place, the slots computed on the device from ``device_position``."""
        self.sync_position()
        self.token.copy_(token)
        logits = self.static_advance(token_plan(self.config, self.position))
        self.position += 1
        return logits

    def sync_position(self) -> None:
        if self.device_position_at != self.position:
            self.device_position.fill_(self.position)
        self.device_position_at = self.position + 1  # after this token's step

    def static_advance(self, plan: TokenPlan) -> Tensor:
        """``self.token`` through ``advance``, then ``device_position`` + 1: a graph's body."""
        logits = self.advance(self.token, plan, token_slots(self.config, self.device_position, self.mask.device))
        self.device_position.add_(1)
        return logits

    def replay(self, token: Tensor, plan: TokenPlan) -> Tensor:
        """``static_step`` of the token through the graph of its plan: the first token of a
        plan runs it eagerly on a side stream (the warm-up that CUDA graphs want), the
        second captures it."""
        self.sync_position()
        self.token.copy_(token)
        if plan not in self.graphs:
            if plan not in self.warmed_up:
                self.warmed_up.add(plan)
                return self.warm_up(plan)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self.static_advance(plan)
            self.graphs[plan] = graph, logits
        graph, logits = self.graphs[plan]
        graph.replay()
        return logits.clone()  # the next replay overwrites the graph's output

    def warm_up(self, plan: TokenPlan) -> Tensor:
        current, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            logits = self.static_advance(plan)
        current.wait_stream(side)
        logits.record_stream(current)
        return logits

    def state(self) -> MemoryState:
        position = torch.tensor(self.position, device=self.mask.device)
        return MemoryState(position, tuple(block.state() for block in self.blocks))
