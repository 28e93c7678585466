"""MMRecBlock: the recurrence (short-term memory) and multi-memory attention (working,
long-term and persistent memory)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import mmrec_ops

from ..config import MMRecConfig
from ..memory import (
    BlockState,
    MemoryLayout,
    TokenLayout,
    candidate_keys,
    candidate_segments,
    select_segments,
    update_ring,
    update_store,
)
from .mdi import MDI
from .read import MultiMemoryAttention, attend, flex_attend

# The longest fresh chunk whose retrieved tokens an eager read takes from the whole chunk,
# masked (O(T^2) scores); a longer one reads each query's chosen segments (segment_read).
DENSE_CHUNK = 4096


class MMRecBlock(nn.Module):
    """One MM-Rec block (docs/design.md 2.1), x ``[B, T, D]`` -> ``[B, T, D]``:

        u          = RMSNorm(x)
        q, k, v, z = split(u W_in)
        gamma      = MDI(z, k)
        h          = recurrence(z, gamma, W_g, b_g, h0)      per head, [B, T, H, d]
        m          = MultiMemoryAttention(q; working, long-term, persistent memory)
        y          = x + W_o (h + m)
        out        = y + FFN(RMSNorm(y))

    ``recurrence`` is, in mode 'exact', h_t = z_t sigmoid(W_g h_{t-1} + b_g) + gamma_t h_{t-1}
    (``mmrec.recurrence``), and in mode 'parallel' the gate reads the input instead,
    h_t = z_t sigmoid(W_g z_t + b_g) + gamma_t h_{t-1} (``mmrec.scan``). Same parameters.
    Mode 'none' (an ablation) has no recurrence: h = 0, and no MDI or gate parameters.

    ``forward`` runs a chunk, ``step`` one token; ``decode_weights`` gives the weights
    folded as ``decode.BlockDecoder``'s in-place one-token step reads them.
    """

    # A one-token step's gamma from the folded MDI's logits (``decode_weights``): a plain
    # function, so that a decoder calls it without a module attribute lookup.
    decay_of_logits = staticmethod(MDI.gamma_of_logits)

    def __init__(self, config: MMRecConfig):
        super().__init__()
        D, H, d = config.dim, config.n_heads, config.head_dim
        self.n_heads, self.mode, self.norm_eps = H, config.mode, config.norm_eps
        self.config = config
        self.norm_mix = nn.RMSNorm(D, eps=config.norm_eps)
        self.w_in = nn.Linear(D, 4 * D, bias=False)
        if self.mode != "none":
            self.mdi = MDI(D)
            self.gate_weight = nn.Parameter(torch.empty(H, d, d))
            self.gate_bias = nn.Parameter(torch.empty(H, d))
        self.memory = MultiMemoryAttention(D, config.persistent_slots, config.window, config.read_kernel)
        self.w_out = nn.Linear(D, D, bias=False)
        self.norm_ffn = nn.RMSNorm(D, eps=config.norm_eps)
        self.ffn = nn.Sequential(nn.Linear(D, config.ffn_mult * D), nn.GELU(), nn.Linear(config.ffn_mult * D, D))

    @torch.no_grad()
    def init_weights(self, init_std: float, n_layers: int) -> None:
        """GPT-2's scheme: projections N(0, init_std), the residual branches' outputs
        scaled down with depth (so the residual stream keeps its scale at init whatever
        the number of layers), biases 0, norms 1. The gate's W_g ~ N(0, 1/d) keeps
        W_g h at the scale of h; the persistent slots start at the scale of the keys and
        values, projections u W_in of a unit-RMS input u."""
        residual_std = init_std / math.sqrt(2 * n_layers)
        for norm in (self.norm_mix, self.norm_ffn):
            norm.reset_parameters()
        nn.init.normal_(self.w_in.weight, std=init_std)
        nn.init.normal_(self.w_out.weight, std=residual_std)
        nn.init.normal_(self.ffn[0].weight, std=init_std)
        nn.init.zeros_(self.ffn[0].bias)
        nn.init.normal_(self.ffn[2].weight, std=residual_std)
        nn.init.zeros_(self.ffn[2].bias)
        nn.init.normal_(self.memory.persistent, std=init_std * math.sqrt(self.w_in.in_features))
        if self.mode != "none":
            self.mdi.init_weights(init_std)
            nn.init.normal_(self.gate_weight, std=1 / math.sqrt(self.gate_weight.shape[-1]))
            nn.init.zeros_(self.gate_bias)

    def recurrence(self, z: Tensor, k: Tensor, h0: Tensor, resets: Tensor | None = None) -> Tensor:
        """h ``[B, T, H, d]`` from z, k ``[B, T, D]`` and h0 ``[B, H, d]``, in z's dtype
        (autocast leaves the parameters in float32; the ops want one dtype). ``resets``
        ``[B, T]`` bool (None: none): tokens whose h_{t-1} is 0, the start of a document."""
        heads = (self.n_heads, -1)
        gamma = self.mdi(z, k).unflatten(-1, heads).to(z.dtype)
        z = z.unflatten(-1, heads)
        weight, bias, h0 = self.gate_weight.to(z.dtype), self.gate_bias.to(z.dtype), h0.to(z.dtype)
        if self.mode == "exact":
            if resets is not None:
                return recurrence_with_resets(z, gamma, weight, bias, h0, resets)
            return mmrec_ops.recurrence(z, gamma, weight, bias, h0)
        gate = torch.sigmoid(torch.einsum("hoi,bthi->btho", weight, z) + bias)
        if resets is not None:
            # h_t = gamma_t h_{t-1} + x_t with gamma_t = 0 is x_t: h_{t-1} = 0's.
            gamma = gamma.masked_fill(resets.view(*resets.shape, 1, 1), 0)
        return mmrec_ops.scan(gamma, z * gate, h0)

    def project(
        self, x: Tensor, state: BlockState, resets: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """q ``[B, T, H, d]``, kv ``[B, T, 2, D]`` and the recurrence's h ``[B, T, H, d]``
        (None without one) of x ``[B, T, D]``; ``resets`` as ``recurrence``'s."""
        u = self.norm_mix(x)
        q, k, v, z = self.w_in(u).chunk(4, dim=-1)
        h = None if self.mode == "none" else self.recurrence(z, k, state.h, resets)
        # Contiguous here, in the compiled graph, rather than copied by the read's kernels
        # in its forward and again in its backward (2 eager copies of q a block on CUDA).
        q = q.unflatten(-1, (self.n_heads, -1)).contiguous()
        return q, torch.stack([k, v], dim=2), h

    def output(self, x: Tensor, m: Tensor, h: Tensor | None, state: BlockState) -> tuple[Tensor, Tensor]:
        """out ``[B, T, D]`` from x, the read m and h ``[B, T, H, d]``, and the new h state."""
        mixed, h_last = m, state.h
        if h is not None:
            mixed = h + m.to(h.dtype)
            # A copy, not a view: the state must not keep the whole [B, T, H, d] h alive.
            h_last = h[:, -1].to(state.h.dtype, memory_format=torch.contiguous_format, copy=True)
        y = x + self.w_out(mixed.flatten(-2))
        return y + self.ffn(self.norm_ffn(y)), h_last

    @torch.no_grad()
    def decode_weights(self) -> dict[str, Tensor]:
        """The block's weights as a one-token step on rows x ``[B, D]`` reads them
        (``decode.BlockDecoder``), fresh tensors: transposed once (a row times a contiguous
        W^T is the faster product), each RMSNorm's weight folded into the matrix that reads
        its output, and one matrix reading u for all that is linear in it:

            w_in_t ``[D, 4 D + 2 D/4]``, b_in: [q, k, v, z] = u W_in^T, then MDI's first
                layers (``MDI.folded``: decay_w_t, decay_b, decay_eps for the rest)
            gate_b ``[H, 1, d]``, gate_w_t ``[H, d, d]``: the recurrence's W_g s + b_g per head
            w_out_t ``[D, D]``; ffn_w0_t ``[D, F]``, ffn_b0, ffn_w2_t ``[F, D]``, ffn_b2: the FFN
            persistent ``[P, 2, D]``: the persistent slots' keys and values

        (no MDI, decay or gate weights in mode 'none')."""
        D = self.w_in.in_features
        rows, biases = [self.w_in.weight], [self.w_in.weight.new_zeros(4 * D)]
        weights = {}
        if self.mode != "none":
            mdi = self.mdi.folded(self.w_in.weight)
            rows, biases = rows + [mdi["rows"]], biases + [mdi["bias"]]
            weights.update(
                decay_w_t=mdi["second_t"],
                decay_b=mdi["second_bias"],
                decay_eps=mdi["eps"],
                gate_b=self.gate_bias.unsqueeze(1).clone(),
                gate_w_t=self.gate_weight.transpose(1, 2).clone(),
            )
        ffn_in, ffn_out = self.ffn[0], self.ffn[2]
        weights.update(
            w_in_t=(torch.cat(rows) * self.norm_mix.weight).t().contiguous(),
            b_in=torch.cat(biases),
            w_out_t=self.w_out.weight.t().contiguous(),
            ffn_b0=ffn_in.bias.clone(),
            ffn_w0_t=(ffn_in.weight * self.norm_ffn.weight).t().contiguous(),
            ffn_b2=ffn_out.bias.clone(),
            ffn_w2_t=ffn_out.weight.t().contiguous(),
            persistent=self.memory.persistent.clone(),
        )
        return weights

    def forward(
        self, x: Tensor, state: BlockState, layout: MemoryLayout, fresh: bool = False
    ) -> tuple[Tensor, BlockState]:
        """x ``[B, T, D]``, state of this block, and the chunk's ``memory_layout`` (which the
        model computes once for all its blocks) -> (out ``[B, T, D]``, new state).
        ``fresh``: the state is ``initial_state``'s (an empty store), so that the retrieved
        tokens are read from the chunk alone."""
        q, kv, h = self.project(x, state, layout.resets)
        store, index, retrieved = state.store, state.index, None
        c = self.config
        if c.top_k > 0:
            # A fresh chunk reads its own tokens alone; a store of 0 slots is not returned.
            pool = torch.cat([store.flatten(1, 2), kv.to(store.dtype)], dim=1) if store.shape[1] else None
            # From a fresh state no token before W + S - 1 has a segment to retrieve.
            if not fresh or x.shape[1] >= c.window + c.segment_len:
                retrieved = self.retrieve(q, kv, pool, None if fresh else index, layout)
            if pool is not None:
                store, index = update_store(pool, index, layout.store)
        earlier = state.recent_kv[:, layout.working_order]  # oldest first
        m = self.memory(q, kv, earlier, layout, retrieved)
        out, h_last = self.output(x, m, h, state)
        return out, BlockState(h_last, update_ring(earlier, kv, layout.working_slots), store, index)

    def retrieve(
        self, q: Tensor, kv: Tensor, pool: Tensor | None, index: Tensor | None, layout: MemoryLayout
    ) -> tuple[Tensor, Tensor]:
        """The read of the long-term tokens each query of the chunk retrieves
        (``memory.store``): the top_k segments of its choice among those it may retrieve, in
        the pool ``[B, N S + T, 2, D]`` (the store before the chunk, then the chunk) and by the
        state's ``index``; from a fresh state (index None), in the chunk ``kv`` alone.
        -> out ``[B, T, H, d]``, lse ``[B, H, T]``.

        Compiled on CUDA, flex_attention over the pool, skipping what no query chose;
        otherwise (eager flex_attention would score every key), from a fresh state of at
        most ``DENSE_CHUNK`` tokens, ``attend`` over the chunk masked to the chosen segments,
        else ``mmrec_ops.segment_read`` of each query's chosen segments among the candidates'
        (``candidate_segments``): memory O(C S) for them, not O(T k S) for gathered copies."""
        c, store = self.config, layout.store
        fresh, T = index is None, kv.shape[1]
        shared, start = (kv, c.store_slots * c.segment_len) if fresh else (pool, 0)
        keys = candidate_keys(shared, index, store, c.segment_len, start)
        chosen, ok = select_segments(q, keys, store.retrievable, c.top_k)
        flex = q.is_cuda and torch.compiler.is_compiling()
        if (fresh and T <= DENSE_CHUNK) or flex:
            picked = torch.zeros_like(store.retrievable).expand(*chosen.shape[:2], -1).scatter(-1, chosen, ok)
            key_candidates = store.key_candidates[-T:] if fresh else store.key_candidates
            if flex:
                return flex_attend(q, shared, picked, key_candidates)
            seen = picked.gather(-1, key_candidates.clamp(min=0).expand(*chosen.shape[:2], -1)) & (key_candidates >= 0)
            return attend(q, shared, seen)
        segments = candidate_segments(shared, store, c.segment_len, start).to(q.dtype)
        return mmrec_ops.segment_read(q, segments, torch.where(ok, chosen, -1))

    def step(self, x: Tensor, state: BlockState, layout: TokenLayout) -> tuple[Tensor, BlockState]:
        """``forward`` for one token, x ``[B, 1, D]``, with the token's ``token_layout``:
        the same outputs and state in fewer, smaller ops (``MMRecModel``'s functional
        one-token call; ``decode.BlockDecoder`` runs the same maths in place, on the
        weights of ``decode_weights``)."""
        q, kv, h = self.project(x, state)
        ring = state.recent_kv
        if ring.shape[1] > 0:
            ring = ring.index_copy(1, layout.working_slot, kv.to(ring.dtype))
        store, index, retrieved = state.store, state.index, None
        if self.config.top_k > 0:
            store, index, retrieved = self.retrieve_token(q, kv, store, index, layout)
        m = self.memory.read_token(q, ring, retrieved, layout.read_mask)
        out, h_last = self.output(x, m, h, state)
        return out, BlockState(h_last, ring, store, index)

    def retrieve_token(
        self, q: Tensor, kv: Tensor, store: Tensor, index: Tensor, layout: TokenLayout
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One token's long-term step: its key and value into the store, the tokens of the
        segments it retrieves ``[B, k S, 2, D]`` (those past the retrievable ones are masked
        by ``layout.read_mask``), and its segment's index key once it completes it.
        -> (store, index, retrieved)."""
        B, S = store.shape[0], self.config.segment_len
        store = store.clone()
        # A token that starts a segment clears its slot, and the slot's index key.
        store[:, layout.store_slot] *= ~layout.starts
        index = torch.where(layout.starts, index.index_fill(1, layout.store_slot, 0), index)
        store[:, layout.store_slot, layout.store_offset] = kv.to(store.dtype)
        chosen, _ = select_segments(q, index / S, layout.retrievable, self.config.top_k)
        retrieved = store[torch.arange(B, device=store.device).view(-1, 1), chosen[:, 0]].flatten(1, 2)
        key_sum = store[:, layout.store_slot, :, 0].sum(2)
        index = torch.where(layout.completes, index.index_copy(1, layout.store_slot, key_sum), index)
        return store, index, retrieved


# It reads the resets back to cut the chunk: eager under torch.compile (one graph break,
# rather than a graph for each piece).
@torch.compiler.disable
def recurrence_with_resets(
    z: Tensor, gamma: Tensor, weight: Tensor, bias: Tensor, h0: Tensor, resets: Tensor
) -> Tensor:
    """``mmrec_ops.recurrence`` (h ``[B, T, H, d]``) where each row restarts from h = 0 at
    its tokens of ``resets`` ``[B, T]``: the gate reads h_{t-1}, so a reset is no change of
    the inputs; the chunk is cut at every column where some row restarts, each piece run
    from the carried state of the rows that go on and 0 for those that restart."""
    cuts = sorted({0, *resets.any(0).nonzero().flatten().tolist()}) + [z.shape[1]]
    pieces, h = [], h0
    for begin, end in zip(cuts[:-1], cuts[1:]):
        h = h.masked_fill(resets[:, begin].view(-1, 1, 1), 0)
        pieces.append(mmrec_ops.recurrence(z[:, begin:end], gamma[:, begin:end], weight, bias, h))
        h = pieces[-1][:, -1]
    return torch.cat(pieces, dim=1)
